"""The LoRA layer: a frozen linear-like base plus low-rank updates, one per named adapter.

For an input x (..., k) and a base layer ``y = x W^T + b`` with W (n, k) frozen, adapter i adds

    y + s_i * (dropout(x) A_i^T) B_i^T,     A_i (r_i, k), B_i (n, r_i),  s_i = alpha_i / r_i

as two skinny matmuls (:func:`add_lora_update`, one graph node that keeps only the (N, r)
intermediate): B_i A_i (n, k) is never formed while training, and W gets no gradient. The
variants (rsLoRA's scaling, DoRA's magnitude, PiSSA's init) are in :mod:`.variants`; this file
is the plain layer, which calls them.

An adapter's rank is its A's number of rows, and it is a DoRA adapter when it has a magnitude
vector: ``r``, ``use_dora`` and ``scaling`` are read off the adapter, and only what its weights
do not say (alpha, the input dropout, rsLoRA) is kept beside them, in one table.

The base may be an ``nn.Linear`` or any module with ``in_features``, ``out_features``, ``bias``,
``forward``, ``dequantized_weight()`` and ``add_to_weight(delta)`` (the 4-bit QuantLinear):
everything here reads W through :func:`base_weight`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from .. import backend as B
from .. import fast, flops
from .. import functional as F
from ..errors import ConfigError, GraphError, InvalidArgumentError
from ..nn import Linear, Module, ModuleDict, Parameter, check_module
from ..tensor import Tensor, release
from .config import INITS, LoraConfig, adapter_list
from .variants import (
    DoraMagnitude,
    dora_merge_factor,
    dora_merged_delta,
    dora_term,
    lora_scaling,
    pissa_init,
)


def is_linear_like(module: Any) -> bool:
    """An ``nn.Linear``, or a module that can hand out its weight via ``dequantized_weight()``."""
    return isinstance(module, Linear) or callable(getattr(module, "dequantized_weight", None))


def base_weight(base: Module) -> Any:
    """The base layer's weight W (out, in) as a backend array (dequantized for a 4-bit base)."""
    if isinstance(base, Linear):
        return base.weight.data
    return B.asarray(base.dequantized_weight())


# Outputs whose array add_lora_update was allowed to write into (y_is_fresh=True), by id: their
# caller said nothing reads them again, and the readers in this file hold it to that. Keyed by
# id with a weak reference (an entry goes when its tensor does), not by the tensor's equality.
_handed_over: dict[int, weakref.ref] = {}


def _hand_over(y: Tensor) -> None:
    key = id(y)
    _handed_over[key] = weakref.ref(y, lambda _, key=key: _handed_over.pop(key, None))


def was_handed_over(y: Tensor) -> bool:
    """True when ``y`` went to :func:`add_lora_update` with ``y_is_fresh=True``: its array may
    hold the sum since, so nothing may read it."""
    ref = _handed_over.get(id(y))
    return ref is not None and ref() is y


def add_lora_update(y: Tensor, x: Tensor, A: Tensor, Bm: Tensor, s: float, *,
                    y_is_fresh: bool = False) -> Tensor:
    """``y + s (x A^T) B^T`` as one graph node; y (..., out), x (..., in), A (r, in), B (out, r).

    Two skinny matmuls, never B @ A. The backward pass keeps only h = s x A^T (N, r):
    dy = g,  dB = g^T h,  dA = s (g B)^T x,  dx = s (g B) A; frozen inputs get no work.

    The sum is a new array. ``y_is_fresh=True`` is the caller's word that y is its own fresh
    output (a linear layer's, whose backward never reads it) and that nothing reads y after this
    call, not even the backward of an op built before: then the fast form
    (:func:`minilora.fast.lora.add_lora_update_into`) may write the sum into y's array, which
    saves an (N, out) array per layer. A y handed over so is refused if it comes back here, or to
    a DoRA term, in both forms (GraphError).
    """
    k, n = A.shape[1], Bm.shape[0]
    x2 = x.data.reshape(-1, k)  # (N, in)
    y2 = y.data.reshape(-1, n)  # (N, out), a view of y's array when it is contiguous
    if was_handed_over(y):
        raise GraphError("add_lora_update: y was already handed over (y_is_fresh=True) to an "
                         "earlier update, which may have written into its array; pass that "
                         "update's output instead")
    N, r = x2.shape[0], A.shape[0]
    flops.add_matmul("lora", N, k, r)  # x A^T
    flops.add_matmul("lora", N, r, n)  # (s x A^T) B^T
    into = fast.kernel("lora_update") if y_is_fresh else None
    if y_is_fresh:
        _hand_over(y)
    if into is not None:
        out, h = into(y2, x2, A.data, Bm.data, s, y_is_fresh=True)
        # y's array now holds the sum (or nothing reads it): y keeps only its shape for the walk,
        # so the array goes once the caller releases the sum, instead of living on in y
        release(y)
    else:
        h = x2 @ A.data.T  # (N, r)
        h *= s
        out = y2 + h @ Bm.data.T  # (N, out), a new array

    def backward(g: Any) -> tuple:
        g2 = g.reshape(-1, n)  # (N, out)
        wants_gh = x.requires_grad or A.requires_grad
        flops.add_matmul("lora", N, n, r, wants_gh + bool(Bm.requires_grad))  # gh, gB
        flops.add_matmul("lora", N, r, k, bool(x.requires_grad) + bool(A.requires_grad))  # gx, gA
        gh = g2 @ Bm.data if wants_gh else None  # (N, r)
        gx = ((gh @ A.data) * s).reshape(x.shape) if x.requires_grad else None
        gA = (gh.T @ x2) * s if A.requires_grad else None
        gB = g2.T @ h if Bm.requires_grad else None
        return g, gx, gA, gB
    return Tensor._make(out.reshape(y.shape), (y, x, A, Bm), backward, "lora")


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter's weights do not say: its ``alpha``, the ``dropout`` on its input and
    whether its scaling is rsLoRA's (``use_rslora``)."""

    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False


class LoRALinear(Module):
    """A frozen linear-like ``base_layer`` with LoRA adapters ``lora_A[name]``, ``lora_B[name]``.

    ``forward(x)``: x (..., in) -> (..., out) = base(x) + the update of every active adapter that
    is not merged into the base (module docstring). ``r``, ``scaling``, ``use_dora``,
    ``lora_alpha``, ``lora_dropout`` and ``use_rslora`` read ``{adapter name: value}``, as in
    loralib and PEFT (``layer.r["default"]``); the first three are derived from the adapter's own
    modules, the others come from ``settings`` ({name: AdapterSettings}), the one table kept by
    hand. ``merged_adapters`` lists the adapters folded into W; ``merged`` is True when any is,
    and a second ``merge`` is refused until ``unmerge``.
    """

    def __init__(self, base_layer: Module) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise InvalidArgumentError(f"LoRALinear: base_layer must be an nn.Linear or have "
                                       f"dequantized_weight(), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_magnitude_vector = ModuleDict()
        self.settings: dict[str, AdapterSettings] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._merge_factors: dict[str, Any] = {}  # DoRA's m / ||W + s B A|| at merge time

    @property
    def keeps_own_inputs(self) -> bool:  # type: ignore[override]
        """As its base layer: the updates' closures hold x's array (dropout's too), not x."""
        return bool(getattr(self.base_layer, "keeps_own_inputs", False))

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

    # ------------------------------------------------------------- per-adapter values, read-only

    @property
    def r(self) -> Mapping[str, int]:
        """{adapter: rank}: the rows of its A (r, in)."""
        return MappingProxyType({n: int(a.weight.shape[0]) for n, a in self.lora_A.items()})

    @property
    def use_dora(self) -> Mapping[str, bool]:
        """{adapter: True for a DoRA adapter}, one that has a magnitude vector."""
        return MappingProxyType({n: n in self.lora_magnitude_vector for n in self.lora_A})

    @property
    def scaling(self) -> Mapping[str, float]:
        """{adapter: s}, alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return MappingProxyType({n: self._scaling(n) for n in self.lora_A})

    @property
    def lora_alpha(self) -> Mapping[str, float]:
        """{adapter: alpha}."""
        return MappingProxyType({n: v.alpha for n, v in self.settings.items()})

    @property
    def lora_dropout(self) -> Mapping[str, float]:
        """{adapter: dropout probability on its input}."""
        return MappingProxyType({n: v.dropout for n, v in self.settings.items()})

    @property
    def use_rslora(self) -> Mapping[str, bool]:
        """{adapter: True when its scaling is rsLoRA's}."""
        return MappingProxyType({n: v.use_rslora for n, v in self.settings.items()})

    def _scaling(self, name: str) -> float:
        settings = self.settings[name]
        return lora_scaling(int(self.lora_A[name].weight.shape[0]), settings.alpha,
                            settings.use_rslora)

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
        # LoraConfig's checks, for a caller that comes here directly (r within MAX_RANK before
        # any (r, in) matrix exists, alpha a positive number, dropout in [0, 1), the switches)
        LoraConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
                   init=init)
        dtype = self._dtype()
        A = Linear(self.in_features, r, bias=False, dtype=dtype)  # kaiming-uniform, 1/sqrt(in)
        Bm = Linear(r, self.out_features, bias=False, dtype=dtype)
        Bm.weight.data[...] = 0
        if init == "gaussian":
            std = 1.0 / r
            A.weight.data = B.asarray((B.host_rng().standard_normal(A.weight.shape) * std)
                                      .astype(dtype))
        self.lora_A[adapter_name], self.lora_B[adapter_name] = A, Bm
        self.settings[adapter_name] = AdapterSettings(alpha, float(dropout), bool(use_rslora))
        if init == "pissa":
            try:
                self._pissa_init(adapter_name)
            except Exception:
                self.delete_adapter(adapter_name)
                raise
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude.from_weight(
                base_weight(self.base_layer) + self.delta_weight(adapter_name))

    def _pissa_init(self, name: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W, and W <- W - s B A (variants)."""
        if self.is_quantized:
            raise ConfigError("LoRALinear: init='pissa' rewrites the base weight and is not "
                              "supported on a quantized base; use init='kaiming'")
        A, Bm = pissa_init(self.base_layer.weight.data, self.r[name], self._scaling(name))
        self.lora_A[name].weight.data[...] = A
        self.lora_B[name].weight.data[...] = Bm

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (refused while it is merged)."""
        if adapter_name in self.merged_adapters:
            raise InvalidArgumentError(f"delete_adapter: adapter {adapter_name!r} is merged into "
                                       f"the base weight; unmerge first")
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter_name in table:
                del table[adapter_name]
        self.settings.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_parameters(self, adapter_name: str) -> list[Parameter]:
        """A, B (and DoRA's m) of one adapter."""
        mods = [t[adapter_name] for t in (self.lora_A, self.lora_B, self.lora_magnitude_vector)
                if adapter_name in t]
        return [m.weight for m in mods]

    def set_adapter(self, names: list[str]) -> None:
        """Make ``names`` (those this layer has) the active adapters; only they train."""
        self.active_adapters = [n for n in adapter_list(names, "set_adapter") if n in self.lora_A]
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
        inputs = {n: F.dropout(x, self.settings[n].dropout, self.training)
                  if self.settings[n].dropout else x for n in names}
        dora = [self._dora_term(n, x, inputs[n], base_out) for n in names
                if n in self.lora_magnitude_vector]
        # base_out is the base layer's own fresh output (a linear layer's backward never reads
        # it), so the plain updates may be written into its array, unless a DoRA term above
        # holds it: DoRA reads x W^T = base(x) - b, and without a bias keeps base(x) itself for
        # its backward pass. Each update's output is fresh in turn, for the next one.
        fresh = not dora
        result = base_out
        for n in names:
            if n not in self.lora_magnitude_vector:
                result = add_lora_update(result, inputs[n], self.lora_A[n].weight,
                                         self.lora_B[n].weight, self._scaling(n),
                                         y_is_fresh=fresh)
        for term in dora:
            result = result + term
        return result

    def _dora_term(self, name: str, x: Tensor, dx: Tensor, base_out: Tensor) -> Tensor:
        """DoRA's term for adapter ``name`` (:func:`.variants.dora_term`), with dx W^T taken
        from base(x) = x W^T + b when the input has no dropout."""
        if was_handed_over(base_out):
            raise GraphError("LoRALinear: DoRA's term reads base(x), which was handed over to a "
                             "plain update (y_is_fresh=True) that may have written into it; "
                             "build the DoRA terms first")
        W = base_weight(self.base_layer)
        if dx is x:
            bias = self.base_layer.bias
            wx = base_out - bias if bias is not None else base_out  # x W^T, reusing base(x)
        else:  # dropout: DoRA's W-term sees the dropped input too (PEFT does the same)
            wx = F.linear(dx, Tensor(W))
        return dora_term(self.lora_magnitude_vector[name].weight, W, self.lora_A[name].weight,
                         self.lora_B[name].weight, self._scaling(name), dx, wx)

    # --------------------------------------------------------------------- merging

    def delta_weight(self, adapter_name: str) -> Any:
        """``s * B @ A`` (out, in) of one adapter, as an array (no graph)."""
        if adapter_name not in self.lora_A:
            raise InvalidArgumentError(f"delta_weight: this layer has no adapter "
                                       f"{adapter_name!r}; it has {list(self.lora_A)}")
        A, Bm = self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data
        return self._scaling(adapter_name) * (Bm @ A)

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
            if name in self.lora_magnitude_vector:
                f = dora_merge_factor(self.lora_magnitude_vector[name].weight.data, W, d)
                factors[name] = f
                delta += dora_merged_delta(W, d, f)
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
        asked = self.active_adapters if adapter_names is None else \
            adapter_list(adapter_names, "merge")
        names = [n for n in asked if n in self.lora_A]
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
        if self._merge_factors:
            # a factor of 0 (m = 0: a row of W that was all zero, which DoRA keeps at zero,
            # variants._divisor) left nothing of that row to divide back: it gets its 0 again
            W[...] = B.xp.where(rows != 0, rest / B.xp.where(rows != 0, rows, 1), 0)
        else:
            W[...] = rest
        self.merged_adapters = []
        self._merge_factors = {}

    def extra_repr(self) -> str:
        r, dora = self.r, self.use_dora
        ranks = ", ".join(f"{n}: r={r[n]}{' dora' if dora[n] else ''}" for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"adapters={{{ranks}}}, active={self.active_adapters}, merged={self.merged}"


def lora_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    """Every ``(path, LoRALinear)`` in ``model``, in module order."""
    check_module(model, "lora_layers")  # the LoRA functions of a model also check by name
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
