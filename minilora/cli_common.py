"""What the command line's sub-commands share: argument types, the backend and BLAS set-up, the
training flags, the training loop run with its progress and Ctrl-C message, and the summary line.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from typing import Any, Callable

from . import backend as B
from . import fast
from .data import TASKS, TaskDataset, get_task
from .errors import BackendError, ConfigError, InvalidArgumentError, TrainingInterrupted
from .fast import cpu
from .step import ONE_SHARD_FROM
from .train import MAX_STEPS, TrainConfig, format_eval, train

# the default model for the tasks: small enough to learn 3-digit addition in about a minute
MODEL_DEFAULTS = {"n_layer": 3, "n_head": 4, "n_embd": 128, "dropout": 0.0}
TRAIN_FIELDS = ("steps", "batch_size", "lr", "warmup", "min_lr", "weight_decay", "grad_clip",
                "eval_every", "eval_examples", "checkpoint_every", "seed", "shards",
                "micro_batches")
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "dropout", "block_size")


def setup(args: argparse.Namespace) -> None:
    """Select the backend and, with the fast forms on, the BLAS thread count for a command.

    Setting the BLAS thread count is a fast form: with the fast forms off (``MINILORA_REFERENCE=1``)
    OpenBLAS keeps the count it started with (``--threads`` is still checked).
    """
    try:
        B.use_backend(args.backend)
    except BackendError as exc:
        if args.backend != environment_backend() or "MINILORA_BACKEND" not in os.environ:
            raise
        # the environment chose it: say so, and how a command-line user gets past it
        raise BackendError(f"{exc} (MINILORA_BACKEND={os.environ['MINILORA_BACKEND']!r} chose "
                           f"it: unset it, or pass --backend numpy)") from exc
    threads = args.threads
    if threads is not None and threads < 1:  # the parser refuses it; setup may be called alone
        raise InvalidArgumentError(f"--threads must be at least 1, got {threads}")
    if threads is None and not any(v in os.environ for v in ("OPENBLAS_NUM_THREADS",
                                                             "OMP_NUM_THREADS")):
        threads = 1
    if threads is not None and fast.enabled():
        cpu.set_blas_threads(threads)


def task_dataset(extra: dict, task_name: str | None = None) -> TaskDataset:
    """The task (and held-out split) a checkpoint was trained on, or ``task_name`` instead."""
    saved = extra.get("task")
    if task_name is None and saved is None:
        raise ConfigError("this checkpoint was not trained on a task; name one with --task "
                          f"({', '.join(TASKS)})")
    digits = saved["digits"] if saved else None
    task = get_task(task_name or saved["name"], digits)
    return TaskDataset(task, n_heldout=extra.get("n_heldout", 1000),
                       split_seed=extra.get("split_seed", 1234))


def run_training(args: argparse.Namespace, model: Any, data: Any, cfg: TrainConfig, out: str,
                 resume: str | None = None, **options: Any) -> dict:
    """The training loop with the CLI's progress, printing and Ctrl-C handling; ``options`` go on
    to :func:`minilora.train.train`."""
    try:
        return train(model, data, cfg, out_dir=out, resume=resume, until=args.until,
                     progress=not args.no_progress, callback=eval_printer(args),
                     save_on_interrupt=not args.no_save_on_interrupt, **options)
    except TrainingInterrupted as stop:
        if stop.checkpoint is not None:
            print(f"interrupted after step {stop.step} of {cfg.steps}; checkpoint saved in "
                  f"{stop.checkpoint}. Resume with:\n  minilora {args.command} --resume "
                  f"{stop.checkpoint}", file=sys.stderr, flush=True)
        else:
            print(f"interrupted after step {stop.step} of {cfg.steps}; nothing saved "
                  f"(--no-save-on-interrupt)", file=sys.stderr, flush=True)
        stop.reported = True
        raise


def eval_printer(args: argparse.Namespace) -> Callable[[int, dict], None] | None:
    """Without a progress bar (which shows them itself), print each evaluation as a line."""
    if not args.no_progress:
        return None

    def show(step: int, record: dict) -> None:
        if "accuracy" in record or "val_loss" in record:
            print(format_eval(record), flush=True)
    return show


def report(history: dict, data: Any, cfg: TrainConfig, out: str | None) -> None:
    """Print the one-line summary of a finished run."""
    steps = history["step"][-1] if history["step"] else history["start_step"]
    final = history["eval"][-1] if history["eval"] else {}
    line = f"done: {steps} steps in {history['seconds']:.1f} s"
    if "accuracy" in final:
        n = min(data.n_heldout, cfg.eval_examples)
        line += (f"; held-out exact match {final['accuracy']:.1%} ({n} questions, at step "
                 f"{final['step']})")
    if "val_loss" in final:
        line += f"; validation loss {final['val_loss']:.4f} (at step {final['step']})"
    if out:
        line += f"; checkpoint in {out}"
    print(line, flush=True)


# ------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def count(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


# more BLAS threads than any machine has cores; a count above it is a typo (or 10**20)
MAX_THREADS = 4096


def positive_int_to(high: int) -> Callable[[str], int]:
    """argparse type: an integer in [1, high] (a count so large that the command would run for
    ever is refused, not started)."""
    def parse(text: str) -> int:
        value = _int_at_least(text, 1)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {value:,}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def path_arg(text: str) -> str:
    """argparse type: a file or directory path, any text but the empty one (an empty ``--out``
    would otherwise mean the default, and an empty input path names nothing)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def name_arg(text: str) -> str:
    """argparse type: a name (a task's, an adapter's), any text but the empty one, which would
    otherwise stand for the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a name, got {text!r}")
    return text


def text_arg(text: str) -> str:
    """argparse type: text that is valid UTF-8 (bytes on the command line that are not UTF-8
    reach Python as lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 text: {what} at character "
                                         f"{exc.start}") from None
    return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _is_number(text: str) -> bool:
    """True for what ``float`` reads: -1, -1e-3, -.5, -inf, -nan."""
    try:
        float(text)
    except ValueError:
        return False
    return True


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``minilora train: error: ... (see --help)``,
    that reads a negative number after an option as its value (``--lr -1e-3``), and that takes
    no abbreviations: ``train --r 4`` was ``--resume 4`` (``--r`` is finetune's LoRA rank), and a
    script's ``--ste`` would change meaning the day another flag starting so is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def subcommand(self, name: str) -> Parser:
        """The parser of sub-command ``name`` (this one when it has none of that name)."""
        return self._subcommands().get(name, self)

    def _subcommands(self) -> dict[str, Parser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def flags_elsewhere(self, name: str) -> dict[str, list[str]]:
        """``{flag: the other sub-commands that take it}`` for the flags ``name`` lacks."""
        commands = self._subcommands()
        own = set(commands[name]._option_string_actions) if name in commands else set()
        found: dict[str, list[str]] = {}
        for other, parser in commands.items():
            for flag in parser._option_string_actions:
                if other != name and flag not in own and other not in found.get(flag, []):
                    found.setdefault(flag, []).append(other)
        return found

    def unrecognized(self, extra: list[str], elsewhere: dict[str, list[str]] | None = None) -> Any:
        """The one-line error for arguments this (sub)command does not take: for each flag that
        another command takes (``elsewhere``: flag -> those commands), which ones; else the nearest
        flag this one takes (``--taks``: did you mean --task?), for names of 3 letters or more
        (``--r`` is not a short ``--lr``)."""
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = []
        for token in extra:
            flag = token.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            if (elsewhere or {}).get(flag):
                hints.append(f"{flag} is a flag of {' and '.join(elsewhere[flag])}")
            elif len(flag) >= 5 and (near := difflib.get_close_matches(flag, flags, n=1,
                                                                        cutoff=0.6)):
                hints.append(f"{flag}: did you mean {near[0]}?")
        hint = f"; {'; '.join(hints)}" if hints else ""
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")

    def error(self, message: str) -> Any:  # argparse's own prints the whole usage first
        """Print one line naming the command and the problem, and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, after joining ``--opt -1e-3`` into ``--opt=-1e-3`` wherever ``--opt``
        takes one value: argparse itself takes only plain negatives (-1, -0.5) for values and
        calls -1e-3 or -inf an unknown option, so the value's own check never saw it."""
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {flag for flag, action in self._option_string_actions.items()
                       if action.nargs is None and not isinstance(
                           action, (argparse._StoreConstAction, argparse._HelpAction,
                                    argparse._VersionAction, argparse._CountAction))}
        joined: list[str] = []
        for token in args:
            if joined and joined[-1] in takes_value and token.startswith("-") and \
                    _is_number(token):
                joined[-1] = f"{joined[-1]}={token}"
            else:
                joined.append(token)
        return super().parse_known_args(joined, namespace)


BACKENDS = ("numpy", "cupy", "strict")


def environment_backend() -> str:
    """The backend ``MINILORA_BACKEND`` names, else ``"numpy"``: what ``--backend`` defaults to,
    so that ``MINILORA_BACKEND=cupy minilora demo`` runs on the GPU."""
    return os.environ.get("MINILORA_BACKEND", "").strip().lower() or "numpy"


def add_common(p: argparse.ArgumentParser) -> None:
    """The flags every command takes: --backend, --threads, --debug."""
    p.add_argument("--backend", choices=BACKENDS, default=environment_backend(),
                   help="array backend: numpy (CPU), cupy (NVIDIA GPU) or strict (the NumPy "
                   "stand-in for CuPy, which runs the GPU code path on the CPU and counts its "
                   "kernel launches and syncs); default: the MINILORA_BACKEND environment "
                   f"variable, else numpy (here: {environment_backend()})")
    p.add_argument("--threads", type=positive_int_to(MAX_THREADS), default=None, metavar="N",
                   help="BLAS threads (default 1 unless OPENBLAS_NUM_THREADS or "
                   "OMP_NUM_THREADS is set: the models here are small, and extra threads "
                   "slow them down on a busy machine); a fast form, left alone under "
                   "MINILORA_REFERENCE=1")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the training loop (``train`` and ``finetune`` take the same), plus --until and
    --no-save-on-interrupt; every value is typed, so nonsense is one line from the parser."""
    p.add_argument("--until", type=count, default=None, metavar="STEP",
                   help="stop after STEP steps as if interrupted (the learning-rate schedule "
                   "still spans --steps); continue later with --resume")
    p.add_argument("--no-save-on-interrupt", action="store_true",
                   help="on Ctrl-C, stop without saving a checkpoint")
    defaults = TrainConfig()
    for name, typ, text in (
            ("steps", positive_int_to(MAX_STEPS), "optimiser steps"),
            ("batch_size", positive_int, "sequences per step"),
            ("lr", nonnegative_float, "peak learning rate"),
            ("warmup", count, "linear warmup steps"),
            ("min_lr", nonnegative_float, "learning rate at the end of the cosine"),
            ("weight_decay", nonnegative_float, "AdamW weight decay (matrices only)"),
            ("grad_clip", nonnegative_float, "clip the global gradient norm to this (0: off)"),
            ("eval_every", positive_int, "evaluate every this many steps"),
            ("eval_examples", positive_int, "held-out questions per evaluation"),
            ("checkpoint_every", count, "also save every this many steps (0: only at the end)"),
            ("seed", count, "random seed: same seed, same run"),
            ("shards", positive_int, "cut each batch into this many shards that run side by "
             "side on threads, one per core; the result depends on this number, not on the "
             "cores"),
            ("micro_batches", positive_int, "run each shard's rows as this many pieces in turn "
             "(gradient accumulation: less memory, the same sum; the result depends on it)")):
        default = getattr(defaults, name)
        if name == "shards" and default is None:  # chosen by the backend at run time
            default = f"2 on the CPU (1 from {ONE_SHARD_FROM / 1e6:.1f}M parameters), 1 on a " \
                      f"device; a resume keeps the checkpoint's"
        if name == "micro_batches" and default is None:
            default = "pieces of about 512 tokens on the CPU, 1 on a device; a resume keeps " \
                      "the checkpoint's"
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       metavar="X" if typ is nonnegative_float else "N",
                       help=f"{text} (default {default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_out(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """--out DIR (``what`` it holds) and --overwrite: a save there is replaced only when asked."""
    p.add_argument("--out", required=required, metavar="DIR", type=path_arg, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace the save already in --out")


def resumed_config(args: argparse.Namespace, saved: TrainConfig, given: dict) -> TrainConfig:
    """The configuration a ``--resume`` runs with: the saved one, or the saved one extended when
    ``--steps`` goes beyond it (``--lr``/``--min-lr`` then set the added steps' rate). Any other
    training flag in ``given`` is refused, since a resumed run keeps its settings."""
    given = dict(given)
    steps, lr, min_lr = (given.pop(k, None) for k in ("steps", "lr", "min_lr"))
    if given:
        raise ConfigError(f"{args.command} --resume continues a run with its saved settings; "
                          f"drop {', '.join('--' + f.replace('_', '-') for f in sorted(given))}")
    if steps is not None and steps != saved.steps:
        if steps < saved.steps:
            raise ConfigError(f"{args.command} --resume: --steps {steps} is below the run's "
                              f"{saved.steps}; to stop early use --until")
        return saved.extended(steps, lr, min_lr)
    if lr is not None or min_lr is not None:
        flags = " and ".join(f for f, v in (("--lr", lr), ("--min-lr", min_lr)) if v is not None)
        raise ConfigError(f"{args.command} --resume continues a run with its saved settings; "
                          f"drop {flags} (--lr and --min-lr set the added steps' rate when "
                          f"--steps extends the run)")
    return saved
