"""Causal multi-head self-attention, written as its equation, and the KV cache for generation.

Per head, with q, k, v of shape (B, nh, T, hs) and M the additive causal mask
(0 on and below the diagonal, -inf above it, so position t only sees positions <= t):

    S = q k^T / sqrt(hs) + M        P = softmax(S)        y = P v

:func:`causal_self_attention` writes these lines with Tensor ops, as nanoGPT writes its manual
attention: split the heads, score, mask, softmax, dropout, weigh the values, merge the heads.
Autograd differentiates it op by op. With the fast forms on (the default), the same equations run
as one fused node instead (:mod:`minilora.fast.attention`: scores held transposed, the masked
quarter skipped, a hand-written backward), reached through :func:`minilora.fast.kernel`; its
module docstring gives the backward, and ``tests/test_fast_attention.py`` pins the two together.
The KV cache's :meth:`KVCache.attend` is written the same way, beside its fast form.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend as B
from . import fast
from . import functional as F
from .errors import InvalidArgumentError, ShapeError, check_int, shape_error
from .tensor import Tensor, is_grad_enabled


def causal_mask(size: int, dtype: Any, start: int = 0) -> Any:
    """The additive causal mask M of queries ``start .. size - 1`` over keys ``0 .. size - 1``.

    M[t, j] = 0 where key j <= query start + t, -inf where j > start + t; shape
    (size - start, size), the square (size, size) mask for ``start=0``.
    """
    return B.xp.triu(B.xp.full((size - start, size), -B.xp.inf, dtype=dtype), k=start + 1)


def _check(q: Tensor, k: Tensor, v: Tensor, n_head: int) -> None:
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise shape_error("causal_self_attention", q.shape, k.shape, v.shape,
                          detail="q, k and v must all be (B, T, C)")
    check_int(n_head, "causal_self_attention: n_head", error=ShapeError)
    if q.shape[2] % n_head:
        raise ShapeError(f"causal_self_attention: n_head={n_head!r} must divide C={q.shape[2]}")


def causal_self_attention(q: Tensor, k: Tensor, v: Tensor, n_head: int,
                          dropout_p: float = 0.0) -> Tensor:
    """Causal attention: q, k, v (B, T, C) -> y (B, T, C), ``n_head`` heads of hs = C / n_head.

    Per head ``y = dropout(softmax(q k^T / sqrt(hs) + M)) v``, the heads merged back into C;
    ``dropout_p`` in [0, 1) drops attention probabilities (pass 0 in eval mode).
    """
    _check(q, k, v, n_head)
    if not 0.0 <= dropout_p < 1.0:
        raise InvalidArgumentError(f"causal_self_attention: dropout_p must lie in [0, 1), got "
                                   f"{dropout_p}")
    fused = fast.kernel("attention")
    if fused is not None:
        needs = tuple(is_grad_enabled() and t.requires_grad for t in (q, k, v))
        y, backward = fused(q.data, k.data, v.data, n_head, dropout_p, needs)
        return Tensor._make(y, (q, k, v), backward, "causal_self_attention")
    Bsz, T, C = q.shape
    hs = C // n_head
    q = q.reshape(Bsz, T, n_head, hs).transpose(1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)
    k = k.reshape(Bsz, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.reshape(Bsz, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    att = att + causal_mask(T, att.dtype)  # (B, nh, T, T): query t sees keys 0 .. t
    att = F.softmax(att, axis=-1)  # (B, nh, T, T), each row sums to 1
    att = F.dropout(att, dropout_p, training=dropout_p > 0.0)
    y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    return y.transpose(1, 2).reshape(Bsz, T, C)  # (B, T, nh, hs) -> (B, T, C)


def _softmax_rows(att: Any) -> Any:
    """softmax over the last axis, in place on the array ``att`` (which is returned)."""
    att -= att.max(axis=-1, keepdims=True)
    B.xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att


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
        0 .. length + t, exactly as the full causal forward would:
        ``y = softmax(q K^T / sqrt(hs) + M) V`` with K, V the cached (B, nh, length + T, hs).
        """
        Bsz, T, C = q.shape
        start, end = self.length, self.length + T
        if end > self.size:
            raise InvalidArgumentError(f"KVCache.attend: {T} new positions after {start} cached "
                                       f"exceed the cache size {self.size}")
        if Bsz != self.batch_size:
            raise ShapeError(f"KVCache.attend: batch of {Bsz}, the cache holds {self.batch_size}")
        hs = C // n_head
        kbuf, vbuf = self.keys[layer], self.values[layer]
        heads = (Bsz, T, n_head, hs)
        kbuf[:, :, start:end] = k.reshape(heads).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        vbuf[:, :, start:end] = v.reshape(heads).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        fused = fast.kernel("cached_attention")
        if fused is not None:
            return fused(q, kbuf[:, :, :end], vbuf[:, :, :end], start)
        qh = q.reshape(heads).transpose(0, 2, 1, 3)  # (B, T, nh, hs) -> (B, nh, T, hs)
        att = (qh @ kbuf[:, :, :end].swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, nh, T, end)
        att += causal_mask(end, att.dtype, start)  # (T, end): the rows of queries start .. end - 1
        att = _softmax_rows(att)  # (B, nh, T, end)
        y = att @ vbuf[:, :, :end]  # (B, nh, T, end) @ (B, nh, end, hs) -> (B, nh, T, hs)
        return y.transpose(0, 2, 1, 3).reshape(Bsz, T, C)  # (B, T, nh, hs) -> (B, T, C)
