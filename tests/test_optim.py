"""minilora.optim: AdamW and SGD against plain NumPy re-implementations of their formulas,
frozen and gradient-less parameters, clipping, the schedule, and optimizer state round trips."""

import json
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import fast
from minilora import functional as F
from minilora.errors import (
    ConfigError,
    DTypeError,
    InvalidArgumentError,
    ShapeError,
    StateDictError,
)
from minilora.fast import adamw as fast_adamw
from minilora.fast import elementwise
from minilora.nn import Linear, Parameter, Sequential, Tanh
from minilora.optim import SGD, AdamW, clip_grad_norm, clip_grad_norm_, grad_norm, warmup_cosine
from tests.helpers import host


def adamw_reference(p0, grads, lr, betas, eps, wd):
    """torch.optim.AdamW's update, written out in float64; returns the parameter after each step."""
    p = np.array(p0, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = betas
    out = []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


def sgd_reference(p0, grads, lr, momentum, wd):
    """torch.optim.SGD (no dampening, no Nesterov) in float64."""
    p = np.array(p0, dtype=np.float64)
    buf = None
    out = []
    for g in grads:
        d = g + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = buf
        p = p - lr * d
        out.append(p)
    return out


def param(arr):
    return Parameter(B.asarray(np.array(arr)))


def run(opt, p, grads):
    out = []
    for g in grads:
        p.grad = B.asarray(g.astype(p.data.dtype))
        opt.step()
        out.append(host(p).copy())
    return out


# ---------------------------------------------------------------------------------- AdamW

@given(lr=st.floats(1e-4, 0.1), b1=st.floats(0.0, 0.99), b2=st.floats(0.9, 0.9999),
       eps=st.sampled_from([1e-8, 1e-6, 1e-10]), wd=st.floats(0.0, 0.2),
       seed=st.integers(0, 2**16))
def test_adamw_matches_reference(lr, b1, b2, eps, wd, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) * 10.0 ** rng.uniform(-3, 1) for _ in range(5)]
    p = param(p0)
    got = run(AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), p, grads)
    for k, (a, b) in enumerate(zip(got, adamw_reference(p0, grads, lr, (b1, b2), eps, wd))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"step {k + 1}")


def test_adamw_float32_stays_float32_even_with_numpy_settings():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(50).astype(np.float32)
    grads = [rng.standard_normal(50) for _ in range(4)]
    p = Parameter(B.asarray(p0.copy()))
    opt = AdamW([p], lr=np.float64(1e-2), betas=(np.float64(0.9), np.float64(0.99)),
                weight_decay=np.float64(0.1))
    got = run(opt, p, grads)
    assert p.dtype == np.float32
    assert all(v.dtype == np.float32 for v in opt.state[0].values())
    # settings are stored as Python floats, which never upcast a float32 array
    g = opt.param_groups[0]
    assert type(g["lr"]) is float and all(type(b) is float for b in g["betas"])
    ref = adamw_reference(p0, grads, 1e-2, (0.9, 0.99), 1e-8, 0.1)
    np.testing.assert_allclose(got[-1], ref[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast_forms", [True, False])
@pytest.mark.parametrize("shape,transposed", [((700, 300), False), ((300, 700), True),
                                               ((5,), False), ((0, 3), False)])
def test_adamw_equals_the_whole_array_update_bit_for_bit(shape, transposed, fast_forms):
    """Both forms of the update (the fast one in pieces of fast.elementwise.PIECE elements)
    against the same operations on whole float32 arrays, written out here; a transposed
    (non-contiguous) parameter takes the fast form's one-piece path."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal(shape).astype(np.float32)
    p = Parameter(B.asarray(data.T if transposed else data))
    ref = host(p).copy()
    m, v = np.zeros_like(ref), np.zeros_like(ref)
    opt = AdamW([p], lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for t in range(1, 4):
        g = rng.standard_normal(ref.shape).astype(np.float32)
        p.grad = B.asarray(g)
        with fast.forms(fast_forms):
            opt.step()
        ref *= 1.0 - 3e-3 * 0.1
        m *= 0.9
        m += (1.0 - 0.9) * g
        v *= 0.99
        v += (1.0 - 0.99) * g * g
        denom = np.sqrt(v)
        denom /= math.sqrt(1.0 - 0.99**t)
        denom += 1e-8
        ref -= 3e-3 / (1.0 - 0.9**t) * m / denom
        assert np.array_equal(host(p), ref), f"step {t}"
    assert elementwise.PIECE < 300 * 300  # the large shapes really are cut into pieces


def test_frozen_parameters_get_no_state_and_do_not_move():
    mlp = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    mlp[0].requires_grad_(False)
    frozen = [host(p).copy() for p in mlp[0].parameters()]
    opt = AdamW(mlp.parameters(), lr=0.1, weight_decay=0.5)
    assert len(opt.state) == 2  # only the second layer's weight and bias
    for _ in range(3):
        opt.zero_grad()
        mlp(ml.Tensor(np.ones((2, 3), np.float32))).sum().backward()
        mlp[0].weight.grad = B.asarray(np.ones((4, 3), np.float32))  # a stray gradient: ignored
        opt.step()
    for before, p in zip(frozen, mlp[0].parameters()):
        np.testing.assert_array_equal(host(p), before)
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in opt.state)


def test_parameters_without_grad_are_skipped_and_count_their_own_steps():
    """As torch: a parameter's bias correction counts only the steps it took part in."""
    rng = np.random.default_rng(0)
    a0, b0 = rng.standard_normal(5), rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(3)]
    a, b = param(a0), param(b0)
    opt = AdamW([a, b], lr=0.05, weight_decay=0.1)
    a.grad = B.asarray(grads[0])  # step 1: b has no gradient
    opt.step()
    np.testing.assert_array_equal(host(b), b0)  # no decay either
    assert opt.state[1] == {} and opt.param_steps == [1, 0]
    for g in grads[1:]:
        a.grad, b.grad = B.asarray(g), B.asarray(g)
        opt.step()
    assert opt.param_steps == [3, 2] and opt.step_count == 3
    np.testing.assert_allclose(host(a), adamw_reference(a0, grads, 0.05, (0.9, 0.999), 1e-8,
                                                        0.1)[-1], rtol=1e-12)
    np.testing.assert_allclose(host(b), adamw_reference(b0, grads[1:], 0.05, (0.9, 0.999), 1e-8,
                                                        0.1)[-1], rtol=1e-12)


def test_param_groups_with_their_own_settings():
    """With zero gradients AdamW's step is pure decay: p (1 - lr wd), exactly, group by group."""
    p1, p2, p3 = param(np.ones(3)), param(np.ones(3)), param(np.ones(3))
    opt = AdamW([{"params": [p1], "weight_decay": 0.0},
                 {"params": (p for p in [p2])},  # a generator is fine
                 {"params": [p3], "lr": 0.5, "weight_decay": 0.2}], lr=0.1, weight_decay=0.1)
    for p in (p1, p2, p3):
        p.grad = B.asarray(np.zeros(3))
    opt.step()
    np.testing.assert_array_equal(host(p1), np.ones(3))
    np.testing.assert_array_equal(host(p2), np.full(3, 1 - 0.1 * 0.1))
    np.testing.assert_array_equal(host(p3), np.full(3, 1 - 0.5 * 0.2))
    opt.set_lr(0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01] * 3


def test_optimizer_zero_grad():
    p = param(np.ones(2))
    p.grad = B.asarray(np.ones(2))
    opt = SGD([p], lr=0.1)
    opt.step()
    opt.zero_grad()
    assert p.grad is None
    np.testing.assert_allclose(host(p.data), 0.9)  # stepped with the gradient it had


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(betas=(0.9, 0.99, 0.9)), "betas"),
])
def test_adamw_rejects_invalid_settings(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        AdamW([param(np.ones(2))], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_sgd_rejects_invalid_settings(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SGD([param(np.ones(2))], **kwargs)


def test_invalid_parameter_lists():
    p = param(np.ones(2))
    with pytest.raises(InvalidArgumentError, match="empty"):
        AdamW([])
    with pytest.raises(InvalidArgumentError, match="Tensors"):
        AdamW([p, np.ones(2)])
    with pytest.raises(InvalidArgumentError, match="unknown group settings.*'momentum'"):
        AdamW([{"params": [p], "momentum": 0.9}])
    with pytest.raises(InvalidArgumentError, match="more than once"):
        AdamW([p, p])
    with pytest.raises(InvalidArgumentError, match="more than once"):
        AdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(InvalidArgumentError, match="lr"):
        AdamW([p]).set_lr(-0.1)


@pytest.mark.host_only("a rate is refused before any array work")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3, "0.1", True, None])
@pytest.mark.parametrize("make", [
    lambda p, v: AdamW([p], lr=v), lambda p, v: AdamW([p], eps=v),
    lambda p, v: AdamW([p], weight_decay=v), lambda p, v: SGD([p], lr=v),
    lambda p, v: SGD([p], momentum=v), lambda p, v: AdamW([{"params": [p], "lr": v}]),
    lambda p, v: SGD([{"params": [p], "weight_decay": v}]), lambda p, v: AdamW([p]).set_lr(v)])
def test_a_rate_that_is_not_a_finite_number_at_least_0_is_refused_by_name(make, bad):
    # a NaN learning rate passed "lr < 0" and turned every weight to NaN at the first step
    p = param(np.ones(2))
    with pytest.raises(InvalidArgumentError, match="must be a finite number >= 0") as err:
        make(p, bad)
    assert repr(bad) in str(err.value)


# ------------------------------------------------------------------------------------ SGD

@given(lr=st.floats(1e-3, 0.5), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       wd=st.sampled_from([0.0, 1e-2, 0.1]), seed=st.integers(0, 2**16))
def test_sgd_matches_reference(lr, momentum, wd, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal((2, 3))
    grads = [rng.standard_normal((2, 3)) for _ in range(5)]
    p = param(p0)
    got = run(SGD([p], lr=lr, momentum=momentum, weight_decay=wd), p, grads)
    for a, b in zip(got, sgd_reference(p0, grads, lr, momentum, wd)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_sgd_momentum_buffer_is_not_the_gradient():
    p = param(np.zeros(2))
    g = B.asarray(np.ones(2))
    p.grad = g
    opt = SGD([p], lr=1.0, momentum=0.9)
    opt.step()
    opt.step()  # buf = 0.9 * 1 + 1; had the buffer aliased p.grad, the gradient would change
    np.testing.assert_array_equal(host(g), np.ones(2))
    np.testing.assert_allclose(host(p), -np.full(2, 1 + 1.9))


# ------------------------------------------------------------------------------- clipping

@given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.01, 10.0), seed=st.integers(0, 2**16))
def test_clip_grad_norm(scale, max_norm, seed):
    rng = np.random.default_rng(seed)
    params = [param(rng.standard_normal(s)) for s in [(3, 2), (4,), (1,)]]
    grads = [rng.standard_normal(p.shape) * scale for p in params]
    for p, g in zip(params, grads):
        p.grad = B.asarray(g.copy())
    params.append(param(np.ones(2)))  # grad None: ignored
    norm = clip_grad_norm(params, max_norm)
    expected = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=1e-12)
    after = [host(p.grad) for p in params[:3]]
    new_norm = math.sqrt(sum(float((g**2).sum()) for g in after))
    if expected > max_norm:
        coef = max_norm / (expected + 1e-6)  # PyTorch's 1e-6 guard lands it just under
        assert new_norm <= max_norm
        assert new_norm == pytest.approx(expected * coef, rel=1e-12)
        for g0, g1 in zip(grads, after):  # one common factor: the direction is kept
            np.testing.assert_allclose(g1, g0 * coef, rtol=1e-12)
    else:  # below the threshold nothing is touched, bit for bit
        for g0, g1 in zip(grads, after):
            np.testing.assert_array_equal(g1, g0)


def test_clip_grad_norm_edge_cases():
    p = Parameter(B.asarray(np.ones(4, np.float32)))
    assert clip_grad_norm([p], 1.0) == 0.0  # no gradients at all
    p.grad = B.asarray(np.full(4, 3.0, np.float32))
    assert clip_grad_norm(iter([p]), 1.0) == pytest.approx(6.0)
    assert p.grad.dtype == np.float32
    np.testing.assert_allclose(host(p.grad), np.full(4, 0.5), rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match="max_norm"):
        clip_grad_norm([p], -1.0)


def _with_grads(grads, dtype=np.float32):
    params = []
    for g in grads:
        p = Parameter(B.asarray(np.zeros(np.shape(g), dtype)))
        p.grad = B.asarray(np.array(g, dtype))
        params.append(p)
    return params


@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=0,
                       max_size=5), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_grad_norm_is_the_global_l2_norm_in_float64(shapes, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]
    params = _with_grads(grads, dtype) + [param(np.ones(2))]  # one without a gradient
    with fast.reference():  # the equation as written: float64 end to end
        norm = grad_norm(params)
        assert isinstance(norm, float)
        # the same float as the gradients laid end to end in float64, squared and summed
        flat = np.concatenate([g.reshape(-1) for g in grads] + [np.zeros(0)]).astype(np.float64)
        assert norm == math.sqrt(float(np.square(flat).sum()))
        assert norm == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)
        for p, g in zip(params, grads):  # read only
            np.testing.assert_array_equal(host(p.grad), g)
        assert grad_norm(iter(params)) == norm  # a generator works too
        if params[:-1]:
            assert clip_grad_norm(params, norm * 2 + 1.0) == norm  # and clipping returns it
    with fast.forms(True):  # the fast form: the same number to float32's rounding
        assert grad_norm(params) == pytest.approx(norm, rel=1e-6, abs=0.0)


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), piece=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_grad_norm_in_pieces_adds_the_pieces_sums_in_order(sizes, piece, seed):
    """Laid end to end at most NORM_PIECE elements at a time (a larger gradient cut into runs of
    NORM_PIECE), each piece summed on its own and the sums added in order; the array form is the
    same number."""
    from minilora import optim

    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    params = _with_grads(grads, np.float32)
    runs = [r for g in grads
            for r in ([g] if g.size <= piece else np.split(g, range(piece, g.size, piece)))]
    pieces, size = [[]], 0
    for r in runs:
        if pieces[-1] and size + r.size > piece:
            pieces.append([])
            size = 0
        pieces[-1].append(r.astype(np.float64))
        size += r.size
    assert max(sum(p.size for p in ps) for ps in pieces) <= piece
    total = None
    for p in pieces:
        part = np.square(np.concatenate(p)).sum()
        total = part if total is None else total + part
    with mock.patch.object(optim, "NORM_PIECE", piece), fast.reference():
        assert grad_norm(params) == math.sqrt(float(total))
        assert float(B.to_numpy(optim.norm_array(params))) == math.sqrt(float(total))


def test_grad_norm_of_a_single_tensor_and_of_none():
    p = Parameter(B.asarray(np.ones(3, np.float32)))
    assert grad_norm([p]) == 0.0 and grad_norm([]) == 0.0
    p.grad = B.asarray(np.array([3.0, 0.0, 4.0], np.float32))
    assert grad_norm(p) == 5.0 and clip_grad_norm_(p, 10.0) == 5.0


def test_clip_grad_norm_with_a_nan_norm_makes_every_gradient_nan():
    """As torch.nn.utils.clip_grad_norm_ (error_if_nonfinite=False): coef = min(NaN, 1) = NaN
    multiplies every gradient, the finite ones included."""
    grads = [np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([np.nan, 1.0, np.inf]), np.ones(3)]
    params = _with_grads(grads)
    norm = clip_grad_norm(params, 1.0)
    assert math.isnan(norm)
    for p in params:
        assert p.grad.dtype == np.float32 and np.isnan(host(p.grad)).all()
    assert math.isnan(grad_norm(_with_grads(grads)))


def test_clip_grad_norm_with_an_inf_norm_multiplies_by_zero():
    """coef = max_norm / (inf + 1e-6) = 0: finite entries become (signed) zeros and the inf
    entries NaN (inf * 0), without a warning; the inf norm is returned."""
    import warnings

    grads = [np.array([1.0, -2.0, np.inf]), np.array([[-np.inf, 3.0]]), np.array([0.25])]
    params = _with_grads(grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm = clip_grad_norm(params, 1.0)
    assert norm == math.inf and grad_norm(_with_grads(grads)) == math.inf
    for p, g in zip(params, grads):
        after = host(p.grad)
        np.testing.assert_array_equal(np.isnan(after), np.isinf(g))
        finite = np.isfinite(g)
        np.testing.assert_array_equal(after[finite], 0.0)
        np.testing.assert_array_equal(np.signbit(after[finite]), np.signbit(g[finite]))


# ------------------------------------------------------------------------------- schedule

@given(warmup=st.integers(0, 30), extra=st.integers(1, 100), max_lr=st.floats(1e-5, 1.0),
       frac=st.floats(0.0, 1.0))
def test_warmup_cosine_shape(warmup, extra, max_lr, frac):
    total = warmup + extra
    min_lr = frac * max_lr
    lrs = [warmup_cosine(s, max_lr, warmup, total, min_lr) for s in range(total + 5)]
    up, down = lrs[:warmup], lrs[warmup:total + 1]
    assert all(a < b for a, b in zip(up, up[1:]))  # strictly up during warmup
    if warmup:
        assert up[0] == pytest.approx(max_lr / warmup) and up[-1] == pytest.approx(max_lr)
    assert all(a >= b for a, b in zip(down, down[1:]))  # never up after it
    assert lrs[warmup] == pytest.approx(max_lr)  # the cosine starts at the top
    assert lrs[total] == pytest.approx(min_lr) and lrs[-1] == min_lr  # and ends at the floor
    assert all(0 < lr <= max_lr * (1 + 1e-12) for lr in up)  # warmup may start under min_lr
    assert all(min_lr * (1 - 1e-12) <= lr <= max_lr * (1 + 1e-12) for lr in lrs[warmup:])
    if extra % 2 == 0:  # half way down the cosine is the midpoint
        assert lrs[warmup + extra // 2] == pytest.approx((max_lr + min_lr) / 2)


@pytest.mark.parametrize("args", [
    (-1, 1.0, 10, 100), (0, 1.0, -1, 100), (0, 1.0, 10, 0), (0, 0.1, 10, 100, 0.2),
    (0, 0.1, 10, 100, -0.1),
])
def test_warmup_cosine_rejects_invalid_settings(args):
    with pytest.raises(InvalidArgumentError, match="warmup_cosine"):
        warmup_cosine(*args)


# ------------------------------------------------------------------------- state round trip

def _train(model, opt, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = ml.Tensor(rng.standard_normal((8, 4)).astype(np.float32))
        t = rng.integers(0, 3, size=8)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()


def _make(kind):
    ml.manual_seed(7)
    model = Sequential(Linear(4, 6), Tanh(), Linear(6, 3))
    opt = (AdamW(model.parameters(), lr=3e-2, weight_decay=0.1) if kind == "adamw"
           else SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01))
    return model, opt


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_dict_round_trip_continues_bit_for_bit(kind):
    model, opt = _make(kind)
    _train(model, opt, 3, seed=1)
    model_sd = {k: host(v).copy() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    json.dumps({k: v for k, v in opt_sd.items() if k != "state"})  # the scalars are plain JSON
    _train(model, opt, 3, seed=2)
    expected = {k: host(v).copy() for k, v in model.state_dict().items()}

    for _ in range(2):  # loading the same dict twice works: load copies the arrays
        fresh, fresh_opt = _make(kind)
        _train(fresh, fresh_opt, 1, seed=99)  # some other history, to be overwritten
        fresh.load_state_dict(model_sd)
        fresh_opt.load_state_dict(opt_sd)
        assert fresh_opt.step_count == 3
        _train(fresh, fresh_opt, 3, seed=2)
        for k, v in fresh.state_dict().items():
            np.testing.assert_array_equal(host(v), expected[k], err_msg=k)


def test_state_dict_is_a_copy():
    p = param(np.ones(3))
    opt = AdamW([p], lr=0.1)
    p.grad = B.asarray(np.ones(3))
    opt.step()
    sd = opt.state_dict()
    saved = sd["state"][0]["exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved)


def test_load_state_dict_rejects_mismatches():
    a, b = param(np.ones(3)), param(np.ones((2, 2)))
    opt = AdamW([a, b])
    a.grad, b.grad = B.asarray(np.ones(3)), B.asarray(np.ones((2, 2)))
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(StateDictError, match="holds 2 parameters, this optimizer 1"):
        AdamW([a]).load_state_dict(sd)
    swapped = AdamW([b, a])
    with pytest.raises(StateDictError, match=r"parameter 0 state 'exp_avg' has shape \(3,\)"):
        swapped.load_state_dict(sd)
    assert swapped.state == [{}, {}]  # nothing was loaded


def _forge(sd, how):
    sd = {**sd, "state": [dict(s) for s in sd["state"]]}
    how(sd)
    return sd


FORGED_STATES = {
    "NaN lr": (lambda sd: sd.update(lr=[float("nan")]), "lr of group 0 must be a finite number"),
    "negative lr": (lambda sd: sd.update(lr=[-1.0]), "lr of group 0 must be a finite number"),
    "boolean lr": (lambda sd: sd.update(lr=[True]), "lr of group 0 must be a finite number"),
    "negative step": (lambda sd: sd.update(step=-5), "step must be an int >= 0, got -5"),
    "no step": (lambda sd: sd.pop("step"), "step must be an int >= 0, got None"),
    "negative param step": (lambda sd: sd.update(param_steps=[-1]), r"param_steps\[0\] must be"),
    "no state": (lambda sd: sd.pop("state"), "a dict with a 'state' list"),
    "misspelled moment": (lambda sd: sd["state"][0].update(exp_avgg=sd["state"][0].pop("exp_avg")),
                          r"must be empty or hold \['exp_avg', 'exp_avg_sq'\]"),
    "NaN moment": (lambda sd: sd["state"][0].update(
        exp_avg_sq=np.full(3, np.nan, np.float32)), "'exp_avg_sq' holds NaN or inf"),
}


@pytest.mark.parametrize("case", list(FORGED_STATES))
def test_load_state_dict_refuses_a_forged_state_naming_the_field(case):
    """Each of these loaded silently and then made the weights NaN, climbed the loss or failed
    later with a bare KeyError or math domain error."""
    a = param(np.ones(3))
    opt = AdamW([a])
    a.grad = B.asarray(np.ones(3))
    opt.step()
    how, message = FORGED_STATES[case]
    fresh = AdamW([param(np.ones(3))])
    with pytest.raises(StateDictError, match=message):
        fresh.load_state_dict(_forge(opt.state_dict(), how))
    assert fresh.state == [{}] and fresh.step_count == 0  # nothing was loaded


@pytest.mark.host_only("refused before any array work")
@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_a_grad_scale_that_would_corrupt_the_update_is_refused(scale):
    a = param(np.ones(3))
    for opt in (AdamW([a]), SGD([a], lr=0.1)):
        a.grad = B.asarray(np.ones(3))
        with pytest.raises(InvalidArgumentError, match="grad_scale must be a finite number"):
            opt.step(grad_scale=scale)
        np.testing.assert_array_equal(host(a.data), np.ones(3))
    with pytest.raises(InvalidArgumentError, match="max_norm must be a finite number"):
        ml.optim.clip_coefficient(1.0, -1.0)


def test_load_state_dict_without_param_steps():
    """An older dict has only the global step: parameters with state take it, others 0."""
    a, b = param(np.ones(2)), param(np.ones(2))
    opt = AdamW([a, b])
    a.grad = B.asarray(np.ones(2))
    opt.step()
    opt.step()
    sd = opt.state_dict()
    del sd["param_steps"]
    other = AdamW([param(np.ones(2)), param(np.ones(2))])
    other.load_state_dict(sd)
    assert other.param_steps == [2, 0]


def test_adamw_on_threads_equals_adamw_on_one_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(0)
    shapes = [(300, 200), (200,), (64, 64), (1000,), (3, 7)]
    data = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    results = []
    for threshold in (0, 1 << 40):  # every step threaded, then none
        monkeypatch.setattr(fast_adamw, "THREADED_FROM", threshold)
        params = [Parameter(B.asarray(d.copy())) for d in data]
        opt = AdamW(params, lr=1e-2, weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = B.asarray(g)
            with fast.forms(True):  # the threads are the fast form's
                opt.step()
        results.append([host(p).copy() for p in params])
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_the_norm_holds_one_pieces_float64_copy_at_a_time():
    """A gradient five pieces long, then smaller ones: traced memory during the norm stays near
    one piece of float64 (the whole gradient in float64 would be five, two pieces alive at once
    two)."""
    import tracemalloc

    from minilora import optim

    if B.on_device():
        pytest.skip("tracemalloc sees host allocations only")
    piece = 1 << 14
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(5 * piece).astype(np.float32)] + \
        [rng.standard_normal(n).astype(np.float32) for n in (300, piece // 2, piece)]
    params = _with_grads(grads, np.float32)
    exact = math.sqrt(sum(float(np.square(g.astype(np.float64)).sum()) for g in grads))

    def traced_norm() -> tuple[float, int]:
        tracemalloc.start()
        norm = float(B.to_numpy(optim.norm_array(params)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return norm, peak
    with mock.patch.object(optim, "NORM_PIECE", piece), fast.reference():
        norm, peak = traced_norm()
    assert norm == pytest.approx(exact, rel=1e-12)
    assert peak <= 1.5 * piece * 8, (peak, piece * 8)
    # the fast form holds one piece's squares (float32) at a time, whatever NORM_PIECE says
    with mock.patch.object(elementwise, "PIECE", piece), fast.forms(True):
        norm, peak = traced_norm()
    assert norm == pytest.approx(exact, rel=1e-6)
    assert peak <= 1.5 * piece * 4, (peak, piece * 4)


@pytest.mark.host_only("refused before any update")
def test_a_single_tensor_as_params_is_refused_not_iterated():
    """Iterating a Tensor gave copies of its rows: the optimizer updated those, never it."""
    p = param(np.ones((3, 2)))
    for make in (lambda: SGD(p, lr=0.5), lambda: AdamW(p)):
        with pytest.raises(DTypeError, match=r"got a single Tensor of shape \(3, 2\); pass "
                                             r"\[tensor\]"):
            make()


def test_a_parameter_unfrozen_after_the_optimizer_was_made_is_said_at_the_step():
    """Frozen when the optimizer was made, it was left out; unfrozen later (set_adapter after
    making the optimizer), its gradients were ignored without a word."""
    a, b = param(np.ones(3)), param(np.ones((2, 2)))
    b.requires_grad_(False)
    opt = AdamW([a, b], lr=0.1)
    b.requires_grad_(True)
    a.grad, b.grad = B.asarray(np.ones(3)), B.asarray(np.ones((2, 2)))
    before = host(a).copy()
    with pytest.raises(ConfigError, match=r"AdamW.step: 1 parameter\(s\) \(shapes \[\(2, 2\)\]\) "
                                          r"were frozen when the optimizer was made"):
        opt.step()
    np.testing.assert_array_equal(host(a), before)  # refused before any update
    b.grad = None
    opt.step()
    assert not np.array_equal(host(a), before)


@pytest.mark.host_only("refused before any update")
@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1)])
def test_a_gradient_of_another_shape_is_refused_not_applied_through_a_view(make):
    a = param(np.ones((2, 3)))
    opt = make([a])
    a.grad = B.asarray(np.ones((3, 2)))  # as many elements, another shape
    with pytest.raises(ShapeError, match=r"parameter 0 of shape \(2, 3\) has a gradient of shape "
                                         r"\(3, 2\)"):
        opt.step()
    np.testing.assert_array_equal(host(a), np.ones((2, 3)))
