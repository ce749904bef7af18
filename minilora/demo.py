"""``minilora demo``: the whole LoRA story, end to end, on the CPU or a GPU.

1. Pretrain a small GPT on task A (addition), or reuse the base checkpoint a previous run left.
2. Fine-tune copies of it on task B (the sum with its carries dropped) three ways: full fine-tuning,
   LoRA (r=8 on q_proj and v_proj) and QLoRA (the same adapters on an NF4 + double-quantized base).
3. Merge the LoRA adapter into the weights and check that merged and unmerged models give the same
   answer to every held-out question.
4. Train a second adapter for task C (the larger digit in each place) on the same base and switch
   between the two adapters.
5. Write ``report/report.md`` with plots (see :mod:`minilora.demo_report`) and print a summary
   table.

The numbers it prints are measured in the run: accuracy is exact match on held-out questions; peak
memory is the model's resident arrays plus the peak of what two training steps with a fresh
optimizer allocate on top (gradients, optimizer state, activations), seen by tracemalloc on the
CPU and by the device memory pool on a GPU (``backend.memory_stats``: tracemalloc cannot see
device memory), and the demo says which; step time is the median of timed steps; adapter size is
the size of the files ``save_adapter`` writes. The run also measures what explains them (the
share of questions on which two tasks give the same answer, the time one dequantization of the
4-bit base takes, the spread of repeated measurements), and :mod:`minilora.demo_report` says in
words what each number means.

The operands have 2 digits where the CLI's default is 3 (``data.DEFAULT_DIGITS``): with 2 the
whole demo runs in a few minutes on a laptop's CPU; 3 digits need several times the steps
for the same accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import backend as B
from . import lora, quant
from .checkpoint import MODEL_FILE, load_model
from .data import DEFAULT_DIGITS, TASK_VOCAB, TaskDataset, get_task
from .errors import CheckpointError
from .gpt import GPT, GPTConfig
from .optim import AdamW
from .step import default_shards, forward_backward
from .tensorfile import read_json
from .train import HISTORY_FILE, TrainConfig, exact_match, greedy_answers, param_groups, train


@dataclass
class DemoSettings:
    """Sizes of the demo; ``quick()`` shrinks them to a smoke run."""

    digits: int = 2
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    base_steps: int = 1200
    base_lr: float = 3e-3
    finetune_steps: int = 400
    full_lr: float = 1e-3
    lora_lr: float = 1e-2
    r: int = 8
    alpha: float = 16.0
    batch_size: int = 64
    eval_examples: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke run: the same pipeline with tiny step counts (accuracies are low)."""
        return cls(n_embd=64, base_steps=150, finetune_steps=40, eval_examples=200,
                   batch_size=32)


METHODS = ("full", "lora", "qlora")
TASK_A, TASK_B, TASK_C = "add", "nocarry", "digitmax"  # see minilora.data.TASKS


def _gpt_config(s: DemoSettings) -> GPTConfig:
    block = max(get_task(t, s.digits).seq_len for t in (TASK_A, TASK_B, TASK_C)) - 1
    return GPTConfig(vocab_size=len(TASK_VOCAB), block_size=block, n_layer=s.n_layer,
                     n_head=s.n_head, n_embd=s.n_embd)


def _train_config(s: DemoSettings, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=s.batch_size, lr=lr, warmup=max(1, steps // 20),
                       min_lr=lr / 10, eval_every=steps, eval_examples=s.eval_examples,
                       seed=s.seed)


def _copy_of(model: GPT) -> GPT:
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def measure_step(model: Any, data: TaskDataset, batch_size: int, timed: int = 5,
                 shards: int | None = TrainConfig.shards, repeats: int = 3) -> dict:
    """Seconds of a training step (the training loop's: the batch in ``shards`` shards), its peak
    memory in bytes, and what measured that memory.

    ``step_seconds`` is the median of ``timed`` steps, ``step_seconds_all`` all of them (their
    spread shows how noisy one step's time is). Peak memory = resident arrays of the model
    (``held_bytes``) + the peak of what two steps with a fresh AdamW allocate on top (gradients,
    optimizer state, activations). On the CPU tracemalloc sees every allocation, temporaries
    included (``memory_source`` "tracemalloc"); on a device, the memory pool's bytes in use
    (``backend.memory_stats``) are read after each forward pass, backward pass and optimizer step,
    so a temporary that lives only inside one of them is not seen (``memory_source`` "device
    pool"). Bytes are counted exactly, but which arrays are alive at the same moment depends on
    how the shards' threads interleave, so the peak is measured ``repeats`` times:
    ``peak_bytes`` is the largest, ``peak_bytes_all`` all of them (their spread is the resolution
    of the memory column).
    """
    rng = np.random.default_rng(0)
    shards = default_shards(model) if shards is None else shards

    def steps(n: int, opt: AdamW) -> list[float]:
        times = []
        for _ in range(n):
            x, y = data.get_batch(batch_size, rng)
            t0 = time.perf_counter()
            forward_backward(model, x, y, shards)
            opt.step()
            opt.zero_grad()
            B.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def on_top() -> int:  # the peak two fresh steps allocate above what the model holds
        if B.on_device():
            return _device_peak(model, data, batch_size, rng)
        tracemalloc.start()
        try:
            steps(2, AdamW(param_groups(model, 0.0), lr=0.0))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    model.train()
    times = steps(timed + 1, AdamW(param_groups(model, 0.0), lr=0.0))[1:]  # lr 0: no change
    held = quant.memory_report(model)["held_bytes"]  # every array the model holds, 4-bit ones too
    peaks = [held + on_top() for _ in range(repeats)]
    return {"step_seconds": float(np.median(times)), "step_seconds_all": times,
            "peak_bytes": max(peaks), "peak_bytes_all": peaks, "held_bytes": held,
            "shards": shards,
            "memory_source": "device pool" if B.on_device() else "tracemalloc"}


def dequantize_seconds(model: Any, repeats: int = 5) -> float:
    """Median seconds to dequantize every 4-bit weight of ``model`` once: the work QLoRA adds to a
    LoRA step, twice per shard (in the forward pass, and again in the backward pass for the input
    gradient: :class:`~minilora.quant.QuantLinear` keeps no float copy)."""
    states = [m.quant_state for m in model.modules() if isinstance(m, quant.QuantLinear)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for state in states:
            quant.dequantize(state)
        B.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _device_peak(model: Any, data: TaskDataset, batch_size: int, rng: np.random.Generator) -> int:
    """The most device bytes two training steps with a fresh AdamW hold on top of what was held
    before them: ``max_t used(t) - used(0)``, ``used`` the pool's bytes in use read after each
    forward pass, backward pass and optimizer step (one shard: a device runs the batch whole)."""
    def used() -> int:
        return int(B.memory_stats()["used_bytes"])

    opt = AdamW(param_groups(model, 0.0), lr=0.0)
    start, most = used(), 0
    for _ in range(2):
        x, y = data.get_batch(batch_size, rng)
        loss = model(B.asarray(x), B.asarray(y))[1]  # the logits are not kept
        most = max(most, used())  # the activations, all alive until the backward pass
        loss.backward()
        most = max(most, used())
        del loss
        opt.step()
        most = max(most, used())  # the optimizer's moments
        opt.zero_grad()
    del opt
    return max(0, most - start)


def _answers(model: Any, data: TaskDataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    prompts, answers = data.heldout(n)
    return greedy_answers(model, prompts, answers.shape[1]), answers


def _dir_bytes(paths: dict) -> int:
    return sum(os.path.getsize(p) for p in paths.values())


def _base_model(s: DemoSettings, out: Path, progress: bool, log: Callable[[str], None]) -> tuple:
    """Train the task-A base, or load it from ``out/base`` when it was made with these settings."""
    base_dir = out / "base"
    wanted = {"demo_settings": {k: v for k, v in dataclasses.asdict(s).items()
                                if k in ("digits", "n_layer", "n_head", "n_embd", "base_steps",
                                         "base_lr", "batch_size", "seed")}}
    try:
        model, ckpt = load_model(base_dir)
        if ckpt.extra.get("demo_settings") == wanted["demo_settings"] and \
                ckpt.step == s.base_steps:  # a base whose training was cut short is retrained
            log(f"[1/5] reusing the task-A base checkpoint in {str(base_dir)!r} "
                f"(delete it to retrain)")
            history_file = base_dir / HISTORY_FILE
            try:  # the plot's data only: a damaged or oversized file is no reason to retrain
                history = read_json(history_file, "demo") if history_file.is_file() else None
            except CheckpointError:
                history = None
            return model, history
    except CheckpointError:
        pass
    config = _gpt_config(s)
    B.manual_seed(s.seed)
    model = GPT(config)
    log(f"[1/5] pretraining a {model.num_parameters():,}-parameter GPT on task A ({TASK_A}, "
        f"{s.digits}-digit addition), {s.base_steps} steps")
    if s.digits < DEFAULT_DIGITS:
        log(f"      ({s.digits} digits where the CLI's default is {DEFAULT_DIGITS}: so that the "
            f"whole demo runs in minutes on a CPU; {DEFAULT_DIGITS} digits need several times "
            f"the steps)")
    data = TaskDataset(get_task(TASK_A, s.digits))
    history = train(model, data, _train_config(s, s.base_steps, s.base_lr), out_dir=base_dir,
                    progress=progress, extra=wanted, save_on_interrupt=False)
    model.eval()
    return model, history


def same_answer_share(a: TaskDataset, b: TaskDataset, n: int) -> float:
    """The share of the first ``n`` held-out questions on which tasks ``a`` and ``b`` want the
    same answer (every task holds out the same operand pairs, in the same order). For task A and
    task B it is the share of sums in which no place carries: there a perfect adder is right on
    task B, and a model that writes carry-less sums is right on task A (0.55^k of all k-digit
    pairs: in 55 of the 100 digit pairs the digits sum to 9 or less)."""
    _, answers_a = a.heldout(n)
    _, answers_b = b.heldout(n)
    return float((answers_a == answers_b).all(axis=1).mean())


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, progress: bool = True,
             settings: DemoSettings | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole demo, write ``report/report.md`` and plots into ``out_dir``; returns the
    results."""
    from .demo_report import write_report

    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base, base_history = _base_model(s, out, progress, log)
    data = {name: TaskDataset(get_task(name, s.digits)) for name in (TASK_A, TASK_B, TASK_C)}
    n_eval = s.eval_examples
    results: dict[str, Any] = {"settings": dataclasses.asdict(s), "methods": {},
                               "tasks": {"A": TASK_A, "B": TASK_B, "C": TASK_C},
                               "quick": s == DemoSettings.quick(),
                               "default_digits": DEFAULT_DIGITS, "base_history": base_history}
    results["base"] = {name: exact_match(base, d, n_eval) for name, d in data.items()}
    # on how many questions two tasks want the same answer: what explains the task-A column
    # after fine-tuning and the off-diagonal cells of the adapter-switching plot
    results["same_answer"] = {f"{x}/{y}": same_answer_share(data[x], data[y], n_eval)
                              for x, y in ((TASK_A, TASK_B), (TASK_A, TASK_C), (TASK_B, TASK_C))}
    no_carry = results["same_answer"][f"{TASK_A}/{TASK_B}"]
    log(f"      base model: task A {results['base'][TASK_A]:.1%}, task B "
        f"{results['base'][TASK_B]:.1%} before fine-tuning (a model that adds is right on "
        f"task B where no place carries: {no_carry:.1%} of these questions)")

    lora_config = lora.LoraConfig(r=s.r, alpha=s.alpha, target_modules=("q_proj", "v_proj"))
    models = {}
    for method in METHODS:
        model = _copy_of(base)
        if method == "qlora":
            quant.quantize_model(model, blocksize=64, quant_type="nf4", double_quant=True)
        if method != "full":
            lora.inject_lora(model, lora_config, adapter_name=TASK_B)
        trainable, total = lora.count_parameters(model)
        lr = s.full_lr if method == "full" else s.lora_lr
        log(f"[2/5] task B ({TASK_B}) with {method}: {trainable:,} of {total:,} parameters "
            f"trainable ({trainable / total:.2%}), {s.finetune_steps} steps")
        B.manual_seed(s.seed + 1)
        history = train(model, data[TASK_B], _train_config(s, s.finetune_steps, lr),
                        progress=progress)
        cost = measure_step(model, data[TASK_B], s.batch_size)
        if method == "qlora":
            cost["dequantize_seconds"] = dequantize_seconds(model)
        model.eval()
        results["methods"][method] = {
            "trainable": trainable, "total": total, "history": history,
            "accuracy": exact_match(model, data[TASK_B], n_eval),
            "task_a_accuracy": exact_match(model, data[TASK_A], n_eval), **cost}
        models[method] = model

    log("[3/5] merging the LoRA adapter into the weights")
    model = models["lora"]
    unmerged, answers = _answers(model, data[TASK_B], n_eval)
    lora.merge(model)
    merged, _ = _answers(model, data[TASK_B], n_eval)
    lora.unmerge(model)
    results["merge"] = {"examples": int(len(answers)),
                        "identical": int((merged == unmerged).all(axis=1).sum()),
                        "accuracy_merged": float((merged == answers).all(axis=1).mean())}

    log(f"[4/5] a second adapter for task C ({TASK_C}) on the same base, then switching")
    lora.inject_lora(model, lora_config, adapter_name=TASK_C)
    lora.set_adapter(model, TASK_C)
    B.manual_seed(s.seed + 2)
    task_c_config = _train_config(s, s.finetune_steps, s.lora_lr)
    results["task_c_history"] = train(model, data[TASK_C], task_c_config, progress=progress)
    model.eval()
    switching = {}

    def on_every_task() -> dict:
        return {t: exact_match(model, d, n_eval) for t, d in data.items()}
    for adapter in (TASK_B, TASK_C):
        lora.set_adapter(model, adapter)
        switching[adapter] = on_every_task()
    with lora.disable_adapters(model):
        switching["none (base)"] = on_every_task()
    results["switching"] = switching

    log("[5/5] saving adapters and writing the report")
    sizes = {}
    for label, owner, name in (("lora", models["lora"], TASK_B), ("lora-c", models["lora"], TASK_C),
                               ("qlora", models["qlora"], TASK_B)):
        folder = out / "adapters" / f"{label}-{name}"
        sizes[label] = _dir_bytes(lora.save_adapter(owner, str(folder), name))
    results["adapter_bytes"] = sizes
    results["base_checkpoint_bytes"] = os.path.getsize(out / "base" / MODEL_FILE)
    results["full_bytes"] = sum(int(p.data.nbytes) for p in models["full"].parameters())
    results["seconds"] = time.perf_counter() - t_start
    write_report(results, base, out)
    return results
