"""Putting adapters into a model: inject, choose which are active, switch off, delete, unload.

``inject_lora(model, config)`` walks the module tree, swaps every targeted linear-like module for
a :class:`LoRALinear` wrapping it (``model.set_submodule``: same attribute, same path, so the
model code is unchanged), and freezes everything that is not LoRA. The adapters' configs are kept
on the model as ``model.lora_configs`` ({adapter name: LoraConfig}), which saving and merging
read.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from ..errors import ConfigError, InvalidArgumentError
from ..nn import Module, check_module
from .config import LoraConfig, adapter_list
from .layer import LoRALinear, is_linear_like, lora_layers

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(adapter_name: str) -> str:
    """Adapter names become one component of dotted state keys: letters, digits, _ and -."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise InvalidArgumentError(f"adapter_name must be a non-empty str of letters, digits, "
                                   f"'_' or '-', got {adapter_name!r}")
    return adapter_name


def lora_configs(model: Module) -> dict[str, LoraConfig]:
    """``{adapter name: LoraConfig}`` of the adapters injected into ``model`` (empty if none)."""
    check_module(model, "lora_configs")
    return model.__dict__.get("lora_configs", {})


def active_adapters(model: Module) -> list[str]:
    """Names of the adapters active in some layer of ``model``, in injection order."""
    active = {n for _, layer in lora_layers(model) for n in layer.active_adapters}
    return [n for n in lora_configs(model) if n in active]


def linear_like_modules(model: Module) -> list[tuple[str, Module]]:
    """``(path, module)`` of every module LoRA could adapt: linear-like modules and existing
    LoRALinear layers, but nothing inside a LoRALinear (its base and its A and B)."""
    check_module(model, "linear_like_modules")
    found, inside = [], []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, LoRALinear):
            inside.append(path)
            found.append((path, mod))
        elif is_linear_like(mod) and path:
            found.append((path, mod))
    return found


def _no_match_error(config: LoraConfig, candidates: list[tuple[str, Module]]) -> ConfigError:
    names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates})
    paths = [p for p, _ in candidates]
    shown = ", ".join(paths[:8]) + (" ..." if len(paths) > 8 else "")
    return ConfigError(f"inject_lora: target_modules {config.target_modules!r} matched no "
                       f"linear-like module; the linear-like module names are {names} "
                       f"(paths: {shown or 'none'})")


def inject_lora(model: Module, config: LoraConfig | None = None,
                adapter_name: str = "default") -> Module:
    """Add adapter ``adapter_name`` to every targeted linear-like module of ``model``, in place.

    Each target becomes a LoRALinear (or, if it already is one, gains another adapter). Every
    non-LoRA parameter is frozen, except biases as ``config.bias`` says. The first adapter is
    made active (and trainable); one added next to an active adapter is added inactive and
    frozen, as PEFT's add_adapter does: ``set_adapter(model, name)`` switches to it. Returns
    ``model``.
    """
    check_module(model, "inject_lora")
    config = LoraConfig() if config is None else config
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"inject_lora: config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if isinstance(model, LoRALinear) or is_linear_like(model):
        raise InvalidArgumentError("inject_lora: the model itself is a single linear layer and "
                                   "cannot be replaced in place; put it inside a Module")
    held = getattr(model, "family_config", None)  # set by minilora.family's methods
    if held is not None:
        raise ConfigError(f"inject_lora: the model carries {type(held).__name__}, a method of "
                          f"the PEFT family, whose layers wrap the targets; put LoRA on a fresh "
                          f"base")
    if adapter_name in lora_configs(model):
        raise ConfigError(f"inject_lora: the model already has an adapter {adapter_name!r}; "
                          f"choose another adapter_name or delete_adapter first")
    candidates = linear_like_modules(model)
    targets = [(p, m) for p, m in candidates if config.is_target(p)]
    if not targets:
        raise _no_match_error(config, candidates)
    for path, mod in targets:
        layer = mod if isinstance(mod, LoRALinear) else LoRALinear(mod)
        layer.update_layer(adapter_name, r=config.rank_for(path), alpha=config.alpha_for(path),
                           dropout=config.dropout, use_rslora=config.use_rslora,
                           use_dora=config.use_dora, init=config.init)
        if layer is not mod:
            model.set_submodule(path, layer)
    configs = dict(lora_configs(model))
    configs[adapter_name] = replace(config)
    model.lora_configs = configs
    active = active_adapters(model) or [adapter_name]
    set_adapter(model, active)
    _freeze_base(model, config.bias)
    return model


def _freeze_base(model: Module, bias: str) -> None:
    """Freeze every parameter but the active adapters'; then unfreeze biases per ``bias``."""
    lora_params = {id(p) for _, layer in lora_layers(model) for n in layer.active_adapters
                   for p in layer.adapter_parameters(n)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


def set_adapter(model: Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (a name or a list: several adapters add up) the active adapters.

    Active adapters are used in forward and are trainable; the others are frozen and unused.
    """
    check_module(model, "set_adapter")
    names = adapter_list(adapter_name, "set_adapter")
    known = list(lora_configs(model))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InvalidArgumentError(f"set_adapter: unknown adapter(s) {unknown or names}; the "
                                   f"model has {known}")
    layers = [layer for _, layer in lora_layers(model)]
    # W holds the merged updates whatever is active: one left out of names would still apply
    stale = [layer for layer in layers if not set(layer.merged_adapters) <= set(names)]
    if stale:
        if any(layer.is_quantized for layer in stale):
            raise InvalidArgumentError(f"set_adapter: adapters {stale[0].merged_adapters} are "
                                       f"merged into a quantized base, which cannot be unmerged "
                                       f"exactly; reload the base to switch to {names}")
        warnings.warn(f"set_adapter: adapters {stale[0].merged_adapters} were merged; unmerging "
                      f"them first, as PEFT does, so that only {names} apply", stacklevel=2)
        for layer in layers:
            if layer.merged:
                layer.unmerge()
    for layer in layers:
        layer.set_adapter(names)


@contextmanager
def disable_adapters(model: Module) -> Iterator[Module]:
    """Context manager: inside, every LoRA layer returns its base output (adapters off).

    Merged adapters are unmerged on entry and merged again on exit (refused for a quantized base,
    where unmerging is not exact).
    """
    check_module(model, "disable_adapters")
    found = lora_layers(model)
    if not found:
        raise InvalidArgumentError("disable_adapters: the model has no LoRA layers")
    layers = [layer for _, layer in found]
    remerge = [(layer, list(layer.merged_adapters)) for layer in layers if layer.merged]
    lossy = [path for path, layer in found if layer.merged and layer.is_quantized]
    if lossy:  # before any layer is unmerged: a refusal half way left the model half merged
        raise InvalidArgumentError(f"disable_adapters: the adapters are merged into quantized "
                                   f"bases ({lossy[:3]}), which cannot be unmerged exactly; "
                                   f"disable them before merging, or reload the base weights")
    for layer, _ in remerge:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer, names in remerge:
            layer.merge(names)


def delete_adapter(model: Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer (refused while it is merged).

    A layer left without adapters goes back to being its plain base module. If the deleted
    adapter was active, no adapter is active afterwards (outputs are the base's) until
    ``set_adapter``.
    """
    check_module(model, "delete_adapter")
    configs = lora_configs(model)
    if adapter_name not in configs:
        raise InvalidArgumentError(f"delete_adapter: unknown adapter {adapter_name!r}; the model "
                                   f"has {list(configs)}")
    layers = lora_layers(model)
    merged = [p for p, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise InvalidArgumentError(f"delete_adapter: adapter {adapter_name!r} is merged into "
                                   f"{merged[:3]}; unmerge first")
    for path, layer in layers:
        layer.delete_adapter(adapter_name)
        if len(layer.lora_A) == 0:
            model.set_submodule(path, layer.base_layer)
    rest = {n: c for n, c in configs.items() if n != adapter_name}
    if rest:
        model.lora_configs = rest
    else:
        del model.lora_configs


def unload(model: Module) -> Module:
    """Put every base module back, dropping all adapters without merging; returns ``model``."""
    check_module(model, "unload")
    layers = lora_layers(model)
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise InvalidArgumentError(f"unload: {merged[:3]} hold merged adapters; unmerge first, "
                                   f"or call merge_and_unload to keep them")
    for path, layer in layers:
        model.set_submodule(path, layer.base_layer)
    if "lora_configs" in model.__dict__:
        del model.lora_configs
    return model
