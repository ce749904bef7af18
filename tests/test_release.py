"""``tensor.release``: the model frees intermediates no backward reads, and no number changes.

The GPT's blocks release the residual stream, the attention and MLP outputs, the MLP's hidden
pre-activation and (when the layer after it is frozen) inputs nobody's backward keeps. Releasing
must change no gradient and no loss, bit for bit, for full training and for LoRA; and it must
touch only op outputs, only while a graph is recorded with the fast forms on.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
import minilora.gpt as gpt_module
from minilora import backend as B
from minilora import fast
from minilora.tensor import Tensor, release
from tests.helpers import host


def small_gpt(kind: str, dropout: float, seed: int) -> ml.GPT:
    ml.manual_seed(seed)
    model = ml.GPT(ml.GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=8,
                                dropout=dropout))
    if kind == "lora":
        ml.lora.inject_lora(model, ml.lora.LoraConfig(r=2, alpha=4,
                                                      target_modules=("q_proj", "v_proj")))
    return model


def loss_and_grads(kind: str, dropout: float, seed: int, released: bool, monkeypatch) -> list:
    monkeypatch.setattr(gpt_module, "release", release if released else lambda *t: None)
    model = small_gpt(kind, dropout, seed)
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 17, (3, 8)), rng.integers(0, 17, (3, 8))
    with fast.forms(True), B.generator_as(B.spawn_generators(1)[0]):  # release is a fast form
        _, loss = model(idx, targets)
        loss.backward()
    return [host(loss)] + [host(p.grad) for _, p in model.named_parameters()
                           if p.grad is not None]


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["full", "lora"]), dropout=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**16))
def test_releasing_changes_no_loss_and_no_gradient(kind, dropout, seed):
    with pytest.MonkeyPatch.context() as mp:
        kept = loss_and_grads(kind, dropout, seed, False, mp)
        freed = loss_and_grads(kind, dropout, seed, True, mp)
    assert len(kept) == len(freed) > 1
    for a, b in zip(kept, freed):
        assert np.array_equal(a, b)


class ModuleByModule(ml.nn.Linear):
    """A Linear the MLP does not take for plain: it runs fc, GELU and proj as three ops."""


@pytest.mark.parametrize("one_node", [True, False])
def test_the_blocks_release_their_intermediates(one_node):
    """After the forward pass the MLP's input (ln_2's output) and, module by module, its hidden
    activations are zero-stride placeholders of the right shape; the logits, the loss and the
    parameters are untouched."""
    model = small_gpt("full", 0.0, 0)
    if not one_node:
        for block in model.h:
            block.mlp.fc.__class__ = ModuleByModule
    seen = {}
    real_gelu, real_mlp = gpt_module.F.gelu, gpt_module.F.mlp

    def spy_gelu(h):
        seen["h"] = h
        return real_gelu(h)

    def spy_mlp(x, *weights):
        seen["x"] = x
        return real_mlp(x, *weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt_module.F, "gelu", spy_gelu)
        mp.setattr(gpt_module.F, "mlp", spy_mlp)
        with fast.forms(True):
            logits, loss = model(np.zeros((2, 8), dtype=np.int64),
                                 np.zeros((2, 8), dtype=np.int64))
    h = seen["x" if one_node else "h"]
    assert ("h" in seen) != one_node
    assert h.shape[:2] == (2, 8) and h.data.strides == (0, 0, 0) and not host(h).any()
    for t in (logits, loss, *model.parameters()):
        assert t.data.size <= 1 or 0 not in t.data.strides


def test_release_leaves_leaves_and_ungraphed_work_alone():
    leaf = Tensor(np.ones((2, 3)), requires_grad=True)
    y = leaf * 2.0
    with fast.forms(True):
        release(leaf)
    assert host(leaf).tolist() == [[1.0] * 3] * 2  # a leaf is never released
    with ml.no_grad(), fast.forms(True):
        z = leaf * 3.0
        release(z)  # no graph holds anything here: nothing to free
    assert host(z).sum() == 18.0
    with fast.reference():
        w = leaf * 4.0
        release(w)  # the reference forms keep every value
    assert host(w).sum() == 24.0
    with fast.forms(True):
        release(y)
    assert y.shape == (2, 3) and not host(y).any()
    y.sum().backward()  # the walk needs only the shape of a released node
    assert host(leaf.grad).tolist() == [[2.0] * 3] * 2
