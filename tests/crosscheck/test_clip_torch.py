"""minilora.optim.clip_grad_norm against torch.nn.utils.clip_grad_norm_ (error_if_nonfinite=False,
the default): the same returned norm and the same clipped gradients for finite gradients, and the
same NaN / zero pattern when the norm is NaN or infinite (PyTorch always multiplies by
min(max_norm / (norm + 1e-6), 1), so a NaN norm poisons every gradient and an inf norm zeroes the
finite entries and turns the inf ones into NaN)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from minilora import backend as B  # noqa: E402
from minilora.nn import Parameter  # noqa: E402
from minilora.optim import clip_grad_norm, grad_norm  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck

RTOL = {np.float32: 1e-6, np.float64: 1e-12}


def both(grads, dtype):
    """The same gradients as minilora Parameters and as torch parameters."""
    ours, theirs = [], []
    for g in grads:
        g = np.array(g, dtype=dtype)
        p = Parameter(B.asarray(np.zeros(g.shape, dtype)))
        p.grad = B.asarray(g.copy())
        t = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
        t.grad = torch.from_numpy(g.copy())
        ours.append(p)
        theirs.append(t)
    return ours, theirs


def clip_both(grads, max_norm, dtype):
    ours, theirs = both(grads, dtype)
    norm = clip_grad_norm(ours, max_norm)
    tnorm = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    return norm, tnorm, [host(p.grad) for p in ours], [t.grad.numpy() for t in theirs]


@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1,
                       max_size=4), scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.0, 10.0),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]))
def test_finite_gradients_clip_as_torch(shapes, scale, max_norm, seed, dtype):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(s) * scale for s in shapes]
    norm, tnorm, ours, theirs = clip_both(grads, max_norm, dtype)
    # minilora sums in float64; torch's float32 norm is rounded to float32
    assert norm == pytest.approx(tnorm, rel=RTOL[dtype])
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=0)
    assert grad_norm(both(grads, dtype)[0]) == norm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e30])
def test_a_nan_gradient_makes_every_gradient_nan_as_torch(dtype, max_norm):
    grads = [np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([np.nan, 1.0, np.inf]), np.ones(3)]
    norm, tnorm, ours, theirs = clip_both(grads, max_norm, dtype)
    assert math.isnan(norm) and math.isnan(tnorm)
    for a, b in zip(ours, theirs):
        assert np.isnan(b).all()  # what torch does...
        np.testing.assert_array_equal(a, b)  # ...and minilora (NaN == NaN here)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e30])
def test_an_inf_gradient_zeroes_the_finite_ones_as_torch(dtype, max_norm):
    grads = [np.array([1.0, -2.0, np.inf]), np.array([[-np.inf, 3.0]]), np.array([-0.25, 0.0])]
    norm, tnorm, ours, theirs = clip_both(grads, max_norm, dtype)
    assert norm == tnorm == math.inf
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)  # NaN where inf was, zeros elsewhere
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))  # -x * 0 = -0 in both
    assert np.isnan(ours[0][2]) and ours[0][0] == 0.0


def test_below_the_threshold_nothing_changes_as_torch():
    grads = [np.array([0.3, -0.4]), np.array([[1e-3]])]
    norm, tnorm, ours, theirs = clip_both(grads, 10.0, np.float32)
    assert norm == pytest.approx(tnorm, rel=1e-6)
    for a, b, g in zip(ours, theirs, grads):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, g.astype(np.float32))
