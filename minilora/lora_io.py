"""Adapter files, as PEFT writes them: only the adapter, never the base.

A directory holds ``adapter_config.json`` (the LoraConfig in PEFT's fields, peft_type "LORA") and
``adapter_model.safetensors`` with keys named like PEFT's:

    base_model.model.<module path>.lora_A.weight            (r, in)
    base_model.model.<module path>.lora_B.weight            (out, r)
    base_model.model.<module path>.lora_magnitude_vector    (out,)   DoRA only
    base_model.model.<parameter path of a bias>             (out,)   bias "all" / "lora_only"

(the adapter name is not in the keys), plus ``manifest.json`` (each file's size and SHA-256). The
directory is written whole or not at all (:mod:`minilora.fileio`), so the config and the weights
always come from the same save, and loading verifies the manifest; nothing is read with pickle.
Sizes the config claims (r) are checked against the weights file's shapes before any adapter is
allocated. An adapter is r (n + k) numbers per layer: kilobytes to megabytes against the base's
n k per layer.

A PiSSA adapter belongs with the residual base it was made from (W - s B A): save that base too.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import numpy as np

from . import backend as B
from .errors import CheckpointError, ConfigError
from .fileio import MANIFEST, atomic_directory, open_save, warn_no_manifest
from .lora_config import LoraConfig
from .lora_inject import delete_adapter, inject_lora, lora_configs
from .lora_layer import lora_layers
from .nn import Module
from .tensorfile import read_json, read_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state_dict(model: Module, adapter_name: str = "default") -> dict[str, Any]:
    """``{file key: parameter}`` of adapter ``adapter_name``, keys as in the module docstring."""
    configs = lora_configs(model)
    if adapter_name not in configs:
        raise CheckpointError(f"adapter_state_dict: the model has no adapter {adapter_name!r}; "
                              f"it has {list(configs)}")
    out: dict[str, Any] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = \
                layer.lora_magnitude_vector[adapter_name].weight
    bias = configs[adapter_name].bias
    if bias != "none":
        adapted = {f"{path}.base_layer.bias" for path, layer in lora_layers(model)
                   if adapter_name in layer.lora_A}
        for key, p in model.named_parameters():
            if key.rsplit(".", 1)[-1] == "bias" and (bias == "all" or key in adapted):
                out[PREFIX + key] = p
    return out


def adapter_files(model: Module, adapter_name: str = "default") -> dict[str, bytes]:
    """``{file name: bytes}`` of adapter ``adapter_name``: its config as JSON and its weights as
    safetensors, as :func:`save_adapter` writes them (to put into a larger save)."""
    from safetensors.numpy import save as st_save

    params = adapter_state_dict(model, adapter_name)
    arrays = {k: np.ascontiguousarray(B.to_numpy(p.data)) for k, p in params.items()}
    config = lora_configs(model)[adapter_name].to_peft_dict()
    return {WEIGHTS_NAME: st_save(arrays, metadata={"format": "pt"}),
            CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")}


def save_adapter(model: Module, directory: str, adapter_name: str = "default") -> dict[str, str]:
    """Write adapter ``adapter_name`` of ``model`` to ``directory``, whole or not at all.

    A directory already there is replaced only if it is an adapter save. Returns
    ``{"config": path, "weights": path}`` of the two files written.
    """
    with atomic_directory(directory, (CONFIG_NAME, WEIGHTS_NAME)) as stage:
        for name, data in adapter_files(model, adapter_name).items():
            stage.write_bytes(name, data)
    return {"config": os.path.join(directory, CONFIG_NAME),
            "weights": os.path.join(directory, WEIGHTS_NAME)}


def read_adapter(directory: str) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read an adapter directory: its LoraConfig and its ``{key: array}`` (host float arrays).

    The manifest is verified (a save without one, e.g. from PEFT, loads with a note); the config's
    fields are type-checked; float tensors keep their precision (bfloat16 becomes float32, and
    each is cast to its parameter's dtype on load), integer tensors are refused.
    """
    found = open_save(directory, "load_adapter", warn=False)
    config_path, weights_path = found / CONFIG_NAME, found / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"load_adapter: {str(path)!r} is missing; an adapter directory "
                                  f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    raw = read_json(config_path, "load_adapter")
    try:
        config = LoraConfig.from_peft_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {str(config_path)!r} is not a usable LoRA adapter "
                              f"config: {exc}") from None
    # floats keep their precision (bf16 comes as float32); integers are refused before reading
    arrays = read_tensors(weights_path, "load_adapter", float_dtype=None, floats_only=True)
    if not (found / MANIFEST).is_file():  # after every check: a refusal is one line, not two
        warn_no_manifest(found, "load_adapter")
    return config, arrays


def _same_setup(a: LoraConfig, b: LoraConfig) -> list[str]:
    fields = ("r", "alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
              "alpha_pattern", "bias")
    return [f"{f}: file {getattr(b, f)!r}, model {getattr(a, f)!r}" for f in fields
            if getattr(a, f) != getattr(b, f)]


def _check_fit(expected: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"load_adapter: the file has key {k!r} with shape "
                              f"{tuple(arrays[k].shape)}, which this model has no place for "
                              f"({len(unexpected)} such keys); is it for another base model?")
    if missing:
        k = missing[0]
        raise CheckpointError(f"load_adapter: the file lacks key {k!r} (shape "
                              f"{expected[k].shape} in the model; {len(missing)} keys missing); "
                              f"is it for another base model?")
    for k, p in expected.items():
        if tuple(arrays[k].shape) != p.shape:
            raise CheckpointError(f"load_adapter: key {k!r} has shape {tuple(arrays[k].shape)} "
                                  f"in the file but {p.shape} in the model; the adapter was "
                                  f"made for another base model")


def _check_ranks(config: LoraConfig, arrays: dict[str, np.ndarray], directory: str) -> None:
    """The rank the config claims against the rows of every lora_A in the file, before anything
    of that rank is allocated."""
    if config.rank_pattern:
        return  # per-module ranks: the shapes are checked key by key after injection
    for key, a in arrays.items():
        if key.endswith("lora_A.weight") and (a.ndim != 2 or a.shape[0] != config.r):
            raise CheckpointError(f"load_adapter: {str(directory)!r}: the config says r="
                                  f"{config.r}, but {key!r} has shape {tuple(a.shape)}")


def load_adapter(model: Module, directory: str, adapter_name: str = "default") -> Module:
    """Load an adapter directory into ``model`` as adapter ``adapter_name``; returns ``model``.

    If the model has no adapter of that name, it is injected from the file's config (with its
    init skipped: the file's values replace it) and becomes active if no other adapter is. If it
    has one, the configs must agree. Keys and shapes must match exactly; on any mismatch a
    CheckpointError names the key and both shapes, and the model is left as it was.
    """
    merged = [path for path, layer in lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise CheckpointError(f"load_adapter: adapter {adapter_name!r} is merged into {merged[0]} "
                              f"({len(merged)} layers); replacing its values now would make a "
                              f"later unmerge subtract the wrong update. Call unmerge(model) "
                              f"first")
    config, arrays = read_adapter(directory)
    _check_ranks(config, arrays, directory)
    existing = lora_configs(model).get(adapter_name)
    flags = [(p, p.requires_grad) for p in model.parameters()]  # to undo the freezing on error
    if existing is not None:
        diffs = _same_setup(existing, config)
        if diffs:
            raise CheckpointError(f"load_adapter: adapter {adapter_name!r} of the model does not "
                                  f"match the file's config: {'; '.join(diffs)}")
    else:
        try:
            inject_lora(model, replace(config, init="kaiming"), adapter_name)
        except ConfigError as exc:
            raise CheckpointError(f"load_adapter: the adapter does not fit this model: "
                                  f"{exc}") from None
        model.lora_configs[adapter_name] = config
    expected = adapter_state_dict(model, adapter_name)
    try:
        _check_fit(expected, arrays)
    except CheckpointError:
        if existing is None:
            delete_adapter(model, adapter_name)
            for p, flag in flags:
                p.requires_grad = flag
        raise
    for k, p in expected.items():
        p.data[...] = B.asarray(arrays[k], dtype=p.data.dtype)
    return model
