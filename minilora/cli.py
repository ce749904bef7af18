"""The minilora command line (also: python -m minilora).

Train a small GPT on the base task (3-digit addition), ask it questions, measure it:

    minilora train --task add --out runs/base
    minilora sample --checkpoint runs/base --prompt "183+459="
    minilora eval --checkpoint runs/base --task add
    minilora demo                                   # the whole LoRA story, with a report and plots

Tasks (one shared vocabulary; operands zero-padded to --digits digits, 3 by default):
    add       task A, the base task: the sum                      183+459=0642.
    nocarry   task B: the sum digit by digit, carries forgotten   183+459=0532.
    digitmax  task C: in each place the larger digit              183+459=0489.
    rev       extra: the sum written backwards                    183+459=2460.
    max       extra: the larger number                            183,459=459.
Train task A from scratch; tasks B and C are what LoRA adapters learn on top of it
(`finetune --method` trains another method of the PEFT family instead: ia3, bitfit, bottleneck,
prompt or prefix).

Every command takes --help. Training writes a checkpoint directory (model.safetensors,
optimizer.safetensors, checkpoint.json, history.json, manifest.json) that `sample`, `eval` and
`train --resume` read back; it appears whole or not at all. Every failure is one line on stderr
(add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as B
from . import startup
from .checkpoint import FILES as CHECKPOINT_FILES
from .checkpoint import load_checkpoint, load_model
from .cli_common import (
    MODEL_DEFAULTS,
    MODEL_FIELDS,
    TRAIN_FIELDS,
    Parser,
    add_common,
    add_training_flags,
    count,
    fraction,
    name_arg,
    nonnegative_float,
    path_arg,
    positive_int,
    positive_int_to,
    report,
    resumed_config,
    run_training,
    setup,
    task_dataset,
    text_arg,
)
from .cli_lora import add_adapter_flags, add_parsers, attach_adapters
from .data import (
    END,
    TASKS,
    ArithmeticTask,
    ByteTokenizer,
    CharTokenizer,
    TaskDataset,
    TextDataset,
    get_task,
    task_tokenizer,
)
from .errors import ConfigError, InvalidArgumentError, MiniLoraError
from .fileio import (
    NoManifestWarning,
    check_destination,
    check_in_place,
    check_writable,
    sha256_file,
)
from .filelock import claim, claims
from .gpt import GPT, GPTConfig
from .train import TrainConfig, exact_match, greedy_answers, validation_loss

# -------------------------------------------------------------------------------- train

def _default_out(args: argparse.Namespace) -> str:
    """``runs/<task>`` or ``runs/<text file's stem>``: a run always has somewhere to be saved."""
    name = Path(args.text).stem if args.text is not None else args.task
    return str(Path("runs") / (name or "run"))


def _train(args: argparse.Namespace) -> int:
    setup(args)
    given = {f: getattr(args, f) for f in TRAIN_FIELDS + MODEL_FIELDS
             if getattr(args, f) is not None}
    if args.resume:
        return _resume(args, given)
    if args.text is not None and args.task is not None:
        raise ConfigError("train: give either --task or --text, not both")
    args.task = args.task or "add"  # the default task, when no text is given either
    out = args.out or _default_out(args)
    check_destination(out, overwrite=args.overwrite, names=CHECKPOINT_FILES, what="--out")
    train_cfg = TrainConfig(**{k: v for k, v in given.items() if k in TRAIN_FIELDS})
    B.manual_seed(train_cfg.seed)
    if args.text is not None:
        block = given.get("block_size", 64)
        # bytes by default, so that any later text (or JSONL) can be encoded and adapted; the
        # end-of-text token lets a JSONL fine-tune mark where a completion ends
        tokenizer = ByteTokenizer(eot=True) if args.tokenizer == "byte" else None
        data = TextDataset.from_file(args.text, tokenizer=tokenizer, block_size=block)
    else:
        data = TaskDataset(get_task(args.task, args.digits), n_heldout=args.heldout)
        if given.get("block_size", data.block_size) < data.block_size:
            raise ConfigError(f"train --block-size {given['block_size']}: task {args.task!r} "
                              f"needs a context of at least {data.block_size} tokens")
    # a task's context is its own length unless --block-size leaves room beyond it (for the
    # virtual tokens of prompt and prefix tuning, `finetune --method prompt`)
    model_cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size,
                          block_size=given.get("block_size", data.block_size),
                          **{k: given.get(k, MODEL_DEFAULTS[k]) for k in MODEL_DEFAULTS})
    model = GPT(model_cfg)
    what = _describe(data.task) if isinstance(data, TaskDataset) else f"text file {args.text!r}"
    print(f"training a GPT ({model.num_parameters():,} parameters: {model_cfg.n_layer} layers, "
          f"{model_cfg.n_head} heads, {model_cfg.n_embd} channels) on {what} for "
          f"{train_cfg.steps} steps; checkpoint in {out}", flush=True)
    history = run_training(args, model, data, train_cfg, out)
    report(history, data, train_cfg, out)
    return 0


def _text_for_resume(args: argparse.Namespace, saved: dict, tokenizer: Any,
                     where: str) -> TextDataset:
    """Re-read the text a run was trained on (or ``--text``, if it moved): it must be the same
    file, byte for byte, as its SHA-256 in the checkpoint says."""
    path = args.text or saved.get("path")
    if not path:
        raise ConfigError(f"train --resume: {where!r} does not record which text file it was "
                          f"trained on; resume it from Python (minilora.train.train(resume=...))")
    if not Path(path).is_file():
        raise ConfigError(f"train --resume: the text file {path!r} that {where!r} was trained on "
                          f"is missing; pass its new place with --text FILE")
    if saved.get("sha256") and sha256_file(path) != saved["sha256"]:
        raise ConfigError(f"train --resume: the text file {path!r} changed since {where!r} was "
                          f"saved (its SHA-256 differs); resuming would train on other data")
    return TextDataset.from_file(path, tokenizer=tokenizer, block_size=saved["block_size"])


def _resume(args: argparse.Namespace, given: dict) -> int:
    if args.digits is not None:
        given = {**given, "digits": args.digits}
    out = args.out or args.resume
    same = Path(out).resolve() == Path(args.resume).resolve()
    if same:  # written back where it is read: checked (and claimed) before it is read
        check_in_place(args.resume, "--resume")
    ck = load_checkpoint(args.resume)
    if ck.model_config is None or ck.train_config is None:
        raise ConfigError(f"train --resume: {args.resume!r} lacks the model or training config")
    cfg = resumed_config(args, TrainConfig.from_dict(ck.train_config), given)
    if args.task is not None and args.task != (ck.extra.get("task") or {}).get("name"):
        trained = f"task {ck.extra['task']['name']!r}" if "task" in ck.extra else "a text"
        raise ConfigError(f"train --resume continues a run on what it was trained on "
                          f"({args.resume!r}: {trained}); drop --task {args.task}, or train "
                          f"a new run (or fine-tune this one: minilora finetune --from)")
    if "task" in ck.extra:
        if args.text is not None:
            raise ConfigError(f"train --resume: {args.resume!r} was trained on a task, not a "
                              f"text; drop --text")
        data = task_dataset(ck.extra)
    elif "text" in ck.extra:
        data = _text_for_resume(args, ck.extra["text"], ck.tokenizer, args.resume)
    else:
        raise ConfigError(f"train --resume: {args.resume!r} records neither a task nor a text")
    model = GPT(GPTConfig.from_dict(ck.model_config))
    if not same:
        check_destination(out, overwrite=args.overwrite, names=CHECKPOINT_FILES, what="--out",
                          inputs={"--resume": args.resume})
    print(f"resuming {args.resume!r} at step {ck.step} of {cfg.steps}; writing to {out!r}",
          flush=True)
    history = run_training(args, model, data, cfg, out, resume=args.resume)
    report(history, data, cfg, out)
    return 0


def _describe(task: ArithmeticTask) -> str:
    m = 10 ** task.digits
    example = "".join(task.example(183 % m, 459 % m))
    return f"task {task.name!r} ({task.digits} digits, e.g. {example})"


# ------------------------------------------------------------------------- sample, eval

def _model_and_data_record(args: argparse.Namespace) -> tuple[GPT, Any, Any, dict]:
    """The base of ``--checkpoint`` with ``--adapter``s on it: ``(model, checkpoint, tokenizer,
    what the active adapter, or else the base, was trained on)``."""
    model, ck = load_model(args.checkpoint)
    record = attach_adapters(model, args)
    trained_on = (record or {}).get("data") or ck.extra
    return model, ck, ck.tokenizer or task_tokenizer(), trained_on


def _sample(args: argparse.Namespace) -> int:
    setup(args)
    model, ck, tok, trained_on = _model_and_data_record(args)
    if isinstance(tok, CharTokenizer):
        unknown = "".join(sorted(set(args.prompt) - set(tok.chars)))
        if unknown:
            raise InvalidArgumentError(f"--prompt {args.prompt!r} has characters the model does "
                                       f"not know: {unknown!r}; its vocabulary is {tok.chars!r}")
    ids = tok.encode(args.prompt)
    if ids.size == 0:
        raise InvalidArgumentError("--prompt is empty: give the text to continue")
    block = model.config.block_size - model.num_virtual_tokens  # prompt, prefix tuning take N
    if ids.size > block:
        print(f"minilora sample: note: the prompt has {ids.size} tokens, more than the model's "
              f"context of {block}; it sees only the last {block}", file=sys.stderr, flush=True)
    text_model = "text" in trained_on
    # a text model samples (temperature 0.8, top-k 40), a task or JSONL model answers greedily
    temperature = args.temperature if args.temperature is not None else \
        (0.8 if text_model else 0.0)
    top_k = args.top_k if args.top_k is not None else (40 if text_model and temperature else None)
    n_new = args.max_new_tokens
    if n_new is None:
        n_new = get_task(**trained_on["task"]).answer_len if "task" in trained_on else 100
    eot = getattr(tok, "eot_id", None)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        out = B.to_numpy(model.generate(ids[None, :], n_new, temperature=temperature,
                                        top_k=top_k, seed=seed))[0, ids.size:]
        if eot is not None and (out == eot).any():  # a completion ends at end-of-text
            out = out[:int(np.argmax(out == eot))]
            if not out.size:  # else an empty line, which reads as a failure
                print(f"minilora sample: note: the model ended the text at once (end-of-text "
                      f"came first{f' with --seed {seed}' if seed is not None else ''}); "
                      f"another --seed or a higher --temperature samples another start",
                      file=sys.stderr, flush=True)
        text = tok.decode(out)
        if "task" in trained_on and END in text:
            text = text[:text.index(END) + 1]  # a task answer ends at the end mark
        print(args.prompt + text, flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    setup(args)
    model, ck, tok, trained_on = _model_and_data_record(args)
    start = time.perf_counter()
    block = model.config.block_size - model.num_virtual_tokens  # prompt, prefix tuning take N
    if args.text is not None and args.data is not None:
        raise ConfigError("eval: --text measures a text's perplexity and --data scores "
                          "prompt/completion answers: give one of them")
    if args.text is not None:
        data = TextDataset.from_file(args.text, tokenizer=tok, block_size=block)
        loss = validation_loss(model, data, batch_size=16, batches=max(1, args.examples // 16))
        print(f"text {args.text!r}: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
              f"({time.perf_counter() - start:.1f} s)")
        return 0
    if args.data is not None or ("jsonl" in trained_on and args.task is None):
        from .cli_lora import dataset_from_record
        from .jsonl import JsonlDataset
        from .jsonl import exact_match as jsonl_exact_match

        data = JsonlDataset.from_file(args.data, tok, block_size=block) \
            if args.data is not None else dataset_from_record(trained_on, tok, "eval")
        n = min(args.examples, data.n_heldout)
        acc = jsonl_exact_match(model, data, n)
        print(f"JSONL {data.path!r}: held-out exact match {acc:.1%} on {n} prompts "
              f"({time.perf_counter() - start:.1f} s)")
        _show_jsonl_examples(model, data, tok, min(args.show, n))
        return 0
    if args.task is None and "text" in trained_on:
        path = (trained_on["text"] or {}).get("path")
        on = f" ({path!r})" if path else ""
        raise ConfigError(f"this model was trained on a text{on}, which has no answers to "
                          f"match: pass --text FILE for its perplexity on a text, or --task NAME "
                          f"({', '.join(TASKS)}) or --data FILE.jsonl to score answers")
    data = task_dataset(trained_on, args.task)
    if tok != data.tokenizer or model.config.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"eval --task {data.task.name}: the task's {data.tokenizer.vocab_size} "
                          f"symbols are not this model's vocabulary ({model.config.vocab_size} "
                          f"tokens), so its answers could not be read; a task is scored on a "
                          f"model trained on one (train --task, or finetune --from ... --task)")
    if data.block_size > block:
        beside = f" beside {model.num_virtual_tokens} virtual tokens" \
            if model.num_virtual_tokens else ""
        raise ConfigError(f"eval: task {data.task.name!r} needs block_size "
                          f"{data.block_size}, the model has {block}{beside}")
    n = min(args.examples, data.n_heldout)
    acc = exact_match(model, data, n)
    print(f"task {data.task.name!r} ({data.task.digits} digits): held-out exact match "
          f"{acc:.1%} on {n} questions ({time.perf_counter() - start:.1f} s)")
    _show_examples(model, data, args.show)
    return 0


def _show_jsonl_examples(model: GPT, data: Any, tok: Any, n: int) -> None:
    """The first ``n`` held-out prompts with the model's completion and the true one, as the
    tasks' examples are shown (each cut at end-of-text, which the completion must reach)."""
    if n <= 0:
        return
    from .jsonl import greedy_completions

    prompts, completions = data.heldout(n)
    eot = getattr(tok, "eot_id", None)

    def text(ids: Any) -> str:
        ids = np.asarray(ids)
        if eot is not None and (ids == eot).any():
            ids = ids[:int(np.argmax(ids == eot))]
        return tok.decode(ids)
    for p, c, g in zip(prompts, completions, greedy_completions(model, data, n)):
        mark = "ok   " if np.array_equal(c, g) else "WRONG"
        print(f"  {mark} {text(p)!r} -> {text(g)!r}   (true {text(c)!r})")


def _show_examples(model: GPT, data: TaskDataset, n: int) -> None:
    n = min(n, data.n_heldout)
    if n <= 0:
        return
    prompts, answers = data.heldout(n)
    predicted = greedy_answers(model, prompts, answers.shape[1])
    tok = data.tokenizer
    for p, a, q in zip(prompts, answers, predicted):
        mark = "ok   " if (a == q).all() else "WRONG"
        print(f"  {mark} {tok.decode(p)}{tok.decode(q)}   (true {tok.decode(a)})")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .demo_report import checks, format_notes, format_table, memory_note

    setup(args)
    if args.out is None:
        args.out = "runs/demo-quick" if args.quick else "runs/demo"
    check_writable(args.out, what="demo --out")
    claim(args.out, "demo --out")  # one demo writing there at a time
    if not args.overwrite:
        _check_demo_dir(args.out)
    print(f"minilora demo: pretrain, then full fine-tuning vs LoRA vs QLoRA, merging and adapter "
          f"switching, on the {B.get_backend()} backend{' (quick)' if args.quick else ''}",
          flush=True)
    results = run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    print()
    print(format_table(results))
    print(f"({memory_note(results)})")
    print()
    print(format_notes(results))
    print()
    for ok, text in checks(results):
        print(f"  [{'x' if ok else ' '}] {text}")
    print(f"\nreport and plots: {Path(args.out) / 'report' / 'report.md'}   "
          f"({results['seconds']:.0f} s)")
    return 0


# what a demo directory holds (older demos wrote the report's files at the top)
DEMO_ENTRIES = ("base", "adapters", "report", "report.md", "results.json", "loss_curves.png",
                "accuracy.png", "trainable_params.png", "memory.png", "quant_error.png",
                "adapter_switching.png")


def _check_demo_dir(out: str) -> None:
    """A demo may run again in its own directory (it reuses the base it cached there), but not in
    a directory of other things without --overwrite."""
    path = Path(out)
    if not path.is_dir():
        return
    others = sorted(e for e in os.listdir(path) if not e.startswith(".") and
                    e not in DEMO_ENTRIES)
    if others:
        raise InvalidArgumentError(f"demo --out {out!r} holds files that are not a demo's "
                                   f"({', '.join(repr(e) for e in others[:3])}); choose another "
                                   f"directory, or pass --overwrite to write the demo there too")


# ------------------------------------------------------------------------------- parser

# tokens a sample may ask for, and samples a call: far beyond any use, short of for ever
MAX_COUNT = 10**6


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    fmt = argparse.RawDescriptionHelpFormatter
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version (the package root is above this layer)
        installed = version("minilora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "(not installed)"
    parser = Parser(prog="minilora", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"minilora {installed}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    t = sub.add_parser("train", formatter_class=fmt, help="train a GPT on a task or a text file",
                       description="Train a GPT from scratch on a synthetic task (default: add, "
                       "3-digit addition) or on a UTF-8 text file, and save a checkpoint.\n\n"
                       "  minilora train --task add --out runs/base\n"
                       "  minilora train --text notes.txt --out runs/notes --steps 2000\n"
                       "  minilora train --resume runs/base     # continue an interrupted run\n"
                       "  minilora train --resume runs/base --steps 3000   # extend a run\n\n"
                       "Ctrl-C stops after the current step and saves a checkpoint that "
                       "--resume continues.\nA NaN or inf loss or gradient stops training "
                       "with an error; nothing is saved over the last good checkpoint.")
    t.add_argument("--task", default=None, metavar="NAME", type=name_arg,
                   help=f"task to learn: {', '.join(TASKS)} (default add)")
    t.add_argument("--text", metavar="FILE", type=path_arg,
                   help="train a model of this UTF-8 text (its bytes, or its characters with "
                   "--tokenizer char) "
                   "instead (with --resume: where the run's text file is now)")
    t.add_argument("--tokenizer", choices=("byte", "char"), default="byte",
                   help="for --text: byte (UTF-8 bytes and an end-of-text token, so any later "
                   "text can be adapted; default) or char (the characters of this text only)")
    t.add_argument("--digits", type=positive_int, default=None, metavar="K",
                   help="digits per operand (default 3)")
    t.add_argument("--heldout", type=positive_int, default=1000, metavar="N",
                   help="questions held out of training for evaluation (default 1000)")
    t.add_argument("--out", metavar="DIR", type=path_arg,
                   help="checkpoint directory to write (default "
                   "runs/TASK, or runs/STEM for --text); must be new or empty unless --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint already in --out")
    t.add_argument("--resume", metavar="DIR", type=path_arg,
                   help="continue the run saved in DIR with its saved settings (into --out, "
                   "default DIR itself); the result equals an uninterrupted run, bit for bit. "
                   "With --steps N beyond the run's steps, the run is extended: the added steps "
                   "run at the schedule's final learning rate, or decay from --lr to --min-lr "
                   "when given (an extended run need not equal any uninterrupted one)")
    add_training_flags(t)
    for name, typ, text in (("n_layer", positive_int, "transformer blocks"),
                            ("n_head", positive_int, "attention heads"),
                            ("n_embd", positive_int, "channels"), ("dropout", fraction, "dropout")):
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       metavar="X" if typ is fraction else "N",
                       help=f"model: {text} (default {MODEL_DEFAULTS[name]})")
    t.add_argument("--block-size", dest="block_size", type=positive_int, default=None,
                   metavar="N", help="model context (default 64 for --text; a task's own length, "
                   "or more to leave room for prompt or prefix tuning's virtual tokens)")
    add_common(t)
    t.set_defaults(func=_train)
    add_parsers(sub, fmt)

    s = sub.add_parser("sample", formatter_class=fmt, help="continue a prompt with a trained model",
                       description="Continue a prompt with a trained model. By default a task "
                       "or JSONL model answers greedily (temperature 0) and a task model stops at "
                       "the end mark '.'; a text model samples (temperature 0.8, top-k 40).\n\n"
                       '  minilora sample --checkpoint runs/base --prompt "183+459="')
    s.add_argument("--checkpoint", required=True, metavar="DIR", type=path_arg,
                   help="checkpoint directory")
    s.add_argument("--prompt", required=True, type=text_arg,
                   help="text to continue; only characters the "
                   "model knows (for tasks: digits and + - * , = .)")
    s.add_argument("--max-new-tokens", type=positive_int_to(MAX_COUNT), default=None, metavar="N",
                   help="tokens to generate (default: a task's answer length, else 100)")
    s.add_argument("--temperature", type=nonnegative_float, default=None, metavar="X",
                   help="0 takes the most likely token (default for task and JSONL models); "
                   "higher is more random (default 0.8 for a text model)")
    s.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample only from the k likeliest (default 40 for a text model)")
    add_adapter_flags(s)
    s.add_argument("--seed", type=count, default=None, metavar="N", help="sampling seed")
    s.add_argument("--num-samples", type=positive_int_to(MAX_COUNT), default=1, metavar="N",
                   help="how many continuations (default 1)")
    add_common(s)
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", formatter_class=fmt,
                       help="exact-match accuracy on held-out questions",
                       description="Measure a checkpoint's exact-match accuracy on held-out "
                       "questions of a task (by default the task it was trained on).\n\n"
                       "  minilora eval --checkpoint runs/base --task add")
    e.add_argument("--checkpoint", required=True, metavar="DIR", type=path_arg,
                   help="checkpoint directory")
    e.add_argument("--task", default=None, metavar="NAME", type=name_arg,
                   help=f"task to evaluate: {', '.join(TASKS)} (default: the trained one)")
    e.add_argument("--examples", type=positive_int, default=1000, metavar="N",
                   help="held-out questions (default 1000, at most the checkpoint's held-out "
                   "count)")
    e.add_argument("--show", type=count, default=5, metavar="N",
                   help="questions to print (default 5; 0 prints none)")
    e.add_argument("--text", metavar="FILE", type=path_arg,
                   help="validation loss and perplexity on this text")
    e.add_argument("--data", metavar="FILE", type=path_arg,
                   help="exact match on the held-out completions of "
                   "this JSONL file")
    add_adapter_flags(e)
    add_common(e)
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", formatter_class=fmt, help="the whole LoRA story in a few minutes",
                       description="Pretrain a small GPT on addition (task A), or reuse the base "
                       "a previous run cached in OUT/base; fine-tune it on a new task (B) with "
                       "full fine-tuning, LoRA and QLoRA; merge the LoRA adapter and check merged "
                       "== unmerged; train a second adapter (task C) and switch between them. "
                       "Writes OUT/report/report.md with plots and prints a summary table.\n\n"
                       "  minilora demo                  # about 2-3 minutes on 2 CPU cores\n"
                       "  minilora demo --quick          # a smoke run in seconds\n"
                       "  minilora demo --backend cupy   # on an NVIDIA GPU\n"
                       "  MINILORA_BACKEND=cupy minilora demo   # the same")
    d.add_argument("--quick", action="store_true",
                   help="tiny step counts: checks the pipeline, not the accuracies")
    d.add_argument("--out", metavar="DIR", type=path_arg, default=None,
                   help="where the report, plots, adapters and base checkpoint go "
                   "(default runs/demo, or runs/demo-quick with --quick, so that a smoke run "
                   "leaves the full demo's cached base alone; a previous demo's directory is "
                   "reused)")
    d.add_argument("--overwrite", action="store_true",
                   help="write the demo into --out even if it holds other files (they are kept)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common(d)
    d.set_defaults(func=_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error as one line: minilora's own message, or the kind of error and what it says."""
    if isinstance(exc, MiniLoraError):
        text = str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        text = f"a file is not valid UTF-8 ({exc})"
    elif isinstance(exc, OSError):
        where = f" {exc.filename!r}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
    elif isinstance(exc, MemoryError):
        text = "out of memory (a size in the input is larger than this machine can hold)"
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minilora`` console script; returns the exit status.

    Every failure is one line on stderr, ``minilora COMMAND: error: ...`` (the traceback with
    ``--debug``); notes (a save without a manifest, a cropped prompt) are one line too. The
    command runs on ``--backend`` (default: ``MINILORA_BACKEND``, else numpy); called in-process,
    the caller's backend is active again when it returns.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, which knows the flags it takes
        parser.subcommand(args.command).unrecognized(extra, parser.flags_elsewhere(args.command))

    def note(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        print(f"minilora {args.command}: note: {message}", file=sys.stderr, flush=True)

    previous = B.get_backend()  # a caller in this process (a test, a notebook) keeps its own
    with warnings.catch_warnings(), B.backend(previous):
        warnings.simplefilter("always", NoManifestWarning)
        # NumPy's floating-point warnings name an op deep inside a command, not anything the
        # user gave: what they mean (NaN weights, a diverging run) is said by the command itself
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                RuntimeWarning)
        warnings.showwarning = note
        startup.done()  # from here a Ctrl-C is a KeyboardInterrupt, said below
        try:
            with claims():  # the --out a command checks stays its own until it ends (filelock)
                return args.func(args)
        except KeyboardInterrupt as stop:
            startup.finishing()  # a Ctrl-C pressed again from here ends the process quietly
            if not getattr(stop, "reported", False):  # else _run said what was saved
                print(f"minilora {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # whoever read the output stopped reading (`| head`): stop quietly, as a shell's
            # tools do; stdout goes to devnull so that Python's own flush at exit cannot fail too
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):  # no real stdout (captured in-process)
                pass
            return 141  # 128 + SIGPIPE, what a shell reports for a tool its pipe stopped
        except Exception as exc:
            if args.debug:
                raise
            print(f"minilora {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        finally:
            startup.finishing()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "MODEL_DEFAULTS", "DEMO_ENTRIES"]
