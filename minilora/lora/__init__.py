"""LoRA: Low-Rank Adaptation of a frozen model (Hu et al. 2021), with DoRA, rsLoRA and PiSSA.

Fine-tuning changes a pretrained weight W (n, k) by some delta W. LoRA's bet is that delta W has
low rank, so it learns it as a product

    delta W = scaling * B @ A,   B (n, r), A (r, k), r << min(n, k),   scaling = alpha / r

and keeps W frozen. A layer then computes ``y = x W^T + b + scaling * (x A^T) B^T``: two skinny
matmuls, never the n x k product, and no gradient for W. A starts random and B at zero, so the
adapted model starts out exactly equal to its base. The whole layer is in ``layer.py``.

    import minilora as ml
    from minilora import lora

    lora.inject_lora(model, lora.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    lora.print_trainable_parameters(model)     # trainable params: ... || all params: ...
    ...train model.parameters() (only A and B require grad)...
    lora.save_adapter(model, "my-adapter")     # adapter_config.json + adapter_model.safetensors
    lora.merge_and_unload(model)               # W <- W + scaling B A; plain Linear layers again

The pieces, one idea per file, as PEFT's ``tuners/lora/``: ``config`` (LoraConfig), ``layer``
(LoRALinear, the plain layer), ``variants`` (rsLoRA's scaling, DoRA's magnitude, PiSSA's init),
``inject`` (inject, set/disable/delete adapters), ``merge`` (merge, unmerge, merge_and_unload,
add_weighted_adapter), ``count`` (parameter accounting), ``io`` (adapter files, the one reader
and writer of PEFT's adapter directories). This module gathers their public names.
"""

from __future__ import annotations

from .config import ALL_LINEAR, LoraConfig, matches_target
from .count import (
    count_parameters,
    format_parameter_table,
    gpt_lora_param_count,
    lora_param_count,
    lora_parameter_table,
    lora_trainable_count,
    print_trainable_parameters,
    trainable_parameters_summary,
)
from .inject import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    linear_like_modules,
    lora_configs,
    set_adapter,
    unload,
)
from .io import (
    adapter_file_bytes,
    adapter_files,
    adapter_header,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    read_adapter_files,
    save_adapter,
    write_adapter_files,
)
from .layer import LoRALinear, base_weight, is_linear_like, lora_layers
from .merge import add_weighted_adapter, merge, merge_and_unload, unmerge
from .variants import lora_scaling

__all__ = [
    "LoraConfig", "LoRALinear", "inject_lora", "set_adapter", "disable_adapters",
    "delete_adapter", "unload", "active_adapters", "lora_configs", "lora_layers",
    "linear_like_modules", "merge", "unmerge", "merge_and_unload", "add_weighted_adapter",
    "count_parameters", "print_trainable_parameters", "trainable_parameters_summary",
    "lora_parameter_table", "format_parameter_table", "lora_param_count", "gpt_lora_param_count",
    "lora_trainable_count", "save_adapter", "load_adapter", "read_adapter", "adapter_state_dict",
    "adapter_files", "adapter_file_bytes", "write_adapter_files", "read_adapter_files",
    "adapter_header",
    "lora_scaling", "matches_target", "is_linear_like", "base_weight", "ALL_LINEAR",
]
