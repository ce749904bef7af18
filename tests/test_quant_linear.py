"""QuantLinear (a frozen 4-bit Linear), QLoRA gradients, merging into 4 bits, model surgery and
the memory report."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import nn
from minilora import quant as Q
from minilora import quant as QL
from minilora.errors import InvalidArgumentError, ShapeError
from tests.helpers import check_grads, host, numeric_grad


def _layer(in_f=40, out_f=24, bias=True, **kw) -> tuple[nn.Linear, Q.QuantLinear]:
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, Q.QuantLinear.from_linear(lin, **kw)


def _x(*shape, seed=1, dtype=np.float32):
    return ml.Tensor(B.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype)))


# ------------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("kw", [{}, {"quant_type": "fp4", "double_quant": False},
                                {"quant_type": "int4", "blocksize": 32}])
def test_forward_is_x_times_dequantized_weight(kw):
    lin, ql = _layer(**kw)
    assert (ql.in_features, ql.out_features) == (40, 24)
    assert ql.quant_state.shape == (24, 40)
    w = host(ql.dequantized_weight())
    assert w.dtype == np.float32 and w.shape == (24, 40)
    x = _x(3, 5, 40)
    y = host(ql(x))
    assert y.shape == (3, 5, 24) and y.dtype == np.float32
    np.testing.assert_allclose(y, host(x) @ w.T + host(lin.bias), rtol=1e-5, atol=1e-6)
    # and close to the float layer: each output moves by at most sum |x| * the weight error
    qt = kw.get("quant_type", "nf4")
    w_err = np.abs(host(lin.weight) - w).max()
    assert w_err <= np.abs(host(lin.weight)).max() * Q.max_half_gap(qt) * 1.01
    assert np.all(np.abs(y - host(lin(x))) <= np.abs(host(x)).sum(-1, keepdims=True) * w_err
                  + 1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_an_integer_input_meets_the_float_weight_as_in_a_linear_layer(dtype, bias):
    """The dequantized weight was cast to the input's type: int input made int weights
    (garbage) or, with a bias, a casting error; nn.Linear promotes to float as NumPy does."""
    lin, ql = _layer(bias=bias)
    x = B.asarray(np.random.default_rng(3).integers(0, 2, (4, 40)).astype(dtype))
    y = host(ql(ml.Tensor(x)))
    w = host(ql.dequantized_weight()).astype(np.float64)
    want = host(x).astype(np.float64) @ w.T + (host(lin.bias) if bias else 0.0)
    assert y.dtype.kind == "f" and y.dtype == host(lin(ml.Tensor(x))).dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 40)])
def test_input_gradient_matches_finite_differences(shape):
    _, ql = _layer()
    x = np.random.default_rng(2).standard_normal(shape)
    check_grads(lambda t: ql(t), [x], rtol=1e-6, atol=1e-8)


def test_weight_gets_no_gradient_and_is_not_a_parameter():
    _, ql = _layer()
    packed_before = host(ql.quant_state.packed).copy()
    names = [n for n, _ in ql.named_parameters()]
    assert names == ["bias"] and not ql.bias.requires_grad
    assert ql.num_parameters(trainable_only=True) == 0
    x = ml.Tensor(_x(4, 40).data, requires_grad=True)
    ql(x).sum().backward()
    assert x.grad is not None and ql.bias.grad is None
    np.testing.assert_array_equal(host(ql.quant_state.packed), packed_before)
    # the packed codes travel in the state dict (as bitsandbytes' Linear4bit), not as a Parameter
    assert host(ql.state_dict()["weight"]).dtype == np.uint8 and "weight" not in names


def test_dequantizes_once_forward_and_once_backward_and_only_if_needed(monkeypatch):
    _, ql = _layer()
    calls = []
    real = QL.dequantize
    monkeypatch.setattr(QL.linear, "dequantize", lambda s: calls.append(1) or real(s))
    y = ql(_x(4, 40))  # frozen everything: no graph, one dequantization
    assert not y.requires_grad and len(calls) == 1
    x = ml.Tensor(_x(4, 40).data, requires_grad=True)
    y = ql(x)
    assert len(calls) == 2
    y.sum().backward()
    assert len(calls) == 3  # the backward pass dequantizes again instead of keeping W alive
    with ml.no_grad():
        assert not ql(x).requires_grad


def test_trainable_bias_gets_its_gradient():
    _, ql = _layer()
    ql.double()
    ql.bias.requires_grad_(True)
    x = ml.Tensor(np.random.default_rng(3).standard_normal((5, 40)))
    w = np.random.default_rng(4).standard_normal((5, 24))
    (ql(x) * ml.Tensor(w)).sum().backward()

    def value():
        with ml.no_grad():
            return float((host(ql(x)) * w).sum())
    np.testing.assert_allclose(host(ql.bias.grad), numeric_grad(value, ql.bias.data), rtol=1e-6)


def test_qlora_gradients_through_a_quantlinear():
    """y = x deq(Q)^T + s (x A^T) B^T: gradients of x, A and B against finite differences."""
    _, ql = _layer(double_quant=True)
    rng = np.random.default_rng(5)
    x, A, Bm = rng.standard_normal((3, 4, 40)), rng.standard_normal((4, 40)), \
        rng.standard_normal((24, 4))
    s = 16 / 4
    check_grads(lambda x, A, Bm: ql(x) + ((x @ A.T) * s) @ Bm.T, [x, A, Bm], rtol=1e-6,
                atol=1e-6)


def test_qlora_with_inject_lora_trains_only_the_adapters():
    lora = pytest.importorskip("minilora.lora")

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)
            self.v_proj = nn.Linear(16, 8)

        def forward(self, x):
            return self.v_proj(self.q_proj(x).tanh())

    model = Q.quantize_model(Toy(), blocksize=16)
    lora.inject_lora(model, lora.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    model.double()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    for _, p in trainable:  # B starts at zero; move it so every gradient path is exercised
        p.data[...] = B.asarray(np.random.default_rng(6).standard_normal(p.shape) * 0.3)
    x = ml.Tensor(np.random.default_rng(7).standard_normal((3, 16)))
    w = np.random.default_rng(8).standard_normal((3, 8))
    (model(x) * ml.Tensor(w)).sum().backward()

    def value():
        with ml.no_grad():
            return float((host(model(x)) * w).sum())
    for name, p in trainable:
        np.testing.assert_allclose(host(p.grad), numeric_grad(value, p.data), rtol=1e-5,
                                   atol=1e-7, err_msg=name)


def test_constructor_and_input_validation():
    lin, ql = _layer()
    with pytest.raises(InvalidArgumentError, match="nn.Linear"):
        Q.QuantLinear.from_linear(nn.LayerNorm(4))
    with pytest.raises(InvalidArgumentError, match="2-D"):
        Q.QuantLinear(Q.quantize(np.ones(64, np.float32)))
    with pytest.raises(ShapeError, match=r"\(24,\)"):
        Q.QuantLinear(ql.quant_state, bias=np.zeros(5, np.float32))
    with pytest.raises(ShapeError, match="40"):
        ql(_x(2, 39))
    with pytest.raises(InvalidArgumentError, match="blocksize"):
        Q.QuantLinear.from_linear(lin, blocksize=20)
    assert "nf4" in repr(ql) and "double_quant" in repr(ql)


# ----------------------------------------------------------------------------------- merging

def test_add_to_weight_with_zero_delta_changes_nothing():
    _, ql = _layer(double_quant=False)
    before = ql.quant_state
    report = ql.add_to_weight(np.zeros((24, 40), np.float32))
    assert report["max_abs_error"] == 0.0 and report["frac_codes_unchanged"] == 1.0
    assert report["frac_unchanged"] == 1.0 and math.isnan(report["delta_retained"])
    np.testing.assert_array_equal(host(ql.quant_state.packed), host(before.packed))
    np.testing.assert_array_equal(host(ql.dequantized_weight()), host(Q.dequantize(before)))


def test_add_to_weight_with_double_quant_keeps_codes_but_moves_the_scales():
    # the new absmax values are the 8-bit approximations of the old ones, with a new mean: the
    # nested 8-bit step is not idempotent, so even a zero delta moves weights (by < 1 %)
    _, ql = _layer(double_quant=True)
    w_old = host(ql.dequantized_weight())
    report = ql.add_to_weight(np.zeros((24, 40), np.float32))
    assert report["frac_codes_unchanged"] == 1.0
    assert 0 <= report["max_abs_error"] <= np.abs(w_old).max() * 2 * Q.max_half_gap("dynamic8")
    assert report["max_abs_error"] == np.abs(host(ql.dequantized_weight()) - w_old).max()


def test_a_tiny_update_mostly_vanishes_when_merged_into_4_bits():
    _, ql = _layer(in_f=64, out_f=64)
    w_old = host(ql.dequantized_weight()).astype(np.float64)
    step = np.abs(w_old).max() * 1e-3  # far below half a 4-bit grid step
    delta = np.random.default_rng(9).standard_normal((64, 64)) * step
    report = ql.add_to_weight(delta.astype(np.float32))
    w_new = host(ql.dequantized_weight()).astype(np.float64)
    assert report["frac_codes_unchanged"] > 0.9
    assert report["delta_retained"] < 0.5
    assert report["relative_error"] > 0.5
    exact = w_old + delta.astype(np.float32)
    assert report["max_abs_error"] == pytest.approx(np.abs(w_new - exact).max(), rel=1e-9)
    assert report["mean_abs_error"] == pytest.approx(np.abs(w_new - exact).mean(), rel=1e-9)


@given(scale=st.floats(1e-4, 10.0), seed=st.integers(0, 1000), dq=st.booleans())
def test_merge_into_quantized_error_is_bounded_and_reported(scale, seed, dq):
    ml.manual_seed(seed)
    lin = nn.Linear(32, 8)
    ql = Q.QuantLinear.from_linear(lin, blocksize=16, double_quant=dq)
    delta = (np.random.default_rng(seed).standard_normal((8, 32)) * scale).astype(np.float32)
    merged, report = Q.merge_into_quantized(ql, delta)
    assert merged is not ql and isinstance(merged, Q.QuantLinear)
    np.testing.assert_array_equal(host(merged.bias), host(ql.bias))
    w_old = host(ql.dequantized_weight())
    exact = w_old.astype(np.float64) + delta
    w_new = host(merged.dequantized_weight())
    np.testing.assert_array_equal(  # the new weight is the quantized float sum, nothing else
        w_new, host(Q.dequantize(Q.quantize(w_old + delta, 16, "nf4", dq))))
    err = np.abs(w_new - exact).reshape(-1)
    assert report["max_abs_error"] == pytest.approx(err.max(), rel=1e-9, abs=1e-12)
    absmax = np.repeat(np.abs(exact).reshape(-1, 16).max(axis=1), 16)
    slack = 0.02 if dq else 1e-5  # double quantization moves the scales by up to 0.7 %
    assert np.all(err <= absmax * (Q.max_half_gap("nf4") + slack) + 1e-6)


def test_merge_into_float_is_exact_up_to_float32_rounding():
    _, ql = _layer()
    delta = np.random.default_rng(10).standard_normal((24, 40)).astype(np.float32) * 1e-3
    linear, report = Q.merge_into_float(ql, delta)
    assert type(linear) is nn.Linear and not linear.weight.requires_grad
    np.testing.assert_array_equal(host(linear.weight), host(ql.dequantized_weight()) + delta)
    assert report["max_abs_error"] < 1e-6 and report["delta_retained"] == pytest.approx(1, 1e-4)
    np.testing.assert_array_equal(host(linear.bias), host(ql.bias))
    plain = ql.to_linear()
    x = _x(3, 40)
    np.testing.assert_allclose(host(plain(x)), host(ql(x)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError, match="delta"):
        Q.merge_into_float(ql, delta.T)
    with pytest.raises(InvalidArgumentError, match="QuantLinear"):
        Q.merge_into_quantized(nn.Linear(2, 2), np.zeros((2, 2)))


# ------------------------------------------------------------------------------ model surgery

class Tiny(nn.Module):
    """Embedding -> 2 blocks of (q_proj, fc) -> a head tied to the embedding -> an extra head."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 32)
        self.h = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
                               for _ in range(2))
        self.ln = nn.LayerNorm(32)
        self.tied = nn.Linear(32, 16, bias=False)
        self.tied.weight = self.wte.weight  # (16, 32), shared
        self.lm_head = nn.Linear(32, 16)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = x + block(x).tanh()
        x = self.ln(x)
        return self.tied(x) + self.lm_head(x)


def test_quantize_model_replaces_linears_in_place():
    model = Tiny()
    idx = np.array([[1, 2, 3], [4, 5, 15]])
    with ml.no_grad():
        before = host(model(idx))
    out = Q.quantize_model(model, blocksize=32, skip=("h.1.0", "lm_head"))
    assert out is model
    kinds = {path: type(m).__name__ for path, m in model.named_modules()}
    assert kinds["h.0.0"] == kinds["h.0.1"] == kinds["h.1.1"] == "QuantLinear"
    assert kinds["h.1.0"] == "Linear"  # skipped by path
    assert kinds["lm_head"] == "Linear"  # skipped by name
    assert kinds["tied"] == "Linear" and model.tied.weight is model.wte.weight  # tied: float
    assert kinds["wte"] == "Embedding" and kinds["ln"] == "LayerNorm"
    assert model.h[0][0].quant_state.nested and model.h[0][0].quant_state.blocksize == 32
    with ml.no_grad():
        after = host(model(idx))
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()
    default = Q.quantize_model(Tiny())  # skip=("lm_head",) by default
    assert type(default.lm_head) is nn.Linear and type(default.h[1][0]) is Q.QuantLinear
    with pytest.raises(InvalidArgumentError, match="from_linear"):
        Q.quantize_model(nn.Linear(4, 4))
    with pytest.raises(InvalidArgumentError, match="quant_type"):
        Q.quantize_model(Tiny(), quant_type="nf5")


def test_quantize_model_on_the_gpt():
    gpt = pytest.importorskip("minilora.gpt")
    model = gpt.GPT(gpt.GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = np.array([[1, 2, 3, 4, 5]])
    with ml.no_grad():
        before = host(model(idx))
    Q.quantize_model(model)
    names = {p for p, m in model.named_modules() if isinstance(m, Q.QuantLinear)}
    expected = {f"h.{i}.{m}" for i in range(2) for m in
                ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc", "mlp.proj")}
    assert names == expected
    assert isinstance(model.wte, nn.Embedding) and isinstance(model.wpe, nn.Embedding)
    with ml.no_grad():
        after = host(model(idx))
    assert np.abs(after - before).max() < 0.05 * np.abs(before).max()


def _held_bytes(model) -> int:
    """Sum the nbytes of every array the model holds, walking it independently of the report."""
    total = 0
    for _, mod in model.named_modules():
        if isinstance(mod, Q.QuantLinear):
            s = mod.quant_state
            total += sum(a.nbytes for a in (s.packed, s.absmax, s.absmax2, s.offset)
                         if a is not None)
    seen = set()
    for _, mod in model.named_modules():
        for p in mod._parameters.values():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.data.nbytes
    return total


@pytest.mark.parametrize("dq", [False, True])
def test_memory_report_counts_logical_params_and_real_bytes(dq):
    model = Tiny()
    float_report = Q.memory_report(model, blocksize=32)
    held = float_report["held_bytes"]
    assert held == _held_bytes(model) == float_report["float32"]["total_bytes"]
    n_weights = 3 * 32 * 32 + 32 * 32 + 0  # h.*.* Linear weights; lm_head skipped, tied shared
    assert float_report["weight_params"] == n_weights
    Q.quantize_model(model, blocksize=32, double_quant=dq)
    report = Q.memory_report(model, blocksize=32)
    assert report["held_bytes"] == _held_bytes(model)
    assert report["held_bytes"] == report["nf4_dq" if dq else "nf4"]["total_bytes"]
    assert report["params"] == float_report["params"]  # logical shapes, not packed bytes
    assert report["weight_params"] == n_weights
    assert report["float32"]["weight_bits_per_param"] == 32
    assert report["nf4"]["weight_bits_per_param"] == 4 + 32 / 32
    # per 1024-element weight: 512 + 32 code bytes + 4 bytes for the one nested block + offset 4
    assert report["nf4_dq"]["weight_bytes"] == 4 * (512 + 32 + 4 + 4)
    assert "nf4_dq" in QL.format_memory_report(report)


def test_memory_report_reaches_the_qlora_ratio_on_large_weights():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 256, bias=False)  # 131072 = 64 * 256 * 8 weights

    report = Q.memory_report(Q.quantize_model(Wide()))
    assert report["held_bytes"] == report["nf4_dq"]["total_bytes"]
    ratio = report["nf4_dq"]["weight_bytes"] / report["float32"]["weight_bytes"]
    assert ratio == (Q.bits_per_parameter(64, True) + 32 / 131072) / 32
    assert report["nf4"]["weight_bits_per_param"] == 4.5
