"""Interop with the Hugging Face ecosystem, no torch needed: GPT-2 weights in and out of
minilora's GPT (``hf``), and LoRA adapters in PEFT's files for GPT-2 (``peft``).

    from minilora import interop
    model = interop.gpt_from_hf("gpt2-dir")          # config.json + model.safetensors
    interop.gpt_to_hf(model, "out-dir")              # GPT2LMHeadModel.from_pretrained loads it
    interop.export_peft(model, "adapter-dir")        # PeftModel.from_pretrained loads it
"""

from __future__ import annotations

from .hf import gpt_from_hf, gpt_to_hf, hf_config, hf_state_dict
from .peft import export_peft, import_peft, is_peft_gpt2, peft_adapter_files

__all__ = ["gpt_from_hf", "gpt_to_hf", "hf_config", "hf_state_dict", "export_peft",
           "import_peft", "peft_adapter_files", "is_peft_gpt2"]
