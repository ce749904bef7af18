"""inject_lora and the adapter switches: targets, freezing, counting, state keys, several
adapters, set_adapter, disable_adapters, delete_adapter, unload."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
import minilora.functional as F
from minilora import lora, nn
from minilora.errors import ConfigError, InvalidArgumentError
from minilora.lora.layer import LoRALinear
from tests.helpers import host
from tests.test_lora_support import (
    Stack,
    alphas,
    assert_close,
    dims,
    forward,
    inputs,
    randomize_lora,
    ranks,
    seeds,
    tiny,
)


def test_state_keys_and_shapes_follow_peft():
    model = lora.inject_lora(Stack(4, 2), lora.LoraConfig(r=3, target_modules=("q_proj", "fc")))
    sd = model.state_dict()
    for i in range(2):
        assert sd[f"blocks.{i}.attn.q_proj.lora_A.default.weight"].shape == (3, 4)
        assert sd[f"blocks.{i}.attn.q_proj.lora_B.default.weight"].shape == (4, 3)
        assert sd[f"blocks.{i}.mlp.fc.lora_A.default.weight"].shape == (3, 4)
        assert sd[f"blocks.{i}.mlp.fc.lora_B.default.weight"].shape == (8, 3)
        assert f"blocks.{i}.attn.q_proj.base_layer.weight" in sd
        assert f"blocks.{i}.attn.v_proj.weight" in sd  # untargeted: unchanged
    assert isinstance(model.blocks[0].attn.q_proj, LoRALinear)
    assert sum("lora_" in k for k in sd) == 8


@given(k=dims, h=dims, o=dims, r=ranks, dora=st.booleans(), vr=st.sampled_from([None, 1, 5]),
       targets=st.sampled_from([("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "head"),
                                r"(q|v)_proj", ("v_proj",)]))
def test_trainable_count_is_the_sum_of_r_times_n_plus_k(k, h, o, r, dora, vr, targets):
    model = tiny(k, h, o)
    _, total_before = lora.count_parameters(model)
    shapes = {"q_proj": (h, k), "k_proj": (h, k), "v_proj": (o, h), "head": (3, o)}
    pattern = {"v_proj": vr} if vr else {}
    config = lora.LoraConfig(r=r, target_modules=targets, use_dora=dora, rank_pattern=pattern)
    lora.inject_lora(model, config)
    expected = 0
    for name, (n, kk) in shapes.items():
        if config.is_target(name):
            rank = vr if (name == "v_proj" and vr) else r
            expected += rank * (n + kk) + (n if dora else 0)
    trainable, total = lora.count_parameters(model)
    assert trainable == expected == lora.lora_trainable_count(model)
    assert total == total_before + expected  # adding adapters adds them; freezing changes nothing
    model.requires_grad_(True)
    assert lora.count_parameters(model) == (total, total)


@pytest.mark.parametrize("targets,expected", [
    (("q_proj",), ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
    (("1.attn.q_proj",), ["blocks.1.attn.q_proj"]),
    (("mlp.fc", "proj"), ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc",
                          "blocks.1.mlp.proj"]),
    (r"blocks\.0\..*proj", ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                            "blocks.0.mlp.proj"]),
    (r".*\.(q|v)_proj", ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                         "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]),
])
def test_targets_are_names_suffixes_or_a_full_match_regex(targets, expected):
    model = lora.inject_lora(Stack(4, 2), lora.LoraConfig(r=2, target_modules=targets))
    assert [p for p, _ in lora.lora_layers(model)] == expected


@pytest.mark.parametrize("targets", [("query",), "q_proj", ("attn",), ("_proj",)])
def test_a_target_that_matches_nothing_lists_the_module_names(targets):
    with pytest.raises(ConfigError) as info:
        lora.inject_lora(Stack(4, 1), lora.LoraConfig(target_modules=targets))
    msg = str(info.value)
    assert repr(targets) in msg
    for name in ("q_proj", "v_proj", "fc", "proj", "blocks.0.attn.q_proj"):
        assert name in msg


def test_everything_but_lora_is_frozen_and_bias_modes():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight",
                         "v_proj.lora_A.default.weight", "v_proj.lora_B.default.weight"}
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2, bias="all"))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert {"q_proj.base_layer.bias", "k_proj.bias", "head.bias", "norm.bias"} <= trainable
    assert "norm.weight" not in trainable and "head.weight" not in trainable
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2, bias="lora_only"))
    biases = {k for k, p in model.named_parameters() if p.requires_grad and "bias" in k}
    assert biases == {"q_proj.base_layer.bias", "v_proj.base_layer.bias"}


@given(seed=seeds, r=ranks, dora=st.booleans(), bias=st.sampled_from(["none", "lora_only"]))
def test_gradients_reach_only_trainable_parameters(seed, r, dora, bias):
    model = lora.inject_lora(tiny(seed=seed), lora.LoraConfig(r=r, use_dora=dora, bias=bias))
    randomize_lora(model, seed)
    x = inputs((3, 5), seed=seed)
    F.cross_entropy(model(x), np.array([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name
        else:
            assert p.grad is None, name


def test_at_init_A_gets_zero_gradient_and_B_does_not():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    model(inputs((4, 5))).sum().backward()
    layer = model.q_proj
    assert not host(layer.lora_A["default"].weight.grad).any()  # dL/dA = s B^T (...) = 0
    assert host(layer.lora_B["default"].weight.grad).any()


@given(seed=seeds, r=ranks, alpha=alphas, dora=st.booleans())
def test_disable_adapters_gives_the_base_output(seed, r, alpha, dora):
    model = tiny(seed=seed)
    x = inputs((3, 5), seed=seed)
    base = forward(model, x)
    lora.inject_lora(model, lora.LoraConfig(r=r, alpha=alpha, use_dora=dora))
    randomize_lora(model, seed)
    adapted = forward(model, x)
    with lora.disable_adapters(model):
        assert np.array_equal(forward(model, x), base)
    assert np.array_equal(forward(model, x), adapted)
    assert not np.allclose(adapted, base)


@given(seed=seeds, r1=ranks, r2=ranks)
def test_second_adapter_is_added_inactive_and_set_adapter_switches(seed, r1, r2):
    model = tiny(seed=seed)
    x = inputs((3, 5), seed=seed)
    base = forward(model, x)
    lora.inject_lora(model, lora.LoraConfig(r=r1), "a")
    lora.inject_lora(model, lora.LoraConfig(r=r2, target_modules=("k_proj", "v_proj")), "b")
    randomize_lora(model, seed)
    assert lora.active_adapters(model) == ["a"]
    assert model.v_proj.lora_A["b"].weight.shape == (r2, 6)
    assert not model.v_proj.lora_A["b"].weight.requires_grad
    ya = forward(model, x)
    lora.set_adapter(model, "b")
    assert model.v_proj.lora_A["b"].weight.requires_grad
    assert not model.v_proj.lora_A["a"].weight.requires_grad
    assert not model.q_proj.lora_A["a"].weight.requires_grad
    yb = forward(model, x)
    assert not np.allclose(ya, yb)
    lora.set_adapter(model, "a")
    assert np.array_equal(forward(model, x), ya)
    lora.set_adapter(model, ["a", "b"])
    assert sorted(lora.active_adapters(model)) == ["a", "b"]
    assert not np.allclose(forward(model, x), ya)
    with lora.disable_adapters(model):
        assert np.array_equal(forward(model, x), base)


@given(seed=seeds, r1=ranks, r2=ranks)
def test_updates_of_active_adapters_add_up_in_a_layer(seed, r1, r2):
    ml.manual_seed(seed)
    model = nn.Sequential()
    model.q_proj = nn.Linear(5, 4).double()
    lora.inject_lora(model, lora.LoraConfig(r=r1, target_modules=("q_proj",)), "a")
    lora.inject_lora(model, lora.LoraConfig(r=r2, target_modules=("q_proj",)), "b")
    randomize_lora(model, seed)
    x = inputs((3, 5), seed=seed)
    layer = model.q_proj
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        lora.set_adapter(model, names)
        outs["+".join(names)] = host(layer(x))
    base = host(layer.base_layer(x))
    assert_close(outs["a+b"] - base, (outs["a"] - base) + (outs["b"] - base), 1e-12)


def test_adapter_name_errors():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="already has an adapter 'default'"):
        lora.inject_lora(model, lora.LoraConfig(r=2))
    for bad in ("", "a.b", "a b", 3):
        with pytest.raises(InvalidArgumentError, match="adapter_name"):
            lora.inject_lora(model, lora.LoraConfig(r=2), bad)
    with pytest.raises(InvalidArgumentError, match="unknown adapter"):
        lora.set_adapter(model, "nope")
    with pytest.raises(InvalidArgumentError, match="unknown adapter"):
        lora.delete_adapter(model, "nope")
    with pytest.raises(InvalidArgumentError, match="single linear layer"):
        lora.inject_lora(nn.Linear(3, 3), lora.LoraConfig(target_modules=("weight",)))
    with pytest.raises(ConfigError, match="LoraConfig"):
        lora.inject_lora(tiny(), {"r": 2})
    with pytest.raises(InvalidArgumentError, match="no LoRA layers"):
        with lora.disable_adapters(tiny()):
            pass


def test_delete_adapter_removes_it_and_restores_plain_layers():
    model = tiny()
    x = inputs((2, 5))
    base = forward(model, x)
    lora.inject_lora(model, lora.LoraConfig(r=2), "a")
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("v_proj",)), "b")
    randomize_lora(model)
    lora.delete_adapter(model, "a")
    assert isinstance(model.q_proj, nn.Linear) and not isinstance(model.q_proj, LoRALinear)
    assert list(model.v_proj.lora_A) == ["b"]
    assert not any(".a." in k for k in model.state_dict())
    assert lora.active_adapters(model) == [] and list(lora.lora_configs(model)) == ["b"]
    assert np.array_equal(forward(model, x), base)  # nothing active
    lora.delete_adapter(model, "b")
    assert lora.lora_layers(model) == [] and lora.lora_configs(model) == {}
    assert sorted(model.state_dict()) == sorted(tiny().state_dict())
    assert np.array_equal(forward(model, x), base)


def test_unload_puts_the_base_modules_back():
    model = tiny()
    x = inputs((2, 5))
    base = forward(model, x)
    lora.inject_lora(model, lora.LoraConfig(r=2))
    randomize_lora(model)
    assert lora.unload(model) is model
    assert lora.lora_layers(model) == [] and "lora_configs" not in model.__dict__
    assert np.array_equal(forward(model, x), base)
