"""Loads while another process saves: how many got a mix of two saves, how many failed.

    python benchmarks/concurrent_loads.py [--seconds 20] [--kind checkpoint|adapter|both]

A child process saves to one directory as fast as it can (save k: every weight equal to k; an
adapter's rank alternating with k, its alpha k + 1); this process loads the same directory over and
over meanwhile and checks each load against itself. It prints the loads, those that mixed two
saves, those that failed, and the saves the child made (a writer held back by the loads makes
fewer). Only the public API is used (save_checkpoint, load_checkpoint, save_adapter,
read_adapter), so the same script measures any version of the files' code.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import minilora as ml
from minilora import lora
from minilora.checkpoint import load_checkpoint, save_checkpoint

CONFIG = ml.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _model(k: int, kind: str) -> ml.GPT:
    model = ml.GPT(CONFIG)
    if kind == "adapter":
        lora.inject_lora(model, lora.LoraConfig(r=2 + 2 * (k % 2), alpha=float(k + 1)))
        params = [p for _, layer in lora.lora_layers(model)
                  for p in layer.adapter_parameters("default")]
    else:
        params = model.parameters()
    for p in params:
        p.data[...] = float(k)
    return model


def _save(kind: str, where: str, k: int) -> None:
    if kind == "checkpoint":
        save_checkpoint(where, _model(k, kind), model_config=CONFIG, step=k)
    else:
        lora.save_adapter(_model(k, kind), where)


def _saver(kind: str, where: str, started, done) -> None:
    """The child: save 1, 2, ... until killed; ``done`` holds the last save that returned."""
    started.set()
    k = 1
    while True:
        _save(kind, where, k)
        done.value = k
        k += 1


def _one_save(kind: str, where: str) -> bool:
    """Load what is there; True when what came back is one save."""
    if kind == "checkpoint":
        ck = load_checkpoint(where)
        return all((v == ck.step).all() for v in ck.weights.values())
    config, arrays = lora.read_adapter(where)
    k = int(config.alpha) - 1
    return config.r == 2 + 2 * (k % 2) and all((a == k).all() for a in arrays.values())


def measure(kind: str, seconds: float) -> dict:
    """Loads, mixed loads, failed loads (first error kept) and the child's saves in ``seconds``."""
    where = os.path.join(tempfile.mkdtemp(prefix="minilora-loads-"), kind)
    _save(kind, where, 0)
    ctx = multiprocessing.get_context("forkserver")
    started, done = ctx.Event(), ctx.Value("l", 0, lock=False)
    child = ctx.Process(target=_saver, args=(kind, where, started, done), daemon=True)
    child.start()
    started.wait(60)
    loads = mixed = failed = 0
    first_error = ""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            loads += 1
            try:
                mixed += not _one_save(kind, where)
            except Exception as exc:  # counted: a load that fails is what is measured
                failed += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:160]
    finally:
        saves = done.value
        alive = child.is_alive()
        child.kill()
        child.join(30)
    return {"kind": kind, "loads": loads, "mixed": mixed, "failed": failed, "saves": saves,
            "writer": "saving" if alive else f"stopped (exit code {child.exitcode})",
            "first_error": first_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--kind", choices=("checkpoint", "adapter", "both"), default="both")
    args = parser.parse_args()
    kinds = ("checkpoint", "adapter") if args.kind == "both" else (args.kind,)
    print(f"minilora {ml.__version__}: loads while another process saves, {args.seconds:g} s each")
    print("| save | loads | mixed | failed | saves by the writer | writer at the end |")
    print("|---|---:|---:|---:|---:|---|")
    errors = []
    for kind in kinds:
        r = measure(kind, args.seconds)
        print(f"| {kind} | {r['loads']:,} | {r['mixed']:,} | {r['failed']:,} | {r['saves']:,} | "
              f"{r['writer']} |", flush=True)
        if r["first_error"]:
            errors.append(f"{kind}: first failure: {r['first_error']}")
    for line in errors:
        print(line)


if __name__ == "__main__":
    main()
