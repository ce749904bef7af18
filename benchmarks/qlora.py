"""QLoRA against float32 LoRA and full fine-tuning: accuracy, memory, step time.

    python benchmarks/qlora.py [--part all|accuracy|memory|speed|storage] [--digits 2]
                               [--base-steps 1000] [--adapt-steps 600] [--rounds 5]

* accuracy: train a GPT on task A (addition), then adapt it to task B (the sum written backwards)
  with LoRA (r=8, alpha=16, every linear layer) on the float32 base and with QLoRA (the same
  adapters on an NF4 + double-quantized base), same seed and schedule; exact match on held-out
  questions. Also the accuracy of the 4-bit base on task A before any adapter.
* storage: bytes of the frozen linear weights in float32, NF4 and NF4 + double quantization
  (``memory_report``), against QLoRA's 4.127 / 32.
* memory: peak host memory (tracemalloc) of a few training steps of full fine-tuning, LoRA and
  QLoRA on a config where the weights dominate (wide layers, a tiny batch).
* speed: median step time of QLoRA and LoRA (r=8 on q and v) on the reference config of
  DESIGN.md, measured side by side in alternating rounds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy as np

import minilora as ml
from minilora import backend as B
from minilora import data as D
from minilora import lora as L
from minilora import quant as Q
from minilora import train as T
from minilora.gpt import GPT, GPTConfig
from minilora.optim import AdamW
from minilora.step import forward_backward

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")
REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
WIDE = dict(vocab_size=16, block_size=16, n_layer=4, n_head=8, n_embd=512)


def _task_model(digits: int, seed: int) -> tuple[GPT, D.TaskDataset]:
    ml.manual_seed(seed)
    data = D.TaskDataset(D.get_task("add", digits))
    cfg = GPTConfig(vocab_size=len(D.TASK_VOCAB), block_size=data.block_size, n_layer=2,
                    n_head=4, n_embd=128)
    return GPT(cfg), data


def _adapt(base_state: dict, digits: int, steps: int, quantized: bool, seed: int) -> dict:
    model, _ = _task_model(digits, seed)
    model.load_state_dict(base_state)
    data_a = D.TaskDataset(D.get_task("add", digits))
    data_b = D.TaskDataset(D.get_task("rev", digits))
    out = {}
    if quantized:
        Q.quantize_model(model, blocksize=64, quant_type="nf4", double_quant=True)
        out["base_accuracy_a"] = T.exact_match(model, data_a)
    ml.manual_seed(seed)
    L.inject_lora(model, L.LoraConfig(r=8, alpha=16, target_modules=ALL_LINEAR))
    cfg = T.TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup=steps // 20,
                        min_lr=3e-4, weight_decay=0.0, eval_every=steps, seed=seed)
    t0 = time.perf_counter()
    history = T.train(model, data_b, cfg, progress=False)
    out["seconds"] = time.perf_counter() - t0
    out["accuracy_b"] = T.exact_match(model, data_b)
    out["final_loss"] = history["loss"][-1]
    return out


def accuracy(digits: int, base_steps: int, adapt_steps: int, seed: int = 0) -> dict:
    """Task A base, then LoRA and QLoRA on task B: exact-match accuracies."""
    model, data_a = _task_model(digits, seed)
    T.train(model, data_a, T.TrainConfig(steps=base_steps, batch_size=64,
                                         eval_every=base_steps, seed=seed), progress=False)
    base_state = {k: v.copy() for k, v in model.state_dict().items()}
    result = {"base_accuracy_a": T.exact_match(model, data_a),
              "base_accuracy_b": T.exact_match(model, D.TaskDataset(D.get_task("rev", digits)))}
    result["lora"] = _adapt(base_state, digits, adapt_steps, quantized=False, seed=seed)
    result["qlora"] = _adapt(base_state, digits, adapt_steps, quantized=True, seed=seed)
    return result


def storage() -> dict:
    """Frozen linear weights of the reference GPT: float32 vs NF4 vs NF4 + double quant."""
    ml.manual_seed(0)
    report = Q.memory_report(GPT(GPTConfig(**REFERENCE)))
    return {name: report[name] for name in ("float32", "nf4", "nf4_dq")} | {
        "ratio_dq": report["nf4_dq"]["weight_bytes"] / report["float32"]["weight_bytes"],
        "weight_params": report["weight_params"]}


def _build(kind: str, cfg: dict) -> GPT:
    model = GPT(GPTConfig(**cfg))
    if kind == "qlora":
        Q.quantize_model(model)
    if kind in ("lora", "qlora"):
        L.inject_lora(model, L.LoraConfig(r=8, alpha=16, target_modules=ALL_LINEAR))
    return model


def _step(model: GPT, opt: AdamW, x: np.ndarray, y: np.ndarray) -> None:
    """The training loop's step: forward and backward with the batch in shards, then AdamW."""
    forward_backward(model, x, y, T.TrainConfig.shards)
    opt.step()
    opt.zero_grad()


def peak_memory(kind: str, steps: int = 3, batch: int = 4) -> dict:
    """Peak traced host bytes while training ``kind`` ("full", "lora", "qlora") on WIDE."""
    gc.collect()
    tracemalloc.start()
    try:
        ml.manual_seed(0)
        model = _build(kind, WIDE)
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        rng = np.random.default_rng(0)
        x = rng.integers(0, WIDE["vocab_size"], (batch, WIDE["block_size"]))
        gc.collect()
        resident = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(steps):
            _step(model, opt, x, x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"resident_bytes": resident, "peak_bytes": peak}


def speed(rounds: int = 5, steps_per_round: int = 3, batch: int = 16) -> dict:
    """Median step time of LoRA and QLoRA (r=8 on q, v) on REFERENCE, alternating rounds."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, REFERENCE["vocab_size"], (batch, REFERENCE["block_size"]))
    runs = {}
    for kind in ("lora", "qlora"):
        ml.manual_seed(0)
        model = GPT(GPTConfig(**REFERENCE))
        if kind == "qlora":
            Q.quantize_model(model)
        L.inject_lora(model, L.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        _step(model, opt, x, x)  # warm up
        runs[kind] = (model, opt, [])
    for _ in range(rounds):
        for model, opt, times in runs.values():
            for _ in range(steps_per_round):
                B.synchronize()
                t0 = time.perf_counter()
                _step(model, opt, x, x)
                B.synchronize()
                times.append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2]) for k, v in runs.items()}
    ratios = [q / lo for q, lo in zip(runs["qlora"][2], runs["lora"][2])]
    return {"lora_ms": 1e3 * med["lora"], "qlora_ms": 1e3 * med["qlora"],
            "ratio": med["qlora"] / med["lora"], "ratio_median_pairs": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all",
                        choices=["all", "accuracy", "storage", "memory", "speed"])
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--adapt-steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    mib = 2.0 ** 20
    if args.part in ("all", "storage"):
        s = storage()
        print(f"## storage of the frozen linear weights (reference GPT, "
              f"{s['weight_params']:,} weights)")
        for name in ("float32", "nf4", "nf4_dq"):
            print(f"  {name:8s} {s[name]['weight_bytes'] / mib:8.3f} MiB  "
                  f"{s[name]['weight_bits_per_param']:.4f} bits/param")
        print(f"  nf4_dq / float32 = {s['ratio_dq']:.5f} (QLoRA: 4.127 / 32 = "
              f"{4.127 / 32:.5f})")
    if args.part in ("all", "memory"):
        print(f"## peak training memory, tracemalloc, {WIDE}, batch 4")
        full = None
        for kind in ("full", "lora", "qlora"):
            m = peak_memory(kind)
            full = full or m["peak_bytes"]
            print(f"  {kind:6s} resident {m['resident_bytes'] / mib:8.2f} MiB  peak "
                  f"{m['peak_bytes'] / mib:8.2f} MiB  ({m['peak_bytes'] / full:.3f} of full)")
    if args.part in ("all", "speed"):
        s = speed(args.rounds)
        print(f"## step time, {REFERENCE}, batch 16, r=8 on q and v, {args.rounds} rounds")
        print(f"  LoRA {s['lora_ms']:.1f} ms  QLoRA {s['qlora_ms']:.1f} ms  ratio "
              f"{s['ratio']:.3f} (median of paired ratios {s['ratio_median_pairs']:.3f})")
    if args.part in ("all", "accuracy"):
        r = accuracy(args.digits, args.base_steps, args.adapt_steps)
        print(f"## task B accuracy ({args.digits}-digit, base {args.base_steps} steps, adapters "
              f"{args.adapt_steps} steps, r=8 on every linear layer)")
        print(f"  base: task A {r['base_accuracy_a']:.3f}, task B {r['base_accuracy_b']:.3f}; "
              f"NF4+DQ base on task A {r['qlora']['base_accuracy_a']:.3f}")
        for name in ("lora", "qlora"):
            print(f"  {name:6s} task B {r[name]['accuracy_b']:.3f}  final loss "
                  f"{r[name]['final_loss']:.4f}  {r[name]['seconds']:.0f} s")


if __name__ == "__main__":
    main()
