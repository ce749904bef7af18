"""Checkpoints: exact round trips, atomic writes, and clear errors for missing or damaged files."""

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
