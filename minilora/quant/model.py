"""Model surgery for QLoRA: every Linear of a model to 4 bits, 4-bit layers back from a state
dict (bitsandbytes' ``Linear4bit`` layout), and the memory report of a quantized model."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .. import backend as B
from .. import nn
from ..errors import InvalidArgumentError, StateDictError
from .blockwise import check_blocksize, storage_bytes
from .bnb_format import FLOAT_DTYPES, quant_state_from_bnb, quant_state_to_bnb, quantized_layers
from .codes import check_quant_type
from .linear import QuantLinear

# ------------------------------------------------------------------------------ model surgery

def _skipped(path: str, skip: Any) -> bool:
    name = path.rsplit(".", 1)[-1]
    return any(s in (path, name) or path.endswith("." + s) for s in skip)


def _linear_targets(model: nn.Module, skip: Any) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers quantize_model replaces: not skipped, not part of a LoRA adapter, and
    not sharing their weight with another module (a head tied to the embedding stays float)."""
    owners: dict = {}
    for _, mod in model.named_modules():
        for p in mod._parameters.values():
            owners[id(p)] = owners.get(id(p), 0) + 1
    targets = []
    for path, mod in model.named_modules():
        if type(mod) is not nn.Linear or not path or _skipped(path, skip):
            continue
        if any(part.startswith("lora_") for part in path.split(".")):
            continue
        if owners[id(mod.weight)] > 1:
            continue
        targets.append((path, mod))
    return targets


def quantize_model(model: nn.Module, blocksize: int = 64, quant_type: str = "nf4",
                   double_quant: bool = True, skip: Any = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantLinear`, in place; returns model.

    Embeddings, LayerNorms and a head tied to the embedding stay float32, as do layers named in
    ``skip`` (a full dotted path like "h.0.mlp.fc" or a last name like "lm_head") and LoRA's own
    ``lora_A``/``lora_B``. Quantize before ``inject_lora``: the base is frozen either way.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (tuple, list, set, frozenset)) or \
            not all(isinstance(s, str) for s in skip):
        raise InvalidArgumentError(f"quantize_model: skip must be a layer name or a list of "
                                   f"them, got {skip!r:.60}")
    if isinstance(model, nn.Linear):
        raise InvalidArgumentError("quantize_model: model is itself an nn.Linear and cannot be "
                                   "replaced in place; use QuantLinear.from_linear(model)")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"quantize_model: expected an nn.Module, got "
                                   f"{type(model).__name__}")
    targets = _linear_targets(model, tuple(skip))
    asked = (quant_type, int(blocksize), bool(double_quant))
    other = [(p, m) for p, m in model.named_modules() if isinstance(m, QuantLinear) and
             (m.quant_state.quant_type, m.quant_state.blocksize, m.quant_state.nested) != asked]
    if other:  # its 4-bit layers stay as they are: asking for another format would do nothing
        st = other[0][1].quant_state
        raise InvalidArgumentError(f"quantize_model: {other[0][0]} and {len(other) - 1} more are "
                                   f"quantized already as {st.quant_type}, blocksize "
                                   f"{st.blocksize}, double_quant={st.nested}; asked for "
                                   f"{quant_type}, blocksize {blocksize}, double_quant="
                                   f"{bool(double_quant)}: quantize the float model instead")
    for path, linear in targets:
        model.set_submodule(path, QuantLinear.from_linear(linear, blocksize, quant_type,
                                                          double_quant))
    return model


# ---------------------------------------------------------------- state dicts and checkpoints

def _prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise InvalidArgumentError(f"prefix must be a str, got {type(prefix).__name__}")
    return prefix + "." if prefix and not prefix.endswith(".") else prefix


def quant_linear_from_bnb_state(state: dict[str, Any], prefix: str = "") -> QuantLinear:
    """A QuantLinear from one layer of a bitsandbytes ``Linear4bit`` state dict (or minilora's):
    ``prefix + "weight"``, ``prefix + "weight.absmax"``, ... and ``prefix + "bias"`` if present.

    ``prefix`` is the layer's path, with or without the final dot ("model.layers.0.q_proj.");
    keys of other layers are ignored. The arrays (NumPy or CuPy, e.g. from
    ``safetensors.numpy.load_file``) are checked and copied; the result dequantizes to exactly
    what bitsandbytes' ``dequantize_4bit`` gives for a float32 state. The weight must be 2-D
    (out, in). A float bias is copied as float32 and frozen. Raises StateDictError naming the key.
    """
    if not isinstance(state, Mapping):
        raise StateDictError(f"quant_linear_from_bnb_state: state must be a dict of arrays (a "
                             f"state dict), got {type(state).__name__}")
    prefix = _prefix(prefix)
    new = quant_state_from_bnb(state, prefix + "weight", who="quant_linear_from_bnb_state")
    if len(new.shape) != 2:
        raise StateDictError(f"quant_linear_from_bnb_state: {prefix + 'weight'!r} holds a 4-bit "
                             f"tensor of shape {new.shape}; a linear weight is 2-D (out, in)")
    bias = state.get(prefix + "bias")
    if bias is not None:
        if not B.is_array(bias) or bias.dtype.kind != "f" or tuple(bias.shape) != new.shape[:1]:
            got = f"{bias.dtype} {tuple(bias.shape)}" if B.is_array(bias) else type(bias).__name__
            raise StateDictError(f"quant_linear_from_bnb_state: key {prefix + 'bias'!r} must be "
                                 f"a float array of shape ({new.shape[0]},), got {got}")
        bias = B.asarray(bias).astype(np.float32)  # a copy
    return QuantLinear(new, bias)


def bnb_state_from_quant_linear(layer: QuantLinear, prefix: str = "",
                                dtype: str = "float32") -> dict[str, np.ndarray]:
    """``layer`` as bitsandbytes' ``Linear4bit.state_dict()`` lays it out, host NumPy arrays:
    ``prefix + "weight"`` (uint8 ((n + 1) // 2, 1)), ``"bias"`` (if any), ``"weight.absmax"``,
    ``"weight.quant_map"``, [``"weight.nested_absmax"``, ``"weight.nested_quant_map"``],
    ``"weight.quant_state.bitsandbytes__<nf4|fp4>"``; ready for ``safetensors.numpy.save_file``
    and for ``Params4bit.from_prequantized``. ``dtype`` is what bitsandbytes will dequantize to.

    An INT4 layer is written with the blob key ``minilora__int4``, which bitsandbytes refuses
    (it has no such type); on the NumPy backend the arrays are the layer's own (views).
    """
    if not isinstance(layer, QuantLinear):
        raise InvalidArgumentError(f"bnb_state_from_quant_linear: expected a QuantLinear, got "
                                   f"{type(layer).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"bnb_state_from_quant_linear: dtype must be one of "
                                   f"{FLOAT_DTYPES}, got {dtype!r}")
    prefix = _prefix(prefix)
    arrays = quant_state_to_bnb(layer.quant_state, prefix + "weight", dtype)
    out = {prefix + "weight": arrays.pop(prefix + "weight")}
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.data
    out.update(arrays)
    return {k: B.to_numpy(v) for k, v in out.items()}


def load_quantized_layers(model: nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """Replace, in place, every layer of ``model`` that ``state_dict`` holds in 4 bits (the
    layers with a ``<path>.weight.quant_state.*`` key) by a QuantLinear built from the state
    dict, without re-quantizing; returns their paths.

    Each must be an ``nn.Linear`` (or a QuantLinear) of the same (out, in) whose weight no other
    module shares (a head tied to the embedding stays float); inside a LoRA layer that is its
    ``base_layer`` ("h.0.attn.q_proj.base_layer"). The bias is taken from the state dict when it
    holds one, else kept. Then ``model.load_state_dict(state_dict)`` (or
    ``checkpoint.restore``) loads the rest. Every layer is checked before any is replaced.
    Raises StateDictError naming the path.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"load_quantized_layers: expected an nn.Module, got "
                                   f"{type(model).__name__}")
    modules = dict(model.named_modules())
    owners: dict = {}
    for mod in modules.values():
        for p in mod._parameters.values():
            owners[id(p)] = owners.get(id(p), 0) + 1
    built = []
    for path in quantized_layers(state_dict):
        mod = modules.get(path)
        if not path or not isinstance(mod, (nn.Linear, QuantLinear)):
            what = "the model itself" if not path else \
                "no module" if mod is None else f"a {type(mod).__name__}"
            hint = " (a LoRA checkpoint: inject_lora into the model first, so that its " \
                   "base_layer paths exist)" if path.endswith(".base_layer") else ""
            raise StateDictError(f"load_quantized_layers: the state dict holds a 4-bit layer "
                                 f"at {path!r}, where the model has {what}, not a Linear "
                                 f"layer that can be replaced{hint}")
        if isinstance(mod, nn.Linear) and owners[id(mod.weight)] > 1:
            raise StateDictError(f"load_quantized_layers: {path!r} shares its weight with "
                                 f"another module (a tied head), which must stay float")
        layer = quant_linear_from_bnb_state(state_dict, path)
        if (layer.out_features, layer.in_features) != (mod.out_features, mod.in_features):
            raise StateDictError(f"load_quantized_layers: {path + '.weight'!r} holds a 4-bit "
                                 f"weight of shape {layer.quant_state.shape}, the model's layer "
                                 f"is ({mod.out_features}, {mod.in_features}) (out, in)")
        if mod.bias is None and layer.bias is not None:
            raise StateDictError(f"load_quantized_layers: the state dict has {path + '.bias'!r} "
                                 f"but the model's layer at {path!r} has no bias")
        if mod.bias is not None and layer.bias is None:
            layer.bias = nn.Parameter(mod.bias.data.copy(), requires_grad=False)
        built.append((path, layer))
    for path, layer in built:
        model.set_submodule(path, layer)
    return [path for path, _ in built]


# ------------------------------------------------------------------------------ memory report

def _scenario(shapes: list, other_bytes: int, per_weight: Any) -> dict:
    n = sum(math.prod(s) for s in shapes)
    weight_bytes = sum(per_weight(math.prod(s)) for s in shapes)
    return {"weight_bytes": weight_bytes,
            "weight_bits_per_param": 8 * weight_bytes / n if n else math.nan,
            "total_bytes": weight_bytes + other_bytes}


def memory_report(model: nn.Module, blocksize: int = 64, skip: Any = ("lm_head",)) -> dict:
    """Bytes the model holds now, and what its linear weights would take in float32, NF4 and NF4
    with double quantization (at ``blocksize``), counting parameters by their logical shape.

    "Weights" are the QuantLinear weights plus the float nn.Linear weights that
    :func:`quantize_model` (with the same ``skip``) would replace; everything else (embeddings,
    LayerNorms, biases, LoRA adapters) is "other" and counted at the bytes it holds. Returns
    ``params``, ``weight_params``, ``other_params``, ``other_bytes``, ``held_bytes`` (the nbytes
    of every array actually held), ``held_bits_per_param``, and for each of "float32", "nf4" and
    "nf4_dq": ``weight_bytes``, ``weight_bits_per_param`` and ``total_bytes``.
    """
    nn.check_module(model, "memory_report")
    check_blocksize(blocksize)
    if isinstance(skip, str):
        skip = (skip,)
    quantized = [m for _, m in model.named_modules() if isinstance(m, QuantLinear)]
    floats = [m for _, m in _linear_targets(model, tuple(skip))]
    weight_ids = {id(m.weight) for m in floats}
    others = [p for p in model.parameters() if id(p) not in weight_ids]
    shapes = [m.quant_state.shape for m in quantized] + [m.weight.shape for m in floats]
    other_bytes = int(sum(p.data.nbytes for p in others))
    held = other_bytes + sum(m.quant_state.nbytes for m in quantized) \
        + sum(int(m.weight.data.nbytes) for m in floats)
    n_weights = sum(math.prod(s) for s in shapes)
    n_other = sum(p.size for p in others)
    return {
        "params": n_weights + n_other,
        "weight_params": n_weights,
        "other_params": n_other,
        "other_bytes": other_bytes,
        "held_bytes": int(held),
        "held_bits_per_param": 8 * held / max(n_weights + n_other, 1),
        "float32": _scenario(shapes, other_bytes, lambda n: 4 * n),
        "nf4": _scenario(shapes, other_bytes, lambda n: storage_bytes(n, blocksize, False)),
        "nf4_dq": _scenario(shapes, other_bytes, lambda n: storage_bytes(n, blocksize, True)),
    }


def format_memory_report(report: dict) -> str:
    """The report of :func:`memory_report` as a small table (a string; nothing is printed)."""
    lines = [f"{'storage':<10}{'weight MiB':>12}{'bits/param':>12}{'total MiB':>12}"]
    for name in ("float32", "nf4", "nf4_dq"):
        s = report[name]
        lines.append(f"{name:<10}{s['weight_bytes'] / 2**20:>12.3f}"
                     f"{s['weight_bits_per_param']:>12.3f}{s['total_bytes'] / 2**20:>12.3f}")
    lines.append(f"held now: {report['held_bytes'] / 2**20:.3f} MiB for {report['params']:,} "
                 f"parameters ({report['held_bits_per_param']:.2f} bits each)")
    return "\n".join(lines)


__all__ = ["quantize_model", "load_quantized_layers", "quant_linear_from_bnb_state",
           "bnb_state_from_quant_linear", "memory_report", "format_memory_report"]
