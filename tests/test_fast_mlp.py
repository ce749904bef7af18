"""fast.mlp, the MLP as one node, against the three ops it replaces: the same loss and the same
gradient bits for every choice of what trains, with dropout, and what it keeps for its backward
pass (one (N, 4C) array a layer, where the three ops keep two when proj's weight trains)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import GPT, GPTConfig
from minilora import functional as F
from minilora.nn import Linear
from tests.helpers import host, numeric_grad


class Modules(Linear):
    """A Linear the MLP does not recognise as plain: it runs module by module (three ops)."""


def model(n_embd, dropout, frozen):
    ml.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=n_embd,
                      dropout=dropout))
    for name, p in m.named_parameters():
        if any(name.endswith(f) for f in frozen):
            p.requires_grad_(False)
    return m


def step(m, three_ops, seed=5):
    if three_ops:
        for block in m.h:
            block.mlp.fc.__class__ = Modules
    x = np.random.default_rng(1).integers(0, 11, (3, 8))
    ml.manual_seed(seed)  # the dropout masks
    _, loss = m(x, x)
    loss.backward()
    return float(loss.item()), {n: host(p.grad) for n, p in m.named_parameters()
                                if p.grad is not None}


FROZEN = ["mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias", "ln_2.weight",
          "ln_2.bias"]


@settings(max_examples=25, deadline=None)
@given(n_embd=st.sampled_from([4, 8, 16]), dropout=st.sampled_from([0.0, 0.3]),
       frozen=st.lists(st.sampled_from(FROZEN), unique=True, max_size=6))
def test_one_node_gives_the_three_ops_bits(n_embd, dropout, frozen):
    loss, grads = step(model(n_embd, dropout, frozen), three_ops=False)
    ref_loss, ref = step(model(n_embd, dropout, frozen), three_ops=True)
    assert loss == ref_loss
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        assert np.array_equal(g, ref[name]), name


def test_a_lora_model_takes_the_one_node_where_its_mlp_is_plain():
    for targets, fused in ((("q_proj", "v_proj"), True), (("fc",), False)):
        m = model(8, 0.0, [])
        ml.lora.inject_lora(m, ml.lora.LoraConfig(r=2, target_modules=targets))
        x = np.random.default_rng(0).integers(0, 11, (2, 8))
        _, loss = m(x, x)
        ops = {n._op for n in loss.topological_order()}
        assert ("mlp" in ops) == (fused and ml.fast.enabled()), (targets, ops)


def test_the_gradients_are_the_equations_in_float64():
    ml.set_default_dtype(np.float64)
    rng = np.random.default_rng(0)
    x = ml.Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    w1 = ml.Tensor(rng.standard_normal((7, 3)), requires_grad=True)
    b1 = ml.Tensor(rng.standard_normal(7), requires_grad=True)
    w2 = ml.Tensor(rng.standard_normal((4, 7)), requires_grad=True)
    b2 = ml.Tensor(rng.standard_normal(4), requires_grad=True)
    g = rng.standard_normal((5, 4))
    F.mlp(x, w1, b1, w2, b2).backward(g)
    for t in (x, w1, b1, w2, b2):
        def f(t=t):
            return float((host(F.mlp(x, w1, b1, w2, b2).data) * g).sum())
        np.testing.assert_allclose(host(t.grad), numeric_grad(f, t.data), rtol=1e-6, atol=1e-8)


def test_it_keeps_one_hidden_array_where_the_three_ops_keep_two():
    """Traced memory held after the forward pass of a full-training step, one node against three
    ops: the difference is one (N, 4C) float32 array per layer (GELU's output)."""
    import tracemalloc

    if not ml.fast.enabled() or ml.backend.on_device():
        pytest.skip("what the fast form keeps, on the CPU with the fast forms on")
    held = {}
    for three_ops in (False, True, False, True):
        m = model(32, 0.0, [])
        if three_ops:
            for block in m.h:
                block.mlp.fc.__class__ = Modules
        x = np.random.default_rng(1).integers(0, 11, (16, 8))
        tracemalloc.start()
        _, loss = m(x, x)
        held[three_ops] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del loss
    hidden = 16 * 8 * 4 * 32 * 4  # N rows of 4C float32
    assert held[True] - held[False] >= 2 * hidden * 0.9, (held, hidden)


@pytest.mark.parametrize("bad", ["w1", "b2"])
def test_shapes_that_do_not_chain_are_refused(bad):
    if not ml.fast.enabled():
        pytest.skip("the reference form reports through linear's own check")
    x = ml.Tensor(np.ones((2, 3), dtype=np.float32))
    w1 = ml.Tensor(np.ones((7, 4 if bad == "w1" else 3), dtype=np.float32))
    w2 = ml.Tensor(np.ones((4, 7), dtype=np.float32))
    b2 = ml.Tensor(np.ones(5 if bad == "b2" else 4, dtype=np.float32))
    with pytest.raises(ml.errors.ShapeError, match="mlp"):
        F.mlp(x, w1, None, w2, b2)
