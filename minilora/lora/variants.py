"""The LoRA variants, apart from the plain layer as PEFT keeps them (``tuners/lora/variants.py``):
rsLoRA changes the scaling, DoRA adds a learned length per output row, PiSSA changes the init.

rsLoRA (Kalajdzievski 2023). The plain scaling s = alpha / r shrinks the update as r grows, so
a larger rank learns no better; s = alpha / sqrt(r) keeps the update's size steady in r:

    s = alpha / r                (LoRA)          s = alpha / sqrt(r)      (rsLoRA)

DoRA (Liu et al. 2024). The updated weight W + s B A (out, in) is split into a direction, each
row of unit length, and a magnitude m (out,) that trains on its own:

    y = (m / ||W + s B A||_row) * (x W^T + s (x A^T) B^T) + b

||.||_row is the L2 norm of each row, over the input axis, and is a constant for the backward
pass (DoRA, section 4.3). m starts at ||W + s B A||_row, so the output does not change at init.
Its state key is "<path>.lora_magnitude_vector.<adapter>.weight" (out,), as in PEFT. Merged,
the layer's weight is f (W + s B A) with f = m / ||W + s B A||_row, a factor per row.

PiSSA (Meng et al. 2024). A and B start from the top-r singular triplets of W instead of noise
and zeros, and W keeps the rest, so the output is unchanged and training starts on the principal
directions:

    s B A = U_r S_r V_r^T,    W <- W - s B A      (B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T)

Against the untouched W, a trained PiSSA adapter (A, B) from the start (A0, B0) is the exact
rank-2r LoRA s [B, -B0] [A; A0] (:func:`pissa_as_lora`), as PEFT's PiSSA-to-LoRA conversion
writes it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend as B
from .. import functional as F
from ..errors import ConfigError, check_bool, is_real
from ..nn import Module, Parameter
from ..tensor import Tensor

# ---------------------------------------------------------------------------------- rsLoRA


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r`` (the LoRA paper), or ``alpha / sqrt(r)`` with rsLoRA; r a positive int."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ConfigError(f"lora_scaling: r must be a positive integer, got {r!r}")
    check_bool(use_rslora, "lora_scaling: use_rslora", ConfigError)  # "no" would turn it on
    if not is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"lora_scaling: alpha must be a positive number (LoraConfig's), got "
                          f"{alpha!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ------------------------------------------------------------------------------------ DoRA


def row_norm(w: Any) -> Any:
    """L2 norm of each row of w (n, k) -> (n,): the DoRA norm ||.||_row, over the input axis."""
    return B.xp.sqrt((w * w).sum(axis=1))


def _divisor(norm: Any) -> Any:
    """``norm`` with its zeros made 1. An all-zero row of W + s B A has no direction for m to
    scale: 0 / 0 would make that output NaN (PEFT's does), and the whole loss with it. Its m is 0
    (it was the row's norm), so the row's output stays 0, what the row computes."""
    return B.xp.where(norm > 0, norm, norm.dtype.type(1))


class DoraMagnitude(Module):
    """DoRA's magnitude vector m (out,), held as ``weight`` (PEFT's layout)."""

    def __init__(self, magnitude: Any) -> None:
        super().__init__()
        self.weight = Parameter(magnitude)

    @classmethod
    def from_weight(cls, updated: Any) -> DoraMagnitude:
        """m = ||W + s B A||_row of the updated weight (out, in): the output is unchanged."""
        return cls(row_norm(updated))


def dora_term(m: Tensor, W: Any, A: Tensor, Bm: Tensor, s: float, dx: Tensor,
              wx: Tensor) -> Tensor:
    """``(m / n - 1) * wx + (m / n) * s (dx A^T) B^T`` with n = ||W + s B A||_row (detached).

    Added to the base output x W^T + b, with ``wx`` = dx W^T (..., out), this gives DoRA's output
    (module docstring). m (out,), W (out, in) an array, A (r, in), B (out, r), dx (..., in).
    """
    norm = row_norm(W + s * (Bm.data @ A.data))  # (out,), no graph through it
    scale = m / Tensor(_divisor(norm))  # (out,)
    lora_out = F.linear(F.linear(dx, A) * s, Bm)  # (..., out)
    return (scale - 1.0) * wx + scale * lora_out


def dora_merge_factor(m: Any, W: Any, delta: Any) -> Any:
    """f = m / ||W + delta||_row (out,), delta = s B A: the merged weight is f (W + delta)."""
    return m / _divisor(row_norm(W + delta))


def dora_merged_delta(W: Any, delta: Any, f: Any) -> Any:
    """``(f - 1) W + f delta`` (out, in): what merging a DoRA adapter adds to W."""
    return (f[:, None] - 1.0) * W + f[:, None] * delta


# ----------------------------------------------------------------------------------- PiSSA


def pissa_init(W: Any, r: int, s: float) -> tuple[Any, Any]:
    """PiSSA's (A (r, in), B (out, r)) from the top-r singular triplets of W (out, in), with
    s B A = U_r S_r V_r^T; W is replaced in place by its residual W - s B A.

    The residual is formed from A and B rounded to W's dtype, so base(x) + s B A x equals the old
    output up to rounding.
    """
    n, k = W.shape
    if r > min(n, k):
        raise ConfigError(f"LoRALinear: init='pissa' needs r <= min(in, out) = {min(n, k)}, "
                          f"got r={r}")
    U, S, Vh = B.xp.linalg.svd(W.astype(np.float64), full_matrices=False)
    root = B.xp.sqrt(S[:r] / s)  # (r,)
    A = (root[:, None] * Vh[:r]).astype(W.dtype)  # (r, in)
    Bm = (U[:, :r] * root[None, :]).astype(W.dtype)  # (out, r)
    W -= s * (Bm @ A)
    return A, Bm


def pissa_as_lora(A: Any, Bm: Any, A0: Any, B0: Any) -> tuple[Any, Any]:
    """A trained PiSSA adapter (A, B) that started at (A0, B0), as a LoRA of the untouched W:
    ``([A; A0] (2r, in), [B, -B0] (out, 2r))``, at the same scaling s (:func:`pissa_lora_alpha`).

    On the residual W - s B0 A0 it adds s B A, so against W its update is
    s (B A - B0 A0) = s [B, -B0] [A; A0], exactly.
    """
    wide_A = B.xp.concatenate([A, A0], axis=0)  # (2r, in)
    wide_B = B.xp.concatenate([Bm, -B0], axis=1)  # (out, 2r)
    return wide_A, wide_B


def pissa_lora_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps s at the doubled rank of :func:`pissa_as_lora`: 2 alpha
    (alpha / r = 2 alpha / 2r), or sqrt(2) alpha with rsLoRA."""
    return alpha * (math.sqrt(2) if use_rslora else 2)


__all__ = ["lora_scaling", "row_norm", "DoraMagnitude", "dora_term", "dora_merge_factor",
           "dora_merged_delta", "pissa_init", "pissa_as_lora", "pissa_lora_alpha"]
