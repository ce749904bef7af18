"""The training loop: batches, AdamW, warmup + cosine schedule, clipping, evaluation, checkpoints.

One step, for a model whose forward returns ``(logits, loss)`` when given targets:

    x, y = data.get_batch(B, rng)                  # (B, T) token ids, y = -100 where not scored
    lr   = warmup_cosine(step, lr_max, warmup, steps, min_lr)
    loss = model(x, y)[1];  loss.backward()       # the batch in `shards` shards, side by side
    norm = grad_norm(params)                       # loss and norm: one transfer to the host
    AdamW step with g * min(grad_clip / norm, 1);  zero the gradients

The forward and backward pass go through ``step.forward_backward``: the batch is cut into
``shards`` row-shards that run on their own threads (one per core) and whose gradients add up to
the whole batch's. The result depends on ``shards``, not on the number of cores; by default it is
two on the CPU (one for a model of GPT-2 small's size) and one on a device
(``step.default_shards``), and a resumed run keeps the number its checkpoint records. With the
fast forms off (``MINILORA_REFERENCE=1``) the same shards run one after another, and the loop
leaves the allocator's settings alone.

On a device a step waits for the device once: the loss, the gradient norm and the flags of the
index checks (:mod:`minilora.fast.checks`) come back in one transfer, and then the checks raise
their errors or the update runs, with clipping folded into AdamW (``grad_scale``).

Only parameters with ``requires_grad`` are optimised, so the same loop fine-tunes a LoRA model
(whose base is frozen). Weight decay applies to matrices (2-D and up) only, never to biases or
LayerNorm gains, as nanoGPT does. A task dataset is evaluated by exact match of greedy answers on
held-out questions, a JSONL prompt/completion dataset by exact match of greedy completions on its
held-out examples, a text dataset by its validation loss.

Resuming from a checkpoint restores the weights, the optimiser's moments, the batch sampler's
generator and minilora's global generator, so the continuation equals the uninterrupted run bit for
bit on the CPU. This module and the CLI are the only ones that print (a tqdm progress bar).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import backend as B
from . import fast
from .checkpoint import HISTORY_FILE, all_finite, load_checkpoint, restore, save_checkpoint
from .data import TaskDataset, TextDataset
from .errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    TrainingDivergedError,
    TrainingInterrupted,
    check_int,
    check_nonnegative,
    is_real,
)
from .fast import checks
from .fast.cpu import available_memory, keep_freed_memory
from .jsonl import JsonlDataset
from .jsonl import exact_match as jsonl_exact_match
from .nn import Module
from .optim import AdamW, clip_coefficient, norm_array, warmup_cosine
from .step import default_micro_batches, default_shards, forward_backward
from .tensor import no_grad
from .tensorfile import read_json

# more optimiser steps than any run here takes (GPT-2 trained for about 800,000)
MAX_STEPS = 10**9


@dataclass
class TrainConfig:
    """Settings of one training run; the defaults train the base task (3-digit addition).

    ``lr`` peaks after ``warmup`` steps and decays along a half cosine to ``min_lr`` at ``steps``.
    Every ``eval_every`` steps (and at the end) the model is evaluated on ``eval_examples``
    held-out questions; every ``checkpoint_every`` steps (0: only at the end) a checkpoint is
    written when the run has an output directory. ``shards``: each batch is cut into this many
    row-shards that run side by side on threads (:mod:`minilora.step`); 1 runs it whole; None
    (the default) takes the number a resumed checkpoint records, else ``step.default_shards``
    of the model (2 on the CPU, 1 from ``step.ONE_SHARD_FROM`` parameters and on a device), and
    :func:`train` records the number it used.
    ``micro_batches``: each shard runs its rows as this many pieces in turn (gradient
    accumulation: less memory, the same sum); None takes a resumed checkpoint's number, else
    ``step.default_micro_batches`` for the first batch's shape (pieces of about 512 tokens on
    the CPU, 1 on a device), recorded like ``shards``.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 150  # 50 stalled one seed in seven on task A (benchmarks/RESULTS.md)
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_examples: int = 1000
    checkpoint_every: int = 0
    seed: int = 0
    shards: int | None = None
    phases: tuple = ()
    micro_batches: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or not all(is_real(b) for b in self.betas):
            raise ConfigError(f"TrainConfig: betas must be two numbers, got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch_size", "eval_every", "eval_examples", "shards",
                     "micro_batches"):
            if name in ("shards", "micro_batches") and getattr(self, name) is None:
                continue  # chosen by train(): the checkpoint's number, or the backend's default
            setattr(self, name, check_int(getattr(self, name), f"TrainConfig: {name}", 1,
                                          ConfigError))
        if self.steps > MAX_STEPS:  # 10**20 from a typo or a forged file would run for ever
            raise ConfigError(f"TrainConfig: steps must be at most MAX_STEPS = {MAX_STEPS:,}, "
                              f"got {self.steps:,}")
        for name in ("warmup", "checkpoint_every", "seed"):
            setattr(self, name, check_int(getattr(self, name), f"TrainConfig: {name}", 0,
                                          ConfigError))
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            check_nonnegative(getattr(self, name), f"TrainConfig: {name}", ConfigError)
        self.phases = _check_phases(self.phases, self.steps)
        if self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig: min_lr={self.min_lr} (where the cosine schedule "
                              f"ends, --min-lr) must not exceed lr={self.lr} (its peak, --lr); "
                              f"lower --min-lr with --lr")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig: betas must be two numbers in [0, 1), got "
                              f"{self.betas}")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return {**dataclasses.asdict(self), "betas": list(self.betas),
                "phases": [list(p) for p in self.phases]}

    @property
    def schedule_steps(self) -> int:
        """Where the first (warmup + cosine) schedule ends: ``steps`` unless extended."""
        return self.phases[0][0] if self.phases else self.steps

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): warmup + cosine over the first schedule,
        then each phase's cosine from its ``lr`` to its ``min_lr``."""
        starts = [p[0] for p in self.phases]
        k = bisect.bisect_right(starts, step) - 1
        if k < 0:
            return warmup_cosine(step, self.lr, self.warmup, self.schedule_steps, self.min_lr)
        start, lr, min_lr = self.phases[k]
        end = starts[k + 1] if k + 1 < len(starts) else self.steps
        return warmup_cosine(step - start, lr, 0, max(1, end - start), min_lr)

    def extended(self, steps: int, lr: float | None = None,
                 min_lr: float | None = None) -> TrainConfig:
        """This run continued to ``steps`` in all: the added steps run at the schedule's final
        rate, or decay from ``lr`` to ``min_lr`` when they are given."""
        if not isinstance(steps, int) or steps <= self.steps:
            raise ConfigError(f"TrainConfig.extended: steps must exceed the run's {self.steps}, "
                              f"got {steps!r}")
        final = self.phases[-1][2] if self.phases else self.min_lr
        new_lr = final if lr is None else lr
        new_min = min(final, new_lr) if min_lr is None else min_lr
        if new_min > new_lr:
            raise ConfigError(f"extending a run: min_lr={new_min} must not exceed lr={new_lr} "
                              f"(give --lr, or a --min-lr below it)")
        return dataclasses.replace(self, steps=steps,
                                   phases=(*self.phases, (self.steps, new_lr, new_min)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict):
            raise ConfigError(f"TrainConfig.from_dict: expected an object, got {d!r:.80}")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"TrainConfig.from_dict: unknown keys {unknown}")
        return cls(**{**_OLD_DEFAULTS, **d})


def _check_phases(phases: Any, steps: int) -> tuple:
    """``phases`` as a tuple of (int start, float lr, float min_lr), starts increasing inside
    (0, steps), 0 <= min_lr <= lr."""
    if not isinstance(phases, (tuple, list)):
        raise ConfigError(f"TrainConfig: phases must be a list of (start, lr, min_lr), got "
                          f"{phases!r:.80}")
    out, last = [], 0
    for p in phases:
        ok = isinstance(p, (tuple, list)) and len(p) == 3 and isinstance(p[0], int) and \
            not isinstance(p[0], bool) and is_real(p[1]) and is_real(p[2])
        if not ok or not last < p[0] < steps or not 0 <= p[2] <= p[1] or \
                not math.isfinite(p[1]):
            raise ConfigError(f"TrainConfig: each phase must be (start, lr, min_lr) with starts "
                              f"increasing inside (0, steps={steps}) and 0 <= min_lr <= lr, got "
                              f"{p!r:.80}")
        out.append((int(p[0]), float(p[1]), float(p[2])))
        last = p[0]
    return tuple(out)


# the fields a resumed run must share with the saved one to continue it exactly (steps and
# phases may grow: an extended run)
_SCHEDULE_FIELDS = ("batch_size", "lr", "warmup", "min_lr", "weight_decay", "betas",
                    "grad_clip", "seed", "shards", "micro_batches")
# what a checkpoint saved before a field existed meant by it
_OLD_DEFAULTS = {"shards": 1, "phases": (), "micro_batches": 1}


def param_groups(model: Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: matrices decay, vectors (biases, gains) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("train: the model has no parameter with requires_grad=True")
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


# ------------------------------------------------------------------------------ evaluation

def greedy_answers(model: Module, prompts: np.ndarray, answer_len: int,
                   batch_size: int = 1000) -> np.ndarray:
    """Greedy continuations of equal-length prompts (N, P) -> answers (N, answer_len), host ints.

    The prompts go through ``model.generate`` with temperature 0 (argmax) in chunks of
    ``batch_size`` rows.
    """
    chunks = []
    P = prompts.shape[1]
    for start in range(0, len(prompts), batch_size):
        out = model.generate(prompts[start:start + batch_size], answer_len, temperature=0.0)
        chunks.append(B.to_numpy(out)[:, P:])  # (b, answer_len)
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, answer_len), np.int64)


def exact_match(model: Module, data: TaskDataset, n: int | None = None,
                batch_size: int = 1000) -> float:
    """Fraction of the first ``n`` held-out questions (all by default) whose greedy answer equals
    the true answer in every character."""
    prompts, answers = data.heldout(n)
    predicted = greedy_answers(model, prompts, answers.shape[1], batch_size)
    return float((predicted == answers).all(axis=1).mean())


def validation_loss(model: Module, data: TextDataset | TaskDataset | JsonlDataset, batch_size: int,
                    batches: int = 8, seed: int = 0) -> float:
    """Mean loss on ``batches`` fixed validation batches (their own generator: the training
    sampler is not disturbed)."""
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with no_grad():
            for _ in range(batches):
                x, y = data.get_batch(batch_size, rng, split="val")
                total += float(model(x, y)[1].item())
    finally:
        model.train(was_training)
    return total / batches


def evaluate(model: Module, data: TaskDataset | TextDataset | JsonlDataset,
             config: TrainConfig) -> dict:
    """``{"accuracy": exact match}`` on a task's held-out questions or a JSONL dataset's held-out
    examples (at most ``config.eval_examples``); ``{"val_loss": ...}`` on a text dataset."""
    if isinstance(data, TaskDataset):
        return {"accuracy": exact_match(model, data, min(config.eval_examples, data.n_heldout))}
    if isinstance(data, JsonlDataset):
        return {"accuracy": jsonl_exact_match(model, data,
                                              min(config.eval_examples, data.n_heldout))}
    return {"val_loss": validation_loss(model, data, config.batch_size)}


def data_description(data: TaskDataset | TextDataset | JsonlDataset) -> dict:
    """What a checkpoint records about the data (the CLI rebuilds the task, or finds and checks
    the file, from it)."""
    if isinstance(data, TaskDataset):
        return {"task": data.task.to_dict(), "n_heldout": data.n_heldout,
                "split_seed": data.split_seed}
    if isinstance(data, JsonlDataset):
        return {"jsonl": {"path": data.path, "sha256": data.sha256, "block_size": data.block_size,
                          "n_heldout": data.n_heldout, "split_seed": data.split_seed}}
    return {"text": {"block_size": data.block_size, "path": getattr(data, "path", None),
                     "sha256": getattr(data, "sha256", None)}}


# ---------------------------------------------------------------------------------- train

def _check_resumable(saved: dict | None, config: TrainConfig, where: Path) -> None:
    if saved is None:
        raise CheckpointError(f"checkpoint at {str(where)!r} has no train_config to resume")
    now = config.to_dict()
    saved = {**_OLD_DEFAULTS, **saved}
    for name in ("shards", "micro_batches"):
        if now[name] is None:  # not chosen: the run goes on with the pieces it was cut into
            now[name] = saved[name]
    diff = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in _SCHEDULE_FIELDS
            if saved.get(k) != now[k]]
    old_phases = [list(p) for p in saved["phases"]]
    if now["phases"] == old_phases:
        if saved.get("steps") != now["steps"]:
            diff.append(f"steps: saved {saved.get('steps')!r}, now {now['steps']!r}")
    elif now["phases"][:len(old_phases)] != old_phases or \
            now["phases"][len(old_phases)][0] != saved.get("steps"):
        diff.append(f"phases: saved {old_phases}, now {now['phases']} (an extended run adds one "
                    f"phase starting at the saved steps={saved.get('steps')})")
    if diff:
        raise ConfigError(f"train: cannot resume from {str(where)!r} with a different "
                          f"configuration ({'; '.join(diff)})")


# the signals a run is asked to stop by: Ctrl-C, and the polite stop that timeout, docker stop,
# Slurm and systemd send before they kill (SIGTERM), or a closed terminal (SIGHUP)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


@contextmanager
def _deferred_interrupt() -> Iterator[dict]:
    """Turn the first stop signal (Ctrl-C's SIGINT, a SIGTERM or SIGHUP) into a flag the loop
    reads between steps, so a step is never cut in half (weights updated for some parameters,
    not others) and the run is saved as after Ctrl-C; a second one interrupts at once. Outside
    the main thread signals cannot be caught, and nothing changes."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


# What a batch holds per token through its step, whatever the model: its inputs x and targets y,
# int64 (building them peaks at 21-23 bytes a token, benchmarks/RESULTS.md). A batch whose arrays
# alone exceed the memory there is refused before it is drawn, instead of swapping for minutes.
BATCH_BYTES_PER_TOKEN = 16


def check_batch_fits(batch_size: int, row_tokens: int, available: int | None) -> None:
    """Refuse (ConfigError) a batch of ``batch_size`` rows of ``row_tokens`` tokens whose token
    arrays alone (``BATCH_BYTES_PER_TOKEN`` a token) need more than ``available`` bytes; None
    (the machine's memory unknown) checks nothing."""
    need = batch_size * row_tokens * BATCH_BYTES_PER_TOKEN
    if available is not None and need > available:
        raise ConfigError(f"train: a batch of batch_size={batch_size:,} rows x {row_tokens} "
                          f"tokens needs at least {need / 2**30:,.1f} GiB for its inputs and "
                          f"targets alone, more than the {available / 2**30:,.1f} GiB of memory "
                          f"available; use a smaller batch size (--batch-size)")


def train(model: Module, data: TaskDataset | TextDataset | JsonlDataset,
          config: TrainConfig | None = None, *,
          out_dir: str | Path | None = None, resume: str | Path | None = None,
          until: int | None = None, progress: bool = True, tokenizer: Any = None,
          model_config: Any = None, extra: dict | None = None,
          callback: Callable[[int, dict], None] | None = None,
          save_on_interrupt: bool = True, checkpoint_weights: str = "all",
          checkpoint_files: Callable[[], dict[str, bytes]] | None = None) -> dict:
    """Train ``model`` on ``data`` for ``config.steps`` AdamW steps; returns the history.

    The history is ``{"step": [...], "loss": [...], "lr": [...], "grad_norm": [...],
    "eval": [{"step": s, "accuracy" or "val_loss": v}, ...], "seconds": wall time,
    "start_step": s0}``; ``step`` counts completed steps (1-based).

    ``out_dir``: write a checkpoint there every ``config.checkpoint_every`` steps and at the end
    (with ``history.json`` inside), each save whole or not at all. ``resume``: a checkpoint
    directory to continue from (same schedule fields in ``config``, or the same run extended:
    :meth:`TrainConfig.extended`). ``until``: stop after this many completed steps, as if
    interrupted (the schedule still spans ``config.steps``). ``callback(step, record)`` runs after
    each step. ``tokenizer``, ``model_config`` and ``extra`` go into the checkpoint (default: the
    data's tokenizer, ``model.config`` and a description of the data).

    Every step checks the loss and the global gradient norm (computed even when clipping is off):
    a NaN or inf stops training with :class:`TrainingDivergedError` naming the step and the value,
    before the update, and nothing is saved over the last good checkpoint. Ctrl-C stops after the
    step in progress; with ``out_dir`` and ``save_on_interrupt`` a resumable checkpoint of the
    completed steps is written there first; then :class:`TrainingInterrupted` (a
    KeyboardInterrupt) is raised, carrying ``step`` and ``checkpoint``.

    ``checkpoint_weights="trainable"`` saves only the trained parameters (a LoRA fine-tune, whose
    base is elsewhere); ``checkpoint_files()`` gives more files for every save (its adapter files).
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, (TaskDataset, TextDataset, JsonlDataset)):
        raise InvalidArgumentError(f"train: data must be a JsonlDataset, a TaskDataset or a "
                                   f"TextDataset, got {type(data).__name__}")
    stop = config.steps if until is None else int(until)
    if not 0 <= stop <= config.steps:
        raise InvalidArgumentError(f"train: until must lie in [0, steps={config.steps}], got "
                                   f"{until!r}")
    # every dataset's batch rows hold block_size tokens (x and y alike)
    check_batch_fits(config.batch_size, data.block_size, available_memory())
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                      betas=config.betas, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    start = 0
    if resume is not None:
        ckpt = load_checkpoint(resume)
        _check_resumable(ckpt.train_config, config, Path(resume))
        saved = {**_OLD_DEFAULTS, **ckpt.train_config}
        for name in ("shards", "micro_batches"):  # as the run was cut, on whatever backend
            if getattr(config, name) is None:
                config = dataclasses.replace(config, **{name: saved[name]})
        start = restore(ckpt, model, optimizer, data_rng=rng)
        if start > stop:
            raise InvalidArgumentError(f"train: the checkpoint at {str(resume)!r} is at step "
                                       f"{start}, beyond the requested stop at {stop}")
    if config.shards is None:
        config = dataclasses.replace(config, shards=default_shards(model))
    if not all_finite(model):
        raise TrainingDivergedError("train: the model's weights hold NaN or inf before the first "
                                    "step; training them would only spread it")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokenizer = tokenizer if tokenizer is not None else data.tokenizer
    model_config = model_config if model_config is not None else getattr(model, "config", None)
    extra = {**data_description(data), **(extra or {})}
    history: dict = {"start_step": start, "step": [], "loss": [], "lr": [], "grad_norm": [],
                     "eval": [], "seconds": 0.0}

    earlier = _earlier_history(resume, start)

    def save(done: int) -> None:
        whole = {k: earlier[k] + history[k] for k in ("step", "loss", "lr", "grad_norm", "eval")}
        whole["seconds"] = earlier["seconds"] + history["seconds"]
        text = json.dumps({"start_step": 0, **whole}, indent=2, sort_keys=True) + "\n"
        save_checkpoint(out_dir, model, model_config=model_config, tokenizer=tokenizer,
                        optimizer=optimizer, step=done, train_config=config.to_dict(), data_rng=rng,
                        extra=extra, weights=checkpoint_weights,
                        files={HISTORY_FILE: text.encode(),
                               **(checkpoint_files() if checkpoint_files else {})})

    bar = _progress_bar(config.steps, start, stop, progress)
    t0 = time.perf_counter()
    tokens = 0
    model.train()
    if fast.enabled() and not B.on_device():  # an allocator setting: a fast form
        keep_freed_memory()  # every step frees and makes the same arrays: reuse, don't re-fault
    done = start
    try:
        with _deferred_interrupt() as interrupted, warnings.catch_warnings():
            # NumPy's overflow warnings (from every shard's thread) would bury the one line that
            # says which step diverged; the loss and gradient norm are checked each step instead
            warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) "
                                    r"encountered", RuntimeWarning)
            for step in range(start, stop):
                if interrupted["set"]:
                    break
                lr = config.lr_at(step)
                optimizer.set_lr(lr)
                x, y = data.get_batch(config.batch_size, rng)
                if config.micro_batches is None:  # chosen once, by the first batch's shape
                    config = dataclasses.replace(config, micro_batches=default_micro_batches(
                        x.shape[0], x.shape[1] if x.ndim > 1 else 1, config.shards))
                loss, norm = _loss_and_norm(model, x, y, config.shards, params, optimizer,
                                            config.micro_batches)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    optimizer.zero_grad()
                    raise TrainingDivergedError(_diverged(step + 1, loss, norm, lr, config,
                                                          out_dir))
                scale = clip_coefficient(norm, config.grad_clip) if config.grad_clip > 0 else 1.0
                optimizer.step(grad_scale=scale)  # clipping folded into the update
                optimizer.zero_grad()
                done = step + 1
                record = {"loss": loss, "lr": lr, "grad_norm": norm}
                for key, value in (("step", done), *record.items()):
                    history[key].append(value)
                if done % config.eval_every == 0 or done == config.steps:
                    result = {"step": done, **evaluate(model, data, config)}
                    history["eval"].append(result)
                    record.update(result)
                    if bar is not None:
                        bar.write(format_eval(result))
                if bar is not None:
                    tokens += x.size  # positions run forward and backward this step
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"loss {record['loss']:.4f} lr {lr:.2e} "
                                        f"{rate:,.0f} tok/s", refresh=False)
                    bar.update(1)
                history["seconds"] = time.perf_counter() - t0
                if callback is not None:
                    callback(done, record)
                if out_dir is not None and config.checkpoint_every and \
                        done % config.checkpoint_every == 0 and done != stop:
                    save(done)
    finally:
        if bar is not None:
            bar.close()
    history["seconds"] = time.perf_counter() - t0
    if interrupted["set"] and done < stop:
        saved = None
        if out_dir is not None and save_on_interrupt:
            with _deferred_interrupt():  # another Ctrl-C must not cut the save short
                save(done)
            saved = str(out_dir)
        raise TrainingInterrupted(done, saved, history)
    if out_dir is not None:
        # a stop signal now would throw the whole run away with the save half made: the save
        # goes first (a second signal still stops at once, and the last save stays whole)
        with _deferred_interrupt() as late:
            save(stop)
        if late["set"]:
            warnings.warn(f"a stop signal came during the final save; the run had finished and "
                          f"is saved in {str(out_dir)!r}", stacklevel=2)
    return history


def _loss_and_norm(model: Module, x: Any, y: Any, shards: int, params: list,
                   optimizer: AdamW, micro_batches: int = 1) -> tuple[float, float]:
    """One step's forward and backward pass; its loss and global gradient norm as floats, read
    with the flags of the step's index checks in one device-to-host transfer. A failed check
    raises its error then, with the gradients it left behind zeroed: no update is applied."""
    with checks.deferred() as pending:
        try:
            loss = forward_backward(model, x, y, shards, micro_batches=micro_batches,
                                    sync=False)
            loss, norm = pending.settle(loss, norm_array(params))
        except BaseException:
            optimizer.zero_grad()
            raise
    return loss, norm


def _diverged(step: int, loss: float, norm: float, lr: float, config: TrainConfig,
              out_dir: str | Path | None) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4g})"
    kept = ""
    if out_dir is not None and (Path(out_dir) / "checkpoint.json").is_file():
        kept = f"; the last good checkpoint in {str(out_dir)!r} is kept"
    clip = (f", or a tighter clip (grad_clip is {config.grad_clip:g})" if config.grad_clip > 0
            else ", or clipping the gradient (grad_clip is off)")
    return (f"training diverged at step {step}: {what}; this step's update was not applied and "
            f"nothing was saved{kept}. Try a lower learning rate (this step's lr={lr:g}){clip}")


def _earlier_history(resume: str | Path | None, start: int) -> dict:
    """The history of the steps before ``start`` from a resumed run's history.json, so that the
    file written at the end covers the whole run (empty when there is none)."""
    empty = {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval": [], "seconds": 0.0}
    path = Path(resume) / HISTORY_FILE if resume is not None else None
    if path is None or not path.is_file():
        return empty
    try:  # read_json: at most MAX_JSON_BYTES, nesting that would overflow the stack refused
        saved = read_json(path, "resume: history")
        keep = [i for i, s in enumerate(saved["step"]) if s <= start]
        out = {k: [saved[k][i] for i in keep] for k in ("step", "loss", "lr", "grad_norm")}
        out["eval"] = [e for e in saved["eval"] if e["step"] <= start]
        out["seconds"] = float(saved.get("seconds", 0.0))
        return out
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, IndexError,
            AttributeError) as exc:
        # a damaged history only costs the plot of the earlier steps: say so, and go on
        warnings.warn(f"{str(path)!r} could not be read ({str(exc).splitlines()[0][:200]}); the "
                      f"run goes on, its history starting at step {start}", stacklevel=2)
        return empty


def format_eval(result: dict) -> str:
    """One line for an evaluation record: its step and accuracy or validation loss."""
    parts = [f"step {result['step']}"]
    if "accuracy" in result:
        parts.append(f"held-out exact match {result['accuracy']:.1%}")
    if "val_loss" in result:
        parts.append(f"val loss {result['val_loss']:.4f}")
    return "  ".join(parts)


def _progress_bar(total: int, start: int, stop: int, enabled: bool) -> Any:
    if not enabled or stop <= start:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["TrainConfig", "train", "param_groups", "evaluate", "exact_match", "greedy_answers",
           "validation_loss", "data_description", "format_eval", "HISTORY_FILE",
           "check_batch_fits", "BATCH_BYTES_PER_TOKEN"]
