"""One LoRA training step against one full fine-tuning step of the reference GPT, in minilora.

    python benchmarks/lora_step.py            # about a minute
    python benchmarks/lora_step.py --quick    # a few seconds

Both models start from the same weights and train on the same batch (reference config: 4 layers,
4 heads, 256 channels, block 128, vocab 64, batch 16, float32). "full" trains every parameter with
AdamW; "lora" freezes them all and trains r = 8 adapters on q_proj and v_proj. Steps are timed in
alternating rounds (a few steps of one, then of the other, and again) so that load from other
processes hits both alike; the report quotes medians and their ratio, of wall-clock time and of
the process's CPU time (CPU time is what a step costs, summed over the threads; it is much
steadier than wall time when other processes compete for the cores). Each step is the training
loop's: the batch in two shards on two threads, each with a one-thread BLAS.

Memory comes from tracemalloc (NumPy reports its array buffers to it), one setup at a time: the
traced memory held once the model and its optimizer state exist (after two steps), and the peak
during a third, steady-state step. The difference between the two setups is LoRA's saving: no
weight gradients and no AdamW moments for the frozen base, and no weight-gradient matmuls.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minilora as ml  # noqa: E402
from minilora import lora  # noqa: E402
from minilora.fast.cpu import keep_freed_memory, set_blas_threads  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.step import forward_backward  # noqa: E402
from minilora.train import TrainConfig  # noqa: E402

REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
LORA = lora.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))


def build(cfg: GPTConfig, mode: str, seed: int = 0):
    """A GPT (same weights for both modes) and AdamW over what trains."""
    ml.manual_seed(seed)
    model = GPT(cfg)
    if mode == "lora":
        lora.inject_lora(model, LORA)
    opt = ml.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4,
                         weight_decay=0.1)
    return model, opt


def step(model, opt, x, y) -> float:
    """The training loop's step: forward and backward with the batch in shards, then AdamW."""
    loss = forward_backward(model, x, y, TrainConfig.shards)
    opt.step()
    opt.zero_grad()
    return loss


def batch(cfg: GPTConfig, size: int):
    rng = np.random.default_rng(0)
    return (rng.integers(0, cfg.vocab_size, (size, cfg.block_size)),
            rng.integers(0, cfg.vocab_size, (size, cfg.block_size)))


def speed(cfg: GPTConfig, size: int, rounds: int, per_round: int) -> dict:
    x, y = batch(cfg, size)
    setups = {mode: build(cfg, mode) for mode in ("full", "lora")}
    first = {mode: step(*setups[mode], x, y) for mode in setups}  # warm-up; equal losses
    times: dict = {mode: [] for mode in setups}
    cpu: dict = {mode: [] for mode in setups}
    for _ in range(rounds):
        for mode, (model, opt) in setups.items():
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                step(model, opt, x, y)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    cpu_med = {mode: statistics.median(t) for mode, t in cpu.items()}
    trainable, total = lora.count_parameters(setups["lora"][0])
    return {"full_ms": 1e3 * med["full"], "lora_ms": 1e3 * med["lora"],
            "full_cpu_ms": 1e3 * cpu_med["full"], "lora_cpu_ms": 1e3 * cpu_med["lora"],
            "speedup": med["full"] / med["lora"],
            "cpu_speedup": cpu_med["full"] / cpu_med["lora"],
            "tokens_per_step": size * cfg.block_size,
            "steps_each": len(times["full"]), "first_loss_full": first["full"],
            "first_loss_lora": first["lora"], "lora_trainable": trainable, "total": total,
            "full_trainable": lora.count_parameters(setups["full"][0])[0],
            "full_spread_ms": [1e3 * min(times["full"]), 1e3 * max(times["full"])],
            "lora_spread_ms": [1e3 * min(times["lora"]), 1e3 * max(times["lora"])]}


def memory(cfg: GPTConfig, size: int, mode: str) -> dict:
    x, y = batch(cfg, size)
    gc.collect()
    tracemalloc.start()
    model, opt = build(cfg, mode)
    for _ in range(2):
        step(model, opt, x, y)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    step(model, opt, x, y)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del model, opt
    gc.collect()
    return {"held_mib": held / 2**20, "peak_mib": peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny config and few steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads outside the sharded step (default 1: steadier on a "
                             "shared machine; the shards always run one BLAS thread each)")
    args = parser.parse_args()
    threads = "set" if set_blas_threads(args.threads) else "could not be set"
    keep_freed_memory()  # as the training loop does on the CPU
    ref = dict(REFERENCE)
    rounds, per_round = args.rounds, args.per_round
    if args.quick:
        ref.update(n_layer=2, n_embd=64, block_size=32)
        rounds, per_round = 3, 2
    cfg = GPTConfig(**ref)
    s = speed(cfg, args.batch, rounds, per_round)
    mem = {mode: memory(cfg, args.batch, mode) for mode in ("full", "lora")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"LoRA step vs full fine-tuning step, minilora {ml.__version__}, numpy "
          f"{np.__version__}, BLAS threads {args.threads} ({threads}), "
          f"{os.cpu_count()} CPUs, load {load:.1f}, Python {platform.python_version()}")
    print(f"config {ref}, batch {args.batch}, float32; {s['steps_each']} timed steps each in "
          f"{rounds} alternating rounds")
    print(f"first losses: full {s['first_loss_full']:.6f}, lora {s['first_loss_lora']:.6f} "
          f"(same weights, B = 0)")
    print()
    print("| setup | trainable params | wall ms (median) | wall min-max | CPU ms (median) | "
          "tokens/s (wall) | held MiB | peak MiB in a step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("full", "lora"):
        ms = s[f"{mode}_ms"]
        lo, hi = s[f"{mode}_spread_ms"]
        trainable = s["full_trainable"] if mode == "full" else s["lora_trainable"]
        print(f"| {mode} | {trainable:,d} | {ms:.1f} | {lo:.0f}-{hi:.0f} | "
              f"{s[f'{mode}_cpu_ms']:.1f} | {s['tokens_per_step'] / ms * 1e3:,.0f} | "
              f"{mem[mode]['held_mib']:.1f} | {mem[mode]['peak_mib']:.1f} |")
    print()
    print(f"LoRA trains {100 * s['lora_trainable'] / s['total']:.2f}% of {s['total']:,d} "
          f"parameters; step time full / lora = {s['speedup']:.2f}x wall, "
          f"{s['cpu_speedup']:.2f}x CPU time; peak memory lora / full = "
          f"{mem['lora']['peak_mib'] / mem['full']['peak_mib']:.2f}; held memory lora / full = "
          f"{mem['lora']['held_mib'] / mem['full']['held_mib']:.2f}")
    if args.json:
        print(json.dumps({"speed": s, "memory": mem, "config": ref, "batch": args.batch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
