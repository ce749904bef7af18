"""Merging: fold adapters into the base weights, undo it, and combine adapters into a new one.

After training, W' = W + s B A serves at exactly the base's cost: the LoRA paper's "no additional
inference latency". Merging is always an explicit call here (loralib merges on ``eval()``; that
surprise is avoided), and a layer refuses a second merge until it is unmerged.

``add_weighted_adapter`` builds a new adapter from weighted ones, as PEFT's method of that name:
"cat" stacks the factors, A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], whose update
is exactly sum_i w_i s_i B_i A_i and whose rank is the sum of the ranks; "svd" forms that sum and
keeps its top ``svd_rank`` singular directions, the best approximation of that rank
(Eckart-Young); "linear" adds the factors themselves, A = sum_i sign(c_i) sqrt|c_i| A_i and
B = sum_i sqrt|c_i| B_i with c_i = w_i s_i, which keeps the common rank but is NOT the weighted
sum of the updates: B A also holds the cross terms B_i A_j (i != j).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from .. import backend as B
from ..errors import ConfigError, InvalidArgumentError, check_int, is_real
from ..nn import Module, check_module
from .config import LoraConfig, adapter_list
from .inject import check_adapter_name, lora_configs, unload
from .layer import LoRALinear, lora_layers


def merge(model: Module, adapter_names: Sequence[str] | None = None) -> dict[str, Any]:
    """W <- W + delta in every LoRA layer for ``adapter_names`` (default: the active adapters).

    Refused (nothing changed) if any layer is already merged. Returns ``{path: report}`` for the
    layers with a quantized base, whose ``add_to_weight`` re-quantizes W + delta and reports the
    error that adds; empty for float bases.
    """
    check_module(model, "merge")
    layers = lora_layers(model)
    if not layers:
        raise InvalidArgumentError("merge: the model has no LoRA layers")
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise InvalidArgumentError(f"merge: {merged[:3]} already hold merged adapters "
                                   f"{layers[0][1].merged_adapters}; unmerge first")
    if adapter_names is not None:
        adapter_names = adapter_list(adapter_names, "merge")
        unknown = [n for n in adapter_names if n not in lora_configs(model)]
        if unknown:
            raise InvalidArgumentError(f"merge: unknown adapter(s) {unknown}; the model has "
                                       f"{list(lora_configs(model))}")
    reports = {}
    for path, layer in layers:
        report = layer.merge(adapter_names)
        if report is not None:
            reports[path] = report
    return reports


def unmerge(model: Module) -> None:
    """Undo ``merge`` in every LoRA layer (refused, before any change, for quantized bases)."""
    check_module(model, "unmerge")
    layers = [(p, layer) for p, layer in lora_layers(model) if layer.merged]
    lossy = [p for p, layer in layers if layer.is_quantized]
    if lossy:
        raise InvalidArgumentError(f"unmerge: {lossy[:3]} have quantized bases; merging "
                                   f"re-quantized W + delta (lossy), so W cannot be restored "
                                   f"exactly. Reload the base weights instead")
    for _, layer in layers:
        layer.unmerge()


def merge_and_unload(model: Module, adapter_names: Sequence[str] | None = None) -> Module:
    """Merge, then put the (updated) base modules back in place of the LoRA layers.

    The result holds plain Linear (or QuantLinear) layers only, so it runs exactly as fast as
    the base. Their parameters stay frozen. A model merged already (``merge``) is unloaded as it
    is, when no ``adapter_names`` are asked for. Returns ``model``.
    """
    check_module(model, "merge_and_unload")
    if adapter_names is not None or not any(layer.merged for _, layer in lora_layers(model)):
        merge(model, adapter_names)
    for _, layer in lora_layers(model):  # now plain bases: no longer merged "adapters"
        layer.merged_adapters = []
    return unload(model)


COMBINATION_TYPES = ("svd", "cat", "linear")


def _check_weighted(model: Module, adapters: Sequence[str], weights: Sequence[float],
                    adapter_name: str, combination_type: str, svd_rank: Any) -> None:
    configs = lora_configs(model)
    check_adapter_name(adapter_name)
    if adapter_name in configs:
        raise ConfigError(f"add_weighted_adapter: adapter {adapter_name!r} already exists")
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters \
            or any(a not in configs for a in adapters):
        raise InvalidArgumentError(f"add_weighted_adapter: adapters must be a non-empty list of "
                                   f"existing adapters {list(configs)}, got {adapters!r}")
    weights = weights.tolist() if isinstance(weights, np.ndarray) else weights
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters) or not all(
            is_real(w) and math.isfinite(w) for w in weights):  # a bool is no weight
        raise InvalidArgumentError(f"add_weighted_adapter: weights must be one finite number per "
                                   f"adapter ({len(adapters)}), got {weights!r}")
    if combination_type not in COMBINATION_TYPES:
        raise InvalidArgumentError(f"add_weighted_adapter: combination_type must be one of "
                                   f"{COMBINATION_TYPES}, got {combination_type!r}")
    if svd_rank is not None:
        check_int(svd_rank, "add_weighted_adapter: svd_rank")
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise ConfigError(f"add_weighted_adapter: DoRA adapters {dora} are not linear in B A and "
                          f"cannot be combined this way")
    if combination_type == "linear":
        # as PEFT: an adapter's rank is its largest one (r or a rank_pattern value)
        ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
        if len(set(ranks)) > 1:
            raise ConfigError(f"add_weighted_adapter: combination_type='linear' adds the A's and "
                              f"the B's, so all adapters must have the same rank; adapters "
                              f"{list(adapters)} have r {ranks} (use 'cat' or 'svd' instead)")


def _check_linear_ranks(layers: list, adapters: list[str]) -> None:
    """Every layer: the adapters present there have one rank (a rank_pattern may differ)."""
    for path, layer in layers:
        present = [a for a in adapters if a in layer.lora_A]
        ranks = [layer.r[a] for a in present]
        if len(set(ranks)) > 1:
            raise ConfigError(f"add_weighted_adapter: combination_type='linear' needs one rank "
                              f"per layer; in {path!r} adapters {present} have r {ranks} (use "
                              f"'cat' or 'svd' instead)")


def _combined_factors(layer: LoRALinear, adapters: list[str], weights: list[float],
                      combination_type: str, svd_rank: int | None) -> tuple[Any, Any]:
    """The new (A, B) of one layer; its scaling is 1, so delta = B @ A."""
    if combination_type == "linear":
        c = [w * layer.scaling[a] for a, w in zip(adapters, weights)]  # Python floats
        root = [math.sqrt(abs(ci)) for ci in c]
        # the sign goes on A only (on both it would cancel); c = 0 counts as positive, as PEFT
        A = sum((rt if ci >= 0 else -rt) * layer.lora_A[a].weight.data
                for a, ci, rt in zip(adapters, c, root))  # (r, in)
        Bm = sum(rt * layer.lora_B[a].weight.data for a, rt in zip(adapters, root))  # (out, r)
        return A, Bm
    if combination_type == "cat":
        A = B.xp.concatenate([w * layer.scaling[a] * layer.lora_A[a].weight.data
                              for a, w in zip(adapters, weights)], axis=0)  # (sum r, in)
        Bm = B.xp.concatenate([layer.lora_B[a].weight.data for a in adapters], axis=1)
        return A, Bm  # (sum r, in), (out, sum r)
    dtype = layer.lora_A[adapters[0]].weight.data.dtype
    delta = sum(w * layer.delta_weight(a).astype(np.float64) for a, w in zip(adapters, weights))
    U, S, Vh = B.xp.linalg.svd(delta, full_matrices=False)
    k = min(svd_rank or max(layer.r[a] for a in adapters), S.shape[0])
    root = B.xp.sqrt(S[:k])  # split sqrt(S) over both factors: B = U sqrt(S), A = sqrt(S) V^T
    return (root[:, None] * Vh[:k]).astype(dtype), (U[:, :k] * root[None, :]).astype(dtype)


def add_weighted_adapter(model: Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None) -> None:
    """Add adapter ``adapter_name`` that combines ``adapters`` with ``weights``, in every layer.

    With c_i = weights[i] * s_i (s_i the scaling of adapter i in that layer), A_i (r_i, in) and
    B_i (out, r_i), the new factors are:

    * "cat":  A = [c_1 A_1; c_2 A_2; ...] (sum r_i, in), B = [B_1, B_2, ...] (out, sum r_i), so
      B A = sum_i c_i B_i A_i exactly;
    * "svd":  the top ``svd_rank`` singular triplets of sum_i c_i B_i A_i (default: the largest
      of the ranks, at most min(in, out)), B = U sqrt(S), A = sqrt(S) V^T: the best
      approximation of that rank;
    * "linear" (PEFT's): A = sum_i sign(c_i) sqrt|c_i| A_i (r, in) and B = sum_i sqrt|c_i| B_i
      (out, r), with sign(0) = +1; every adapter must have the same rank r (ConfigError
      otherwise). Its update B A = sum_i c_i B_i A_i + sum_{i != j} sign(c_j) sqrt|c_i c_j| B_i A_j
      is NOT the weighted sum of the updates unless the cross terms vanish (one adapter, or
      B_i A_j = 0 for i != j): cheap, a rough approximation (as PEFT's documentation warns).

    The new adapter has alpha = r and scaling 1, whatever the sources' rsLoRA setting (PEFT up to
    0.21 copies ``use_rslora`` from the first source, which makes its scaling sqrt(r) and the
    update sqrt(r) times too large: huggingface/peft#3449); it is added inactive and frozen:
    ``set_adapter(model, adapter_name)`` uses it. Adapters missing from a layer count as zero
    there; DoRA adapters are refused. Nothing is changed when an argument is refused.
    """
    check_module(model, "add_weighted_adapter")
    _check_weighted(model, adapters, weights, adapter_name, combination_type, svd_rank)
    adapters, weights = list(adapters), [float(w) for w in weights]
    configs = lora_configs(model)
    first = configs[adapters[0]]
    if combination_type == "linear":
        _check_linear_ranks(lora_layers(model), adapters)
    paths, ranks = [], {}
    for path, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        names, ws = [a for a, _ in present], [w for _, w in present]
        A, Bm = _combined_factors(layer, names, ws, combination_type, svd_rank)
        r = A.shape[0]
        layer.update_layer(adapter_name, r=r, alpha=r, dropout=first.dropout)
        layer.lora_A[adapter_name].weight.data[...] = A
        layer.lora_B[adapter_name].weight.data[...] = Bm
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(False)
        paths.append(path)
        ranks[path] = r
    r0 = max(ranks.values())
    pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
    configs = dict(configs)
    configs[adapter_name] = LoraConfig(r=r0, alpha=r0, dropout=first.dropout,
                                       target_modules=tuple(paths), bias=first.bias,
                                       rank_pattern=pattern, alpha_pattern=dict(pattern))
    model.lora_configs = configs
