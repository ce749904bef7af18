"""The PEFT family beside LoRA, on minilora's GPT: BitFit, IA3, bottleneck adapters, prompt
tuning and prefix tuning, each in a file of its own that states its equation and shapes.

LoRA itself lives in :mod:`minilora.lora`; this package holds the methods it is taught against.
"""

from __future__ import annotations

from .bitfit import BitFitConfig, bitfit, bitfit_param_count
from .bottleneck import (
    BottleneckAdapter,
    BottleneckConfig,
    bottleneck_flops_per_token,
    bottleneck_param_count,
    inject_bottleneck,
)
from .ia3 import IA3Config, IA3Linear, ia3_param_count, inject_ia3
from .io import load_adapter, save_adapter
from .merge import merge_and_unload
from .prefix import PrefixTuningConfig, prefix_parameter_count
from .prompt import PromptTuningConfig, inject_prompt, prompt_parameter_count, virtual_token_flops

__all__ = ["BitFitConfig", "bitfit", "bitfit_param_count", "IA3Config", "IA3Linear",
           "inject_ia3", "ia3_param_count", "BottleneckConfig", "BottleneckAdapter",
           "inject_bottleneck", "bottleneck_param_count", "bottleneck_flops_per_token",
           "PromptTuningConfig", "PrefixTuningConfig", "inject_prompt", "prompt_parameter_count",
           "prefix_parameter_count", "virtual_token_flops", "merge_and_unload",
           "save_adapter", "load_adapter"]
