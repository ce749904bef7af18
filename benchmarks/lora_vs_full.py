"""LoRA against full fine-tuning: adapt the task-A model (addition) to task B.

    python benchmarks/lora_vs_full.py                      # 3-digit tasks, a few minutes
    python benchmarks/lora_vs_full.py --base runs/base     # reuse a `minilora train` checkpoint
    python benchmarks/lora_vs_full.py --task-b rev --digits 2 --steps 3000 --full-lr 3e-3
    python benchmarks/lora_vs_full.py --quick              # a smoke run, figures meaningless

A task-A model (addition, ``--digits``-digit operands, the CLI's default model and training
settings) is trained first (or loaded with ``--base``), then fine-tuned to ``--task-b`` (default
"nocarry", task B: the sum without carries) twice: full fine-tuning, and LoRA r = 8 (alpha 16) on
q_proj and v_proj. Both runs start from the same weights and see the same task-B batches for the
same number of steps, each with its own learning rate (LoRA, with far fewer parameters and B
starting at zero, takes a larger one, as in the LoRA paper). Reported: held-out exact-match
accuracy on task B along the way and at the end (and on task A, to see what each run forgets),
trainable parameters, wall time, the LoRA model's accuracy again after merge_and_unload (it must
not change) and with its adapters disabled (the base's task A answers come back), and the size of
the adapter files.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minilora as ml  # noqa: E402
from minilora import lora  # noqa: E402
from minilora.checkpoint import load_model  # noqa: E402
from minilora.cli import MODEL_DEFAULTS  # noqa: E402
from minilora.data import TaskDataset, get_task  # noqa: E402
from minilora.fast.cpu import set_blas_threads  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.train import TrainConfig, exact_match, train  # noqa: E402


def base_model(path: str | None, steps: int, out: str, digits: int) -> GPT:
    """The task-A model: loaded from ``path``, or trained (TrainConfig defaults) and saved."""
    if path is not None:
        return load_model(path)[0]
    data = TaskDataset(get_task("add", digits))
    ml.manual_seed(0)
    config = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=data.block_size,
                       **MODEL_DEFAULTS)
    model = GPT(config)
    t0 = time.perf_counter()
    train(model, data, TrainConfig(steps=steps, eval_every=steps), out_dir=out, progress=False)
    print(f"trained the task-A base for {steps} steps in {time.perf_counter() - t0:.0f} s "
          f"(checkpoint: {out})", flush=True)
    return model


def copy_of(model: GPT) -> GPT:
    clone = GPT(model.config)
    clone.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    return clone


def fine_tune(model: GPT, data: TaskDataset, steps: int, lr: float, seed: int,
              n_eval: int) -> tuple[float, list]:
    """Train on ``data``; returns the wall time and [(step, held-out accuracy)] along the way."""
    config = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=min(50, steps // 10),
                         eval_every=max(1, steps // 6), eval_examples=n_eval, seed=seed)
    t0 = time.perf_counter()
    history = train(model, data, config, progress=False)
    return time.perf_counter() - t0, [(e["step"], e["accuracy"]) for e in history["eval"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="checkpoint directory of a task-A model to start from")
    parser.add_argument("--task-b", default="nocarry", help="the task to adapt to")
    parser.add_argument("--digits", type=int, default=3, help="operand digits of both tasks")
    parser.add_argument("--base-steps", type=int, default=TrainConfig().steps,
                        help="steps to train a base")
    parser.add_argument("--base-out", default=None,
                        help="where to save a trained base (default runs/lora_vs_full_base<d>)")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps per run")
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--eval", type=int, default=1000, help="held-out questions per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: steadier on a shared machine, and these "
                             "matmuls gain little from a second thread)")
    args = parser.parse_args()
    threads = "set" if set_blas_threads(args.threads) else "could not be set"
    if args.quick:
        args.base_steps, args.steps, args.eval = 30, 20, 50
    out = args.base_out or os.path.join("runs", f"lora_vs_full_base{args.digits}")
    base = base_model(args.base, args.base_steps, out, args.digits)
    task_a = TaskDataset(get_task("add", args.digits))
    task_b = TaskDataset(get_task(args.task_b, args.digits))
    if base.config.block_size != task_a.block_size:
        parser.error(f"the base has block_size {base.config.block_size}, but {args.digits}-digit "
                     f"tasks need {task_a.block_size}: pass the --digits it was trained with")
    acc = {"base": (exact_match(base, task_a, args.eval), exact_match(base, task_b, args.eval))}

    full = copy_of(base)
    ml.manual_seed(args.seed)
    t_full, curve_full = fine_tune(full, task_b, args.steps, args.full_lr, args.seed, args.eval)
    acc["full"] = (exact_match(full, task_a, args.eval), exact_match(full, task_b, args.eval))
    n_full, total = lora.count_parameters(full)

    adapted = copy_of(base)
    ml.manual_seed(args.seed)
    lora.inject_lora(adapted, lora.LoraConfig(r=args.r, alpha=args.alpha))
    n_lora, total_lora = lora.count_parameters(adapted)
    t_lora, curve_lora = fine_tune(adapted, task_b, args.steps, args.lora_lr, args.seed,
                                   args.eval)
    acc["lora"] = (exact_match(adapted, task_a, args.eval), exact_match(adapted, task_b,
                                                                          args.eval))
    with lora.disable_adapters(adapted):  # the base is still there, untouched, under the adapter
        a_disabled = exact_match(adapted, task_a, args.eval)
    with tempfile.TemporaryDirectory() as d:
        paths = lora.save_adapter(adapted, d)
        adapter_bytes = os.path.getsize(paths["weights"]) + os.path.getsize(paths["config"])
    lora.merge_and_unload(adapted)
    merged_b = exact_match(adapted, task_b, args.eval)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"LoRA vs full fine-tuning, task A 'add' -> {args.task_b!r} ({args.digits} digits); "
          f"minilora {ml.__version__}, BLAS threads {args.threads} ({threads}), "
          f"numpy {np.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load {load:.1f}")
    print(f"model {base.config}; {args.steps} fine-tuning steps each, batch "
          f"{TrainConfig().batch_size}; full lr {args.full_lr}, LoRA lr {args.lora_lr} "
          f"(r={args.r}, alpha={args.alpha}, q_proj and v_proj); {args.eval} held-out questions")
    print()
    print(f"| model | trainable params | trainable % | {args.task_b} accuracy | add accuracy | "
          "fine-tune time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| task-A base | - | - | {acc['base'][1]:.1%} | {acc['base'][0]:.1%} | - |")
    print(f"| full fine-tuning | {n_full:,d} | {100 * n_full / total:.2f}% | {acc['full'][1]:.1%} "
          f"| {acc['full'][0]:.1%} | {t_full:.0f} |")
    print(f"| LoRA | {n_lora:,d} | {100 * n_lora / total_lora:.2f}% | {acc['lora'][1]:.1%} | "
          f"{acc['lora'][0]:.1%} | {t_lora:.0f} |")
    print()
    print(f"{args.task_b} accuracy during fine-tuning (step: full / LoRA): " + ", ".join(
        f"{a[0]}: {a[1]:.1%} / {b[1]:.1%}" for a, b in zip(curve_full, curve_lora)))
    gap = 100 * (acc["full"][1] - acc["lora"][1])
    print(f"{args.task_b}: LoRA is {gap:+.1f} points behind full fine-tuning "
          f"({'within' if gap <= 2 else 'NOT within'} 2 points); after merge_and_unload the "
          f"merged model scores {merged_b:.1%} (unmerged {acc['lora'][1]:.1%}); adapter files "
          f"{adapter_bytes / 1024:.1f} KiB against {4 * total / 1024:.0f} KiB of float32 weights")
    print(f"with its adapters disabled, the LoRA model answers task A ('add') again: "
          f"{a_disabled:.1%} "
          f"(full fine-tuning keeps {acc['full'][0]:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
