"""The command line: help a newcomer can follow, the train/sample/eval/demo round trip, resuming in
fresh processes, and one clear line for each usual mistake."""

import os
import subprocess
import sys

import numpy as np
import pytest

from minilora.checkpoint import load_checkpoint
from minilora.cli import main
from minilora.data import TASKS
from tests.helpers import ROOT, TINY, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained through the CLI (1-digit addition, 30 steps)."""
    out = tmp_path_factory.mktemp("cli") / "base"
    assert main(["train", "--task", "add", "--steps", "30", "--eval-every", "15", "--out", str(out),
                 *TINY]) == 0
    return out


@pytest.mark.host_only("the help text is argument parsing")
def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("train", "sample", "eval", "demo", *TASKS, "183+459=0642.", "183+459=0532."):
        assert word in text
    for command, needles in (("train", ["--task", "--out", "--resume", "--steps", "default"]),
                             ("sample", ["--checkpoint", "--prompt", "--temperature"]),
                             ("eval", ["--checkpoint", "--task", "held-out"]),
                             ("demo", ["--quick", "--out", "LoRA", "QLoRA", "addition"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for needle in needles:
            assert needle in text, (command, needle)


def test_train_writes_a_checkpoint_and_reports(trained, capsys):
    ck = load_checkpoint(trained)
    assert ck.step == 30 and ck.extra["task"] == {"name": "add", "digits": 1}
    assert ck.model_config["n_embd"] == 16 and ck.model_config["block_size"] == 6
    assert (trained / "history.json").is_file()


def test_eval_prints_the_accuracy_of_the_checkpoint(trained, capsys):
    from minilora.checkpoint import load_model
    from minilora.data import TaskDataset, get_task
    from minilora.train import exact_match

    assert main(["eval", "--checkpoint", str(trained), "--examples", "20", "--show", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    model, _ = load_model(trained)
    expected = exact_match(model, TaskDataset(get_task("add", 1), n_heldout=20), 20)
    assert f"held-out exact match {expected:.1%} on 20 questions" in out[0]
    assert len(out) == 4 and all("(true " in line for line in out[1:])


def test_sample_continues_the_prompt_greedily(trained, capsys):
    assert main(["sample", "--checkpoint", str(trained), "--prompt", "3+4="]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("3+4=") and len(first) <= len("3+4=") + 3
    assert main(["sample", "--checkpoint", str(trained), "--prompt", "3+4="]) == 0
    assert capsys.readouterr().out.strip() == first  # greedy: the same every time
    assert main(["sample", "--checkpoint", str(trained), "--prompt", "3+4=", "--temperature",
                 "1.5", "--seed", "1", "--num-samples", "3", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("3+4=") for line in lines)


@pytest.mark.host_only("the errors come from files and names, before any array")
@pytest.mark.parametrize("argv,needles", [
    (["eval", "--checkpoint", "no/such/run"], ["no checkpoint", "no/such/run"]),
    (["sample", "--checkpoint", "no/such/run", "--prompt", "1+1="], ["no/such/run"]),
    (["train", "--task", "mul", "--steps", "1"], ["unknown task 'mul'", ", ".join(TASKS)]),
])
def test_mistakes_give_one_clear_line(argv, needles, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"minilora {argv[0]}: error:")
    for needle in needles:
        assert needle in err


def _options(*metavars):
    """(command, option) for every argument of every command whose metavar is one of these."""
    import argparse

    from minilora.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.metavar in metavars:
                yield command, (action.option_strings or [None])[0]


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("command,option,kind", [
    *((c, o, "path") for c, o in _options("DIR", "FILE", "PATH")),
    *((c, o, "name") for c, o in _options("NAME"))])
def test_an_empty_path_or_name_is_refused_by_name(command, option, kind, capsys):
    # an empty --out or --adapter-name would otherwise fall back to the default, an empty input
    # path would be looked up as the current directory or a file named ''
    argv = [command, ""] if option is None else [command, option, ""]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"expected a {kind}, got ''" in err and (option is None or option in err), err


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("argv,needles", [
    # bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer encodes
    (["sample", "--checkpoint", "x", "--prompt", "12" + "\udcff"],
     ["--prompt", "not valid UTF-8", "byte 0xff at character 2"]),
    (["finetune", "--from", "x", "--task", "nocarry", "--full", "--qlora"],
     ["--qlora", "not allowed with", "--full"]),
    (["finetune", "--from", "x", "--task", "nocarry", "--qlora", "--lora"],
     ["--lora", "not allowed with", "--qlora"]),
])
def test_contradictions_and_undecodable_text_are_refused_by_the_parser(argv, needles, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in err, err


@pytest.mark.host_only("the targets are refused before the model is touched")
def test_an_empty_target_list_is_refused_not_taken_for_the_default(trained, tmp_path, capsys):
    for target in ("", " , "):
        assert main(["finetune", "--from", str(trained), "--task", "nocarry", "--target", target,
                     "--steps", "1", "--out", str(tmp_path / "t")]) == 1
        assert "--target must name modules" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.host_only("the directory is refused before anything is loaded")
def test_a_base_directory_of_neither_kind_names_both_kinds(tmp_path, capsys):
    # it used to say only that checkpoint.json was missing, to someone importing a Hugging Face
    # model, whose directory needs config.json
    other = tmp_path / "photos"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    for argv in (["import", "--hf", str(other), "--out", str(tmp_path / "o")],
                 ["finetune", "--from", str(other), "--task", "nocarry", "--out",
                  str(tmp_path / "f")]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(other) in err, err
        assert "neither a minilora checkpoint (checkpoint.json) nor a Hugging Face GPT-2 " \
               "(config.json + model.safetensors)" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


def test_prompt_outside_the_vocabulary_names_the_characters(trained, capsys):
    assert main(["sample", "--checkpoint", str(trained), "--prompt", "3 plus 4="]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "' lpsu'" in err and "'3 plus 4='" in err and "0123456789" in err
    assert main(["eval", "--checkpoint", str(trained), "--task", "div"]) == 1
    assert "unknown task 'div'" in capsys.readouterr().err


@pytest.mark.host_only("the settings are refused before a model is built")
def test_resume_rejects_new_settings(trained, capsys):
    assert main(["train", "--resume", str(trained), "--lr", "0.5"]) == 1
    assert "drop --lr" in capsys.readouterr().err


def test_interrupted_and_resumed_in_fresh_processes_equals_one_run(tmp_path):
    args = ["train", "--task", "max", "--steps", "12", "--eval-every", "4", "--dropout", "0.1",
            *TINY]
    straight = run_cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    evals = [line for line in straight.stdout.splitlines() if "held-out exact match" in line]
    assert [line.split()[1] for line in evals[:3]] == ["4", "8", "12"]  # then the summary line
    first = run_cli(*args, "--until", "5", "--out", tmp_path / "part")
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(tmp_path / "part").step == 5
    rest = run_cli("train", "--resume", tmp_path / "part", "--out", tmp_path / "resumed",
                   "--no-progress")
    assert rest.returncode == 0, rest.stderr
    assert "resuming" in rest.stdout and "done: 12 steps" in rest.stdout
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a.step == b.step == 12 and a.weights.keys() == b.weights.keys()
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name], err_msg=name)
    for name in a.optimizer["arrays"]:
        np.testing.assert_array_equal(a.optimizer["arrays"][name], b.optimizer["arrays"][name])


def test_text_training_and_sampling(tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    assert main(["train", "--text", str(text_file), "--block-size", "16", "--steps", "6",
                 "--eval-every", "3", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--no-progress", "--out", str(tmp_path / "text")]) == 0
    assert "validation loss" in capsys.readouterr().out
    sample = ["sample", "--checkpoint", str(tmp_path / "text"), "--prompt", "to be",
              "--max-new-tokens", "10", "--seed", "3"]
    assert main(sample) == 0
    first = capsys.readouterr().out.rstrip("\n")
    # at most 10 new bytes (fewer characters when some form one UTF-8 character, fewer bytes when
    # the end-of-text token comes first), and the same ones for the same seed
    assert first.startswith("to be") and len(first) <= len("to be") + 10
    assert main(sample) == 0
    assert capsys.readouterr().out.rstrip("\n") == first
    # a text has no answers to match: eval says how to measure a text model
    assert main(["eval", "--checkpoint", str(tmp_path / "text")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "trained on a text" in line and "notes.txt" in line
    assert "--text FILE" in line and "--task" in line
    assert main(["eval", "--checkpoint", str(tmp_path / "text"), "--text", str(text_file),
                 "--examples", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # nor can a task's questions be put to it: it printed a score, then failed to decode
    assert main(["eval", "--checkpoint", str(tmp_path / "text"), "--task", "add"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "eval --task add: the task's 16 symbols are not this model's vocabulary (257" in err


@pytest.mark.host_only("--help and a missing directory: no model is built")
def test_python_dash_m_runs_the_cli():
    result = run_cli("--help")
    assert result.returncode == 0 and "minilora" in result.stdout
    bad = run_cli("sample", "--checkpoint", "missing-dir", "--prompt", "1+1=")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "missing-dir" in bad.stderr


@pytest.mark.host_only("OpenBLAS's thread count is the CPU's")
def test_blas_threads_can_be_limited_after_numpy_is_loaded(capsys):
    config = np.__config__.CONFIG["Build Dependencies"]["blas"]
    if "openblas" not in str(config.get("name", "")).lower() or sys.platform != "linux":
        pytest.skip("NumPy is not linked against OpenBLAS here")
    import ctypes

    from minilora.fast.cpu import set_blas_threads

    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "openblas" in line.lower())
    lib = ctypes.CDLL(path)
    getter = getattr(lib, "scipy_openblas_get_num_threads64_", None) or \
        lib.openblas_get_num_threads
    before = getter()
    try:
        assert set_blas_threads(1) and getter() == 1
        assert set_blas_threads(2) and getter() == 2
    finally:
        set_blas_threads(before)
    for value, said in (("0", "must be at least 1, got 0"), ("abc", "expected an integer"),
                        (str(10**20), "must be at most 4,096"), ("", "expected an integer")):
        with pytest.raises(SystemExit) as stop:
            main(["eval", "--checkpoint", "x", "--threads", value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument --threads: {said}" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("argv, said", [
    (["train", "--r", "4", "--task", "add"], "minilora train: error: unrecognized arguments: "
                                             "--r 4; --r is a flag of finetune"),
    (["sample", "--checkpoint", "x", "--prompt", "1", "--steps", "3"],
     "--steps is a flag of train and finetune"),
    (["train", "--taks", "add"], "minilora train: error: unrecognized arguments: --taks add; "
                                 "--taks: did you mean --task?"),
    (["eval", "--checkpoint", "x", "--ex", "3"], "minilora eval: error: unrecognized arguments: "
                                                 "--ex 3"),
    (["finetune", "--from", "x", "--stepz=4"], "--stepz: did you mean --steps?"),
    (["sample", "--checkpoint", "x", "--prompt", "1", "spare"],
     "minilora sample: error: unrecognized arguments: "
     "spare (see minilora sample --help)"),
])
def test_a_flag_is_taken_whole_and_a_wrong_one_said_by_its_command(argv, said, capsys):
    """argparse took abbreviations (``train --r 4`` was ``--resume 4``: --r is finetune's rank),
    and the top-level parser said the unknown ones without naming the command or its flags."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err and err.count("\n") == 1, err


@pytest.mark.host_only("the parser's default, read from the environment")
def test_backend_defaults_to_the_environment_s_choice(monkeypatch):
    from minilora.cli import build_parser

    for env, expected in (("strict", "strict"), (" CuPy ", "cupy"), ("", "numpy")):
        monkeypatch.setenv("MINILORA_BACKEND", env)
        args = build_parser().parse_args(["eval", "--checkpoint", "x"])
        assert args.backend == expected, env
    monkeypatch.delenv("MINILORA_BACKEND")
    assert build_parser().parse_args(["demo"]).backend == "numpy"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--backend", "tpu"])


def test_a_command_runs_on_its_backend_and_gives_the_caller_s_back(tmp_path):
    """In-process, a command runs on --backend (default: the environment's, the one this run
    tests) and leaves the caller's backend active when it returns."""
    from minilora import backend as B

    run = B.get_backend()
    other = "numpy" if B.on_device() else "strict"
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "default"), *TINY]) == 0
    assert load_checkpoint(tmp_path / "default").backend == run
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "other"), "--backend", other,
                 *TINY]) == 0
    assert load_checkpoint(tmp_path / "other").backend == other
    assert B.get_backend() == run


@pytest.mark.host_only("a command refusing the backend its environment names: no arrays")
@pytest.mark.parametrize("value", ["gpu", "tensorflow"])
def test_a_backend_the_environment_names_but_cannot_be_used_is_one_line(value, tmp_path):
    """``MINILORA_BACKEND`` is read when minilora is imported; the command line reports a value
    it cannot use as every other failure (one line, no traceback), and --backend overrides it."""
    env = {**os.environ, "MINILORA_BACKEND": value, "PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "minilora", *args],  # noqa: E731
                                       cwd=tmp_path, env=env, capture_output=True, text=True,
                                       timeout=60)
    done = run("eval", "--checkpoint", "missing")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("minilora eval: error: ") and repr(value) in lines[0]
    assert "MINILORA_BACKEND" in lines[0] and "--backend numpy" in lines[0]
    overridden = run("eval", "--checkpoint", "missing", "--backend", "numpy")
    assert overridden.returncode == 1 and "no checkpoint at 'missing'" in overridden.stderr
    assert "MINILORA_BACKEND" not in overridden.stderr
    with_debug = run("eval", "--checkpoint", "missing", "--debug")
    assert "Traceback" in with_debug.stderr and "BackendError" in with_debug.stderr


@pytest.mark.host_only("a command's output pipe closing: no arrays")
def test_a_reader_that_stops_reading_ends_the_command_quietly(monkeypatch, capsys):
    """``minilora ... | head``: when the pipe closes, the command stops with 141 (128 + SIGPIPE),
    as a shell's tools do, and prints no error about it."""
    import minilora.cli as cli

    def reader_gone(args):
        print("a first line")
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "_sample", reader_gone)
    assert main(["sample", "--checkpoint", "x", "--prompt", "1+1="]) == 141
    assert capsys.readouterr().err == ""


def test_a_misspelled_adapter_directory_is_said_to_be_missing(trained, tmp_path, capsys):
    """It was named by the first file looked for in it ('.../adapter_model.safetensors' is
    missing), as if the directory were there."""
    for where, said in ((tmp_path / "nocary", "the directory does not exist"),
                        (trained / "checkpoint.json", "is a file, not an adapter directory")):
        assert main(["eval", "--checkpoint", str(trained), "--adapter", str(where)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"minilora eval: error: --adapter {str(where)!r}: {said}"], err


def test_a_target_name_that_matches_no_layer_is_refused(trained, tmp_path, capsys):
    """``q_proj,v_prj`` trained q alone, in silence (PEFT refuses only a list matching nothing)."""
    out = tmp_path / "ft"
    assert main(["finetune", "--from", str(trained), "--task", "nocarry", "--target",
                 "q_proj,v_prj", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minilora finetune: error: --target v_prj: no linear layer of the base is "
                   "called so (its linear layers: fc, k_proj, o_proj, proj, q_proj, v_proj); "
                   "v_prj: did you mean v_proj?"], err
    assert not out.exists()


def test_an_adapter_of_a_base_of_another_vocabulary_is_refused(trained, tmp_path, capsys):
    """Its LoRA shapes fit (they follow n_embd alone), so a text model's adapter went on a task
    model with only a note, and printed its bytes as digits (rc 0)."""
    text = tmp_path / "t.txt"
    text.write_text("abc abd abe " * 40, encoding="utf-8")
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--no-progress"]
    assert main(["train", "--text", str(text), "--block-size", "16", "--steps", "2",
                 "--out", str(tmp_path / "story"), *small]) == 0
    assert main(["finetune", "--from", str(tmp_path / "story"), "--text", str(text), "--steps",
                 "2", "--out", str(tmp_path / "letters"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(trained), "--adapter", str(tmp_path / "letters"),
                 "--prompt", "1+2="]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert f"--adapter {str(tmp_path / 'letters')!r} was fine-tuned on a base of another kind: " \
           f"vocab_size 257 (the base here: " in err


def test_a_merged_checkpoint_is_evaluated_on_its_adapter_s_task(trained, tmp_path, capsys):
    """The merge kept the base's record: eval scored the merged model on the base's task by
    default (15.9% where it does 100% on the fine-tune's), which reads as a broken merge."""
    assert main(["finetune", "--from", str(trained), "--task", "nocarry", "--steps", "2",
                 "--eval-every", "2", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    assert main(["merge", "--checkpoint", str(trained), "--adapter", str(tmp_path / "ft"),
                 "--out", str(tmp_path / "merged")]) == 0
    extra = load_checkpoint(tmp_path / "merged").extra
    assert extra["task"]["name"] == "nocarry" and "finetune" not in extra
    assert extra["merged"]["adapter"] == [str((tmp_path / "ft").resolve())]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "merged"), "--examples", "5"]) == 0
    assert capsys.readouterr().out.startswith("task 'nocarry'")


def test_a_sample_that_ends_at_once_says_so(tmp_path, capsys, monkeypatch):
    """An empty continuation printed the prompt alone, which reads as a failure."""
    from minilora import backend as B
    from minilora.gpt import GPT

    text = tmp_path / "t.txt"
    text.write_text("abc abd abe " * 40, encoding="utf-8")
    assert main(["train", "--text", str(text), "--block-size", "16", "--steps", "2", "--n-layer",
                 "1", "--n-head", "2", "--n-embd", "16", "--no-progress",
                 "--out", str(tmp_path / "story")]) == 0
    eot = load_checkpoint(tmp_path / "story").tokenizer.eot_id
    monkeypatch.setattr(GPT, "generate", lambda self, idx, n, **kw: B.xp.concatenate(
        [B.asarray(idx), B.xp.full((idx.shape[0], n), eot, dtype=idx.dtype)], axis=1))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tmp_path / "story"), "--prompt", "ab",
                 "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == "ab\n"
    assert err == ("minilora sample: note: the model ended the text at once (end-of-text came "
                   "first with --seed 3); another --seed or a higher --temperature samples "
                   "another start\n")
