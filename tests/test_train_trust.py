"""Trust in training (issue #11): a run that diverges stops with one line and keeps the last good
checkpoint; Ctrl-C saves a checkpoint that resumes bit for bit; text runs resume from the command
line and notice a changed file; an extended run follows the schedule it was asked for."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minilora as ml
from minilora.checkpoint import all_finite, load_checkpoint
from minilora.cli import main
from minilora.data import TaskDataset, get_task
from minilora.errors import TrainingDivergedError
from minilora.fileio import sha256_file
from minilora.gpt import GPT, GPTConfig
from minilora.train import TrainConfig, train
from tests.helpers import ROOT, TINY

TEXT_MODEL = ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--batch-size", "8", "--eval-every", "3", "--no-progress"]
DIVERGED = re.compile(r"^minilora train: error: training diverged at step (\d+): "
                      r"(loss|gradient norm) (nan|inf|-inf)\b")


def snapshot(directory):
    """Every file of a directory (recursively) and its bytes."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(path):
    """The hidden staging/old directories a save of ``path`` may leave beside it."""
    path = Path(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def assert_same_checkpoint(a_dir, b_dir):
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a.step == b.step and a.weights.keys() == b.weights.keys()
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name], err_msg=name)
    assert a.optimizer["arrays"].keys() == b.optimizer["arrays"].keys()
    for name in a.optimizer["arrays"]:
        np.testing.assert_array_equal(a.optimizer["arrays"][name], b.optimizer["arrays"][name],
                                      err_msg=name)
    assert a.optimizer["step"] == b.optimizer["step"] and a.optimizer["lr"] == b.optimizer["lr"]
    assert a.rng == b.rng


def history(directory):
    return json.loads((Path(directory) / "history.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------- A. divergence

def tiny_task():
    return TaskDataset(get_task("add", 1), n_heldout=20)


def tiny_model(data, seed=0):
    ml.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=data.block_size,
                         n_layer=1, n_head=2, n_embd=16))


def tiny_config(**kw):
    base = dict(steps=8, batch_size=8, lr=1e-2, warmup=2, min_lr=1e-3, eval_every=4,
                eval_examples=20, seed=3)
    return TrainConfig(**{**base, **kw})


def test_cli_divergence_on_a_fresh_out_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["train", *TINY, "--steps", "6", "--lr", "1e9", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("training a GPT")  # it did start, then stopped
    line = one_line(captured.err)
    match = DIVERGED.match(line)
    assert match, line
    assert 1 <= int(match.group(1)) <= 6
    assert "update was not applied" in line and "lr=" in line
    assert "kept" not in line  # there is no earlier checkpoint to keep
    assert not out.exists() and siblings(out) == []


def test_cli_divergence_keeps_the_previous_checkpoint_byte_for_byte(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--out", str(run)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    # extend the finished run with a huge learning rate: it diverges after step 4
    assert main(["train", "--resume", str(run), "--steps", "8", "--lr", "1e9",
                 "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    match = DIVERGED.match(line)
    assert match, line
    assert 4 < int(match.group(1)) <= 8
    assert f"the last good checkpoint in {str(run)!r} is kept" in line
    assert snapshot(run) == before and siblings(run) == []
    assert load_checkpoint(run).step == 4


def test_cli_divergence_after_a_periodic_checkpoint_keeps_it(tmp_path, capsys):
    out = tmp_path / "periodic"
    assert main(["train", *TINY, "--steps", "50", "--warmup", "0", "--lr", "1e9",
                 "--checkpoint-every", "1", "--out", str(out)]) == 1
    line = one_line(capsys.readouterr().err)
    match = DIVERGED.match(line)
    assert match, line
    step = int(match.group(1))
    assert step > 1, line  # step 1 runs on finite weights; its checkpoint is then written
    assert "is kept" in line
    ck = load_checkpoint(out)
    assert ck.step == step - 1
    assert all(np.isfinite(w).all() for w in ck.weights.values())
    assert history(out)["step"] == list(range(1, step))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_weights_holding_inf_or_nan_are_refused_before_step_one(tmp_path, bad):
    data = tiny_task()
    model = tiny_model(data)
    model.wte.weight.data[0, 0] = bad
    steps = []
    with pytest.raises(TrainingDivergedError, match="before the first step") as info:
        train(model, data, tiny_config(), out_dir=tmp_path / "out", progress=False,
              callback=lambda step, record: steps.append(step))
    assert isinstance(info.value, FloatingPointError)
    assert steps == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_divergence_is_caught_before_the_update_with_or_without_clipping(tmp_path, grad_clip):
    data = tiny_task()
    model = tiny_model(data)
    steps = []
    with pytest.raises(TrainingDivergedError) as info:
        train(model, data, tiny_config(steps=30, lr=1e9, warmup=0, grad_clip=grad_clip),
              progress=False, callback=lambda step, record: steps.append(step))
    match = re.match(r"training diverged at step (\d+): (loss|gradient norm) (nan|inf)",
                     str(info.value))
    assert match, str(info.value)
    assert int(match.group(1)) == len(steps) + 1  # the step after the last completed one
    # the hint fits the run: a tighter clip where there is one, clipping where there is none
    assert ("a tighter clip (grad_clip is 1)" if grad_clip else "grad_clip is off") \
        in str(info.value)
    assert all_finite(model)  # the diverging step's update was not applied
    assert all(p.grad is None for p in model.parameters())  # nor its gradients kept


def test_grad_norm_is_measured_every_step_even_without_clipping():
    data = tiny_task()
    off = train(tiny_model(data), data, tiny_config(grad_clip=0.0), progress=False)
    assert len(off["grad_norm"]) == 8
    assert all(type(g) is float and math.isfinite(g) and g > 0 for g in off["grad_norm"])
    # a clip that never bites runs the same steps: the norms are the same numbers
    never = train(tiny_model(data), data, tiny_config(grad_clip=1e30), progress=False)
    assert never["grad_norm"] == off["grad_norm"] and never["loss"] == off["loss"]


# ------------------------------------------------------------------------------ C. Ctrl-C

def interrupt_cli(*args, wait=0.2, sig=signal.SIGINT):
    """Start ``python -m minilora ARGS``, wait for its 'training a GPT' line, then for its first
    evaluation line (so that steps are surely done, however busy the machine) and ``wait`` more
    seconds, press Ctrl-C; returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "minilora", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if seen[0].startswith("training a GPT") and line.startswith("step "):
                break
        else:
            pytest.fail(f"training never got going: {''.join(seen)}{proc.stderr.read()}")
        time.sleep(wait)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + out, err


def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_for_bit(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["train", *TINY, "--steps", "100000", "--eval-every", "100"]
    code, out, err = interrupt_cli(*flags, "--out", run)
    assert code == 130, err
    assert f"minilora train --resume {run}" in err
    assert "Traceback" not in err
    saved = load_checkpoint(run).step
    assert 100 <= saved < 100000  # the first evaluation (step 100) was printed before Ctrl-C
    assert f"interrupted after step {saved} of 100000" in err
    assert history(run)["step"] == list(range(1, saved + 1))
    until = saved + 5
    assert main(["train", "--resume", str(run), "--until", str(until), "--no-progress"]) == 0
    assert main([*flags, "--until", str(until), "--out", str(straight)]) == 0
    assert_same_checkpoint(run, straight)
    assert history(run)["loss"] == history(straight)["loss"]


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32",
                    reason="SIGTERM as POSIX sends it")
def test_sigterm_stops_between_steps_and_saves_as_ctrl_c_does(tmp_path):
    """timeout, docker stop and Slurm ask a run to stop with SIGTERM before they kill it: the run
    finishes its step and saves, and the save resumes as after Ctrl-C."""
    run = tmp_path / "run"
    code, out, err = interrupt_cli("train", *TINY, "--steps", "100000", "--eval-every", "100",
                                   "--out", run, sig=signal.SIGTERM)
    assert code == 130, err
    assert f"minilora train --resume {run}" in err and "Traceback" not in err
    saved = load_checkpoint(run).step
    assert 100 <= saved < 100000 and history(run)["step"] == list(range(1, saved + 1))
    assert main(["train", "--resume", str(run), "--until", str(saved + 2), "--no-progress"]) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="a signal sent to the process itself")
@pytest.mark.parametrize("sig", [s for s in ("SIGINT", "SIGTERM") if hasattr(signal, s)])
def test_a_stop_signal_during_the_final_save_waits_for_the_save(tmp_path, monkeypatch, sig):
    """The final save ran outside the deferred-signal block: a Ctrl-C or SIGTERM during it
    threw the finished run away (a fresh run left nothing at all, or only its staging folder)."""
    import os

    from minilora import train as train_mod

    real = train_mod.save_checkpoint

    def signalled(*args, **kwargs):  # the signal lands while the save is being made
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", signalled)
    data = tiny_task()
    with pytest.warns(UserWarning, match="a stop signal came during the final save"):
        train(tiny_model(data), data, tiny_config(), progress=False, out_dir=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").step == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left


def test_ctrl_c_with_no_save_on_interrupt_saves_nothing(tmp_path):
    run = tmp_path / "run"
    code, out, err = interrupt_cli("train", *TINY, "--steps", "100000", "--eval-every", "100",
                                   "--out", run, "--no-save-on-interrupt")
    assert code == 130, err
    assert "nothing saved" in err and "Traceback" not in err
    assert not run.exists() and siblings(run) == []


# ------------------------------------------------------------------- D. text runs resume

TEXT = "to be or not to be, that is the question. " * 20


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """A 6-step text run, and the same run stopped after 3 steps (its text in notes.txt)."""
    root = tmp_path_factory.mktemp("text")
    source = root / "notes.txt"
    source.write_text(TEXT, encoding="utf-8")
    common = ["train", "--text", str(source), "--steps", "6", *TEXT_MODEL]
    assert main([*common, "--out", str(root / "straight")]) == 0
    assert main([*common, "--until", "3", "--out", str(root / "part")]) == 0
    return root


def copy_part(text_runs, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(text_runs / "part", part)
    return part


def test_a_text_run_records_its_file_and_resumes_from_the_cli(text_runs, tmp_path, capsys):
    part = copy_part(text_runs, tmp_path)
    saved = load_checkpoint(part).extra["text"]
    assert saved["path"] == str((text_runs / "notes.txt").resolve())
    assert saved["sha256"] == sha256_file(text_runs / "notes.txt")
    assert load_checkpoint(part).step == 3
    capsys.readouterr()
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert_same_checkpoint(part, text_runs / "straight")
    assert load_checkpoint(part).extra["text"] == saved  # and it can be resumed again


def test_resume_refuses_a_text_file_that_changed(text_runs, tmp_path, capsys):
    part = copy_part(text_runs, tmp_path)
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT.replace("question", "questoin"), encoding="utf-8")
    before = snapshot(part)
    assert main(["train", "--resume", str(part), "--text", str(changed), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("minilora train: error: train --resume: the text file")
    assert "changed" in line and str(changed) in line and "SHA-256" in line
    assert snapshot(part) == before


def test_a_moved_text_file_is_found_again_with_text(tmp_path, capsys):
    source = tmp_path / "notes.txt"
    source.write_text(TEXT, encoding="utf-8")
    common = ["train", "--text", str(source), "--steps", "6", *TEXT_MODEL]
    assert main([*common, "--until", "3", "--out", str(tmp_path / "part")]) == 0
    moved = tmp_path / "moved" / "renamed.txt"
    moved.parent.mkdir()
    source.rename(moved)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "missing" in line and str(source) in line and "--text" in line
    assert main(["train", "--resume", str(tmp_path / "part"), "--text", str(moved),
                 "--no-progress"]) == 0
    ck = load_checkpoint(tmp_path / "part")
    assert ck.step == 6 and ck.extra["text"]["path"] == str(moved.resolve())
    moved.rename(source)  # the straight run reads the same bytes from the first place
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert_same_checkpoint(tmp_path / "part", tmp_path / "straight")


def test_a_relative_text_path_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--text", "notes.txt", "--steps", "6", "--until", "3", *TEXT_MODEL,
                 "--out", "part"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "part").step == 6


# -------------------------------------------------------------------------- E. extension

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step task run."""
    out = tmp_path_factory.mktemp("ext") / "done"
    assert main(["train", *TINY, "--steps", "6", "--warmup", "2", "--out", str(out)]) == 0
    return out


def test_extending_a_run_continues_at_its_final_learning_rate(finished, tmp_path, capsys):
    before = snapshot(finished)
    longer = tmp_path / "longer"
    assert main(["train", "--resume", str(finished), "--steps", "10", "--out", str(longer),
                 "--no-progress"]) == 0
    assert "done: 10 steps" in capsys.readouterr().out
    assert load_checkpoint(longer).step == 10
    min_lr = load_checkpoint(finished).train_config["min_lr"]
    h, h0 = history(longer), history(finished)
    assert h["step"] == list(range(1, 11))
    assert h["lr"][:6] == h0["lr"] and h["loss"][:6] == h0["loss"]
    assert h["lr"][6:] == [min_lr] * 4
    assert snapshot(finished) == before  # --out elsewhere: the finished run is untouched


def test_extending_with_lr_decays_from_lr_to_min_lr(finished, tmp_path):
    longer = tmp_path / "longer"
    assert main(["train", "--resume", str(finished), "--steps", "10", "--lr", "0.01",
                 "--min-lr", "0.001", "--out", str(longer), "--no-progress"]) == 0
    added = history(longer)["lr"][6:]
    assert len(added) == 4
    assert added[0] == pytest.approx(0.01, rel=1e-12)
    assert all(a > b for a, b in zip(added, added[1:])), added
    assert all(0.001 <= a <= 0.01 + 1e-15 for a in added)
    phases = load_checkpoint(longer).train_config["phases"]
    assert phases == [[6, 0.01, 0.001]]


def test_an_extended_run_interrupted_resumes_bit_for_bit(finished, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    extend = ["train", "--resume", str(finished), "--steps", "10", "--no-progress"]
    assert main([*extend, "--out", str(whole)]) == 0
    assert main([*extend, "--until", "8", "--out", str(part)]) == 0
    assert load_checkpoint(part).step == 8
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert_same_checkpoint(part, whole)


@pytest.mark.parametrize("flags,needles", [
    (["--steps", "3"], ["--steps 3 is below the run's 6", "--until"]),
    (["--steps", "6", "--lr", "0.01"], ["drop --lr"]),
    (["--lr", "0.01"], ["drop --lr"]),
    (["--min-lr", "0.0001"], ["drop --min-lr (--lr and --min-lr set"]),
    (["--task", "nocarry"], ["continues a run on what it was trained on", "task 'add'",
                             "drop --task nocarry"]),
    (["--steps", "10", "--lr", "0.001", "--min-lr", "0.01"], ["min_lr=0.01 must not exceed"]),
])
def test_extension_flags_that_do_not_extend_are_refused(finished, tmp_path, flags, needles,
                                                        capsys):
    before = snapshot(finished)
    out = tmp_path / "out"
    assert main(["train", "--resume", str(finished), *flags, "--out", str(out),
                 "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("minilora train: error:")
    for needle in needles:
        assert needle in line, line
    assert not out.exists() and snapshot(finished) == before


@pytest.mark.parametrize("damage", ["deep", "too large", "not lists"])
def test_a_damaged_history_costs_only_the_plot_of_the_earlier_steps(text_runs, tmp_path, capsys,
                                                                    monkeypatch, damage):
    """history.json is read as any JSON minilora reads: at most MAX_JSON_BYTES, nesting that
    would overflow the stack refused. A history that cannot be read does not stop --resume: one
    note, and the written history starts at the resumed step."""
    from minilora import tensorfile
    from tests.test_cli_trust import rewrite_manifest_entry

    part = copy_part(text_runs, tmp_path)
    if damage == "deep":
        text = '{"step": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif damage == "too large":
        text = json.dumps({"step": list(range(100_000))})  # 600 kB, over a 50 kB limit
        monkeypatch.setattr(tensorfile, "MAX_JSON_BYTES", 50_000)  # checkpoint.json is below
    else:
        text = json.dumps({"step": 3, "loss": None, "eval": "x"})
    (part / "history.json").write_text(text, encoding="utf-8")
    rewrite_manifest_entry(part, "history.json")  # the manifest agrees: the reader must cope
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "history.json" in err and "could not be read" in err and "step 3" in err
    assert "Traceback" not in err and "RecursionError" not in err
    assert history(part)["step"] == [4, 5, 6]
