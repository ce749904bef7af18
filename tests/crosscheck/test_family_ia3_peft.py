"""minilora's IA3 against PEFT's on transformers' GPT-2 (the HF export of a minilora GPT): the
same vectors give the same logits, merging gives the same weights, and each side loads the
other's adapter directory."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import minilora as ml  # noqa: E402
from minilora import family, interop  # noqa: E402
from minilora.family.ia3 import ia3_layers  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = [pytest.mark.crosscheck,  # transformers warns of its own deprecations
              pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
              pytest.mark.filterwarnings("ignore::minilora.fileio.NoManifestWarning")]

V, T, C, L = 13, 8, 16, 2
IDX = np.random.default_rng(0).integers(0, V, (3, T))
# PEFT's default on GPT-2 adapts the fused c_attn, so q too: the same function in minilora
WITH_Q = family.IA3Config(("q_proj", "k_proj", "v_proj", "mlp.proj"), ("mlp.proj",))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ours(seed=0):
    """A float64 minilora GPT with random biases (GPT-2's start at zero)."""
    ml.manual_seed(seed)
    model = ml.GPT(ml.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2,
                                n_embd=C)).double()
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data[...] = ml.backend.asarray(rng.normal(0, 0.1, p.shape))
    return model


def theirs(model, directory):
    """The HF GPT2LMHeadModel of ``model``, through minilora's export."""
    interop.gpt_to_hf(model, directory)
    return transformers.GPT2LMHeadModel.from_pretrained(directory).double().eval()


def peft_ia3(hf):
    """PEFT's IA3 with its own GPT-2 defaults (target and feedforward modules)."""
    return peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=True)
                               ).double().eval()


def their_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDX)).logits.numpy()


def our_logits(model):
    with ml.no_grad():
        return host(model(IDX))


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in ia3_layers(model):
        layer.ia3_l.data[...] = ml.backend.asarray(1 + rng.normal(0, 0.5, layer.ia3_l.shape))


def copy_vectors(mine, their_model):
    """minilora's vectors into PEFT's layers: c_attn (3C, 1) = [l_q or 1; l_k; l_v], mlp.c_proj
    (1, 4C) = l_ff."""
    params = dict(their_model.named_parameters())
    for i in range(L):
        parts = [mine.get_submodule(f"h.{i}.attn.{p}") for p in ("q_proj", "k_proj", "v_proj")]
        qkv = np.concatenate([host(p.ia3_l) if hasattr(p, "ia3_l") else np.ones(C)
                              for p in parts])
        prefix = f"base_model.model.transformer.h.{i}."
        with torch.no_grad():
            params[f"{prefix}attn.c_attn.ia3_l.default"].copy_(torch.from_numpy(qkv[:, None]))
            params[f"{prefix}mlp.c_proj.ia3_l.default"].copy_(
                torch.from_numpy(host(mine.h[i].mlp.proj.ia3_l)[None, :]))


@pytest.mark.host_only("module names against PEFT's tables: no arrays")
def test_the_defaults_are_peft_gpt2_defaults_mapped_to_minilora():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )
    assert set(TARGETS["gpt2"]) == {"c_attn", "mlp.c_proj"} and FF["gpt2"] == ["mlp.c_proj"]
    default = family.IA3Config()
    assert default.target_modules == ("k_proj", "v_proj", "mlp.proj")  # c_attn less q
    assert default.feedforward_modules == ("mlp.proj",)


@pytest.mark.parametrize("config", [WITH_Q, family.IA3Config()], ids=["with_q", "default"])
def test_the_same_vectors_give_the_same_logits_and_merge_to_the_same_weights(tmp_path, config):
    mine = family.inject_ia3(ours(), config)
    randomize(mine)
    their_model = peft_ia3(theirs(ours(), tmp_path / "base"))
    copy_vectors(mine, their_model)
    expected = their_logits(their_model)
    assert not np.allclose(expected, their_logits(theirs(ours(), tmp_path / "plain")),
                           atol=1e-3)  # the vectors act
    np.testing.assert_allclose(our_logits(mine), expected, atol=1e-5)
    family.merge_and_unload(mine)
    merged = their_model.merge_and_unload()
    their_weights = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    for key, value in interop.hf_state_dict(mine).items():
        np.testing.assert_allclose(value, their_weights[key], rtol=1e-12, atol=1e-12,
                                   err_msg=key)
    np.testing.assert_allclose(our_logits(mine), expected, atol=1e-5)


ONE_LAYER_EACH = family.IA3Config(r"h\.0\.attn\.[kv]_proj|h\.1\.mlp\.(fc|proj)|h\.0\.attn\.o_proj",
                                  r"h\.1\.mlp\.proj|h\.0\.attn\.o_proj")


@pytest.mark.parametrize("config", [WITH_Q, family.IA3Config(), ONE_LAYER_EACH],
                         ids=["with_q", "default", "per_layer"])
def test_peft_loads_the_directory_minilora_saved(tmp_path, config):
    mine = family.inject_ia3(ours(), config)
    randomize(mine)
    family.save_adapter(mine, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(theirs(ours(), tmp_path / "base"),
                                            tmp_path / "adapter").double().eval()
    assert isinstance(loaded.peft_config["default"], peft.IA3Config)
    np.testing.assert_allclose(their_logits(loaded), our_logits(mine), atol=1e-5)


def test_minilora_loads_the_directory_peft_saved(tmp_path):
    their_model = peft_ia3(theirs(ours(), tmp_path / "base"))
    with torch.no_grad():
        for name, p in their_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    their_model.save_pretrained(tmp_path / "adapter")
    mine = family.load_adapter(ours(), tmp_path / "adapter")
    assert mine.family_config == WITH_Q  # PEFT trained q's third too
    np.testing.assert_allclose(our_logits(mine), their_logits(their_model), atol=1e-5)
