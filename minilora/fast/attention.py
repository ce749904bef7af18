"""Causal multi-head self-attention as one fused kernel over arrays, with a hand-written backward.

Per head, with q, k, v of shape (B, nh, T, hs) and M the additive causal mask
(0 on and below the diagonal, -inf above it, so position t only sees positions <= t):

    S = q k^T / sqrt(hs) + M        P = softmax(S)        y = P v

Backward, with g = dL/dy (the softmax Jacobian never materialises):

    dv = P^T g      dP = g v^T      dS = P * (dP - rowsum(dP * P))
    dq = dS k / sqrt(hs)            dk = dS^T q / sqrt(hs)

One kernel instead of a dozen elementary ops keeps only P and the scaled q for the backward pass,
splits and merges heads with strided views instead of copies, and lets ``matmul`` run each
(T, hs) head on BLAS directly from the (B, T, C) layout the projections produce. The scores are
held transposed, as S^T (keys x queries): the softmax then reduces down columns, which NumPy
vectorises across the row, instead of along short rows; every product above just reads P^T or
dS^T with its axes swapped, which BLAS does for free.

From T = ``SPLIT_FROM`` on, the queries go in two halves: the second half sees every key, the
first half only the first half of the keys, so the top-right quarter of S (all masked) is never
computed. That is a quarter of the attention's work saved, the idea of FlashAttention's causal
tiling at its coarsest. On a device the queries stay in one block (there a second block's
launches cost more than the quarter saves) and the softmax's and its backward's elementwise
chains are fused kernels (:mod:`.device`), the same operations in the same order.

:func:`cached_attention` is the same forward for generation, where T new queries at positions
start .. start + T - 1 meet every key cached so far; it holds its scores transposed too.

The reference forms are :func:`minilora.attention.causal_self_attention` (the same equations
written with Tensor ops, autograd doing the backward) and :meth:`minilora.attention.KVCache.attend`
with the switch off; ``tests/test_fast_attention.py`` pins these kernels to them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .. import backend as B
from .device import elementwise

SPLIT_FROM = 64  # sequence length from which the queries go in two blocks

# one mask per (backend, dtype), grown to the largest size asked for; smaller ones are views of it
_masks: dict = {}


def causal_mask(size: int, dtype: Any) -> Any:
    """The additive causal mask M (size, size): 0 where key <= query, -inf where key > query.

    The same M as :func:`minilora.attention.causal_mask`, built once per (backend, dtype) and
    handed out as views, since every layer of every step asks for it.
    """
    key = (B.get_backend(), B.xp.dtype(dtype).str)
    mask = _masks.get(key)
    if mask is None or mask.shape[0] < size:
        mask = B.xp.triu(B.xp.full((size, size), -B.xp.inf, dtype=dtype), k=1)
        _masks[key] = mask
    return mask[:size, :size]


def split_heads(x: Any, n_head: int) -> Any:
    """(B, T, C) array -> (B, nh, T, hs) strided view (no copy)."""
    Bsz, T, C = x.shape
    return x.reshape(Bsz, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, nh, T, hs)


def merge_heads(x: Any) -> Any:
    """(B, nh, T, hs) array -> a new contiguous (B, T, C) array."""
    Bsz, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(Bsz, T, nh * hs)  # (B, T, C), one copy


def _softmax_columns(st: Any) -> Any:
    """Softmax over axis -2 (the keys of S^T), in place on ``st`` (which is returned)."""
    if B.on_device():  # the same steps, the elementwise ones as two fused kernels
        elementwise("softmax_exp", st.dtype, "{P} m", "{P} s", "s = exp(s - m);")(
            st.max(axis=-2, keepdims=True), st)
        elementwise("softmax_scale", st.dtype, "{P} total", "{P} s", "s = s * (1 / total);")(
            st.sum(axis=-2, keepdims=True), st)
        return st
    st -= st.max(axis=-2, keepdims=True)
    B.xp.exp(st, out=st)
    st *= 1.0 / st.sum(axis=-2, keepdims=True)  # one division per column, then multiplications
    return st


def _softmax_backward_into(dst: Any, pt: Any) -> None:
    """``dS^T = P^T * (dP^T - colsum(dP^T * P^T))``, in place on ``dst`` (holding dP^T)."""
    if B.on_device():
        elementwise("softmax_backward", dst.dtype, "{P} c, {P} p", "{P} ds",
                    "ds = (ds - c) * p;")(_column_dot(dst, pt), pt, dst)
        return
    dst -= _column_dot(dst, pt)
    dst *= pt


def _column_dot(a: Any, b: Any) -> Any:
    """sum_i a[..., i, j] * b[..., i, j], kept as a (..., 1, T) row, without a (T, T) temp."""
    return B.xp.einsum("...ij,...ij->...j", a, b)[..., None, :]


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """Query ranges [a, b) done together; the one that sees all T keys comes first (one block
    on a device)."""
    if T < SPLIT_FROM or B.on_device():
        return [(0, T)]
    return [(T // 2, T), (0, T // 2)]


def _product_into(a: Any, b: Any, out: Any, add: bool) -> None:
    """out = a @ b, or out += a @ b: the first block writes a whole gradient, later ones add."""
    if add:
        out += a @ b
    else:
        B.xp.matmul(a, b, out=out)


def causal_attention(q: Any, k: Any, v: Any, n_head: int, dropout_p: float,
                     needs_grad: tuple[bool, bool, bool]) -> tuple[Any, Callable | None]:
    """Fused causal attention on arrays: q, k, v (B, T, C) -> (y (B, T, C), backward).

    ``y = merge_heads(dropout(softmax(q k^T / sqrt(hs) + M)) v)`` with ``n_head`` heads of
    hs = C / n_head; ``dropout_p`` in [0, 1) drops attention probabilities (0 in eval mode).
    ``backward(g)`` takes dL/dy (B, T, C) and returns (dL/dq, dL/dk, dL/dv), each (B, T, C), or
    None where ``needs_grad`` says False; ``backward`` is None when no gradient is needed, and
    then nothing is kept for it. The caller checks the shapes (see the module docstring for the
    equations).
    """
    T = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2] // n_head)
    keep_for_backward = any(needs_grad)
    qh = split_heads(q, n_head) * scale  # (B, nh, T, hs), scale folded into q once
    kh = split_heads(k, n_head)  # (B, nh, T, hs) view
    vh = split_heads(v, n_head)  # (B, nh, T, hs) view
    mask_t = causal_mask(T, qh.dtype).T  # (Tk, Tq)
    y = B.xp.empty(q.shape, dtype=qh.dtype)  # (B, T, C)
    yh = split_heads(y, n_head)  # (B, nh, T, hs) view: products land in y already merged
    saved = []
    for a, b in _query_blocks(T):
        Pt = kh[:, :, :b] @ qh[:, :, a:b].swapaxes(-1, -2)  # (B, nh, b, b - a): S^T, keys < b
        Pt[:, :, a:b] += mask_t[a:b, a:b]  # keys < a are visible to every query here
        Pt = _softmax_columns(Pt)  # P^T
        keep = None
        if dropout_p > 0.0:
            keep = B.random_uniform(Pt.shape, Pt.dtype) >= dropout_p
            keep = keep * Pt.dtype.type(1.0 / (1.0 - dropout_p))  # the mask, already rescaled
        Pdt = Pt if keep is None else Pt * keep
        B.xp.matmul(Pdt.swapaxes(-1, -2), vh[:, :, :b], out=yh[:, :, a:b])
        if keep_for_backward:
            saved.append((a, b, Pt, keep, Pdt))
    if not keep_for_backward:
        return y, None
    need_q, need_k, need_v = needs_grad
    shape = q.shape  # the closure keeps q's shape, not q: the scaled copy qh is all it reads

    def backward(g: Any) -> tuple[Any, Any, Any]:
        gh = split_heads(g, n_head)  # (B, nh, T, hs) view
        gq, gk, gv = (B.xp.empty(shape, dtype=qh.dtype) if need else None
                      for need in (need_q, need_k, need_v))
        for i, (a, b, Pt, keep, Pdt) in enumerate(saved):
            if gv is not None:
                _product_into(Pdt, gh[:, :, a:b], split_heads(gv, n_head)[:, :, :b], i > 0)
            if gq is None and gk is None:
                continue
            dSt = vh[:, :, :b] @ gh[:, :, a:b].swapaxes(-1, -2)  # (B, nh, b, b - a): dP^T
            if keep is not None:
                dSt *= keep
            _softmax_backward_into(dSt, Pt)  # dS^T
            if gq is not None:
                B.xp.matmul(dSt.swapaxes(-1, -2), kh[:, :, :b],
                            out=split_heads(gq, n_head)[:, :, a:b])
            if gk is not None:  # qh carries the scale
                _product_into(dSt, qh[:, :, a:b], split_heads(gk, n_head)[:, :, :b], i > 0)
        if gq is not None:
            gq *= scale
        return gq, gk, gv
    return y, backward


def cached_attention(q: Any, keys: Any, values: Any, start: int) -> Any:
    """Attention of new queries over the cached keys: q (B, T, C), keys and values
    (B, nh, start + T, hs) -> y (B, T, C).

    Query t sits at position start + t and sees keys 0 .. start + t:
    ``y = merge_heads(softmax(q k^T / sqrt(hs) + M[start:]) v)``, scores held as S^T.
    """
    n_head, end, hs = keys.shape[1], keys.shape[2], keys.shape[3]
    qh = split_heads(q, n_head) * (1.0 / math.sqrt(hs))  # (B, nh, T, hs)
    st = keys @ qh.swapaxes(-1, -2)  # (B, nh, end, T): S^T
    st += causal_mask(end, st.dtype)[start:end].T
    pt = _softmax_columns(st)
    return merge_heads(pt.swapaxes(-1, -2) @ values)  # (B, T, C)
