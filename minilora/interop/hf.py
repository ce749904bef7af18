"""Hugging Face GPT-2 weights into and out of minilora's GPT (no torch needed).

HF's GPT2LMHeadModel and minilora's GPT compute the same function and store it differently:

* HF's projections are ``Conv1D`` layers, ``y = x W + b`` with W (in, out); minilora's ``Linear``
  is ``y = x W^T + b`` with W (out, in): every projection weight is transposed.
* HF fuses q, k and v into ``attn.c_attn``: weight (C, 3C), bias (3C,), its out axis holding q,
  k, v in that order; minilora keeps ``q_proj``, ``k_proj``, ``v_proj``.
* names: attn.c_proj is o_proj, mlp.c_fc is mlp.fc, mlp.c_proj is mlp.proj; n_positions is
  block_size. File keys carry "transformer." (GPT2LMHeadModel) or not (GPT2Model).
* the head: HF ties lm_head to wte and leaves it out of the file; minilora's head always is wte.

    model = gpt_from_hf("gpt2-dir")       # config.json + model.safetensors, as save_pretrained
    gpt_to_hf(model, "out-dir")           # GPT2LMHeadModel.from_pretrained("out-dir") loads it

Decisions: an ``lm_head.weight`` in the file must equal wte (an untied head cannot be
represented); a ``bias=False`` model is written with zero biases (the same function, since HF
GPT-2 always has biases); a model with LoRA layers or 4-bit weights is refused by ``gpt_to_hf``
(merge_and_unload or dequantize first; ``export_peft`` writes the adapter). HF's three dropout
rates map to minilora's one. The adapter half (export_peft, import_peft) is in peft.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend as B
from ..errors import (
    CheckpointError,
    ConfigError,
    DTypeError,
    InvalidArgumentError,
    check_path,
)
from ..fileio import write_files
from ..gpt import GPT, GPTConfig
from ..lora.layer import is_linear_like, lora_layers
from ..nn import Linear, keep_host_rng
from ..tensorfile import (
    json_bytes,
    json_field,
    read_header,
    read_json,
    read_tensors,
    safetensors_bytes,
)

__all__ = ["gpt_from_hf", "gpt_to_hf", "hf_config", "hf_state_dict"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "transformer."
# HF GPT-2 module (under h.{i}) -> the minilora modules it holds, in the order its out axis
# stacks them. Every one is a Conv1D in HF: weight (in, out).
MODULES = {
    "attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "attn.c_proj": ("attn.o_proj",),
    "mlp.c_fc": ("mlp.fc",),
    "mlp.c_proj": ("mlp.proj",),
}
_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")  # HF's causal mask in older files
_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
# config fields whose other values give another function: (field, accepted, HF's default)
_FIXED = (("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),
          ("layer_norm_epsilon", (1e-5,), 1e-5),
          ("scale_attn_weights", (True,), True),
          ("scale_attn_by_inverse_layer_idx", (False,), False),
          ("add_cross_attention", (False,), False))


def _layout(n_layer: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name, the minilora names it stacks along axis 0, transposed?) of every HF weight."""
    def same(name: str) -> tuple[str, tuple[str, ...], bool]:
        return name, (name,), False

    out = [same("wte.weight"), same("wpe.weight")]
    for i in range(n_layer):
        h = f"h.{i}."
        out += [same(f"{h}{ln}.{p}") for ln in ("ln_1", "ln_2") for p in ("weight", "bias")]
        out += [(f"{h}{hf}.{p}", tuple(f"{h}{m}.{p}" for m in mine), p == "weight")
                for hf, mine in MODULES.items() for p in ("weight", "bias")]
    return out + [same("ln_f.weight"), same("ln_f.bias")]


# ------------------------------------------------------------------------------ minilora -> HF

def hf_config(config: GPTConfig) -> dict:
    """The config.json fields of the GPT2LMHeadModel that computes what ``GPT(config)`` does."""
    if not isinstance(config, GPTConfig):
        raise DTypeError(f"hf_config: config must be a GPTConfig, got {type(config).__name__}")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        **{field: config.dropout for field in _DROPOUTS},
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None,  # HF's default 50256 is GPT-2's tokenizer's
    }


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights as HF GPT-2 stores them, keyed "transformer.<HF name>" (host arrays).

    Conv1D weights are transposed to (in, out) and q, k, v stacked into c_attn; the tied head is
    left out, as save_pretrained does. A model without biases gets zero biases.
    """
    if not isinstance(model, GPT):
        raise DTypeError(f"hf_state_dict: model must be a minilora GPT, got {type(model).__name__}")
    sd = model.state_dict()

    def get(key: str) -> np.ndarray:
        if key in sd:
            return B.to_numpy(sd[key])
        weight = sd[key[:-len("bias")] + "weight"]  # bias=False: a zero bias adds nothing
        return np.zeros(weight.shape[0], dtype=weight.dtype)

    out = {}
    for name, mine, transposed in _layout(model.config.n_layer):
        arr = np.concatenate([get(k) for k in mine], axis=0)
        out[PREFIX + name] = np.ascontiguousarray(arr.T if transposed else arr)
    return out


def _check_exportable(model: Any) -> None:
    if not isinstance(model, GPT):
        raise InvalidArgumentError(f"gpt_to_hf: model must be a minilora GPT, got "
                                   f"{type(model).__name__}")
    adapted = [path for path, _ in lora_layers(model)]
    if adapted:
        raise InvalidArgumentError(f"gpt_to_hf: the model has LoRA layers ({adapted[0]!r} and "
                                   f"{len(adapted) - 1} more); call lora.merge_and_unload(model) "
                                   f"to write the merged weights, or lora.unload(model) for the "
                                   f"base, and export_peft to write the adapter")
    for path, m in model.named_modules():
        if is_linear_like(m) and not isinstance(m, Linear):
            raise InvalidArgumentError(f"gpt_to_hf: {path!r} is a {type(m).__name__}, not a "
                                       f"float Linear; replace it by its to_linear() (dequantized)"
                                       f" first: HF GPT-2 files hold float weights")


def gpt_to_hf(model: GPT, directory: str | Path) -> dict[str, str]:
    """Write ``model`` as a Hugging Face GPT-2: ``config.json`` and ``model.safetensors`` in
    ``directory`` (created if missing), each written atomically, in the model's float dtype.

    ``GPT2LMHeadModel.from_pretrained(directory)`` then gives the same logits. Returns
    ``{"config": path, "weights": path}``.
    """
    _check_exportable(model)
    paths = write_files(directory, {CONFIG_NAME: json_bytes(hf_config(model.config)),
                                    WEIGHTS_NAME: safetensors_bytes(hf_state_dict(model))})
    return {"config": paths[CONFIG_NAME], "weights": paths[WEIGHTS_NAME]}


# ------------------------------------------------------------------------------ HF -> minilora

def _same(value: Any, accepted: Any) -> bool:
    """``value == accepted`` with JSON's types kept apart (1 is not true, true is not 1)."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def _gpt_config(hf: dict, dropout: float | None, where: str) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config; fields minilora's GPT cannot follow are errors, and
    so are values of the wrong JSON type (sizes must be ints, not 8.0, true or "8")."""
    at = f"gpt_from_hf: {where}"
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type != "gpt2" and not (model_type is None and "GPT2LMHeadModel" in archs):
        raise ConfigError(f"gpt_from_hf: config model_type={model_type!r} (architectures="
                          f"{archs}); only GPT-2 (model_type 'gpt2') can be loaded")
    for field, accepted, default in _FIXED:
        value = hf.get(field, default)
        if not any(_same(value, a) for a in accepted):
            raise ConfigError(f"gpt_from_hf: config {field}={value!r}; minilora's GPT "
                              f"computes it as {accepted[0]!r}")
    sizes = {f: json_field(hf, f, int, at) for f in _SIZES}
    n_inner = json_field(hf, "n_inner", int, at, None)
    if n_inner is not None and n_inner != 4 * sizes["n_embd"]:
        raise ConfigError(f"gpt_from_hf: config n_inner={n_inner!r}; minilora's MLP has "
                          f"4 * n_embd = {4 * sizes['n_embd']} (or null)")
    if dropout is None:
        rates = {f: json_field(hf, f, float, at, 0.1) for f in _DROPOUTS}  # 0.1: HF's default
        if len(set(rates.values())) > 1:
            raise ConfigError(f"gpt_from_hf: config dropout rates {rates} differ and minilora has "
                              f"one; pass dropout=...")
        dropout = rates["resid_pdrop"]
    try:  # GPTConfig checks the sizes against its MAX_* limits before anything is allocated
        return GPTConfig(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"],
                         n_layer=sizes["n_layer"], n_head=sizes["n_head"],
                         n_embd=sizes["n_embd"], dropout=dropout, bias=True)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None


def _read(source: Any, config: Any) -> tuple[dict | str, dict[str, tuple], dict, str, str]:
    """(arrays, or the weights file's path; {key: shape}; config dict; where the weights are;
    where the config is) from a directory, a .safetensors file or a dict of arrays. Of a file,
    only the header is read (and checked) here."""
    if hasattr(config, "to_dict"):  # a transformers GPT2Config
        config = config.to_dict()
    if isinstance(source, dict):
        if not isinstance(config, dict):
            raise InvalidArgumentError("gpt_from_hf: source is a dict of arrays, so config (the "
                                       "config.json values, a dict) is needed too")
        arrays = {k: np.asarray(v) for k, v in source.items()}
        return arrays, {k: v.shape for k, v in arrays.items()}, config, "the state dict", "config"
    check_path(source, "gpt_from_hf: source (a directory, a .safetensors file or a dict)")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"gpt_from_hf: {str(path)!r} does not exist")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    folder = path if path.is_dir() else path.parent
    config_where = "config"
    if config is None:
        config_where = repr(str(folder / CONFIG_NAME))
        config = read_json(str(folder / CONFIG_NAME), "gpt_from_hf")
    elif not isinstance(config, dict):
        raise InvalidArgumentError(f"gpt_from_hf: config must be a dict of config.json values, "
                                   f"got {type(config).__name__}")
    infos, _ = read_header(weights, "gpt_from_hf")
    return str(weights), {k: i.shape for k, i in infos.items()}, config, repr(str(weights)), \
        config_where


def _expected_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor an HF GPT-2 of config ``c`` stores, from the config
    alone (no model is built), lm_head.weight included (it is optional). Conv1D weights are
    (in, out): c_attn (C, 3C), attn.c_proj (C, C), c_fc (C, 4C), mlp.c_proj (4C, C)."""
    C = c.n_embd
    in_out = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C),
              "mlp.c_proj": (4 * C, C)}
    out = {"wte.weight": (c.vocab_size, C), "wpe.weight": (c.block_size, C),
           "ln_f.weight": (C,), "ln_f.bias": (C,), "lm_head.weight": (c.vocab_size, C)}
    for i in range(c.n_layer):
        for ln in ("ln_1", "ln_2"):
            out[f"h.{i}.{ln}.weight"] = out[f"h.{i}.{ln}.bias"] = (C,)
        for hf, (n_in, n_out) in in_out.items():
            out[f"h.{i}.{hf}.weight"], out[f"h.{i}.{hf}.bias"] = (n_in, n_out), (n_out,)
    return out


def _check_keys(shapes: dict[str, tuple], c: GPTConfig, where: str,
                tied: bool) -> dict[str, str]:
    """{HF name: key as the file spells it} of the tensors to load, from the file's
    {key: shape} (no data needed): prefixes and buffers dropped; unknown, missing or misshapen
    keys are errors naming the key and the shapes."""
    names = {}
    for key in shapes:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if not _BUFFER.fullmatch(name):
            names[name] = key
    expected = _expected_shapes(c)
    size = f"n_layer={c.n_layer}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, " \
           f"n_positions={c.block_size}"
    for name, key in sorted(names.items()):
        if name not in expected:
            raise CheckpointError(f"gpt_from_hf: {where} has key {key!r}, which a GPT-2 with "
                                  f"{size} does not have; is the file for another architecture?")
    for name, shape in expected.items():
        if name not in names and name != "lm_head.weight":
            raise CheckpointError(f"gpt_from_hf: {where} lacks key {PREFIX + name!r} (shape "
                                  f"{shape} for {size})")
        if name in names and tuple(shapes[names[name]]) != shape:
            raise CheckpointError(f"gpt_from_hf: key {names[name]!r} has shape "
                                  f"{tuple(shapes[names[name]])} in {where}, expected "
                                  f"{shape} for {size}")
    if "lm_head.weight" not in names and not tied:
        raise CheckpointError(f"gpt_from_hf: config tie_word_embeddings=False but {where} has no "
                              f"lm_head.weight")
    return names


def _untie(named: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """``named`` without lm_head.weight, which must equal wte (minilora's head is wte)."""
    head = named.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, named["wte.weight"]):
        raise CheckpointError(f"gpt_from_hf: key 'lm_head.weight' in {where} differs from "
                              f"{PREFIX}wte.weight; minilora's head is tied to wte, so an untied "
                              f"head cannot be loaded")
    return named


def gpt_from_hf(source: str | Path | dict, config: Any = None, dtype: Any = None,
                dropout: float | None = None) -> GPT:
    """A minilora GPT holding Hugging Face GPT-2 weights, in eval mode (as from_pretrained).

    ``source`` is a directory with config.json and model.safetensors (what save_pretrained
    writes), a .safetensors file (config from ``config`` or a config.json beside it), or a dict
    ``{HF key: array}`` with ``config`` (a dict of config.json values, or a GPT2Config).
    ``dtype`` is float32 or float64 (default: minilora's default dtype); ``dropout`` overrides
    HF's rates (needed when its three differ). Errors name the config field or the file key.
    Nothing is taken on trust: the config's values must have their JSON types and lie within
    GPTConfig's MAX_* limits, and the weights file's header must hold exactly the shapes the
    config implies, all before any weight is read or the GPT is built.
    """
    # everything the files claim is checked against each other before anything big is read or
    # allocated: the config's sizes (types, limits), then the weights' header shapes against them
    data, shapes, hf, where, config_where = _read(source, config)
    gpt_config = _gpt_config(hf, dropout, config_where)
    tied = json_field(hf, "tie_word_embeddings", bool, f"gpt_from_hf: {config_where}", True)
    keys = _check_keys(shapes, gpt_config, where, tied)
    dtype = B.default_dtype() if dtype is None else dtype
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise InvalidArgumentError(f"gpt_from_hf: dtype must be float32 or float64, got "
                                   f"{np.dtype(dtype)}")
    if isinstance(data, dict):
        arrays = data
    else:  # only the keys kept (not HF's mask buffers), floats read as the model's dtype
        arrays = read_tensors(data, "gpt_from_hf", names=list(keys.values()), float_dtype=dtype)
    named = _untie({name: arrays[key] for name, key in keys.items()}, where)
    with keep_host_rng(), B.default_dtype_as(dtype):  # the init is overwritten below
        model = GPT(gpt_config)
    state = {}
    for name, mine, transposed in _layout(gpt_config.n_layer):
        arr = named[name].T if transposed else named[name]
        state.update(zip(mine, np.split(arr, len(mine), axis=0)))
    model.load_state_dict(state, strict=True)
    return model.eval()
