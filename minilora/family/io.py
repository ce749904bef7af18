"""Saving and loading every method of the family as an adapter directory.

A directory is what :func:`minilora.lora.io.write_adapter_files` writes: adapter_config.json
(with ``peft_type``), adapter_model.safetensors and a manifest, whole or not at all, read back
without pickle and with every size checked (:func:`minilora.lora.io.read_adapter_files`). The
method is chosen by the model's :func:`~minilora.family.core.family_config` on save and by the
config file's ``peft_type`` on load:

    peft_type        module       format
    "IA3"            ia3          PEFT's, for HF GPT-2 (PeftModel.from_pretrained loads it)
    "PROMPT_TUNING"  prompt       PEFT's
    "PREFIX_TUNING"  prompt       see prompt.py
    "BITFIT"         bitfit       minilora's own (PEFT has no BitFit): biases by module path
    "BOTTLENECK"     bottleneck   minilora's own (PEFT has no bottleneck adapter)

Each method module has ``adapter_arrays(model) -> (config dict, {key: host array})`` and
``apply_adapter(model, config dict, arrays) -> model``, which injects the method into a plain
base after checking every key and shape against the config and the model (CheckpointError,
nothing allocated, the model unchanged).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import CheckpointError, ConfigError, InvalidArgumentError
from ..lora.io import read_adapter_files, write_adapter_files
from ..nn import Module
from ..tensorfile import json_field
from . import core
from .bitfit import adapter_arrays as bitfit_arrays
from .bitfit import apply_adapter as apply_bitfit
from .bitfit import check_unmarked
from .bottleneck import adapter_arrays as bottleneck_arrays
from .bottleneck import apply_adapter as apply_bottleneck
from .ia3 import adapter_arrays as ia3_arrays
from .ia3 import apply_adapter as apply_ia3

PEFT_TYPES = ("BITFIT", "IA3", "BOTTLENECK", "PROMPT_TUNING", "PREFIX_TUNING")
# a config's class -> its peft_type (prompt.py's classes are named here, not imported)
_BY_CONFIG = {"BitFitConfig": "BITFIT", "IA3Config": "IA3", "BottleneckConfig": "BOTTLENECK",
              "PromptTuningConfig": "PROMPT_TUNING", "PrefixTuningConfig": "PREFIX_TUNING"}


def method_functions(peft_type: str) -> tuple[Callable, Callable]:
    """``(adapter_arrays, apply_adapter)`` of the method module of ``peft_type`` (module
    docstring). (The face binds ``family.bitfit`` to the function, so the modules' functions
    are imported by name.)"""
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        from . import prompt  # imported when needed: the other methods do not wait for it
        return prompt.adapter_arrays, prompt.apply_adapter
    methods = {"BITFIT": (bitfit_arrays, apply_bitfit), "IA3": (ia3_arrays, apply_ia3),
               "BOTTLENECK": (bottleneck_arrays, apply_bottleneck)}
    if peft_type not in methods:
        raise CheckpointError(f"load_adapter: peft_type {peft_type!r} is no method of the "
                              f"family; known: {list(PEFT_TYPES)} (LoRA: ml.lora.load_adapter)")
    return methods[peft_type]


def peft_type_of(config: Any) -> str:
    """The peft_type of a family config (its class's, or the table's for prompt.py's)."""
    name = type(config).__name__
    found = _BY_CONFIG.get(name, getattr(config, "peft_type", None))
    if found not in PEFT_TYPES:
        raise InvalidArgumentError(f"save_adapter: {name} is no method of the family")
    return found


def save_adapter(model: Module, directory: str | os.PathLike) -> dict[str, str]:
    """Write the family method ``model`` carries to ``directory`` (module docstring), whole or
    not at all; returns ``{"config": path, "weights": path}``."""
    config = core.family_config(model)
    if config is None:
        raise InvalidArgumentError("save_adapter: the model carries no method of the family; "
                                   "inject one first (LoRA adapters: ml.lora.save_adapter)")
    config_dict, arrays = method_functions(peft_type_of(config))[0](model)
    return write_adapter_files(directory, config_dict, arrays)


def _parse(raw: dict, path: str) -> dict:
    """The config's peft_type must name a method of the family; the method checks the rest."""
    try:
        peft_type = json_field(raw, "peft_type", str, f"load_adapter: {path!r}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    method_functions(peft_type)
    return raw


def load_adapter(model: Module, directory: str | os.PathLike) -> Module:
    """Inject the method saved in ``directory`` into the plain base ``model`` and load its
    values; returns ``model``. Any key, shape or field that does not fit raises CheckpointError
    naming it, before anything is allocated, and leaves the model as it was."""
    check_unmarked(model, "load_adapter")
    config, arrays, _ = read_adapter_files(directory, "load_adapter", _parse)
    return method_functions(config["peft_type"])[1](model, config, arrays)


__all__ = ["save_adapter", "load_adapter", "method_functions", "peft_type_of", "PEFT_TYPES"]
