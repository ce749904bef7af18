"""The LoRA workflow from the command line: finetune, merge, quantize, export, import, inspect,
and the adapters that ``sample`` and ``eval`` put on a base.

    minilora finetune --from runs/base --task nocarry --out runs/nocarry      # LoRA r=8 on q, v
    minilora eval --checkpoint runs/base --adapter runs/nocarry
    minilora merge --checkpoint runs/base --adapter runs/nocarry --out runs/merged
    minilora quantize --checkpoint runs/base --out runs/base-nf4
    minilora export --checkpoint runs/base --adapter runs/nocarry --to peft --out runs/peft
    minilora inspect runs/nocarry

A LoRA (or QLoRA) fine-tune directory is one save holding the adapter as ``save_adapter`` writes
it (adapter_config.json + adapter_model.safetensors: minilora's module names on a minilora base,
PEFT's GPT-2 names such as ``c_attn`` on a Hugging Face base, so ``PeftModel`` loads it) plus what
resuming needs: the trained weights and optimizer state (model.safetensors holds only the
adapter), checkpoint.json naming the base (its path and SHA-256), the method, the LoRA and
quantization settings and the data. ``--full`` writes a whole checkpoint instead. ``--method``
trains another method of the PEFT family (IA3, BitFit, bottleneck adapters, prompt or prefix
tuning) into the same kind of directory: :mod:`minilora.cli_family`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as B
from . import cli_family, interop, lora, quant
from .checkpoint import FILES as CHECKPOINT_FILES
from .checkpoint import (
    META_FILE,
    MODEL_FILE,
    all_finite,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    save_checkpoint,
)
from .cli_common import (
    TRAIN_FIELDS,
    add_common,
    add_out,
    add_training_flags,
    fraction,
    name_arg,
    path_arg,
    positive_float,
    positive_int,
    report,
    resumed_config,
    run_training,
    setup,
    task_dataset,
)
from .data import TASKS, TaskDataset, TextDataset, get_task, task_tokenizer
from .errors import CheckpointError, ConfigError, NonFiniteWarning
from .fileio import (
    check_destination,
    check_in_place,
    listed_digest,
    read_whole,
    recovered,
    sha256_file,
    verify_manifest,
)
from .gpt import GPT
from .lora.config import INITS
from .lora.io import ADAPTER_FILES, CONFIG_NAME, adapter_files, adapter_header
from .lora.variants import pissa_as_lora, pissa_lora_alpha
from .nn import keep_host_rng
from .tensorfile import read_json
from .train import TrainConfig, data_description, validation_loss

# every linear layer of minilora's GPT but the output head (tied to wte): PEFT's "all-linear"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")
FINETUNE_FILES = CHECKPOINT_FILES + ADAPTER_FILES


# ------------------------------------------------------------------------------------ bases

def load_base(path: str) -> tuple[GPT, Any, dict]:
    """``(model, tokenizer, info)`` of a base: a minilora checkpoint directory or a Hugging Face
    GPT-2 directory (config.json + model.safetensors, its tokenizer from vocab.json + merges.txt
    when they are there). ``info`` records where it came from, for a fine-tune to name it. A
    swap a kill left half done is finished first, and a Hugging Face directory that minilora
    wrote is checked against its manifest, as a checkpoint is; all of it comes from one save
    (:func:`~minilora.fileio.read_whole`)."""
    return read_whole(path, lambda: _read_base(path), "base")


def _read_base(path: str) -> tuple[GPT, Any, dict]:
    where = recovered(path)
    path = str(where)
    ours, hf = (where / "checkpoint.json").is_file(), (where / "config.json").is_file()
    if where.is_dir() and not (ours or hf):
        raise CheckpointError(f"{path!r} holds neither a minilora checkpoint (checkpoint.json) nor "
                              f"a Hugging Face GPT-2 (config.json + model.safetensors)")
    if ours or not hf:  # not a directory: load_model says so
        model, ck = load_model(path)
        # load_model verified the manifest, which lists the weights' digest: no second hashing
        digest = listed_digest(ck.directory, MODEL_FILE) or sha256_file(ck.directory / MODEL_FILE)
        info = {"base": str(where.resolve()), "base_kind": "minilora", "base_sha256": digest,
                "base_extra": ck.extra}
        return model, ck.tokenizer or task_tokenizer(), info
    verify_manifest(where, "base", warn=False)  # one exported by minilora has one
    model = interop.gpt_from_hf(path)
    model.eval()
    tokenizer = None
    if (where / "vocab.json").is_file() and (where / "merges.txt").is_file():
        from .bpe import GPT2BPETokenizer

        tokenizer = GPT2BPETokenizer.from_dir(path)
    info = {"base": str(where.resolve()), "base_kind": "hf",
            "base_sha256": sha256_file(where / "model.safetensors"), "base_extra": {}}
    return model, tokenizer, info


def _load_recorded_base(record: dict, who: str, moved_to: str | None = None) -> tuple:
    """The base a fine-tune names (or ``moved_to``, where it lies now: ``--from`` with
    ``--resume``), refused when it is gone or its weights are not those the fine-tune was made
    from (the SHA-256 its record keeps)."""
    where = record["base"] if moved_to is None else moved_to
    if not Path(where).is_dir():
        hint = "" if moved_to is not None else " (moved? name where it is now with --from DIR)"
        raise CheckpointError(f"{who}: the base {where!r} this fine-tune was made from is "
                              f"missing{hint}")
    model, tokenizer, info = load_base(where)
    if info["base_sha256"] != record["base_sha256"]:
        raise CheckpointError(f"{who}: the base {where!r} is not the one this fine-tune was "
                              f"made from ({record['base']!r}: its weights' SHA-256 differs); "
                              f"the adapter belongs to that one")
    return model, tokenizer, info


# ------------------------------------------------------------------------------------- data

def _dataset(args: argparse.Namespace, tokenizer: Any, model: GPT, info: dict,
             reserve: int = 0) -> Any:
    """The fine-tuning data: --task, --text or --data, tokenized as the base is; text and JSONL
    sequences leave ``reserve`` positions of the context free (prompt and prefix tuning's)."""
    given = [f for f in ("task", "text", "data") if getattr(args, f) is not None]
    if len(given) != 1:
        raise ConfigError(f"{args.command}: give the data as exactly one of --task NAME, --text "
                          f"FILE or --data FILE.jsonl (got {len(given)})")
    block = model.config.block_size - reserve
    if args.block_size is not None:  # a context that is not the one asked for is no default
        if args.text is None:
            raise ConfigError(f"{args.command}: --block-size sets the context of --text only; "
                              f"--{given[0]} sequences take the length their data needs")
        if args.block_size > block:
            beside = f" beside {reserve} virtual tokens" if reserve else ""
            raise ConfigError(f"{args.command}: --block-size {args.block_size} is more than the "
                              f"base's context of {block} tokens{beside}")
    if args.task is not None:
        if tokenizer != task_tokenizer():
            raise ConfigError(f"{args.command} --task: the base's tokenizer is not the tasks' "
                              f"one; fine-tune it on --text or --data instead")
        saved = info["base_extra"].get("task") or {}
        data = TaskDataset(get_task(args.task, args.digits or saved.get("digits")),
                           n_heldout=info["base_extra"].get("n_heldout", 1000))
    elif tokenizer is None:
        missing = [n for n in ("vocab.json", "merges.txt")
                   if not (Path(info["base"]) / n).is_file()]
        raise ConfigError(f"{args.command}: the base {info['base']!r} has no tokenizer "
                          f"({' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"missing beside its weights), so text cannot be encoded")
    elif args.text is not None:
        data = TextDataset.from_file(args.text, tokenizer=tokenizer,
                                     block_size=args.block_size or block)
    else:
        from .jsonl import JsonlDataset

        data = JsonlDataset.from_file(args.data, tokenizer, block_size=block)
    if data.block_size > block:
        beside = f" beside {reserve} virtual tokens" if reserve else ""
        raise ConfigError(f"{args.command}: the data needs a context of {data.block_size} "
                          f"tokens, the base has {block}{beside}")
    return data


def dataset_from_record(record: dict, tokenizer: Any, who: str) -> Any:
    """Rebuild the data a fine-tune recorded (the same file, byte for byte)."""
    if "task" in record:
        return task_dataset(record)
    kind = "text" if "text" in record else "jsonl"
    saved = record.get(kind) or {}
    path = saved.get("path")
    if not path or not Path(path).is_file():
        raise ConfigError(f"{who}: the {kind} file {path!r} this run was trained on is missing")
    if saved.get("sha256") and sha256_file(path) != saved["sha256"]:
        raise ConfigError(f"{who}: the {kind} file {path!r} changed since the run was saved")
    if kind == "text":
        return TextDataset.from_file(path, tokenizer=tokenizer, block_size=saved["block_size"])
    from .jsonl import JsonlDataset

    return JsonlDataset.from_file(path, tokenizer, block_size=saved["block_size"],
                                  n_heldout=saved.get("n_heldout"))


# ---------------------------------------------------------------------------------- finetune

def _lora_config(args: argparse.Namespace) -> lora.LoraConfig:
    # the flags default to None (so that another --method can refuse them): LoRA's defaults here
    target = "q_proj,v_proj" if args.target is None else args.target  # "" is refused below
    targets = ALL_LINEAR if target == "all-linear" else \
        tuple(t.strip() for t in target.split(",") if t.strip())
    if not targets:
        raise ConfigError(f"--target must name modules (e.g. q_proj,v_proj) or be all-linear, "
                          f"got {target!r}")
    r = args.r or 8
    return lora.LoraConfig(r=r, alpha=args.alpha if args.alpha is not None else 2 * r,
                           dropout=args.lora_dropout or 0.0, target_modules=targets,
                           use_rslora=bool(args.rslora), use_dora=bool(args.dora),
                           init=args.init or "kaiming")


def _check_targets(model: GPT, config: lora.LoraConfig) -> None:
    """Every name in --target must match a linear layer of the base: inject_lora, as PEFT,
    refuses only a list that matches nothing, and ``q_proj,v_prj`` trained q alone, in silence."""
    paths = [p for p, _ in lora.linear_like_modules(model)]
    missed = [t for t in config.target_modules if not any(lora.matches_target(p, (t,))
                                                          for p in paths)]
    if missed:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        near = [f"{t}: did you mean {m[0]}?" for t in missed
                if (m := difflib.get_close_matches(t, names, n=1, cutoff=0.6))]
        raise ConfigError(f"--target {','.join(missed)}: no linear layer of the base is called "
                          f"so (its linear layers: {', '.join(names)})"
                          f"{'; ' + '; '.join(near) if near else ''}")


def _prepare(model: GPT, info: dict, method: str, config: lora.LoraConfig | None,
             quant_cfg: dict | None, name: str) -> None:
    """Quantize the base (QLoRA) and inject the adapter (LoRA, QLoRA), in place."""
    if method == "qlora":
        quant.quantize_model(model, **quant_cfg)
    if method != "full":
        lora.inject_lora(model, config, adapter_name=name)
        if info["base_kind"] == "hf":
            interop.peft_adapter_files(model, name)  # refuses what PEFT's GPT-2 cannot hold
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def _adapter_bytes(model: GPT, info: dict, name: str) -> Any:
    """A function giving the adapter's files for each save (a PiSSA adapter converted first)."""
    write = interop.peft_adapter_files if info["base_kind"] == "hf" else adapter_files
    if lora.lora_configs(model)[name].init != "pissa":
        return lambda: write(model, name)
    # PiSSA trains A, B on the residual base W - s B0 A0 (lora.variants). Against the base the
    # user has, W, that is the exact rank-2r LoRA s [B, -B0] [A; A0], as PEFT's PiSSA-to-LoRA
    # conversion writes it, so the files load onto the untouched base.
    initial = {path: (layer.lora_A[name].weight.data.copy(), layer.lora_B[name].weight.data.copy())
               for path, layer in lora.lora_layers(model) if name in layer.lora_A}
    config = lora.lora_configs(model)[name]
    wide = dataclasses.replace(config, r=2 * config.r, init="kaiming",
                               alpha=pissa_lora_alpha(config.alpha, config.use_rslora))

    def converted() -> dict[str, bytes]:
        plain, _, _ = load_base(info["base"])
        with keep_host_rng():  # the init of the wide adapter is overwritten below
            lora.inject_lora(plain, wide, name)
        for path, (a0, b0) in initial.items():
            trained, target = model.get_submodule(path), plain.get_submodule(path)
            A, Bm = pissa_as_lora(trained.lora_A[name].weight.data,
                                  trained.lora_B[name].weight.data, a0, b0)
            target.lora_A[name].weight.data[...] = A  # (2r, in)
            target.lora_B[name].weight.data[...] = Bm  # (out, 2r)
        return write(plain, name)
    return converted


def _print_trainable(model: GPT, method: str, name: str) -> None:
    trainable, total = lora.count_parameters(model)
    if method == "full":
        print(f"full fine-tuning: all {total:,} parameters train", flush=True)
        return
    rows = lora.lora_parameter_table(model, name)
    adapted, full = sum(r["lora"] for r in rows), sum(r["full"] for r in rows)
    print(f"{method}: adapter {name!r} on {len(rows)} layers; {per_layer_counts(rows)}; "
          f"{adapted:,} trainable against {full:,} in those layers ({adapted / full:.2%}); "
          f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})", flush=True)


def per_layer_counts(rows: list[dict]) -> str:
    """``r(n+k) = 8(128+128) = 2,048 per layer against n k = 16,384`` for the rows of
    ``lora.lora_parameter_table``: one such formula per layer shape (with how many layers have
    it when there are several, as with ``all-linear``), and DoRA's magnitude vector (n) named."""
    shapes: dict = {}
    for row in rows:
        shapes.setdefault((row["r"], row["n"], row["k"], row["lora"], row["full"]), []).append(row)
    parts = []
    for (r, n, k, count, full), group in shapes.items():
        magnitude = count - r * (n + k)  # n with DoRA, else 0
        formula = f"r(n+k) = {r}({n}+{k})" + (f" + {magnitude:,} (DoRA's magnitude)"
                                              if magnitude else "")
        where = f" on {len(group)} layers" if len(shapes) > 1 else ""
        parts.append(f"{formula} = {count:,} per layer against n k = {full:,}{where}")
    return "; ".join(parts)


def _finetune(args: argparse.Namespace) -> int:
    setup(args)
    if args.resume:
        cli_family.refuse_method_flags(args, "finetune --resume")
        return _finetune_resume(args)
    if args.source is None:
        raise ConfigError("finetune: name the base with --from DIR (a minilora checkpoint or a "
                          "Hugging Face GPT-2 directory), or continue a run with --resume DIR")
    if args.out is None:
        raise ConfigError("finetune: name the output directory with --out DIR")
    chosen = cli_family.check_flags(args)  # refuses --full --method, and flags left unused
    method = args.mode or "lora"  # the base: lora (as it is), qlora (4-bit first) or full
    names = CHECKPOINT_FILES if method == "full" else FINETUNE_FILES
    check_destination(args.out, overwrite=args.overwrite, names=names, what="--out",
                      inputs={"--from": args.source})
    given = {f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None}
    if chosen in cli_family.FAMILY and "lr" not in given:  # the method's own rate, decaying 10x
        given["lr"] = cli_family.DEFAULT_LR[chosen]
        given.setdefault("min_lr", given["lr"] / 10)
    cfg = TrainConfig(**given)
    B.manual_seed(cfg.seed)
    model, tokenizer, info = load_base(args.source)
    quant_cfg = {"quant_type": args.quant_type, "blocksize": args.quant_blocksize,
                 "double_quant": not args.no_double_quant} if method == "qlora" else None
    base = {k: v for k, v in info.items() if k != "base_extra"}
    if chosen in cli_family.FAMILY:
        data, config = _family_data(args, chosen, tokenizer, model, info)
        record = cli_family.prepare(model, chosen, config, quant_cfg)
        cli_family.check_savable(model, chosen, args)
        cli_family.print_trainable(model, chosen, config)
        return _finetune_run(args, model, data, cfg, tokenizer, {**record, **base}, resume=None)
    data = _dataset(args, tokenizer, model, info)
    config = _lora_config(args) if method != "full" else None
    if config is not None and config.init == "pissa" and (method == "qlora" or config.use_dora):
        raise ConfigError("finetune --init pissa rewrites the base weights (W - s B A); it works "
                          "with --lora, not with --qlora or --dora: use --init kaiming there")
    if config is not None:
        _check_targets(model, config)
    name = args.adapter_name or "default"
    _prepare(model, info, method, config, quant_cfg, name)
    _print_trainable(model, method, name)
    record = {"method": method, "adapter_name": name, "quant": quant_cfg,
              "lora": dataclasses.asdict(config) if config is not None else None, **base}
    return _finetune_run(args, model, data, cfg, tokenizer, record, resume=None)


def _family_data(args: argparse.Namespace, method: str, tokenizer: Any, model: GPT,
                 info: dict) -> tuple[Any, Any]:
    """The data and the family config of ``--method``: prompt and prefix tuning's N virtual
    tokens take context, so text and JSONL sequences are cut to leave them room and a task's
    sequences must fit beside them."""
    block = model.config.block_size
    N = cli_family.virtual_tokens(args, method, block, None) if args.task is None else 0
    data = _dataset(args, tokenizer, model, info, reserve=N)
    if args.task is not None:
        N = cli_family.virtual_tokens(args, method, block, data.block_size)
    return data, cli_family.method_config(args, method, N, ALL_LINEAR)


def _finetune_run(args: argparse.Namespace, model: GPT, data: Any, cfg: TrainConfig,
                  tokenizer: Any, record: dict, resume: str | None) -> int:
    method, name = record["method"], record.get("adapter_name")
    extra = {**data_description(data), "finetune": record}
    options: dict[str, Any] = {"tokenizer": tokenizer, "model_config": model.config,
                               "extra": extra}
    if method in cli_family.FAMILY:
        options.update(checkpoint_weights="trainable",
                       checkpoint_files=cli_family.adapter_bytes(model))
        method += " on a 4-bit base" if record.get("quant") else ""
    elif method != "full":
        options.update(checkpoint_weights="trainable",
                       checkpoint_files=_adapter_bytes(model, record, name))
    print(f"fine-tuning ({method}) on {_describe_data(data)} for {cfg.steps} steps; writing "
          f"{args.out}", flush=True)
    history = run_training(args, model, data, cfg, args.out, resume=resume, **options)
    report(history, data, cfg, args.out)
    return 0


def _describe_data(data: Any) -> str:
    if isinstance(data, TaskDataset):
        return f"task {data.task.name!r}"
    return f"{'text' if isinstance(data, TextDataset) else 'JSONL'} file {data.path!r}"


def _finetune_resume(args: argparse.Namespace) -> int:
    args.out = args.out or args.resume
    same = Path(args.out).resolve() == Path(args.resume).resolve()
    if same:  # written back where it is read: checked (and claimed) before it is read
        check_in_place(args.resume, "--resume")
    ck = load_checkpoint(args.resume)
    record = ck.extra.get("finetune")
    if not isinstance(record, dict) or ck.train_config is None:
        raise ConfigError(f"finetune --resume: {args.resume!r} is not a fine-tune (no finetune "
                          f"record); a training run resumes with `minilora train --resume`")
    model, tokenizer, info = _load_recorded_base(record, "finetune --resume", args.source)
    if args.source is not None:  # the base moved: the resumed save names where it is now
        record = {**record, "base": info["base"]}
    if record.get("method") in cli_family.FAMILY:
        cli_family.prepare(model, record["method"],
                           cli_family.config_from_record(record, "finetune --resume"),
                           record.get("quant"))
    else:
        config = lora.LoraConfig(**{**record["lora"], "target_modules": tuple(
            record["lora"]["target_modules"])}) if record.get("lora") else None
        _prepare(model, {**info, **record}, record["method"], config, record.get("quant"),
                 record["adapter_name"])
    data = dataset_from_record(ck.extra, tokenizer, "finetune --resume")
    given = {f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None}
    cfg = resumed_config(args, TrainConfig.from_dict(ck.train_config), given)
    if not same:  # nor where its base is read from: --overwrite there replaced the base
        names = CHECKPOINT_FILES if record["method"] == "full" else FINETUNE_FILES
        check_destination(args.out, overwrite=args.overwrite, names=names, what="--out",
                          inputs={"--resume": args.resume, "the fine-tune's base": info["base"]})
    print(f"resuming {args.resume!r} at step {ck.step} of {cfg.steps}", flush=True)
    return _finetune_run(args, model, data, cfg, tokenizer, record, resume=args.resume)


# ------------------------------------------------------------------- adapters on sample/eval

def adapter_record(directory: str) -> dict:
    """What a fine-tune directory says about its adapter (name, method, quantization, data), or
    a plain adapter directory's defaults (its folder name as the adapter's name)."""
    found = recovered(directory)  # a half-done swap first
    if not found.is_dir():  # else the first file looked for is named as missing
        what = "is a file, not an adapter directory" if found.exists() else \
            "the directory does not exist"
        raise CheckpointError(f"--adapter {directory!r}: {what}")
    if (found / META_FILE).is_file():
        # only checkpoint.json: the adapter's own files and the manifest are read and checked
        # when it is loaded, and its weights and optimizer state are not needed here
        extra = read_json(found / META_FILE, "--adapter").get("extra")
        record = (extra or {}).get("finetune") if isinstance(extra, dict) else None
        if not isinstance(record, dict):
            raise CheckpointError(f"--adapter {directory!r} holds a checkpoint, not a fine-tune's "
                                  f"adapter: pass it as --checkpoint")
        if record.get("method") == "full":
            raise ConfigError(f"--adapter {directory!r} is a full fine-tune (a whole model), not "
                              f"an adapter: pass it as --checkpoint")
        return {**record, "data": {k: v for k, v in extra.items() if k != "finetune"}}
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(directory).resolve().name) or "adapter"
    return {"adapter_name": name, "quant": None, "data": {}}


def attach_adapters(model: GPT, args: argparse.Namespace) -> dict | None:
    """Load every ``--adapter DIR`` into ``model`` and activate ``--use NAME`` (default: the
    first); returns the active adapter's record, or None for the bare base (no adapter, or
    ``--no-adapter``). QLoRA adapters quantize the base first, as they were trained on it. An
    adapter of the family (IA3, BitFit, bottleneck, prompt, prefix: its config's peft_type) loads
    alone, with ``ml.family.load_adapter`` (:func:`minilora.cli_family.attach`). Adapter weights
    that hold NaN or inf are said in a note (a base's are, by ``load_model``)."""
    with warnings.catch_warnings(record=True) as caught:  # the filters stay as they are
        record = _attach_adapters(model, args)
    for w in caught:  # said as they came, once each
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    said = any(issubclass(w.category, NonFiniteWarning) for w in caught)  # by the reader
    # the adapters' weights are what trains (the base's own were looked at by load_model)
    if record is not None and not said and not all_finite(model, trainable_only=True):
        warnings.warn(f"--adapter {', '.join(map(repr, args.adapter))}: the adapter's weights "
                      f"hold NaN or inf values, so the model's outputs are not numbers",
                      NonFiniteWarning, stacklevel=2)
    return record


def _check_same_kind_of_base(model: GPT, directory: str) -> None:
    """Refuse a fine-tune's adapter on a base of another vocabulary or context: its LoRA shapes
    may fit (they follow n_embd alone), but the model would read and write another alphabet
    (a text model's adapter on a task model printed bytes as digits, rc 0). A base of the same
    kind with other weights is a note (:func:`_note_other_bases`)."""
    meta = recovered(directory) / META_FILE
    if not meta.is_file():
        return  # plain adapter files record no base
    recorded = read_json(meta, "--adapter").get("model_config")
    if not isinstance(recorded, dict):
        return
    here = dataclasses.asdict(model.config)
    differ = [f"{k} {recorded[k]} (the base here: {here[k]})" for k in ("vocab_size", "block_size")
              if k in recorded and recorded[k] != here[k]]
    if differ:
        raise ConfigError(f"--adapter {directory!r} was fine-tuned on a base of another kind: "
                          f"{', '.join(differ)}; it learned that base's tokens and positions, so "
                          f"load it on a base like its own")


def _note_other_bases(checkpoint: str | None, dirs: list, records: list[dict]) -> None:
    """A note for each fine-tune among the adapters ``dirs`` (their ``adapter_record``) made from
    a base whose weights are not those of ``checkpoint`` (the SHA-256 its record keeps against
    the one the checkpoint's manifest lists): it loads, since its shapes fit, but it learned its
    update on another model."""
    if checkpoint is None:
        return
    here = listed_digest(Path(checkpoint), MODEL_FILE)
    for directory, record in zip(dirs, records):
        there = record.get("base_sha256")
        if here is None and there is not None and (Path(checkpoint) / MODEL_FILE).is_file():
            here = sha256_file(Path(checkpoint) / MODEL_FILE)  # no manifest: hash it once
        if there is not None and here is not None and there != here:
            warnings.warn(f"--adapter {directory!r} was fine-tuned from {record.get('base')!r}, "
                          f"whose weights differ from those of --checkpoint {checkpoint!r} "
                          f"(SHA-256): it learned its update on another model", stacklevel=3)


def _attach_adapters(model: GPT, args: argparse.Namespace) -> dict | None:
    dirs = args.adapter or []
    if args.no_adapter and dirs:  # it wins (a script may always pass --adapter), but says so
        warnings.warn(f"--no-adapter: the bare base, without --adapter {dirs[0]!r}"
                      f"{f' and {len(dirs) - 1} more' if len(dirs) > 1 else ''}", stacklevel=2)
    if args.no_adapter or not dirs:
        if args.use:
            raise ConfigError(f"--use {args.use!r} needs the adapter it names (--adapter DIR)")
        return None
    records = [adapter_record(d) for d in dirs]
    for d in dirs:
        _check_same_kind_of_base(model, d)
    _note_other_bases(getattr(args, "checkpoint", None), dirs, records)
    kinds = [cli_family.peft_type_in(d) for d in dirs]
    if any(kinds):  # a method of the family: detected from adapter_config.json's peft_type
        return cli_family.attach(model, dirs, records, kinds, args.use)
    names = [r["adapter_name"] for r in records]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter: two adapters are named alike ({names}); rename a folder")
    quants = {repr(r.get("quant")) for r in records if r.get("quant")}
    if len(quants) > 1:
        raise ConfigError("--adapter: the QLoRA adapters were trained on bases quantized "
                          "differently; load them one at a time")
    quant_cfg = next((r["quant"] for r in records if r.get("quant")), None)
    if quant_cfg is not None:
        quant.quantize_model(model, **quant_cfg)
    for directory, name in zip(dirs, names):
        _, keys = adapter_header(directory, "--adapter")
        if interop.is_peft_gpt2(keys):
            interop.import_peft(model, directory, name)
        else:
            lora.load_adapter(model, directory, name)
    use = args.use or names[0]
    if use not in names:
        raise ConfigError(f"--use {use!r}: the loaded adapters are {names}")
    lora.set_adapter(model, use)
    model.eval()
    return records[names.index(use)]


def add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """--adapter DIR (repeatable), --use NAME and --no-adapter, for sample and eval."""
    p.add_argument("--adapter", action="append", metavar="DIR", type=path_arg,
                   help="an adapter (a fine-tune directory, or adapter files from save_adapter "
                   "or PEFT) to put on the base; repeat it to load several")
    p.add_argument("--use", metavar="NAME", type=name_arg,
                   help="which loaded adapter is active (default: the "
                   "first); a fine-tune's name is its --adapter-name, a plain folder's its name")
    p.add_argument("--no-adapter", action="store_true", help="the bare base, no adapter")


# ------------------------------------------------------------------------------------ merge

def _weight_error(before: dict[str, Any], model: GPT) -> dict:
    """max and mean |W_float - W_4bit| over the layers that were quantized."""
    diffs = []
    for path, layer in model.named_modules():
        if isinstance(layer, quant.QuantLinear) and path in before:
            diffs.append(B.xp.abs(layer.dequantized_weight() - before[path]).reshape(-1))
    if not diffs:
        return {"max": 0.0, "mean": 0.0}
    d = B.xp.concatenate(diffs)
    return {"max": float(d.max()), "mean": float(d.mean())}


def _float_weights(model: GPT) -> dict[str, Any]:
    from .nn import Linear

    return {path: m.weight.data.copy() for path, m in model.named_modules()
            if isinstance(m, Linear) and path}


def _dequantize_lora_bases(model: GPT) -> None:
    """QuantLinear bases under LoRA layers back to float Linears (deq(Q)): a QLoRA adapter learned
    on top of deq(Q), so that is the base it merges into exactly."""
    for _, layer in lora.lora_layers(model):
        if layer.is_quantized:
            layer.base_layer = layer.base_layer.to_linear()


def _answers_changed(before: GPT, after: GPT, data: Any) -> str:
    """How a 4-bit merge changes what the model says: the share of held-out answers that change
    (task, JSONL) or the change of validation loss (text)."""
    if isinstance(data, TaskDataset):
        from .train import greedy_answers

        prompts, answers = data.heldout(min(500, data.n_heldout))
        a = greedy_answers(before, prompts, answers.shape[1])
        b = greedy_answers(after, prompts, answers.shape[1])
        return f"{(a != b).any(axis=1).mean():.1%} of {len(prompts)} held-out answers change"
    if isinstance(data, TextDataset):
        la, lb = validation_loss(before, data, 16), validation_loss(after, data, 16)
        return f"validation loss {la:.4f} -> {lb:.4f} ({lb - la:+.4f})"
    from .jsonl import greedy_completions

    n = min(500, data.n_heldout)
    a, b = greedy_completions(before, data, n), greedy_completions(after, data, n)
    changed = np.mean([not np.array_equal(x, y) for x, y in zip(a, b)])
    return f"{changed:.1%} of {n} held-out completions change"


def _merge(args: argparse.Namespace) -> int:
    setup(args)
    check_destination(args.out, overwrite=args.overwrite, names=CHECKPOINT_FILES, what="--out",
                      inputs=_inputs(args))
    model, ck = load_model(args.checkpoint)
    args.no_adapter, args.use = False, args.use
    record = attach_adapters(model, args)
    if cli_family.carries_family(model):
        cli_family.merge(model)  # IA3, BitFit; the others are refused, saying why
        what, update = f"the {record['method']} adapter", "the merged weights"
    else:
        _dequantize_lora_bases(model)
        lora.merge_and_unload(model)
        what, update = f"adapter {record['adapter_name']!r}", "W + s B A"
    into = args.into
    print(f"merged {what} into {args.checkpoint!r}", flush=True)
    # the merged model is the fine-tuned one: it was trained on the adapter's data (eval's
    # default task), when the adapter records it, not on the base's
    trained_on = record.get("data") or {}
    kept = {k: v for k, v in ck.extra.items() if not trained_on or k not in _DATA_KEYS}
    extra = {**kept, **trained_on, "merged": {"adapter": [str(Path(a).resolve())
                                                          for a in args.adapter], "into": into}}
    if into != "float32":
        before = _float_weights(model)
        merged_float = _copy(model)
        quant.quantize_model(model, quant_type=into, blocksize=args.quant_blocksize,
                             double_quant=not args.no_double_quant)
        err = _weight_error(before, model)
        data = _data_of(record, ck, model)
        changed = _answers_changed(merged_float, model, data) if data is not None else ""
        print(f"merging into {into} re-quantizes {update}: |delta W| lost max {err['max']:.4g}, "
              f"mean {err['mean']:.4g}{'; ' + changed if changed else ''}", flush=True)
        extra["merged"]["error"] = err
    save_checkpoint(args.out, model, model_config=model.config, tokenizer=ck.tokenizer,
                    extra=extra)
    print(f"merged checkpoint in {args.out}", flush=True)
    return 0


# what a checkpoint's extra says about the data it was trained on
_DATA_KEYS = ("task", "text", "jsonl", "n_heldout", "split_seed")


def _copy(model: GPT) -> GPT:
    # a deep copy, not GPT(config) + load_state_dict: after a merge of an adapter trained on a
    # 4-bit base the layers it did not touch are still QuantLinear, which a plain GPT lacks
    twin = copy.deepcopy(model)
    twin.eval()
    return twin


def _data_of(record: dict, ck: Any, model: GPT) -> Any:
    """The data the adapter (or else the base) was trained on, to measure a merge on."""
    for extra in (record.get("data") or {}, ck.extra):
        try:
            if "task" in extra:
                return task_dataset(extra)
            if "text" in extra or "jsonl" in extra:
                return dataset_from_record(extra, ck.tokenizer, "merge")
        except (ConfigError, CheckpointError):
            continue
    return None


def _inputs(args: argparse.Namespace) -> dict:
    """What a command reads that its --out must not replace: --checkpoint and each --adapter."""
    adapters = getattr(args, "adapter", None) or []  # --adapter is repeatable: a list
    return {"--checkpoint": getattr(args, "checkpoint", None),
            **{f"--adapter #{i + 1}" if len(adapters) > 1 else "--adapter": a
               for i, a in enumerate(adapters)}}


# --------------------------------------------------------------------------------- quantize

def _quantize(args: argparse.Namespace) -> int:
    setup(args)
    check_destination(args.out, overwrite=args.overwrite, names=CHECKPOINT_FILES, what="--out",
                      inputs=_inputs(args))
    model, ck = load_model(args.checkpoint)
    before = _float_weights(model)
    quant.quantize_model(model, quant_type=args.quant_type, blocksize=args.quant_blocksize,
                         double_quant=not args.no_double_quant)
    err = _weight_error(before, model)
    save_checkpoint(args.out, model, model_config=model.config, tokenizer=ck.tokenizer,
                    step=ck.step,  # a copy of the checkpoint: its step, as inspect shows it
                    extra={**ck.extra, "quantized": {"quant_type": args.quant_type,
                                                     "blocksize": args.quant_blocksize,
                                                     "double_quant": not args.no_double_quant}})
    bits = quant.bits_per_parameter(args.quant_blocksize, not args.no_double_quant)
    # the weights file against the weights file: the source's directory may hold an optimizer
    # state and a history too, which a quantized checkpoint has no use for
    size, old = ((Path(d) / MODEL_FILE).stat().st_size for d in (args.out, args.checkpoint))
    dq = "off" if args.no_double_quant else "on"
    print(f"quantized {len(before)} linear layers to {args.quant_type} (blocksize "
          f"{args.quant_blocksize}, double quantization {dq}): {bits:.3f} bits per weight; "
          f"{MODEL_FILE} {size:,} bytes (the float one {old:,}, {old / size:.1f}x); "
          f"|W - deq(Q(W))| max {err['max']:.4g}, mean {err['mean']:.4g}; checkpoint in "
          f"{args.out}", flush=True)
    return 0


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# --------------------------------------------------------------------------- export, import

def _export(args: argparse.Namespace) -> int:
    setup(args)
    if args.to == "peft" and not args.adapter:
        raise ConfigError("export --to peft writes an adapter: name it with --adapter DIR")
    names = ("config.json", "model.safetensors") if args.to == "hf" else ADAPTER_FILES
    check_destination(args.out, overwrite=args.overwrite, names=names, what="--out",
                      inputs=_inputs(args))
    model, _ = load_model(args.checkpoint)
    args.no_adapter = False
    record = attach_adapters(model, args)
    if not all_finite(model):  # as save_checkpoint: a file of NaN weights helps no one
        raise CheckpointError("export: the model (with its adapter, if any) holds NaN or inf "
                              f"weights; not writing them to {args.out!r}")
    if args.to == "peft":
        if cli_family.carries_family(model):
            what = f"PEFT {cli_family.export_peft(model, args.out)} adapter"
        else:
            interop.export_peft(model, args.out, record["adapter_name"])
            what = "PEFT adapter"
        print(f"{what} for Hugging Face GPT-2 in {args.out} (load it with "
              f"PeftModel.from_pretrained on `minilora export --to hf` of the base)", flush=True)
        return 0
    if record is not None and cli_family.carries_family(model):
        cli_family.merge(model)  # IA3, BitFit; the others are refused, saying why
    elif record is not None:
        _dequantize_lora_bases(model)
        lora.merge_and_unload(model)
    # HF GPT-2 files hold float weights: 4-bit layers (a 4-bit base, or the layers a QLoRA or
    # --qlora family adapter left alone) are written as deq(Q(W)), what the model computes with
    four_bit = [p for p, m in model.named_modules() if isinstance(m, quant.QuantLinear)]
    for path in four_bit:
        model.set_submodule(path, model.get_submodule(path).to_linear())
    interop.gpt_to_hf(model, args.out)
    notes = (["adapter merged"] if record else []) + \
        ([f"{len(four_bit)} 4-bit layers dequantized"] if four_bit else [])
    print(f"Hugging Face GPT-2 in {args.out}{' (' + '; '.join(notes) + ')' if notes else ''} "
          f"(GPT2LMHeadModel.from_pretrained loads it)", flush=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    setup(args)
    check_destination(args.out, overwrite=args.overwrite, names=CHECKPOINT_FILES, what="--out",
                      inputs={"--hf": args.hf})
    model, tokenizer, info = load_base(args.hf)
    save_checkpoint(args.out, model, model_config=model.config, tokenizer=tokenizer,
                    extra={"imported": {k: v for k, v in info.items() if k != "base_extra"}})
    half = [n for n in ("vocab.json", "merges.txt") if (Path(args.hf) / n).is_file()]
    none = ", no tokenizer" + (f" ({half[0]} is there, but a BPE tokenizer needs vocab.json and "
                               f"merges.txt both)" if len(half) == 1 else "")
    kinds = {"GPT2BPETokenizer": "BPE", "CharTokenizer": "character", "ByteTokenizer": "byte"}
    kind = kinds.get(type(tokenizer).__name__, type(tokenizer).__name__)
    print(f"imported {args.hf!r} ({model.num_parameters():,} parameters"
          f"{f', with its {kind} tokenizer' if tokenizer is not None else none}) into "
          f"{args.out}", flush=True)
    return 0


# ---------------------------------------------------------------------------------- inspect

def _dtype_names(params: list) -> str:
    """"float32", or "float32 and float16": the float dtypes ``params`` are stored in."""
    return " and ".join(sorted({str(p.data.dtype) for p in params})) or "float32"


def inspect_rows(path: str) -> list[tuple[str, str]]:
    """``(field, value)`` rows describing a checkpoint, fine-tune, adapter or HF directory, all
    from one save (:func:`~minilora.fileio.read_whole`)."""
    return read_whole(path, lambda: _inspect_rows(path), "inspect")


def _inspect_rows(path: str) -> list[tuple[str, str]]:
    where = recovered(path)  # a swap a kill left half done is finished first
    path = str(where)
    if not where.is_dir():
        raise CheckpointError(f"inspect: {path!r} is not a directory")
    rows = []
    try:
        status = "verified" if verify_manifest(where, "inspect", warn=False) else "none (unchecked)"
    except CheckpointError as exc:
        status = f"MISMATCH: {exc}"
    size = _dir_bytes(path)
    if (where / "checkpoint.json").is_file():
        ck = load_checkpoint(path)
        record = ck.extra.get("finetune")
        kind = "LoRA fine-tune" if ck.partial else "checkpoint"
        if record:
            kind = f"{record['method']} fine-tune of {record['base']}"
            if record.get("method") in cli_family.FAMILY and record.get("quant"):
                kind += " on a 4-bit base"
        if "quantized" in ck.extra or any(k.endswith(".absmax") for k in ck.weights):
            kind += " (4-bit)"
        rows += [("kind", kind), ("step", str(ck.step)), ("model", _config_text(ck.model_config))]
        if ck.partial:
            rows += cli_family.adapter_rows(path, ck.weights) or _adapter_rows(path)
        else:
            model = model_from_checkpoint(ck)
            trainable, total = lora.count_parameters(model)
            rows.append(("parameters", f"{total:,}"))
            held = sum(int(v.nbytes) for v in ck.weights.values())
            bits = f"{8 * held / max(total, 1):.3f}"
            floats = list(model.parameters())  # a 4-bit layer's weights are not among them
            packed = total - sum(p.size for p in floats)
            if packed > 0:  # the float embeddings, norms and biases weigh on the mean: say so
                rest = held - sum(int(p.data.nbytes) for p in floats)
                states = [m.quant_state for m in model.modules() if hasattr(m, "quant_state")]
                codes = 8 * sum(q.nbytes for q in states) / packed  # what `quantize` reports
                bits += (f" ({packed:,} quantized weights at {codes:.3f} in codes and scales, "
                         f"{8 * rest / packed:.3f} with each layer's code tables as the file "
                         f"holds them; the other {total - packed:,} in {_dtype_names(floats)})")
            rows.append(("bits per parameter", bits))
        for key in ("task", "text", "jsonl"):
            if key in ck.extra:
                rows.append(("data", f"{key}: {_short(ck.extra[key])}"))
    elif (where / CONFIG_NAME).is_file():
        rows += [("kind", "adapter")] + (cli_family.adapter_rows(path) or _adapter_rows(path))
    elif (where / "config.json").is_file():
        model = interop.gpt_from_hf(path)
        rows += [("kind", "Hugging Face GPT-2"), ("model", _config_text(model.config.to_dict())),
                 ("parameters", f"{model.num_parameters():,}")]
    else:
        raise CheckpointError(f"inspect: {path!r} holds neither a checkpoint, an adapter nor a "
                              f"Hugging Face model")
    rows += [("size on disk", f"{size:,} bytes"), ("manifest", status)]
    return rows


def _adapter_rows(path: str) -> list[tuple[str, str]]:
    config, infos = adapter_header(path, "inspect")
    numbers = sum(math.prod(i.shape) for i in infos.values())
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in infos if ".lora_A." in k})
    a = next((i for k, i in infos.items() if ".lora_A." in k), None)
    b = next((i for k, i in infos.items() if ".lora_B." in k), None)
    per_layer = ""
    if a is not None and b is not None:
        r, k, n = a.shape[0], a.shape[1], b.shape[0]
        per_layer = f"; r(n+k) = {r}({n}+{k}) = {r * (n + k):,} per layer against n k = {n * k:,}"
    return [("adapter", f"r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
                        f"targets {config.get('target_modules')}"),
            ("parameters", f"{numbers:,} trainable in {len(layers)} layers{per_layer}")]


def _config_text(config: dict | None) -> str:
    if not config:
        return "-"
    return ", ".join(f"{k}={config[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                  "vocab_size") if k in config)


def _short(value: Any) -> str:
    text = ", ".join(f"{k}={v}" for k, v in value.items() if k != "sha256") \
        if isinstance(value, dict) else str(value)
    return text if len(text) < 80 else text[:77] + "..."


def _inspect(args: argparse.Namespace) -> int:
    rows = inspect_rows(args.path)
    width = max(len(k) for k, _ in rows)
    print(f"{args.path}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


# ----------------------------------------------------------------------------------- parser

def _quant_flags(p: argparse.ArgumentParser, into: bool = False) -> None:
    if not into:
        p.add_argument("--quant-type", choices=quant.QUANT_TYPES, default="nf4",
                       help="the 4-bit code (default nf4, QLoRA's)")
    p.add_argument("--quant-blocksize", type=positive_int, default=64, metavar="N",
                   help="elements per absmax block (default 64; not the context's --block-size)")
    p.add_argument("--no-double-quant", action="store_true",
                   help="keep the absmax values in float32 (default: 8-bit, as QLoRA)")


def add_parsers(sub: Any, fmt: Any) -> None:
    """The workflow's sub-commands on the ``minilora`` parser."""
    f = sub.add_parser("finetune", formatter_class=fmt, help="LoRA, QLoRA, the PEFT family or "
                       "full fine-tuning of a base on a task, a text or prompt/completion pairs",
                       description="Fine-tune a base (a minilora checkpoint or a Hugging Face "
                       "GPT-2 directory) and save the adapter: LoRA by default, or another "
                       "method of the PEFT family with --method.\n\n"
                       "  minilora finetune --from runs/base --task nocarry --out runs/nocarry\n"
                       "  minilora finetune --from runs/base --task nocarry --qlora --out "
                       "runs/nocarry-q\n"
                       "  minilora finetune --from runs/base --task nocarry --method ia3 --out "
                       "runs/nocarry-ia3\n"
                       "  minilora finetune --from runs/long --task nocarry --method prompt "
                       "--virtual-tokens 8 --qlora --out runs/nocarry-prompt\n"
                       "  minilora finetune --from runs/story --text more.txt --target all-linear "
                       "--r 16 --out runs/more\n"
                       "  minilora finetune --from gpt2-dir --data pairs.jsonl --out runs/pairs\n"
                       "  minilora finetune --resume runs/nocarry       # continue it exactly")
    f.add_argument("--from", dest="source", metavar="DIR", type=path_arg,
                   help="the base: a minilora checkpoint "
                   "or a Hugging Face GPT-2 directory (config.json + model.safetensors)")
    add_out(f, "where the fine-tune is written", required=False)
    f.add_argument("--resume", metavar="DIR", type=path_arg,
                   help="continue the fine-tune saved in DIR")
    f.add_argument("--task", metavar="NAME", type=name_arg, help=f"a task: {', '.join(TASKS)}")
    f.add_argument("--digits", type=positive_int, default=None, metavar="K",
                   help="digits per operand of --task (default: the base's)")
    f.add_argument("--text", metavar="FILE", type=path_arg,
                   help="a UTF-8 text file (next-token loss)")
    f.add_argument("--data", metavar="FILE", type=path_arg,
                   help="a JSONL file of {\"prompt\", \"completion\"} "
                   "lines (loss on the completions only)")
    f.add_argument("--block-size", dest="block_size", type=positive_int, default=None,
                   metavar="N", help="context for --text (default and at most: the base's)")
    modes = f.add_mutually_exclusive_group()  # one method of training: "--full --qlora" is refused
    for flag, mode, text in (("--lora", "lora", "LoRA on the frozen base (default)"),
                             ("--qlora", "qlora", "quantize the base to 4 bits first (QLoRA); "
                              "combines with every --method: IA3, BitFit, bottleneck adapters, "
                              "prompt and prefix tuning all train on a 4-bit base (their own "
                              "parameters are float)"),
                             ("--full", "full", "train every weight, no adapter (takes no "
                              "--method)")):
        modes.add_argument(flag, dest="mode", action="store_const", const=mode, help=text)
    cli_family.add_method_flags(f)
    # LoRA's flags default to None, so that another --method refuses them instead of ignoring
    f.add_argument("--r", type=positive_int, default=None, metavar="R",
                   help="LoRA rank (default 8)")
    f.add_argument("--alpha", type=positive_float, default=None, metavar="X",
                   help="LoRA alpha; scaling = alpha / r (default 2 r)")
    f.add_argument("--lora-dropout", type=fraction, default=None, metavar="X",
                   help="dropout on the adapter's input (default 0)")
    f.add_argument("--target", default=None, metavar="NAMES",
                   help="comma list of module names, or all-linear (every linear layer but the "
                   "output head); default q_proj,v_proj as the LoRA paper (ia3: "
                   "k_proj,v_proj,mlp.proj)")
    f.add_argument("--rslora", action="store_true", help="scaling alpha / sqrt(r) (rsLoRA)")
    f.add_argument("--dora", action="store_true", help="DoRA: a learned magnitude per output")
    f.add_argument("--init", choices=INITS, default=None,
                   help="adapter init: kaiming (B = 0, default), gaussian or pissa")
    f.add_argument("--adapter-name", default=None, metavar="NAME", type=name_arg,
                   help="the LoRA adapter's name (default 'default')")
    _quant_flags(f)
    add_training_flags(f)
    add_common(f)
    f.set_defaults(func=_finetune)

    m = sub.add_parser("merge", formatter_class=fmt, help="fold an adapter into its base",
                       description="Merge an adapter into its base: W' = W + s B A, a checkpoint "
                       "that sample and eval read and that runs at the base's cost. --into a "
                       "4-bit type re-quantizes W' and prints the error that adds. Of the "
                       "family, IA3 (W' = diag(l) W, or W diag(l)) and BitFit (its biases) merge; "
                       "bottleneck adapters, prompt and prefix tuning are refused, saying why."
                       "\n\n"
                       "  minilora merge --checkpoint runs/base --adapter runs/nocarry --out "
                       "runs/merged\n"
                       "  minilora merge --checkpoint runs/base --adapter runs/nocarry --into nf4 "
                       "--out runs/merged-nf4")
    m.add_argument("--checkpoint", required=True, metavar="DIR", type=path_arg, help="the base")
    m.add_argument("--adapter", action="append", required=True, metavar="DIR", type=path_arg,
                   help="the adapter to merge")
    m.add_argument("--use", metavar="NAME", type=name_arg,
                   help="with several --adapter: which one to merge")
    m.add_argument("--into", choices=("float32", *quant.QUANT_TYPES), default="float32",
                   help="keep the merged weights in float32 (default) or re-quantize them")
    add_out(m, "the merged checkpoint")
    _quant_flags(m, into=True)
    add_common(m)
    m.set_defaults(func=_merge)

    q = sub.add_parser("quantize", formatter_class=fmt, help="a 4-bit copy of a checkpoint",
                       description="Quantize every linear layer of a checkpoint to 4 bits "
                       "(blockwise absmax, NF4 by default, double quantization on) and save it; "
                       "it loads back as QuantLinear layers without re-quantizing.\n\n"
                       "  minilora quantize --checkpoint runs/base --out runs/base-nf4")
    q.add_argument("--checkpoint", required=True, metavar="DIR", type=path_arg,
                   help="the float checkpoint")
    add_out(q, "the 4-bit checkpoint")
    _quant_flags(q)
    add_common(q)
    q.set_defaults(func=_quantize)

    e = sub.add_parser("export", formatter_class=fmt, help="to Hugging Face GPT-2 or PEFT files",
                       description="Write a checkpoint as a Hugging Face GPT-2 directory (--to "
                       "hf; with --adapter, merged) or an adapter as a PEFT adapter for it "
                       "(--to peft: LoRA, IA3, prompt and prefix tuning; PEFT has no BitFit or "
                       "bottleneck adapter).\n\n"
                       "  minilora export --checkpoint runs/base --to hf --out hf/base\n"
                       "  minilora export --checkpoint runs/base --adapter runs/nocarry --to peft "
                       "--out hf/nocarry")
    e.add_argument("--checkpoint", required=True, metavar="DIR", type=path_arg,
                   help="the base checkpoint")
    add_adapter_flags(e)
    e.add_argument("--to", required=True, choices=("hf", "peft"), help="the format")
    add_out(e, "where the files go")
    add_common(e)
    e.set_defaults(func=_export)

    i = sub.add_parser("import", formatter_class=fmt, help="a Hugging Face GPT-2 as a checkpoint",
                       description="Read a Hugging Face GPT-2 directory (config.json + "
                       "model.safetensors, and its tokenizer from vocab.json + merges.txt) into "
                       "a minilora checkpoint.\n\n"
                       "  minilora import --hf gpt2-dir --out runs/gpt2")
    i.add_argument("--hf", required=True, metavar="DIR", type=path_arg,
                   help="the Hugging Face directory")
    add_out(i, "the checkpoint to write")
    add_common(i)
    i.set_defaults(func=_import)

    s = sub.add_parser("inspect", formatter_class=fmt, help="what a directory holds",
                       description="Show what a checkpoint, fine-tune, adapter or Hugging Face "
                       "directory holds: its kind, config, parameters (for a LoRA adapter r(n+k) "
                       "per layer; for the family's, the method, its trainable parameters and "
                       "whether it merges), size on disk, bits per parameter and whether its "
                       "manifest checks out.\n\n  minilora inspect runs/nocarry")
    s.add_argument("path", metavar="PATH", type=path_arg, help="the directory")
    add_common(s)
    s.set_defaults(func=_inspect)


__all__ = ["add_parsers", "add_adapter_flags", "attach_adapters", "adapter_record", "load_base",
           "inspect_rows", "dataset_from_record", "ALL_LINEAR"]
