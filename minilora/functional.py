"""Neural-network operations as fused graph nodes with hand-derived backward passes.

Each function here could be written from the elementary ops in :mod:`minilora.tensor`, but one node
with an analytic gradient is faster, uses less memory and is numerically safer (softmax, log-softmax
and cross-entropy subtract the row maximum). The equations are in each docstring, and the code is
the equation. Where :mod:`minilora.fast` has a faster form of the same op (GELU, LayerNorm, the
bias gradient's column sums), ``fast.kernel(name)`` returns it while the fast forms are on, and
the op runs it instead; the fast form is chosen when the op is recorded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import backend as B
from . import fast, flops
from .errors import (
    DTypeError,
    InvalidArgumentError,
    ShapeError,
    check_axis,
    check_bool,
    check_int,
    is_real,
    shape_error,
)
from .fast import checks
from .fast.elementwise import GELU_A, GELU_C
from .tensor import Tensor, is_grad_enabled, unbroadcast


def _check_tensors(who: str, **given: Any) -> None:
    """Refuse (DTypeError, naming the argument) an argument that is not a Tensor (None allowed
    only where it is the default, as bias): an array there failed deep inside (``.T`` of a
    memoryview), naming nothing."""
    for name, value in given.items():
        if value is not None and not isinstance(value, Tensor):
            raise DTypeError(f"{who}: {name} must be a Tensor, got {type(value).__name__}; wrap "
                             f"an array as ml.Tensor(array)")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x W^T + b``; x (..., in), W (out, in), b (out,) -> y (..., out).

    The leading axes are folded into one so each pass is a single GEMM; a frozen W (or b) gets no
    gradient matmul at all. Backward: ``gx = g W``, ``gW = g^T x``, ``gb = sum_i g`` (over the
    folded rows).
    """
    _check_tensors("linear", x=x, weight=weight, bias=bias)
    if weight.ndim != 2 or (bias is not None and bias.ndim != 1):
        raise shape_error("linear", weight.shape, *(() if bias is None else (bias.shape,)),
                          detail="weight must be (out, in) and bias (out,)")
    if x.ndim == 0:
        raise shape_error("linear", x.shape, weight.shape,
                          detail="the input must have a feature axis (..., in)")
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
    N, k, n = x2.shape[0], x2.shape[1], weight.shape[0]
    flops.add_matmul("linear", N, k, n)
    if bias is not None:
        y += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)
    column_sums = fast.kernel("column_sums") if bias is not None else None
    saved_x = x2 if weight.requires_grad else None  # a frozen W needs no input for its backward

    def backward(g: Any):
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        flops.add_matmul("linear", N, n, k, bool(x.requires_grad) + (saved_x is not None))
        gx = (g2 @ weight.data).reshape(x.shape) if x.requires_grad else None
        gw = g2.T @ saved_x if saved_x is not None else None
        if bias is None:
            return gx, gw
        if not bias.requires_grad:
            return gx, gw, None
        return gx, gw, (g2.sum(axis=0) if column_sums is None else column_sums(g2))
    return Tensor._make(y.reshape(*lead, weight.shape[0]), parents, backward, "linear")


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, tanh form: ``0.5 x (1 + tanh(c (x + a x^3)))``, c = sqrt(2/pi), a = 0.044715;
    x any shape -> the same shape.

    d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), with t the tanh above.
    The fast form (``fast.elementwise.gelu``) computes the same in cache-sized pieces, with
    (1 + t) / 2 made as sigmoid(2 c (x + a x^3)) (one exp) and d/dx made in the forward pass
    while x is in cache.
    """
    fused = fast.kernel("gelu")
    if fused is not None:
        y, dydx = fused(x.data, is_grad_enabled() and x.requires_grad)
        return Tensor._make(y, (x,), lambda g: (g * dydx,), "gelu")
    xd = x.data
    t = B.xp.tanh(GELU_C * (xd + GELU_A * xd * xd * xd))
    out = 0.5 * xd * (1.0 + t)

    def backward(g: Any):
        dt = GELU_C * (1.0 + 3 * GELU_A * xd * xd)
        return (g * (0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * dt),)
    return Tensor._make(out, (x,), backward, "gelu")


def mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """The transformer's MLP, ``gelu(x W1^T + b1) W2^T + b2``: x (..., C), W1 (H, C), b1 (H,),
    W2 (C', H), b2 (C',) -> (..., C'); the biases may be None.

    As written, three ops: ``linear(gelu(linear(x, W1, b1)), W2, b2)``. The fast form
    (``fast.mlp``) is one node with the same arithmetic that keeps one (N, H) array for its
    backward pass instead of two (GELU's derivative and output).
    """
    fused = fast.kernel("mlp")
    if fused is None:
        return linear(gelu(linear(x, w1, b1)), w2, b2)
    for weight, bias, inp in ((w1, b1, x.shape[-1]), (w2, b2, w1.shape[0])):
        if weight.ndim != 2 or weight.shape[1] != inp or \
                (bias is not None and bias.shape != (weight.shape[0],)):
            raise shape_error("mlp", x.shape, w1.shape, w2.shape,
                              detail="x (..., C), W1 (H, C), b1 (H,), W2 (C', H), b2 (C',)")
    params = (x, w1, b1, w2, b2)
    needs = tuple(p is not None and is_grad_enabled() and p.requires_grad for p in params)
    x2 = x.data.reshape(-1, x.shape[-1])  # (N, C)
    N, C, H, C2 = x2.shape[0], x2.shape[1], w1.shape[0], w2.shape[0]
    flops.add_matmul("linear", N, C, H)
    flops.add_matmul("linear", N, H, C2)
    out, fused_backward = fused(x2, w1.data, None if b1 is None else b1.data, w2.data,
                                None if b2 is None else b2.data, needs)
    parents = tuple(p for p in params if p is not None)

    def backward(g: Any) -> tuple:
        below = needs[0] or needs[1] or needs[2]
        flops.add_matmul("linear", N, C2, H, needs[3] + below)  # gW2, ga
        flops.add_matmul("linear", N, H, C, needs[0] + needs[1])  # gx, gW1
        gx, gw1, gb1, gw2, gb2 = fused_backward(g.reshape(-1, C2))
        grads = (None if gx is None else gx.reshape(x.shape), gw1, gb1, gw2, gb2)
        return tuple(gr for gr, p in zip(grads, params) if p is not None)
    # with nothing needing a gradient fused_backward is None, and _make records no graph either
    return Tensor._make(out.reshape(*x.shape[:-1], C2), parents, backward, "mlp")


def _softmax_array(z: Any, axis: int) -> Any:
    if z.size == 0:  # nothing to normalise (and no maximum to take): an empty result, as torch
        return B.xp.empty_like(z)
    e = B.xp.exp(z - z.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``y_i = exp(x_i - max x) / sum_j exp(x_j - max x)``; backward ``y * (g - sum(g * y))``."""
    axis = check_axis(axis, x.shape, "softmax", many=False)
    y = _softmax_array(x.data, axis)
    return Tensor._make(y, (x,), lambda g: (y * (g - (g * y).sum(axis=axis, keepdims=True)),),
                        "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """``x - max x - log sum exp(x - max x)``; backward ``g - softmax(x) * sum(g)``."""
    axis = check_axis(axis, x.shape, "log_softmax", many=False)
    if x.size == 0:  # nothing to normalise: an empty result, as torch
        out = B.xp.empty_like(x.data)
    else:
        shifted = x.data - x.data.max(axis=axis, keepdims=True)
        out = shifted - B.xp.log(B.xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g: Any):
        return (g - B.xp.exp(out) * g.sum(axis=axis, keepdims=True),)
    return Tensor._make(out, (x,), backward, "log_softmax")


def _int_array(targets: Any, name: str) -> Any:
    """Integer indices as an array where they are: host data stays on the host (checked there,
    for free, before it is uploaded), device data on the device."""
    arr = targets.data if isinstance(targets, Tensor) else targets
    if not B.is_array(arr):
        arr = np.asarray(arr)
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr


def _mean_over(total: Any, n: Any, dtype: Any) -> Any:
    """``total / n``, NaN when n is 0 (nothing scored, as PyTorch); n a Python int (host
    targets) or a 0-d int array (device targets: no sync to learn it)."""
    if isinstance(n, int):
        return total / n if n else B.xp.asarray(np.nan, dtype=dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / n.astype(dtype)  # 0 / 0 = NaN


def _divide(g: Any, n: Any) -> Any:
    """``g / max(n, 1)``, in g's dtype, for n a Python int or a 0-d int array."""
    if isinstance(n, int):
        return g / max(n, 1)
    return g / B.xp.maximum(n, 1).astype(g.dtype)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    logits (..., C), targets (...) integers; positions whose target is ``ignore_index`` are left
    out of the mean. ``loss = mean_i (logsumexp(z_i) - z_i[t_i])``; its gradient with respect to
    z_i is ``(softmax(z_i) - onehot(t_i)) / n_valid``. All positions ignored gives NaN, as PyTorch.
    The fast form (``fast.loss``) makes the same per row, a few rows at a time.
    """
    t = _int_array(targets, "cross_entropy: targets")
    check_int(ignore_index, "cross_entropy: ignore_index", minimum=None)
    if logits.shape[:-1] != tuple(t.shape):
        raise shape_error("cross_entropy", logits.shape, t.shape,
                          detail="targets must have the logits' shape without the class axis")
    C = logits.shape[-1]
    z = logits.data.reshape(-1, C)  # (N, C)
    t = t.reshape(-1)  # (N,)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))

    def out_of_range() -> InvalidArgumentError:
        found = B.to_numpy(t)[B.to_numpy(bad)]
        return InvalidArgumentError(f"cross_entropy: targets must lie in [0, {C}) or equal "
                                    f"ignore_index={ignore_index}; found {found[:5].tolist()}")
    waits = checks.require(bad.any(), out_of_range)  # on the host: now; on a device: maybe later
    # n_valid, the mean's divisor: a Python int from host targets, a 0-d array on the device
    n_valid = int(valid.sum()) if checks.is_host(valid) else valid.sum()
    t, valid = B.asarray(t), B.asarray(valid)
    safe_t = B.xp.where(valid, t, 0)
    if waits:  # a bad target raises once the step settles; until then stay in bounds
        safe_t = B.xp.clip(safe_t, 0, C - 1)
    rows = B.xp.arange(z.shape[0])
    fused_lse, fused_grad = fast.kernel("logsumexp_rows"), fast.kernel("cross_entropy_grad")
    if fused_lse is not None:  # the same per row, a few rows at a time: no (N, C) temporary
        lse = fused_lse(z)
    else:
        zmax = z.max(axis=1, keepdims=True)
        lse = B.xp.log(B.xp.exp(z - zmax).sum(axis=1)) + zmax[:, 0]  # (N,)
    picked = z[rows, safe_t]
    losses = (lse - picked) * valid
    loss = B.xp.asarray(_mean_over(losses.sum(), n_valid, z.dtype), dtype=z.dtype)

    def backward(g: Any):
        weights = (valid * _divide(g, n_valid)).astype(z.dtype)  # (N,): g / n_valid, or 0
        if fused_grad is not None:
            return (fused_grad(z, lse, safe_t, weights).reshape(logits.shape),)
        p = B.xp.exp(z - lse[:, None])  # softmax, (N, C)
        p[rows, safe_t] -= 1
        p *= weights[:, None]
        return (p.reshape(logits.shape),)
    return Tensor._make(loss, (logits,), backward, "cross_entropy")


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise the last axis: ``y = xhat * w + b`` with ``xhat = (x - mean) / sqrt(var + eps)``;
    x (..., C), w, b (C,) or None; mean and var (biased) over the last axis.

    With r = 1/sqrt(var + eps) and gh = g * w, the gradients are
    ``gx = r * (gh - mean(gh) - xhat * mean(gh * xhat))``, ``gw = sum g * xhat``,
    ``gb = sum g`` (sums over every axis but the last). The fast form (``fast.norm``) computes the
    same with fewer passes over the rows.
    """
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise shape_error("layer_norm", x.shape, p.shape,
                              detail=f"{name} must have shape ({C},)")
    parents = tuple(p for p in (x, weight, bias) if p is not None)
    w = weight.data if weight is not None else None
    b = bias.data if bias is not None else None
    xd = x.data.reshape(-1, C)  # (N, C)
    fused = fast.kernel("layer_norm")
    if fused is not None:
        out, fused_backward = fused(xd, w, b, eps)

        def backward(g: Any):
            grads = fused_backward(g.reshape(-1, C), x.requires_grad,
                                   weight is not None and weight.requires_grad,
                                   bias is not None and bias.requires_grad)
            return _layer_norm_grads(grads, x, weight, bias)
        return Tensor._make(out.reshape(x.shape), parents, backward, "layer_norm")

    mean = xd.mean(axis=1, keepdims=True)  # (N, 1)
    var = ((xd - mean) ** 2).mean(axis=1, keepdims=True)  # (N, 1)
    std = B.xp.sqrt(var + eps)  # 1 / r, (N, 1)
    xhat = (xd - mean) / std  # (N, C)
    out = xhat * w if w is not None else xhat.copy()  # its own array: backward keeps xhat
    if b is not None:
        out = out + b

    def backward(g: Any):
        g2 = g.reshape(-1, C)  # (N, C)
        gx = gw = gb = None
        if x.requires_grad:
            gh = g2 if w is None else g2 * w
            gx = (gh - gh.mean(axis=1, keepdims=True)
                  - xhat * (gh * xhat).mean(axis=1, keepdims=True)) / std
        if weight is not None and weight.requires_grad:
            gw = (g2 * xhat).sum(axis=0)
        if bias is not None and bias.requires_grad:
            gb = g2.sum(axis=0)
        return _layer_norm_grads((gx, gw, gb), x, weight, bias)
    return Tensor._make(out.reshape(x.shape), parents, backward, "layer_norm")


def _layer_norm_grads(grads: tuple, x: Tensor, weight: Tensor | None,
                      bias: Tensor | None) -> tuple:
    """(gx (N, C), gw, gb) -> one gradient per parent of the node (x, then weight and bias where
    given), gx in x's shape."""
    gx, gw, gb = grads
    out = [None if gx is None else gx.reshape(x.shape)]
    if weight is not None:
        out.append(gw)
    if bias is not None:
        out.append(gb)
    return tuple(out)


def embedding(indices: Any, weight: Tensor) -> Tensor:
    """Row lookup ``out[...] = W[indices[...]]``; indices (...) ints, W (V, C) -> (..., C).

    Backward adds each output row's gradient into the row it came from (repeats add up).
    """
    _check_tensors("embedding", weight=weight)
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be a table (V, C), got shape {weight.shape}")
    V = weight.shape[0]

    def out_of_range(host: np.ndarray) -> InvalidArgumentError:
        return InvalidArgumentError(f"embedding: indices must lie in [0, {V}), got values from "
                                    f"{int(host.min())} to {int(host.max())}")
    # host indices are checked there, then uploaded; device ones are checked without a sync
    idx = B.asarray(checks.check_range(_int_array(indices, "embedding: indices"), 0, V,
                                       out_of_range))
    out = weight.data[idx]

    def backward(g: Any):
        return (B.index_add_rows(idx, g, V),)
    return Tensor._make(out, (weight,), backward, "embedding")


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity in eval)."""
    check_bool(training, "dropout: training")
    if not is_real(p) or not 0.0 <= p <= 1.0:
        raise InvalidArgumentError(f"dropout: p must lie in [0, 1], got {p!r}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    keep = B.random_uniform(x.shape, x.data.dtype) >= p
    mask = keep * x.data.dtype.type(1.0 / (1.0 - p))
    return Tensor._make(x.data * mask, (x,), lambda g: (g * mask,), "dropout")


def mse_loss(input: Tensor, target: Any) -> Tensor:
    """Mean squared error ``mean((input - target)^2)``; the target must broadcast to the
    input's shape (a (4,) target against a (4, 1) input would make a (4, 4) difference, the
    mistake PyTorch warns of: refused)."""
    shape = tuple(target.shape) if hasattr(target, "shape") else tuple(np.shape(target))
    try:
        joint = np.broadcast_shapes(tuple(input.shape), shape)
    except ValueError:
        joint = None
    if joint != tuple(input.shape):
        raise ShapeError(f"mse_loss: target {shape} must broadcast to the input's shape "
                         f"{tuple(input.shape)}, but together they make "
                         f"{joint if joint is not None else 'no shape'}")
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
