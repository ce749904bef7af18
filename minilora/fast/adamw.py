"""AdamW's update in cache-sized pieces, its parameters spread over threads; one kernel on a device.

The update is a chain of a dozen elementwise passes over a parameter, its gradient and its two
moments. Written plainly (the reference form, :meth:`minilora.optim.AdamW.step`) each pass
streams all four arrays through memory; here each cache-sized piece goes through every pass
before the next is touched, with two scratch buffers. Every element gets the same operations in
the same order as the reference form, so the result is the same to the bit
(``tests/test_fast_elementwise.py`` checks it). Each parameter's update is its own, so on the
CPU a large model's parameters are updated on several threads at once (NumPy releases the GIL in
its loops) and the result does not depend on how they are split.

On a device the whole chain is one fused kernel (:func:`adamw_update_device`), its settings
passed in the parameter's type: one launch where the passes were a dozen, the same operations in
the same order. And it is one kernel for many parameters at once: :class:`FlatSet` lays a group's
parameters of one dtype end to end in one flat buffer (each parameter's array becomes a view of
it), with their two moments beside them, and gathers their gradients into one more, so that
AdamW's step over the whole model is a couple of launches, not two per parameter.
"""

from __future__ import annotations

import math
from typing import Any

from .. import backend as B
from . import cpu
from .device import elementwise
from .elementwise import piece_size

# parameters (elements in all) from which the update is worth splitting among threads: below,
# the hand-off to a second thread costs more than it saves
THREADED_FROM = 1 << 18


def adamw_step(updates: list[tuple]) -> None:
    """Apply :func:`adamw_update` to every ``(p, grad, m, v, lr, b1, b2, eps, weight_decay, t,
    grad_scale)`` in ``updates``, in place: on the CPU on one thread per core once the parameters
    hold ``THREADED_FROM`` elements in all, else one after another; on a device one fused kernel
    per entry (:func:`adamw_update_device`), an entry being a parameter or a :class:`FlatSet`'s
    buffers."""
    if B.on_device():
        for u in updates:
            adamw_update_device(*u)
        return
    sizes = [u[0].size for u in updates]
    threads = cpu.available_cpus() if sum(sizes) >= THREADED_FROM else 1
    cpu.for_each_in_threads(lambda k: adamw_update(*updates[k]), sizes, threads)


def flat_pieces(arrays: list) -> tuple[list, list, tuple]:
    """Flat views of equally shaped arrays, the slices that cut them into cache-sized pieces and
    the shape of a scratch buffer for one piece. An array that is not contiguous cannot be
    viewed flat: then the arrays stay as they are, in one piece."""
    if not all(a.flags.c_contiguous for a in arrays):
        return arrays, [slice(None)], arrays[0].shape
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].shape[0]
    m = piece_size(n)
    return flat, [slice(i, i + m) for i in range(0, n, m)], (m,)


def adamw_update(p: Any, grad: Any, m: Any, v: Any, lr: float, b1: float, b2: float,
                 eps: float, weight_decay: float, t: int, grad_scale: float = 1.0) -> None:
    """AdamW's update of one parameter p at step t, in place, piece by piece, with
    g = grad * grad_scale: ``p <- p (1 - lr wd)``; ``m <- b1 m + (1 - b1) g``;
    ``v <- b2 v + (1 - b2) g^2``; ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) +
    eps)``. p, grad, m, v of one shape; the settings Python floats (a NumPy float64 scalar would
    upcast a float32 update)."""
    (pf, gf, mf, vf), pieces, scratch = flat_pieces([p, grad.astype(p.dtype, copy=False), m, v])
    tmp, upd = B.xp.empty(scratch, dtype=p.dtype), B.xp.empty(scratch, dtype=p.dtype)
    scaled = B.xp.empty(scratch, dtype=p.dtype) if grad_scale != 1.0 else None
    step_size = lr / (1.0 - b1 ** t)
    bias_root = math.sqrt(1.0 - b2 ** t)
    for piece in pieces:
        pi, gi, mi, vi = pf[piece], gf[piece], mf[piece], vf[piece]
        ti, ui = tmp[:pi.shape[0]], upd[:pi.shape[0]]
        if scaled is not None:  # clipping folded in: g * coef, p.grad left as it is
            gi = B.xp.multiply(gi, grad_scale, out=scaled[:pi.shape[0]])
        if weight_decay:
            pi *= 1.0 - lr * weight_decay  # decoupled decay: p (1 - lr wd)
        mi *= b1
        B.xp.multiply(gi, 1.0 - b1, out=ti)
        mi += ti  # m = b1 m + (1 - b1) g
        vi *= b2
        B.xp.multiply(gi, 1.0 - b2, out=ti)
        ti *= gi
        vi += ti  # v = b2 v + (1 - b2) g^2
        B.xp.sqrt(vi, out=ti)
        ti /= bias_root
        ti += eps  # sqrt(v) / sqrt(1 - b2^t) + eps
        B.xp.multiply(mi, step_size, out=ui)
        ui /= ti
        pi -= ui  # p -= lr / (1 - b1^t) * m / (...)


# AdamW's chain as one kernel: g, then the decay, the two moments and the step, each operation
# the host form's, in its order (``(p - a) * b`` here is ``p -= a; p *= b`` there)
_ADAMW = ("{C} g = (({C})grad) * scale; p = p * decay; m = b1 * m + c1 * g; "
          "v = b2 * v + c2 * g * g; p = p - step * m / (sqrt(v) / root + eps);")


def adamw_update_device(p: Any, grad: Any, m: Any, v: Any, lr: float, b1: float, b2: float,
                        eps: float, weight_decay: float, t: int, grad_scale: float = 1.0) -> None:
    """:func:`adamw_update` as one fused kernel on a device, in place on p, m and v; every setting
    is passed in p's type, as the host form's Python floats meet a float32 array."""
    kernel = elementwise("adamw", p.dtype, "G grad, {P} decay, {P} b1, {P} c1, {P} b2, {P} c2, "
                         "{P} step, {P} root, {P} eps, {P} scale", "{P} p, {P} m, {P} v", _ADAMW)
    kernel(grad, 1.0 - lr * weight_decay, b1, 1.0 - b1, b2, 1.0 - b2, lr / (1.0 - b1 ** t),
           math.sqrt(1.0 - b2 ** t), eps, grad_scale, p, m, v)


class FlatSet:
    """Arrays of one dtype laid end to end: ``params``, ``exp_avg``, ``exp_avg_sq`` and ``grad``,
    flat buffers of ``sum(sizes)`` elements, and each member's view of the first three.

    Member k owns elements ``offsets[k] : offsets[k] + sizes[k]`` of every buffer, viewed in its
    own shape. AdamW's update is the same on every element whatever array it sits in, so one
    update of the flat buffers is the update of every member, to the bit. The parameters are
    copied in when the set is made; a member's array that has since been replaced (a loaded
    optimizer state, say) is copied in by :meth:`adopt`, which hands back its view.
    """

    def __init__(self, arrays: list, dtype: Any) -> None:
        self.shapes = [tuple(a.shape) for a in arrays]
        self.sizes = [int(a.size) for a in arrays]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(arrays))]
        total = sum(self.sizes)
        self.params = self._gather(arrays, B.xp.empty(total, dtype=dtype))
        self.exp_avg = B.xp.zeros(total, dtype=dtype)
        self.exp_avg_sq = B.xp.zeros(total, dtype=dtype)
        self.grad = B.xp.empty(total, dtype=dtype)
        self.views = {name: [self._view(getattr(self, name), k) for k in range(len(arrays))]
                      for name in ("params", "exp_avg", "exp_avg_sq")}

    def _view(self, flat: Any, k: int) -> Any:
        return flat[self.offsets[k]:self.offsets[k] + self.sizes[k]].reshape(self.shapes[k])

    @staticmethod
    def _gather(arrays: list, out: Any) -> Any:
        """``arrays`` end to end in ``out``, cast to its dtype (one launch)."""
        if arrays:
            B.xp.concatenate([a.reshape(-1) for a in arrays], out=out)
        return out

    def adopt(self, name: str, k: int, array: Any) -> Any:
        """Member k's view in buffer ``name``, holding ``array``'s values (copied in unless
        ``array`` is that view already)."""
        view = self.views[name][k]
        if array is not view:
            view[...] = array
        return view

    def gather(self, grads: list) -> Any:
        """The members' gradients end to end in ``grad`` (cast to the set's dtype, as the
        per-parameter form casts a wider gradient)."""
        return self._gather(grads, self.grad)


__all__ = ["THREADED_FROM", "adamw_step", "flat_pieces", "adamw_update", "adamw_update_device",
           "FlatSet"]
