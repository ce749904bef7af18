"""LoRA on minilora's GPT: the paths it targets, counts from the configs alone, exact start,
gradients only in the adapters, merging, cached generation and adapter files."""

import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import lora
from tests.helpers import host
from tests.test_lora_support import assert_close, randomize_lora, seeds

gpt = pytest.importorskip("minilora.gpt")

target_sets = st.sampled_from([("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                               ("fc", "proj"), r"h\.0\.attn\.(q|v)_proj", ("mlp.proj",)])


def tiny_gpt(seed=0, n_layer=2, n_embd=8, dtype=np.float64):
    ml.manual_seed(seed)
    config = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=n_embd)
    return gpt.GPT(config).astype(dtype)


def tokens(seed=0, shape=(2, 6)):
    return np.random.default_rng(seed).integers(0, 11, size=shape)


def logits(model, idx):
    with ml.no_grad():
        return host(model(idx)).copy()


@given(seed=seeds, n_layer=st.integers(1, 3), n_embd=st.sampled_from([4, 8]), r=st.integers(1, 4),
       targets=target_sets, dora=st.booleans())
def test_count_from_the_configs_alone_equals_the_injected_model(seed, n_layer, n_embd, r,
                                                                 targets, dora):
    model = tiny_gpt(seed, n_layer, n_embd)
    _, total = lora.count_parameters(model)
    config = lora.LoraConfig(r=r, target_modules=targets, use_dora=dora,
                             rank_pattern={"v_proj": r + 1})
    idx = tokens(seed)
    base = logits(model, idx)
    lora.inject_lora(model, config)
    expected = lora.gpt_lora_param_count(model.config, config)
    assert lora.count_parameters(model) == (expected, total + expected)
    assert np.array_equal(logits(model, idx), base)  # B = 0: exactly the base model


def test_gpt_paths_and_the_reference_configs_trainable_fraction():
    model = tiny_gpt()
    lora.inject_lora(model, lora.LoraConfig(r=2))
    assert [p for p, _ in lora.lora_layers(model)] == [
        "h.0.attn.q_proj", "h.0.attn.v_proj", "h.1.attn.q_proj", "h.1.attn.v_proj"]
    # the benchmark's reference config: r = 8 on q and v trains about 1.5% of the parameters
    ref = gpt.GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
    n = lora.gpt_lora_param_count(ref, lora.LoraConfig(r=8))
    assert n == lora.lora_param_count(256, 4, 8) == 32_768
    total = 12 * 4 * 256 * 256 + 13 * 4 * 256 + 2 * 256 + (64 + 128) * 256
    assert 0.01 <= n / (total + n) <= 0.02


@given(seed=seeds, dora=st.booleans())
def test_only_the_adapters_get_gradients_and_merging_keeps_the_logits(seed, dora):
    model = tiny_gpt(seed)
    lora.inject_lora(model, lora.LoraConfig(r=2, use_dora=dora,
                                            target_modules=("q_proj", "v_proj", "fc")))
    randomize_lora(model, seed, scale=0.3)
    idx, targets = tokens(seed), tokens(seed + 1)
    _, loss = model(idx, targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    before = logits(model, idx)
    lora.merge(model)
    assert_close(logits(model, idx), before, 1e-10)
    lora.merge_and_unload(model)
    assert lora.lora_layers(model) == []
    assert_close(logits(model, idx), before, 1e-10)


def test_cached_generation_with_adapters_equals_uncached():
    model = tiny_gpt(3, dtype=np.float32)
    lora.inject_lora(model, lora.LoraConfig(r=2))
    randomize_lora(model, 3, scale=0.3)
    prompt = tokens(4, (2, 3))
    a, la = model.generate(prompt, 4, temperature=0, use_cache=True, return_logits=True)
    b, lb = model.generate(prompt, 4, temperature=0, use_cache=False, return_logits=True)
    assert np.array_equal(host(a), host(b))
    np.testing.assert_allclose(host(la), host(lb), rtol=1e-4, atol=1e-5)


def test_adapter_file_round_trip_on_a_gpt():
    model = tiny_gpt(5)
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "fc")))
    randomize_lora(model, 5)
    idx = tokens(5)
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        fresh = lora.load_adapter(tiny_gpt(5), d)
    assert np.array_equal(logits(fresh, idx), logits(model, idx))
