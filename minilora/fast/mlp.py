"""The transformer's MLP as one node: ``out = gelu(x W1^T + b1) W2^T + b2``, keeping the least.

Written as three ops (linear, GELU, linear), the graph keeps for the backward pass GELU's
derivative d (N, 4C) and, when W2 trains, GELU's output a (N, 4C) for W2's gradient ``g^T a``:
two (N, 4C) arrays a layer, the largest a step holds. As one node it keeps one: h = x W1^T + b1
when W2 trains, from which the backward pass makes a and d again (the same chunked GELU, so the
same bits: :func:`minilora.fast.elementwise.gelu` computes a and d from h alone), else d alone
(a frozen W2 needs no a, and the backward pass then recomputes nothing). The cost of keeping
less is one GELU pass more in the backward pass of full training, a few percent of the MLP.

With g = dL/dout (N, C) the backward pass is the three ops' own, in their order:

    gW2 = g^T a     gb2 = sum_i g     ga = g W2     dh = ga * d
    gW1 = dh^T x    gb1 = sum_i dh    gx = dh W1

The reference form is the three ops (:func:`minilora.functional.mlp`);
``tests/test_fast_mlp.py`` pins the two together bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

from .elementwise import gelu
from .norm import column_sums


def mlp(x2: Any, w1: Any, b1: Any, w2: Any, b2: Any,
        needs: tuple[bool, bool, bool, bool, bool]) -> tuple[Any, Callable | None]:
    """``gelu(x2 w1^T + b1) w2^T + b2`` on arrays: x2 (N, C), w1 (H, C), b1 (H,) or None,
    w2 (C', H), b2 (C',) or None -> (out (N, C'), backward).

    ``needs`` says which of (x2, w1, b1, w2, b2) want a gradient; ``backward(g)`` (g (N, C'))
    returns their gradients in that order, None where not needed. ``backward`` is None, and
    nothing is kept, when none is needed.
    """
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    h = x2 @ w1.T  # (N, H)
    if b1 is not None:
        h += b1
    if not any(needs):
        return _project(gelu(h, False)[0], w2, b2), None
    recompute = need_w2  # W2's gradient reads a: make it again from h rather than keep it
    # (N, H) each; d None when it is made again later, else written over h (needed no more)
    a, d = gelu(h, not recompute, overwrite=not recompute)
    out = _project(a, w2, b2)
    del a
    if not recompute:
        del h  # d is all the backward pass needs of the hidden layer
    saved_x = x2 if need_w1 else None
    below = need_x or need_w1 or need_b1

    def backward(g2: Any) -> tuple[Any, Any, Any, Any, Any]:
        gw2 = gb2 = gx = gw1 = gb1 = None
        dd = d
        if recompute:
            a2, dd = gelu(h, True)
            gw2 = g2.T @ a2  # (C', H)
            del a2
        if need_b2:
            gb2 = column_sums(g2)
        if below:
            dh = g2 @ w2  # ga (N, H)
            dh *= dd  # dh = ga * d, in place
            if need_w1:
                gw1 = dh.T @ saved_x  # (H, C)
            if need_b1:
                gb1 = column_sums(dh)
            if need_x:
                gx = dh @ w1  # (N, C)
        return gx, gw1, gb1, gw2, gb2
    return out, backward


def _project(a: Any, w2: Any, b2: Any) -> Any:
    """``a w2^T + b2``: the MLP's output projection, as a linear layer computes it."""
    out = a @ w2.T
    if b2 is not None:
        out += b2
    return out


__all__ = ["mlp"]
