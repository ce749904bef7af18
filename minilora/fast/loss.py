"""Cross-entropy's two passes over the logits, row piece by row piece: no (N, V) temporary.

The reference form (:func:`minilora.functional.cross_entropy`) writes each step over the logits
z (N, V) as a whole array: ``z - max`` and its exp in the forward pass, only to sum it, and
``z - lse``, its exp and the one-hot subtraction in the backward pass. With a large vocabulary
(GPT-2's 50,257 entries) each such array is hundreds of MB. Here both passes go a few rows at a
time (pieces of about ``PIECE`` elements): the forward pass keeps a piece-sized scratch buffer and
makes only lse (N,), the backward pass writes the gradient (N, V) piece by piece, once, while each
piece is in cache. Each row gets the same operations in the same order as the reference form
(a row's sum runs along its V contiguous entries however many rows a piece holds), so the two
agree bit for bit (``tests/test_fast_loss.py``).

    lse_i = log(sum_j exp(z_ij - max_j z_ij)) + max_j z_ij
    dL/dz_ij = (exp(z_ij - lse_i) - [j = t_i]) * w_i        w_i = valid_i * g / n_valid

On a device a piece is every row: the reference form's operations, each one kernel over the whole
array.
"""

from __future__ import annotations

from typing import Any

from .. import backend as B

# elements per piece: larger than the GELU's, since each row's reductions make a NumPy call per
# piece, and a vocabulary-sized row is tens of thousands of elements already
PIECE = 1 << 18


def _rows_per_piece(z: Any) -> int:
    """Rows of z (N, V) per piece: about ``PIECE`` elements, at least one row; every row at once
    on a device, where the whole arrays are a few kernels."""
    if B.on_device():
        return max(1, z.shape[0])
    return max(1, PIECE // max(1, z.shape[1]))


def logsumexp_rows(z: Any) -> Any:
    """``lse_i = log(sum_j exp(z_ij - max_j z_ij)) + max_j z_ij`` for z (N, V) -> (N,), row
    piece by row piece, with one piece-sized scratch buffer."""
    N, V = z.shape
    rows = _rows_per_piece(z)
    lse = B.xp.empty(N, dtype=z.dtype)
    scratch = B.xp.empty((min(rows, N), V), dtype=z.dtype)
    for a in range(0, N, rows):
        zp = z[a:a + rows]
        e = scratch[:zp.shape[0]]
        zmax = zp.max(axis=1, keepdims=True)  # (r, 1)
        B.xp.subtract(zp, zmax, out=e)
        B.xp.exp(e, out=e)
        lse[a:a + rows] = B.xp.log(e.sum(axis=1)) + zmax[:, 0]
    return lse


def cross_entropy_grad(z: Any, lse: Any, targets: Any, weights: Any) -> Any:
    """``(exp(z - lse[:, None]) - onehot(targets)) * weights[:, None]`` for z (N, V), lse (N,),
    targets (N,) integers in [0, V), weights (N,) in z's dtype -> a new (N, V) array, written
    row piece by row piece."""
    N = z.shape[0]
    rows = _rows_per_piece(z)
    p = B.xp.empty_like(z)
    for a in range(0, N, rows):
        pp = p[a:a + rows]
        B.xp.subtract(z[a:a + rows], lse[a:a + rows, None], out=pp)
        B.xp.exp(pp, out=pp)  # softmax
        pp[B.xp.arange(pp.shape[0]), targets[a:a + rows]] -= 1
        pp *= weights[a:a + rows, None]
    return p


__all__ = ["logsumexp_rows", "cross_entropy_grad"]
