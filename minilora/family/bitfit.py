"""BitFit: fine-tune only the biases (Ben Zaken, Ravfogel and Goldberg 2021, arXiv 2106.10199).

Every weight stays frozen; what trains is each bias b of the model, the b of every ``y = x W^T +
b`` and of every LayerNorm ``y = g * norm(x) + b``. In minilora's GPT (C = n_embd, L = n_layer)
a block holds the biases of q_proj, k_proj, v_proj and o_proj (C each), mlp.fc (4C), mlp.proj
(C), ln_1 and ln_2 (C each), and ln_f adds one more C:

    trainable = L * 11 C + C        (GPT-2 small: 12 * 11 * 768 + 768 = 102,144 of 124M)

Costs: no extra FLOPs or context, nothing to merge (the trained biases are the model's own), no
new layers; on a 4-bit base the biases of QuantLinear layers are float Parameters and train too.
A model without biases (``GPTConfig(bias=False)``) has nothing to train and is refused.

Files: PEFT has no BitFit, so an adapter directory of it has ``peft_type`` "BITFIT" (a name of
minilora's) and holds every bias under minilora's parameter path,
``base_model.model.<path>.bias`` (for example ``base_model.model.h.0.attn.q_proj.bias``, (C,)).

:func:`check_arrays`, the check of an adapter file's keys and shapes against what a model
expects, lives here and is shared by the other methods' loaders (ia3, bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import backend as B
from ..errors import CheckpointError, ConfigError
from ..lora import io as lora_io
from ..nn import Module
from . import core

PREFIX = "base_model.model."  # as PEFT keys a file (and minilora's LoRA files)


@dataclass(frozen=True)
class BitFitConfig:
    """BitFit has no settings: the config only marks a model as carrying it."""

    peft_type: ClassVar[str] = "BITFIT"


def bias_parameters(model: Module) -> list[tuple[str, Any]]:
    """``(path, Parameter)`` of every bias of ``model`` (parameters whose last name is "bias")."""
    return [(name, p) for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] == "bias"]


def bitfit(model: Module) -> Module:
    """Freeze every parameter of ``model`` but its biases, in place; returns ``model``.

    Records a :class:`BitFitConfig` on the model. Refused (ConfigError) when the model has no
    bias (``GPTConfig(bias=False)``), or already carries a method of the family.
    """
    biases = bias_parameters(model) if isinstance(model, Module) else []
    if not biases:
        raise ConfigError(f"bitfit: {type(model).__name__} has no bias parameter to train (a "
                          f"GPT built with GPTConfig(bias=False)?); BitFit trains only biases")
    core.record(model, BitFitConfig(), "bitfit")
    model.requires_grad_(False)
    for _, p in biases:
        p.requires_grad_(True)
    return model


def bitfit_param_count(gpt_config: Any, config: BitFitConfig | None = None) -> int:
    """Trainable parameters of :func:`bitfit` on ``GPT(gpt_config)``: L * 11 C + C (module
    docstring), 0 when ``gpt_config.bias`` is False."""
    if not gpt_config.bias:
        return 0
    return gpt_config.n_layer * 11 * gpt_config.n_embd + gpt_config.n_embd


# ------------------------------------------------------------------------------------ files

def check_arrays(expected: dict[str, tuple], arrays: dict[str, np.ndarray], who: str) -> None:
    """:func:`minilora.lora.io.check_arrays` with the shapes a family config and a model give."""
    lora_io.check_arrays(expected, arrays, who, source="the config and the model")


def check_unmarked(model: Module, who: str) -> None:
    """A file's method is loaded into a plain base: refuse (CheckpointError) a model that
    already carries a method of the family, before anything is read into it."""
    held = core.family_config(model)
    if held is not None:
        raise CheckpointError(f"{who}: the model already carries {type(held).__name__}; load "
                              f"an adapter into a plain base model")
    try:
        core.check_free(model, who)  # LoRA adapters: refused as an injection refuses them
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def adapter_arrays(model: Module) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {file key: host array})`` of a BitFit model: every bias (module
    docstring)."""
    if not isinstance(core.family_config(model), BitFitConfig):
        raise ConfigError(f"bitfit.adapter_arrays: the model carries "
                          f"{type(core.family_config(model)).__name__}, not BitFitConfig")
    arrays = {PREFIX + name: B.to_numpy(p.data) for name, p in bias_parameters(model)}
    return {"peft_type": BitFitConfig.peft_type}, arrays


def apply_adapter(model: Module, config: dict, arrays: dict[str, np.ndarray]) -> Module:
    """BitFit on the plain base ``model`` with the file's biases: keys and shapes are checked
    against the model's biases first (CheckpointError, the model unchanged); returns ``model``."""
    who = "load_adapter (BITFIT)"
    if config.get("peft_type") != BitFitConfig.peft_type:
        raise CheckpointError(f"{who}: peft_type {config.get('peft_type')!r} is not 'BITFIT'")
    check_unmarked(model, who)
    biases = bias_parameters(model)
    check_arrays({PREFIX + name: p.shape for name, p in biases}, arrays, who)
    bitfit(model)
    for name, p in biases:
        p.data[...] = B.asarray(arrays[PREFIX + name], dtype=p.data.dtype)
    return model


__all__ = ["BitFitConfig", "bitfit", "bitfit_param_count", "bias_parameters", "check_arrays",
           "check_unmarked", "adapter_arrays", "apply_adapter", "PREFIX"]
