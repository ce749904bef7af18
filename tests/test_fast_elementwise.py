"""The elementwise fast forms (minilora.fast.elementwise, .norm, .adamw) pinned to the reference
forms they replace, and the switch that chooses between them.

AdamW's fast form does the same operations in the same order on every element, so it must agree
bit for bit. GELU's and LayerNorm's fast forms compute the same equations in another order (a
different but equivalent formula for GELU's derivative, row means as matrix-vector products), so
they agree to a stated tolerance in ulps (units of the dtype's eps) of a scale:
``|fast - reference| <= ulps * eps * scale`` elementwise, the scale being the size of the terms
the result is made of (where they cancel, the result can be much smaller than they are).
"""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import fast
from minilora import functional as F
from minilora.fast import adamw as fast_adamw
from minilora.fast import elementwise, norm
from minilora.nn import Parameter
from minilora.optim import AdamW
from tests.helpers import check_grads, host

# GELU on |x| <= 8: y = x p within ~1 ulp of |x|; the gradient g dy/dx, whose terms (1 - t^2 in
# the reference, 1 - p in the fast form, times a polynomial in x) cancel, within ~3 ulps of
# |g| (1 + |x|)
GELU_ULPS = 16
# LayerNorm with row means up to 10 row standard deviations (centring loses up to log2(10)
# bits), against the scale of the terms: up to ~12 ulps seen
LAYER_NORM_ULPS = 64
# column sums: ``ones @ a`` on BLAS against NumPy's pairwise sum, against sum_i |a_ij|: ~2 ulps
COLUMN_SUMS_ULPS = 16

dtypes = st.sampled_from([np.float32, np.float64])


def assert_close(fast_value, reference, ulps: int, what: str, scale=None) -> None:
    """``|fast - reference| <= ulps * eps * scale`` elementwise; ``scale`` max|reference| unless
    given (an array broadcasts). Exact when the scale is 0."""
    fast_value, reference = host(fast_value), host(reference)
    assert fast_value.dtype == reference.dtype and fast_value.shape == reference.shape, what
    if scale is None:
        scale = float(np.abs(reference).max()) if reference.size else 0.0
    bound = ulps * np.finfo(reference.dtype).eps * np.asarray(scale)
    error = np.abs(fast_value.astype(np.float64) - reference)
    assert (error <= bound).all(), f"{what}: {error.max()} > {np.max(bound)} (ulps {ulps})"


def in_both_forms(fn, arrays, needs, weights):
    """``fn(*tensors)`` and the gradients of ``sum(fn * weights)`` with the fast forms on, then
    off: ``[(y, grads), (y, grads)]``; ``needs[i]`` says whether input i requires a gradient."""
    results = []
    for flag in (True, False):
        tensors = [ml.Tensor(B.asarray(a.copy()), requires_grad=n) for a, n in zip(arrays, needs)]
        with fast.forms(flag):
            y = fn(*tensors)
            if y.requires_grad:  # not when every input is frozen
                (y * ml.Tensor(B.asarray(weights))).sum().backward()
        results.append((y, [t.grad for t in tensors]))
    return results


# ------------------------------------------------------------------------------ the switch

def spy(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_reference_really_switches_the_kernels_off(monkeypatch):
    calls = [spy(monkeypatch, elementwise, "gelu"), spy(monkeypatch, norm, "layer_norm"),
             spy(monkeypatch, norm, "column_sums"), spy(monkeypatch, fast_adamw, "adamw_step")]
    x = ml.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    lin = ml.nn.Linear(3, 3)
    ln = ml.nn.LayerNorm(3)
    opt = AdamW(list(lin.parameters()) + list(ln.parameters()))

    def step():
        ln(F.gelu(lin(x))).sum().backward()
        opt.step()
    with fast.reference():
        assert fast.kernel("gelu") is None and not fast.enabled()
        step()
    assert calls == [[], [], [], []]
    with fast.forms(True):
        assert fast.kernel("gelu") is elementwise.gelu
        step()
    # the layer norm's bias gradient is one column sum, the linear layer's another
    assert calls == [["gelu"], ["layer_norm"], ["column_sums"] * 2, ["adamw_step"]]


def test_the_form_is_chosen_when_the_op_is_recorded(monkeypatch):
    """A graph recorded with the fast forms on runs their backward even if the switch is off by
    then (and the other way round): the backward needs what the forward of its form saved."""
    # the device form of the backward on a device, the host one elsewhere
    name = "layer_norm_backward_device" if B.on_device() else "layer_norm_backward"
    calls = spy(monkeypatch, norm, name)
    for record, run in ((True, False), (False, True)):
        x = ml.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
        with fast.forms(record):
            y = F.layer_norm(x)
        with fast.forms(run):
            (y * y).sum().backward()
        assert x.grad is not None
    assert calls == [name]


# ---------------------------------------------------------------------------------- AdamW

def adamw_in_both_forms(shapes, dtype, weight_decay, steps=3, transposed=(), grad_dtype=None,
                        seed=0):
    """Parameters (and their moments) after ``steps`` AdamW steps, with the fast forms on and
    then off, from the same start and gradients."""
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(grad_dtype or dtype) for s in shapes]
             for _ in range(steps)]
    results = []
    for flag in (True, False):
        params = [Parameter(B.asarray(a.T.copy().T if i in transposed else a.copy()))
                  for i, a in enumerate(start)]
        assert not any(params[i].data.flags.c_contiguous for i in transposed)
        opt = AdamW(params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = B.asarray(g)
            with fast.forms(flag):
                opt.step()
        results.append([host(p).copy() for p in params] +
                       [host(s[k]).copy() for s in opt.state for k in ("exp_avg", "exp_avg_sq")])
    return results


def assert_bit_for_bit(results) -> None:
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), f"array {i} differs: max {np.abs(a - b).max()}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_fast_form_equals_the_reference_bit_for_bit(dtype, weight_decay):
    piece = elementwise.PIECE
    # pieces that do not divide the size, a non-contiguous (transposed) parameter, a vector,
    # and in all more than THREADED_FROM elements, so the fast form runs them on threads
    shapes = [(3 * piece + 17,), (5, 7), (700, 400), (1,), (0, 3)]
    assert sum(int(np.prod(s)) for s in shapes) >= fast_adamw.THREADED_FROM
    assert_bit_for_bit(adamw_in_both_forms(shapes, dtype, weight_decay, transposed=(2,)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_below_the_threading_threshold_and_with_a_wider_gradient(dtype):
    shapes = [(piece,) for piece in (elementwise.PIECE + 1, 3)] + [(40, 30)]
    assert sum(int(np.prod(s)) for s in shapes) < fast_adamw.THREADED_FROM
    assert_bit_for_bit(adamw_in_both_forms(shapes, dtype, 0.01, transposed=(2,)))
    # a float64 gradient on a float32 parameter is cast to the parameter's dtype in both forms
    results = adamw_in_both_forms(shapes, np.float32, 0.01, grad_dtype=np.float64)
    assert all(a.dtype == np.float32 for a in results[0])
    assert_bit_for_bit(results)


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), piece=st.integers(1, 64),
       threshold=st.sampled_from([0, 1 << 40]), dtype=dtypes,
       weight_decay=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16))
def test_adamw_in_any_pieces_on_any_threads_equals_the_reference(sizes, piece, threshold, dtype,
                                                                  weight_decay, seed):
    with mock.patch.object(elementwise, "PIECE", piece), \
            mock.patch.object(fast_adamw, "THREADED_FROM", threshold):
        assert_bit_for_bit(adamw_in_both_forms([(n,) for n in sizes], dtype, weight_decay,
                                               steps=2, seed=seed))


def test_adamw_fast_form_uses_threads_from_the_threshold(monkeypatch):
    groups = []
    real = fast_adamw.cpu.for_each_in_threads
    monkeypatch.setattr(fast_adamw.cpu, "for_each_in_threads",
                        lambda fn, sizes, threads: groups.append(threads) or
                        real(fn, sizes, threads))
    monkeypatch.setattr(fast_adamw.cpu, "available_cpus", lambda: 2)
    for threshold in (10, 11):
        monkeypatch.setattr(fast_adamw, "THREADED_FROM", threshold)
        adamw_in_both_forms([(4,), (6,)], np.float32, 0.0, steps=1)
    # threads are the CPU's way; a device updates each parameter in one kernel
    assert groups == ([] if B.on_device() else [2, 1])


# ----------------------------------------------------------------------------------- GELU

def assert_gelu_close(x, g, y_fast, y_ref, g_fast, g_ref) -> None:
    """The two forms' y within GELU_ULPS of |x|, their gradients g dy/dx of |g| (1 + |x|)."""
    x64, g64 = np.abs(x.astype(np.float64)), np.abs(g.astype(np.float64))
    assert_close(y_fast, y_ref, GELU_ULPS, "gelu", scale=x64)
    assert_close(g_fast, g_ref, GELU_ULPS, "gelu gradient", scale=g64 * (1.0 + x64))


@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dtype=dtypes,
       scale=st.floats(0.01, 4.0), seed=st.integers(0, 2**16))
def test_gelu_fast_form_matches_the_reference(shape, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    x = np.clip(rng.standard_normal(shape) * scale, -8, 8).astype(dtype)
    weights = rng.uniform(-1, 1, shape).astype(dtype)
    (y_fast, [g_fast]), (y_ref, [g_ref]) = in_both_forms(F.gelu, [x], [True], weights)
    assert_gelu_close(x, weights, y_fast, y_ref, g_fast, g_ref)


@pytest.mark.parametrize("piece", [5, 13, 1 << 16])
def test_gelu_fast_form_across_piece_boundaries_and_non_contiguous_input(monkeypatch, piece):
    monkeypatch.setattr(elementwise, "PIECE", piece)  # 13 elements: pieces of 5, 5 and 3
    x = np.random.default_rng(0).standard_normal((13,)) * 3
    with fast.forms(True):
        check_grads(F.gelu, [x])
        check_grads(F.gelu, [x.reshape(1, 13)[:, ::-1]])  # a non-contiguous input
    weights = np.random.default_rng(1).standard_normal(13)
    (y_fast, [g_fast]), (y_ref, [g_ref]) = in_both_forms(F.gelu, [x], [True], weights)
    assert_gelu_close(x, weights, y_fast, y_ref, g_fast, g_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_fast_form_in_the_tails_is_the_reference_without_a_warning(dtype):
    # far out the sigmoid's exp(-2v) overflows to inf (p = 0) or underflows to 0 (p = 1): the
    # reference's tanh saturates at -1 or 1 there, so both give y = -0 / x and dy/dx = 0 / 1
    x = np.array([-1e4, -300.0, -60.0, -12.0, 12.0, 60.0, 300.0, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would be a RuntimeWarning
        y, dydx = (host(v) for v in elementwise.gelu(B.asarray(x), True))
    with fast.reference():
        y_ref = host(F.gelu(ml.Tensor(B.asarray(x))).data)
    assert_close(y, y_ref, GELU_ULPS, "gelu in the tails", scale=np.abs(x))  # -0 or ~1e-61
    assert_close(dydx, np.where(x > 0, 1.0, 0.0).astype(dtype), GELU_ULPS, "its derivative")
    # infinities and NaN as the reference has them: -inf * 0 is NaN in both forms
    x = np.array([-np.inf, np.inf, np.nan], dtype=dtype)
    with np.errstate(all="ignore"):
        y = host(elementwise.gelu(B.asarray(x), False)[0])
        with fast.reference():
            y_ref = host(F.gelu(ml.Tensor(B.asarray(x))).data)
    np.testing.assert_array_equal(y, y_ref)


def test_gelu_kernel_keeps_float32_and_skips_the_derivative_when_not_needed():
    x = B.asarray(np.linspace(-4, 4, 70007, dtype=np.float32).reshape(7, 10001))
    y, dydx = elementwise.gelu(x, True)
    assert y.dtype == dydx.dtype == np.float32 and y.shape == dydx.shape == (7, 10001)
    with fast.reference():  # float32 within float32's precision of the float64 reference
        exact = F.gelu(ml.Tensor(x.astype(np.float64)))
    np.testing.assert_allclose(host(y), host(exact), rtol=1e-5, atol=1e-6)
    y2, none = elementwise.gelu(x, False)
    assert none is None and np.array_equal(host(y2), host(y))
    with fast.forms(True), ml.no_grad():  # no graph, so no derivative either
        with mock.patch.object(elementwise, "gelu", wraps=elementwise.gelu) as kernel:
            F.gelu(ml.Tensor(x, requires_grad=True))
        assert kernel.call_args.args[1] is False


# ------------------------------------------------------------------------------ LayerNorm

def rows_with_mean(rng, shape, offset: float, scale: float):
    """Rows of exactly zero mean and unit standard deviation (constant rows of width 1), shifted
    by ``offset`` and multiplied by ``scale``: the row mean is ``offset`` standard deviations."""
    z = rng.standard_normal(shape)
    if shape[-1] > 1:
        z -= z.mean(axis=-1, keepdims=True)
        z /= z.std(axis=-1, keepdims=True)
    else:
        z[...] = 0.0
    return (z + offset) * scale


@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), width=st.integers(1, 80),
       affine=st.sampled_from(["both", "weight", "bias", "none"]),
       needs=st.tuples(st.booleans(), st.booleans(), st.booleans()), dtype=dtypes,
       scale=st.floats(0.01, 100.0), offset=st.floats(-10.0, 10.0), seed=st.integers(0, 2**16))
def test_layer_norm_fast_form_matches_the_reference(lead, width, affine, needs, dtype, scale,
                                                    offset, seed):
    rng = np.random.default_rng(seed)
    shape = (*lead, width)
    x = rows_with_mean(rng, shape, offset, scale).astype(dtype)
    w = rng.standard_normal(width).astype(dtype) if affine in ("both", "weight") else None
    b = rng.standard_normal(width).astype(dtype) if affine in ("both", "bias") else None
    arrays = [a for a in (x, w, b) if a is not None]
    need = [n for a, n in zip((x, w, b), needs) if a is not None]

    def fn(x, *params):
        kw = dict(zip([k for k, a in (("weight", w), ("bias", b)) if a is not None], params))
        return F.layer_norm(x, eps=1e-5, **kw)
    g = rng.uniform(-1, 1, shape).astype(dtype)
    (y_fast, g_fast), (y_ref, g_ref) = in_both_forms(fn, arrays, need, g)

    # the scales, in float64: xhat * w + b, and for the gradients the terms they sum:
    # r * gh (gh = g * w), g * xhat and g summed over the rows
    x64 = x.astype(np.float64).reshape(-1, width)
    r = 1.0 / np.sqrt(x64.var(axis=1, keepdims=True) + 1e-5)
    xhat = (x64 - x64.mean(axis=1, keepdims=True)) * r
    w64 = np.ones(width) if w is None else w.astype(np.float64)
    b64 = np.zeros(width) if b is None else np.abs(b.astype(np.float64))
    g2 = g.astype(np.float64).reshape(-1, width)
    scales = [np.max(r * np.abs(g2 * w64)), np.max(np.abs(g2 * xhat).sum(axis=0)),
              np.max(np.abs(g2).sum(axis=0))]
    assert_close(y_fast, y_ref, LAYER_NORM_ULPS, "layer_norm",
                 scale=np.max(np.abs(xhat * w64) + b64))
    names = [n for n, a in (("x", x), ("weight", w), ("bias", b)) if a is not None]
    for name, a, c, n in zip(names, g_fast, g_ref, need):
        if n:
            scale = scales[("x", "weight", "bias").index(name)]
            assert_close(a, c, LAYER_NORM_ULPS, f"layer_norm gradient of {name}", scale=scale)
        else:  # a frozen input gets no gradient in either form
            assert a is None and c is None


@pytest.mark.parametrize("flag", [True, False])
def test_layer_norm_gradients_in_both_forms_match_finite_differences(flag):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    with fast.forms(flag):
        check_grads(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b])
        check_grads(lambda x: F.layer_norm(x, eps=1e-3), [x * 4 + 1])


def test_layer_norm_fast_backward_does_only_the_work_asked_for():
    x2 = B.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    w = B.asarray(np.ones(6))
    y, backward = norm.layer_norm(x2, w, None, 1e-5)
    assert backward(x2, False, False, False) == (None, None, None)
    gx, gw, gb = backward(x2, True, True, True)
    assert gx.shape == (4, 6) and gw.shape == (6,) and gb.shape == (6,)
    assert norm.layer_norm(x2, None, None, 1e-5)[1](x2, False, True, False)[1] is None


# ---------------------------------------------------------------------------- column sums

@given(rows=st.integers(0, 400), cols=st.integers(1, 50), dtype=dtypes,
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_column_sums_match_numpy_sums(rows, cols, dtype, scale, seed):
    a = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(dtype)
    assert_close(norm.column_sums(B.asarray(a)), a.sum(axis=0), COLUMN_SUMS_ULPS, "column sums",
                 scale=np.abs(a.astype(np.float64)).sum(axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_bias_gradient_in_both_forms(dtype):
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((3, 50, 4), (6, 4), (6,)))
    weights = rng.standard_normal((3, 50, 6)).astype(dtype)
    (y_fast, g_fast), (y_ref, g_ref) = in_both_forms(F.linear, [x, w, b], [True, False, True],
                                                     weights)
    assert np.array_equal(host(y_fast), host(y_ref))
    assert g_fast[1] is None and g_ref[1] is None  # a frozen weight: no gradient matmul
    np.testing.assert_array_equal(host(g_fast[0]), host(g_ref[0]))
    assert_close(g_fast[2], g_ref[2], COLUMN_SUMS_ULPS, "bias gradient",
                 scale=np.abs(weights.astype(np.float64)).reshape(-1, 6).sum(axis=0))


# --------------------------------------------------- the device forms against the host forms
#
# On a device the fast forms fuse their elementwise chains into single kernels
# (minilora.fast.device). Each kernel does its host form's operations in the same order and
# type, so on the strict stand-in the two give the same bits; on a GPU its exp/tanh/sqrt round
# on their own, and the kernels are held to the reference's tolerances instead. These tests run
# the device forms on the run's device, or on the strict stand-in when the run is on NumPy.

DEVICE = B.get_backend() if B.on_device() else "strict"


def on_host_and_device(fn, *arrays):
    """``fn(*arrays)`` with the fast forms on, on NumPy and on the device, as host arrays (None
    stays None): ``(host results, device results)``."""
    out = []
    for name in ("numpy", DEVICE):
        with B.backend(name), fast.forms(True):
            result = fn(*[None if a is None else B.asarray(a.copy()) for a in arrays])
            out.append([None if r is None else B.to_numpy(r) for r in result])
    return out


def assert_device_matches(host_values, device_values, ulps: int, what: str) -> None:
    """Bit for bit on the strict stand-in; within ``ulps`` of the values' scale on a GPU."""
    for i, (h, d) in enumerate(zip(host_values, device_values)):
        if h is None:
            assert d is None, f"{what} {i}"
        elif DEVICE == "strict":
            same = h.dtype == d.dtype and np.array_equal(h, d, equal_nan=True)
            assert same, f"{what} {i}: not the same bits"
        else:
            assert_close(d, h, ulps, f"{what} {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("needs_grad", [True, False])
def test_gelu_device_kernel_is_the_host_form(dtype, needs_grad):
    x = np.clip(np.random.default_rng(0).standard_normal((7, 33)) * 3, -8, 8).astype(dtype)
    host_values, device_values = on_host_and_device(
        lambda x: elementwise.gelu(x, needs_grad), x)
    assert (device_values[1] is None) == (not needs_grad)
    assert_device_matches(host_values, device_values, GELU_ULPS, "gelu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm_device_kernels_are_the_host_form(dtype, affine):
    rng = np.random.default_rng(1)
    x = rows_with_mean(rng, (9, 24), 3.0, 2.0).astype(dtype)
    w = rng.standard_normal(24).astype(dtype) if affine in ("both", "weight") else None
    b = rng.standard_normal(24).astype(dtype) if affine in ("both", "bias") else None
    g = rng.standard_normal((9, 24)).astype(dtype)

    def forward_backward(x, w, b, g):
        y, backward = norm.layer_norm(x, w, b, 1e-5)
        return (y, *backward(g, True, True, True))
    host_values, device_values = on_host_and_device(forward_backward, x, w, b, g)
    # the bias gradient is a column sum: ones @ g on the CPU, the reduction itself on a device
    column = host_values.pop(), device_values.pop()
    assert_device_matches(host_values, device_values, LAYER_NORM_ULPS, "layer_norm")
    assert_close(column[1], g.sum(axis=0), COLUMN_SUMS_ULPS, "bias gradient",
                 scale=np.abs(g.astype(np.float64)).sum(axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37), (0.1, np.nan)])
def test_adamw_device_kernel_is_the_host_form(dtype, weight_decay, grad_scale):
    """One kernel per parameter on the device, the host form's bits; a NaN scale (a NaN
    gradient norm's clipping coefficient) makes NaN in both."""
    rng = np.random.default_rng(2)
    p, m, v = (rng.standard_normal((5, 7)).astype(dtype) for _ in range(3))
    v = np.abs(v)
    grad = rng.standard_normal((5, 7)).astype(np.float64)  # a wider gradient is cast first

    def update(p, grad, m, v):
        fast_adamw.adamw_step([(p, grad, m, v, 3e-3, 0.9, 0.99, 1e-8, weight_decay, 4,
                                grad_scale)])
        return p, m, v
    host_values, device_values = on_host_and_device(update, p, grad, m, v)
    assert_device_matches(host_values, device_values, 4, "adamw")
    assert np.isnan(host_values[0]).all() == np.isnan(grad_scale)


def test_adamw_reference_form_with_a_gradient_scale_is_clipping_first():
    """step(grad_scale=c) is clip-then-step: the update of the gradients multiplied by c, with
    p.grad left as it was."""
    rng = np.random.default_rng(3)
    start, grad = rng.standard_normal((4, 3)).astype(np.float32), \
        rng.standard_normal((4, 3)).astype(np.float32)
    results = []
    for scaled in (True, False):
        for flag in (True, False):
            p = Parameter(B.asarray(start.copy()))
            p.grad = B.asarray(grad.copy() if scaled else grad * np.float32(0.25))
            with fast.forms(flag):
                AdamW([p], lr=1e-2).step(grad_scale=0.25 if scaled else 1.0)
            if scaled:
                np.testing.assert_array_equal(host(p.grad), grad)  # left as it was
            results.append(host(p.data).copy())
    assert all(np.array_equal(r, results[0]) for r in results)


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       wide_grad=st.booleans(), weight_decay=st.sampled_from([0.0, 0.1]),
       missing=st.integers(-1, 4), seed=st.integers(0, 2**16))
def test_adamw_over_flat_buffers_on_the_device_is_the_per_parameter_update(
        sizes, wide_grad, weight_decay, missing, seed):
    """On a device a group's parameters of one dtype are updated as one flat buffer
    (fast.adamw.FlatSet): the same bits as the host's per-parameter form, over steps where every
    parameter has a gradient, where one lacks it (those steps fall back to one update each),
    after a state_dict round trip (new moment arrays, copied back in) and after a parameter's
    array was replaced."""
    rng = np.random.default_rng(seed)
    shapes = [(n,) if i % 2 else (n, 3) for i, n in enumerate(sizes)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float64 if wide_grad else np.float32)
              for s in shapes] for _ in range(5)]
    replaced = rng.standard_normal(shapes[-1]).astype(np.float32)
    results = []
    for name in ("numpy", DEVICE):
        with B.backend(name), fast.forms(True):
            params = [Parameter(B.asarray(a.copy())) for a in start]
            groups = [{"params": params[::2], "weight_decay": weight_decay},
                      {"params": params[1::2], "weight_decay": 0.0}]
            opt = AdamW(groups, lr=3e-3, betas=(0.9, 0.99))
            for step, step_grads in enumerate(grads):
                for i, (p, g) in enumerate(zip(params, step_grads)):
                    p.grad = None if step == 2 and i == missing else B.asarray(g)
                if step == 3:
                    opt.load_state_dict(opt.state_dict())
                    params[-1].data = B.asarray(replaced.copy())
                opt.step(grad_scale=0.5 if step == 1 else 1.0)
            results.append([host(p.data).copy() for p in params]
                           + [host(s[k]).copy() for s in opt.state for k in sorted(s)])
    assert_bit_for_bit(results)


@pytest.mark.parametrize("piece", [5, 13, 1 << 16])
def test_gelu_over_its_input_gives_the_same_bits_and_writes_the_derivative_there(monkeypatch,
                                                                                 piece):
    monkeypatch.setattr(elementwise, "PIECE", piece)
    x = B.asarray((np.random.default_rng(2).standard_normal((3, 13)) * 3).astype(np.float32))
    y, d = elementwise.gelu(x, True)
    mine = x.copy()
    y2, d2 = elementwise.gelu(mine, True, overwrite=True)
    assert np.array_equal(host(y2), host(y)) and np.array_equal(host(d2), host(d))
    if not B.on_device():  # on the CPU the derivative took the input's place
        assert np.shares_memory(d2, mine) and np.array_equal(mine, host(d))
    # a view that is not contiguous is left alone (a copy is made, as without overwrite)
    wide = B.asarray(np.random.default_rng(3).standard_normal((4, 26)).astype(np.float32))
    before = host(wide).copy()
    y3, d3 = elementwise.gelu(wide[:, ::2], True, overwrite=True)
    assert np.array_equal(host(wide), before)
    y4, d4 = elementwise.gelu(B.xp.ascontiguousarray(wide[:, ::2]), True)
    assert np.array_equal(host(y3), host(y4)) and np.array_equal(host(d3), host(d4))
