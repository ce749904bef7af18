"""BitFit: only the biases train; the count equals L * 11 C + C; a bias-free model is refused.

Also the small GPTs, the task data and the few training steps the family's tests share.
"""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import family, lora
from minilora.data import TaskDataset, get_task
from minilora.errors import ConfigError, InvalidArgumentError
from tests.helpers import host

quant = pytest.importorskip("minilora.quant")

seeds = st.integers(0, 2**16)


@st.composite
def gpt_configs(draw, bias=True):
    """Small GPTConfigs: 1-3 layers, 1-2 heads of 1-4 channels, a short context."""
    n_head = draw(st.integers(1, 2))
    return ml.GPTConfig(vocab_size=draw(st.integers(5, 13)), block_size=draw(st.integers(4, 8)),
                        n_layer=draw(st.integers(1, 3)), n_head=n_head,
                        n_embd=n_head * draw(st.integers(1, 4)), bias=bias)


def tiny_gpt(seed=0, dtype=np.float32, **overrides):
    """A GPT small enough for every test, with random (not zero) biases so that BitFit and IA3
    act on something."""
    fields = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    fields.update(overrides)
    ml.manual_seed(seed)
    model = ml.GPT(ml.GPTConfig(**fields)).astype(dtype)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data[...] = ml.backend.asarray(rng.normal(0, 0.1, p.shape).astype(dtype))
    return model


def tokens(config, seed=0, batch=2):
    """Random token ids (batch, block_size)."""
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, config.block_size))


def logits(model, idx):
    """The model's logits on the host, no graph."""
    with ml.no_grad():
        return host(model(idx))


@functools.lru_cache(maxsize=1)
def _task_a_weights():
    data = TaskDataset(get_task("add", digits=1), n_heldout=20)
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=data.tokenizer.vocab_size,
                                block_size=data.block_size, n_layer=1, n_head=2, n_embd=16))
    train_lowers_loss(model, data, steps=60)
    return model.config, {k: host(v).copy() for k, v in model.state_dict().items()}


def task_model():
    """A one-block GPT trained briefly (full fine-tuning) on task A, 1-digit addition, and the
    data of task B, carry-less addition: a base with something to adapt, as in the benchmark."""
    config, weights = _task_a_weights()
    model = ml.GPT(config)
    model.load_state_dict(weights)
    return model, TaskDataset(get_task("nocarry", digits=1), n_heldout=20)


def train_lowers_loss(model, data, steps=30, lr=1e-2):
    """Train ``steps`` AdamW steps on task batches; returns (loss before, loss after) on a fixed
    batch, and checks that only trainable parameters received gradients."""
    rng = np.random.default_rng(0)
    x_eval, y_eval = data.get_batch(64, np.random.default_rng(1))

    def loss():
        with ml.no_grad():
            return float(model(x_eval, y_eval)[1].item())

    before = loss()
    opt = ml.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        x, y = data.get_batch(32, rng)
        opt.zero_grad()
        model.zero_grad()
        model(x, y)[1].backward()
        for p in model.parameters():
            assert (p.grad is not None) == p.requires_grad
        opt.step()
    return before, loss()


@given(config=gpt_configs(), seed=seeds)
@settings(max_examples=15, deadline=None)
def test_only_biases_train_and_their_count_is_the_formula(config, seed):
    ml.manual_seed(seed)
    model = ml.GPT(config)
    idx = tokens(config, seed)
    before = logits(model, idx)
    _, total = lora.count_parameters(model)
    assert family.bitfit(model) is model
    assert isinstance(model.family_config, family.BitFitConfig)
    assert np.array_equal(logits(model, idx), before)
    assert lora.count_parameters(model) == (family.bitfit_param_count(config), total)
    assert family.bitfit_param_count(config) == config.n_layer * 11 * config.n_embd + \
        config.n_embd
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith(".bias"), name


def test_a_model_without_biases_is_refused():
    model = ml.GPT(ml.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4,
                                bias=False))
    with pytest.raises(ConfigError, match="bias=False"):
        family.bitfit(model)
    assert family.core.family_config(model) is None
    assert family.bitfit_param_count(model.config) == 0


def test_a_second_method_is_refused():
    model = family.bitfit(tiny_gpt())
    with pytest.raises(ConfigError, match="already carries BitFitConfig"):
        family.inject_ia3(model)
    with pytest.raises(ConfigError, match="already carries BitFitConfig"):
        family.bitfit(model)


def test_training_lowers_the_loss_and_only_biases_get_gradients():
    model, data = task_model()
    weights = {k: host(v).copy() for k, v in model.state_dict().items() if k.endswith("weight")}
    family.bitfit(model)
    before, after = train_lowers_loss(model, data)
    assert after < before - 0.15, (before, after)
    for key, value in model.state_dict().items():
        if key.endswith("weight"):
            assert np.array_equal(host(value), weights[key]), key


@given(seed=seeds)
@settings(max_examples=5, deadline=None)
def test_on_a_4bit_base_the_quantlinear_biases_train(seed):
    model = quant.quantize_model(tiny_gpt(seed), blocksize=16)
    assert isinstance(model.h[0].attn.q_proj, quant.QuantLinear)
    _, total = lora.count_parameters(model)
    family.bitfit(model)
    assert lora.count_parameters(model) == (family.bitfit_param_count(model.config), total)
    assert model.h[0].attn.q_proj.bias.requires_grad
    idx = tokens(model.config, seed)
    model(idx, idx)[1].backward()
    assert model.h[0].attn.q_proj.bias.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("bias"))


def test_merge_and_unload_unmarks_and_freezes_and_changes_nothing():
    model = family.bitfit(tiny_gpt())
    idx = tokens(model.config)
    before = logits(model, idx)
    assert family.merge_and_unload(model) is model
    assert family.core.family_config(model) is None
    assert lora.count_parameters(model)[0] == 0
    assert np.array_equal(logits(model, idx), before)
    with pytest.raises(InvalidArgumentError, match="carries no method"):
        family.merge_and_unload(model)
