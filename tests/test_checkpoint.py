"""Checkpoints: exact round trips, atomic writes, and clear errors for missing or damaged files."""

import dataclasses
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import fileio as fileio_mod
from minilora.checkpoint import (
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    load_checkpoint,
    load_model,
    restore,
    save_checkpoint,
)
from minilora.data import ByteTokenizer, task_tokenizer
from minilora.errors import CheckpointError, DiskFullError
from minilora.gpt import GPT, GPTConfig
from minilora.optim import AdamW
from tests.helpers import host

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _trained(model, steps=2, seed=0):
    """An AdamW optimiser that has taken ``steps`` steps on random data (so it has state)."""
    opt = AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.integers(0, 16, (2, 8))
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _weights(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 100))
def test_round_trip_is_exact_for_any_shapes_and_dtypes(shapes, dtype, step):
    with ml.backend.default_dtype_as(dtype):
        model = ml.nn.Sequential(*(ml.nn.Linear(i, o) for i, o in shapes))
    rng = np.random.default_rng(step)
    for p in model.parameters():  # awkward values: tiny, huge, negative zero
        p.data[...] = B.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.integers(-30, 30))
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, step=step, tokenizer=ByteTokenizer(), extra={"note": "x"})
        ck = load_checkpoint(d)
        assert ck.step == step and ck.tokenizer == ByteTokenizer() and ck.extra == {"note": "x"}
        assert set(ck.weights) == set(model.state_dict())
        for k, v in model.state_dict().items():
            assert ck.weights[k].dtype == v.dtype
            np.testing.assert_array_equal(ck.weights[k], host(v))


def test_optimizer_rng_and_configs_come_back(tmp_path):
    model = GPT(CFG)
    opt = _trained(model, steps=3)
    data_rng = np.random.default_rng(11)
    data_rng.random(5)
    save_checkpoint(tmp_path, model, model_config=CFG, tokenizer=task_tokenizer(), optimizer=opt,
                    step=3, train_config={"lr": 0.01}, data_rng=data_rng)
    expected_data = data_rng.random(4)
    expected_host = B.host_rng().random(4)
    saved = _weights(model)
    saved_opt = opt.state_dict()

    ml.manual_seed(99)
    fresh = GPT(CFG)  # different weights
    fresh_opt = AdamW(fresh.parameters(), lr=1e-2)
    other_rng = np.random.default_rng(0)
    ck = load_checkpoint(tmp_path)
    assert ck.model_config == CFG.to_dict() and ck.train_config == {"lr": 0.01}
    assert ck.tokenizer == task_tokenizer()
    assert restore(ck, fresh, fresh_opt, data_rng=other_rng) == 3
    for k, v in _weights(fresh).items():
        np.testing.assert_array_equal(v, saved[k])
    assert fresh_opt.step_count == 3
    for s_new, s_old in zip(fresh_opt.state_dict()["state"], saved_opt["state"]):
        assert s_new.keys() == s_old.keys() == {"exp_avg", "exp_avg_sq"}
        for name in s_new:
            np.testing.assert_array_equal(s_new[name], s_old[name])
    np.testing.assert_array_equal(other_rng.random(4), expected_data)
    np.testing.assert_array_equal(B.host_rng().random(4), expected_host)


def test_files_are_plain_safetensors_and_json(tmp_path):
    model = GPT(CFG)
    opt = _trained(model, steps=1)
    save_checkpoint(tmp_path, model, model_config=CFG, optimizer=opt, step=1)
    assert sorted(os.listdir(tmp_path)) == sorted([META_FILE, MODEL_FILE, OPTIMIZER_FILE,
                                                   "manifest.json"])
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format"] == "minilora-checkpoint" and meta["step"] == 1
    assert meta["optimizer"]["params"][0] == "wte.weight"
    from safetensors.numpy import load_file

    arrays = load_file(tmp_path / OPTIMIZER_FILE)
    np.testing.assert_array_equal(arrays["wte.weight.exp_avg"], host(opt.state[0]["exp_avg"]))


def test_load_model_rebuilds_the_same_function(tmp_path):
    model = GPT(CFG)
    _trained(model)
    save_checkpoint(tmp_path, model, model_config=CFG, tokenizer=task_tokenizer())
    ml.manual_seed(5)
    again, ck = load_model(tmp_path)
    x = np.random.default_rng(1).integers(0, 16, (3, 8))
    model.eval()
    np.testing.assert_array_equal(host(again(x)), host(model(x)))
    assert ck.tokenizer == task_tokenizer() and not again.training


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """ENOSPC in the middle of a file: the old checkpoint still loads, nothing temporary is left,
    and the error is one line naming the path and the bytes the save needed."""
    model = GPT(CFG)
    where = tmp_path / "ck"
    save_checkpoint(where, model, model_config=CFG, step=1)
    before = {name: (where / name).read_bytes() for name in os.listdir(where)}
    _trained(model)  # new weights, then the disk fills up while they are written
    written = []

    def disk_fills_up(fd, data):
        if sum(written) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(os.write(fd, data[:600]))
        return written[-1]

    monkeypatch.setattr(fileio_mod, "_write_chunk", disk_fills_up)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(where, model, model_config=CFG, step=2)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and repr(str(where)) in message and "bytes" in message
    needed = int(message.split("at least ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > 1000
    assert {name: (where / name).read_bytes() for name in os.listdir(where)} == before
    assert os.listdir(tmp_path) == ["ck"]  # no staging directory left beside it
    assert load_checkpoint(where).step == 1


def test_a_device_out_of_inodes_is_not_called_out_of_bytes(tmp_path, monkeypatch):
    """ENOSPC also means no inode is free: "needs at least N bytes (G bytes free)" sent the user
    looking for space that is there."""
    where = tmp_path / "ck"
    model = GPT(CFG)
    save_checkpoint(where, model, model_config=CFG, step=1)

    def no_inodes(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    class Full:  # os.statvfs of a file system with space and no inode left
        f_files, f_favail, f_bavail, f_frsize = 1000, 0, 1000, 4096
    monkeypatch.setattr(fileio_mod, "_write_chunk", no_inodes)
    monkeypatch.setattr(fileio_mod.os, "statvfs", lambda path: Full)
    with pytest.raises(DiskFullError, match=r"no free inodes \(room for new files\) left on the "
                                            r"device to write .*ck' \(4,096,000 bytes free\); the "
                                            r"previous save there, if any, is untouched"):
        save_checkpoint(where, model, model_config=CFG, step=2)
    monkeypatch.undo()
    assert load_checkpoint(where).step == 1


def test_missing_and_damaged_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_checkpoint(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    with pytest.raises(CheckpointError, match=META_FILE):
        load_checkpoint(tmp_path)  # a directory without a checkpoint
    model = GPT(CFG)
    opt = _trained(model, steps=1)
    save_checkpoint(tmp_path, model, model_config=CFG, optimizer=opt, step=1)
    weights = tmp_path / MODEL_FILE
    good = weights.read_bytes()

    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(tmp_path)
    assert str(weights) in str(err.value)

    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} is missing"):
        load_checkpoint(tmp_path)
    weights.write_bytes(good)
    load_checkpoint(tmp_path)

    meta_path = tmp_path / META_FILE
    meta_text = meta_path.read_text()
    meta_path.write_text(meta_text[:40])
    with pytest.raises(CheckpointError, match=f"{META_FILE}.*corrupt"):
        load_checkpoint(tmp_path)  # the manifest notices first
    (tmp_path / "manifest.json").unlink()  # an older save, checked by its own fields
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    meta_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a minilora checkpoint"):
        load_checkpoint(tmp_path)


def test_files_from_two_saves_are_not_mixed(tmp_path):
    model = GPT(CFG)
    save_checkpoint(tmp_path / "a", model, step=1)
    _trained(model)
    save_checkpoint(tmp_path / "b", model, step=2)
    Path(tmp_path / "a" / MODEL_FILE).write_bytes((tmp_path / "b" / MODEL_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="another save"):
        load_checkpoint(tmp_path / "a")


def test_restore_refuses_a_checkpoint_of_another_model(tmp_path):
    save_checkpoint(tmp_path, GPT(CFG), model_config=CFG)
    bigger = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore(load_checkpoint(tmp_path), bigger)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        model = GPT(CFG)
        restore(load_checkpoint(tmp_path), model, AdamW(model.parameters()))
    model = GPT(CFG)
    opt = _trained(model)
    save_checkpoint(tmp_path / "opt", model, optimizer=opt)
    frozen_wpe = GPT(CFG)
    frozen_wpe.wpe.weight.requires_grad_(False)  # the optimiser now updates other parameters
    with pytest.raises(CheckpointError, match="optimizer updates parameters"):
        restore(load_checkpoint(tmp_path / "opt"), frozen_wpe, AdamW(frozen_wpe.parameters()))


def test_load_model_explains_a_missing_or_bad_model_config(tmp_path):
    save_checkpoint(tmp_path / "none", GPT(CFG))
    with pytest.raises(CheckpointError, match="no model_config"):
        load_model(tmp_path / "none")
    save_checkpoint(tmp_path / "bad", GPT(CFG), model_config={**CFG.to_dict(), "n_experts": 4})
    with pytest.raises(CheckpointError, match="n_experts"):
        load_model(tmp_path / "bad")


# ------------------------------------------------- shards and generators, across backends

def _other_backend():
    """A backend other than the run's: the strict stand-in for CuPy from NumPy, NumPy from a
    device backend."""
    return "numpy" if B.on_device() else "strict"


def _device_backend():
    """The run's backend when it is a device one, else the strict stand-in for CuPy."""
    return B.get_backend() if B.on_device() else "strict"


def _task_run(dropout=0.0):
    from minilora.data import TaskDataset, get_task
    from minilora.train import TrainConfig

    data = TaskDataset(get_task("add", 1), n_heldout=10)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup=1, min_lr=1e-3, eval_every=100,
                      eval_examples=10, seed=4, shards=3)

    def model():
        ml.manual_seed(0)  # the same initial weights on every backend (drawn on the host)
        return GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=data.block_size,
                             n_layer=1, n_head=2, n_embd=8, dropout=dropout))
    return data, cfg, model


def _spy_shards(monkeypatch):
    """The shard counts the training loop hands its steps, as a list that fills as it runs."""
    import minilora.train as train_mod

    seen, real = [], train_mod.forward_backward

    def spy(model, idx, targets, shards=2, *args, **kwargs):
        seen.append(shards)
        return real(model, idx, targets, shards, *args, **kwargs)
    monkeypatch.setattr(train_mod, "forward_backward", spy)
    return seen


def test_a_checkpoint_records_its_shards_and_a_resume_on_another_backend_keeps_them(
        tmp_path, monkeypatch):
    """Half a run on this backend, the rest on another: the checkpoint says how many shards the
    run used, the resumed half uses as many, and the result is the straight run's up to the
    rounding of the two backends' kernels (their bits are not promised to agree: a GPU's sums
    round in another order; one backend's resume is bit for bit, see test_train.py)."""
    from minilora.train import TrainConfig, train

    data, cfg, make = _task_run()
    seen = _spy_shards(monkeypatch)
    straight = make()
    train(straight, data, cfg, progress=False)
    train(make(), data, cfg, out_dir=tmp_path / "half", until=3, progress=False)
    ck = load_checkpoint(tmp_path / "half")
    assert ck.shards == 3 == cfg.shards and ck.backend == B.get_backend()
    assert set(seen) == {3}
    seen.clear()
    with B.backend(_other_backend()):
        resumed = make()
        train(resumed, data, TrainConfig.from_dict(ck.train_config), resume=tmp_path / "half",
              out_dir=tmp_path / "rest", progress=False)
        assert load_checkpoint(tmp_path / "rest").backend == B.get_backend()
    assert seen == [3] * (cfg.steps - 3)  # the steps after the resume kept the recorded count
    assert load_checkpoint(tmp_path / "rest").shards == 3
    want = _weights(straight)
    for name, value in _weights(resumed).items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_checkpoint_saved_before_shards_were_recorded_takes_them_from_its_config(tmp_path):
    save_checkpoint(tmp_path, GPT(CFG), train_config={"shards": 4})
    assert load_checkpoint(tmp_path).shards == 4
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["shards"] == 4 and meta["backend"] == B.get_backend()
    for key in ("shards", "backend"):
        del meta[key]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "manifest.json").unlink()  # an older save: no manifest either
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = load_checkpoint(tmp_path)
    assert old.shards == 4 and old.backend is None
    save_checkpoint(tmp_path / "given", GPT(CFG), train_config={"shards": 4}, shards=1)
    assert load_checkpoint(tmp_path / "given").shards == 1  # the count the run used wins
    save_checkpoint(tmp_path / "none", GPT(CFG))
    assert load_checkpoint(tmp_path / "none").shards is None
    with pytest.raises(CheckpointError, match="shards must be an integer >= 1, got 0"):
        save_checkpoint(tmp_path / "bad", GPT(CFG), shards=0)


def test_the_device_generator_comes_back_with_a_checkpoint(tmp_path):
    """On a device, dropout masks come from the device generator: its state is saved, and
    restoring it draws the same masks again. On NumPy the host generator is the one, and the
    checkpoint saves no other."""
    with B.backend("numpy"):
        save_checkpoint(tmp_path / "host", GPT(CFG))
    assert load_checkpoint(tmp_path / "host").rng["device"] is None
    with B.backend(_device_backend()):
        model = GPT(CFG)
        B.random_uniform((3, 4), np.float32)  # the generator has moved on from its seed
        save_checkpoint(tmp_path / "dev", model)
        ck = load_checkpoint(tmp_path / "dev")
        assert ck.rng["device"] is not None and ck.backend == B.get_backend()
        json.dumps(ck.rng["device"])  # JSON through and through
        expected = host(B.random_uniform((5, 7), np.float32))
        B.random_uniform((9,), np.float32)  # and moves on again
        restore(ck, model)
        np.testing.assert_array_equal(host(B.random_uniform((5, 7), np.float32)), expected)
        bad = {**ck.rng["device"], "counter": -1}
        with pytest.raises(CheckpointError, match="'rng.device' is not a valid"):
            restore(dataclasses.replace(ck, rng={**ck.rng, "device": bad}), model)


def test_training_with_dropout_on_a_device_resumes_bit_for_bit(tmp_path):
    """The device generator draws the dropout masks: saved and restored, a resumed run on the
    same device backend equals the straight one exactly."""
    from minilora.train import train

    data, cfg, make = _task_run(dropout=0.2)
    with B.backend(_device_backend()):
        straight = make()
        train(straight, data, cfg, progress=False)
        train(make(), data, cfg, out_dir=tmp_path, until=2, progress=False)
        ml.manual_seed(99)  # another global state: the checkpoint must bring its own
        resumed = make()
        ml.manual_seed(99)
        train(resumed, data, cfg, resume=tmp_path, progress=False)
        want = _weights(straight)
        for name, value in _weights(resumed).items():
            np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_a_run_with_the_backend_s_default_shards_keeps_them_when_resumed_elsewhere(
        tmp_path, monkeypatch):
    """Left to choose, a run takes its backend's number of shards (one on a device, two on the
    CPU); the checkpoint records it, and the run resumed on the other backend keeps it instead
    of taking that backend's default."""
    import dataclasses as dc

    from minilora.step import default_shards
    from minilora.train import train

    data, cfg, make = _task_run()
    cfg = dc.replace(cfg, shards=None)  # the default: the backend chooses
    seen = _spy_shards(monkeypatch)
    train(make(), data, cfg, out_dir=tmp_path / "half", until=3, progress=False)
    first = default_shards()
    ck = load_checkpoint(tmp_path / "half")
    assert ck.shards == first and set(seen) == {first}
    seen.clear()
    with B.backend(_other_backend()):
        assert default_shards() != first  # the other backend would choose another number
        train(make(), data, cfg, resume=tmp_path / "half", out_dir=tmp_path / "rest",
              progress=False)
    assert seen == [first] * (cfg.steps - 3)
    assert load_checkpoint(tmp_path / "rest").shards == first


def _trained_optimizer(model):
    opt = AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = B.xp.ones_like(p.data)
    opt.step()
    return opt


def test_save_checkpoint_refuses_a_nan_optimizer_state_and_keeps_the_last_save(tmp_path):
    model = GPT(CFG)
    opt = _trained_optimizer(model)
    save_checkpoint(tmp_path / "ck", model, model_config=CFG, optimizer=opt, step=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    opt.state[0]["exp_avg_sq"][...] = np.nan
    with pytest.raises(CheckpointError, match=r"optimizer state holds NaN or inf \('wte"):
        save_checkpoint(tmp_path / "ck", model, model_config=CFG, optimizer=opt, step=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


@pytest.mark.parametrize("kwargs, message", [
    ({"step": -5}, "step must be an int >= 0, got -5"),
    ({"step": 2.7}, "step must be an int >= 0, got 2.7"),
    ({"step": "x"}, "step must be an int >= 0, got 'x'"),
    ({"files": {"../escaped.txt": b"x"}}, "plain file names"),
    ({"files": {"/abs.txt": b"x"}}, "plain file names"),
    ({"files": {"model.safetensors": b"hi"}}, "plain file names other than"),
    ({"files": {"manifest.json": b"{}"}}, "plain file names other than"),
    ({"files": {"a.txt": "text"}}, "to bytes, got 'a.txt': str"),
    ({"extra": {"a": float("nan")}}, "not JSON-able"),
])
def test_save_checkpoint_refuses_arguments_its_load_would_refuse(tmp_path, kwargs, message):
    """Each of these wrote a save that load_checkpoint refused, a file outside the save, or a
    save whose weights were replaced by the extra file."""
    with pytest.raises((CheckpointError, ml.errors.InvalidArgumentError), match=message):
        save_checkpoint(tmp_path / "ck", GPT(CFG), model_config=CFG, **kwargs)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "escaped.txt").exists()
