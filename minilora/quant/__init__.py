"""QLoRA's frozen 4-bit base: blockwise NF4/FP4/INT4 quantization with double quantization.

A weight tensor is stored as one 4-bit code per element plus one absmax per block of
``blocksize`` elements; ``dequantize`` gives back ``code[q] * absmax``. The frozen layer built on
it (:class:`QuantLinear`) dequantizes W on the fly in every pass, so LoRA adapters train on top of
a 4-bit base with no special class.

    from minilora import quant
    state = quant.quantize(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = quant.dequantize(state)                  # float32, state.shape
    quant.quantize_model(model)                      # every Linear to a 4-bit QuantLinear

One idea per file: ``codes`` (the NF4, FP4, INT4 and 8-bit dynamic tables), ``blockwise``
(QuantState, quantize, dequantize, double quantization, storage accounting), ``linear``
(QuantLinear and merging into a 4-bit base), ``model`` (quantize_model, 4-bit layers from a state
dict, the memory report) and ``bnb_format`` (bitsandbytes' ``Linear4bit`` state-dict layout).
"""

from __future__ import annotations

from .blockwise import (
    MAX_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    QuantState,
    bits_per_parameter,
    dequantize,
    error_stats,
    pack_nibbles,
    quantize,
    storage_bytes,
    unpack_nibbles,
)
from .codes import (
    DYNAMIC_CODE,
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    QUANT_TYPES,
    code_values,
    dynamic_map_8bit,
    max_half_gap,
    normal_float_code,
)
from .linear import QuantLinear, merge_into_float, merge_into_quantized
from .model import (
    bnb_state_from_quant_linear,
    format_memory_report,
    load_quantized_layers,
    memory_report,
    quant_linear_from_bnb_state,
    quantize_model,
)

__all__ = [
    "QUANT_TYPES", "MAX_BLOCKSIZE", "NESTED_BLOCKSIZE", "NF4_CODE", "FP4_CODE", "INT4_CODE",
    "DYNAMIC_CODE", "QuantState", "quantize", "dequantize", "pack_nibbles", "unpack_nibbles",
    "code_values", "max_half_gap", "normal_float_code", "dynamic_map_8bit", "bits_per_parameter",
    "storage_bytes", "error_stats", "QuantLinear", "quantize_model", "merge_into_quantized",
    "merge_into_float", "memory_report", "format_memory_report", "quant_linear_from_bnb_state",
    "bnb_state_from_quant_linear", "load_quantized_layers",
]
