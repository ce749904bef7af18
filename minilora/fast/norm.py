"""LayerNorm with as few passes over its (N, C) rows as it takes, and column sums on BLAS.

A LayerNorm is memory-bound: every pass over the (N, C) rows that is saved shows. So row means
are matrix-vector products with a vector of 1/C, row sums of products are einsums (no (N, C)
temporary), and the rest is done in place. A column sum ``sum_i a[i, j]`` is ``ones(N) @ a``, a
matrix-vector product on BLAS, where NumPy's ``sum(axis=0)`` is a strided reduction.

On a device the same operations run with their elementwise chains fused into single kernels
(:func:`layer_norm_device`: five launches forward, six backward), the vector of 1/C is made once,
and a column sum is the reduction ``sum(axis=0)`` itself.

The reference forms are :func:`minilora.functional.layer_norm` and the bias gradient of
:func:`minilora.functional.linear`; ``tests/test_fast_elementwise.py`` pins these to them.
"""

from __future__ import annotations

from typing import Any, Callable

from .. import backend as B
from .device import elementwise


def column_sums(a: Any) -> Any:
    """``sum_i a[i, j]``: (N, C) -> (C,), as ``ones(N) @ a`` on the CPU (a reduction on a device,
    where it is one kernel)."""
    if B.on_device():
        return a.sum(axis=0)
    return B.xp.ones(a.shape[0], dtype=a.dtype) @ a


def row_dots(a: Any, b: Any) -> Any:
    """``sum_j a[i, j] b[i, j]`` for each row i of two (N, C) arrays -> (N,)."""
    return B.xp.einsum("ij,ij->i", a, b)


_means: dict = {}  # (backend, C, dtype) -> the vector of 1/C on a device, made once


def _mean_of(C: int, dtype: Any) -> Any:
    """The vector of 1/C, (C,): ``x @ _mean_of(C)`` is the row means of x (N, C)."""
    if not B.on_device():
        return B.xp.full(C, 1.0 / C, dtype=dtype)
    key = (B.get_backend(), C, B.xp.dtype(dtype).str)
    found = _means.get(key)
    if found is None:
        found = _means[key] = B.xp.full(C, 1.0 / C, dtype=dtype)
    return found


def layer_norm(x2: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Callable]:
    """``y = xhat * w + b`` with ``xhat = (x - mean) * r``, r = 1 / sqrt(var + eps), over the rows
    of x2 (N, C); weight and bias (C,) or None. Returns y (N, C) and ``backward`` (below, with the
    xhat (N, C) and r (N,) of this call)."""
    if B.on_device():
        return layer_norm_device(x2, weight, bias, eps)
    mean_of = _mean_of(x2.shape[1], x2.dtype)
    xhat = x2 - (x2 @ mean_of)[:, None]  # centred, (N, C)
    rstd = 1.0 / B.xp.sqrt(row_dots(xhat, xhat) * mean_of[0] + eps)  # (N,)
    xhat *= rstd[:, None]
    out = xhat * weight if weight is not None else xhat.copy()
    if bias is not None:
        out += bias

    def backward(g2: Any, needs_x: bool, needs_weight: bool, needs_bias: bool) -> tuple:
        return layer_norm_backward(g2, xhat, rstd, weight, needs_x, needs_weight, needs_bias)
    return out, backward


def layer_norm_backward(g2: Any, xhat: Any, rstd: Any, weight: Any, needs_x: bool,
                        needs_weight: bool, needs_bias: bool) -> tuple[Any, Any, Any]:
    """The gradients of :func:`layer_norm` from g2 = dL/dy (N, C): gx (N, C), gw (C,), gb (C,).

    ``gx = r * (gh - mean(gh) - xhat * mean(gh * xhat))`` with gh = g2 * w (row means),
    ``gw = sum_i g2 * xhat``, ``gb = sum_i g2``. Each is None, and costs nothing, unless its
    ``needs_*`` flag is set (and, for gw, there is a weight).
    """
    gx = gw = gb = None
    if needs_x:
        mean_of = _mean_of(xhat.shape[1], xhat.dtype)
        gx = g2 * weight if weight is not None else g2.copy()  # gh
        mean_gh_xhat = row_dots(gx, xhat) * mean_of[0]  # (N,)
        gx -= (gx @ mean_of)[:, None]
        gx -= xhat * mean_gh_xhat[:, None]
        gx *= rstd[:, None]
    if needs_weight and weight is not None:
        gw = B.xp.einsum("ij,ij->j", g2, xhat)
    if needs_bias:
        gb = column_sums(g2)
    return gx, gw, gb


def layer_norm_device(x2: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Callable]:
    """:func:`layer_norm` on a device: the same operations in the same order, the elementwise
    ones fused (r = 1 / sqrt(mean(xc^2) + eps) one kernel over the rows, xhat = xc r and
    y = xhat w + b one over the elements). Returns y (N, C) and ``backward``."""
    C = x2.shape[1]
    mean_of = _mean_of(C, x2.dtype)
    xc = x2 - (x2 @ mean_of)[:, None]  # centred, (N, C)
    rstd = elementwise("ln_rstd", x2.dtype, "{P} ss, {P} inv_c, {P} eps", "{P} r",
                       "r = 1 / sqrt(ss * inv_c + eps);")(row_dots(xc, xc), 1.0 / C, eps)  # (N,)
    ins = ["{P} xc", "{P} r"] + [f"{{P}} {n}" for n, a in (("w", weight), ("b", bias))
                                 if a is not None]
    y = "xhat" + (" * w" if weight is not None else "") + (" + b" if bias is not None else "")
    kernel = elementwise(f"ln_forward_{int(weight is not None)}{int(bias is not None)}", x2.dtype,
                         ", ".join(ins), "{P} xhat, {P} y", f"xhat = xc * r; y = {y};")
    xhat, out = kernel(xc, rstd[:, None], *(a for a in (weight, bias) if a is not None))

    def backward(g2: Any, needs_x: bool, needs_weight: bool, needs_bias: bool) -> tuple:
        return layer_norm_backward_device(g2, xhat, rstd, weight, needs_x, needs_weight,
                                          needs_bias)
    return out, backward


def layer_norm_backward_device(g2: Any, xhat: Any, rstd: Any, weight: Any, needs_x: bool,
                               needs_weight: bool, needs_bias: bool) -> tuple[Any, Any, Any]:
    """:func:`layer_norm_backward` on a device, ``gx = r ((gh - mean(gh)) - xhat mean(gh xhat))``
    as one kernel after its three row reductions; gw, gb as there."""
    gx = gw = gb = None
    if needs_x:
        C = xhat.shape[1]
        mean_of = _mean_of(C, xhat.dtype)
        gx = g2 * weight if weight is not None else g2.copy()  # gh
        d = row_dots(gx, xhat)  # (N,)
        a = gx @ mean_of  # (N,): mean(gh)
        elementwise("ln_backward", xhat.dtype, "{P} a, {P} d, {P} xhat, {P} r, {P} inv_c",
                    "{P} gx", "gx = ((gx - a) - xhat * (d * inv_c)) * r;")(
            a[:, None], d[:, None], xhat, rstd[:, None], 1.0 / C, gx)
    if needs_weight and weight is not None:
        gw = B.xp.einsum("ij,ij->j", g2, xhat)
    if needs_bias:
        gb = column_sums(g2)
    return gx, gw, gb


__all__ = ["column_sums", "row_dots", "layer_norm", "layer_norm_backward", "layer_norm_device",
           "layer_norm_backward_device"]
