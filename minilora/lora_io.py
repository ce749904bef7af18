"""Adapter files, as PEFT writes them: only the adapter, never the base.

A directory holds ``adapter_config.json`` (the LoraConfig in PEFT's fields, peft_type "LORA") and
``adapter_model.safetensors`` with keys named like PEFT's:

    base_model.model.<module path>.lora_A.weight            (r, in)
    base_model.model.<module path>.lora_B.weight            (out, r)
    base_model.model.<module path>.lora_magnitude_vector    (out,)   DoRA only
    base_model.model.<parameter path of a bias>             (out,)   bias "all" / "lora_only"

(the adapter name is not in the keys). Both files are written atomically (a temporary file in the
same directory, then ``os.replace``) and read without pickle. An adapter is r (n + k) numbers per
layer: kilobytes to megabytes against the base's n k per layer.

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
from .fileio import atomic_write_bytes
from .lora_config import LoraConfig
from .lora_inject import delete_adapter, inject_lora, lora_configs
from .lora_layer import lora_layers
from .nn import Module

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


def save_adapter(model: Module, directory: str, adapter_name: str = "default") -> dict[str, str]:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` (created if missing).

    Returns ``{"config": path, "weights": path}`` of the two files written.
    """
    from safetensors.numpy import save as st_save

    params = adapter_state_dict(model, adapter_name)
    arrays = {k: np.ascontiguousarray(B.to_numpy(p.data)) for k, p in params.items()}
    config = lora_configs(model)[adapter_name].to_peft_dict()
    os.makedirs(directory, exist_ok=True)
    paths = {"config": os.path.join(directory, CONFIG_NAME),
             "weights": os.path.join(directory, WEIGHTS_NAME)}
    atomic_write_bytes(paths["weights"], st_save(arrays, metadata={"format": "pt"}))
    atomic_write_bytes(paths["config"], (json.dumps(config, indent=2, sort_keys=True) + "\n")
                  .encode())
    return paths


def read_adapter(directory: str) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read an adapter directory: its LoraConfig and its ``{key: array}`` (host arrays)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"load_adapter: {path!r} is missing; an adapter directory "
                                  f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        config = LoraConfig.from_peft_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {config_path!r} is not a usable LoRA adapter "
                              f"config: {exc}") from None
    try:
        arrays = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"load_adapter: {weights_path!r} is not a readable safetensors "
                              f"file: {exc}") from None
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


def load_adapter(model: Module, directory: str, adapter_name: str = "default") -> Module:
    """Load an adapter directory into ``model`` as adapter ``adapter_name``; returns ``model``.

    If the model has no adapter of that name, it is injected from the file's config (with its
    init skipped: the file's values replace it) and becomes active if no other adapter is. If it
    has one, the configs must agree. Keys and shapes must match exactly; on any mismatch a
    CheckpointError names the key and both shapes, and the model is left as it was.
    """
    config, arrays = read_adapter(directory)
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
