"""The LoRA layer: a frozen linear-like base plus low-rank updates, one per named adapter.

For an input x (..., k) and a base layer ``y = x W^T + b`` with W (n, k) frozen, adapter i adds

    y += s_i * (dropout(x) A_i^T) B_i^T,     A_i (r_i, k), B_i (n, r_i),  s_i = alpha_i / r_i

as two skinny matmuls (:func:`add_lora_update`, one graph node that keeps only the (N, r)
intermediate): B_i A_i (n, k) is never formed while training, and W gets no gradient.
With DoRA (Liu et al. 2024) adapter i instead rescales each output row of the updated weight to
a learned length m_i (n,):

    y = (m_i / ||W + s_i B_i A_i||_row) * (x W^T + s_i (x A_i^T) B_i^T) + b

where ||.||_row is the L2 norm of each row (over the input axis) and is treated as a constant
in the backward pass (DoRA, section 4.3). m_i starts at ||W + s_i B_i A_i||_row, so the output
does not change at init. Its state key is "<path>.lora_magnitude_vector.<adapter>.weight" (n,),
as in PEFT.

The base may be an ``nn.Linear`` or any module with ``in_features``, ``out_features``, ``bias``,
``forward``, ``dequantized_weight()`` and ``add_to_weight(delta)`` (the 4-bit QuantLinear):
everything here reads W through :func:`base_weight`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import backend as B
from . import functional as F
from .errors import ConfigError, InvalidArgumentError
from .lora_config import INITS, lora_scaling
from .nn import Linear, Module, Parameter
from .tensor import Tensor


def is_linear_like(module: Any) -> bool:
    """An ``nn.Linear``, or a module that can hand out its weight via ``dequantized_weight()``."""
    return isinstance(module, Linear) or callable(getattr(module, "dequantized_weight", None))


def base_weight(base: Module) -> Any:
    """The base layer's weight W (out, in) as a backend array (dequantized for a 4-bit base)."""
    if isinstance(base, Linear):
        return base.weight.data
    return B.asarray(base.dequantized_weight())


def row_norm(w: Any) -> Any:
    """L2 norm of each row of w (n, k) -> (n,): the DoRA norm ||.||_row, over the input axis."""
    return B.xp.sqrt((w * w).sum(axis=1))


def add_lora_update(y: Tensor, x: Tensor, A: Tensor, Bm: Tensor, s: float) -> Tensor:
    """``y + s (x A^T) B^T`` as one graph node; y (..., out), x (..., in), A (r, in), B (out, r).

    Two skinny matmuls, never B @ A. The backward pass keeps only h = s x A^T (N, r):
    dy = g,  dB = g^T h,  dA = s (g B)^T x,  dx = s (g B) A; frozen inputs get no work.
    y must be a linear layer's fresh output: the update is added into y's own array (a linear
    layer's backward never reads its output), so no second (N, out) array stays in the graph.
    """
    k, n = A.shape[1], Bm.shape[0]
    x2 = x.data.reshape(-1, k)  # (N, in)
    h = x2 @ A.data.T  # (N, r)
    h *= s
    out = y.data.reshape(-1, n)  # (N, out), a view of y's array when it is contiguous
    out += h @ Bm.data.T

    def backward(g: Any) -> tuple:
        g2 = g.reshape(-1, n)  # (N, out)
        gh = g2 @ Bm.data if (x.requires_grad or A.requires_grad) else None  # (N, r)
        gx = ((gh @ A.data) * s).reshape(x.shape) if x.requires_grad else None
        gA = (gh.T @ x2) * s if A.requires_grad else None
        gB = g2.T @ h if Bm.requires_grad else None
        return g, gx, gA, gB
    return Tensor._make(out.reshape(y.shape), (y, x, A, Bm), backward, "lora")


class AdapterDict(Module):
    """Sub-modules keyed by adapter name, so that state keys read "<layer>.lora_A.<name>.weight".

    Entries live only in ``_modules`` (not as attributes), so any adapter name is safe.
    """

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        self._modules[name] = module

    def __delitem__(self, name: str) -> None:
        del self._modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))

    def __len__(self) -> int:
        return len(self._modules)


class DoraMagnitude(Module):
    """DoRA's magnitude vector m (out,), held as ``weight`` (PEFT's layout)."""

    def __init__(self, magnitude: Any) -> None:
        super().__init__()
        self.weight = Parameter(magnitude)


class LoRALinear(Module):
    """A frozen linear-like ``base_layer`` with LoRA adapters ``lora_A[name]``, ``lora_B[name]``.

    ``forward(x)``: x (..., in) -> (..., out) = base(x) + the update of every active adapter that
    is not merged into the base (module docstring). Per adapter, ``r``, ``lora_alpha``,
    ``scaling``, ``lora_dropout`` and ``use_dora`` are dicts keyed by adapter name, as in
    loralib and PEFT. ``merged_adapters`` lists the adapters folded into W; ``merged`` is True
    when any is, and a second ``merge`` is refused until ``unmerge``.
    """

    def __init__(self, base_layer: Module) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise InvalidArgumentError(f"LoRALinear: base_layer must be an nn.Linear or have "
                                       f"dequantized_weight(), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_A = AdapterDict()
        self.lora_B = AdapterDict()
        self.lora_magnitude_vector = AdapterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._merge_factors: dict[str, Any] = {}  # DoRA's m / ||W + s B A|| at merge time

    @property
    def weight(self) -> Parameter:
        """The base layer's weight (an ``nn.Linear`` base only)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Parameter | None:
        """The base layer's bias."""
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """True while any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def is_quantized(self) -> bool:
        """True for a base that is not a float ``nn.Linear`` (merging into it is lossy)."""
        return not isinstance(self.base_layer, Linear)

    def _dtype(self) -> Any:
        """Adapters take a float base's dtype; on a quantized base, the default float dtype."""
        if isinstance(self.base_layer, Linear):
            return self.base_layer.weight.data.dtype
        return B.default_dtype()

    # ---------------------------------------------------------------------- adapters

    def update_layer(self, adapter_name: str, r: int, alpha: float, dropout: float = 0.0,
                     use_rslora: bool = False, use_dora: bool = False,
                     init: str = "kaiming") -> None:
        """Add adapter ``adapter_name``: A (r, in), B (out, r) initialised by ``init``."""
        if adapter_name in self.lora_A:
            raise ConfigError(f"LoRALinear: adapter {adapter_name!r} already exists here")
        if init not in INITS:
            raise ConfigError(f"LoRALinear: init must be one of {INITS}, got {init!r}")
        dtype = self._dtype()
        A = Linear(self.in_features, r, bias=False, dtype=dtype)  # kaiming-uniform, 1/sqrt(in)
        Bm = Linear(r, self.out_features, bias=False, dtype=dtype)
        Bm.weight.data[...] = 0
        if init == "gaussian":
            std = 1.0 / r
            A.weight.data = B.asarray((B.host_rng().standard_normal(A.weight.shape) * std)
                                      .astype(dtype))
        self.lora_A[adapter_name], self.lora_B[adapter_name] = A, Bm
        self.r[adapter_name], self.lora_alpha[adapter_name] = int(r), alpha
        self.scaling[adapter_name] = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout[adapter_name] = float(dropout)
        self.use_dora[adapter_name] = bool(use_dora)
        if init == "pissa":
            try:
                self._pissa_init(adapter_name)
            except Exception:
                self.delete_adapter(adapter_name)
                raise
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(
                row_norm(base_weight(self.base_layer) + self.delta_weight(adapter_name)))

    def _pissa_init(self, name: str) -> None:
        """PiSSA: s B A = U_r S_r V_r^T (top-r singular triplets of W), W <- W - s B A.

        B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T; the residual uses the rounded A and B, so
        base(x) + s B A x equals the old output up to rounding.
        """
        if self.is_quantized:
            raise ConfigError("LoRALinear: init='pissa' rewrites the base weight and is not "
                              "supported on a quantized base; use init='kaiming'")
        r, s = self.r[name], self.scaling[name]
        if r > min(self.in_features, self.out_features):
            raise ConfigError(f"LoRALinear: init='pissa' needs r <= min(in, out) = "
                              f"{min(self.in_features, self.out_features)}, got r={r}")
        W = self.base_layer.weight.data
        U, S, Vh = B.xp.linalg.svd(W.astype(np.float64), full_matrices=False)
        root = B.xp.sqrt(S[:r] / s)  # (r,)
        A, Bm = self.lora_A[name].weight, self.lora_B[name].weight
        A.data[...] = (root[:, None] * Vh[:r]).astype(W.dtype)  # (r, in)
        Bm.data[...] = (U[:, :r] * root[None, :]).astype(W.dtype)  # (out, r)
        W -= s * (Bm.data @ A.data)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (refused while it is merged)."""
        if adapter_name in self.merged_adapters:
            raise InvalidArgumentError(f"delete_adapter: adapter {adapter_name!r} is merged into "
                                       f"the base weight; unmerge first")
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter_name in table:
                del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_dora):
            table.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_parameters(self, adapter_name: str) -> list[Parameter]:
        """A, B (and DoRA's m) of one adapter."""
        mods = [t[adapter_name] for t in (self.lora_A, self.lora_B, self.lora_magnitude_vector)
                if adapter_name in t]
        return [m.weight for m in mods]

    def set_adapter(self, names: list[str]) -> None:
        """Make ``names`` (those this layer has) the active adapters; only they train."""
        self.active_adapters = [n for n in names if n in self.lora_A]
        for name in self.lora_A:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in self.active_adapters)

    # ----------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): base(x) plus each active, unmerged adapter's update."""
        base_out = self.base_layer(x)
        if self.disabled:
            return base_out
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        inputs = {n: F.dropout(x, self.lora_dropout[n], self.training)
                  if self.lora_dropout[n] else x for n in names}
        # DoRA terms read base(x) first: the plain updates below are added into its buffer
        dora = [self._dora_update(n, x, inputs[n], base_out) for n in names if self.use_dora[n]]
        result = base_out
        for n in names:
            if not self.use_dora[n]:
                result = add_lora_update(result, inputs[n], self.lora_A[n].weight,
                                         self.lora_B[n].weight, self.scaling[n])
        for term in dora:
            result = result + term
        return result

    def _dora_update(self, name: str, x: Tensor, dx: Tensor, base_out: Tensor) -> Tensor:
        """(m/||W + sBA|| - 1) * W dx + (m/||W + sBA||) * s B A dx: added to base(x), this gives
        DoRA's output; the norm is a constant for the backward pass (no graph through it)."""
        A, Bm, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        W = base_weight(self.base_layer)
        norm = row_norm(W + s * (Bm.data @ A.data))  # (out,), detached
        scale = self.lora_magnitude_vector[name].weight / Tensor(norm)  # (out,)
        lora_out = F.linear(F.linear(dx, A) * s, Bm)  # (..., out)
        if dx is x:
            bias = self.base_layer.bias
            wx = base_out - bias if bias is not None else base_out  # x W^T, reusing base(x)
        else:  # dropout: DoRA's W-term sees the dropped input too (PEFT does the same)
            wx = F.linear(dx, Tensor(W))
        return (scale - 1.0) * wx + scale * lora_out

    # --------------------------------------------------------------------- merging

    def delta_weight(self, adapter_name: str) -> Any:
        """``s * B @ A`` (out, in) of one adapter, as an array (no graph)."""
        A, Bm = self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data
        return self.scaling[adapter_name] * (Bm @ A)

    def merged_delta(self, adapter_names: list[str]) -> tuple[Any, dict]:
        """The change to W that reproduces the forward pass of ``adapter_names`` together.

        A plain adapter adds s B A; a DoRA adapter with f = m / ||W + s B A||_row adds
        (f - 1) W + f s B A (W is the current base weight). Returns (delta, {name: f}).
        """
        W = base_weight(self.base_layer)
        delta = B.xp.zeros_like(W)
        factors = {}
        for name in adapter_names:
            d = self.delta_weight(name)
            if self.use_dora[name]:
                f = self.lora_magnitude_vector[name].weight.data / row_norm(W + d)  # (out,)
                factors[name] = f
                delta += (f[:, None] - 1.0) * W + f[:, None] * d
            else:
                delta += d
        return delta, factors

    def merge(self, adapter_names: list[str] | None = None) -> dict | None:
        """W <- W + delta for ``adapter_names`` (default: the active ones) of this layer.

        Refused when adapters are already merged. Returns the base's report for a quantized base
        (whose ``add_to_weight`` re-quantizes W + delta, a lossy step), else None.
        """
        if self.merged:
            raise InvalidArgumentError(f"merge: adapters {self.merged_adapters} are already "
                                       f"merged into this layer; unmerge first")
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.lora_A]
        if not names:
            return None
        delta, factors = self.merged_delta(names)
        report = None
        if self.is_quantized:
            report = self.base_layer.add_to_weight(delta)
        else:
            self.base_layer.weight.data += delta
        self.merged_adapters = names
        self._merge_factors = factors
        return report

    def unmerge(self) -> None:
        """Undo ``merge``: W = (W' - sum_plain s B A - sum_dora f s B A) / (1 + sum_dora (f - 1)).

        Refused on a quantized base: re-quantizing W + delta lost information, so W cannot be
        recovered; reload the base instead (the error says so).
        """
        if not self.merged:
            return
        if self.is_quantized:
            raise InvalidArgumentError(
                f"unmerge: adapters {self.merged_adapters} were merged into a quantized base, "
                f"which re-quantized W + delta (lossy); W cannot be restored exactly. Reload the "
                f"base weights, or merge into a float copy of the layer instead")
        W = self.base_layer.weight.data
        rest = W.copy()
        rows = B.xp.ones((W.shape[0], 1), dtype=W.dtype)  # the factor multiplying the old W
        for name in self.merged_adapters:
            d = self.delta_weight(name)
            f = self._merge_factors.get(name)
            if f is None:
                rest -= d
            else:
                rest -= f[:, None] * d
                rows += f[:, None] - 1.0
        W[...] = rest / rows if self._merge_factors else rest
        self.merged_adapters = []
        self._merge_factors = {}

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}{' dora' if self.use_dora[n] else ''}"
                          for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"adapters={{{ranks}}}, active={self.active_adapters}, merged={self.merged}"


def lora_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    """Every ``(path, LoRALinear)`` in ``model``, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
