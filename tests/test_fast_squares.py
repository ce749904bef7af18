"""The gradient norm's fast form (minilora.fast.squares) pinned to the reference form.

The fast form squares and sums each cache-sized piece of a gradient in the gradient's precision
and adds the pieces' sums in float64; the reference lays everything end to end in float64. So
they agree to float32's rounding of the squares and of a pairwise sum (``TOL``, relative), the
fast form's number is exactly its own definition piece by piece, and where a float32 square may
overflow the reference answers, so a huge finite gradient keeps a finite norm.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend as B
from minilora import fast, optim
from minilora.fast import elementwise
from minilora.fast.squares import sum_of_squares
from minilora.nn import Parameter
from tests.helpers import host

TOL = {np.float16: 1e-6, np.float32: 1e-6, np.float64: 1e-14}  # relative, on the sum

shapes = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=6)


def grads_of(shapes, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    return [B.asarray((rng.standard_normal(s) * scale).astype(dtype)) for s in shapes]


def reference_sum(grads):
    with fast.reference():
        return float(optim._norm_squared(grads))


@given(shapes=shapes, dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       scale=st.floats(1e-3, 1e3), piece=st.sampled_from([1, 7, 64, 1 << 16]),
       seed=st.integers(0, 2**16))
def test_fast_sum_of_squares_matches_the_float64_reference(shapes, dtype, scale, piece, seed):
    grads = grads_of(shapes, dtype, scale, seed)
    before = [host(g).copy() for g in grads]
    with mock.patch.object(elementwise, "PIECE", piece), fast.forms(True):
        total = optim._norm_squared(grads)
    expected = reference_sum(grads)
    assert float(total) == pytest.approx(expected, rel=TOL[dtype], abs=0.0)
    for g, b in zip(grads, before):  # read only
        assert np.array_equal(host(g), b)


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6), piece=st.integers(1, 16),
       seed=st.integers(0, 2**16))
def test_the_fast_form_is_its_pieces_sums_added_in_float64(sizes, piece, seed):
    """Its number, bit for bit: each gradient cut into runs of ``piece`` elements (the last one
    shorter), each run's squares summed in float32, the runs' sums added in float64 in order."""
    if B.on_device():
        pytest.skip("on a device the reference form answers (the next test)")
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    sums = [np.square(g[i:i + piece]).sum() for g in grads for i in range(0, g.size, piece)]
    with mock.patch.object(elementwise, "PIECE", piece):
        total = sum_of_squares(grads)
    assert total == np.array(sums, dtype=np.float64).sum()
    assert total.dtype == np.float64 and np.ndim(total) == 0
    # and it does not depend on how many cores there are: nothing here is split among threads
    with mock.patch.object(elementwise, "PIECE", piece), \
            mock.patch("minilora.fast.cpu.available_cpus", lambda: 1):
        assert sum_of_squares(grads) == total


def test_on_a_device_the_reference_form_answers():
    grads = grads_of([(3, 4), (5,)], np.float32, 1.0, 0)
    with fast.forms(True):
        fast_total = optim._norm_squared(grads)
    assert (sum_of_squares(grads) is None) == B.on_device()
    if B.on_device():
        assert float(fast_total) == reference_sum(grads)


@pytest.mark.parametrize("huge", [1e20, 3e38])
def test_a_square_that_overflows_float32_gets_the_references_finite_norm(huge):
    """1e20 squared is 1e40, beyond float32: the fast form declines and the float64 reference
    gives the finite norm, as it would have without the fast form."""
    grads = grads_of([(4,), (70,)], np.float32, 1.0, 1)
    grads[0][1] = huge
    assert sum_of_squares(grads) is None
    params = []
    for g in grads:
        p = Parameter(B.asarray(np.zeros(g.shape, np.float32)))
        p.grad = g
        params.append(p)
    with fast.forms(True):
        norm = optim.grad_norm(params)
    with fast.reference():
        assert norm == optim.grad_norm(params)
    assert np.isfinite(norm) and norm == pytest.approx(huge, rel=1e-6)


@pytest.mark.parametrize("bad, expected", [(np.inf, np.inf), (-np.inf, np.inf),
                                           (np.nan, np.nan)])
def test_inf_and_nan_come_through_as_in_the_reference(bad, expected):
    grads = grads_of([(5,), (3, 3)], np.float32, 1.0, 2)
    grads[1][0, 2] = bad
    with fast.forms(True):
        total = float(optim._norm_squared(grads))
    assert (np.isnan(total) and np.isnan(expected)) or total == expected
    assert np.isnan(reference_sum(grads)) == np.isnan(expected)


def test_empty_gradients_sum_to_zero():
    grads = grads_of([(0,), (0, 3)], np.float32, 1.0, 3)
    with fast.forms(True):
        assert float(optim._norm_squared(grads)) == 0.0
