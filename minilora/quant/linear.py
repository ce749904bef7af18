"""A frozen 4-bit Linear layer, and merging into a 4-bit base.

QLoRA in one sentence: keep the base weights in 4 bits, dequantize them on the fly in every forward
and backward pass, and train float32 LoRA adapters on top; gradients flow through the dequantized
weights to the input, never into them. :class:`QuantLinear` is that base layer.

Merging a LoRA update into a 4-bit base is ``W' = Q(deq(Q(W)) + delta)``: the sum lands on the
4-bit grid again, so the merge is not exact, and an update smaller than half a grid step vanishes.
:func:`merge_into_quantized` and :func:`merge_into_float` both measure what they lose.

A QuantLinear's state dict holds its 4-bit weight in bitsandbytes' ``Linear4bit`` layout
(:mod:`.bnb_format`): ``weight`` (packed codes, uint8 ((n + 1) // 2, 1)),
``weight.absmax``, ``weight.quant_map``, with double quantization ``weight.nested_absmax`` and
``weight.nested_quant_map``, and a JSON blob ``weight.quant_state.bitsandbytes__nf4`` (``__fp4``;
``minilora__int4`` for INT4) with the shape, blocksizes and offset, next to ``bias``. So a
checkpoint of a quantized model loads back as QuantLinear layers, bit for bit, without
re-quantizing (``load_quantized_layers`` in :mod:`.model`), and bitsandbytes' own state dicts
load here (``quant_linear_from_bnb_state``, ``bnb_state_from_quant_linear``, also there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend as B
from .. import flops, nn
from ..errors import InvalidArgumentError, StateDictError, shape_error
from ..tensor import Tensor
from .blockwise import QuantState, dequantize, quantize
from .bnb_format import quant_state_from_bnb, quant_state_to_bnb


class QuantLinear(nn.Module):
    """``y = x deq(Q)^T + b``: a frozen Linear whose weight (out, in) is a :class:`QuantState`.

    The weight is not a Parameter: it gets no gradient, no optimizer state and no place in
    ``parameters()``. ``bias`` is a Parameter frozen by default (LoRA's ``bias="all"`` may unfreeze
    it). Nothing is cached between calls: the forward pass dequantizes, multiplies and drops the
    float weight; the backward pass dequantizes again (as bitsandbytes' 4-bit matmul does), so a
    float copy of W never outlives one matmul. That costs two dequantizations per training step,
    each O(in * out) elementwise work, small next to the matmuls for batches of a few hundred rows.
    """

    keeps_own_inputs = True  # its backward reads g and the quantized weight, never x

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
        # the input's float type (float64 only for gradient checks); an int input (token ids,
        # a mask) meets the float32 weight as nn.Linear's does, never the weight cast to int
        wtype = x.dtype if x.dtype.kind == "f" else np.float32
        w = dequantize(state).astype(wtype, copy=False)
        y = x.data.reshape(-1, self.in_features) @ w.T  # (N, out)
        N = y.shape[0]
        flops.add_matmul("quant_linear", N, self.in_features, self.out_features)
        del w  # the float weight lives for one matmul only
        if bias is not None:
            y += bias.data
        parents = (x,) if bias is None else (x, bias)

        def backward(g: Any) -> tuple:
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            gx = None
            if x.requires_grad:
                flops.add_matmul("quant_linear", N, self.out_features, self.in_features)
                gx = (g2 @ dequantize(state).astype(wtype, copy=False)).reshape(x.shape)
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


__all__ = ["QuantLinear", "merge_into_quantized", "merge_into_float"]
