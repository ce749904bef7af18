"""Value properties of the fused functional ops: what each must compute, checked against its
definition or a NumPy oracle written independently here."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minilora as ml
from minilora import backend as B
from minilora import functional as F
from minilora.errors import DTypeError, InvalidArgumentError, ShapeError
from tests.helpers import host

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
seeds = st.integers(0, 2**32 - 1)


def t(values, dtype=np.float64) -> ml.Tensor:
    return ml.Tensor(B.asarray(np.asarray(values, dtype=dtype)))


def np_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Oracle in extended precision: no max-shift needed at the magnitudes used here."""
    z = z.astype(np.longdouble)
    return (z - np.log(np.exp(z).sum(axis=axis, keepdims=True))).astype(np.float64)


# ---------------------------------------------------------------------------------- softmax

@given(shape=shapes, seed=seeds, axis_pick=st.integers(0, 3))
def test_softmax_is_a_distribution_along_its_axis(shape, seed, axis_pick):
    axis = -1 - axis_pick % len(shape)
    z = np.random.default_rng(seed).standard_normal(shape) * 5
    y = host(F.softmax(t(z), axis=axis))
    assert (y > 0).all() and (y <= 1).all()
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.log(y), np_log_softmax(z, axis), rtol=1e-10, atol=1e-12)


@given(shape=shapes, seed=seeds, shift=st.floats(-1e3, 1e3))
def test_softmax_and_log_softmax_are_shift_invariant(shape, seed, shift):
    z = np.random.default_rng(seed).standard_normal(shape)
    np.testing.assert_allclose(host(F.softmax(t(z + shift))), host(F.softmax(t(z))),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(host(F.log_softmax(t(z + shift))), host(F.log_softmax(t(z))),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_is_stable_for_large_inputs(dtype):
    z = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4 + 2.0]], dtype=dtype)
    for y in (F.softmax(t(z, dtype)), F.log_softmax(t(z, dtype)).exp()):
        y = host(y)
        assert np.isfinite(y).all() and y.dtype == dtype
        e = math.exp(-1.0)
        np.testing.assert_allclose(y[0], [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-5, atol=1e-7)
        assert y[1, 2] > 0.7
    ls = host(F.log_softmax(t(z, dtype)))
    assert np.isfinite(ls).all()  # no log(0): -2e4 stays finite


@given(shape=shapes, seed=seeds)
def test_log_softmax_equals_log_of_softmax(shape, seed):
    z = t(np.random.default_rng(seed).standard_normal(shape) * 3)
    np.testing.assert_allclose(host(F.log_softmax(z)), np.log(host(F.softmax(z))),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- cross_entropy

@given(lead=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), classes=st.integers(1, 6),
       seed=seeds)
def test_cross_entropy_is_the_mean_of_picked_negative_log_softmax(lead, classes, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(lead + (classes,)) * 3
    targets = rng.integers(0, classes, lead)
    targets[rng.random(lead) < 0.3] = -100
    targets.reshape(-1)[0] = 0  # keep one position counted
    lp = np_log_softmax(z).reshape(-1, classes)
    flat = targets.reshape(-1)
    keep = flat != -100
    expected = -lp[np.flatnonzero(keep), flat[keep]].mean()
    loss = F.cross_entropy(t(z), targets)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-10, atol=1e-14)


def test_cross_entropy_ignore_index_changes_nothing_of_the_kept_positions():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5))
    kept = F.cross_entropy(t(z[:2]), np.array([1, 3])).item()
    assert F.cross_entropy(t(z), np.array([1, 3, -100, -100])).item() == pytest.approx(kept, 1e-12)
    # a custom ignore_index, and the default one then counts as an error
    assert F.cross_entropy(t(z), np.array([1, 3, 7, 7]), ignore_index=7).item() == \
        pytest.approx(kept, 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_all_ignored_is_nan(dtype):
    loss = F.cross_entropy(t(np.zeros((2, 3)), dtype), np.array([-100, -100]))
    assert math.isnan(loss.item()) and loss.dtype == dtype


@pytest.mark.parametrize("bad", [3, -1, -100])
def test_cross_entropy_rejects_targets_out_of_range(bad):
    z = t(np.zeros((2, 3)))
    with pytest.raises(InvalidArgumentError, match=rf"\[0, 3\).*{bad}"):
        F.cross_entropy(z, np.array([0, bad]), ignore_index=-5)


def test_cross_entropy_rejects_float_targets_and_wrong_shapes():
    with pytest.raises(DTypeError, match="float"):
        F.cross_entropy(t(np.zeros((2, 3))), np.array([0.0, 1.0]))
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 1\)"):
        F.cross_entropy(t(np.zeros((2, 3))), np.array([[0], [1]]))


def test_cross_entropy_of_uniform_logits_is_log_classes():
    assert F.cross_entropy(t(np.zeros((3, 7))), np.array([0, 3, 6])).item() == \
        pytest.approx(math.log(7), rel=1e-12)


def test_cross_entropy_of_a_single_row_with_a_scalar_target():
    z = np.array([0.5, -1.0, 2.0])
    loss = F.cross_entropy(t(z), np.array(2))
    assert loss.item() == pytest.approx(-np_log_softmax(z)[2], rel=1e-12)


def test_cross_entropy_accepts_tensor_targets():
    z = np.random.default_rng(1).standard_normal((3, 4))
    a = F.cross_entropy(t(z), ml.Tensor(np.array([0, 1, 2]))).item()
    assert a == F.cross_entropy(t(z), np.array([0, 1, 2])).item()


# ------------------------------------------------------------------------------- layer_norm

@given(lead=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), width=st.integers(2, 16),
       seed=seeds, scale=st.floats(0.1, 100.0), offset=st.floats(-50.0, 50.0))
def test_layer_norm_rows_have_mean_zero_and_unit_variance(lead, width, seed, scale, offset):
    x = np.random.default_rng(seed).standard_normal(lead + (width,)) * scale + offset
    x[..., 0] += scale  # rows are never constant
    y = host(F.layer_norm(t(x), eps=1e-5))
    var = x.var(axis=-1, keepdims=True)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-9)
    # eps shrinks the variance to var / (var + eps), by design
    np.testing.assert_allclose(y.var(axis=-1, keepdims=True), var / (var + 1e-5), rtol=1e-9)


@given(lead=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), width=st.integers(1, 8),
       seed=seeds)
def test_layer_norm_affine_matches_the_formula(lead, width, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (width,))
    w, b = rng.standard_normal(width), rng.standard_normal(width)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(host(F.layer_norm(t(x), t(w), t(b))), expected, rtol=1e-10,
                               atol=1e-12)
    only_bias = host(F.layer_norm(t(x), bias=t(b)))
    np.testing.assert_allclose(only_bias, (expected - b) / w + b, rtol=1e-7, atol=1e-9)


def test_layer_norm_does_not_modify_its_inputs():
    x, w, b = np.arange(6.0).reshape(2, 3), np.ones(3), np.zeros(3)
    tx, tw, tb = t(x), t(w), t(b)
    F.layer_norm(tx, tw, tb)
    F.layer_norm(tx)
    np.testing.assert_array_equal(host(tx), x)
    np.testing.assert_array_equal(host(tw), w)
    np.testing.assert_array_equal(host(tb), b)


# ------------------------------------------------------------------------------------- gelu

@given(shape=shapes, seed=seeds)
def test_gelu_is_the_gpt2_tanh_form(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape) * 4
    c = math.sqrt(2 / math.pi)
    expected = 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(host(F.gelu(t(x))), expected, rtol=1e-12, atol=1e-15)


def test_gelu_is_close_to_x_times_normal_cdf():
    x = np.linspace(-6, 6, 2001)
    exact = x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    err = np.abs(host(F.gelu(t(x))) - exact)
    assert err.max() < 1e-3  # the tanh form is an approximation, good to a few 1e-4
    assert err.max() > 1e-6  # ... and not the exact erf form
    assert host(F.gelu(t([0.0])))[0] == 0.0


# -------------------------------------------------------------------------------- embedding

@given(idx_shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
       vocab=st.integers(1, 10), width=st.integers(1, 4), seed=seeds)
def test_embedding_is_row_indexing(idx_shape, vocab, width, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((vocab, width))
    idx = rng.integers(0, vocab, idx_shape)
    out = F.embedding(idx, t(w))
    assert out.shape == idx_shape + (width,)
    np.testing.assert_array_equal(host(out), w[idx])
    np.testing.assert_array_equal(host(F.embedding(ml.Tensor(idx), t(w))), w[idx])


@pytest.mark.parametrize("bad", [[0, 5], [-1, 2]])
def test_embedding_rejects_indices_out_of_range(bad):
    with pytest.raises(InvalidArgumentError, match=r"\[0, 5\)"):
        F.embedding(np.array(bad), t(np.zeros((5, 2))))


def test_embedding_rejects_float_indices():
    with pytest.raises(DTypeError):
        F.embedding(np.array([0.0, 1.0]), t(np.zeros((5, 2))))


# ---------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keeps_the_expectation(p):
    n = 200_000
    y = host(F.dropout(ml.Tensor(np.ones(n, dtype=np.float32)), p=p))
    assert y.dtype == np.float32
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
    # mean of n scaled Bernoulli(1-p) draws: standard error sqrt(p / ((1-p) n)); allow 5 of them
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(p / ((1 - p) * n))
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_is_identity_in_eval_and_for_p_zero():
    x = ml.Tensor(np.random.default_rng(0).standard_normal((3, 4)))
    for y in (F.dropout(x, 0.5, training=False), F.dropout(x, 0.0)):
        np.testing.assert_array_equal(host(y), host(x))
    assert not host(F.dropout(x, 1.0)).any()


def test_dropout_is_reproducible_from_the_seed():
    x = ml.Tensor(np.ones((4, 8)))
    ml.manual_seed(5)
    a = host(F.dropout(x, 0.5))
    ml.manual_seed(5)
    b = host(F.dropout(x, 0.5))
    c = host(F.dropout(x, 0.5))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(InvalidArgumentError, match="p must lie"):
        F.dropout(ml.Tensor(np.ones(3)), p)


# ----------------------------------------------------------------------------- linear & co

@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), fan_in=st.integers(1, 5),
       fan_out=st.integers(1, 5), seed=seeds)
def test_linear_is_x_times_w_transposed_plus_b(lead, fan_in, fan_out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (fan_in,))
    w, b = rng.standard_normal((fan_out, fan_in)), rng.standard_normal(fan_out)
    out = F.linear(t(x), t(w), t(b))
    assert out.shape == lead + (fan_out,)
    np.testing.assert_allclose(host(out), x @ w.T + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(F.linear(t(x), t(w))), x @ w.T, rtol=1e-12, atol=1e-12)


def test_mse_relu_tanh():
    a, b = np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.5, 0.5])
    assert F.mse_loss(t(a), t(b)).item() == pytest.approx(((a - b) ** 2).mean(), 1e-15)
    np.testing.assert_array_equal(host(F.relu(t(a))), [1.0, 0.0, 3.0])
    np.testing.assert_allclose(host(F.tanh(t(a))), np.tanh(a), rtol=1e-15)


# ------------------------------------------------ index checks of device data, without a sync

DEVICE = B.get_backend() if B.on_device() else "strict"


def test_device_index_checks_raise_their_errors_now_or_when_the_scope_settles():
    """Out-of-range device indices give the host's errors: at once outside a deferred scope, at
    settle() inside one (the kernels in between stay in bounds), and a scope left unsettled reads
    its flags on the way out."""
    from minilora.fast import checks

    w = ml.Tensor(np.random.default_rng(0).standard_normal((5, 3)), requires_grad=True)
    logits = ml.Tensor(np.zeros((2, 4)), requires_grad=True)
    with B.backend(DEVICE):
        w_dev, z_dev = ml.Tensor(B.asarray(w.data)), ml.Tensor(B.asarray(logits.data))
        bad_idx, bad_t = B.asarray(np.array([[0, 7]])), B.asarray(np.array([1, 9]))
        with pytest.raises(InvalidArgumentError, match=r"embedding: .* from 0 to 7"):
            F.embedding(bad_idx, w_dev)
        with pytest.raises(InvalidArgumentError, match=r"found \[9\]"):
            F.cross_entropy(z_dev, bad_t)
        with pytest.raises(InvalidArgumentError, match=r"embedding: .* from 0 to 7"):
            with checks.deferred() as pending:
                out = F.embedding(bad_idx, w_dev)  # waits: no error yet, gathers in bounds
                loss = F.cross_entropy(z_dev, bad_t)
                assert out.shape == (1, 2, 3) and loss.shape == ()
                pending.settle(loss.data)
        with pytest.raises(InvalidArgumentError, match=r"found \[9\]"):
            with checks.deferred():
                F.cross_entropy(z_dev, bad_t)
        with checks.deferred() as pending:  # good data: the values come back as floats
            loss = F.cross_entropy(z_dev, B.asarray(np.array([1, -100])))
            (value,) = pending.settle(loss.data)
        assert value == pytest.approx(math.log(4))
