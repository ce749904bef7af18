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

:func:`prefix_self_attention` is prefix tuning's form: N learned keys and values before the
sequence's own, open to every query (the mask ``causal_mask(N + T, start=N)``), in Tensor ops
only; :meth:`KVCache.prefill` puts such a prefix in the first N entries of a cache.
"""

from __future__ import annotations

import math
from typing import Any

from . import backend as B
from . import fast, flops
from . import functional as F
from .errors import InvalidArgumentError, ShapeError, check_int, shape_error
from .tensor import Tensor, concatenate, is_grad_enabled


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
        y, fused_backward = fused(q.data, k.data, v.data, n_head, dropout_p, needs)
        Bsz, T, C = q.shape
        hs = C // n_head
        # counted as the reference form's products (q k^T, then P v), though the fused form
        # skips the masked quarter: the same op, the same count, whichever form runs
        flops.add_matmul("attention", T, hs, T, 2 * Bsz * n_head)

        def backward(g: Any) -> Any:
            # dP = g v^T and dv = P^T g, then dq = dS k and dk = dS^T q, each as needed
            flops.add_matmul("attention", T, hs, T, Bsz * n_head * (
                bool(needs[0] or needs[1]) + bool(needs[2]) + bool(needs[0]) + bool(needs[1])))
            return fused_backward(g)
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


def prefix_self_attention(q: Tensor, k: Tensor, v: Tensor, prefix_key: Tensor,
                          prefix_value: Tensor, n_head: int, dropout_p: float = 0.0) -> Tensor:
    """Causal attention after N learned positions (prefix tuning, Li and Liang 2021).

    q, k, v (B, T, C) and prefix_key, prefix_value (B, N, C) -> y (B, T, C). The keys and values
    are K = [prefix_key; k] and V = [prefix_value; v], (B, N + T, C); per head

        y = dropout(softmax(q K^T / sqrt(hs) + M)) V,   M = causal_mask(N + T, start=N)  (T, N + T)

    so query t sees all N prefix keys and the real keys 0 .. t. Written with Tensor ops only (no
    fused form): its counted FLOPs are 2 * 2 * B * T * (N + T) * C, the causal attention's plus
    2 * 2 * C * N per query for q K^T and P V over the N prefix keys.
    """
    _check(q, k, v, n_head)
    Bsz, T, C = q.shape
    if prefix_key.ndim != 3 or prefix_key.shape != prefix_value.shape or \
            prefix_key.shape[0] != Bsz or prefix_key.shape[2] != C:
        raise shape_error("prefix_self_attention", q.shape, prefix_key.shape, prefix_value.shape,
                          detail="the prefix keys and values must both be (B, N, C)")
    if not 0.0 <= dropout_p < 1.0:
        raise InvalidArgumentError(f"prefix_self_attention: dropout_p must lie in [0, 1), got "
                                   f"{dropout_p}")
    N, hs = prefix_key.shape[1], C // n_head
    keys = concatenate([prefix_key, k], axis=1)  # (B, N + T, C)
    values = concatenate([prefix_value, v], axis=1)  # (B, N + T, C)
    q = q.reshape(Bsz, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    keys = keys.reshape(Bsz, N + T, n_head, hs).transpose(1, 2)  # (B, nh, N + T, hs)
    values = values.reshape(Bsz, N + T, n_head, hs).transpose(1, 2)  # (B, nh, N + T, hs)
    att = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, N + T)
    att = att + causal_mask(N + T, att.dtype, start=N)  # the N prefix columns open to every row
    att = F.softmax(att, axis=-1)  # (B, nh, T, N + T)
    att = F.dropout(att, dropout_p, training=dropout_p > 0.0)
    y = att @ values  # (B, nh, T, N + T) @ (B, nh, N + T, hs) -> (B, nh, T, hs)
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

    def prefill(self, keys: list, values: list) -> None:
        """Put N positions' keys and values, one (B, N, C) array each per layer, at 0 .. N of an
        empty cache, and set ``length`` to N: prefix tuning's learned prefix, which every later
        query attends to as to any earlier position."""
        if self.length or len(keys) != len(self.keys) or len(values) != len(self.keys):
            raise InvalidArgumentError(f"KVCache.prefill: needs an empty cache and one array per "
                                       f"layer ({len(self.keys)}); the cache holds {self.length} "
                                       f"positions, {len(keys)} keys and {len(values)} values "
                                       f"were given")
        Bsz, nh, _, hs = self.keys[0].shape
        N = keys[0].shape[1]
        if N > self.size:
            raise InvalidArgumentError(f"KVCache.prefill: {N} prefix positions exceed the cache "
                                       f"size {self.size}")
        for kbuf, vbuf, k, v in zip(self.keys, self.values, keys, values):
            kbuf[:, :, :N] = k.reshape(Bsz, N, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, N, hs)
            vbuf[:, :, :N] = v.reshape(Bsz, N, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, N, hs)
        self.length = N

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
        flops.add_matmul("attention", T, hs, end, 2 * Bsz * n_head)  # q K^T, then P V
        fused = fast.kernel("cached_attention")
        if fused is not None:
            return fused(q, kbuf[:, :, :end], vbuf[:, :, :end], start)
        qh = q.reshape(heads).transpose(0, 2, 1, 3)  # (B, T, nh, hs) -> (B, nh, T, hs)
        att = (qh @ kbuf[:, :, :end].swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, nh, T, end)
        att += causal_mask(end, att.dtype, start)  # (T, end): the rows of queries start .. end - 1
        att = _softmax_rows(att)  # (B, nh, T, end)
        y = att @ vbuf[:, :, :end]  # (B, nh, T, end) @ (B, nh, end, hs) -> (B, nh, T, hs)
        return y.transpose(0, 2, 1, 3).reshape(Bsz, T, C)  # (B, T, nh, hs) -> (B, T, C)
