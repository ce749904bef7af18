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

The reader and writer of such directories here (:func:`adapter_file_bytes`,
:func:`write_adapter_files`, :func:`read_adapter_files`, :func:`adapter_header`) are the only
ones: ``interop.export_peft`` / ``import_peft`` (PEFT's GPT-2 names) and the command line's
fine-tunes use them too.

A PiSSA adapter belongs with the residual base it was made from (W - s B A): save that base too,
or write it as the plain LoRA of the untouched base (``variants.pissa_as_lora``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from .. import backend as B
from ..errors import CheckpointError, ConfigError, NonFiniteWarning
from ..fileio import MANIFEST, open_save, read_whole, warn_no_manifest, write_files
from ..nn import Module, check_module
from ..tensorfile import (
    TensorInfo,
    json_bytes,
    nonfinite_keys,
    overflows_when_cast,
    read_header,
    read_json,
    read_tensors,
    safetensors_bytes,
)
from .config import LoraConfig
from .inject import delete_adapter, inject_lora, linear_like_modules, lora_configs
from .layer import lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
PREFIX = "base_model.model."

Parsed = TypeVar("Parsed")


# ------------------------------------------------------------ PEFT's adapter directory, as files

def adapter_file_bytes(config: dict, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """``{CONFIG_NAME: config as JSON, WEIGHTS_NAME: arrays as safetensors}``: the two files of
    an adapter directory, as PEFT writes them. ``config`` holds adapter_config.json's fields,
    ``arrays`` the host arrays under their file keys. The one writer of adapter files: saving
    (:func:`save_adapter`), PEFT's GPT-2 layout (``interop.export_peft``) and the fine-tunes the
    command line saves all go through it. Arrays holding NaN or inf are refused: such an adapter
    makes every output NaN, and writing it could replace a good save."""
    bad = nonfinite_keys(arrays)
    if bad:
        raise CheckpointError(f"adapter files: {len(bad)} tensor(s) hold NaN or inf values "
                              f"({bad[0]!r} first); not writing them")
    return {CONFIG_NAME: json_bytes(config), WEIGHTS_NAME: safetensors_bytes(arrays)}


def write_adapter_files(directory: str | os.PathLike, config: dict,
                        arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write :func:`adapter_file_bytes` into ``directory`` as one save, whole or not at all (a
    directory already there is replaced only if it is an adapter save). Returns
    ``{"config": path, "weights": path}``."""
    paths = write_files(directory, adapter_file_bytes(config, arrays), names=ADAPTER_FILES)
    return {"config": paths[CONFIG_NAME], "weights": paths[WEIGHTS_NAME]}


def read_adapter_files(directory: str | os.PathLike, who: str,
                       parse: Callable[[dict, str], Parsed],
                       float_dtype: Any = None) -> tuple[Parsed, dict[str, np.ndarray], Path]:
    """The one reader of adapter directories: ``(parse(config fields, config path), {key:
    host array}, the directory read)``.

    A half-done save beside ``directory`` is finished or undone and the manifest verified first
    (:func:`minilora.fileio.open_save`); both files must be there. ``parse`` checks the config
    (raising) before any tensor is read. Float tensors become ``float_dtype`` (None: as stored,
    bfloat16 as float32); integer tensors are refused. A save without a manifest (PEFT's) loads
    with one :class:`~minilora.fileio.NoManifestWarning`, after every check has passed, so that
    a refusal is one line, not two. Errors start with ``who``.
    """
    return read_whole(directory, lambda: _read_adapter(directory, who, parse, float_dtype), who)


def _read_adapter(directory: str | os.PathLike, who: str, parse: Callable[[dict, str], Parsed],
                  float_dtype: Any) -> tuple[Parsed, dict[str, np.ndarray], Path]:
    found = open_save(directory, who, warn=False)
    config_path, weights_path = found / CONFIG_NAME, found / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{who}: {str(path)!r} is missing; an adapter directory "
                                  f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    parsed = parse(read_json(config_path, who), str(config_path))
    arrays = read_tensors(weights_path, who, float_dtype=float_dtype, floats_only=True)
    if not (found / MANIFEST).is_file():
        warn_no_manifest(found, who)
    bad = nonfinite_keys(arrays)
    if bad:  # loaded (one may want to look), but said, as model_from_checkpoint does
        warnings.warn(f"{who}: {str(found)!r}: {len(bad)} tensor(s) hold NaN or inf values "
                      f"({bad[0]!r} first), so the adapted model's outputs are not numbers",
                      NonFiniteWarning, stacklevel=6)  # the caller of read_adapter_files' caller
    return parsed, arrays, found


def adapter_header(directory: str | os.PathLike, who: str) -> tuple[dict, dict[str, TensorInfo]]:
    """``(config fields, {key: TensorInfo})`` of an adapter directory, from adapter_config.json
    and the weights file's header alone (no tensor data, no manifest check): what ``inspect``
    shows, and which layout (minilora's module names or PEFT's GPT-2 ones) the keys are in."""
    infos, _ = read_header(Path(directory) / WEIGHTS_NAME, who)
    return read_json(Path(directory) / CONFIG_NAME, who), infos


# ------------------------------------------------------------------------- minilora's layout

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


def _minilora_adapter(model: Module, adapter_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(PEFT config fields, {file key: host array}) of an adapter, in minilora's module names."""
    params = adapter_state_dict(model, adapter_name)
    arrays = {k: B.to_numpy(p.data) for k, p in params.items()}
    return lora_configs(model)[adapter_name].to_peft_dict(), arrays


def adapter_files(model: Module, adapter_name: str = "default") -> dict[str, bytes]:
    """``{file name: bytes}`` of adapter ``adapter_name``: its config as JSON and its weights as
    safetensors, as :func:`save_adapter` writes them (to put into a larger save)."""
    return adapter_file_bytes(*_minilora_adapter(model, adapter_name))


def save_adapter(model: Module, directory: str, adapter_name: str = "default") -> dict[str, str]:
    """Write adapter ``adapter_name`` of ``model`` to ``directory``, whole or not at all.

    A directory already there is replaced only if it is an adapter save. Returns
    ``{"config": path, "weights": path}`` of the two files written.
    """
    check_module(model, "save_adapter")
    return write_adapter_files(directory, *_minilora_adapter(model, adapter_name))


def _lora_config(raw: dict, path: str) -> LoraConfig:
    try:
        return LoraConfig.from_peft_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"load_adapter: {path!r} is not a usable LoRA adapter config: "
                              f"{exc}") from None


def read_adapter(directory: str) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read an adapter directory: its LoraConfig and its ``{key: array}`` (host float arrays).

    The manifest is verified (a save without one, e.g. from PEFT, loads with a note); the config's
    fields are type-checked; float tensors keep their precision (bfloat16 becomes float32, and
    each is cast to its parameter's dtype on load), integer tensors are refused.
    """
    config, arrays, _ = read_adapter_files(directory, "load_adapter", _lora_config)
    return config, arrays


def _same_setup(a: LoraConfig, b: LoraConfig) -> list[str]:
    fields = ("r", "alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
              "alpha_pattern", "bias")
    return [f"{f}: file {getattr(b, f)!r}, model {getattr(a, f)!r}" for f in fields
            if getattr(a, f) != getattr(b, f)]


def check_arrays(expected: dict[str, tuple], arrays: dict[str, np.ndarray], who: str,
                 source: str = "the model") -> None:
    """An adapter file's ``arrays`` must hold exactly the keys of ``expected`` ({key: shape},
    worked out from a config and a model, nothing allocated), each of its shape; else a
    CheckpointError from ``who`` that names the key and both shapes (``source``: where the
    expected shapes come from)."""
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{who}: the file has key {k!r} with shape "
                              f"{tuple(arrays[k].shape)}, which this model has no place for "
                              f"({len(unexpected)} such keys); is it for another base model?")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        k = missing[0]
        raise CheckpointError(f"{who}: the file lacks key {k!r} (shape {tuple(expected[k])} in "
                              f"{source}; {len(missing)} keys missing); is it for another base "
                              f"model?")
    for k, shape in expected.items():
        if tuple(arrays[k].shape) != tuple(shape):
            raise CheckpointError(f"{who}: key {k!r} has shape {tuple(arrays[k].shape)} in the "
                                  f"file but {tuple(shape)} in {source}; the adapter was made "
                                  f"for another base model")


def _check_ranks(model: Module, config: LoraConfig, arrays: dict[str, np.ndarray],
                 directory: str) -> None:
    """The rank the config gives every module it targets in ``model`` (``rank_pattern`` over
    ``r``) against the rows of that module's lora_A in the file, before anything of that rank is
    allocated: a forged rank is refused here, not after injecting a (rank x in) matrix."""
    where = f"load_adapter: {str(directory)!r}"
    for key, a in arrays.items():
        if key.endswith("lora_A.weight") and a.ndim != 2:
            raise CheckpointError(f"{where}: {key!r} has shape {tuple(a.shape)}, not (r, in)")
    for path, _ in linear_like_modules(model):
        if not config.is_target(path):
            continue
        r, key = config.rank_for(path), f"{PREFIX}{path}.lora_A.weight"
        if key not in arrays:
            theirs = next((k for k in arrays if k.endswith("lora_A.weight")), None)
            has = f"; it has {theirs!r} {tuple(arrays[theirs].shape)}" if theirs else ""
            raise CheckpointError(f"{where}: the config adapts {path!r} (r={r}), but the file "
                                  f"lacks key {key!r}{has}; is it for another base model?")
        if arrays[key].shape[0] != r:
            raise CheckpointError(f"{where}: the config says r={r} for {path!r}, but {key!r} "
                                  f"has shape {tuple(arrays[key].shape)}")


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
    _check_ranks(model, config, arrays, directory)
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
        check_arrays({k: p.shape for k, p in expected.items()}, arrays, "load_adapter")
        wide = next((k for k, p in expected.items()
                     if overflows_when_cast(arrays[k], p.data.dtype)), None)
        if wide is not None:
            dtype = expected[wide].data.dtype
            raise CheckpointError(f"load_adapter: tensor {wide!r} holds {arrays[wide].dtype} "
                                  f"values beyond the range of {dtype} (max "
                                  f"{np.finfo(dtype).max:.4g}), which would become inf")
    except CheckpointError:
        if existing is None:
            delete_adapter(model, adapter_name)
            for p, flag in flags:
                p.requires_grad = flag
        raise
    for k, p in expected.items():
        p.data[...] = B.asarray(arrays[k], dtype=p.data.dtype)
    return model
