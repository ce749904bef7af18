"""Saving and loading the family: round trips give identical logits; IA3 is in PEFT's GPT-2
layout; a forged or broken directory is refused (CheckpointError) before anything is built."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import family, lora
from minilora.errors import CheckpointError, ConfigError, InvalidArgumentError
from minilora.family.ia3 import SHORT, ia3_layers
from minilora.lora.io import write_adapter_files
from tests.helpers import host
from tests.test_family_bitfit import logits, seeds, tiny_gpt, tokens
from tests.test_family_bottleneck import configs as bottleneck_configs
from tests.test_family_bottleneck import randomize as randomize_bottleneck
from tests.test_family_ia3 import randomize as randomize_ia3

quant = pytest.importorskip("minilora.quant")

ATTN = ("q_proj", "k_proj", "v_proj")


@st.composite
def savable_ia3(draw):
    """IA3 configs with a PEFT GPT-2 form: q, k, v scale outputs (c_attn is fused)."""
    targets = draw(st.lists(st.sampled_from(list(SHORT.values())), min_size=1, unique=True))
    ff = [t for t in targets if t not in ATTN and draw(st.booleans())]
    return family.IA3Config(tuple(targets), tuple(ff))


def snapshot(model):
    """What a refused load must leave as it was: modules, values, flags, the mark."""
    return ([(p, type(m)) for p, m in model.named_modules()],
            {k: host(v).copy() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], family.core.family_config(model))


def assert_unchanged(model, snap):
    modules, values, flags, mark = snapshot(model)
    assert modules == snap[0] and flags == snap[2] and mark is snap[3]
    assert all(np.array_equal(values[k], snap[1][k]) for k in snap[1])


def round_trip(model, directory, seed, fresh=None):
    """Save ``model``'s method, load it into a fresh copy of the base: the same logits."""
    idx = tokens(model.config, seed)
    expected = logits(model, idx)
    family.save_adapter(model, directory)
    fresh = tiny_gpt(seed) if fresh is None else fresh
    assert family.load_adapter(fresh, directory) is fresh
    assert np.array_equal(logits(fresh, idx), expected)
    return fresh


@given(seed=seeds)
@settings(max_examples=5, deadline=None)
def test_bitfit_round_trip(tmp_path_factory, seed):
    model = family.bitfit(tiny_gpt(seed))
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data += 0.25  # trained biases
    fresh = round_trip(model, tmp_path_factory.mktemp("b"), seed)
    assert fresh.family_config == family.BitFitConfig()
    assert lora.count_parameters(fresh) == lora.count_parameters(model)


@given(bn=bottleneck_configs, seed=seeds)
@settings(max_examples=10, deadline=None)
def test_bottleneck_round_trip(tmp_path_factory, bn, seed):
    model = family.inject_bottleneck(tiny_gpt(seed), bn)
    randomize_bottleneck(model, seed)
    fresh = round_trip(model, tmp_path_factory.mktemp("n"), seed)
    assert fresh.family_config == bn
    assert lora.count_parameters(fresh) == lora.count_parameters(model)


@given(ia3=savable_ia3(), seed=seeds, quantized=st.booleans())
@settings(max_examples=15, deadline=None)
def test_ia3_round_trip(tmp_path_factory, ia3, seed, quantized):
    def base():
        model = tiny_gpt(seed)
        return quant.quantize_model(model, blocksize=16) if quantized else model

    model = family.inject_ia3(base(), ia3)
    randomize_ia3(model, seed)
    fresh = round_trip(model, tmp_path_factory.mktemp("i"), seed, base())
    back = fresh.family_config
    # c_attn's vector brings back k and v always, and q when its third is not all ones
    expected = set(ia3.target_modules) | ({"k_proj", "v_proj"} if set(ATTN) & set(
        ia3.target_modules) else set())
    assert set(back.target_modules) == expected
    assert set(back.feedforward_modules) == set(ia3.feedforward_modules)
    count = family.ia3_param_count(model.config, back)
    assert lora.count_parameters(fresh) == (count, lora.count_parameters(model)[1] - (
        family.ia3_param_count(model.config, ia3) - count))


def test_the_default_ia3_config_comes_back_as_it_was(tmp_path):
    model = family.inject_ia3(tiny_gpt())
    randomize_ia3(model, 0)
    fresh = round_trip(model, tmp_path, 0)
    assert fresh.family_config == family.IA3Config()


def test_ia3_files_are_in_peft_gpt2_layout(tmp_path):
    model = family.inject_ia3(tiny_gpt())  # C = 8, two layers; k, v and mlp.proj (ff)
    randomize_ia3(model, 0)
    paths = family.save_adapter(model, tmp_path)
    config = json.loads(open(paths["config"]).read())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["attn.c_attn", "mlp.c_proj"]
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    from safetensors.numpy import load_file
    arrays = load_file(paths["weights"])
    prefix = "base_model.model.transformer.h."
    assert sorted(arrays) == [f"{prefix}{i}.{m}.ia3_l" for i in (0, 1)
                              for m in ("attn.c_attn", "mlp.c_proj")]
    c_attn = arrays[f"{prefix}0.attn.c_attn.ia3_l"]
    assert c_attn.shape == (24, 1) and np.all(c_attn[:8] == 1)  # q is not adapted: ones
    assert np.array_equal(c_attn[8:16, 0], host(model.h[0].attn.k_proj.ia3_l))
    assert np.array_equal(c_attn[16:, 0], host(model.h[0].attn.v_proj.ia3_l))
    assert np.array_equal(arrays[f"{prefix}1.mlp.c_proj.ia3_l"],
                          host(model.h[1].mlp.proj.ia3_l)[None, :])  # (1, 4C)


def test_ia3_on_some_layers_only_is_named_per_layer(tmp_path):
    config = family.IA3Config(r"h\.0\.attn\.[kv]_proj|h\.1\.mlp\.proj", r"h\.1\.mlp\.proj")
    model = family.inject_ia3(tiny_gpt(), config)
    randomize_ia3(model, 2)
    paths = family.save_adapter(model, tmp_path / "a")
    fields = json.loads(open(paths["config"]).read())
    assert fields["target_modules"] == ["h.0.attn.c_attn", "h.1.mlp.c_proj"]
    assert fields["feedforward_modules"] == ["h.1.mlp.c_proj"]
    fresh = round_trip(model, tmp_path / "b", 0)
    assert fresh.family_config == family.IA3Config(
        ("h.0.attn.k_proj", "h.0.attn.v_proj", "h.1.mlp.proj"), ("h.1.mlp.proj",))


def test_ia3_without_a_peft_form_is_refused_on_save(tmp_path):
    model = family.inject_ia3(tiny_gpt(), family.IA3Config(("k_proj",), ("k_proj",)))
    with pytest.raises(ConfigError, match="c_attn"):
        family.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(InvalidArgumentError, match="carries no method"):
        family.save_adapter(tiny_gpt(), tmp_path / "b")


def forge(directory, config, arrays):
    """A directory with a valid manifest whose contents lie."""
    write_adapter_files(directory, config, {k: np.asarray(v, np.float32)
                                            for k, v in arrays.items()})


def saved(method, tmp_path):
    model = {"bitfit": lambda: family.bitfit(tiny_gpt()),
             "ia3": lambda: family.inject_ia3(tiny_gpt()),
             "bottleneck": lambda: family.inject_bottleneck(
                 tiny_gpt(), family.BottleneckConfig(bottleneck=4))}[method]()
    d = tmp_path / method
    paths = family.save_adapter(model, d)
    config = json.loads(open(paths["config"]).read())
    from safetensors.numpy import load_file
    return d, config, load_file(paths["weights"])


KEY = {"bitfit": "base_model.model.h.0.attn.q_proj.bias",
       "ia3": "base_model.model.transformer.h.0.attn.c_attn.ia3_l",
       "bottleneck": "base_model.model.h.0.attn.o_proj.down.weight"}


@pytest.mark.parametrize("method", ["bitfit", "ia3", "bottleneck"])
@pytest.mark.parametrize("lie", ["shape", "missing", "extra"])
def test_a_forged_file_is_refused_naming_the_key_before_anything_is_built(tmp_path, method,
                                                                          lie):
    d, config, arrays = saved(method, tmp_path)
    key = KEY[method]
    if lie == "shape":
        arrays[key] = np.ones(tuple(n + 1 for n in arrays[key].shape))
        needle = rf"{key}' has shape .* in the file but .* in the config and the model"
    elif lie == "missing":
        del arrays[key]
        needle = f"lacks key '{key}'"
    else:
        arrays["base_model.model.h.9.attn.q_proj.bias"] = np.ones(8)
        needle = "h.9.attn.q_proj.bias.*no place for"
    forge(tmp_path / "forged", config, arrays)
    model = tiny_gpt()
    snap = snapshot(model)
    rng = ml.backend.host_rng().bit_generator.state
    with pytest.raises(CheckpointError, match=needle):
        family.load_adapter(model, tmp_path / "forged")
    assert_unchanged(model, snap)
    assert ml.backend.host_rng().bit_generator.state == rng  # no init drawn: nothing built


def test_a_forged_size_in_the_config_is_refused_before_allocating(tmp_path):
    d, config, arrays = saved("bottleneck", tmp_path)
    forge(tmp_path / "big", {**config, "bottleneck": 60000}, arrays)
    model = tiny_gpt()
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=r"shape \(4, 8\) in the file but \(60000, 8\) in "
                                              r"the config and the model"):
        family.load_adapter(model, tmp_path / "big")
    assert_unchanged(model, snap)
    forge(tmp_path / "bad", {**config, "bottleneck": 4.0}, arrays)
    with pytest.raises(CheckpointError, match="bottleneck must be an int"):
        family.load_adapter(model, tmp_path / "bad")
    ia3_dir, ia3_config, ia3_arrays = saved("ia3", tmp_path)
    forge(tmp_path / "ff", {**ia3_config, "feedforward_modules": ["c_attn", "mlp.c_proj"]},
          ia3_arrays)
    with pytest.raises(CheckpointError, match="c_attn is a feedforward module"):
        family.load_adapter(model, tmp_path / "ff")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.filterwarnings("ignore::minilora.fileio.NoManifestWarning")
def test_truncated_weights_are_refused(tmp_path, manifest):
    d, _, _ = saved("ia3", tmp_path)
    weights = d / "adapter_model.safetensors"
    data = weights.read_bytes()
    if not manifest:
        os.remove(d / "manifest.json")
    weights.write_bytes(data[:-7])
    model = tiny_gpt()
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        family.load_adapter(model, d)
    assert_unchanged(model, snap)


def test_unknown_methods_and_marked_models_are_refused(tmp_path):
    d, config, arrays = saved("bitfit", tmp_path)
    forge(tmp_path / "lora", {**config, "peft_type": "LORA"}, arrays)
    with pytest.raises(CheckpointError, match="'LORA' is no method of the family.*ml.lora"):
        family.load_adapter(tiny_gpt(), tmp_path / "lora")
    forge(tmp_path / "none", {}, arrays)
    with pytest.raises(CheckpointError, match="peft_type must be a string"):
        family.load_adapter(tiny_gpt(), tmp_path / "none")
    marked = family.inject_ia3(tiny_gpt())
    with pytest.raises(CheckpointError, match="already carries IA3Config"):
        family.load_adapter(marked, d)
    plain = ml.GPT(ml.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8,
                                bias=False))
    with pytest.raises(CheckpointError, match="no place for"):
        family.load_adapter(plain, d)
    assert family.core.family_config(plain) is None


INJECTIONS = {
    "bitfit": family.bitfit,
    "ia3": family.inject_ia3,
    "bottleneck": family.inject_bottleneck,
    "prompt": lambda m: family.inject_prompt(m, family.PromptTuningConfig(2)),
    "prefix": lambda m: family.inject_prompt(m, family.PrefixTuningConfig(2)),
}


@pytest.mark.parametrize("method", sorted(INJECTIONS))
def test_a_method_of_the_family_is_refused_on_a_lora_model(tmp_path, method):
    """IA3 skipped the LoRA layers it does not know and every method froze the LoRA adapters:
    a fine-tune of neither, trained and saved without a word (inject_lora refuses the other
    order); loading a family file into a LoRA model failed with an AttributeError."""
    model = tiny_gpt()
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("v_proj",)))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"carries LoRA adapters \('default', in 2 layers "
                                          r"such as 'h.0.attn.v_proj'\)"):
        INJECTIONS[method](model)
    assert family.core.family_config(model) is None  # left as it was: LoRA still trains
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    d, _, _ = saved("ia3", tmp_path)
    with pytest.raises(CheckpointError, match="carries LoRA adapters"):
        family.load_adapter(model, d)
    lora.merge_and_unload(model)  # folded away, the base takes a method again
    INJECTIONS[method](model)


def test_every_ia3_layer_is_loaded_with_its_own_values(tmp_path):
    model = family.inject_ia3(tiny_gpt(), family.IA3Config(
        ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc", "mlp.proj"), ("o_proj", "mlp.proj")))
    randomize_ia3(model, 4)
    family.save_adapter(model, tmp_path)
    fresh = family.load_adapter(tiny_gpt(), tmp_path)
    mine = {p: host(layer.ia3_l) for p, layer in ia3_layers(model)}
    theirs = {p: host(layer.ia3_l) for p, layer in ia3_layers(fresh)}
    assert mine.keys() == theirs.keys()
    assert all(np.array_equal(mine[p], theirs[p]) for p in mine)
    assert fresh.family_config == model.family_config


@pytest.mark.parametrize("make", [lambda: family.PromptTuningConfig(num_virtual_tokens=2),
                                  lambda: family.PrefixTuningConfig(num_virtual_tokens=2)],
                         ids=["prompt", "prefix"])
def test_prompt_and_prefix_go_through_the_same_dispatch_and_do_not_merge(tmp_path, make):
    model = family.inject_prompt(tiny_gpt(), make())
    idx = tokens(model.config)[:, :5]  # the virtual tokens take context
    expected = logits(model, idx)
    config = json.loads(open(family.save_adapter(model, tmp_path)["config"]).read())
    assert config["peft_type"] == ("PROMPT_TUNING" if isinstance(
        model.family_config, family.PromptTuningConfig) else "PREFIX_TUNING")
    fresh = family.load_adapter(tiny_gpt(), tmp_path)
    assert np.array_equal(logits(fresh, idx), expected)
    with pytest.raises(InvalidArgumentError, match="cannot merge .*context length, KV-cache"):
        family.merge_and_unload(model)
    assert np.array_equal(logits(model, idx), expected)
