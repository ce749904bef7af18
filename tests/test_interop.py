"""HF GPT-2 and PEFT interop without torch: the file layouts, round trips, and every refusal.

(tests/crosscheck/test_interop_*.py load the same files in transformers and PEFT.)
"""

import json
import math
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import interop, lora
from minilora.errors import CheckpointError, ConfigError, InvalidArgumentError
from tests.helpers import host

CFG = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
IDX = np.random.default_rng(5).integers(0, 11, (2, 6))
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")


def gpt(dtype=np.float64, seed=0, bias=True, **cfg):
    """A small random GPT whose LayerNorms and biases are random too (so a mix-up shows)."""
    ml.manual_seed(seed)
    model = ml.GPT(ml.GPTConfig(**{**CFG, **cfg}, bias=bias)).astype(dtype)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data += ml.backend.asarray(rng.standard_normal(p.shape) * 0.1, dtype=dtype)
    return model.eval()


def logits(model, idx=IDX):
    with ml.no_grad():
        return host(model(idx))


def weights(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


def randomize_adapter(model, seed, name="default"):
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        for p in layer.adapter_parameters(name):
            p.data[...] = ml.backend.asarray(rng.standard_normal(p.shape) * 0.3, dtype=p.dtype)


# ------------------------------------------------------------------------------ GPT-2 weights

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_gpt_to_hf_then_back_gives_the_same_weights_and_logits(tmp_path, dtype, bias):
    model = gpt(dtype, seed=1, bias=bias)
    paths = interop.gpt_to_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "manifest.json", "model.safetensors"]
    back = interop.gpt_from_hf(tmp_path, dtype=dtype)
    assert not back.training and back.config.bias  # HF GPT-2 always has biases
    assert back.config.block_size == 6 and back.config.n_layer == 2
    mine, theirs = weights(model), weights(back)
    for key, value in theirs.items():
        assert value.dtype == dtype
        np.testing.assert_array_equal(value, mine.get(key, np.zeros_like(value)), err_msg=key)
    np.testing.assert_array_equal(logits(back), logits(model))
    assert paths["weights"].endswith("model.safetensors")


def test_the_file_holds_hf_names_transposed_and_fused(tmp_path):
    model = gpt(np.float32, seed=2)
    interop.gpt_to_hf(model, tmp_path)
    arrays = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_positions"], config["n_embd"], config["n_inner"]) == (6, 8, None)
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"]
    assert "lm_head.weight" not in arrays and len(arrays) == 4 + 12 * 2
    sd, h = weights(model), "transformer.h.1."
    qkv = np.concatenate([sd[f"h.1.attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    np.testing.assert_array_equal(arrays[h + "attn.c_attn.weight"], qkv.T)  # (C, 3C)
    np.testing.assert_array_equal(arrays[h + "attn.c_attn.bias"][8:16], sd["h.1.attn.k_proj.bias"])
    np.testing.assert_array_equal(arrays[h + "attn.c_proj.weight"], sd["h.1.attn.o_proj.weight"].T)
    np.testing.assert_array_equal(arrays[h + "mlp.c_fc.weight"], sd["h.1.mlp.fc.weight"].T)
    np.testing.assert_array_equal(arrays[h + "mlp.c_proj.weight"], sd["h.1.mlp.proj.weight"].T)
    assert arrays[h + "mlp.c_fc.weight"].shape == (8, 32)
    np.testing.assert_array_equal(arrays["transformer.wpe.weight"], sd["wpe.weight"])


def test_other_sources_a_file_a_dict_without_prefix_with_buffers_and_a_tied_head(tmp_path):
    model = gpt(seed=3)
    interop.gpt_to_hf(model, tmp_path)
    expected = logits(model)
    from_file = interop.gpt_from_hf(tmp_path / "model.safetensors", dtype=np.float64)
    np.testing.assert_array_equal(logits(from_file), expected)
    config = json.loads((tmp_path / "config.json").read_text())
    arrays = {k.removeprefix("transformer."): v for k, v in interop.hf_state_dict(model).items()}
    arrays["h.0.attn.bias"] = np.tril(np.ones((1, 1, 6, 6)))  # older files keep the mask
    arrays["lm_head.weight"] = arrays["wte.weight"].copy()
    state = ml.backend.host_rng().bit_generator.state
    from_dict = interop.gpt_from_hf(arrays, config=config)
    assert ml.backend.host_rng().bit_generator.state == state  # loading draws nothing
    assert from_dict.wte.weight.dtype == np.float32  # the default dtype
    np.testing.assert_allclose(logits(from_dict), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def hf_dir(tmp_path):
    interop.gpt_to_hf(gpt(seed=4), tmp_path)
    return tmp_path


def edit(directory, config=None, drop=(), add=None, reshape=None):
    """Change a saved HF GPT-2 directory: config fields, removed / added / reshaped keys."""
    if config:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    arrays = load_file(directory / "model.safetensors")
    for key in drop:
        del arrays[key]
    arrays.update(add or {})
    for key, shape in (reshape or {}).items():
        arrays[key] = np.zeros(shape, dtype=np.float32)
    save_file(arrays, directory / "model.safetensors")


@pytest.mark.parametrize("change, error, words", [
    (dict(config={"model_type": "llama"}), ConfigError, ["model_type", "llama"]),
    (dict(config={"activation_function": "gelu"}), ConfigError, ["activation_function", "gelu"]),
    (dict(config={"layer_norm_epsilon": 1e-6}), ConfigError, ["layer_norm_epsilon"]),
    (dict(config={"n_inner": 20}), ConfigError, ["n_inner=20", "32"]),
    (dict(config={"n_head": None}), ConfigError, ["n_head"]),
    (dict(config={"attn_pdrop": 0.2}), ConfigError, ["attn_pdrop", "dropout="]),
    (dict(add={"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32)}),
     CheckpointError, ["model.layers.0.self_attn.q_proj.weight", "another architecture"]),
    (dict(add={"transformer.h.2.ln_1.weight": np.zeros(8, np.float32)}),
     CheckpointError, ["transformer.h.2.ln_1.weight", "n_layer=2"]),
    (dict(drop=["transformer.h.1.mlp.c_fc.bias"]), CheckpointError,
     ["lacks key 'transformer.h.1.mlp.c_fc.bias'", "(32,)"]),
    (dict(reshape={"transformer.h.0.attn.c_attn.weight": (24, 8)}), CheckpointError,
     ["'transformer.h.0.attn.c_attn.weight'", "(24, 8)", "(8, 24)"]),
    (dict(add={"lm_head.weight": np.ones((11, 8), np.float32)}), CheckpointError,
     ["lm_head.weight", "tied"]),
    (dict(config={"tie_word_embeddings": False}), CheckpointError, ["tie_word_embeddings"]),
])
def test_gpt_from_hf_errors_name_the_field_or_key(hf_dir, change, error, words):
    edit(hf_dir, **change)
    with pytest.raises(error) as info:
        interop.gpt_from_hf(hf_dir)
    for word in words:
        assert word in str(info.value)


def test_gpt_from_hf_refuses_pickle_and_a_dict_without_config(hf_dir):
    os.replace(hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        interop.gpt_from_hf(hf_dir)
    with pytest.raises(InvalidArgumentError, match="config"):
        interop.gpt_from_hf({"transformer.wte.weight": np.zeros((11, 8))})
    with pytest.raises(CheckpointError, match="does not exist"):
        interop.gpt_from_hf(hf_dir / "nowhere")


def test_gpt_to_hf_refuses_lora_layers_and_quantized_weights(tmp_path):
    model = lora.inject_lora(gpt(), lora.LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(InvalidArgumentError, match="merge_and_unload") as info:
        interop.gpt_to_hf(model, tmp_path)
    assert "h.0.attn.q_proj" in str(info.value)
    quantized = ml.quant.quantize_model(gpt(np.float32), blocksize=16)
    with pytest.raises(InvalidArgumentError, match="QuantLinear"):
        interop.gpt_to_hf(quantized, tmp_path)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- adapters

def peft_delta(config, arrays, module):
    """PEFT's delta W (out, in) of HF module path ``module`` (e.g. "h.0.attn.c_attn") from the
    exported files, with PEFT's rules for rank_pattern / alpha_pattern, written out here."""
    def pattern(patterns, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", "transformer." + module):
                return value
        return default
    A = arrays[f"base_model.model.transformer.{module}.lora_A.weight"]
    B = arrays[f"base_model.model.transformer.{module}.lora_B.weight"]
    r = pattern(config["rank_pattern"], config["r"])
    alpha = pattern(config["alpha_pattern"], config["lora_alpha"])
    assert A.shape[0] == r == B.shape[1]
    return alpha / (math.sqrt(r) if config["use_rslora"] else r) * (B @ A)


targets = st.lists(st.sampled_from(PROJ + ("h.1.attn.q_proj", "h.0.mlp.fc")), min_size=1,
                   max_size=4, unique=True)
patterns = st.sampled_from([{}, {"v_proj": 3}, {"h.1.attn.k_proj": 2, "fc": 5}])


@given(targets=targets, r=st.integers(1, 4), alpha=st.integers(1, 12), rslora=st.booleans(),
       rank_pattern=patterns, alpha_pattern=patterns, dtype=st.sampled_from([np.float32,
                                                                             np.float64]))
def test_export_then_import_gives_the_same_adapter(targets, r, alpha, rslora, rank_pattern,
                                                   alpha_pattern, dtype):
    config = lora.LoraConfig(r=r, alpha=alpha, target_modules=tuple(targets), use_rslora=rslora,
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model = lora.inject_lora(gpt(dtype), config)
    randomize_adapter(model, r + alpha)
    with tempfile.TemporaryDirectory() as d:
        interop.export_peft(model, d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            exported = json.load(f)
        arrays = load_file(os.path.join(d, "adapter_model.safetensors"))
        back = interop.import_peft(gpt(dtype), d)
    # the file, read with PEFT's rules, holds every projection's s B A (q, k, v stacked)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    layers = dict(lora.lora_layers(model))
    for i in range(2):
        for hf, mine in (("attn.c_attn", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
                         ("mlp.c_fc", ("mlp.fc",))):
            if not any(f"h.{i}.{m}" in layers for m in mine):
                assert f"base_model.model.transformer.h.{i}.{hf}.lora_A.weight" not in arrays
                continue
            expected = np.concatenate([host(layers[f"h.{i}.{m}"].delta_weight("default"))
                                       if f"h.{i}.{m}" in layers else np.zeros((8, 8), dtype)
                                       for m in mine])
            np.testing.assert_allclose(peft_delta(exported, arrays, f"h.{i}.{hf}"), expected,
                                       **tol)
    # and imports back to the same ranks, outputs and merged weights
    assert {p: layer.r["default"] for p, layer in lora.lora_layers(back)} == \
        {p: layer.r["default"] for p, layer in layers.items()}
    np.testing.assert_allclose(logits(back), logits(model), **tol)
    lora.merge_and_unload(back)
    lora.merge_and_unload(model)
    for key, value in weights(model).items():
        np.testing.assert_allclose(weights(back)[key], value, err_msg=key, **tol)


def test_fused_export_of_q_and_v_is_stacked_a_and_block_b(tmp_path):
    model = lora.inject_lora(gpt(), lora.LoraConfig(r=2, alpha=4))  # q_proj, v_proj
    randomize_adapter(model, 0)
    interop.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    arrays = load_file(tmp_path / "adapter_model.safetensors")
    assert config["target_modules"] == ["attn.c_attn"] and config["fan_in_fan_out"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {})
    assert len(arrays) == 4
    q, v = model.h[1].attn.q_proj, model.h[1].attn.v_proj
    A = arrays["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    B = arrays["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    np.testing.assert_array_equal(A, np.concatenate([host(q.lora_A["default"].weight),
                                                     host(v.lora_A["default"].weight)]))
    np.testing.assert_array_equal(B[:8, :2], host(q.lora_B["default"].weight))
    np.testing.assert_array_equal(B[16:, 2:], host(v.lora_B["default"].weight))
    assert not B[8:16].any() and not B[:8, 2:].any() and not B[16:, :2].any()


def test_an_all_zero_adapter_keeps_every_projection_at_full_rank(tmp_path):
    model = lora.inject_lora(gpt(), lora.LoraConfig(r=2, alpha=4))  # B = 0: fresh
    interop.export_peft(model, tmp_path)
    back = interop.import_peft(gpt(), tmp_path, adapter_name="fresh")
    ranks = {p: layer.r["fresh"] for p, layer in lora.lora_layers(back)}
    assert ranks == {f"h.{i}.attn.{p}": 4 for i in range(2) for p in ("q_proj", "k_proj",
                                                                      "v_proj")}
    np.testing.assert_array_equal(logits(back), logits(gpt()))


@pytest.fixture
def adapter_dir(tmp_path):
    model = lora.inject_lora(gpt(), lora.LoraConfig(r=2, alpha=4, target_modules=("v_proj",
                                                                                   "fc")))
    randomize_adapter(model, 1)
    interop.export_peft(model, tmp_path)
    (tmp_path / "manifest.json").unlink()  # as PEFT writes it: the tests below edit its files
    return tmp_path


def edit_adapter(directory, config=None, drop=(), add=None):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(config or {})}))
    arrays = load_file(directory / "adapter_model.safetensors")
    for key in drop:
        del arrays[key]
    arrays.update(add or {})
    save_file(arrays, directory / "adapter_model.safetensors")


pytestmark = pytest.mark.filterwarnings("ignore::minilora.fileio.NoManifestWarning")

KEY = "base_model.model.transformer.h.0.mlp.c_fc.lora_{}.weight"


@pytest.mark.parametrize("change, error, words", [
    (dict(config={"peft_type": "IA3"}), ConfigError, ["peft_type", "IA3"]),
    (dict(config={"use_dora": True}), ConfigError, ["use_dora"]),
    (dict(config={"bias": "all"}), ConfigError, ["bias", "'all'"]),
    (dict(config={"modules_to_save": ["lm_head"]}), ConfigError, ["modules_to_save"]),
    (dict(config={"init_lora_weights": "pissa"}), ConfigError, ["init_lora_weights", "pissa"]),
    (dict(config={"r": 0}), ConfigError, ["r must be"]),
    (dict(drop=[KEY.format("B")]), CheckpointError, ["lacks key", KEY.format("B")]),
    (dict(add={KEY.format("A"): np.zeros((3, 8), np.float32)}), CheckpointError,
     [KEY.format("A"), "(3, 8)", "(2, 8)"]),
    (dict(add={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               np.zeros((2, 8), np.float32)}), CheckpointError,
     ["model.layers.0.self_attn.q_proj.lora_A.weight", "another model"]),
    (dict(add={"base_model.model.transformer.h.7.mlp.c_fc.lora_A.weight":
               np.zeros((2, 8), np.float32)}), CheckpointError, ["h.7", "n_layer=2"]),
])
def test_import_peft_errors_name_the_field_or_key(adapter_dir, change, error, words):
    edit_adapter(adapter_dir, **change)
    model = gpt()
    with pytest.raises(error) as info:
        interop.import_peft(model, adapter_dir)
    for word in words:
        assert word in str(info.value)
    assert not lora.lora_layers(model)  # nothing was injected


def test_import_and_export_refusals(adapter_dir):
    model = interop.import_peft(gpt(), adapter_dir)
    with pytest.raises(InvalidArgumentError, match="already has an adapter 'default'"):
        interop.import_peft(model, adapter_dir)
    with pytest.raises(InvalidArgumentError, match="no adapter 'other'"):
        interop.export_peft(model, adapter_dir, adapter_name="other")
    with pytest.raises(InvalidArgumentError, match="minilora GPT"):
        interop.import_peft(ml.nn.Linear(2, 2), adapter_dir)
    for config, word in ((lora.LoraConfig(use_dora=True), "use_dora"),
                         (lora.LoraConfig(bias="all"), "bias='all'")):
        with pytest.raises(ConfigError, match=word):
            interop.export_peft(lora.inject_lora(gpt(), config), adapter_dir)


# ------------------------------------------------------------------- distrusted files (#11)

@pytest.mark.parametrize("config, words", [
    ({"n_embd": 8.0}, ["n_embd must be an integer", "8.0"]),
    ({"n_layer": True}, ["n_layer must be an integer", "True"]),
    ({"vocab_size": "11"}, ["vocab_size must be an integer", "'11'"]),
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings", "boolean", "'false'"]),
    ({"scale_attn_weights": 1}, ["scale_attn_weights", "1"]),
    ({"resid_pdrop": "0.1", "embd_pdrop": "0.1", "attn_pdrop": "0.1"},
     ["resid_pdrop must be a number", "'0.1'"]),
    ({"n_inner": 32.0}, ["n_inner must be an integer", "32.0"]),
])
def test_gpt_from_hf_config_values_must_have_their_json_types(hf_dir, config, words):
    edit(hf_dir, config=config)
    with pytest.raises(ConfigError) as info:
        interop.gpt_from_hf(hf_dir)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("config, words", [
    ({"vocab_size": 10**12}, ["vocab_size", "MAX_VOCAB_SIZE"]),
    ({"n_embd": 2**40, "n_head": 2}, ["n_embd", "MAX_N_EMBD"]),
    ({"n_positions": 10**9}, ["block_size", "MAX_BLOCK_SIZE"]),
    ({"n_layer": 10**6}, ["n_layer", "MAX_N_LAYER"]),
])
def test_gpt_from_hf_forged_huge_sizes_are_refused_by_a_named_limit(hf_dir, config, words):
    edit(hf_dir, config=config)
    with pytest.raises(ConfigError) as info:
        interop.gpt_from_hf(hf_dir)  # before: a MemoryError while building the GPT
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("config, key, shapes", [
    ({"vocab_size": 50000}, "transformer.wte.weight", ["(11, 8)", "(50000, 8)"]),
    ({"n_positions": 4096}, "transformer.wpe.weight", ["(6, 8)", "(4096, 8)"]),
    ({"n_embd": 512, "n_head": 2}, "transformer.wte.weight", ["(11, 8)", "(11, 512)"]),
    ({"n_layer": 3}, "transformer.h.2.ln_1.weight", ["lacks key", "(8,)"]),
])
def test_gpt_from_hf_checks_config_sizes_against_the_file_before_building(hf_dir, monkeypatch,
                                                                          config, key, shapes):
    edit(hf_dir, config=config)

    def no_gpt(*args, **kwargs):
        raise AssertionError("the GPT was built before the file was checked")

    monkeypatch.setattr(interop.hf, "GPT", no_gpt)
    with pytest.raises(CheckpointError) as info:
        interop.gpt_from_hf(hf_dir)
    for word in [key, *shapes]:
        assert word in str(info.value)


def test_gpt_from_hf_reads_half_precision_weights_and_refuses_integers(hf_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    arrays = load_file(hf_dir / "model.safetensors")
    expected = interop.gpt_from_hf(hf_dir, dtype=np.float64)
    torch_save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()},
               hf_dir / "model.safetensors")
    halved = interop.gpt_from_hf(hf_dir, dtype=np.float64)
    for key, value in weights(halved).items():  # bfloat16 keeps about 3 significant digits
        np.testing.assert_allclose(value, weights(expected)[key], rtol=1e-2, atol=1e-2)
    key = "transformer.h.1.ln_2.weight"
    save_file({**arrays, key: arrays[key].astype(np.int8)}, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"'{re.escape(key)}' has dtype I8"):
        interop.gpt_from_hf(hf_dir)


def test_gpt_from_hf_does_not_read_the_attention_mask_buffers(hf_dir):
    arrays = load_file(hf_dir / "model.safetensors")
    arrays["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 6, 6), np.uint8))  # not floats
    save_file(arrays, hf_dir / "model.safetensors")
    assert interop.gpt_from_hf(hf_dir).config.n_layer == 2


@pytest.mark.parametrize("config, words", [
    ({"use_rslora": "false"}, ["use_rslora", "boolean", "'false'"]),
    ({"use_dora": "false"}, ["use_dora", "boolean", "'false'"]),
    ({"r": 2.0}, ["r must be an integer", "2.0"]),
    ({"r": True}, ["r must be an integer", "True"]),
    ({"lora_alpha": "4"}, ["lora_alpha must be a number", "'4'"]),
    ({"r": 2**40}, ["r=1099511627776", "MAX_RANK"]),
    ({"rank_pattern": {"c_fc": 2**40}}, ["rank_pattern", "MAX_RANK"]),
    ({"rank_pattern": ["c_fc"]}, ["rank_pattern must be an object"]),
])
def test_import_peft_config_values_must_have_their_json_types(adapter_dir, config, words):
    edit_adapter(adapter_dir, config=config)
    with pytest.raises(ConfigError) as info:
        interop.import_peft(gpt(), adapter_dir)
    for word in words + ["adapter_config.json"]:
        assert word in str(info.value)


def test_import_peft_reads_half_precision_and_refuses_integer_weights(adapter_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    arrays = load_file(adapter_dir / "adapter_model.safetensors")
    torch_save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()},
               adapter_dir / "adapter_model.safetensors")
    model = interop.import_peft(gpt(), adapter_dir)
    got = host(model.h[0].mlp.fc.lora_A["default"].weight)
    expected = torch.from_numpy(arrays[KEY.format("A")]).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(got, expected)
    save_file({**arrays, KEY.format("A"): arrays[KEY.format("A")].astype(np.int8)},
              adapter_dir / "adapter_model.safetensors")
    model = gpt()
    with pytest.raises(CheckpointError, match=f"'{re.escape(KEY.format('A'))}' has dtype I8"):
        interop.import_peft(model, adapter_dir)
    assert not lora.lora_layers(model)


def test_import_peft_refuses_float64_values_that_float32_cannot_hold(adapter_dir):
    """1e300 became inf in the model (NumPy's overflow warning was all that said so)."""
    arrays = load_file(adapter_dir / "adapter_model.safetensors")
    a = arrays[KEY.format("A")].astype(np.float64)
    a[0, 0] = 1e300
    save_file({**arrays, KEY.format("A"): a}, adapter_dir / "adapter_model.safetensors")
    model = gpt(np.float32)  # a float64 model holds 1e300 as it is
    with pytest.raises(CheckpointError, match=r"beyond the range of float32 .*become inf"):
        interop.import_peft(model, adapter_dir)
    assert not lora.lora_layers(model)  # refused before the model changed
