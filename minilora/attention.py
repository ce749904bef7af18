"""Causal multi-head self-attention as one fused graph node, and the KV cache for generation.

Per head, with q, k, v of shape (B, nh, T, hs) and M the additive causal mask
(0 on and below the diagonal, -inf above it, so position t only sees positions <= t):

    S = q k^T / sqrt(hs) + M        P = softmax(S)        y = P v

Backward, with g = dL/dy (the softmax Jacobian never materialises):

    dv = P^T g      dP = g v^T      dS = P * (dP - rowsum(dP * P))
    dq = dS k / sqrt(hs)            dk = dS^T q / sqrt(hs)

One node instead of a dozen elementary ones keeps only P and the scaled q for the backward pass,
splits and merges heads with strided views instead of copies, and lets ``np.matmul`` run each
(T, hs) head on BLAS directly from the (B, T, C) layout the projections produce. The scores are
held transposed, as S^T (keys x queries): the softmax then reduces down columns, which NumPy
vectorises across the row, instead of along short rows (about 3x faster for T = 128); every
product above just reads P^T or dS^T with its axes swapped, which BLAS does for free.

From T = 64 on, the queries go in two halves: the second half sees every key, the first half
only the first half of the keys, so the top-right quarter of S (all masked) is never computed.
That is a quarter of the attention's work saved, the idea of FlashAttention's causal tiling at
its coarsest.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend as B
from .errors import InvalidArgumentError, ShapeError, shape_error
from .tensor import Tensor

# one mask per (backend, dtype), grown to the largest size asked for; smaller ones are views of it
_masks: dict = {}
_SPLIT_FROM = 64  # sequence length from which the queries go in two blocks


def causal_mask(size: int, dtype: Any) -> Any:
    """The additive causal mask M (size, size): 0 where key <= query, -inf where key > query."""
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
    st -= st.max(axis=-2, keepdims=True)
    B.xp.exp(st, out=st)
    st *= 1.0 / st.sum(axis=-2, keepdims=True)  # one division per column, then multiplications
    return st


def _column_dot(a: Any, b: Any) -> Any:
    """sum_i a[..., i, j] * b[..., i, j], kept as a (..., 1, T) row, without a (T, T) temp."""
    return B.xp.einsum("...ij,...ij->...j", a, b)[..., None, :]


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """Query ranges [a, b) done together; the one that sees all T keys comes first."""
    if T < _SPLIT_FROM:
        return [(0, T)]
    return [(T // 2, T), (0, T // 2)]


def _product_into(a: Any, b: Any, out: Any, add: bool) -> None:
    """out = a @ b, or out += a @ b: the first block writes a whole gradient, later ones add."""
    if add:
        out += a @ b
    else:
        B.xp.matmul(a, b, out=out)


def _check(q: Tensor, k: Tensor, v: Tensor, n_head: int) -> None:
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise shape_error("causal_self_attention", q.shape, k.shape, v.shape,
                          detail="q, k and v must all be (B, T, C)")
    if not isinstance(n_head, int) or n_head <= 0 or q.shape[2] % n_head:
        raise ShapeError(f"causal_self_attention: n_head={n_head!r} must be a positive int that "
                         f"divides C={q.shape[2]}")


def causal_self_attention(q: Tensor, k: Tensor, v: Tensor, n_head: int,
                          dropout_p: float = 0.0) -> Tensor:
    """Fused causal attention: q, k, v (B, T, C) -> y (B, T, C), ``n_head`` heads of C / n_head.

    ``y = merge_heads(dropout(softmax(q k^T / sqrt(hs) + M)) v)``; ``dropout_p`` > 0 drops
    attention probabilities (pass 0 in eval mode). See the module docstring for the backward.
    """
    _check(q, k, v, n_head)
    if not 0.0 <= dropout_p < 1.0:
        raise InvalidArgumentError(f"causal_self_attention: dropout_p must lie in [0, 1), got "
                                   f"{dropout_p}")
    T = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2] // n_head)
    qh = split_heads(q.data, n_head) * scale  # (B, nh, T, hs), scale folded into q once
    kh = split_heads(k.data, n_head)  # (B, nh, T, hs) view
    vh = split_heads(v.data, n_head)  # (B, nh, T, hs) view
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
        saved.append((a, b, Pt, keep, Pdt))

    def backward(g: Any):
        gh = split_heads(g, n_head)  # (B, nh, T, hs) view
        gq, gk, gv = (B.xp.empty(q.shape, dtype=qh.dtype) if t.requires_grad else None
                      for t in (q, k, v))
        for i, (a, b, Pt, keep, Pdt) in enumerate(saved):
            if gv is not None:
                _product_into(Pdt, gh[:, :, a:b], split_heads(gv, n_head)[:, :, :b], i > 0)
            if gq is None and gk is None:
                continue
            dSt = vh[:, :, :b] @ gh[:, :, a:b].swapaxes(-1, -2)  # (B, nh, b, b - a): dP^T
            if keep is not None:
                dSt *= keep
            dSt -= _column_dot(dSt, Pt)
            dSt *= Pt  # dS^T
            if gq is not None:
                B.xp.matmul(dSt.swapaxes(-1, -2), kh[:, :, :b],
                            out=split_heads(gq, n_head)[:, :, a:b])
            if gk is not None:  # qh carries the scale
                _product_into(dSt, qh[:, :, a:b], split_heads(gk, n_head)[:, :, :b], i > 0)
        if gq is not None:
            gq *= scale
        return gq, gk, gv
    return Tensor._make(y, (q, k, v), backward, "causal_self_attention")


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding (no graph).

    One pair of (B, nh, size, hs) buffers per layer; ``length`` positions are filled. A forward
    pass over T new tokens writes their keys and values at ``length .. length + T`` in every layer,
    then the model advances ``length`` by T.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, size: int, head_size: int,
                 dtype: Any) -> None:
        shape = (batch_size, n_head, size, head_size)  # (B, nh, size, hs)
        self.keys = [B.xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.values = [B.xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.size = size
        self.batch_size = batch_size
        self.length = 0

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        self.length = 0

    def attend(self, layer: int, q: Any, k: Any, v: Any, n_head: int) -> Any:
        """Store k, v (B, T, C) at positions ``length ..`` of ``layer``, attend q to all so far.

        q, k, v are arrays; returns y (B, T, C). Query t (absolute position length + t) sees keys
        0 .. length + t, exactly as the full causal forward would.
        """
        Bsz, T, C = q.shape
        start, end = self.length, self.length + T
        if end > self.size:
            raise InvalidArgumentError(f"KVCache.attend: {T} new positions after {start} cached "
                                       f"exceed the cache size {self.size}")
        if Bsz != self.batch_size:
            raise ShapeError(f"KVCache.attend: batch of {Bsz}, the cache holds {self.batch_size}")
        kbuf, vbuf = self.keys[layer], self.values[layer]
        kbuf[:, :, start:end] = split_heads(k, n_head)
        vbuf[:, :, start:end] = split_heads(v, n_head)
        qh = split_heads(q, n_head) * (1.0 / math.sqrt(C // n_head))  # (B, nh, T, hs)
        st = kbuf[:, :, :end] @ qh.swapaxes(-1, -2)  # (B, nh, end, T): S^T
        st += causal_mask(self.size, st.dtype)[start:end, :end].T
        pt = _softmax_columns(st)
        return merge_heads(pt.swapaxes(-1, -2) @ vbuf[:, :, :end])  # (B, T, C)
