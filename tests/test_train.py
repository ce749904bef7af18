"""The training loop: schedule, parameter groups, evaluation, and bit-for-bit resumption."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.checkpoint import load_checkpoint
from minilora.data import CharTokenizer, TaskDataset, TextDataset, get_task, task_tokenizer
from minilora.errors import CheckpointError, ConfigError, InvalidArgumentError
from minilora.gpt import GPT, GPTConfig
from minilora.optim import warmup_cosine
from minilora.step import default_micro_batches, default_shards
from minilora.train import (
    BATCH_BYTES_PER_TOKEN,
    HISTORY_FILE,
    TrainConfig,
    check_batch_fits,
    exact_match,
    greedy_answers,
    param_groups,
    train,
)
from tests.helpers import host

ROOT = Path(__file__).resolve().parents[1]


def tiny_task(name="add", digits=1, heldout=20):
    return TaskDataset(get_task(name, digits), n_heldout=heldout)


def tiny_model(data, dropout=0.0, seed=0):
    ml.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=data.block_size,
                         n_layer=1, n_head=2, n_embd=16, dropout=dropout))


def tiny_config(**kw):
    base = dict(steps=12, batch_size=8, lr=1e-2, warmup=3, min_lr=1e-3, eval_every=4,
                eval_examples=20, seed=3)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: host(v).copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", -1), ("lr", -1.0), ("warmup", -2), ("eval_every", 0),
    ("grad_clip", float("nan")), ("betas", (0.9, 1.0)), ("min_lr", 1.0), ("seed", 1.5),
    ("shards", 0)])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


@given(st.integers(1, 10**6), st.floats(1e-6, 1.0), st.integers(0, 50),
       st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)))
def test_config_survives_its_json_form(steps, lr, warmup, betas):
    cfg = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=warmup, betas=betas)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})


@pytest.mark.parametrize("field,value,words", [
    ("steps", 0, "TrainConfig: steps must be an int >= 1 (positive), got 0"),
    ("shards", True, "TrainConfig: shards must be an int >= 1 (positive), got True"),
    ("seed", -1, "TrainConfig: seed must be an int >= 0, got -1"),
    ("warmup", 2.0, "TrainConfig: warmup must be an int >= 0, got 2.0")])
def test_config_messages_name_the_field_the_bound_and_the_value(field, value, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert str(info.value) == words


def test_config_takes_numpy_integers_as_python_ints():
    cfg = TrainConfig(steps=np.int64(7), seed=np.int32(2), min_lr=1e-4)
    assert type(cfg.steps) is int and type(cfg.seed) is int and cfg.steps == 7
    json.dumps(cfg.to_dict())  # a NumPy integer would not be JSON


def test_the_allocator_setting_is_a_fast_form(monkeypatch):
    """train() asks glibc to keep freed memory only with the fast forms on."""
    import minilora.train as train_module

    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(1) or True)
    data = tiny_task()
    with ml.fast.reference():
        train(tiny_model(data), data, tiny_config(steps=1), progress=False)
    assert calls == []
    with ml.fast.forms(True):
        train(tiny_model(data), data, tiny_config(steps=1), progress=False)
    assert calls == ([1] if not ml.backend.on_device() else [])


@pytest.mark.parametrize("threads", [None, 3])
def test_the_cli_sets_blas_threads_only_with_the_fast_forms_on(monkeypatch, threads):
    import argparse

    from minilora import cli_common
    from minilora.errors import InvalidArgumentError as Invalid

    calls = []
    monkeypatch.setattr(cli_common.cpu, "set_blas_threads", lambda n: calls.append(n) or True)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = argparse.Namespace(backend=ml.backend.get_backend(), threads=threads)
    with ml.fast.reference():
        cli_common.setup(args)
        assert calls == []
        with pytest.raises(Invalid, match="--threads must be at least 1, got 0"):
            cli_common.setup(argparse.Namespace(backend=args.backend, threads=0))
    with ml.fast.forms(True):
        cli_common.setup(args)
    assert calls == [threads or 1]


def test_a_config_saved_before_shards_existed_meant_one_shard():
    saved = TrainConfig().to_dict()
    del saved["shards"]
    assert TrainConfig.from_dict(saved).shards == 1
    assert TrainConfig().shards is None  # not chosen: train() picks it


def test_unchosen_shards_are_the_backends_default_and_a_resume_keeps_the_saved_number(
        tmp_path, monkeypatch):
    """shards=None: 2 on the CPU, 1 on a device (step.default_shards), recorded in the checkpoint;
    resuming with shards=None goes on with the checkpoint's number, whatever this backend's
    default is."""
    import minilora.train as train_mod

    seen = []
    real = train_mod.forward_backward
    monkeypatch.setattr(train_mod, "forward_backward",
                        lambda m, x, y, shards, **kw: seen.append(shards) or real(m, x, y, shards,
                                                                                  **kw))
    data = tiny_task()
    train(tiny_model(data), data, tiny_config(steps=4), out_dir=tmp_path, until=2,
          progress=False)
    assert seen == [default_shards()] * 2 and default_shards() == (1 if ml.backend.on_device()
                                                                   else 2)
    assert load_checkpoint(tmp_path).train_config["shards"] == default_shards()
    # a run saved with 3 shards, resumed with the number left open: 3, not this default
    train(tiny_model(data), data, tiny_config(steps=4, shards=3), out_dir=tmp_path / "three",
          until=2, progress=False)
    seen.clear()
    train(tiny_model(data), data, tiny_config(steps=4), resume=tmp_path / "three",
          progress=False)
    assert seen == [3, 3]
    with pytest.raises(ConfigError, match="shards: saved 3, now 2"):
        train(tiny_model(data), data, tiny_config(steps=4, shards=2), resume=tmp_path / "three",
              progress=False)


def test_micro_batches_are_chosen_by_the_batch_recorded_and_kept_by_a_resume(tmp_path,
                                                                              monkeypatch):
    """micro_batches=None: step.default_micro_batches of the first batch's shape, recorded in
    the checkpoint; a resume with it left open keeps the saved number, one that names another is
    refused; a checkpoint from before micro-batches existed meant one."""
    import minilora.train as train_mod

    seen = []
    real = train_mod.forward_backward
    monkeypatch.setattr(train_mod, "forward_backward",
                        lambda m, x, y, shards, **kw: seen.append(kw["micro_batches"]) or
                        real(m, x, y, shards, **kw))
    data = tiny_task()
    train(tiny_model(data), data, tiny_config(steps=4, micro_batches=2), out_dir=tmp_path,
          until=2, progress=False)
    assert seen == [2, 2] and load_checkpoint(tmp_path).train_config["micro_batches"] == 2
    seen.clear()
    train(tiny_model(data), data, tiny_config(steps=4), resume=tmp_path, progress=False)
    assert seen == [2, 2]
    with pytest.raises(ConfigError, match="micro_batches: saved 2, now 3"):
        train(tiny_model(data), data, tiny_config(steps=6, micro_batches=3), resume=tmp_path,
              progress=False)
    seen.clear()
    train(tiny_model(data), data, tiny_config(steps=1), progress=False)
    x, _ = data.get_batch(8, np.random.default_rng(0))
    assert seen == [default_micro_batches(8, x.shape[1], default_shards())]
    saved = TrainConfig().to_dict()
    del saved["micro_batches"]
    assert TrainConfig.from_dict(saved).micro_batches == 1


def test_weight_decay_goes_to_trainable_matrices_only():
    model = tiny_model(tiny_task())
    model.h[0].attn.k_proj.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 and p.requires_grad for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert id(model.h[0].attn.k_proj.weight) not in ids
    assert len(ids) == sum(p.requires_grad for p in model.parameters())
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad"):
        param_groups(model, 0.1)


# ---------------------------------------------------------------------------- the loop

def test_history_follows_the_schedule_and_the_loss_falls():
    data = tiny_task(heldout=20)
    cfg = tiny_config(steps=60, eval_every=20)
    seen = []
    history = train(tiny_model(data), data, cfg, progress=False,
                    callback=lambda step, rec: seen.append((step, rec["loss"])))
    assert history["step"] == list(range(1, 61))
    assert history["lr"] == [warmup_cosine(s, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
                             for s in range(60)]
    assert seen == list(zip(history["step"], history["loss"]))
    assert [e["step"] for e in history["eval"]] == [20, 40, 60]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in history["eval"])
    assert all(np.isfinite(history["grad_norm"])) and min(history["grad_norm"]) > 0
    assert np.mean(history["loss"][-10:]) < 0.6 * np.mean(history["loss"][:5])
    assert history["seconds"] > 0


def test_frozen_parameters_are_untouched_and_skipped():
    data = tiny_task()
    model = tiny_model(data)
    frozen = [p for name, p in model.named_parameters() if "q_proj" not in name]
    for p in frozen:
        p.requires_grad_(False)
    before = weights(model)
    train(model, data, tiny_config(steps=5), progress=False)
    after = weights(model)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == ("q_proj" in name), name
    assert all(p.grad is None for p in model.parameters())


def test_text_data_trains_and_reports_validation_loss():
    text = "abcabcabd" * 30
    data = TextDataset(text, CharTokenizer.from_text(text), block_size=8, val_fraction=0.2)
    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=2, n_embd=16))
    history = train(model, data, tiny_config(steps=30, eval_every=15), progress=False)
    losses = [e["val_loss"] for e in history["eval"]]
    assert len(losses) == 2 and losses[1] < losses[0] < 2.0


def test_progress_bar_shows_loss(capsys):
    data = tiny_task()
    train(tiny_model(data), data, tiny_config(steps=4, eval_every=2), progress=True)
    captured = capsys.readouterr()
    assert "train" in captured.err and "loss" in captured.err  # the bar, on stderr
    assert captured.out.count("held-out exact match") == 2  # one line per evaluation


def test_bad_arguments_are_reported():
    data = tiny_task()
    with pytest.raises(InvalidArgumentError, match="until"):
        train(tiny_model(data), data, tiny_config(), until=13, progress=False)
    with pytest.raises(InvalidArgumentError, match="TaskDataset or a TextDataset"):
        train(tiny_model(data), [1, 2, 3], tiny_config(), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_model(data), data, tiny_config(), resume="no/such/run", progress=False)


@pytest.mark.host_only("arithmetic on sizes; no array work")
@given(st.integers(1, 10**12), st.integers(1, 10**6), st.integers(0, 2**50))
def test_a_batch_is_refused_exactly_when_its_token_arrays_exceed_the_memory(rows, tokens, memory):
    need = rows * tokens * BATCH_BYTES_PER_TOKEN
    if need <= memory:
        check_batch_fits(rows, tokens, memory)
    else:
        with pytest.raises(ConfigError, match="batch_size") as err:
            check_batch_fits(rows, tokens, memory)
        assert f"{rows:,} rows x {tokens} tokens" in str(err.value)
    check_batch_fits(rows, tokens, None)  # the machine's memory unknown: nothing is refused


@pytest.mark.host_only("batches are host data (the step uploads them)")
def test_every_dataset_s_batch_rows_hold_block_size_tokens():
    # what train's batch check counts a row by, without drawing one
    from minilora.data import ByteTokenizer
    from minilora.jsonl import JsonlDataset
    pairs = [{"prompt": f"{i}=", "completion": "x" * (i % 5 + 1)} for i in range(12)]
    for data in (tiny_task(), tiny_task("add", 3, 50),
                 TextDataset("hello world " * 20, CharTokenizer.from_text("hello world"), 9),
                 JsonlDataset(pairs, ByteTokenizer(eot=True), n_heldout=2)):
        for split in ("train", "val"):
            x, y = data.get_batch(5, np.random.default_rng(1), split=split)
            assert x.shape == y.shape == (5, data.block_size), type(data).__name__


def test_train_refuses_a_batch_larger_than_the_memory_before_drawing_it(monkeypatch):
    # a batch of 10^9 rows used to be drawn (tens of GiB of int64) and swap for minutes
    import minilora.train as train_module
    data = tiny_task()
    model = tiny_model(data)
    before = weights(model)
    row = data.get_batch(1, np.random.default_rng(0))[0].shape[1]
    assert row == data.block_size  # what train counts a row's tokens by
    monkeypatch.setattr(train_module, "available_memory", lambda: 10 * row * BATCH_BYTES_PER_TOKEN)
    drawn = []
    real = data.get_batch
    monkeypatch.setattr(data, "get_batch",
                        lambda n, rng, **kw: drawn.append(n) or real(n, rng, **kw))
    with pytest.raises(ConfigError, match="batch_size=11 rows"):
        train(model, data, tiny_config(batch_size=11), progress=False)
    assert drawn == []  # refused before any batch was drawn
    assert all(np.array_equal(before[k], v) for k, v in weights(model).items())
    train(model, data, tiny_config(batch_size=10, steps=1), progress=False)  # it fits: it runs


# -------------------------------------------------------------------------- evaluation

class AnswerKey:
    """A stand-in model: it works each answer out from the prompt's text, and gets one digit
    wrong on the held-out questions listed in ``wrong``."""

    def __init__(self, data, wrong):
        self.data = data
        prompts = data.heldout()[0]
        self.wrong = {data.tokenizer.decode(prompts[i]) for i in wrong}

    def generate(self, idx, max_new_tokens, temperature=1.0):
        tok, task = self.data.tokenizer, self.data.task
        assert temperature == 0.0 and max_new_tokens == task.answer_len
        rows = []
        for prompt in np.asarray(idx):
            text = tok.decode(prompt)
            a, b = text[:-1].split(task.separator)
            answer = task.example(int(a), int(b))[1]
            if text in self.wrong:
                answer = str((int(answer[0]) + 1) % 10) + answer[1:]
            rows.append(np.r_[prompt, tok.encode(answer)])
        return np.array(rows)


@pytest.mark.host_only("a stand-in model that answers on the host; the answers are scored there")
@given(st.sets(st.integers(0, 49), max_size=50), st.integers(1, 50))
def test_exact_match_counts_whole_answers(wrong, batch_size):
    data = TaskDataset(get_task("rev", 2), n_heldout=50)
    acc = exact_match(AnswerKey(data, wrong), data, batch_size=batch_size)
    assert acc == (50 - len(wrong)) / 50


def test_greedy_answers_do_not_depend_on_the_chunking():
    data = tiny_task("max", 2, heldout=30)
    model = tiny_model(data)
    prompts, answers = data.heldout()
    full = greedy_answers(model, prompts, answers.shape[1], batch_size=100)
    chunked = greedy_answers(model, prompts, answers.shape[1], batch_size=7)
    assert full.shape == answers.shape
    np.testing.assert_array_equal(full, chunked)


# ---------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("stop", [1, 5, 11])
def test_resume_continues_bit_for_bit(tmp_path, stop):
    """Train 12 steps in one go, or `stop` steps, save, and resume a fresh model: same result.

    Dropout is on, so the global generator's state matters as much as the data sampler's."""
    data = tiny_task("add", 2, heldout=50)
    cfg = tiny_config(steps=12, eval_every=4)
    straight_model = tiny_model(data, dropout=0.1)
    straight = train(straight_model, data, cfg, progress=False)

    first = train(tiny_model(data, dropout=0.1), data, cfg, out_dir=tmp_path, until=stop,
                  progress=False)
    assert load_checkpoint(tmp_path).step == stop
    assert json.loads((tmp_path / HISTORY_FILE).read_text())["step"][-1] == stop
    resumed_model = tiny_model(data, dropout=0.1, seed=77)  # other weights, other global rng
    rest = train(resumed_model, data, cfg, resume=tmp_path, out_dir=tmp_path, progress=False)

    assert rest["start_step"] == stop
    whole = json.loads((tmp_path / HISTORY_FILE).read_text())  # the file covers the whole run
    assert whole["loss"] == straight["loss"] and whole["step"] == list(range(1, 13))
    assert first["loss"] + rest["loss"] == straight["loss"]
    assert first["eval"] + rest["eval"] == straight["eval"]
    expected = weights(straight_model)
    for name, value in weights(resumed_model).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_resume_in_a_fresh_process_matches(tmp_path):
    data = tiny_task("add", 2, heldout=50)
    cfg = tiny_config(steps=10)
    straight_model = tiny_model(data, dropout=0.1)
    train(straight_model, data, cfg, progress=False)
    train(tiny_model(data, dropout=0.1), data, cfg, out_dir=tmp_path / "run", until=4,
          progress=False)
    script = (
        "import sys, minilora as ml\n"
        "from minilora.checkpoint import save_checkpoint\n"
        "from minilora.data import TaskDataset, get_task\n"
        "from minilora.gpt import GPT, GPTConfig\n"
        "from minilora.train import TrainConfig, train, load_checkpoint\n"
        "ck = load_checkpoint(sys.argv[1])\n"
        "ml.manual_seed(12345)\n"
        "model = GPT(GPTConfig(**ck.model_config))\n"
        "data = TaskDataset(get_task('add', 2), n_heldout=50)\n"
        "train(model, data, TrainConfig.from_dict(ck.train_config), resume=sys.argv[1],\n"
        "      out_dir=sys.argv[2], progress=False)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "done")],
                   cwd=ROOT, check=True, timeout=120)
    final = load_checkpoint(tmp_path / "done")
    assert final.step == 10
    for name, value in weights(straight_model).items():
        np.testing.assert_array_equal(final.weights[name], value, err_msg=name)


def test_resume_refuses_a_different_schedule(tmp_path):
    data = tiny_task()
    train(tiny_model(data), data, tiny_config(), out_dir=tmp_path, until=3, progress=False)
    with pytest.raises(ConfigError, match="lr: saved 0.01, now 0.02"):
        train(tiny_model(data), data, tiny_config(lr=0.02), resume=tmp_path, progress=False)
    with pytest.raises(InvalidArgumentError, match="step 3"):
        train(tiny_model(data), data, tiny_config(), resume=tmp_path, until=2, progress=False)


def test_checkpoints_record_the_task_and_tokenizer(tmp_path):
    data = tiny_task("max", 1)
    train(tiny_model(data), data, tiny_config(steps=4, checkpoint_every=2), out_dir=tmp_path,
          progress=False)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 4 and ck.tokenizer == task_tokenizer()
    assert ck.extra["task"] == {"name": "max", "digits": 1} and ck.extra["n_heldout"] == 20
    # the shards and micro-batches the run used, chosen by train() since the config left them
    # open (the micro-batches by the batch's shape)
    config = tiny_config(steps=4, checkpoint_every=2)
    x, _ = data.get_batch(config.batch_size, np.random.default_rng(0))
    micro = default_micro_batches(x.shape[0], x.shape[1], default_shards())
    assert ck.train_config == {**config.to_dict(), "shards": default_shards(),
                               "micro_batches": micro}


def test_the_same_loop_fine_tunes_a_lora_model_and_resumes_it(tmp_path):
    lora = pytest.importorskip("minilora.lora")
    data = tiny_task("rev", 1)
    base = tiny_model(data)
    train(base, data, tiny_config(steps=4), progress=False)
    base_weights = weights(base)

    def adapted():
        model = tiny_model(data, seed=9)
        model.load_state_dict(base_weights)
        return lora.inject_lora(model, lora.LoraConfig(r=2, alpha=4))

    cfg = tiny_config(steps=8)
    straight = adapted()
    history = train(straight, data, cfg, progress=False)
    after = weights(straight)
    for name, value in after.items():  # only the adapters moved; B starts at zero and trains
        if "lora_" in name:
            continue
        np.testing.assert_array_equal(value, base_weights[name.replace(".base_layer", "")])
    assert any(not np.all(v == 0) for n, v in after.items() if "lora_B" in n)

    train(adapted(), data, cfg, out_dir=tmp_path, until=3, progress=False)
    ck = load_checkpoint(tmp_path)
    assert all("lora_" in name for name in ck.optimizer["params"])  # no state for frozen weights
    resumed = adapted()
    rest = train(resumed, data, cfg, resume=tmp_path, progress=False)
    assert rest["loss"] == history["loss"][3:]
    for name, value in weights(resumed).items():
        np.testing.assert_array_equal(value, after[name], err_msg=name)


def test_a_large_model_trains_on_one_shard_and_records_it(tmp_path, monkeypatch):
    """shards=None and a model of step.ONE_SHARD_FROM parameters or more: one shard, recorded."""
    import minilora.step as step_mod
    import minilora.train as train_mod

    data = tiny_task()
    model = tiny_model(data)
    monkeypatch.setattr(step_mod, "ONE_SHARD_FROM", model.num_parameters())
    seen = []
    real = train_mod.forward_backward
    monkeypatch.setattr(train_mod, "forward_backward",
                        lambda m, x, y, shards, **kw: seen.append(shards) or real(m, x, y, shards,
                                                                                  **kw))
    train(model, data, tiny_config(steps=2), out_dir=tmp_path, progress=False)
    assert seen == [1, 1]
    assert load_checkpoint(tmp_path).train_config["shards"] == 1
