"""A frozen 4-bit Linear layer, model surgery, merging into a 4-bit base, and memory accounting.

QLoRA in one sentence: keep the base weights in 4 bits, dequantize them on the fly in every forward
and backward pass, and train float32 LoRA adapters on top; gradients flow through the dequantized
weights to the input, never into them. :class:`QuantLinear` is that base layer.

Merging a LoRA update into a 4-bit base is ``W' = Q(deq(Q(W)) + delta)``: the sum lands on the
4-bit grid again, so the merge is not exact, and an update smaller than half a grid step vanishes.
:func:`merge_into_quantized` and :func:`merge_into_float` both measure what they lose.

A QuantLinear's state dict holds its 4-bit weight in bitsandbytes' ``Linear4bit`` layout
(:mod:`minilora.bnb_format`): ``weight`` (packed codes, uint8 ((n + 1) // 2, 1)),
``weight.absmax``, ``weight.quant_map``, with double quantization ``weight.nested_absmax`` and
``weight.nested_quant_map``, and a JSON blob ``weight.quant_state.bitsandbytes__nf4`` (``__fp4``;
``minilora__int4`` for INT4) with the shape, blocksizes and offset, next to ``bias``. So a
checkpoint of a quantized model loads back as QuantLinear layers, bit for bit, without
re-quantizing (:func:`load_quantized_layers`), and bitsandbytes' own state dicts load here
(:func:`quant_linear_from_bnb_state`, :func:`bnb_state_from_quant_linear`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import backend as B
from . import nn
from .bnb_format import FLOAT_DTYPES, quant_state_from_bnb, quant_state_to_bnb, quantized_layers
from .errors import InvalidArgumentError, ShapeError, StateDictError, shape_error
from .quant import (
    NESTED_BLOCKSIZE,
    QuantState,
    _check_blocksize,
    _check_quant_type,
    dequantize,
    quantize,
    storage_bytes,
)
from .tensor import Tensor


class QuantLinear(nn.Module):
    """``y = x deq(Q)^T + b``: a frozen Linear whose weight (out, in) is a :class:`QuantState`.

    The weight is not a Parameter: it gets no gradient, no optimizer state and no place in
    ``parameters()``. ``bias`` is a Parameter frozen by default (LoRA's ``bias="all"`` may unfreeze
    it). Nothing is cached between calls: the forward pass dequantizes, multiplies and drops the
    float weight; the backward pass dequantizes again (as bitsandbytes' 4-bit matmul does), so a
    float copy of W never outlives one matmul. That costs two dequantizations per training step,
    each O(in * out) elementwise work, small next to the matmuls for batches of a few hundred rows.
    """

    def __init__(self, quant_state: QuantState, bias: Any = None) -> None:
        super().__init__()
        if not isinstance(quant_state, QuantState) or len(quant_state.shape) != 2:
            got = quant_state.shape if isinstance(quant_state, QuantState) else quant_state
            raise InvalidArgumentError(f"QuantLinear: quant_state must be a QuantState of a 2-D "
                                       f"weight (out, in), got {got!r}")
        self.out_features, self.in_features = quant_state.shape
        self.quant_state = quant_state
        if bias is not None:
            data = bias.data if isinstance(bias, Tensor) else B.asarray(bias)
            if tuple(data.shape) != (self.out_features,):
                raise shape_error("QuantLinear", quant_state.shape, data.shape,
                                  detail=f"bias must have shape ({self.out_features},)")
            bias = nn.Parameter(data, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True) -> QuantLinear:
        """Quantize ``linear``'s weight (its bias is copied and frozen); ``linear`` is untouched."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"QuantLinear.from_linear: expected an nn.Linear, got "
                                       f"{type(linear).__name__}")
        state = quantize(linear.weight.data, blocksize, quant_type, double_quant)
        bias = None if linear.bias is None else linear.bias.data.copy()
        return cls(state, bias)

    def dequantized_weight(self) -> Any:
        """The weight as the forward pass sees it: float32 backend array (out, in)."""
        return dequantize(self.quant_state)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out); one graph node whose backward gives ``g W`` to x only."""
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.shape[-1:] != (self.in_features,):
            raise shape_error("QuantLinear", x.shape, self.quant_state.shape,
                              detail=f"input has {x.shape[-1:]} features, weight (out, in) "
                                     f"expects {self.in_features}")
        state, bias = self.quant_state, self.bias
        lead = x.shape[:-1]
        w = dequantize(state).astype(x.dtype, copy=False)  # float64 only for gradient checks
        y = x.data.reshape(-1, self.in_features) @ w.T  # (N, out)
        del w  # the float weight lives for one matmul only
        if bias is not None:
            y += bias.data
        parents = (x,) if bias is None else (x, bias)

        def backward(g: Any) -> tuple:
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            gx = None
            if x.requires_grad:
                gx = (g2 @ dequantize(state).astype(g.dtype, copy=False)).reshape(x.shape)
            if bias is None:
                return (gx,)
            return gx, (g2.sum(axis=0) if bias.requires_grad else None)
        return Tensor._make(y.reshape(*lead, self.out_features), parents, backward,
                            "quant_linear")

    def add_to_weight(self, delta: Any) -> dict:
        """In place: ``Q <- quantize(deq(Q) + delta)`` with the same settings; returns the error.

        ``delta`` (out, in) is e.g. a LoRA update ``scaling * B @ A``. The report compares the new
        dequantized weight with the exact float sum (see :func:`merge_into_quantized`).
        """
        new_state, report = _requantize(self.quant_state, delta, "add_to_weight")
        self.quant_state = new_state
        return report

    def to_linear(self) -> nn.Linear:
        """A float32 ``nn.Linear`` with the dequantized weight (frozen) and a copy of the bias."""
        return merge_into_float(self)[0]

    def _move_arrays(self) -> None:
        """Move the bias and the quantized weight to the active backend (see Module.to_backend)."""
        super()._move_arrays()
        self.quant_state = self.quant_state.to_backend()

    # the state dict (nn.Module's extra-state hook): the weight in bitsandbytes' layout

    def _extra_state(self) -> dict[str, Any]:
        """``weight``, ``weight.absmax``, ``weight.quant_map``, ... (module docstring): the
        state's own arrays (views), the code tables and the JSON blob."""
        return quant_state_to_bnb(self.quant_state, "weight")

    def _owns_extra_key(self, name: str) -> bool:
        return name == "weight" or name.startswith("weight.")

    def _load_extra_state(self, state: dict[str, Any], prefix: str) -> Any:
        """Check a 4-bit weight in bitsandbytes' layout and return the function that installs
        it; its logical shape must be this layer's (out, in), its settings may differ."""
        full = {prefix + k: v for k, v in state.items()}
        new = quant_state_from_bnb(full, prefix + "weight", who="load_state_dict")
        if tuple(new.shape) != self.quant_state.shape:
            raise StateDictError(f"load_state_dict: key {prefix + 'weight'!r} holds a 4-bit "
                                 f"weight of shape {new.shape} but the layer is "
                                 f"{self.quant_state.shape} (out, in)")
        return lambda: setattr(self, "quant_state", new)

    def extra_repr(self) -> str:
        s = self.quant_state
        dq = ", double_quant" if s.nested else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {s.quant_type}, blocksize={s.blocksize}{dq}")


# ------------------------------------------------------------------------------------ merging

def _as_delta(delta: Any, shape: tuple, fn: str) -> Any:
    data = delta.data if isinstance(delta, Tensor) else B.asarray(delta)
    if tuple(data.shape) != tuple(shape):
        raise shape_error(fn, shape, data.shape, detail="delta must have the weight's shape "
                                                        "(out, in)")
    if data.dtype.kind != "f":
        raise InvalidArgumentError(f"{fn}: delta must hold floats, got dtype {data.dtype}")
    return data


def _merge_report(old: Any, new: Any, delta: Any) -> dict:
    """Errors of a merged weight ``new`` against the exact float64 sum ``old + delta``.

    ``max_abs_error``, ``mean_abs_error``, ``error_norm = ||new - exact||_F``,
    ``delta_norm = ||delta||_F``, ``relative_error = error_norm / delta_norm`` (1 or more: the
    update is mostly lost), ``delta_retained = <new - old, delta> / ||delta||^2`` (the share of
    the update that arrived: 1 when all of it, 0 when it vanished) and ``frac_unchanged``, the
    fraction of weights whose value did not move at all. NaN ratios when delta is zero.
    """
    old64, new64, d64 = (a.astype(np.float64) for a in (old, new, delta))
    err = new64 - (old64 + d64)
    moved = new64 - old64
    d2 = float((d64 * d64).sum())
    e_norm = float(math.sqrt(float((err * err).sum())))
    return {
        "max_abs_error": float(B.xp.abs(err).max()),
        "mean_abs_error": float(B.xp.abs(err).mean()),
        "error_norm": e_norm,
        "delta_norm": math.sqrt(d2),
        "relative_error": e_norm / math.sqrt(d2) if d2 > 0 else math.nan,
        "delta_retained": float((moved * d64).sum()) / d2 if d2 > 0 else math.nan,
        "frac_unchanged": float((new == old).mean()),
    }


def _requantize(state: QuantState, delta: Any, fn: str) -> tuple[QuantState, dict]:
    old = dequantize(state)
    d = _as_delta(delta, state.shape, fn)
    new_state = quantize(old + d.astype(np.float32, copy=False), state.blocksize,
                         state.quant_type, state.nested)
    report = _merge_report(old, dequantize(new_state), d)
    report["frac_codes_unchanged"] = float((new_state.codes() == state.codes()).mean())
    return new_state, report


def merge_into_quantized(layer: QuantLinear, delta: Any) -> tuple[QuantLinear, dict]:
    """Merge ``delta`` (out, in) into a 4-bit base: ``Q(deq(Q) + delta)``; returns a new
    QuantLinear (same blocksize, type and double quantization; ``layer`` is untouched) and the
    error report of :meth:`QuantLinear.add_to_weight`.

    The result sits on the 4-bit grid again, so it differs from the float sum by up to half a grid
    step per weight (``absmax * max_half_gap``); an update smaller than that mostly leaves the
    codes where they were (watch ``frac_codes_unchanged`` and ``delta_retained``).
    """
    if not isinstance(layer, QuantLinear):
        raise InvalidArgumentError(f"merge_into_quantized: expected a QuantLinear, got "
                                   f"{type(layer).__name__}")
    new_state, report = _requantize(layer.quant_state, delta, "merge_into_quantized")
    bias = None if layer.bias is None else layer.bias.data.copy()
    merged = QuantLinear(new_state, bias)
    if layer.bias is not None:
        merged.bias.requires_grad = layer.bias.requires_grad
    return merged, report


def merge_into_float(layer: QuantLinear, delta: Any = None) -> tuple[nn.Linear, dict]:
    """Merge into a float32 copy: an ``nn.Linear`` with weight ``deq(Q) + delta`` (frozen) and a
    copy of the bias, plus the same error report (only float32 rounding: about 1e-7 relative).

    Exact up to float32 rounding, at 32 bits per weight instead of about 4.
    """
    if not isinstance(layer, QuantLinear):
        raise InvalidArgumentError(f"merge_into_float: expected a QuantLinear, got "
                                   f"{type(layer).__name__}")
    old = dequantize(layer.quant_state)
    d = B.xp.zeros_like(old) if delta is None else _as_delta(delta, old.shape, "merge_into_float")
    weight = old + d.astype(np.float32, copy=False)
    report = _merge_report(old, weight, d)
    # built without nn.Linear.__init__, which would draw a random init we would throw away
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = layer.in_features, layer.out_features
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = None if layer.bias is None else nn.Parameter(
        layer.bias.data.copy(), requires_grad=layer.bias.requires_grad)
    return linear, report


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
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if isinstance(skip, str):
        skip = (skip,)
    if isinstance(model, nn.Linear):
        raise InvalidArgumentError("quantize_model: model is itself an nn.Linear and cannot be "
                                   "replaced in place; use QuantLinear.from_linear(model)")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"quantize_model: expected an nn.Module, got "
                                   f"{type(model).__name__}")
    for path, linear in _linear_targets(model, tuple(skip)):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, name, QuantLinear.from_linear(linear, blocksize, quant_type, double_quant))
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
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer)
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
    _check_blocksize(blocksize)
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


__all__ = ["QuantLinear", "quantize_model", "merge_into_quantized", "merge_into_float",
           "memory_report", "format_memory_report", "quant_linear_from_bnb_state",
           "bnb_state_from_quant_linear", "load_quantized_layers", "NESTED_BLOCKSIZE",
           "ShapeError"]
