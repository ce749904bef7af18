"""Optimisers (AdamW, SGD), gradient clipping and the warmup + cosine learning-rate schedule.

Parameters that do not require a gradient are skipped entirely and get no optimiser state: with
LoRA that is most of the model, and it is where the memory saving of the method comes from.
Clipping can be done in place (:func:`clip_grad_norm`) or folded into the update
(``step(grad_scale=clip_coefficient(norm, max_norm))``, what the training loop does).
Updates run in place, in each parameter's own dtype. AdamW's update is written here as its
equation; its fast form (:mod:`minilora.fast.adamw`: cache-sized pieces, parameters on threads)
gives the same bits.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from . import backend as B
from . import fast
from .errors import (
    ConfigError,
    DTypeError,
    InvalidArgumentError,
    ShapeError,
    StateDictError,
    check_int,
    check_nonnegative,
    is_real,
)
from .fast.adamw import FlatSet
from .tensor import Tensor

_RATES = ("lr", "eps", "weight_decay", "momentum")  # the group settings that are one number >= 0


def _check_rates(who: str, **values: Any) -> None:
    """Each of ``values`` (a learning rate, eps, a decay) a finite number >= 0
    (:func:`minilora.errors.check_nonnegative`), named ``"who: name"``."""
    for name, v in values.items():
        check_nonnegative(v, f"{who}: {name}")


def _as_floats(value: Any) -> Any:
    """Settings as Python floats: a NumPy float64 scalar would upcast float32 updates."""
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return float(value)


def _groups(params: Iterable[Any], defaults: dict) -> tuple[list[dict], list[Tensor]]:
    """Normalise ``params`` (tensors, or dicts with "params" plus per-group settings) to groups:
    ``(groups of the parameters that train, the frozen ones left out)``."""
    if isinstance(params, Tensor):  # iterating one would make copies of its rows, never updated
        raise DTypeError(f"optimizer: params must be an iterable of Tensors (module.parameters())"
                         f" or of group dicts, got a single Tensor of shape {params.shape}; pass "
                         f"[tensor]")
    params = list(params)
    if not params:
        raise InvalidArgumentError("optimizer: got an empty parameter list")
    raw = params if isinstance(params[0], dict) else [{"params": params}]
    groups, seen, frozen = [], set(), []
    for g in raw:
        if not isinstance(g, dict) or "params" not in g:
            raise InvalidArgumentError("optimizer: a parameter group must be a dict with a "
                                       f"'params' entry, got {type(g).__name__}")
        unknown = set(g) - set(defaults) - {"params"}
        if unknown:
            raise InvalidArgumentError(f"optimizer: unknown group settings {sorted(unknown)}; "
                                       f"known: {sorted(defaults)}")
        ps = list(g["params"])  # once: it may be a generator
        if not all(isinstance(p, Tensor) for p in ps):
            raise InvalidArgumentError("optimizer: params must be Tensors (module.parameters())")
        if any(id(p) in seen for p in ps) or len({id(p) for p in ps}) != len(ps):
            raise InvalidArgumentError("optimizer: a parameter appears more than once (it would "
                                       "be updated twice per step)")
        seen.update(id(p) for p in ps)
        _check_rates("optimizer group", **{k: g[k] for k in g if k in _RATES})
        settings = {k: _as_floats(v) for k, v in {**defaults, **g}.items() if k != "params"}
        groups.append({**settings, "params": [p for p in ps if p.requires_grad]})
        frozen += [p for p in ps if not p.requires_grad]
    return groups, frozen


class Optimizer:
    """Holds parameter groups and per-parameter state; subclasses define ``step``."""

    STATE_KEYS: tuple[str, ...] = ()  # what a parameter's state holds once it has any

    def __init__(self, params: Iterable[Any], defaults: dict) -> None:
        # frozen parameters get no state and no work; kept only to say so if one is unfrozen
        self.param_groups, self._frozen = _groups(params, defaults)
        self.state: list[dict] = [{} for _ in self._params()]
        # per parameter, as PyTorch: a parameter skipped for want of a gradient keeps its own count
        self.param_steps: list[int] = [0 for _ in self._params()]
        self.step_count = 0

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter this optimiser updates."""
        for p in self._params():
            p.grad = None

    def _check_step(self) -> None:
        """Refuse a step (before anything is counted or updated) when a gradient has another
        shape than its parameter, or when a parameter frozen as the optimizer was made has since
        been unfrozen and given one (it would be left as it is, without a word)."""
        # one still frozen with a stray gradient is ignored, as it always was
        unfrozen = [p for p in self._frozen if p.requires_grad and p.grad is not None]
        if unfrozen:
            raise ConfigError(f"{type(self).__name__}.step: {len(unfrozen)} parameter(s) (shapes "
                              f"{[tuple(p.shape) for p in unfrozen[:3]]}) were frozen when the "
                              f"optimizer was made, and so are not in it, but now have "
                              f"gradients; make the optimizer after choosing what trains "
                              f"(requires_grad_, set_adapter)")
        for _, p, _, i in self._each():
            if p.grad is not None and tuple(p.grad.shape) != tuple(p.data.shape):
                raise ShapeError(f"{type(self).__name__}.step: parameter {i} of shape "
                                 f"{tuple(p.data.shape)} has a gradient of shape "
                                 f"{tuple(p.grad.shape)}")

    def _stepping(self) -> Iterable[tuple[dict, Tensor, dict, int]]:
        """What a step updates: ``(group, parameter, its state, its index)`` for each parameter
        with a gradient, its step counted (after :meth:`_check_step`)."""
        for g, p, s, i in self._each():
            if p.grad is not None:
                self.param_steps[i] += 1
                yield g, p, s, i

    def _each(self) -> Iterable[tuple[dict, Tensor, dict, int]]:
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                yield g, p, self.state[i], i
                i += 1

    def state_dict(self) -> dict:
        """``{"step": int, "lr": [per group], "param_steps": [int per parameter],
        "state": [{name: array}] per parameter}``, all on the host and copied."""
        return {"step": self.step_count, "lr": [g["lr"] for g in self.param_groups],
                "param_steps": list(self.param_steps),
                "state": [{k: B.to_numpy(v).copy() for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (same parameters, same order and shapes).

        The arrays are copied, so the same dict can be loaded again later. Without
        "param_steps" (an older dict) every parameter with state is taken to be at "step".
        """
        who = "optimizer.load_state_dict"
        if not isinstance(state, dict) or not isinstance(state.get("state"), (list, tuple)):
            keys = f" with keys {sorted(state)}" if isinstance(state, dict) else ""
            raise StateDictError(f"{who}: expected what state_dict() returns, a dict with a "
                                 f"'state' list, got {type(state).__name__}{keys}")
        check_int(state.get("step"), f"{who}: step", minimum=0, error=StateDictError)
        if len(state["state"]) != len(self.state):
            raise StateDictError(f"optimizer.load_state_dict: state holds {len(state['state'])} "
                                 f"parameters, this optimizer {len(self.state)}")
        for i, (s, p) in enumerate(zip(state["state"], self._params())):
            keys = set(s) if isinstance(s, dict) else None
            if keys is None or (keys and self.STATE_KEYS and keys != set(self.STATE_KEYS)):
                raise StateDictError(f"{who}: parameter {i}'s state must be empty or hold "
                                     f"{sorted(self.STATE_KEYS)}, got "
                                     f"{sorted(s) if isinstance(s, dict) else type(s).__name__}")
            for k, v in s.items():
                if tuple(np.shape(v)) != p.shape:
                    raise StateDictError(f"optimizer.load_state_dict: parameter {i} state {k!r} "
                                         f"has shape {np.shape(v)}, the parameter {p.shape}")
                # moments from a file are host arrays: a NaN there would make every step NaN
                if isinstance(v, np.ndarray) and not np.isfinite(v).all():
                    raise StateDictError(f"{who}: parameter {i} state {k!r} holds NaN or inf")
        lrs = list(state.get("lr", []))
        if lrs and len(lrs) != len(self.param_groups):
            raise StateDictError(f"optimizer.load_state_dict: state has {len(lrs)} group lrs, "
                                 f"this optimizer {len(self.param_groups)} groups")
        for j, lr in enumerate(lrs):
            check_nonnegative(lr, f"{who}: lr of group {j}", error=StateDictError)
        steps = state.get("param_steps")
        if steps is not None:
            for j, n in enumerate(steps):
                check_int(n, f"{who}: param_steps[{j}]", minimum=0, error=StateDictError)
        if steps is None:
            steps = [int(state["step"]) if s else 0 for s in state["state"]]
        if len(steps) != len(self.state):
            raise StateDictError(f"optimizer.load_state_dict: param_steps has {len(steps)} "
                                 f"entries, this optimizer {len(self.state)} parameters")
        self.state = [{k: B.xp.array(B.asarray(v), dtype=p.data.dtype, copy=True)
                       for k, v in s.items()}
                      for s, p in zip(state["state"], self._params())]
        self.param_steps = [int(n) for n in steps]
        self.step_count = int(state["step"])
        for g, lr in zip(self.param_groups, lrs):
            g["lr"] = float(lr)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group (what a schedule calls each step)."""
        _check_rates("set_lr", lr=lr)
        for g in self.param_groups:
            g["lr"] = float(lr)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    Per step t with gradient g:  p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;
    v <- b2 v + (1 - b2) g^2;  p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        _check_rates("AdamW", lr=lr, eps=eps, weight_decay=weight_decay)
        betas = betas.tolist() if isinstance(betas, np.ndarray) else betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
                is_real(b) and 0.0 <= b < 1.0 for b in betas):
            raise InvalidArgumentError(f"AdamW: betas must be two numbers in [0, 1), got "
                                       f"{betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self._flat: list[tuple[list[int], FlatSet]] | None = None  # made at the first device step

    def step(self, grad_scale: float = 1.0) -> None:
        """Update every parameter that has a gradient, by the equations above, with g the
        gradient times ``grad_scale`` (the clipping coefficient of :func:`clip_coefficient`,
        folded into the update: ``p.grad`` itself is left as it is).

        With the fast forms on, ``fast.adamw.adamw_step`` does it: in cache-sized pieces and, on
        the CPU, a large model's parameters on several threads; on a device as one fused kernel a
        parameter set (:meth:`_flat_updates`). The same operations on every element in the same
        order, so the same bits (on a GPU the kernel is compiled without fused multiply-adds, and
        its square root and division round correctly, so it should agree there too).
        """
        # a NaN or negative factor would turn every weight NaN or climb the loss: refused
        check_nonnegative(grad_scale, f"{type(self).__name__}.step: grad_scale")
        scale = float(grad_scale)
        self._check_step()
        self.step_count += 1
        updates, owners = [], []
        for g, p, s, i in self._stepping():
            if not s:
                s["exp_avg"] = B.xp.zeros_like(p.data)
                s["exp_avg_sq"] = B.xp.zeros_like(p.data)
            b1, b2 = g["betas"]
            updates.append((p.data, p.grad, s["exp_avg"], s["exp_avg_sq"], g["lr"], b1, b2,
                            g["eps"], g["weight_decay"], self.param_steps[i], scale))
            owners.append(i)
        fused = fast.kernel("adamw")
        if fused is not None:
            fused(self._flat_updates(updates, owners) if B.on_device() else updates)
            return
        # the equations as written, evaluated left to right: the fast form does the same
        # operations in the same order (and float settings as Python floats keep float32)
        for p, grad, m, v, lr, b1, b2, eps, weight_decay, t, scale in updates:
            g = grad.astype(p.dtype, copy=False)  # a float64 gradient must not upcast p
            if scale != 1.0:
                g = g * scale  # clipping: g * coef, as clip_grad_norm would scale p.grad
            p *= 1.0 - lr * weight_decay
            m[...] = b1 * m + (1.0 - b1) * g
            v[...] = b2 * v + (1.0 - b2) * g * g
            p -= lr / (1.0 - b1 ** t) * m / (B.xp.sqrt(v) / math.sqrt(1.0 - b2 ** t) + eps)

    def _flat_updates(self, updates: list[tuple], owners: list[int]) -> list[tuple]:
        """``updates`` with those of each complete set replaced by one update of its buffers.

        A set is a group's parameters of one dtype (:class:`~minilora.fast.adamw.FlatSet`, made
        at the first step here, moving every parameter's and moment's array into it). It is
        complete when all its parameters have a gradient and the same step count: the usual
        case, where AdamW over the model is then a gradient gather and one kernel per set.
        Otherwise its parameters are updated one by one, on their views. Used on a device, where
        each launch costs microseconds; on the CPU gathering the gradients would cost a pass and
        a buffer the size of the model, and threads already share out the parameters.
        """
        params = self._params()
        if self._flat is None:
            buckets: dict[tuple[int, str], list[int]] = {}  # (group, dtype) -> parameter indices
            for g, p, _, i in self._each():
                buckets.setdefault((id(g), p.data.dtype.str), []).append(i)
            self._flat = [(members, FlatSet([params[i].data for i in members],
                                            params[members[0]].data.dtype))
                          for members in buckets.values() if len(members) > 1]
        by_owner = dict(zip(owners, updates))
        flat_updates, done = [], set()
        for members, flat in self._flat:
            ups = [by_owner.get(i) for i in members]
            if any(u is None for u in ups) or len({u[9] for u in ups}) != 1:
                continue  # not every parameter has a gradient, or they are at different steps
            for k, i in enumerate(members):
                p, s = params[i], self.state[i]
                p.data = flat.adopt("params", k, p.data)
                s["exp_avg"] = flat.adopt("exp_avg", k, s["exp_avg"])
                s["exp_avg_sq"] = flat.adopt("exp_avg_sq", k, s["exp_avg_sq"])
            flat_updates.append((flat.params, flat.gather([u[1] for u in ups]), flat.exp_avg,
                                 flat.exp_avg_sq, *ups[0][4:]))
            done.update(members)
        return flat_updates + [u for i, u in zip(owners, updates) if i not in done]


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and weight decay, as ``torch.optim.SGD``.

    g <- g + wd p;  buf <- momentum buf + g (buf = g at the first step);  p <- p - lr buf.
    """

    STATE_KEYS = ("momentum_buffer",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        _check_rates("SGD", lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self, grad_scale: float = 1.0) -> None:
        """Update every parameter that has a gradient, with g the gradient times ``grad_scale``
        (a clipping coefficient folded into the update; ``p.grad`` is left as it is)."""
        # a NaN or negative factor would turn every weight NaN or climb the loss: refused
        check_nonnegative(grad_scale, f"{type(self).__name__}.step: grad_scale")
        scale = float(grad_scale)
        self._check_step()
        self.step_count += 1
        for g, p, s, _ in self._stepping():
            grad = p.grad * scale if scale != 1.0 else p.grad
            grad = grad + g["weight_decay"] * p.data if g["weight_decay"] else grad
            if g["momentum"]:
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = B.xp.array(grad, copy=True)
                else:
                    s["momentum_buffer"] *= g["momentum"]
                    s["momentum_buffer"] += grad
                grad = s["momentum_buffer"]
            p.data -= g["lr"] * grad


def _grads(params: Iterable[Tensor] | Tensor) -> list[Any]:
    """The gradient arrays of ``params`` (a Tensor or an iterable of them) that have one."""
    if isinstance(params, Tensor):
        params = [params]
    return [p.grad for p in params if p.grad is not None]


# gradients concatenated for the norm at a time, at most (float64 elements: 128 MiB)
NORM_PIECE = 1 << 24


def _norm_squared(grads: list[Any]) -> Any:
    """``sum_k sum_i g_{k,i}^2`` in float64 as a 0-d array on the device (no sync): the
    gradients are laid end to end in float64 (in pieces of at most ``NORM_PIECE`` elements; a
    larger gradient is cut into runs of ``NORM_PIECE``, so that the float64 copy never exceeds
    one piece: GPT-2's tied embedding would be 295 MiB at once), squared in place and summed;
    the pieces' sums are added in order. A handful of kernels however many parameters, where one
    reduction per parameter would launch hundreds.

    The fast form (:func:`minilora.fast.squares.sum_of_squares`) squares and sums each
    cache-sized piece of a gradient where it lies, in the gradient's precision, and adds the
    pieces' sums in float64: one pass, no copy, within about 1e-7 of this form's number; where
    it declines (on a device, or a sum that overflowed float32) this form answers."""
    fused = fast.kernel("sum_of_squares")
    total = fused(grads) if fused is not None else None
    if total is not None:
        return total
    pieces: list[list[Any]] = [[]]
    size = 0
    for g in grads:
        flat = g.reshape(-1)
        runs = [flat] if flat.size <= NORM_PIECE else \
            [flat[i:i + NORM_PIECE] for i in range(0, flat.size, NORM_PIECE)]
        for run in runs:
            if pieces[-1] and size + run.size > NORM_PIECE:
                pieces.append([])
                size = 0
            pieces[-1].append(run)
            size += run.size
    total = None
    for piece in pieces:
        # a fresh float64 array either way, made in one pass (no float32 concatenation first)
        flat = B.xp.concatenate(piece, dtype=np.float64) if len(piece) > 1 \
            else piece[0].astype(np.float64)
        part = B.xp.square(flat, out=flat).sum()
        del flat  # before the next piece's copy is made: one piece's float64 at a time
        total = part if total is None else total + part
    return total


def norm_array(params: Iterable[Tensor] | Tensor) -> Any:
    """:func:`grad_norm` as a 0-d float64 array on the active device, with no device-to-host
    sync: the training loop brings it back together with the loss, in one transfer."""
    grads = _grads(params)
    if not grads:
        return B.xp.zeros((), dtype=np.float64)
    return B.xp.sqrt(_norm_squared(grads))


def grad_norm(params: Iterable[Tensor] | Tensor) -> float:
    """The global L2 norm of the gradients: ``sqrt(sum_k sum_i g_{k,i}^2)`` over every parameter
    k that has a gradient (of any shape), accumulated in float64; 0.0 when none has one. (The
    fast form, on by default on the CPU, sums each cache-sized piece's squares in the
    gradients' own precision and the pieces' sums in float64: the same number to about 1e-7.)

    NaN if any gradient holds a NaN, inf if one holds an inf (and no NaN). The gradients are
    summed laid end to end (:func:`norm_array`), with one device-to-host synchronisation in all,
    however many parameters, so it is cheap to call every step.
    """
    return _host_norm(_grads(params))


def _host_norm(grads: list[Any]) -> float:
    """sqrt of :func:`_norm_squared` as a float: the one device-to-host sync (0.0 for none)."""
    return math.sqrt(float(_norm_squared(grads))) if grads else 0.0


def clip_grad_norm(params: Iterable[Tensor] | Tensor, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``, in place.

    As ``torch.nn.utils.clip_grad_norm_`` with its default ``error_if_nonfinite=False``:
    ``norm = grad_norm(params)``, ``coef = min(max_norm / (norm + 1e-6), 1)`` and every gradient
    becomes ``g * coef``. Returns ``norm`` (before clipping). A finite norm below ``max_norm``
    leaves the gradients untouched (coef = 1). A non-finite norm is NOT an error and does what
    PyTorch does: a NaN norm gives coef = NaN, so every gradient becomes NaN; an inf norm gives
    coef = 0, so finite entries become 0 and inf entries NaN (inf * 0). The returned NaN or inf
    tells the caller to skip the step.
    """
    if not is_real(max_norm) or not max_norm >= 0:
        raise InvalidArgumentError(f"clip_grad_norm: max_norm must be a number >= 0, got "
                                   f"{max_norm!r}")  # "1" would be read as 1 by float()
    max_norm = float(max_norm)
    grads = _grads(params)
    total = _host_norm(grads)
    coef = clip_coefficient(total, max_norm)
    if coef != 1.0:
        with np.errstate(invalid="ignore"):  # inf * 0 = NaN is the documented result
            for g in grads:
                g *= coef
    return total


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor :func:`clip_grad_norm` scales the gradients by: ``min(max_norm / (norm +
    1e-6), 1)``, NaN for a NaN norm (min(NaN, 1) is NaN, as torch.clamp), 0.0 for an inf one.

    The training loop reads the norm with the loss in one transfer and hands this factor to
    ``AdamW.step(grad_scale=...)``, which is the same update as clipping ``p.grad`` first.
    """
    check_nonnegative(max_norm, "clip_coefficient: max_norm")
    coef = float(max_norm) / (norm + 1e-6)
    return coef if not coef >= 1.0 else 1.0


clip_grad_norm_ = clip_grad_norm


def warmup_cosine(step: int, max_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> float:
    """Learning rate at ``step``: linear warmup from ~0 to ``max_lr`` over ``warmup_steps``, then a
    half cosine down to ``min_lr`` at ``total_steps`` (and ``min_lr`` after).

    lr = max_lr (step + 1) / warmup during warmup; then
    lr = min_lr + (max_lr - min_lr) (1 + cos(pi progress)) / 2, progress in [0, 1].
    """
    if warmup_steps < 0 or total_steps <= 0 or step < 0:
        raise InvalidArgumentError(f"warmup_cosine: need step >= 0, warmup_steps >= 0 and "
                                   f"total_steps > 0, got {step}, {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr <= max_lr:
        raise InvalidArgumentError(f"warmup_cosine: need 0 <= min_lr <= max_lr, got "
                                   f"min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
