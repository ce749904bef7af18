"""Parameter accounting: what LoRA trains against what full fine-tuning would.

A Linear layer with W (n, k) has n k weights; its rank-r adapter has r k (A) + n r (B) = r (n + k).
For a square d x d projection that is 2 r d against d^2, so adapting q and v in L layers trains

    L * 2 * r * (d + d)

parameters: the LoRA paper's counts, e.g. GPT-3 (d = 12288, L = 96) at r = 8: 37,748,736
against 175 billion. ``lora_param_count`` computes that from the sizes alone; ``count_parameters``
counts a real model; ``lora_parameter_table`` shows each adapted layer's r (n + k) against n k.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError, check_int
from ..nn import Linear, Module, check_module
from .config import LoraConfig
from .inject import lora_configs
from .layer import lora_layers

# the Linear layers of minilora's GPT, per block: name -> (out, in) in units of n_embd
GPT_LINEARS = {"attn.q_proj": (1, 1), "attn.k_proj": (1, 1), "attn.v_proj": (1, 1),
               "attn.o_proj": (1, 1), "mlp.fc": (4, 1), "mlp.proj": (1, 4)}


def count_parameters(model: Module) -> tuple[int, int]:
    """``(trainable, total)`` scalar parameters of ``model``, tied parameters once.

    A quantized linear layer (one with ``dequantized_weight()`` and no float weight) counts its
    logical out * in weights, never its packed bytes. Freezing changes ``trainable`` only.
    """
    check_module(model, "count_parameters")
    trainable = total = 0
    for p in model.parameters():
        total += p.size
        if p.requires_grad:
            trainable += p.size
    for _, mod in model.named_modules():
        if callable(getattr(mod, "dequantized_weight", None)) and not isinstance(mod, Linear):
            weight = mod._parameters.get("weight")
            if weight is None or weight.shape != (mod.out_features, mod.in_features):
                total += int(mod.out_features) * int(mod.in_features)
    return trainable, total


def trainable_parameters_summary(model: Module) -> str:
    """PEFT's line: "trainable params: T || all params: N || trainable%: P"."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: Module) -> None:
    """Print :func:`trainable_parameters_summary` (the one LoRA function that prints)."""
    print(trainable_parameters_summary(model))


def lora_parameter_table(model: Module, adapter_name: str | None = None) -> list[dict]:
    """One row per adapted layer: path, n (out), k (in), r, lora = r (n + k), full = n k and
    fraction = lora / full; for ``adapter_name`` (default: every adapter, one row each)."""
    rows = []
    for path, layer in lora_layers(model):
        for name in layer.lora_A:
            if adapter_name is not None and name != adapter_name:
                continue
            n, k, r = layer.out_features, layer.in_features, layer.r[name]
            lora = r * (n + k) + (n if layer.use_dora[name] else 0)
            rows.append({"path": path, "adapter": name, "n": n, "k": k, "r": r, "lora": lora,
                         "full": n * k, "fraction": lora / (n * k)})
    return rows


def format_parameter_table(rows: list[dict]) -> str:
    """The rows of :func:`lora_parameter_table` as an aligned text table with a total line."""
    head = f"{'layer':<28} {'adapter':<10} {'n x k':>13} {'r':>4} {'r(n+k)':>10} {'n k':>12} " \
           f"{'ratio':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        shape = f"{row['n']} x {row['k']}"
        lines.append(f"{row['path']:<28} {row['adapter']:<10} {shape:>13} {row['r']:>4} "
                     f"{row['lora']:>10,d} {row['full']:>12,d} {row['fraction']:>8.2%}")
    lora, full = sum(r["lora"] for r in rows), sum(r["full"] for r in rows)
    lines.append(f"{'total':<28} {'':<10} {'':>13} {'':>4} {lora:>10,d} {full:>12,d} "
                 f"{(lora / full if full else 0.0):>8.2%}")
    return "\n".join(lines)


def lora_param_count(d_model: int, n_layers: int, r: int, n_targets: int = 2) -> int:
    """Trainable LoRA parameters when ``n_targets`` square d x d projections per layer are
    adapted: n_layers * n_targets * r * (d + d). (The LoRA paper's tables use q and v.)"""
    d = check_int(d_model, "lora_param_count: d_model")
    n_layers = check_int(n_layers, "lora_param_count: n_layers")
    r = check_int(r, "lora_param_count: r")
    n_targets = check_int(n_targets, "lora_param_count: n_targets")
    return n_layers * n_targets * r * (d + d)


def gpt_lora_param_count(gpt_config: Any, lora_config: LoraConfig) -> int:
    """Trainable LoRA parameters ``inject_lora`` would add to ``GPT(gpt_config)``, from the two
    configs alone: the sum over targeted layers of r (n + k) (+ n for DoRA's magnitude), with
    the module paths h.{i}.attn.q_proj ... h.{i}.mlp.proj that minilora's GPT has."""
    d = gpt_config.n_embd
    total = 0
    for i in range(gpt_config.n_layer):
        for suffix, (n_mult, k_mult) in GPT_LINEARS.items():
            path = f"h.{i}.{suffix}"
            if lora_config.is_target(path):
                n, k, r = n_mult * d, k_mult * d, lora_config.rank_for(path)
                total += r * (n + k) + (n if lora_config.use_dora else 0)
    return total


def lora_trainable_count(model: Module, adapter_name: str | None = None) -> int:
    """Sum of ``r (n + k)`` (+ n for DoRA) over the layers holding ``adapter_name`` (default:
    all adapters): what the adapters add, whether or not they are trainable right now."""
    if adapter_name is not None and adapter_name not in lora_configs(model):
        raise InvalidArgumentError(f"lora_trainable_count: unknown adapter {adapter_name!r}; "
                                   f"the model has {list(lora_configs(model))}")
    return sum(row["lora"] for row in lora_parameter_table(model, adapter_name))


__all__ = ["count_parameters", "trainable_parameters_summary", "print_trainable_parameters",
           "lora_parameter_table", "format_parameter_table", "lora_param_count",
           "gpt_lora_param_count", "lora_trainable_count"]
