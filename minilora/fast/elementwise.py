"""Chunked elementwise chains: GELU forward and its derivative in one pass over cache-sized pieces.

An elementwise chain of a dozen steps over a large array is memory-bound: written plainly, each
step streams the whole array through memory once. Cut into pieces that fit in the CPU's cache,
each piece goes through every step before the next is touched, so the array crosses memory once.
On a device the chain is one fused kernel instead (:func:`gelu_device`): there a launch costs
more than a trip to memory, and one launch does every step for every element.

The reference form is :func:`minilora.functional.gelu`; ``tests/test_fast_elementwise.py`` pins
this one to it.
"""

from __future__ import annotations

import math
from typing import Any

from .. import backend as B
from .device import elementwise, literal

# GPT-2's GELU, tanh form: gelu(x) = x (1 + tanh(GELU_C (x + GELU_A x^3))) / 2. Defined here, the
# lowest layer that needs them; the reference form in functional imports them from here.
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

PIECE = 1 << 16  # elements per piece of a chunked elementwise chain: a few such buffers stay in L2


def piece_size(n: int) -> int:
    """Elements per piece for elementwise chains over n elements: cache-sized (``PIECE``) on the
    CPU, the whole array on a GPU."""
    return max(1, n if B.on_device() else min(n, PIECE))


def gelu(x: Any, needs_grad: bool, overwrite: bool = False) -> tuple[Any, Any]:
    """GPT-2's GELU, fused and chunked: ``y = x p`` with p = (1 + t) / 2, t = tanh(v),
    v = c (x + a x^3), c = GELU_C, a = GELU_A; x any shape -> (y, dy/dx), both of x's shape (dy/dx
    None unless ``needs_grad``).

    p is made as the logistic sigmoid of 2v, ``p = 1 / (1 + exp(-2 v))``: the same p, since
    (1 + tanh v) / 2 = sigmoid(2 v), for one ``exp`` instead of one ``tanh``, which is the
    chain's costly step and the cheaper of the two in NumPy's builds (without AVX-512 tanh runs at
    about half exp's speed: RESULTS.md, issue 15). Where p is tiny it is also the closer, (1 + t)
    losing t's digits to cancellation. For very negative x, exp(-2v) overflows to inf and p is 0,
    as the tanh form gives.

    Since 1 - t^2 = 4 p (1 - p), ``dy/dx = p (1 + (1 - p) u)`` with u = 2 c x (1 + 3 a x^2). It is
    computed right where p is, while x, x^2 and p are in cache, so the backward pass is one
    multiplication ``g * dy/dx``.

    ``overwrite``: the caller needs x no more, so on the CPU dy/dx is written over a contiguous
    x (each piece of x copied aside first; the same bits) instead of into a third array the size
    of x: the MLP's hidden layer is the largest array a forward pass makes.
    """
    if B.on_device():
        return gelu_device(x, needs_grad)
    in_place = overwrite and needs_grad and x.flags.c_contiguous and x.flags.writeable
    xf = B.xp.ascontiguousarray(x).reshape(-1)  # (N,) flat
    m = piece_size(xf.shape[0])
    out = B.xp.empty_like(xf)
    d = xf if in_place else B.xp.empty_like(xf) if needs_grad else None
    x2, t = B.xp.empty(m, dtype=xf.dtype), B.xp.empty(m, dtype=xf.dtype)
    kept = B.xp.empty(m, dtype=xf.dtype) if in_place else None  # the piece of x, set aside
    with B.xp.errstate(over="ignore"):  # exp(-2v) = inf is p = 0, not a fault
        _gelu_pieces(xf, out, d, x2, t, kept, m)
    return out.reshape(x.shape), (None if d is None else d.reshape(x.shape))


def _gelu_pieces(xf: Any, out: Any, d: Any, x2: Any, t: Any, kept: Any, m: int) -> None:
    """:func:`gelu`'s chain over ``xf`` in pieces of ``m``: y into ``out``, dy/dx into ``d``
    (None: not wanted), with ``x2``, ``t`` and ``kept`` (m,) scratch."""
    for i in range(0, xf.shape[0], m):
        xi, oi = xf[i:i + m], out[i:i + m]
        if kept is not None:  # its place in xf is about to take p, then dy/dx
            ki = kept[:xi.shape[0]]
            ki[...] = xi
            xi = ki
        x2i, ti = x2[:xi.shape[0]], t[:xi.shape[0]]
        pi = oi if d is None else d[i:i + m]  # p lands where it is needed last
        B.xp.multiply(xi, xi, out=x2i)
        B.xp.multiply(x2i, -2 * GELU_A * GELU_C, out=ti)
        ti -= 2 * GELU_C
        ti *= xi  # -2v
        B.xp.exp(ti, out=ti)  # inf for very negative x: p is then 0
        ti += 1.0
        B.xp.reciprocal(ti, out=pi)  # p = 1 / (1 + exp(-2v)) = (1 + tanh v) / 2
        B.xp.multiply(xi, pi, out=oi)  # y = x p
        if d is not None:
            x2i *= 6 * GELU_A * GELU_C
            x2i += 2 * GELU_C
            x2i *= xi  # u = 2 c x (1 + 3 a x^2)
            B.xp.subtract(1.0, pi, out=ti)
            ti *= x2i
            ti += 1.0
            pi *= ti  # dy/dx = p (1 + (1 - p) u)


def gelu_device(x: Any, needs_grad: bool) -> tuple[Any, Any]:
    """:func:`gelu` as one fused kernel on a device: the same steps for each element, in the same
    order and type (so the same bits on the strict stand-in); x any shape -> (y, dy/dx or None)."""
    lit = lambda v: literal(v, x.dtype)  # noqa: E731
    forward = (f"{{C}} x2 = x * x; {{C}} e = exp((x2 * {lit(-2 * GELU_A * GELU_C)} - "
               f"{lit(2 * GELU_C)}) * x); {{C}} p = {lit(1.0)} / (e + {lit(1.0)}); y = x * p;")
    if not needs_grad:
        return elementwise("gelu", x.dtype, "{P} x", "{P} y", forward)(x), None
    derivative = (f" {{C}} u = (x2 * {lit(6 * GELU_A * GELU_C)} + {lit(2 * GELU_C)}) * x;"
                  f" d = p * ((1 - p) * u + 1);")  # p (1 + (1 - p) u), as in gelu
    return elementwise("gelu_grad", x.dtype, "{P} x", "{P} y, {P} d", forward + derivative)(x)


__all__ = ["GELU_C", "GELU_A", "PIECE", "piece_size", "gelu", "gelu_device"]
