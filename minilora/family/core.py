"""What every method of the family shares: which one a model carries, and its configuration.

An injection records its config on the model as ``model.family_config`` (one method of the family
at a time; LoRA's own adapters live apart, in :mod:`minilora.lora`). Saving, loading, merging and
the command line read it to know what the model holds.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..lora.inject import lora_configs
from ..lora.layer import lora_layers
from ..nn import Module


def family_config(model: Module) -> Any:
    """The config of the family method injected into ``model``, or None."""
    return getattr(model, "family_config", None)


def check_free(model: Module, who: str) -> None:
    """Refuse (ConfigError) a ``model`` that already carries a method of the family, or LoRA
    adapters, naming it: called before the targets are looked for, which a first method has
    wrapped already. (On a LoRA model a method would skip the LoRA layers it does not know and
    freeze their adapters: a fine-tune of neither, without a word. inject_lora refuses the
    other order.)"""
    held = family_config(model)
    if held is not None:
        raise ConfigError(f"{who}: the model already carries {type(held).__name__}; inject one "
                          f"method of the family per model (build a fresh base for another)")
    if not isinstance(model, Module):
        return  # record() says what is wrong with it
    adapters, wrapped = lora_configs(model), [path for path, _ in lora_layers(model)]
    if adapters or wrapped:
        names = ", ".join(repr(n) for n in adapters) or "unnamed"
        where = f", in {len(wrapped)} layer{'s' * (len(wrapped) != 1)} such as {wrapped[0]!r}" \
            if wrapped else ""
        raise ConfigError(f"{who}: the model carries LoRA adapters ({names}{where}); a method "
                          f"of the PEFT family goes on a plain base (merge_and_unload the LoRA "
                          f"first, or build a fresh base)")


def record(model: Module, config: Any, who: str) -> None:
    """Mark ``model`` as carrying ``config``'s method; refused (ConfigError) if it already
    carries one, naming both: two methods' parameters would be saved and merged as one."""
    if not isinstance(model, Module):
        raise ConfigError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    check_free(model, who)
    model.family_config = config


def forget(model: Module) -> None:
    """Clear the mark (after merge_and_unload has folded the method away)."""
    if family_config(model) is not None:
        model.family_config = None


__all__ = ["family_config", "check_free", "record", "forget"]
