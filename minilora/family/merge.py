"""merge_and_unload for the family: fold into the weights what can be folded, refuse the rest.

LoRA's claim to "no additional inference latency" is that its update is a weight: W + s B A. The
family splits on exactly that question:

* IA3: a vector that scales an output (W <- diag(l) W, b <- l * b) or an input (W <- W diag(l))
  is a weight too. Merged, the model has exactly the base's modules and counted FLOPs.
* BitFit: the trained biases are the model's own parameters, already "merged"; the model is
  only unmarked (and frozen, as any merged model is).
* Bottleneck adapters: act(down(h)) is nonlinear, so no weight absorbs it; the adapters stay,
  2 * 2 * C * m FLOPs per token each. Refused.
* Prompt and prefix tuning: the virtual tokens are extra positions the model attends to (they
  take context length and KV-cache entries), not a change to any weight. Refused.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ..nn import Module
from . import core
from .bitfit import BitFitConfig
from .bottleneck import BottleneckConfig
from .ia3 import IA3Config, merge_ia3

# why a method cannot be merged, by its config's class name (prompt's configs live in prompt.py)
REFUSED = {
    "BottleneckConfig": "bottleneck adapters add layers: h + up(act(down(h))) has a "
                        "nonlinearity between two matmuls, which no weight can absorb, so they "
                        "stay at inference (2 * 2 * C * m FLOPs per token per adapter)",
    "PromptTuningConfig": "prompt tuning adds virtual tokens at the input: extra positions the "
                          "model attends to (context length, KV-cache entries), not a change "
                          "to any weight, so there is nothing to fold into W",
    "PrefixTuningConfig": "prefix tuning adds learned keys and values at every layer: extra "
                          "positions each query attends to (context length, KV-cache "
                          "entries), which no weight can absorb",
}


def merge_and_unload(model: Module) -> Module:
    """Fold the family method ``model`` carries into its weights and remove the method; returns
    ``model``, in place.

    IA3: W <- diag(l) W (and b <- l * b) or W <- W diag(l), the plain layers swapped back, so the
    model has the base's modules and FLOPs (refused for a 4-bit base: re-quantizing is lossy).
    BitFit: the biases are already weights; the model is unmarked and frozen. Bottleneck
    adapters, prompt and prefix tuning are refused (InvalidArgumentError) with the reason, the
    model unchanged. LoRA's own adapters: ``ml.lora.merge_and_unload``.
    """
    config = core.family_config(model)
    if config is None:
        raise InvalidArgumentError("merge_and_unload: the model carries no method of the family "
                                   "(for LoRA adapters use ml.lora.merge_and_unload)")
    name = type(config).__name__
    if isinstance(config, BottleneckConfig) or name in REFUSED:
        raise InvalidArgumentError(f"merge_and_unload: cannot merge {name}: {REFUSED[name]}")
    if isinstance(config, IA3Config):
        return merge_ia3(model)
    if isinstance(config, BitFitConfig):
        core.forget(model)
        model.requires_grad_(False)
        return model
    raise InvalidArgumentError(f"merge_and_unload: no merge is known for {name}")


__all__ = ["merge_and_unload", "REFUSED"]
