"""Checkpoints: weights in safetensors, everything else in JSON; no pickle anywhere.

A checkpoint is a directory holding

* ``model.safetensors``      the model's state dict (every key, tied ones included);
* ``optimizer.safetensors``  the optimiser's per-parameter arrays, keyed ``<param>.<name>``
  (for AdamW ``exp_avg`` and ``exp_avg_sq``), when an optimiser is saved;
* ``checkpoint.json``        the model config, tokenizer, step, training config, the optimiser's
  step count and learning rates, the random generators' states, and a SHA-256 of each
  safetensors file.

Each file is written to a temporary file in the same directory and moved into place with
``os.replace``, which is atomic: a crash leaves the old file or the new one, never half of one.
The JSON is written last and names the digests of the weight files it belongs to, so a checkpoint
whose files come from two different saves is detected on load rather than silently mixed.

Resuming restores the weights, the optimiser, the data sampler's generator and minilora's global
generator (``backend.host_rng``, which also drives dropout on the NumPy backend), so a resumed run
continues exactly as an uninterrupted one would, bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as B
from .data import Tokenizer, tokenizer_from_dict
from .errors import CheckpointError, ConfigError, StateDictError
from .fileio import atomic_write_bytes, atomic_write_json
from .nn import Module
from .optim import Optimizer

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


def _safetensors_bytes(arrays: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(B.to_numpy(v)) for k, v in arrays.items()})


def _optimizer_param_names(model: Module, optimizer: Optimizer) -> list[str]:
    """The model's name of each parameter the optimiser updates, in the optimiser's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise CheckpointError(f"checkpoint: optimizer parameters {missing} do not belong to the "
                              f"model being saved")
    return [names[id(p)] for p in params]


# ---------------------------------------------------------------------------------- save

def save_checkpoint(directory: str | Path, model: Module, *, model_config: Any = None,
                    tokenizer: Tokenizer | None = None, optimizer: Optimizer | None = None,
                    step: int = 0, train_config: Any = None,
                    data_rng: np.random.Generator | None = None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint of ``model`` (and optionally its optimiser) into ``directory``.

    ``model_config`` and ``train_config`` are dataclasses or dicts (stored as JSON), ``extra`` any
    JSON-able dict (the CLI keeps the task there). ``data_rng`` is the generator the training loop
    samples batches with; its state and minilora's global generator state are saved so that
    training can resume exactly. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    model_bytes = _safetensors_bytes(model.state_dict())
    atomic_write_bytes(directory / MODEL_FILE, model_bytes)
    files[MODEL_FILE] = hashlib.sha256(model_bytes).hexdigest()
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        names = _optimizer_param_names(model, optimizer)
        arrays = {f"{n}.{k}": v for n, s in zip(names, sd["state"]) for k, v in s.items()}
        opt_bytes = _safetensors_bytes(arrays)
        atomic_write_bytes(directory / OPTIMIZER_FILE, opt_bytes)
        files[OPTIMIZER_FILE] = hashlib.sha256(opt_bytes).hexdigest()
        opt_meta = {"type": type(optimizer).__name__, "step": sd["step"], "lr": sd["lr"],
                    "params": names, "state_keys": [sorted(s) for s in sd["state"]]}
    meta = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model_config": _as_dict(model_config), "train_config": _as_dict(train_config),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "optimizer": opt_meta, "sha256": files, "extra": extra or {},
        "rng": {"host": B.host_rng().bit_generator.state,
                "data": data_rng.bit_generator.state if data_rng is not None else None},
    }
    try:
        atomic_write_json(directory / META_FILE, meta)
    except TypeError as exc:
        raise CheckpointError(f"save_checkpoint: a config or extra value is not JSON-able "
                              f"({exc})") from exc
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
    rng: dict
    extra: dict = field(default_factory=dict)


def _read_safetensors(path: Path, digest: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or from another save: "
                              f"its SHA-256 differs from the one in {META_FILE}")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"checkpoint file {str(path)!r} is not valid safetensors "
                              f"({exc})") from exc


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (no pickle involved).

    Raises CheckpointError naming the path when the directory or a file is missing, unreadable,
    corrupt, or not a minilora checkpoint.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {str(directory)!r}: the directory does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {str(directory)!r}: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} is not valid JSON "
                              f"({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(meta_path)!r} is not a minilora checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{str(meta_path)!r} has checkpoint version {meta.get('version')!r}; "
                              f"this minilora reads version {VERSION}")
    digests = meta.get("sha256", {})
    for name in digests:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint at {str(directory)!r} is incomplete: {name} is "
                                  f"missing")
    weights = _read_safetensors(directory / MODEL_FILE, digests.get(MODEL_FILE, ""))
    opt = meta.get("optimizer")
    if opt is not None:
        opt = {**opt, "arrays": _read_safetensors(directory / OPTIMIZER_FILE,
                                                  digests.get(OPTIMIZER_FILE, ""))}
    tok = meta.get("tokenizer")
    return Checkpoint(directory=directory, step=int(meta["step"]), weights=weights,
                      model_config=meta.get("model_config"), train_config=meta.get("train_config"),
                      tokenizer=tokenizer_from_dict(tok) if tok is not None else None,
                      optimizer=opt, rng=meta.get("rng", {}), extra=meta.get("extra", {}))


def restore(checkpoint: Checkpoint, model: Module, optimizer: Optimizer | None = None,
            data_rng: np.random.Generator | None = None, restore_global_rng: bool = True) -> int:
    """Load a checkpoint's state into ``model`` (and ``optimizer``, ``data_rng``, minilora's global
    generator) in place; returns the step to continue from.

    The optimiser must update the same parameters, by name, as the one that was saved.
    """
    where = str(checkpoint.directory)
    try:
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
        except StateDictError as exc:
            raise CheckpointError(f"checkpoint at {where!r}: {exc}") from exc
    rng = checkpoint.rng or {}
    if data_rng is not None:
        if rng.get("data") is None:
            raise CheckpointError(f"checkpoint at {where!r} holds no data sampler state")
        data_rng.bit_generator.state = rng["data"]
    if restore_global_rng and rng.get("host") is not None:
        B.host_rng().bit_generator.state = rng["host"]
    return checkpoint.step


def load_model(directory: str | Path) -> tuple[Module, Checkpoint]:
    """Build the GPT a checkpoint describes and load its weights: ``(model, checkpoint)``.

    The model is in eval mode. LoRA-adapted models are rebuilt by the caller, then
    :func:`restore` fills them.
    """
    from .gpt import GPT, GPTConfig

    ckpt = load_checkpoint(directory)
    if ckpt.model_config is None:
        raise CheckpointError(f"checkpoint at {str(ckpt.directory)!r} has no model_config, so the "
                              f"model cannot be rebuilt; build it yourself and call restore()")
    try:
        model = GPT(GPTConfig.from_dict(ckpt.model_config))
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint at {str(ckpt.directory)!r}: model_config "
                              f"{ckpt.model_config} does not fit GPTConfig ({exc})") from exc
    restore(ckpt, model, restore_global_rng=False)
    model.eval()
    return model, ckpt


__all__ = ["save_checkpoint", "load_checkpoint", "restore", "load_model", "Checkpoint",
           "atomic_write_bytes", "atomic_write_json", "MODEL_FILE", "OPTIMIZER_FILE", "META_FILE"]
