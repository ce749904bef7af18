"""Bottleneck adapters: h + up(act(down(h))) after the attention and after the MLP.

Zero up-projection: the model starts as its base exactly; counts and counted FLOPs per token
equal their formulas; gradients reach only the adapters and agree with finite differences; it
trains, runs on a 4-bit base, and cannot be merged."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import family, flops, lora
from minilora.errors import ConfigError, InvalidArgumentError
from minilora.family.bottleneck import BottleneckAdapter
from tests.helpers import host, numeric_grad
from tests.test_family_bitfit import (
    gpt_configs,
    logits,
    seeds,
    task_model,
    tiny_gpt,
    tokens,
    train_lowers_loss,
)

quant = pytest.importorskip("minilora.quant")

configs = st.builds(family.BottleneckConfig, bottleneck=st.integers(1, 6),
                    non_linearity=st.sampled_from(["gelu", "relu"]),
                    after=st.sampled_from([("attn",), ("mlp",), ("attn", "mlp")]))


def adapters(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def randomize(model, seed):
    """Non-zero up-projections, so that the adapters act."""
    rng = np.random.default_rng(seed)
    for _, a in adapters(model):
        for p in (a.up.weight, a.up.bias, a.down.weight, a.down.bias):
            p.data[...] = ml.backend.asarray(rng.normal(0, 0.3, p.shape).astype(p.data.dtype))


@pytest.mark.host_only("a config's fields, checked on the host")
def test_the_config_is_checked():
    c = family.BottleneckConfig()
    assert (c.bottleneck, c.non_linearity, c.after) == (16, "gelu", ("attn", "mlp"))
    assert family.BottleneckConfig(after=["mlp", "attn"]).after == ("attn", "mlp")
    for bad, needle in ((dict(bottleneck=0), "bottleneck must be an int >= 1"),
                        (dict(bottleneck=2**20), "MAX_BOTTLENECK"),
                        (dict(non_linearity="tanh"), "non_linearity must be one of"),
                        (dict(after=("ffn",)), "after must be"),
                        (dict(after=()), "after must be"),
                        (dict(init_scale=-1.0), "init_scale")):
        with pytest.raises(ConfigError, match=needle):
            family.BottleneckConfig(**bad)


@given(config=gpt_configs(), bn=configs, seed=seeds)
@settings(max_examples=20, deadline=None)
def test_at_init_the_model_is_its_base_and_the_count_is_the_formula(config, bn, seed):
    ml.manual_seed(seed)
    model = ml.GPT(config)
    idx = tokens(config, seed)
    before = logits(model, idx)
    _, total = lora.count_parameters(model)
    assert family.inject_bottleneck(model, bn) is model
    assert np.array_equal(logits(model, idx), before)
    count = family.bottleneck_param_count(config, bn)
    C, m = config.n_embd, bn.bottleneck
    assert count == config.n_layer * len(bn.after) * (2 * C * m + m + C)
    assert lora.count_parameters(model) == (count, total + count)
    assert len(adapters(model)) == config.n_layer * len(bn.after)
    for name, p in model.named_parameters():
        assert p.requires_grad == (".down." in name or ".up." in name), name


@given(config=gpt_configs(), bn=configs, seed=seeds, batch=st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_the_counted_extra_flops_per_token_are_the_formula(config, bn, seed, batch):
    ml.manual_seed(seed)
    model = ml.GPT(config)
    idx = tokens(config, seed, batch)
    with flops.count() as base:
        logits(model, idx)
    family.inject_bottleneck(model, bn)
    with flops.count() as adapted:
        logits(model, idx)
    per_token = (adapted.total - base.total) / idx.size
    assert per_token == family.bottleneck_flops_per_token(config, bn)
    assert per_token == config.n_layer * len(bn.after) * 2 * 2 * config.n_embd * bn.bottleneck


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gradients_reach_only_the_adapters_and_match_finite_differences(act):
    model = tiny_gpt(5, dtype=np.float64, n_layer=1, n_embd=4, vocab_size=7, block_size=5)
    family.inject_bottleneck(model, family.BottleneckConfig(bottleneck=3, non_linearity=act))
    randomize(model, 5)
    idx = tokens(model.config, 5)

    def loss():
        with ml.no_grad():
            return float(model(idx, idx)[1].item())

    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    for name, p in model.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(host(p.grad), numeric_grad(loss, p.data), rtol=1e-5,
                                       atol=1e-8, err_msg=name)


def test_the_adapter_computes_its_equation():
    model = family.inject_bottleneck(tiny_gpt(2), family.BottleneckConfig(bottleneck=3))
    randomize(model, 2)
    a = model.h[0].mlp.proj
    x = np.random.default_rng(0).normal(size=(2, 4 * 8)).astype(np.float32)
    h = x @ host(a.base_layer.weight).T + host(a.base_layer.bias)
    z = h @ host(a.down.weight).T + host(a.down.bias)
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    expected = h + z @ host(a.up.weight).T + host(a.up.bias)
    np.testing.assert_allclose(host(a(ml.Tensor(ml.backend.asarray(x)))), expected, rtol=1e-4,
                               atol=1e-5)


def test_training_lowers_the_loss():
    model, data = task_model()
    family.inject_bottleneck(model, family.BottleneckConfig(bottleneck=8))
    before, after = train_lowers_loss(model, data)
    assert after < before - 0.15, (before, after)


def test_merging_is_refused_saying_why_and_nothing_changes():
    model = family.inject_bottleneck(tiny_gpt())
    randomize(model, 0)
    idx = tokens(model.config)
    before = logits(model, idx)
    with pytest.raises(InvalidArgumentError, match="add layers.*nonlinearity.*no weight"):
        family.merge_and_unload(model)
    assert len(adapters(model)) == 4 and family.core.family_config(model) is not None
    assert np.array_equal(logits(model, idx), before)


def test_generation_with_the_kv_cache_sees_the_adapters():
    model = family.inject_bottleneck(tiny_gpt(1))
    randomize(model, 1)
    idx = tokens(model.config, 1)[:, :3]
    out, cached = model.generate(idx, 4, temperature=0, return_logits=True)
    _, plain = model.generate(idx, 4, temperature=0, use_cache=False, return_logits=True)
    np.testing.assert_allclose(host(cached), host(plain), rtol=1e-4, atol=1e-5)


@given(seed=seeds)
@settings(max_examples=5, deadline=None)
def test_on_a_4bit_base_it_starts_equal_and_trains(seed):
    model = quant.quantize_model(tiny_gpt(seed), blocksize=16)
    idx = tokens(model.config, seed)
    before = logits(model, idx)
    family.inject_bottleneck(model, family.BottleneckConfig(bottleneck=4))
    assert isinstance(model.h[0].attn.o_proj.base_layer, quant.QuantLinear)
    assert np.array_equal(logits(model, idx), before)
    model(idx, idx)[1].backward()
    assert all(a.up.weight.grad is not None for _, a in adapters(model))


@pytest.mark.host_only("the refusal is decided by module paths, before any array work")
def test_a_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="no linear"):
        family.inject_bottleneck(ml.nn.Sequential(ml.nn.Linear(3, 3)))
