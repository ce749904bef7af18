"""LoRA adapters in PEFT's format for Hugging Face GPT-2, to and from minilora's GPT.

PEFT names an adapter on GPT-2 after HF's modules, h.{i}.attn.c_attn (q, k and v fused),
attn.c_proj, mlp.c_fc and mlp.c_proj, and writes adapter_config.json and
adapter_model.safetensors with keys

    base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight    (r, in)
    base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight    (out, r)

A and B are (r, in) and (out, r) even though GPT-2's Conv1D stores its weight (in, out): only the
base weight is transposed, which ``fan_in_fan_out: true`` records.

Fusing (export). minilora adapts q, k and v separately, delta W_p = s_p B_p A_p. c_attn stacks
W_q, W_k, W_v along its out axis, so its update is an exact LoRA of rank r_q + r_k + r_v:

    delta W_qkv = [s_q B_q A_q; s_k B_k A_k; s_v B_v A_v] = s B_qkv A_qkv,
    A_qkv = [A_q; A_k; A_v],   B_qkv = [[c_q B_q, 0, 0], [0, c_k B_k, 0], [0, 0, c_v B_v]],

c_p = s_p / s. s is the first adapted projection's scaling, so c_p = 1 (B copied bit for bit)
when they agree, as they usually do; c_attn's lora_alpha is s r (s sqrt(r) with rsLoRA) at the
fused rank r. A projection without the adapter adds no rows to A and no columns to B.

Splitting (import). c_attn's B splits by rows into B_q, B_k, B_v, each paired with the whole
(shared) A: exact again. Columns of a B_p that are all zero (another projection's share, after a
fused export) are dropped with their rows of A, and a projection whose block is all zero gets no
adapter, so an export followed by an import gives back the original ranks. An adapter whose B is
zero everywhere (fresh from init) keeps its full rank on all three projections. (Trained in
minilora, q, k and v then learn separate A's, and a later export has rank 3 r.)

Refused, with an error naming the field: DoRA, trained biases (bias other than "none"),
modules_to_save, LoRA variants and inits that rewrite the base weights. lora_dropout carries over;
minilora draws a dropout mask per projection where PEFT draws one for c_attn, which only matters in
training mode. Everything is read without pickle (JSON and safetensors).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Any

import numpy as np

from .. import backend as B
from ..errors import CheckpointError, ConfigError, DTypeError, InvalidArgumentError
from ..gpt import GPT
from ..lora.config import LoraConfig
from ..lora.inject import inject_lora, lora_configs
from ..lora.io import WEIGHTS_NAME, adapter_file_bytes, read_adapter_files, write_adapter_files
from ..lora.layer import lora_layers
from ..lora.variants import lora_scaling
from ..nn import Module, keep_host_rng
from ..tensorfile import json_field, overflows_when_cast
from .hf import MODULES

KEY_PREFIX = "base_model.model.transformer."
_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?h\.(\d+)\."
                  r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight")
_MINE = {m for ms in MODULES.values() for m in ms}
# PEFT fields whose non-default values change what an adapter computes, or what it needs beside it
_MUST_BE_OFF = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
                "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens",
                "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
_FLAGS = ("use_dora", "lora_bias", "use_qalora")  # those of _MUST_BE_OFF that are booleans
_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the others rewrite the base weights

Adapter = dict  # {"h.{i}.{module}": (A (r, in), B (out, r), alpha)}: r is A.shape[0]


# ------------------------------------------------------------------------------------ helpers

def _check_gpt(model: Any, who: str) -> GPT:
    if not isinstance(model, GPT):
        raise InvalidArgumentError(f"{who}: model must be a minilora GPT, got "
                                   f"{type(model).__name__}")
    return model


def _number(x: float) -> int | float:
    """Whole numbers as int in JSON (PEFT's lora_alpha is an int field)."""
    return int(x) if float(x).is_integer() else float(x)


def _split_path(path: str) -> tuple[int, str]:
    """"h.3.attn.c_attn" -> (3, "attn.c_attn")."""
    _, i, module = path.split(".", 2)
    return int(i), module


def config_fields(adapter: Adapter, n_layer: int) -> dict:
    """target_modules, r, lora_alpha, rank_pattern, alpha_pattern that adapt exactly the modules
    of ``adapter``: a module name when every layer has it, else one "h.{i}.name" per layer; the
    most common r and alpha, and patterns for the rest (PEFT and minilora match both the same
    way: a key matches a path that ends in "." + key)."""
    by_module: dict[str, list[str]] = {}
    for path in adapter:
        by_module.setdefault(_split_path(path)[1], []).append(path)
    targets = [p for m, paths in by_module.items()
               for p in ([m] if len(paths) == n_layer else paths)]
    ranks = {p: int(a.shape[0]) for p, (a, _, _) in adapter.items()}
    alphas = {p: _number(alpha) for p, (_, _, alpha) in adapter.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"target_modules": targets, "r": r, "lora_alpha": alpha,
            "rank_pattern": _pattern(ranks, r, by_module),
            "alpha_pattern": _pattern(alphas, alpha, by_module)}


def _pattern(values: dict[str, Any], default: Any, by_module: dict[str, list[str]]) -> dict:
    out = {}
    for module, paths in by_module.items():
        differ = [p for p in paths if values[p] != default]
        if len({values[p] for p in paths}) == 1 and differ:
            out[module] = values[paths[0]]  # one key for the whole module kind
        else:
            out.update({p: values[p] for p in differ})
    return out


# ---------------------------------------------------------------------------------- export

def _fuse(parts: list[tuple[int, tuple]], n: int, use_rslora: bool) -> tuple:
    """(A, B, alpha) of the HF module that stacks ``n`` projections, from the adapted ones,
    ``parts`` = [(position, (A_p, B_p, alpha_p))]: the module docstring's A_qkv, B_qkv."""
    if n == 1:
        return parts[0][1]
    scalings = [lora_scaling(a.shape[0], alpha, use_rslora) for _, (a, _, alpha) in parts]
    s, r = scalings[0], sum(a.shape[0] for _, (a, _, _) in parts)
    alpha = parts[0][1][2] if len(parts) == 1 else s * (math.sqrt(r) if use_rslora else r)
    out = parts[0][1][1].shape[0]  # rows per projection
    A = np.concatenate([a for _, (a, _, _) in parts], axis=0)  # (r, in)
    Bf = np.zeros((n * out, r), dtype=A.dtype)  # (n out, r), block-structured
    col = 0
    for (j, (a, b, _)), s_p in zip(parts, scalings):
        Bf[j * out:(j + 1) * out, col:col + a.shape[0]] = b if s_p == s else b * (s_p / s)
        col += a.shape[0]
    return A, Bf, alpha


def export_peft(model: GPT, directory: str | os.PathLike,
                adapter_name: str = "default") -> dict[str, str]:
    """Write adapter ``adapter_name`` of ``model`` as a PEFT LoRA adapter for HF GPT-2.

    The files (adapter_config.json, adapter_model.safetensors) load with
    ``PeftModel.from_pretrained(GPT2LMHeadModel ..., directory)`` on the base that
    :func:`minilora.interop.gpt_to_hf` writes; q, k and v are fused into c_attn exactly (module
    docstring). A merged adapter is written all the same: pair it with the unmerged base.
    Returns ``{"config": path, "weights": path}``.
    """
    return write_adapter_files(directory, *_peft_adapter(model, adapter_name))


def peft_adapter_files(model: GPT, adapter_name: str = "default") -> dict[str, bytes]:
    """``{file name: bytes}`` of what :func:`export_peft` writes, to put into a larger save."""
    return adapter_file_bytes(*_peft_adapter(model, adapter_name))


def is_peft_gpt2(arrays_or_keys: Any) -> bool:
    """True when the adapter's keys name HF GPT-2 modules (c_attn, c_fc, ...): PEFT's layout."""
    if isinstance(arrays_or_keys, (str, bytes)) or not hasattr(arrays_or_keys, "__iter__"):
        raise DTypeError(f"is_peft_gpt2: expected a dict of arrays or a list of keys, got "
                         f"{type(arrays_or_keys).__name__}")
    return any(isinstance(k, str) and _KEY.fullmatch(k) for k in arrays_or_keys)


def _peft_adapter(model: GPT, adapter_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(PEFT config fields, {file key: host array}) of an adapter, q, k, v fused."""
    _check_gpt(model, "export_peft")
    configs = lora_configs(model)
    if adapter_name not in configs:
        raise InvalidArgumentError(f"export_peft: the model has no adapter {adapter_name!r}; it "
                                   f"has {list(configs)}")
    config = configs[adapter_name]
    if config.use_dora:
        raise ConfigError(f"export_peft: adapter {adapter_name!r} has use_dora=True; minilora "
                          f"exports plain LoRA only (merge it with lora.merge_and_unload and "
                          f"export the base with gpt_to_hf instead)")
    if config.bias != "none":
        raise ConfigError(f"export_peft: adapter {adapter_name!r} has bias={config.bias!r}; only "
                          f"bias='none' is exported (the trained biases belong to the base: "
                          f"write it with gpt_to_hf)")
    mine: Adapter = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if not re.fullmatch(r"h\.\d+\.(.+)", path) or _split_path(path)[1] not in _MINE:
            raise ConfigError(f"export_peft: adapter {adapter_name!r} sits on {path!r}, which "
                              f"has no GPT-2 counterpart; exportable: {sorted(_MINE)}")
        mine[path] = (B.to_numpy(layer.lora_A[adapter_name].weight.data),
                      B.to_numpy(layer.lora_B[adapter_name].weight.data),
                      layer.lora_alpha[adapter_name])
    theirs: Adapter = {}
    for i in range(model.config.n_layer):
        for hf, ms in MODULES.items():
            parts = [(j, mine[f"h.{i}.{m}"]) for j, m in enumerate(ms) if f"h.{i}.{m}" in mine]
            if parts:
                theirs[f"h.{i}.{hf}"] = _fuse(parts, len(ms), config.use_rslora)
    arrays = {}
    for path, (a, b, _) in theirs.items():
        arrays[f"{KEY_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a)
        arrays[f"{KEY_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b)
    peft_config = {**config.to_peft_dict(), **config_fields(theirs, model.config.n_layer),
                   "task_type": "CAUSAL_LM", "fan_in_fan_out": True, "init_lora_weights": True}
    return peft_config, arrays


# ---------------------------------------------------------------------------------- import

def _peft_config(raw: dict, where: str) -> LoraConfig:
    """PEFT's fields checked, JSON types included ("false" is not a boolean, 8.0 not an r), as a
    LoraConfig that resolves r and alpha for PEFT's module paths."""
    at = f"import_peft: {where}"
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{at} has peft_type={raw.get('peft_type')!r}; only 'LORA' adapters "
                          f"can be imported")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise ConfigError(f"{at} lacks the field {field!r}")
    for field in _MUST_BE_OFF:
        # the flags are JSON booleans (a string "false" would be truthy); the rest are objects
        # or lists, off when null or empty
        value = json_field(raw, field, bool, at, False) if field in _FLAGS else raw.get(field)
        if value:
            raise ConfigError(f"{at} has {field}={value!r}, which minilora's plain LoRA cannot "
                              f"represent")
    checks = (("bias", ("none",), "trained biases belong to the base"),
              ("init_lora_weights", _INITS, "the others rewrite the base weights"))
    for field, allowed, why in checks:
        value = raw.get(field, allowed[0])
        if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
            raise ConfigError(f"{at} has {field}={value!r}; supported: {list(allowed)} ({why})")
    fields = dict(r=json_field(raw, "r", int, at), alpha=json_field(raw, "lora_alpha", float, at),
                  dropout=json_field(raw, "lora_dropout", float, at, 0.0),
                  use_rslora=json_field(raw, "use_rslora", bool, at, False),
                  rank_pattern=dict(json_field(raw, "rank_pattern", dict, at, {})),
                  alpha_pattern=dict(json_field(raw, "alpha_pattern", dict, at, {})))
    try:  # LoraConfig checks the values: r > 0 and within MAX_RANK, alpha > 0, the patterns
        return LoraConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None


def _collect(arrays: dict[str, np.ndarray], model: GPT, peft: LoraConfig, where: str) -> Adapter:
    """The file's adapter by HF module path, every key and shape checked against the model."""
    found: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, arr in arrays.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"import_peft: {where} has key {key!r}, which is not the LoRA A "
                                  f"or B of a GPT-2 projection (such as '{KEY_PREFIX}h.0.attn."
                                  f"c_attn.lora_A.weight'); is the adapter for another model?")
        if int(m[1]) >= model.config.n_layer:
            raise CheckpointError(f"import_peft: {where} has key {key!r} for layer {m[1]}, but "
                                  f"the model has n_layer={model.config.n_layer}")
        found.setdefault(f"h.{m[1]}.{m[2]}", {})[m[3]] = (key, arr)
    if not found:
        raise CheckpointError(f"import_peft: {where} holds no LoRA weights")
    adapter: Adapter = {}
    for path, ab in sorted(found.items(), key=lambda kv: _split_path(kv[0])):
        for which in "AB":
            if which not in ab:
                raise CheckpointError(f"import_peft: {where} lacks key "
                                      f"{KEY_PREFIX}{path}.lora_{which}.weight (it has the other "
                                      f"half of that module's adapter)")
        i, hf = _split_path(path)
        layers = [model.get_submodule(f"h.{i}.{m}") for m in MODULES[hf]]
        r = peft.rank_for("transformer." + path)
        expected = {"A": (r, layers[0].in_features), "B": (sum(x.out_features for x in layers), r)}
        for which, (key, arr) in ab.items():
            if tuple(arr.shape) != expected[which]:
                raise CheckpointError(f"import_peft: key {key!r} has shape {tuple(arr.shape)}, "
                                      f"expected {expected[which]} (r={r} from the config, the "
                                      f"model's {path} has in, out = {layers[0].in_features}, "
                                      f"{expected['B'][0]})")
        adapter[path] = (ab["A"][1], ab["B"][1], peft.alpha_for("transformer." + path))
    return adapter


def _split(a: np.ndarray, b: np.ndarray, alpha: float, n: int, use_rslora: bool) -> list:
    """[(A_p, B_p, alpha_p) or None] for the ``n`` projections a fused module holds (module
    docstring: B's rows split, A shared, all-zero columns dropped, the scaling kept)."""
    if n == 1:
        return [(a, b, alpha)]
    r = a.shape[0]
    s = lora_scaling(r, alpha, use_rslora)
    blocks = np.split(b, n, axis=0)  # n x (out, r)
    used = [np.flatnonzero((blk != 0).any(axis=0)) for blk in blocks]
    if not any(len(cols) for cols in used):  # B = 0 everywhere: a fresh adapter, keep it whole
        used = [np.arange(r)] * n
    parts = []
    for blk, cols in zip(blocks, used):
        k = len(cols)
        if k == 0:
            parts.append(None)  # this projection has no share of the adapter
        elif k == r:
            parts.append((a, blk, alpha))
        else:  # alpha_p gives the same scaling s at rank k
            parts.append((a[cols], blk[:, cols], s * (math.sqrt(k) if use_rslora else k)))
    return parts


def import_peft(model: GPT, directory: str | os.PathLike, adapter_name: str = "default") -> GPT:
    """Load a PEFT LoRA adapter for HF GPT-2 from ``directory`` into ``model`` as
    ``adapter_name``; returns ``model`` (in place, as ``lora.load_adapter``).

    c_attn's adapter becomes adapters on q_proj, k_proj and v_proj (module docstring), c_proj on
    o_proj, mlp.c_fc on mlp.fc, mlp.c_proj on mlp.proj, with PEFT's r, lora_alpha, rank_pattern,
    alpha_pattern, use_rslora and lora_dropout. Which modules are adapted is read from the
    file's keys; fan_in_fan_out is not needed (PEFT stores A (r, in) and B (out, r) either way).
    Keys, shapes and fields minilora cannot represent raise errors naming them; the model is
    changed only after everything has been checked.
    """
    _check_gpt(model, "import_peft")
    if adapter_name in lora_configs(model):
        raise InvalidArgumentError(f"import_peft: the model already has an adapter "
                                   f"{adapter_name!r}; choose another adapter_name")
    # float64 holds every float format exactly; the values are cast to the model's dtype below
    peft, arrays, found = read_adapter_files(directory, "import_peft",
                                             lambda raw, path: _peft_config(raw, repr(path)),
                                             float_dtype=np.float64)
    theirs = _collect(arrays, model, peft, repr(str(found / WEIGHTS_NAME)))
    mine: Adapter = {}
    for path, (a, b, alpha) in theirs.items():
        i, hf = _split_path(path)
        for m, part in zip(MODULES[hf], _split(a, b, alpha, len(MODULES[hf]), peft.use_rslora)):
            if part is not None:
                mine[f"h.{i}.{m}"] = part
    fields = config_fields(mine, model.config.n_layer)
    config = LoraConfig(r=fields["r"], alpha=fields["lora_alpha"], dropout=peft.dropout,
                        target_modules=tuple(fields["target_modules"]),
                        use_rslora=peft.use_rslora, rank_pattern=fields["rank_pattern"],
                        alpha_pattern=fields["alpha_pattern"])
    dtype = model.wte.weight.data.dtype
    wide = next((k for k, v in arrays.items() if overflows_when_cast(v, dtype)), None)
    if wide is not None:  # checked before the model changes: 1e300 would become inf
        raise CheckpointError(f"import_peft: tensor {wide!r} holds values beyond the range of "
                              f"{np.dtype(dtype)} (max {np.finfo(dtype).max:.4g}), which would "
                              f"become inf")
    with keep_host_rng():  # the init of A is overwritten below
        inject_lora(model, config, adapter_name)
    for path, (a, b, _) in mine.items():
        layer: Module = model.get_submodule(path)
        for table, value in ((layer.lora_A, a), (layer.lora_B, b)):
            p = table[adapter_name].weight
            p.data[...] = B.asarray(value, dtype=p.data.dtype)
    return model
