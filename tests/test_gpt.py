"""The GPT: config checks, GPT-2 layout and init, causality, gradients, the fused attention and
GELU nodes, the KV cache against the full forward, sampling, generation, and a tiny overfit."""

import functools
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import attention as A
from minilora import backend as B
from minilora import functional as F
from minilora import gpt as G
from minilora.errors import ConfigError, DTypeError, InvalidArgumentError, ShapeError
from minilora.fast import attention as fast_attention
from minilora.gpt import GPT, GPTConfig
from minilora.nn import Linear, ModuleList
from tests.helpers import check_grads, host, numeric_grad

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny(seed=0, dtype=np.float64, **overrides):
    ml.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).astype(dtype)


@functools.cache
def shared_tiny(dtype=np.float64):
    """One model for the property tests (built once: hypothesis calls the body many times)."""
    return tiny(1, dtype).eval()


def tokens(shape, vocab=TINY["vocab_size"], seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("block_size", -1), ("n_layer", 1.5), ("n_head", True), ("n_embd", "8"),
    ("n_head", 3), ("dropout", 1.0), ("dropout", -0.1), ("bias", "yes"),
])
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**{**TINY, field: value})


def test_config_errors_say_what_a_size_must_be():
    with pytest.raises(ConfigError, match=r"GPTConfig: n_layer must be an int >= 1 \(positive\), "
                                          r"got 1.5"):
        GPTConfig(**{**TINY, "n_layer": 1.5})
    with pytest.raises(ConfigError, match="n_embd=65536 is more than MAX_N_EMBD = 32768"):
        GPTConfig(**{**TINY, "n_embd": 2**16, "n_head": 1})
    assert type(GPTConfig(**{**TINY, "n_layer": np.int64(2)}).n_layer) is int


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    cfg = GPTConfig(**TINY, dropout=0.1, bias=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="n_ctx"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_ctx": 3})
    assert GPTConfig.gpt2().to_dict() == dict(vocab_size=50257, block_size=1024, n_layer=12,
                                              n_head=12, n_embd=768, dropout=0.0, bias=True)


def test_gpt_wants_a_config():
    with pytest.raises(ConfigError, match="GPTConfig"):
        GPT(dict(TINY))


# ------------------------------------------------------------------------- layout, init

def test_module_paths_are_gpt2s_and_projections_are_linear_modules():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["wte.weight", "wpe.weight"]
    assert names[-2:] == ["ln_f.weight", "ln_f.bias"]
    block = [n[len("h.0."):] for n in names if n.startswith("h.0.")]
    assert block == ["ln_1.weight", "ln_1.bias",
                     *[f"attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                       for w in ("weight", "bias")],
                     "ln_2.weight", "ln_2.bias",
                     "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias"]
    assert isinstance(model.h, ModuleList) and len(model.h) == 2
    for blk in model.h:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert type(getattr(blk.attn, name)) is Linear
        assert (blk.mlp.fc.in_features, blk.mlp.fc.out_features) == (8, 32)
        assert (blk.mlp.proj.in_features, blk.mlp.proj.out_features) == (32, 8)
    assert model.config == GPTConfig(**TINY)
    assert "lm_head" not in " ".join(names)  # the head is wte itself


def test_bias_false_drops_every_bias():
    model = tiny(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert model(tokens((2, 5))).shape == (2, 5, 11)


def test_parameter_count_formula():
    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    C, L = 256, 4
    per_layer = 12 * C * C + 13 * C  # 4 C x C projections, C -> 4C -> C MLP, their biases, 2 LNs
    total = 64 * C + 128 * C + L * per_layer + 2 * C
    assert model.num_parameters() == total == sum(p.size for p in model.parameters())
    assert model.num_parameters(non_embedding=True) == total - 128 * C
    model.requires_grad_(False)
    model.h[0].attn.q_proj.weight.requires_grad_(True)
    assert model.num_parameters(trainable_only=True) == C * C


def test_gpt2_init_statistics_and_residual_scaling():
    ml.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=128)
    model = GPT(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        v = host(p)
        assert v.dtype == np.float32, name
        if v.ndim == 2:
            std = resid if name.endswith(("o_proj.weight", "mlp.proj.weight")) else 0.02
            assert abs(v.std() - std) < 0.05 * std, name
            assert abs(v.mean()) < 0.1 * std, name
        elif name.endswith("bias"):
            assert not v.any(), name
        else:  # LayerNorm gains
            assert (v == 1).all(), name


def test_same_seed_same_weights_bit_for_bit_and_float64_matches_float32():
    a, b, c = tiny(7, np.float32), tiny(7, np.float32), tiny(8, np.float32)
    ml.manual_seed(7)
    with B.default_dtype_as(np.float64):
        d = GPT(GPTConfig(**TINY))
    for (name, p), q, r, s in zip(a.named_parameters(), b.parameters(), c.parameters(),
                                  d.parameters()):
        np.testing.assert_array_equal(host(p), host(q), err_msg=name)
        assert s.dtype == np.float64
        np.testing.assert_array_equal(host(p), host(s).astype(np.float32), err_msg=name)
        if p.ndim == 2:
            assert not np.array_equal(host(p), host(r)), name


# ------------------------------------------------------------------------------ forward

def test_forward_shapes_dtypes_and_the_tied_head():
    model = tiny(dtype=np.float32)
    idx = tokens((3, 6))
    logits = model(idx)
    assert logits.shape == (3, 6, 11) and logits.dtype == np.float32
    # an independent forward from the parameters, as the docstring states it
    with ml.no_grad():
        x = model.wte(idx) + model.wpe(np.arange(6))
        for blk in model.h:
            x = blk(x)
        expected = host(model.ln_f(x)) @ host(model.wte.weight).T
    np.testing.assert_allclose(host(logits), expected, rtol=1e-5, atol=1e-6)
    logits2, loss = model(idx, tokens((3, 6), seed=1))
    np.testing.assert_array_equal(host(logits2), host(logits))
    assert loss.shape == () and loss.dtype == np.float32


def test_loss_at_init_is_close_to_log_vocab():
    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64))
    _, loss = model(tokens((8, 32), 64), tokens((8, 32), 64, seed=1))
    assert abs(loss.item() - math.log(64)) < 0.1


def test_targets_ignore_index_leaves_positions_out_of_the_loss():
    model = tiny()
    idx, tgt = tokens((2, 5)), tokens((2, 5), seed=3)
    masked = tgt.copy()
    masked[:, :2] = -100
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(ml.Tensor(logits.data[:, 2:]), tgt[:, 2:])
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-12)


@given(data=st.data())
def test_causality_later_tokens_never_change_earlier_logits(data):
    model = shared_tiny()
    T = data.draw(st.integers(2, TINY["block_size"]), label="T")
    t = data.draw(st.integers(0, T - 2), label="t")
    V = TINY["vocab_size"]
    idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T)))[None]
    changed = idx.copy()
    changed[0, t + 1:] = data.draw(st.lists(st.integers(0, V - 1), min_size=T - t - 1,
                                            max_size=T - t - 1))
    with ml.no_grad(), split_queries_from(data.draw(st.sampled_from([2, 64]), label="split")):
        a, b = host(model(idx)), host(model(changed))
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-12, atol=1e-12)
    if (changed[0, t + 1:] != idx[0, t + 1:]).any():  # and it is not a vacuous check
        assert not np.allclose(a[:, t + 1:], b[:, t + 1:], rtol=1e-12, atol=1e-12)


def test_forward_errors_name_the_problem():
    model = tiny()
    with pytest.raises(DTypeError, match="integer"):
        model(np.zeros((1, 3)))
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        model(np.zeros(3, dtype=np.int64))
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        model(np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(ShapeError, match="block_size=8"):
        model(tokens((1, 9)))
    with pytest.raises(InvalidArgumentError, match=r"\[0, 11\).*11"):
        model(np.array([[0, 11]]))
    with pytest.raises(InvalidArgumentError, match="-1"):
        model(np.array([[-1, 2]]))


def test_no_grad_forward_records_no_graph():
    model = tiny()
    with ml.no_grad():
        logits, loss = model(tokens((2, 4)), tokens((2, 4), seed=1))
    assert not logits.requires_grad and logits._parents == () and loss._backward is None


def test_dropout_is_random_in_training_and_off_in_eval():
    model = tiny(dropout=0.3)
    plain = tiny(dropout=0.0)
    idx = tokens((2, 6))
    ml.manual_seed(5)
    a = host(model(idx))
    b = host(model(idx))
    ml.manual_seed(5)
    c = host(model(idx))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)  # same seed, same masks
    model.eval()
    np.testing.assert_allclose(host(model(idx)), host(plain(idx)), rtol=1e-12)


# ---------------------------------------------------------------------------- gradients

def test_every_parameter_gradient_matches_finite_differences():
    ml.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=2, n_head=2, n_embd=4)).double()
    idx, tgt = tokens((2, 4), 5, seed=1), tokens((2, 4), 5, seed=2)
    _, loss = model(idx, tgt)
    loss.backward()

    def f():
        with ml.no_grad():
            return model(idx, tgt)[1].item()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == np.float64, name
        np.testing.assert_allclose(host(p.grad), numeric_grad(f, p.data), rtol=1e-5, atol=1e-8,
                                   err_msg=name)


def test_tied_weight_gets_the_embedding_and_the_head_contributions():
    model = tiny()
    idx, tgt = tokens((2, 5)), tokens((2, 5), seed=4)
    _, loss = model(idx, tgt)
    loss.backward()
    total = host(model.wte.weight.grad).copy()
    # the head's share alone: the same loss with the embedding lookup cut from the table
    model.zero_grad()
    detached = ml.Tensor(model.wte.weight.data.copy())
    x = F.embedding(idx, detached) + model.wpe(np.arange(5))
    for blk in model.h:
        x = blk(x)
    F.cross_entropy(F.linear(model.ln_f(x), model.wte.weight), tgt).backward()
    head = host(model.wte.weight.grad)
    assert np.abs(head).sum() > 0 and np.abs(total - head).sum() > 0
    # the embedding's share: rows of tokens not in idx get only the head's gradient
    unused = np.setdiff1d(np.arange(11), idx)
    np.testing.assert_allclose(total[unused], head[unused], rtol=1e-12)


def test_frozen_weights_get_no_gradient_and_the_rest_is_unchanged():
    model, ref = tiny(3), tiny(3)
    idx, tgt = tokens((2, 6)), tokens((2, 6), seed=1)
    model.requires_grad_(False)
    keep = [model.h[1].attn.q_proj.weight, model.h[1].attn.v_proj.bias, model.h[0].mlp.fc.weight]
    for p in keep:
        p.requires_grad_(True)
    model(idx, tgt)[1].backward()
    ref(idx, tgt)[1].backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        if any(p is k for k in keep):
            np.testing.assert_allclose(host(p.grad), host(r.grad), rtol=1e-12, err_msg=name)
        else:
            assert p.grad is None, name


def attention_reference(q, k, v, n_head):
    """The same attention from elementary ops: heads, scores, mask, softmax, weighted sum."""
    Bsz, T, C = q.shape
    hs = C // n_head

    def heads(t):
        return t.reshape(Bsz, T, n_head, hs).permute(0, 2, 1, 3)  # (B, nh, T, hs)
    att = (heads(q) @ heads(k).transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    mask = np.tril(np.ones((T, T), dtype=bool))
    att = ml.where(mask, att, -np.inf)
    y = F.softmax(att, axis=-1) @ heads(v)  # (B, nh, T, hs)
    return y.permute(0, 2, 1, 3).reshape(Bsz, T, C)


def split_queries_from(n):
    """Make the fused attention (the fast form) split its queries in two blocks from length n
    on."""
    return mock.patch.object(fast_attention, "SPLIT_FROM", n)


@given(B_=st.integers(1, 3), T=st.integers(1, 7), nh=st.sampled_from([1, 2, 3]),
       hs=st.integers(1, 3), seed=st.integers(0, 2**16), split=st.sampled_from([2, 64]))
def test_fused_attention_equals_the_elementary_ops_with_gradients(B_, T, nh, hs, seed, split):
    rng = np.random.default_rng(seed)
    q, k, v = (ml.Tensor(rng.standard_normal((B_, T, nh * hs)), requires_grad=True)
               for _ in range(3))
    q2, k2, v2 = (ml.Tensor(t.data.copy(), requires_grad=True) for t in (q, k, v))
    with split_queries_from(split):
        y = A.causal_self_attention(q, k, v, nh)
    y2 = attention_reference(q2, k2, v2, nh)
    np.testing.assert_allclose(host(y), host(y2), rtol=1e-10, atol=1e-12)
    w = ml.Tensor(rng.standard_normal(y.shape))
    with split_queries_from(split):
        (y * w).sum().backward()
    (y2 * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        np.testing.assert_allclose(host(a.grad), host(b.grad), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("split", [2, 64])
def test_fused_attention_gradients_match_finite_differences_also_with_dropout(split):
    rng = np.random.default_rng(0)
    qkv = [rng.standard_normal((2, 5, 6)) for _ in range(3)]

    def dropped(q, k, v):
        ml.manual_seed(3)  # the same mask at every evaluation
        return A.causal_self_attention(q, k, v, 2, dropout_p=0.4)
    with split_queries_from(split):
        check_grads(lambda q, k, v: A.causal_self_attention(q, k, v, 2), qkv)
        check_grads(dropped, qkv)


@pytest.mark.parametrize("split", [2, 64])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)])
def test_fused_attention_computes_only_the_gradients_asked_for(needs, split):
    rng = np.random.default_rng(1)
    data = [rng.standard_normal((2, 5, 6)) for _ in range(3)]
    full = [ml.Tensor(d, requires_grad=True) for d in data]
    part = [ml.Tensor(d, requires_grad=n) for d, n in zip(data, needs)]
    w = ml.Tensor(rng.standard_normal((2, 5, 6)))
    with split_queries_from(split):
        (A.causal_self_attention(*full, 2) * w).sum().backward()
        (A.causal_self_attention(*part, 2) * w).sum().backward()
    for f, p, n in zip(full, part, needs):
        if n:
            np.testing.assert_allclose(host(p.grad), host(f.grad), rtol=1e-12)
        else:
            assert p.grad is None


def test_fused_attention_errors():
    x = ml.Tensor(np.zeros((1, 3, 6)))
    with pytest.raises(ShapeError, match="n_head=4"):
        A.causal_self_attention(x, x, x, 4)
    with pytest.raises(ShapeError, match=r"\(1, 3, 6\) and \(1, 2, 6\)"):
        A.causal_self_attention(x, ml.Tensor(np.zeros((1, 2, 6))), x, 2)
    with pytest.raises(InvalidArgumentError, match="dropout_p"):
        A.causal_self_attention(x, x, x, 2, dropout_p=1.0)


def test_causal_mask_is_additive_and_shared():
    m = host(A.causal_mask(4, np.float32))
    assert m.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(m), np.triu(np.ones((4, 4), bool), 1))
    assert (m[np.tril_indices(4)] == 0).all()
    big = A.causal_mask(6, np.float64)
    np.testing.assert_array_equal(host(A.causal_mask(3, np.float64)), host(big)[:3, :3])


# ----------------------------------------------------------------------------- KV cache

@given(cuts=st.lists(st.integers(1, 4), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_cached_forward_in_pieces_equals_the_full_forward(cuts, seed):
    model = shared_tiny()
    T = TINY["block_size"]
    idx = tokens((2, T), seed=seed)
    with ml.no_grad():
        full = host(model(idx))
    cache = model.make_cache(2)
    start = 0
    for n in cuts:
        n = min(n, T - start)
        if n == 0:
            break
        part = host(model.forward_with_cache(idx[:, start:start + n], cache))
        np.testing.assert_allclose(part, full[:, start:start + n], rtol=1e-10, atol=1e-12)
        start += n
    assert cache.length == start


def test_cache_overflow_and_batch_mismatch_are_errors():
    model = tiny()
    cache = model.make_cache(1, size=4)
    model.forward_with_cache(tokens((1, 3)), cache)
    with pytest.raises(ShapeError, match="block_size=8"):
        model.forward_with_cache(tokens((1, 6)), cache)
    with pytest.raises(InvalidArgumentError, match="cache size 4"):
        model.forward_with_cache(tokens((1, 2)), cache)
    with pytest.raises(ShapeError, match="batch"):
        model.forward_with_cache(tokens((2, 1)), model.make_cache(1))
    with pytest.raises(InvalidArgumentError, match="size"):
        model.make_cache(1, size=9)


# ---------------------------------------------------------------------------- sampling

def test_sampling_follows_softmax_of_logits_over_temperature():
    logits = np.array([[1.0, 0.0, -1.0, 2.0, 0.5]])
    n = 200_000
    rng = np.random.default_rng(0)
    for temp in (1.0, 0.5):
        drawn = G._sample(np.repeat(logits, n, axis=0), temp, None, rng)
        freq = np.bincount(drawn, minlength=5) / n
        p = np.exp(logits[0] / temp) / np.exp(logits[0] / temp).sum()
        tol = 5 * np.sqrt(p * (1 - p) / n)  # five binomial standard errors
        assert (np.abs(freq - p) < tol).all(), (temp, freq, p)


@given(k=st.integers(1, 6), seed=st.integers(0, 2**16), temp=st.floats(0.05, 5.0))
def test_top_k_samples_only_among_the_k_largest(k, seed, temp):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((50, 6))
    drawn = G._sample(logits, temp, k, rng)
    kth = np.sort(logits, axis=-1)[:, -k]
    assert (logits[np.arange(50), drawn] >= kth).all()
    assert ((0 <= drawn) & (drawn < 6)).all()


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = np.random.default_rng(0).standard_normal((40, 9))
    np.testing.assert_array_equal(G._sample(logits, 0.0, None, None), logits.argmax(-1))
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(G._sample(logits, 1.0, 1, rng), logits.argmax(-1))


# --------------------------------------------------------------------------- generation

@pytest.mark.parametrize("prompt_len,new", [(3, 4), (5, 9), (8, 3)])  # the last two overflow
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 3)])
def test_cached_generation_equals_uncached(prompt_len, new, temperature, top_k):
    model = shared_tiny()
    prompt = tokens((2, prompt_len), seed=prompt_len)
    a, la = model.generate(prompt, new, temperature, top_k, seed=11, return_logits=True)
    b, lb = model.generate(prompt, new, temperature, top_k, seed=11, use_cache=False,
                           return_logits=True)
    np.testing.assert_array_equal(host(a), host(b))
    assert la.shape == (2, new, 11)
    np.testing.assert_allclose(host(la), host(lb), rtol=1e-10, atol=1e-12)


def test_generation_logits_are_the_forward_of_the_cropped_context():
    model = shared_tiny()
    prompt = tokens((1, 6), seed=2)
    out, logits = model.generate(prompt, 5, temperature=0.0, return_logits=True)
    out = host(out)
    assert out.shape == (1, 11)
    np.testing.assert_array_equal(out[:, :6], prompt)
    block = TINY["block_size"]
    for step in range(5):
        context = out[:, max(0, 6 + step - block):6 + step]  # the last block_size tokens
        with ml.no_grad():
            expected = host(model(context))[:, -1]
        np.testing.assert_allclose(host(logits)[:, step], expected, rtol=1e-10, atol=1e-12)
        assert out[0, 6 + step] == expected[0].argmax()


def test_generation_is_seeded_and_uses_manual_seed_without_one():
    model = shared_tiny()
    prompt = tokens((3, 2))
    a = host(model.generate(prompt, 6, seed=4))
    b = host(model.generate(prompt, 6, seed=4))
    c = host(model.generate(prompt, 6, seed=5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ml.manual_seed(9)
    d = host(model.generate(prompt, 6))
    ml.manual_seed(9)
    np.testing.assert_array_equal(d, host(model.generate(prompt, 6)))


def test_long_prompts_are_cropped_and_the_mode_restored():
    model = tiny(dtype=np.float64, dropout=0.2)
    model.train()
    long = tokens((1, 12), seed=3)
    out = host(model.generate(long, 3, temperature=0.0))
    assert out.shape == (1, 15)
    np.testing.assert_array_equal(out[:, :12], long)
    cropped = host(model.generate(long[:, -8:], 3, temperature=0.0))
    np.testing.assert_array_equal(out[:, 12:], cropped[:, 8:])
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_generate_accepts_a_tensor_and_zero_new_tokens():
    model = shared_tiny()
    prompt = tokens((2, 3))
    out, logits = model.generate(ml.Tensor(prompt), 0, return_logits=True)
    np.testing.assert_array_equal(host(out), prompt)
    assert logits.shape == (2, 0, 11)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(seed=-3), "seed"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 0, got True"),
    (dict(top_k=2.0), r"top_k, if given, must be an int >= 1 \(positive\), got 2.0"),
    (dict(seed=1.5), r"seed, if given, must be an int >= 0, got 1.5"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        shared_tiny().generate(tokens((1, 2)), **{"max_new_tokens": 2, **kwargs})


def test_generate_rejects_bad_prompts():
    model = shared_tiny()
    with pytest.raises(DTypeError):
        model.generate(np.zeros((1, 2)), 1)
    with pytest.raises(ShapeError):
        model.generate(np.zeros(3, dtype=np.int64), 1)
    with pytest.raises(InvalidArgumentError, match="vocab_size"):
        model.generate(np.array([[3, 40]]), 1)


# ------------------------------------------------------------------------------ training

def test_a_tiny_batch_overfits():
    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    data = tokens((4, 17), 16, seed=5)
    x, y = data[:, :-1], data[:, 1:]
    opt = ml.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
    assert losses[0] > 2.0 and losses[-1] < 0.05, (losses[0], losses[-1], len(losses))
    assert model.wte.weight.dtype == np.float32


# ------------------------------------------------------- config limits and types (issue #11)

@pytest.mark.parametrize("field,limit", [
    ("vocab_size", "MAX_VOCAB_SIZE"), ("block_size", "MAX_BLOCK_SIZE"),
    ("n_layer", "MAX_N_LAYER"), ("n_head", "MAX_N_HEAD"), ("n_embd", "MAX_N_EMBD"),
])
def test_config_sizes_beyond_their_named_limit_are_refused(field, limit):
    value = getattr(G, limit) + 1
    sizes = {**TINY, field: value}
    if field in ("n_head", "n_embd"):
        sizes["n_embd"] = sizes["n_head"] * (value if field == "n_embd" else 1)  # divisible
    with pytest.raises(ConfigError) as info:
        GPTConfig(**sizes)
    msg = str(info.value)
    assert f"{field}={sizes[field]}" in msg and f"{limit} = {getattr(G, limit)}" in msg, msg


def test_config_limits_allow_gpt2_xl_and_a_forged_vocab_is_refused_at_once():
    xl = GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600)
    assert xl.n_embd == 1600
    with pytest.raises(ConfigError, match="vocab_size=1000000000000"):
        GPTConfig.from_dict({**TINY, "vocab_size": 10**12})


def test_config_dropout_must_be_a_number_not_a_bool():
    with pytest.raises(ConfigError, match="dropout must be a number .*got False"):
        GPTConfig(**TINY, dropout=False)  # a JSON false is not a rate of 0


def test_config_from_dict_names_missing_fields_and_wants_a_dict():
    d = GPTConfig(**TINY).to_dict()
    del d["n_head"], d["vocab_size"]
    with pytest.raises(ConfigError, match=r"missing \['n_head', 'vocab_size'\]"):
        GPTConfig.from_dict(d)
    with pytest.raises(ConfigError, match="dict.*list"):
        GPTConfig.from_dict([("vocab_size", 11)])


@given(V=st.integers(1, 300), T=st.integers(1, 64), L=st.integers(1, 3), heads=st.integers(1, 3),
       per_head=st.integers(1, 8), bias=st.booleans())
@settings(max_examples=25, deadline=None)
def test_parameter_count_from_the_config_is_the_built_model_s(V, T, L, heads, per_head, bias):
    from minilora.gpt import parameter_count

    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=heads,
                    n_embd=heads * per_head, bias=bias)
    assert parameter_count(cfg) == GPT(cfg).num_parameters()


def test_a_config_whose_weights_exceed_the_memory_is_refused_before_any_allocation(monkeypatch):
    from minilora.fast import cpu
    from minilora.gpt import parameter_count

    # every size within its limit, together 206 billion parameters
    big = GPTConfig(vocab_size=16, block_size=16, n_layer=1024, n_head=2, n_embd=4096)
    assert parameter_count(big) > 2e11
    monkeypatch.setattr(cpu, "available_memory", lambda: 24 * 2**30)
    with pytest.raises(ConfigError, match=r"n_layer=1024, n_embd=4096.*GiB in float32.*"
                                          r"24\.0 GiB of memory available.*--n-layer, --n-embd"):
        GPT(big)
    monkeypatch.setattr(cpu, "available_memory", lambda: None)  # unknown: nothing is checked
    small = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)
    assert GPT(small).num_parameters() == parameter_count(small)
