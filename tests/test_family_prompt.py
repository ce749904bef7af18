"""Prompt tuning and prefix tuning (minilora.family.prompt / prefix) as their equations.

The oracle below is GPT-2's forward written out again with NumPy arrays, taking the embeddings
and positions to run and, per layer, the prefix keys and values: prompt tuning's logits must be
the base run on [P; wte[idx]] at positions 0 .. N + T, prefix tuning's the base run on wte[idx]
at positions N .. N + T with every query also seeing the N prefix keys. Then: gradients reach
only the virtual tokens (and match finite differences), counted FLOPs grow as the formulas say,
the KV cache gives the uncached tokens, saving and loading is exact and refuses forged files.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import family, lora
from minilora.attention import prefix_self_attention
from minilora.errors import CheckpointError, ConfigError, InvalidArgumentError, ShapeError
from minilora.family import prompt as pt
from minilora.family.core import family_config
from minilora.family.prefix import PrefixEncoder, prefix_parameter_count
from minilora.lora.io import read_adapter_files, write_adapter_files
from tests.helpers import check_grads, host, numeric_grad

V, BLOCK, L, NH, C = 11, 12, 2, 2, 8
seeds = st.integers(0, 2**16)
methods = st.sampled_from(["prompt", "prefix"])
FEW = settings(max_examples=8, deadline=None)


def make_base(seed=0, dtype=np.float64, n_embd=C, n_layer=L, block=BLOCK):
    ml.manual_seed(seed)
    ml.set_default_dtype(dtype)
    model = ml.GPT(ml.GPTConfig(vocab_size=V, block_size=block, n_layer=n_layer, n_head=NH,
                                n_embd=n_embd))
    ml.set_default_dtype(np.float32)
    return model.eval()


def config_of(method, N, **kw):
    if method == "prompt":
        return family.PromptTuningConfig(N, **kw)
    return family.PrefixTuningConfig(N, **kw)


def randomize(model, seed, scale=0.5):
    """Learned values of the virtual tokens (not the init), from their own generator."""
    w = model.prompt_encoder.embedding.weight
    rng = np.random.default_rng(seed + 1)
    w.data[...] = B.asarray(rng.standard_normal(w.shape) * scale, dtype=w.data.dtype)
    return host(w.data).astype(np.float64)


def tokens(seed, b, t):
    return np.random.default_rng(seed).integers(0, V, (b, t))


def logits_of(model, idx):
    with ml.no_grad():
        return host(model(idx)).astype(np.float64)


# ----------------------------------------------------------------------------------- oracle

def _weight(layer):
    w = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else layer.weight.data
    return host(w).astype(np.float64)


def _linear(x, layer):
    y = x @ _weight(layer).T
    return y if layer.bias is None else y + host(layer.bias).astype(np.float64)


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-5) * host(ln.weight)
    return y if ln.bias is None else y + host(ln.bias)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _heads(x, nh):  # (B, S, C) -> (B, nh, S, hs)
    b, s, c = x.shape
    return x.reshape(b, s, nh, c // nh).transpose(0, 2, 1, 3)


def attention(q, k, v, nh, prefix_key=None, prefix_value=None):
    """softmax(q K^T / sqrt(hs) + M) V with K = [prefix; k], V = [prefix; v]: query t sees the
    N prefix keys and the real keys 0 .. t (the mask written from its definition)."""
    b, t, c = q.shape
    if prefix_key is not None:
        k, v = np.concatenate([prefix_key, k], 1), np.concatenate([prefix_value, v], 1)
    n = k.shape[1] - t
    s = _heads(q, nh) @ _heads(k, nh).swapaxes(-1, -2) / math.sqrt(c // nh)  # (B, nh, T, N + T)
    seen = np.arange(n + t)[None, :] <= n + np.arange(t)[:, None]  # (T, N + T)
    s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ _heads(v, nh)).transpose(0, 2, 1, 3).reshape(b, t, c)


def hand_logits(model, emb, pos, prefixes=None):
    """GPT-2 by hand on embeddings emb (B, S, C) at positions pos (S,); prefixes: per layer
    (keys, values) (B, N, C). Returns logits (B, S, V)."""
    x = emb + host(model.wpe.weight)[pos]
    for i, blk in enumerate(model.h):
        h = _layer_norm(x, blk.ln_1)
        a = blk.attn
        extra = () if prefixes is None else prefixes[i]
        y = attention(_linear(h, a.q_proj), _linear(h, a.k_proj), _linear(h, a.v_proj),
                      a.n_head, *extra)
        x = x + _linear(y, a.o_proj)
        x = x + _linear(_gelu(_linear(_layer_norm(x, blk.ln_2), blk.mlp.fc)), blk.mlp.proj)
    return _layer_norm(x, model.ln_f) @ host(model.wte.weight).astype(np.float64).T


def oracle(model, method, table, idx):
    """The logits of the real tokens, with the learned table (P (N, C), or the prefix's
    past_key_values (N, 2 L C) in PEFT's order: per layer its keys, then its values)."""
    b, t = idx.shape
    wte = host(model.wte.weight).astype(np.float64)
    N = table.shape[0]
    if method == "prompt":
        emb = np.concatenate([np.broadcast_to(table, (b,) + table.shape), wte[idx]], 1)
        return hand_logits(model, emb, np.arange(N + t))[:, N:]
    n_layer, c = len(model.h), wte.shape[1]
    past = table.reshape(N, n_layer, 2, c)
    prefixes = [(np.broadcast_to(past[:, i, 0], (b, N, c)),
                 np.broadcast_to(past[:, i, 1], (b, N, c))) for i in range(n_layer)]
    return hand_logits(model, wte[idx], np.arange(N, N + t), prefixes)


# ------------------------------------------------------------------------------ the forward

@FEW
@given(seed=seeds, method=methods, N=st.integers(1, 4), T=st.integers(1, 8),
       b=st.integers(1, 2), learned=st.booleans())
def test_logits_are_the_base_run_on_the_virtual_tokens(seed, method, N, T, b, learned):
    model = make_base(seed)
    family.inject_prompt(model, config_of(method, N))
    table = randomize(model, seed) if learned else \
        host(model.prompt_encoder.embedding.weight).astype(np.float64)
    idx = tokens(seed, b, T)
    got = logits_of(model, idx)
    assert got.shape == (b, T, V)
    np.testing.assert_allclose(got, oracle(model, method, table, idx), rtol=1e-9, atol=1e-10)


@FEW
@given(seed=seeds, method=methods, N=st.integers(1, 3), T=st.integers(2, 6))
def test_the_loss_is_the_real_tokens_cross_entropy(seed, method, N, T):
    model = make_base(seed)
    family.inject_prompt(model, config_of(method, N))
    table = randomize(model, seed)
    idx = tokens(seed, 2, T)
    targets = np.roll(idx, -1, axis=1)
    targets[:, -1] = -100  # nothing follows the last token
    targets[0, 0] = -100  # a prompt position, left out of the loss
    with ml.no_grad():
        _, loss = model(idx, targets)
    z = oracle(model, method, table, idx)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = targets != -100
    expected = -logp[keep, targets[keep]].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@FEW
@given(seed=seeds, b=st.integers(1, 2), N=st.integers(1, 4), T=st.integers(1, 5),
       nh=st.sampled_from([1, 2]))
def test_prefix_attention_is_its_equation_and_differentiates(seed, b, N, T, nh):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, T, 4)) for _ in range(3))
    pk, pv = (rng.standard_normal((b, N, 4)) for _ in range(2))
    got = prefix_self_attention(*(ml.Tensor(a) for a in (q, k, v, pk, pv)), nh)
    np.testing.assert_allclose(host(got), attention(q, k, v, nh, pk, pv), rtol=1e-12,
                               atol=1e-12)
    check_grads(lambda *t: prefix_self_attention(*t, nh), [q, k, v, pk, pv])


@pytest.mark.host_only("its arguments are refused before any array work")
def test_prefix_attention_refuses_prefixes_of_another_shape():
    q = ml.Tensor(np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="prefix keys and values"):
        prefix_self_attention(q, q, q, ml.Tensor(np.zeros((1, 2, 4))),
                              ml.Tensor(np.zeros((1, 2, 4))), 2)


# ---------------------------------------------------------------------------- the gradients

@FEW
@given(seed=seeds, method=methods, N=st.integers(1, 3))
def test_gradients_reach_only_the_virtual_tokens(seed, method, N):
    model = make_base(seed)
    family.inject_prompt(model, config_of(method, N))
    idx = tokens(seed, 2, 5)
    model.train()
    _, loss = model(idx, np.roll(idx, -1, axis=1))
    loss.backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == {"prompt_encoder.embedding.weight"}
    assert lora.count_parameters(model)[0] == model.prompt_encoder.embedding.weight.size


@pytest.mark.parametrize("method,kw", [("prompt", {}), ("prefix", {}),
                                       ("prefix", {"prefix_projection": True,
                                                   "encoder_hidden_size": 3})])
def test_gradients_agree_with_finite_differences(method, kw):
    model = make_base(3, n_embd=4, block=8)
    family.inject_prompt(model, config_of(method, 2, **kw))
    randomize(model, 3, scale=0.3)
    idx = tokens(3, 2, 4)
    targets = np.roll(idx, -1, axis=1)

    def loss() -> float:
        with ml.no_grad():
            return model(idx, targets)[1].item()

    model(idx, targets)[1].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n, _ in trainable} == {n for n, _ in model.prompt_encoder.named_parameters(
        "prompt_encoder")}
    for name, p in trainable:
        np.testing.assert_allclose(host(p.grad), numeric_grad(loss, p.data), rtol=1e-5,
                                   atol=1e-8, err_msg=name)


# --------------------------------------------------------------------------------- the costs

def counted(model, idx):
    with ml.no_grad(), ml.flops.count() as c:
        model(idx)
    return c.total


@FEW
@given(seed=seeds, N=st.integers(1, 4), T=st.integers(1, 7), b=st.integers(1, 2))
def test_prompt_tuning_runs_n_more_positions(seed, N, T, b):
    base = make_base(seed, np.float32)
    idx = tokens(seed, b, T)
    longer = counted(base, tokens(seed, b, N + T))  # the base on N + T positions
    base_flops = counted(base, idx)
    family.inject_prompt(base, family.PromptTuningConfig(N))
    # every layer runs N + T positions; the head only the T real ones (2 C V a position fewer)
    assert counted(base, idx) == longer - b * N * 2 * C * V
    assert counted(base, idx) - base_flops == b * pt.virtual_token_flops(base, T)


@FEW
@given(seed=seeds, N=st.integers(1, 4), T=st.integers(1, 7), b=st.integers(1, 2))
def test_a_prefix_adds_attention_over_n_keys_per_layer(seed, N, T, b):
    base = make_base(seed, np.float32)
    idx = tokens(seed, b, T)
    before = counted(base, idx)
    family.inject_prompt(base, family.PrefixTuningConfig(N))
    per_token = L * 2 * 2 * C * N  # q K^T and P V over N more keys, in every layer
    assert counted(base, idx) - before == b * T * per_token
    assert counted(base, idx) - before == b * pt.virtual_token_flops(base, T)


@given(method=methods, N=st.integers(1, 5), proj=st.booleans(), H=st.integers(1, 6))
@settings(max_examples=12, deadline=None)
def test_trainable_parameters_equal_their_formula(method, N, proj, H):
    model = make_base(0, np.float32)
    _, total = lora.count_parameters(model)
    kw = {"prefix_projection": proj, "encoder_hidden_size": H} if method == "prefix" else {}
    config = config_of(method, N, **kw)
    family.inject_prompt(model, config)
    if method == "prompt":
        expected = N * C
    elif not proj:
        expected = N * 2 * L * C
    else:
        expected = N * C + (C * H + H) + (H * 2 * L * C + 2 * L * C)
    assert pt.prompt_parameter_count(config, L, C) == expected
    assert lora.count_parameters(model) == (expected, total + expected)


# ---------------------------------------------------------------------------- the KV cache

@settings(max_examples=10, deadline=None)
@given(seed=seeds, method=methods, N=st.integers(1, 4), T=st.integers(1, 6),
       new=st.integers(1, 12))
def test_generation_with_the_cache_is_generation_without(seed, method, N, T, new):
    model = make_base(seed)
    family.inject_prompt(model, config_of(method, N))
    randomize(model, seed)
    idx = tokens(seed, 2, T)
    a, la = model.generate(idx, new, temperature=0, return_logits=True)
    b_, lb = model.generate(idx, new, temperature=0, use_cache=False, return_logits=True)
    assert np.array_equal(host(a), host(b_))
    np.testing.assert_allclose(host(la), host(lb), rtol=1e-9, atol=1e-10)
    # the first step is the oracle's last position (the prompt cropped to fit beside N)
    start = tokens(seed, 2, T)[:, -(BLOCK - N):]
    table = host(model.prompt_encoder.past_key_values() if method == "prefix"
                 else model.prompt_encoder.embedding.weight)
    np.testing.assert_allclose(host(la)[:, 0], oracle(model, method, table, start)[:, -1],
                               rtol=1e-9, atol=1e-10)


@FEW
@given(seed=seeds, method=methods, N=st.integers(1, 4), cut=st.integers(1, 5))
def test_the_cache_holds_the_virtual_tokens_in_its_first_n_entries(seed, method, N, cut):
    model = make_base(seed)
    family.inject_prompt(model, config_of(method, N))
    randomize(model, seed)
    idx = tokens(seed, 1, 7)
    cache = model.make_cache(1, N + 7)
    first = host(model.forward_with_cache(idx[:, :cut], cache))
    assert cache.length == N + cut
    rest = host(model.forward_with_cache(idx[:, cut:], cache))
    np.testing.assert_allclose(np.concatenate([first, rest], 1), logits_of(model, idx),
                               rtol=1e-9, atol=1e-10)


def test_the_context_left_is_block_size_minus_n():
    model = make_base()
    family.inject_prompt(model, family.PrefixTuningConfig(5))
    assert model.num_virtual_tokens == 5
    model(tokens(0, 1, BLOCK - 5))
    with pytest.raises(ShapeError, match=r"N=5 .*T=8 .*block_size=12"):
        model(tokens(0, 1, BLOCK - 4))
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=12 .*block_size=12"):
        family.inject_prompt(make_base(), family.PromptTuningConfig(BLOCK))
    out = model.generate(tokens(0, 1, BLOCK), 2, temperature=0)  # cropped to 7, as documented
    assert host(out).shape == (1, BLOCK + 2)


def test_a_base_without_a_method_has_no_virtual_tokens():
    model = make_base()
    assert model.prompt_encoder is None and model.num_virtual_tokens == 0
    assert "prompt_encoder" not in {n.split(".")[0] for n, _ in model.named_parameters()}


# ------------------------------------------------------------------------- init and config

def test_vocab_init_copies_rows_of_the_token_table_and_random_is_standard_normal():
    model = make_base(1)
    family.inject_prompt(model, family.PromptTuningConfig(6, init="vocab"))
    P, wte = host(model.prompt_encoder.embedding.weight), host(model.wte.weight)
    assert all((wte == row).all(axis=1).any() for row in P)
    model = make_base(1, block=64)
    family.inject_prompt(model, family.PromptTuningConfig(60))
    P = host(model.prompt_encoder.embedding.weight)
    assert abs(P.std() - 1.0) < 0.15 and abs(P.mean()) < 0.15  # PEFT's RANDOM: N(0, 1)


@pytest.mark.parametrize("proj", [False, True])
def test_zero_init_gives_zero_keys_and_values_yet_not_the_base(proj):
    model = make_base(2)
    idx = tokens(2, 1, 4)
    base = logits_of(model, idx)
    family.inject_prompt(model, family.PrefixTuningConfig(2, prefix_projection=proj,
                                                           init_weights="zero"))
    assert not host(model.prompt_encoder.past_key_values()).any()
    assert not np.allclose(logits_of(model, idx), base)  # zero keys still draw attention mass


@pytest.mark.host_only("a config's fields, checked on the host")
def test_configs_and_injection_refuse_bad_values_by_name():
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ConfigError, match="num_virtual_tokens"):
            family.PromptTuningConfig(bad)
        with pytest.raises(ConfigError, match="num_virtual_tokens"):
            family.PrefixTuningConfig(bad)
    with pytest.raises(ConfigError, match="init must be one of"):
        family.PromptTuningConfig(2, init="text")
    with pytest.raises(ConfigError, match="init_weights"):
        family.PrefixTuningConfig(2, init_weights="ones")
    with pytest.raises(ConfigError, match="prefix_projection"):
        family.PrefixTuningConfig(2, prefix_projection="yes")
    with pytest.raises(ConfigError, match="encoder_hidden_size"):
        family.PrefixTuningConfig(2, encoder_hidden_size=0)
    with pytest.raises(ConfigError, match="must be a minilora GPT"):
        family.inject_prompt(ml.nn.Linear(2, 2), family.PromptTuningConfig(2))
    with pytest.raises(ConfigError, match="PromptTuningConfig or PrefixTuningConfig"):
        family.inject_prompt(make_base(), lora.LoraConfig())


def test_one_method_per_model():
    model = family.inject_prompt(make_base(), family.PromptTuningConfig(2))
    assert isinstance(family_config(model), family.PromptTuningConfig)
    with pytest.raises(ConfigError, match="already"):
        family.inject_prompt(model, family.PrefixTuningConfig(2))
    assert model.num_virtual_tokens == 2


# ------------------------------------------------------------------------ saving and loading

@FEW
@given(seed=seeds, method=methods, N=st.integers(1, 4))
def test_adapter_arrays_round_trip_gives_identical_logits(seed, method, N):
    model = family.inject_prompt(make_base(seed), config_of(method, N))
    randomize(model, seed)
    config, arrays = pt.adapter_arrays(model)
    width = C * (2 * L if method == "prefix" else 1)
    assert list(arrays) == ["prompt_embeddings"] and arrays["prompt_embeddings"].shape == \
        (N, width)
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    assert (config["task_type"], config["num_virtual_tokens"], config["token_dim"],
            config["num_layers"], config["num_attention_heads"],
            config["num_transformer_submodules"]) == ("CAUSAL_LM", N, C, L, NH, 1)
    loaded = pt.apply_adapter(make_base(seed), config, arrays)
    idx = tokens(seed, 2, 5)
    assert np.array_equal(logits_of(loaded, idx), logits_of(model, idx))
    assert lora.count_parameters(loaded)[0] == N * width


@pytest.mark.parametrize("method,kw", [("prompt", {"init": "vocab"}), ("prefix", {}),
                                       ("prefix", {"prefix_projection": True})])
def test_a_directory_round_trip_gives_identical_logits(tmp_path, method, kw):
    model = family.inject_prompt(make_base(4), config_of(method, 3, **kw))
    if not kw.get("prefix_projection"):
        randomize(model, 4)
    write_adapter_files(tmp_path / "adapter", *pt.adapter_arrays(model))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    config, arrays, _ = read_adapter_files(tmp_path / "adapter", "test",
                                           lambda d, path: d)
    loaded = pt.apply_adapter(make_base(4), config, arrays)
    idx = tokens(4, 2, 6)
    np.testing.assert_allclose(logits_of(loaded, idx), logits_of(model, idx), rtol=1e-12,
                               atol=1e-13)  # with the MLP: its output, the same numbers
    assert isinstance(loaded.prompt_encoder, PrefixEncoder if method == "prefix"
                      else pt.PromptEmbedding)
    assert not getattr(family_config(loaded), "prefix_projection", False)


FORGERIES = [
    (lambda c, a: c.update(num_virtual_tokens=c["num_virtual_tokens"] + 1), "needs"),
    (lambda c, a: c.update(token_dim=C * 2), "token_dim"),
    (lambda c, a: c.update(num_layers=L + 1), "num_layers"),
    (lambda c, a: c.update(num_virtual_tokens="3"), "num_virtual_tokens"),
    (lambda c, a: c.update(num_virtual_tokens=BLOCK), "block_size"),
    (lambda c, a: c.update(peft_type="LORA"), "peft_type"),
    (lambda c, a: c.update(num_transformer_submodules=2), "num_transformer_submodules"),
    (lambda c, a: c.update(task_type="SEQ_2_SEQ_LM"), "task_type"),
    (lambda c, a: a.update(extra=np.zeros(3)), "the one tensor"),
    (lambda c, a: a.update(prompt_embeddings=a["prompt_embeddings"][None]), "has shape"),
]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("forge,words", FORGERIES)
def test_a_forged_adapter_is_refused_before_anything_is_allocated(method, forge, words):
    config, arrays = pt.adapter_arrays(family.inject_prompt(make_base(), config_of(method, 3)))
    forge(config, arrays)
    target = make_base()
    with pytest.raises(CheckpointError, match=words):
        pt.apply_adapter(target, config, arrays)
    assert target.prompt_encoder is None and family_config(target) is None
    assert all(p.requires_grad for p in target.parameters())  # nothing frozen either


def test_adapter_arrays_wants_a_prompt_or_prefix():
    with pytest.raises(InvalidArgumentError, match="not prompt or prefix tuning"):
        pt.adapter_arrays(make_base())


# -------------------------------------------------------------------------------- 4-bit base

@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_on_a_4bit_base(method):
    quant = pytest.importorskip("minilora.quant")
    model = quant.quantize_model(make_base(5, np.float32, n_embd=16), blocksize=16)
    assert type(model.h[0].attn.q_proj).__name__ == "QuantLinear"
    family.inject_prompt(model, config_of(method, 3))
    table = randomize(model, 5, scale=0.3)
    idx = tokens(5, 2, 5)
    np.testing.assert_allclose(logits_of(model, idx), oracle(model, method, table, idx),
                               rtol=1e-4, atol=1e-4)  # float32 against the float64 oracle
    _, loss = model(idx, np.roll(idx, -1, axis=1))
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {"prompt_encoder.embedding.weight"}
    a = model.generate(idx, 8, temperature=0)
    assert np.array_equal(host(a), host(model.generate(idx, 8, temperature=0, use_cache=False)))


@pytest.mark.host_only("counts parameter sizes; no kernel runs")
def test_prefix_parameter_count_with_the_mlp_is_its_modules():
    config = family.PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=5)
    encoder = PrefixEncoder(config, L, C)
    assert prefix_parameter_count(config, L, C) == sum(p.size for p in encoder.parameters())
