"""LoRALinear: the forward equation, init, rsLoRA, DoRA, PiSSA, dropout, and gradients."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import nn
from minilora.errors import ConfigError, InvalidArgumentError
from minilora.lora.layer import LoRALinear
from tests.helpers import check_grads, host, numeric_grad
from tests.test_lora_support import alphas, assert_close, dims, dtypes, inputs, ranks, seeds


def make_layer(k, n, r, alpha, dtype=np.float64, seed=0, use_rslora=False, use_dora=False,
               init="kaiming", dropout=0.0, bias=True, random_ab=True):
    ml.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias).astype(dtype)
    layer = LoRALinear(base)
    layer.update_layer("default", r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                       use_dora=use_dora, init=init)
    layer.set_adapter(["default"])
    if random_ab:
        rng = np.random.default_rng(seed + 1)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.data[...] = B.asarray(rng.standard_normal(p.shape).astype(dtype))
    return layer


def parts(layer, name="default"):
    """Host copies of W, b, A, B and the scaling s."""
    b = host(layer.base_layer.bias) if layer.base_layer.bias is not None else 0.0
    return (host(layer.base_layer.weight), b, host(layer.lora_A[name].weight),
            host(layer.lora_B[name].weight), layer.scaling[name])


@given(k=dims, n=dims, r=ranks, alpha=alphas, rs=st.booleans(), seed=seeds)
def test_forward_is_base_plus_scaled_low_rank_update(k, n, r, alpha, rs, seed):
    layer = make_layer(k, n, r, alpha, seed=seed, use_rslora=rs)
    x = inputs((3, 2, k), seed=seed)
    W, b, A, Bm, s = parts(layer)
    assert s == (alpha / np.sqrt(r) if rs else alpha / r)
    expected = host(x) @ W.T + b + s * (host(x) @ A.T) @ Bm.T
    assert_close(host(layer(x)), expected, 1e-12)


@given(k=dims, n=dims, r=ranks, alpha=alphas, dora=st.booleans(), seed=seeds, dtype=dtypes,
       init=st.sampled_from(["kaiming", "gaussian"]))
def test_default_init_leaves_the_output_exactly_equal_to_the_base(k, n, r, alpha, dora, seed,
                                                                  dtype, init):
    layer = make_layer(k, n, r, alpha, dtype=dtype, seed=seed, use_dora=dora, init=init,
                       random_ab=False)
    assert not host(layer.lora_B["default"].weight).any()
    assert host(layer.lora_A["default"].weight).any()
    x = inputs((4, k), dtype=dtype, seed=seed)
    out = layer(x)
    assert out.dtype == dtype
    assert np.array_equal(host(out), host(layer.base_layer(x)))


def test_kaiming_and_gaussian_init_of_A():
    k, r = 400, 16
    layer = make_layer(k, 8, r, 16, init="kaiming", random_ab=False)
    A = host(layer.lora_A["default"].weight)
    assert A.shape == (r, k) and np.abs(A).max() <= 1 / np.sqrt(k)
    assert np.abs(A).max() > 0.95 / np.sqrt(k)  # uniform over the whole interval
    layer = make_layer(k, 8, r, 16, init="gaussian", random_ab=False)
    A = host(layer.lora_A["default"].weight)
    assert abs(A.std() - 1 / r) < 0.05 / r and abs(A.mean()) < 0.05 / r


@given(k=dims, n=dims, r=ranks, alpha=alphas, rs=st.booleans(), seed=seeds)
def test_doubling_alpha_doubles_the_update(k, n, r, alpha, rs, seed):
    one = make_layer(k, n, r, alpha, seed=seed, use_rslora=rs)
    two = make_layer(k, n, r, 2 * alpha, seed=seed, use_rslora=rs)
    x = inputs((3, k), seed=seed)
    base = host(one.base_layer(x))
    assert_close(host(two(x)) - base, 2 * (host(one(x)) - base), 1e-12)
    assert_close(two.delta_weight("default"), 2 * one.delta_weight("default"), 1e-12)


@given(k=st.integers(2, 9), n=st.integers(2, 9), r=ranks, seed=seeds)
def test_the_update_has_rank_at_most_r(k, n, r, seed):
    layer = make_layer(k, n, r, 8.0, seed=seed)
    delta = host(layer.delta_weight("default"))
    assert delta.shape == (n, k)
    assert np.linalg.matrix_rank(delta) == min(r, n, k)  # random A, B: exactly min(r, n, k)


@given(k=dims, n=dims, r=ranks, alpha=alphas, seed=seeds)
def test_lora_gradients_agree_with_finite_differences(k, n, r, alpha, seed):
    ml.set_default_dtype(np.float64)
    layer = make_layer(k, n, r, alpha, seed=seed)
    rng = np.random.default_rng(seed)
    A0, B0 = (host(layer.lora_A["default"].weight), host(layer.lora_B["default"].weight))

    def fn(x, A, Bm):  # the layer, with its A and B read from the tensors under test
        object.__setattr__(layer.lora_A["default"], "weight", A)
        object.__setattr__(layer.lora_B["default"], "weight", Bm)
        return layer(x)

    check_grads(fn, [rng.standard_normal((2, k)), A0, B0], rtol=1e-6, atol=1e-8)


def dora_reference(x, W, b, A, Bm, s, m):
    """DoRA's output with numpy: (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b."""
    merged = W + s * Bm @ A
    return (m / np.linalg.norm(merged, axis=1)) * (x @ W.T + s * (x @ A.T) @ Bm.T) + b


@given(k=dims, n=dims, r=ranks, alpha=alphas, rs=st.booleans(), seed=seeds)
def test_dora_forward_matches_its_equation(k, n, r, alpha, rs, seed):
    layer = make_layer(k, n, r, alpha, seed=seed, use_rslora=rs, use_dora=True)
    W, b, A, Bm, s = parts(layer)
    m = host(layer.lora_magnitude_vector["default"].weight)
    W0 = W  # B was zero when m was set: m is the row norm of W
    np.testing.assert_allclose(m, np.linalg.norm(W0, axis=1), rtol=1e-13)
    m2 = m * np.random.default_rng(seed).uniform(0.5, 1.5, size=n)
    layer.lora_magnitude_vector["default"].weight.data[...] = B.asarray(m2)
    x = inputs((2, 3, k), seed=seed)
    assert_close(host(layer(x)), dora_reference(host(x), W, b, A, Bm, s, m2), 1e-12)


@given(k=dims, n=st.integers(2, 6), r=ranks, seed=seeds, rows=st.integers(1, 2))
def test_dora_keeps_an_all_zero_row_of_the_base_at_zero(k, n, r, seed, rows):
    """A zero row of W has no direction for DoRA's m to scale: 0 / 0 (NaN, in PEFT too) would
    poison the whole loss. Its output stays the bias, training leaves it there, and merging and
    unmerging stay finite and equal to the unmerged layer."""
    layer = make_layer(k, n, r, 4.0, seed=seed, use_dora=True, random_ab=False)
    W = layer.base_layer.weight
    W.data[:rows] = 0.0
    layer.lora_magnitude_vector["default"].weight.data[...] = B.asarray(
        np.linalg.norm(host(W), axis=1))  # m set from the weight, as at init
    layer.lora_B["default"].weight.data[...] = B.asarray(
        np.random.default_rng(seed).standard_normal(layer.lora_B["default"].weight.shape))
    layer.lora_B["default"].weight.data[:rows] = 0.0  # B A has the zero rows too
    x = ml.Tensor(inputs((3, k), seed=seed).data, requires_grad=True)
    out = layer(x)
    y = host(out)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, :rows], np.broadcast_to(host(layer.base_layer.bias)[:rows],
                                                                (3, rows)))
    out.sum().backward()
    for p in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight):
        assert np.isfinite(host(p.grad)).all()
    layer.merge()
    merged = host(layer(x))
    assert np.isfinite(host(layer.base_layer.weight)).all()
    assert_close(merged, y, 1e-12)
    layer.unmerge()
    assert_close(host(layer(x)), y, 1e-12)


@given(k=dims, n=dims, r=ranks, seed=seeds)
def test_dora_gradients_treat_the_norm_as_a_constant(k, n, r, seed):
    """m and x get their exact gradients; A and B get the gradient with ||W + s B A|| frozen
    at its current value (DoRA section 4.3), checked against finite differences of that."""
    ml.set_default_dtype(np.float64)
    layer = make_layer(k, n, r, 4.0, seed=seed, use_dora=True)
    W, b, A0, B0, s = parts(layer)
    mag = layer.lora_magnitude_vector["default"].weight
    mag.data *= B.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, size=n))
    m = host(mag).copy()
    norm0 = np.linalg.norm(W + s * B0 @ A0, axis=1)
    rng = np.random.default_rng(seed + 7)
    x = rng.standard_normal((3, k))
    w = rng.standard_normal((3, n))
    out = layer(ml.Tensor(B.asarray(x), requires_grad=True))
    (out * ml.Tensor(B.asarray(w))).sum().backward()

    def frozen_norm_loss(A, Bm, mm):
        y = (mm / norm0) * (x @ W.T + s * (x @ A.T) @ Bm.T) + b
        return float((y * w).sum())

    A, Bm = A0.copy(), B0.copy()
    for arr, param in ((A, layer.lora_A["default"].weight), (Bm, layer.lora_B["default"].weight),
                       (m, mag)):
        expected = numeric_grad(lambda: frozen_norm_loss(A, Bm, m), arr)
        np.testing.assert_allclose(host(param.grad), expected, rtol=1e-6, atol=1e-8)


@given(k=st.integers(2, 8), n=st.integers(2, 8), seed=seeds, rs=st.booleans(),
       dtype=dtypes)
def test_pissa_keeps_the_output_and_takes_the_top_singular_directions(k, n, seed, rs, dtype):
    r = min(k, n) - 1 or 1
    ml.manual_seed(seed)
    base = nn.Linear(k, n).astype(dtype)
    W = host(base.weight).astype(np.float64).copy()
    x = inputs((5, k), dtype=dtype, seed=seed)
    before = host(base(x)).copy()
    layer = LoRALinear(base)
    layer.update_layer("default", r=r, alpha=8, use_rslora=rs, init="pissa")
    layer.set_adapter(["default"])
    assert_close(host(layer(x)), before, 1e-6 if dtype == np.float32 else 1e-12)
    U, S, Vh = np.linalg.svd(W)
    best = (U[:, :r] * S[:r]) @ Vh[:r]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert_close(host(layer.delta_weight("default")), best, tol)
    # the residual W - s B A is small where W is nearly rank r: its rounding is W's
    np.testing.assert_allclose(host(layer.base_layer.weight), W - best, rtol=tol,
                               atol=tol * np.abs(W).max())


def test_pissa_needs_r_at_most_min_dimension():
    base = nn.Linear(3, 5)
    with pytest.raises(ConfigError, match="r <= min"):
        LoRALinear(base).update_layer("default", r=4, alpha=8, init="pissa")


@given(seed=seeds, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout_applies_to_the_adapter_input_only_while_training(seed, p):
    layer = make_layer(4, 3, 2, 8.0, seed=seed, dropout=p)
    x = inputs((6, 4), seed=seed)
    W, b, A, Bm, s = parts(layer)
    ml.manual_seed(seed)
    dropped = host(ml.functional.dropout(x, p, True))
    ml.manual_seed(seed)
    trained = host(layer(x))
    assert_close(trained, host(x) @ W.T + b + s * (dropped @ A.T) @ Bm.T, 1e-12)
    layer.eval()
    assert_close(host(layer(x)), host(x) @ W.T + b + s * (host(x) @ A.T) @ Bm.T, 1e-12)


def test_same_seed_same_output_bit_for_bit():
    outs = []
    for _ in range(2):
        layer = make_layer(6, 5, 3, 8.0, dtype=np.float32, seed=3, dropout=0.3, random_ab=False)
        ml.manual_seed(11)
        outs.append(host(layer(inputs((4, 6), dtype=np.float32))))
    assert np.array_equal(outs[0], outs[1])


def test_float32_stays_float32():
    layer = make_layer(6, 5, 3, 8.0, dtype=np.float32, use_dora=True)
    x = ml.Tensor(inputs((4, 6), dtype=np.float32).data, requires_grad=True)
    out = layer(x)
    assert out.dtype == np.float32
    out.sum().backward()
    for p in [x, *layer.adapter_parameters("default")]:
        assert p.data.dtype == np.float32 and p.grad.dtype == np.float32


def test_the_base_gets_no_gradient_and_no_graph_under_no_grad():
    layer = make_layer(4, 3, 2, 8.0)
    layer.base_layer.requires_grad_(False)
    layer(inputs((2, 4))).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].weight.grad is not None
    with ml.no_grad():
        out = layer(inputs((2, 4)))
    assert not out.requires_grad and out._parents == ()


def test_a_non_linear_base_is_refused():
    with pytest.raises(InvalidArgumentError, match="LayerNorm"):
        LoRALinear(nn.LayerNorm(4))


def test_layer_merge_refuses_a_second_merge_until_unmerged():
    layer = make_layer(4, 3, 2, 8.0)
    W = host(layer.base_layer.weight).copy()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    with pytest.raises(InvalidArgumentError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(host(layer.base_layer.weight), W, 1e-12)


@given(k=dims, n=dims, r=ranks, seed=seeds, bias=st.booleans())
def test_a_plain_and_a_dora_adapter_together(k, n, r, seed, bias):
    """Both read the same base(x). Without a bias DoRA's term keeps base(x) itself for its
    backward, so the plain update must not be written into base(x)'s array then (it once was:
    m's gradient came out wrong). Forward against the equations, gradients against finite
    differences."""
    ml.set_default_dtype(np.float64)
    layer = make_layer(k, n, r, 4.0, seed=seed, bias=bias)
    layer.update_layer("d", r=r, alpha=2.0, use_dora=True)
    layer.set_adapter(["default", "d"])
    rng = np.random.default_rng(seed + 3)
    for p in layer.adapter_parameters("d"):
        p.data[...] = B.asarray(rng.uniform(0.5, 1.5, p.shape) if p.ndim == 1
                                else rng.standard_normal(p.shape))
    W, b, A, Bm, s = parts(layer)
    _, _, Ad, Bd, sd = parts(layer, "d")
    m = host(layer.lora_magnitude_vector["d"].weight)
    x = rng.standard_normal((3, k))
    plain = s * (x @ A.T) @ Bm.T
    dora = dora_reference(x, W, 0.0, Ad, Bd, sd, m) - x @ W.T
    assert_close(host(layer(ml.Tensor(x))), x @ W.T + b + plain + dora, 1e-12)

    def fn(x, A, Bm, mag):
        object.__setattr__(layer.lora_A["default"], "weight", A)
        object.__setattr__(layer.lora_B["default"], "weight", Bm)
        object.__setattr__(layer.lora_magnitude_vector["d"], "weight", mag)
        return layer(x)

    check_grads(fn, [x, A, Bm, m], rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------- per-adapter values, derived

def test_rank_dora_and_scaling_are_read_off_the_adapter_itself():
    layer = LoRALinear(nn.Linear(6, 5).double())
    layer.update_layer("a", r=2, alpha=8)
    layer.update_layer("b", r=4, alpha=8, use_rslora=True, use_dora=True, dropout=0.25)
    assert dict(layer.r) == {"a": 2, "b": 4}
    assert dict(layer.use_dora) == {"a": False, "b": True}
    assert dict(layer.scaling) == {"a": 8 / 2, "b": 8 / np.sqrt(4)}
    assert dict(layer.lora_alpha) == {"a": 8, "b": 8}
    assert dict(layer.lora_dropout) == {"a": 0.0, "b": 0.25}
    assert dict(layer.use_rslora) == {"a": False, "b": True}
    # the settings table holds only what the modules do not say
    assert set(vars(layer.settings["b"])) == {"alpha", "dropout", "use_rslora"}
    # a new A of another rank (as add_weighted_adapter's "cat" makes) changes r and s with it
    layer.lora_A["a"] = nn.Linear(6, 3, bias=False).double()
    layer.lora_B["a"] = nn.Linear(3, 5, bias=False).double()
    assert layer.r["a"] == 3 and layer.scaling["a"] == 8 / 3
    del layer.lora_magnitude_vector["b"]
    assert layer.use_dora["b"] is False
    layer.delete_adapter("a")
    assert list(layer.r) == list(layer.scaling) == list(layer.lora_alpha) == ["b"]


def test_the_derived_tables_are_read_only():
    layer = make_layer(4, 3, 2, 4.0)
    for table in ("r", "scaling", "use_dora", "lora_alpha", "lora_dropout", "use_rslora"):
        with pytest.raises(TypeError):
            getattr(layer, table)["default"] = 1
        with pytest.raises(AttributeError):
            setattr(layer, table, {"default": 1})
    assert layer.r == {"default": 2} and layer.scaling == {"default": 2.0}


def test_adapters_live_in_module_dicts_under_their_names():
    layer = LoRALinear(nn.Linear(3, 2))
    for name in ("train", "forward", "lora-1", "x_2"):  # names that are methods stay safe
        layer.update_layer(name, r=1, alpha=1, use_dora=name == "train")
    assert isinstance(layer.lora_A, nn.ModuleDict) and callable(layer.lora_A.train)
    keys = [k for k in layer.state_dict() if not k.startswith("base_layer")]
    assert keys == [f"lora_A.{n}.weight" for n in ("train", "forward", "lora-1", "x_2")] + \
        [f"lora_B.{n}.weight" for n in ("train", "forward", "lora-1", "x_2")] + \
        ["lora_magnitude_vector.train.weight"]
