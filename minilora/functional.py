"""Neural-network operations as fused graph nodes with hand-derived backward passes.

Each function here could be written from the elementary ops in :mod:`minilora.tensor`, but one node
with an analytic gradient is faster, uses less memory and is numerically safer (softmax, log-softmax
and cross-entropy subtract the row maximum). The equations are in each docstring.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import backend as B
from .errors import DTypeError, InvalidArgumentError, ShapeError, shape_error
from .tensor import Tensor, unbroadcast

_GELU_C = math.sqrt(2.0 / math.pi)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x W^T + b``; x (..., in), W (out, in), b (out,) -> y (..., out).

    The leading axes are folded into one so each pass is a single GEMM; a frozen W (or b) gets no
    gradient matmul at all.
    """
    if x.shape[-1] != weight.shape[1]:
        raise shape_error("linear", x.shape, weight.shape,
                          detail=f"input has {x.shape[-1]} features, weight (out, in) expects "
                                 f"{weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise shape_error("linear", weight.shape, bias.shape,
                          detail=f"bias must have shape ({weight.shape[0]},), one per output")
    lead = x.shape[:-1]
    x2 = x.data.reshape(-1, x.shape[-1])  # (N, in)
    y = x2 @ weight.data.T  # (N, out)
    if bias is not None:
        y += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g: Any):
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = (g2 @ weight.data).reshape(x.shape) if x.requires_grad else None
        gw = g2.T @ x2 if weight.requires_grad else None
        if bias is None:
            return gx, gw
        return gx, gw, (column_sums(g2) if bias.requires_grad else None)
    return Tensor._make(y.reshape(*lead, weight.shape[0]), parents, backward, "linear")


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, tanh form: ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``, c = sqrt(2/pi).

    d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2), with t the tanh above.
    """
    xd = x.data
    t = B.xp.tanh(_GELU_C * (xd + 0.044715 * xd * xd * xd))
    out = 0.5 * xd * (1.0 + t)

    def backward(g: Any):
        dt = _GELU_C * (1.0 + 3 * 0.044715 * xd * xd)
        return (g * (0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * dt),)
    return Tensor._make(out, (x,), backward, "gelu")


def _softmax_array(z: Any, axis: int) -> Any:
    e = B.xp.exp(z - z.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``y_i = exp(x_i - max x) / sum_j exp(x_j - max x)``; backward ``y * (g - sum(g * y))``."""
    y = _softmax_array(x.data, axis)
    return Tensor._make(y, (x,), lambda g: (y * (g - (g * y).sum(axis=axis, keepdims=True)),),
                        "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``x - max x - log sum exp(x - max x)``; backward ``g - softmax(x) * sum(g)``."""
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    out = shifted - B.xp.log(B.xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g: Any):
        return (g - B.xp.exp(out) * g.sum(axis=axis, keepdims=True),)
    return Tensor._make(out, (x,), backward, "log_softmax")


def _int_array(targets: Any, name: str) -> Any:
    arr = targets.data if isinstance(targets, Tensor) else B.asarray(targets)
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    logits (..., C), targets (...) integers; positions whose target is ``ignore_index`` are left
    out of the mean. ``loss = mean_i (logsumexp(z_i) - z_i[t_i])``; its gradient with respect to
    z_i is ``(softmax(z_i) - onehot(t_i)) / n_valid``. All positions ignored gives NaN, as PyTorch.
    """
    t = _int_array(targets, "cross_entropy: targets")
    if logits.shape[:-1] != tuple(t.shape):
        raise shape_error("cross_entropy", logits.shape, t.shape,
                          detail="targets must have the logits' shape without the class axis")
    C = logits.shape[-1]
    z = logits.data.reshape(-1, C)  # (N, C)
    t = t.reshape(-1)  # (N,)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise InvalidArgumentError(f"cross_entropy: targets must lie in [0, {C}) or equal "
                                   f"ignore_index={ignore_index}; found "
                                   f"{B.to_numpy(t[bad])[:5].tolist()}")
    safe_t = B.xp.where(valid, t, 0)
    rows = B.xp.arange(z.shape[0])
    zmax = z.max(axis=1, keepdims=True)
    lse = B.xp.log(B.xp.exp(z - zmax).sum(axis=1)) + zmax[:, 0]  # (N,)
    n_valid = int(valid.sum())
    picked = z[rows, safe_t]
    losses = (lse - picked) * valid
    loss = losses.sum() / n_valid if n_valid else B.xp.asarray(np.nan, dtype=z.dtype)
    loss = B.xp.asarray(loss, dtype=z.dtype)

    def backward(g: Any):
        p = B.xp.exp(z - lse[:, None])  # softmax, (N, C)
        p[rows, safe_t] -= 1
        p *= (valid * (g / max(n_valid, 1)))[:, None].astype(z.dtype)
        return (p.reshape(logits.shape),)
    return Tensor._make(loss, (logits,), backward, "cross_entropy")


def _row_dots(a: Any, b: Any) -> Any:
    """sum_j a[i, j] * b[i, j] for each row i of two (N, C) arrays -> (N,), no (N, C) temporary."""
    return B.xp.einsum("ij,ij->i", a, b)


def column_sums(a: Any) -> Any:
    """sum_i a[i, j] of an (N, C) array -> (C,), as ``ones(N) @ a``: a matrix-vector product on
    BLAS, several times faster than NumPy's ``sum(axis=0)`` on the shapes of a batch."""
    return B.xp.ones(a.shape[0], dtype=a.dtype) @ a


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise the last axis: ``y = (x - mean) / sqrt(var + eps) * w + b``; x (..., C), w, b (C,).

    With xhat the normalised input and r = 1/sqrt(var + eps), the input gradient is
    ``r * (gh - mean(gh) - xhat * mean(gh * xhat))`` where gh = g * w.

    The rows are (N, C) with N = prod(leading axes). Row means are matrix-vector products with a
    vector of 1/C, row sums of products are einsums, and the rest is done in place: a LayerNorm
    is memory-bound, so every pass over (N, C) that is saved shows.
    """
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise shape_error("layer_norm", x.shape, p.shape,
                              detail=f"{name} must have shape ({C},)")
    xd = x.data.reshape(-1, C)  # (N, C)
    mean_of = B.xp.full(C, 1.0 / C, dtype=xd.dtype)  # x @ mean_of = the row means, (N,)
    xhat = xd - (xd @ mean_of)[:, None]  # centred, (N, C)
    rstd = 1.0 / B.xp.sqrt(_row_dots(xhat, xhat) * mean_of[0] + eps)  # (N,)
    xhat *= rstd[:, None]
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data
    parents = tuple(p for p in (x, weight, bias) if p is not None)

    def backward(g: Any):
        g2 = g.reshape(-1, C)  # (N, C)
        grads = []
        if x.requires_grad:
            gx = g2 * weight.data if weight is not None else g2.copy()  # gh
            mean_gh_xhat = _row_dots(gx, xhat) * mean_of[0]  # (N,)
            gx -= (gx @ mean_of)[:, None]
            gx -= xhat * mean_gh_xhat[:, None]
            gx *= rstd[:, None]
            grads.append(gx.reshape(x.shape))
        else:
            grads.append(None)
        if weight is not None:
            grads.append(B.xp.einsum("ij,ij->j", g2, xhat) if weight.requires_grad else None)
        if bias is not None:
            grads.append(column_sums(g2) if bias.requires_grad else None)
        return tuple(grads)
    return Tensor._make(out.reshape(x.shape), parents, backward, "layer_norm")


def embedding(indices: Any, weight: Tensor) -> Tensor:
    """Row lookup ``out[...] = W[indices[...]]``; indices (...) ints, W (V, C) -> (..., C).

    Backward adds each output row's gradient into the row it came from (repeats add up).
    """
    idx = _int_array(indices, "embedding: indices")
    V = weight.shape[0]
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise InvalidArgumentError(f"embedding: indices must lie in [0, {V}), got values from "
                                   f"{int(idx.min())} to {int(idx.max())}")
    out = weight.data[idx]

    def backward(g: Any):
        return (B.index_add_rows(idx, g, V),)
    return Tensor._make(out, (weight,), backward, "embedding")


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity in eval)."""
    if not 0.0 <= p <= 1.0:
        raise InvalidArgumentError(f"dropout: p must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    keep = B.random_uniform(x.shape, x.data.dtype) >= p
    mask = keep * x.data.dtype.type(1.0 / (1.0 - p))
    return Tensor._make(x.data * mask, (x,), lambda g: (g * mask,), "dropout")


def mse_loss(input: Tensor, target: Any) -> Tensor:
    """Mean squared error ``mean((input - target)^2)``."""
    diff = input - target
    return (diff * diff).mean()


def relu(x: Tensor) -> Tensor:
    """max(x, 0) elementwise."""
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    """tanh elementwise."""
    return x.tanh()


__all__ = ["linear", "gelu", "softmax", "log_softmax", "cross_entropy", "layer_norm",
           "embedding", "dropout", "mse_loss", "relu", "tanh", "unbroadcast", "ShapeError"]
