"""LoRA on a 4-bit base (QLoRA): any module with ``dequantized_weight()`` is linear-like.

Merging into a quantized base re-quantizes W + delta (lossy): the merged output differs from the
unmerged one by exactly x (W'_deq - W_deq - delta)^T, and unmerging is refused.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import lora, nn
from minilora.errors import ConfigError, InvalidArgumentError
from tests.helpers import check_grads, host
from tests.test_lora_support import assert_close, forward, inputs, randomize_lora, seeds, tiny

quant = pytest.importorskip("minilora.quant")


def quantized_tiny(seed=0, k=16, h=32, o=16):
    model = tiny(k, h, o, dtype=np.float32, seed=seed)
    return quant.quantize_model(model, blocksize=16, double_quant=False, skip=("head",))


@given(seed=seeds, r=st.integers(1, 4), dora=st.booleans())
def test_injection_on_a_quantized_base_starts_at_the_base_and_counts_logical_weights(seed, r,
                                                                                      dora):
    model = quantized_tiny(seed)
    assert isinstance(model.q_proj, quant.QuantLinear)
    x = inputs((3, 16), dtype=np.float32, seed=seed)
    base = forward(model, x)
    _, total_before = lora.count_parameters(model)
    assert total_before == sum(p.size for p in tiny(16, 32, 16).parameters())
    lora.inject_lora(model, lora.LoraConfig(r=r, use_dora=dora))
    assert np.array_equal(forward(model, x), base)
    expected = r * (32 + 16) + r * (16 + 32) + ((32 + 16) if dora else 0)
    assert lora.count_parameters(model) == (expected, total_before + expected)


@given(seed=seeds, dora=st.booleans())
def test_forward_uses_the_dequantized_weight(seed, dora):
    model = lora.inject_lora(quantized_tiny(seed), lora.LoraConfig(r=2, alpha=4, use_dora=dora))
    randomize_lora(model, seed, scale=0.1)
    layer = model.q_proj
    x = inputs((2, 16), dtype=np.float32, seed=seed)
    W = host(layer.base_layer.dequantized_weight()).astype(np.float64)
    b = host(layer.base_layer.bias).astype(np.float64)
    A, Bm = (host(layer.lora_A["default"].weight), host(layer.lora_B["default"].weight))
    xs, s = host(x).astype(np.float64), layer.scaling["default"]
    out = xs @ W.T + s * (xs @ A.T) @ Bm.T
    if dora:
        m = host(layer.lora_magnitude_vector["default"].weight)
        out = (m / np.linalg.norm(W + s * Bm @ A, axis=1)) * out
    assert_close(host(layer(x)), out + b, 1e-5)


@given(seed=seeds)
def test_qlora_gradients_agree_with_finite_differences(seed):
    ml.set_default_dtype(np.float64)
    model = lora.inject_lora(quantized_tiny(seed, k=4, h=5, o=3), lora.LoraConfig(r=2))
    layer = model.q_proj
    assert layer.lora_A["default"].weight.dtype == np.float64  # the default dtype, not float32
    rng = np.random.default_rng(seed)

    def fn(x, A, Bm):
        object.__setattr__(layer.lora_A["default"], "weight", A)
        object.__setattr__(layer.lora_B["default"], "weight", Bm)
        return layer(x)

    check_grads(fn, [rng.standard_normal((3, 4)), rng.standard_normal((2, 4)),
                     rng.standard_normal((5, 2))], rtol=1e-6, atol=1e-8)


@given(seed=seeds, dora=st.booleans())
def test_merging_into_4_bit_is_requantization_and_unmerge_is_refused(seed, dora):
    model = lora.inject_lora(quantized_tiny(seed), lora.LoraConfig(r=2, alpha=4, use_dora=dora))
    randomize_lora(model, seed, scale=0.1)
    x = inputs((3, 16), dtype=np.float32, seed=seed)
    layer = model.v_proj
    W = host(layer.base_layer.dequantized_weight()).astype(np.float64)
    delta = host(layer.merged_delta(["default"])[0]).astype(np.float64)
    hidden = host(model.q_proj(x).tanh() + model.k_proj(x)).astype(np.float64)
    unmerged = host(layer(ml.Tensor(B.asarray(hidden.astype(np.float32)))))
    reports = lora.merge(model)
    assert sorted(reports) == ["q_proj", "v_proj"] and "max_abs_error" in reports["v_proj"]
    W2 = host(layer.base_layer.dequantized_weight()).astype(np.float64)
    merged = host(layer(ml.Tensor(B.asarray(hidden.astype(np.float32)))))
    # the merged layer is off by exactly what re-quantization lost: x (W' - W - delta)^T
    assert_close(merged - unmerged, hidden @ (W2 - W - delta).T, 1e-3)
    assert not np.allclose(W2, W)  # the update moved some codes
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="quantized"):
        lora.unmerge(model)
    with pytest.raises(InvalidArgumentError, match="quantized"):
        with lora.disable_adapters(model):
            pass
    assert all(np.array_equal(host(v), before[k]) for k, v in model.state_dict().items())


def test_disable_adapters_on_a_partly_quantized_merge_changes_nothing_before_refusing():
    """Some bases float, some 4-bit: disable_adapters unmerged the float ones, then refused at
    the first 4-bit one, leaving the model half merged; merge_and_unload then lost the float
    layers' updates."""
    model = tiny(16, 32, 16, dtype=np.float32)
    quant.quantize_model(model, blocksize=16, double_quant=False, skip=("head", "q_proj"))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "head")))
    randomize_lora(model, scale=0.1)
    lora.merge(model)
    x = inputs((3, 16), dtype=np.float32)
    merged = forward(model, x)
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=r"disable_adapters: .*quantized bases "
                                                   r"\(\['v_proj'\]\)"):
        with lora.disable_adapters(model):
            pass
    assert all(np.array_equal(host(v), before[k]) for k, v in model.state_dict().items())
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    np.testing.assert_array_equal(forward(lora.merge_and_unload(model), x), merged)


def test_merge_and_unload_keeps_quantized_layers():
    model = lora.inject_lora(quantized_tiny(), lora.LoraConfig(r=2))
    randomize_lora(model, scale=0.1)
    lora.merge_and_unload(model)
    assert isinstance(model.q_proj, quant.QuantLinear) and lora.lora_layers(model) == []


def test_pissa_on_a_quantized_base_is_refused():
    with pytest.raises(ConfigError, match="pissa.*quantized"):
        lora.inject_lora(quantized_tiny(), lora.LoraConfig(r=2, init="pissa"))


class GridLinear(nn.Module):
    """A duck-typed stand-in for any 4-bit layer: weights on a 0.125 grid, lossy add_to_weight."""

    def __init__(self, w, b):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.codes = np.round(w / 0.125).astype(np.int8)
        self.bias = nn.Parameter(b, requires_grad=False)

    def dequantized_weight(self):
        return B.asarray(self.codes.astype(np.float32) * 0.125)

    def forward(self, x):
        return ml.functional.linear(x, ml.Tensor(self.dequantized_weight()), self.bias)

    def add_to_weight(self, delta):
        exact = host(self.dequantized_weight()) + host(delta)
        self.codes = np.round(exact / 0.125).astype(np.int8)
        return {"max_abs_error": float(np.abs(host(self.dequantized_weight()) - exact).max())}


def test_any_module_with_dequantized_weight_is_a_base():
    model = nn.Module()
    rng = np.random.default_rng(0)
    model.q_proj = GridLinear(rng.standard_normal((3, 4)).astype(np.float32),
                              np.zeros(3, np.float32))
    lora.inject_lora(model, lora.LoraConfig(r=1, target_modules=("q_proj",)))
    assert lora.count_parameters(model) == (1 * (3 + 4), 3 + 12 + 7)
    randomize_lora(model)
    report = lora.merge(model)["q_proj"]
    assert 0 <= report["max_abs_error"] <= 0.0625 + 1e-7
