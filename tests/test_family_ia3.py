"""IA3: vectors that scale a layer's output (or, for a feedforward layer, its input).

At init (ones) the model is its base exactly; counts equal the formula; merged weights give the
unmerged logits at the base's counted FLOPs; gradients reach only the vectors and agree with
finite differences; it trains, and runs on a 4-bit base (where merging is refused)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import family, flops, lora, nn
from minilora.errors import ConfigError, InvalidArgumentError
from minilora.family.ia3 import SHORT, ia3_layers
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

NAMES = list(SHORT.values())  # q_proj, k_proj, v_proj, o_proj, mlp.fc, mlp.proj


@st.composite
def ia3_configs(draw):
    targets = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    ff = [t for t in targets if draw(st.booleans())]
    return family.IA3Config(tuple(targets), tuple(ff))


def randomize(model, seed, scale=0.5):
    """Vectors away from ones, so that every check sees them act."""
    rng = np.random.default_rng(seed)
    for _, layer in ia3_layers(model):
        p = layer.ia3_l
        p.data[...] = ml.backend.asarray((1 + rng.normal(0, scale, p.shape)).astype(p.data.dtype))


@pytest.mark.host_only("a config's fields, checked on the host")
def test_the_default_config_is_the_papers_and_names_are_checked():
    c = family.IA3Config()
    assert c.target_modules == ("k_proj", "v_proj", "mlp.proj")
    assert c.feedforward_modules == ("mlp.proj",) and c.init_ia3_weights is True
    assert family.IA3Config(["k_proj"], []).target_modules == ("k_proj",)
    with pytest.raises(ConfigError, match="subset of target_modules"):
        family.IA3Config(("k_proj",), ("mlp.proj",))
    with pytest.raises(ConfigError, match="target_modules must be"):
        family.IA3Config((3,))
    with pytest.raises(ConfigError, match="not a valid regex"):
        family.IA3Config("(")
    with pytest.raises(ConfigError, match="init_ia3_weights"):
        family.IA3Config(init_ia3_weights=1)
    for empty in ((), [], set()):  # nothing would be adapted: refused for what it is
        with pytest.raises(ConfigError, match="target_modules must name at least one module"):
            family.IA3Config(empty, ())


@given(config=gpt_configs(), ia3=ia3_configs(), seed=seeds)
@settings(max_examples=20, deadline=None)
def test_at_init_the_model_is_its_base_and_the_count_is_the_formula(config, ia3, seed):
    ml.manual_seed(seed)
    model = ml.GPT(config)
    idx = tokens(config, seed)
    before = logits(model, idx)
    _, total = lora.count_parameters(model)
    assert family.inject_ia3(model, ia3) is model
    assert np.array_equal(logits(model, idx), before)
    count = family.ia3_param_count(config, ia3)
    assert lora.count_parameters(model) == (count, total + count)
    C = config.n_embd
    if ia3 == family.IA3Config():
        assert count == 6 * config.n_layer * C
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith("ia3_l"), name
    for path, layer in ia3_layers(model):
        assert ia3.is_target(path)
        n = layer.in_features if ia3.is_feedforward(path) else layer.out_features
        assert layer.ia3_l.shape == (n,) and layer.is_feedforward == ia3.is_feedforward(path)


@given(seed=seeds, feedforward=st.booleans())
@settings(max_examples=10, deadline=None)
def test_the_layer_computes_its_equation(seed, feedforward):
    ml.manual_seed(seed)
    base = nn.Linear(5, 3)
    layer = family.IA3Linear(base, is_feedforward=feedforward)
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=5 if feedforward else 3).astype(np.float32)
    layer.ia3_l.data[...] = ml.backend.asarray(vec)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    W, b = host(base.weight).astype(np.float64), host(base.bias).astype(np.float64)
    expected = (x * vec) @ W.T + b if feedforward else (x @ W.T + b) * vec
    np.testing.assert_allclose(host(layer(ml.Tensor(ml.backend.asarray(x)))), expected,
                               rtol=1e-5, atol=1e-6)
    # output scaling reads only the base's own output; input scaling keeps x for l's gradient
    assert layer.keeps_own_inputs is (not feedforward)


@given(ia3=ia3_configs(), seed=seeds)
@settings(max_examples=15, deadline=None)
def test_merged_logits_equal_unmerged_at_the_bases_counted_flops(ia3, seed):
    model = tiny_gpt(seed)
    idx = tokens(model.config, seed)
    with flops.count() as base_flops:
        logits(model, idx)
    types = {p: type(m) for p, m in model.named_modules()}
    family.inject_ia3(model, ia3)
    randomize(model, seed)
    expected = {p: host(layer.base_layer.weight).astype(np.float64)
                * (host(layer.ia3_l)[None, :] if layer.is_feedforward
                   else host(layer.ia3_l)[:, None]) for p, layer in ia3_layers(model)}
    unmerged = logits(model, idx)
    assert family.merge_and_unload(model) is model
    assert {p: type(m) for p, m in model.named_modules()} == types
    assert family.core.family_config(model) is None and lora.count_parameters(model)[0] == 0
    for path, W in expected.items():  # W <- W diag(l) or diag(l) W
        np.testing.assert_allclose(host(model.get_submodule(path).weight), W, rtol=1e-6)
    with flops.count() as merged_flops:
        merged = logits(model, idx)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert merged_flops.by_site == base_flops.by_site


def test_gradients_reach_only_the_vectors_and_match_finite_differences():
    model = tiny_gpt(3, dtype=np.float64, n_layer=1, n_embd=4, vocab_size=7, block_size=5)
    family.inject_ia3(model, family.IA3Config(("q_proj", "k_proj", "v_proj", "o_proj",
                                               "mlp.fc", "mlp.proj"), ("o_proj", "mlp.proj")))
    randomize(model, 3)
    idx = tokens(model.config, 3)

    def loss():
        with ml.no_grad():
            return float(model(idx, idx)[1].item())

    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith("ia3_l"), name
    for path, layer in ia3_layers(model):
        np.testing.assert_allclose(host(layer.ia3_l.grad), numeric_grad(loss, layer.ia3_l.data),
                                   rtol=1e-5, atol=1e-8, err_msg=path)


def test_training_lowers_the_loss():
    model, data = task_model()
    family.inject_ia3(model)
    before, after = train_lowers_loss(model, data, lr=5e-2)
    assert after < before - 0.15, (before, after)


def test_nothing_targeted_is_refused_and_the_model_left_unmarked():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="matched no linear-like module.*'k_proj'"):
        family.inject_ia3(model, family.IA3Config(("c_attn",), ()))
    assert family.core.family_config(model) is None
    with pytest.raises(ConfigError, match="must be an IA3Config"):
        family.inject_ia3(model, lora.LoraConfig())


@given(seed=seeds)
@settings(max_examples=5, deadline=None)
def test_on_a_4bit_base_it_starts_equal_trains_and_refuses_to_merge(seed):
    model = quant.quantize_model(tiny_gpt(seed), blocksize=16)
    idx = tokens(model.config, seed)
    before = logits(model, idx)
    _, total = lora.count_parameters(model)
    family.inject_ia3(model)
    assert isinstance(model.h[0].attn.k_proj.base_layer, quant.QuantLinear)
    assert np.array_equal(logits(model, idx), before)
    count = family.ia3_param_count(model.config)
    assert lora.count_parameters(model) == (count, total + count)
    randomize(model, seed)
    model(idx, idx)[1].backward()
    assert all(layer.ia3_l.grad is not None for _, layer in ia3_layers(model))
    unmerged = logits(model, idx)
    with pytest.raises(InvalidArgumentError, match="re-quantize.*lossy"):
        family.merge_and_unload(model)
    assert len(ia3_layers(model)) == 2 * 3 and family.core.family_config(model) is not None
    assert np.array_equal(logits(model, idx), unmerged)


def test_init_false_draws_the_vectors():
    model = family.inject_ia3(tiny_gpt(), family.IA3Config(init_ia3_weights=False))
    assert not np.all(host(model.h[0].attn.k_proj.ia3_l) == 1)
