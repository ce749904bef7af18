"""The gradient norm's sum of squares, piece by piece where the gradients lie.

The reference form (:func:`minilora.optim.norm_array` and its helper) lays the gradients end to
end in float64, squares that copy in place and sums it: a float64 array twice the size of the
gradients, written once and read twice. For clipping, the training loop's step pays that every
step: 3 ms of a 230 ms step at the reference config (benchmarks/RESULTS.md).

Here each cache-sized piece of a gradient (``piece_size`` elements) is squared into a temporary
that stays in cache and summed there, in the gradient's own precision (float32 at least), and the
pieces' sums are added in float64:

    sum_k sum_i g_{k,i}^2  =  sum_p S_p,    S_p = sum_{i in p} g_i^2  (NumPy's pairwise sum)

One pass over the gradients, nothing the size of the model. Within a piece the squares round to
float32 and NumPy adds them pairwise, so the result agrees with the float64 reference to about
1e-7 relatively (``tests/test_fast_squares.py`` states the tolerance). The pieces are fixed by
the gradients' sizes, so the same gradients give the same bits every time.

Two cases go back to the reference form (the function returns None): on a device, where the
reference's few kernels are already what a device wants; and when the sum comes out inf without
a NaN, because a float32 square overflows from about 1.8e19: a huge but finite gradient then
gets the reference's finite norm, and a real inf still gives inf. A NaN gives NaN either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from .elementwise import piece_size


def sum_of_squares(grads: list[Any]) -> Any | None:
    """``sum_k sum_i g_{k,i}^2`` over the arrays ``grads`` (any shapes), as a float64 scalar:
    each piece of ``piece_size`` elements squared and summed in its own precision (at least
    float32), the pieces' sums added in float64. None on a device, or when the sum is inf and
    not NaN (a square may have overflowed): the reference form answers then."""
    if B.on_device():
        return None
    sums = []
    with np.errstate(over="ignore"):  # an overflowed square is handled below, not warned of
        for g in grads:
            flat = g.reshape(-1)
            dtype = np.promote_types(flat.dtype, np.float32)  # float16's squares overflow at 256
            m = piece_size(flat.size)
            sums += [np.square(flat[i:i + m], dtype=dtype).sum() for i in range(0, flat.size, m)]
    total = np.array(sums, dtype=np.float64).sum()
    return None if np.isinf(total) else total


__all__ = ["sum_of_squares"]
