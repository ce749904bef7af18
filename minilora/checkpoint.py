"""Checkpoints: weights in safetensors, everything else in JSON; no pickle anywhere.

A checkpoint is a directory holding

* ``model.safetensors``      the model's state dict (every key, tied ones included);
* ``optimizer.safetensors``  the optimiser's per-parameter arrays, keyed ``<param>.<name>``
  (for AdamW ``exp_avg`` and ``exp_avg_sq``), when an optimiser is saved;
* ``checkpoint.json``        the model config, tokenizer, step, training config, the number of
  shards the run cut each batch into, the backend it ran on, the optimiser's step count and
  learning rates, the random generators' states, and a SHA-256 of each safetensors file;
* ``history.json``           (written by the training loop) the loss curve so far;
* ``manifest.json``          every file's size and SHA-256, written last.

The directory is written whole or not at all (:mod:`minilora.fileio`): into a sibling staging
directory, then swapped in, so a kill or a full disk at any moment leaves the previous checkpoint
or the new one, never a mix. Loading finishes or undoes a half-done swap, verifies the manifest,
and checks every size the files claim against each other before the model is built.

Resuming restores the weights, the optimiser, the data sampler's generator and minilora's global
generator (``backend.host_rng``, which also drives dropout on the NumPy backend) and, for a run on
a device (CuPy, or the strict stand-in for it), the device generator that draws its dropout masks
(``backend.generator_state``), so a resumed run continues exactly as an uninterrupted one would,
bit for bit on the CPU. The shard count is part of the run (a step's sums depend on it): the
checkpoint records it, and a resumed run keeps it on whatever backend it continues.

Across backends the weights, the optimiser and the host generators carry over exactly, but a
device run's dropout masks come from the device generator and a CPU run's from the host one, so a
run with dropout that moves between the host and a device continues as a valid run, not as the
same one; without dropout the two differ only by the rounding of their kernels (which on a GPU is
not NumPy's: bits are promised on one backend, not across them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as B
from .data import Tokenizer, tokenizer_from_dict
from .errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    MiniLoraError,
    NonFiniteWarning,
    StateDictError,
    check_int,
    check_path,
    is_int,
)
from .fileio import (
    MANIFEST,
    atomic_directory,
    read_whole,
    recover,
    sha256_file,
    verify_manifest,
    warn_no_manifest,
)
from .nn import Module
from .optim import Optimizer
from .quant.bnb_format import check_quantized_file
from .tensorfile import nonfinite_keys, read_header, read_json, read_tensors, safetensors_bytes

FORMAT = "minilora-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "checkpoint.json"


def _as_dict(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise CheckpointError(f"save_checkpoint: a config must be a dataclass or a dict, got "
                          f"{type(config).__name__}")


def _host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: B.to_numpy(v) for k, v in arrays.items()}


def _optimizer_param_names(model: Module, optimizer: Optimizer) -> list[str]:
    """The model's name of each parameter the optimiser updates, in the optimiser's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise CheckpointError(f"checkpoint: optimizer parameters {missing} do not belong to the "
                              f"model being saved")
    return [names[id(p)] for p in params]


def _shards_to_save(shards: Any, train_config: Any) -> int | None:
    """The shard count a checkpoint records: ``shards``, else the training config's."""
    if shards is None and train_config is not None:
        shards = (_as_dict(train_config) or {}).get("shards")
    if shards is not None and not (is_int(shards) and shards >= 1):
        raise CheckpointError(f"save_checkpoint: shards must be an integer >= 1, got "
                              f"{shards!r:.40}")
    return None if shards is None else int(shards)


HISTORY_FILE = "history.json"
# what a checkpoint directory may hold; one holding only these (older saves had no manifest) is
# a checkpoint that a new save may replace
FILES = (MODEL_FILE, OPTIMIZER_FILE, META_FILE, HISTORY_FILE)


# ---------------------------------------------------------------------------------- save

def all_finite(model: Module, trainable_only: bool = False) -> bool:
    """True when every parameter of ``model`` (or every one that requires grad) is finite (one
    device-to-host sync in all)."""
    flags = [B.xp.isfinite(p.data).all() for p in model.parameters()
             if p.requires_grad or not trainable_only]
    return bool(B.xp.stack(flags).all()) if flags else True


def _plain_name(name: Any) -> bool:
    """True for a file name of its own ("history.json"), not a path ("../x", "/etc/x", "a/b")."""
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")


def save_checkpoint(directory: str | Path, model: Module, *, model_config: Any = None,
                    tokenizer: Tokenizer | None = None, optimizer: Optimizer | None = None,
                    step: int = 0, train_config: Any = None,
                    data_rng: np.random.Generator | None = None,
                    extra: dict | None = None, files: dict[str, bytes] | None = None,
                    weights: str = "all", shards: int | None = None) -> Path:
    """Write a checkpoint of ``model`` (and optionally its optimiser) to ``directory``, whole.

    ``model_config`` and ``train_config`` are dataclasses or dicts (stored as JSON), ``extra`` any
    JSON-able dict (the CLI keeps the task there). ``data_rng`` is the generator the training loop
    samples batches with; its state, minilora's global generator state and, on a device, the
    device generator's state are saved so that training can resume exactly. ``shards``: the
    number of shards the run cut each batch into (default: ``train_config``'s ``shards``, when
    it has one), recorded so that a resumed run keeps it. ``files``: more files to put in the
    same save (the training loop's ``history.json``, a fine-tune's adapter files).
    ``weights="trainable"`` stores only the parameters with ``requires_grad`` (a LoRA fine-tune:
    its base lives elsewhere); :func:`restore` then fills exactly those. A directory already at
    ``directory`` is replaced as a whole, and only if it is a save. Weights holding NaN or inf are
    refused: they would replace a good save with a useless one. Returns the directory.
    """
    check_path(directory, "save_checkpoint: directory")
    if not isinstance(model, Module):
        raise InvalidArgumentError(f"save_checkpoint: model must be a minilora Module, got "
                                   f"{type(model).__name__}")
    directory = Path(directory)
    shards = _shards_to_save(shards, train_config)
    step = check_int(step, "save_checkpoint: step", minimum=0)
    own = (MODEL_FILE, OPTIMIZER_FILE, META_FILE, MANIFEST)  # what this function writes
    for name in files or {}:  # each a plain name beside those, bytes inside: nothing escapes
        if not _plain_name(name) or name in own or not isinstance(files[name], (bytes, bytearray)):
            raise InvalidArgumentError(f"save_checkpoint: files must map plain file names other "
                                       f"than {list(own)} to bytes, got {name!r}: "
                                       f"{type(files[name]).__name__}")
    if not all_finite(model):
        raise CheckpointError(f"save_checkpoint: the model holds NaN or inf weights; not writing "
                              f"them to {str(directory)!r}")
    meta = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model_config": _as_dict(model_config), "train_config": _as_dict(train_config),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "optimizer": None, "sha256": {}, "extra": extra or {},
        "shards": shards, "backend": B.get_backend(),
        "rng": {"host": B.host_rng().bit_generator.state,
                "data": data_rng.bit_generator.state if data_rng is not None else None,
                # on NumPy the host generator above draws the dropout masks too
                "device": B.generator_state() if B.on_device() else None},
    }
    if weights not in ("all", "trainable"):
        raise CheckpointError(f"save_checkpoint: weights must be 'all' or 'trainable', got "
                              f"{weights!r}")
    state = model.state_dict()
    if weights == "trainable":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
        meta["weights"] = "trainable"
    blobs = {MODEL_FILE: safetensors_bytes(_host(state))}
    if optimizer is not None:
        sd = optimizer.state_dict()
        names = _optimizer_param_names(model, optimizer)
        arrays = {f"{n}.{k}": v for n, s in zip(names, sd["state"]) for k, v in s.items()}
        host = _host(arrays)
        bad = nonfinite_keys(host)
        if bad:  # the moments would make the first resumed step NaN
            raise CheckpointError(f"save_checkpoint: the optimizer state holds NaN or inf "
                                  f"({bad[0]!r} first); not writing it to {str(directory)!r}")
        blobs[OPTIMIZER_FILE] = safetensors_bytes(host)
        meta["optimizer"] = {"type": type(optimizer).__name__, "step": sd["step"],
                             "lr": sd["lr"], "params": names,
                             "state_keys": [sorted(s) for s in sd["state"]]}
    meta["sha256"] = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    try:
        # allow_nan=False: NaN is not JSON, and load_checkpoint would refuse its own save
        blobs[META_FILE] = (json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
                            + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save_checkpoint: a config or extra value is not JSON-able "
                              f"({exc})") from exc
    with atomic_directory(directory, FILES) as stage:
        for name, data in {**blobs, **(files or {})}.items():
            stage.write_bytes(name, data)
    return directory


# ---------------------------------------------------------------------------------- load

@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read; pass it to :func:`restore` to resume training."""

    directory: Path
    step: int
    weights: dict[str, np.ndarray]
    model_config: dict | None
    train_config: dict | None
    tokenizer: Tokenizer | None
    optimizer: dict | None  # "type", "step", "lr", "params", "state_keys" and "arrays"
    rng: dict  # "host", "data" and "device" (None when saved on NumPy) generator states
    extra: dict = field(default_factory=dict)
    partial: bool = False  # True: ``weights`` holds only the trainable parameters
    shards: int | None = None  # the shards the run cut each batch into (None: not recorded)
    backend: str | None = None  # the backend it was saved on (None: an older save)


# checkpoint.json: field -> the JSON types it may hold (None: may be null)
_META_TYPES = {"step": (int,), "model_config": (dict, None), "train_config": (dict, None),
               "tokenizer": (dict, None), "optimizer": (dict, None), "sha256": (dict,),
               "extra": (dict,), "rng": (dict,), "shards": (int, None), "backend": (str, None)}
_OPT_TYPES = {"step": (int,), "lr": (list,), "params": (list,), "state_keys": (list,)}


def _check_fields(obj: dict, types: dict, where: str, prefix: str = "") -> None:
    for key, kinds in types.items():
        value = obj.get(key)
        ok = (value is None and None in kinds) or any(
            k is not None and isinstance(value, k) and not (k is int and isinstance(value, bool))
            for k in kinds)
        if not ok:
            names = " or ".join("null" if k is None else {dict: "an object", list: "a list",
                                                           int: "an integer", str: "a string"}[k]
                                for k in kinds)
            raise CheckpointError(f"{where}: field {prefix}{key!r} must be {names}, got "
                                  f"{value!r:.80}")


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a minilora checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{where} has checkpoint version {meta.get('version')!r}; "
                              f"this minilora reads version {VERSION}")
    _check_fields(meta, _META_TYPES, where)
    if meta["step"] < 0:
        raise CheckpointError(f"{where}: field 'step' must be >= 0, got {meta['step']}")
    if meta.get("shards") is not None and meta["shards"] < 1:
        raise CheckpointError(f"{where}: field 'shards' must be >= 1, got {meta['shards']}")
    if meta["optimizer"] is not None:
        _check_fields(meta["optimizer"], _OPT_TYPES, where, "optimizer.")


def _check_against_config(infos: dict, config: dict, where: str) -> None:
    """The sizes ``model_config`` claims against the shapes in the weights file's header, before
    anything of that size is allocated."""
    sizes = ("vocab_size", "block_size", "n_embd", "n_layer")
    if not all(k in config for k in sizes):
        return  # not a GPT's config: the shapes are checked when the state dict is loaded
    V, T, C, L = (config[k] for k in sizes)
    bad = [k for k in sizes if not is_int(config[k])]
    if bad:
        raise CheckpointError(f"{where}: model_config.{bad[0]} must be an integer, got "
                              f"{config[bad[0]]!r}")
    small = [k for k in sizes if config[k] < 1]
    if small:  # else the shapes below name a (-5, 128) embedding, which no file can hold
        raise CheckpointError(f"{where}: model_config.{small[0]} must be at least 1, got "
                              f"{config[small[0]]}")
    claims = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for key, shape in claims.items():
        found = infos[key].shape if key in infos else None
        if found != shape:
            raise CheckpointError(f"{where}: model_config says {key} is {shape}, the weights file "
                                  f"holds {found}")
    layers = {int(k.split(".")[1]) for k in infos if k.startswith("h.") and
              k.split(".")[1].isdigit()}
    if layers != set(range(L)):
        raise CheckpointError(f"{where}: model_config says n_layer={L}, the weights file holds "
                              f"{len(layers)} blocks")


def _host_state(state: Any, where: str, key: str) -> Any:
    """A generator state from JSON, checked by setting it on a fresh generator."""
    try:
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: field 'rng.{key}' is not a valid random generator state "
                              f"({exc!r:.100})") from None
    return state


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (no pickle involved).

    A swap that a kill interrupted is finished or undone first; the manifest (or, in older saves,
    the digests in checkpoint.json) is verified; every field of checkpoint.json is type-checked;
    the weights file's shapes must agree with ``model_config`` before any tensor is read; the
    tokenizer must have the model's vocabulary size. Raises CheckpointError naming the path and
    the field or file when anything is missing, unreadable, corrupt or inconsistent. What it
    returns comes from one save, even while a run saves there (:func:`~minilora.fileio.read_whole`).
    """
    return read_whole(directory, lambda: _read_checkpoint(directory), "load_checkpoint")


def _read_checkpoint(directory: str | Path) -> Checkpoint:
    found = recover(directory)
    if found is None or not Path(found).is_dir():
        what = "is a file, not a directory" if found is not None and Path(found).exists() \
            else "the directory does not exist"
        raise CheckpointError(f"no checkpoint at {str(directory)!r}: {what}")
    directory = Path(found)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {str(directory)!r}: {META_FILE} is missing")
    has_manifest = verify_manifest(directory, "load_checkpoint") \
        if (directory / MANIFEST).exists() else False
    where = repr(str(meta_path))
    meta = read_json(meta_path, "load_checkpoint")
    _check_meta(meta, where)
    digests = meta["sha256"]
    for name in (MODEL_FILE, *digests):
        if not _plain_name(name):  # else it names a file elsewhere
            raise CheckpointError(f"{where}: field 'sha256' lists {name!r}, which is not a file "
                                  f"of the checkpoint")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint at {str(directory)!r} is incomplete: {name} is "
                                  f"missing")
        if not has_manifest and name in digests and sha256_file(path) != digests[name]:
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or from another "
                                  f"save: its SHA-256 differs from the one in {META_FILE}")
    if meta.get("weights", "all") not in ("all", "trainable"):
        raise CheckpointError(f"{where}: field 'weights' must be 'all' or 'trainable', got "
                              f"{meta.get('weights')!r:.40}")
    if meta["model_config"] is not None and meta.get("weights", "all") == "all":
        infos, _ = read_header(directory / MODEL_FILE, "load_checkpoint")
        _check_against_config(infos, meta["model_config"], where)
    # integer tensors only as the codes of 4-bit layers, each checked against its quant-state
    # blob from the header before the file is read (minilora.quant.bnb_format)
    quantized = check_quantized_file(directory / MODEL_FILE,
                                     read_header(directory / MODEL_FILE, "load_checkpoint")[0],
                                     "load_checkpoint")
    weights = read_tensors(directory / MODEL_FILE, "load_checkpoint", float_dtype=None,
                           floats_only=not quantized)
    opt = meta["optimizer"]
    if opt is not None:
        if OPTIMIZER_FILE not in digests and not (directory / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"checkpoint at {str(directory)!r} is incomplete: "
                                  f"{OPTIMIZER_FILE} is missing")
        opt = {**opt, "arrays": read_tensors(directory / OPTIMIZER_FILE, "load_checkpoint",
                                             float_dtype=None, floats_only=True)}
    tok = meta["tokenizer"]
    try:
        tokenizer = tokenizer_from_dict(tok) if tok is not None else None
    except (ConfigError, InvalidArgumentError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: field 'tokenizer' is not a valid tokenizer "
                              f"({exc})") from None
    config = meta["model_config"]
    if tokenizer is not None and config is not None and \
            tokenizer.vocab_size != config.get("vocab_size"):
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model's vocabulary (model_config.vocab_size) has "
                              f"{config.get('vocab_size')}; the checkpoint is inconsistent")
    rng = meta["rng"]
    for key in ("host", "data"):
        if rng.get(key) is not None:
            _host_state(rng[key], where, key)
    if not isinstance(rng.get("device"), (dict, type(None))):  # checked in full when restored
        raise CheckpointError(f"{where}: field 'rng.device' must be an object or null, got "
                              f"{rng.get('device')!r:.80}")
    if not has_manifest:  # after every check: a refused checkpoint is one line, not two
        warn_no_manifest(directory, "load_checkpoint", f"by the digests in {META_FILE}")
    shards = meta.get("shards")
    if shards is None and is_int((meta["train_config"] or {}).get("shards")):
        shards = meta["train_config"]["shards"]  # saved before checkpoints recorded it
    return Checkpoint(directory=directory, step=meta["step"], weights=weights,
                      model_config=config, train_config=meta["train_config"],
                      tokenizer=tokenizer, optimizer=opt, rng=rng, extra=meta["extra"],
                      partial=meta.get("weights", "all") == "trainable", shards=shards,
                      backend=meta.get("backend"))


def restore(checkpoint: Checkpoint, model: Module, optimizer: Optimizer | None = None,
            data_rng: np.random.Generator | None = None, restore_global_rng: bool = True) -> int:
    """Load a checkpoint's state into ``model`` (and ``optimizer``, ``data_rng``, minilora's global
    generators) in place; returns the step to continue from.

    The optimiser must update the same parameters, by name, as the one that was saved. On a
    device the device generator is restored too, when the checkpoint was saved on a device (CuPy
    and the strict stand-in share one generator); a run that moves between the host and a device
    draws its dropout masks from another stream from then on.
    """
    where = str(checkpoint.directory)
    try:
        if checkpoint.partial:  # only the trainable parameters were saved: exactly those
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(checkpoint.weights) != trainable:
                raise StateDictError(f"it holds {sorted(checkpoint.weights)[:3]}... "
                                     f"({len(checkpoint.weights)} tensors), the model trains "
                                     f"{sorted(trainable)[:3]}... ({len(trainable)})")
            model.load_state_dict(checkpoint.weights, strict=False)
        else:
            model.load_state_dict(checkpoint.weights)
    except StateDictError as exc:
        raise CheckpointError(f"checkpoint at {where!r} does not fit this model: {exc}") from exc
    if optimizer is not None:
        opt = checkpoint.optimizer
        if opt is None:
            raise CheckpointError(f"checkpoint at {where!r} holds no optimizer state")
        names = _optimizer_param_names(model, optimizer)
        if names != opt["params"]:
            raise CheckpointError(f"checkpoint at {where!r}: the optimizer updates parameters "
                                  f"{names[:4]}... ({len(names)}), the saved one "
                                  f"{opt['params'][:4]}... ({len(opt['params'])})")
        arrays = opt["arrays"]
        try:
            state = [{k: arrays[f"{n}.{k}"] for k in keys}
                     for n, keys in zip(opt["params"], opt["state_keys"])]
        except KeyError as exc:
            raise CheckpointError(f"checkpoint at {where!r}: optimizer array {exc} is "
                                  f"missing") from exc
        try:
            optimizer.load_state_dict({"step": opt["step"], "lr": opt["lr"], "state": state})
        except (StateDictError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint at {where!r}: {exc}") from exc
    rng = checkpoint.rng or {}
    if data_rng is not None:
        if rng.get("data") is None:
            raise CheckpointError(f"checkpoint at {where!r} holds no data sampler state")
        data_rng.bit_generator.state = rng["data"]
    if restore_global_rng and rng.get("host") is not None:
        B.host_rng().bit_generator.state = rng["host"]
    if restore_global_rng and rng.get("device") is not None and B.on_device():
        try:  # a state of another kind of generator is left unapplied (the backend says so)
            B.set_generator_state(rng["device"])
        except (MiniLoraError, TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint at {where!r}: field 'rng.device' is not a valid "
                                  f"{B.get_backend()} generator state ({exc!r:.100})") from None
    return checkpoint.step


def load_model(directory: str | Path) -> tuple[Module, Checkpoint]:
    """Build the GPT a checkpoint describes and load its weights: ``(model, checkpoint)``.

    The model is in eval mode. A quantized checkpoint is recognised by its keys: every layer
    with a ``<path>.weight.quant_state.*`` tensor (bitsandbytes' layout, see
    :mod:`minilora.quant.bnb_format`) comes back as the QuantLinear it was saved as, bit for bit,
    without re-quantizing (:func:`minilora.quant.load_quantized_layers`). LoRA-adapted
    models (a 4-bit base included) are rebuilt by the caller: ``GPT(config)``, ``inject_lora``,
    ``load_quantized_layers(model, checkpoint.weights)``, then :func:`restore` fills them.
    """
    ckpt = load_checkpoint(directory)
    return model_from_checkpoint(ckpt), ckpt


def model_from_checkpoint(ckpt: Checkpoint) -> Module:
    """The GPT a loaded checkpoint describes, its weights in place, in eval mode (what
    :func:`load_model` builds, for a caller that already holds the :class:`Checkpoint`)."""
    from .gpt import GPT, GPTConfig
    from .quant.model import load_quantized_layers

    if ckpt.partial:
        base = (ckpt.extra.get("finetune") or {}).get("base", "its base")
        raise CheckpointError(f"{str(ckpt.directory)!r} holds only what a fine-tune trained (an "
                              f"adapter), not a whole model: load its base ({base}) and the "
                              f"adapter on top (sample/eval --checkpoint BASE --adapter "
                              f"{ckpt.directory})")
    if ckpt.model_config is None:
        raise CheckpointError(f"checkpoint at {str(ckpt.directory)!r} has no model_config, so the "
                              f"model cannot be rebuilt; build it yourself and call restore()")
    try:
        model = GPT(GPTConfig.from_dict(ckpt.model_config))
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint at {str(ckpt.directory)!r}: model_config "
                              f"{ckpt.model_config} does not fit GPTConfig ({exc})") from exc
    try:
        load_quantized_layers(model, ckpt.weights)  # none for a float checkpoint
    except StateDictError as exc:
        raise CheckpointError(f"checkpoint at {str(ckpt.directory)!r} does not fit this model: "
                              f"{exc}") from exc
    restore(ckpt, model, restore_global_rng=False)
    if not all_finite(model):  # loaded (inspect and eval may want to look), but said
        warnings.warn(f"{str(ckpt.directory)!r}: the weights hold NaN or inf values, so the "
                      f"model's outputs are not numbers", NonFiniteWarning, stacklevel=2)
    model.eval()
    return model


__all__ = ["save_checkpoint", "load_checkpoint", "restore", "load_model", "model_from_checkpoint",
           "Checkpoint",
           "all_finite", "MODEL_FILE", "OPTIMIZER_FILE", "META_FILE", "HISTORY_FILE", "FILES"]
