"""Saves survive kill -9 at any moment: child processes save checkpoints and adapters in a loop
and are killed at seeded random moments, mostly inside the writes; every state left behind must
load as the save before the kill or the one in progress, never a mix.

Only the public API is used (save_checkpoint, load_checkpoint, save_adapter, read_adapter), so the
same test can be run against any version of the writer.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import minilora as ml
from minilora import lora
from minilora.checkpoint import load_checkpoint, save_checkpoint

KILLS = 30  # of each kind: 60 in all, about 20-40 s here
CONFIG = ml.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _filled(model: ml.nn.Module, value: float) -> None:
    for p in model.parameters():
        p.data[...] = value


def _model() -> ml.GPT:
    return ml.GPT(CONFIG)


def _save_checkpoint_step(where: str, model: ml.GPT, k: int) -> None:
    """Save number k: every weight is k, and a second file says k too."""
    _filled(model, float(k))
    save_checkpoint(where, model, model_config=CONFIG, step=k,
                    files={"history.json": f'{{"k": {k}}}'.encode()})


def _adapter_model(k: int) -> ml.GPT:
    """Save number k of the adapter: r alternates between 2 and 4, alpha is k + 1, every value k."""
    model = _model()
    lora.inject_lora(model, lora.LoraConfig(r=2 + 2 * (k % 2), alpha=float(k + 1)))
    for _, layer in lora.lora_layers(model):
        for p in layer.adapter_parameters("default"):
            p.data[...] = float(k)
    return model


def _saver(kind: str, where: str, start: int, started, done) -> None:
    """The child: save start, start + 1, ... forever; ``done`` holds the last save returned."""
    model = _model()
    started.set()
    k = start
    while True:
        if kind == "checkpoint":
            _save_checkpoint_step(where, model, k)
        else:
            lora.save_adapter(_adapter_model(k), where)
        done.value = k
        k += 1


def _loaded(kind: str, where: str) -> int:
    """Load what is there and check that its files agree with each other; returns its k."""
    if kind == "checkpoint":
        ck = load_checkpoint(where)
        values = {float(v.reshape(-1)[0]) for v in ck.weights.values()}
        assert values == {float(ck.step)}, (ck.step, values)
        assert all((v == ck.step).all() for v in ck.weights.values())
        history = (ck.directory / "history.json").read_text()
        assert history == f'{{"k": {ck.step}}}', history
        return ck.step
    config, arrays = lora.read_adapter(where)
    k = int(config.alpha) - 1
    assert config.r == 2 + 2 * (k % 2), (config.r, k)
    for key, a in arrays.items():
        assert (a == k).all(), key
        if key.endswith("lora_A.weight"):
            assert a.shape[0] == config.r, (key, a.shape, config.r)
    return k


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_kill_at_random_moments_leaves_the_old_or_the_new_save(tmp_path, kind):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minilora", "numpy", "safetensors.numpy"])
    where = str(tmp_path / kind)
    if kind == "checkpoint":
        _save_checkpoint_step(where, _model(), 0)
    else:
        lora.save_adapter(_adapter_model(0), where)
    rng = np.random.default_rng(11 if kind == "checkpoint" else 12)
    # one save's duration, so that the kills land inside saves rather than between children
    t0 = time.perf_counter()
    if kind == "checkpoint":
        _save_checkpoint_step(where, _model(), 0)
    else:
        lora.save_adapter(_adapter_model(0), where)
    one_save = time.perf_counter() - t0
    last = 0
    outcomes = {"old": 0, "new": 0}
    deadline = time.monotonic() + 60
    for _ in range(KILLS):
        assert time.monotonic() < deadline, "the kill loop ran past its minute"
        # a raw shared integer, no lock: a child killed while it held a lock would leave it
        # held, and the read below would wait on it forever (one aligned 8-byte store is atomic)
        started, done = ctx.Event(), ctx.Value("l", -1, lock=False)
        child = ctx.Process(target=_saver, args=(kind, where, last + 1, started, done))
        child.start()
        assert started.wait(30)
        time.sleep(rng.uniform(0, 4 * one_save))  # a few saves in, at a random point of one
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        finished = done.value if done.value >= 0 else last
        k = _loaded(kind, where)
        assert k in (finished, finished + 1), (k, finished)
        outcomes["old" if k == finished else "new"] += 1
        last = k
    # some kills landed inside a save, before its swap
    assert outcomes["old"] > 0
    # the next save cleans whatever the kills left beside the destination
    if kind == "checkpoint":
        _save_checkpoint_step(where, _model(), last + 1)
    else:
        lora.save_adapter(_adapter_model(last + 1), where)
    assert sorted(os.listdir(tmp_path)) == [kind]
    assert _loaded(kind, where) == last + 1
