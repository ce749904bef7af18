"""Trust at the command line (issue #11): destinations checked before any work, one clear line for
every failure, manifests that catch a damaged or mixed-up save, notes that are one line too."""

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from minilora import fileio, lora
from minilora.checkpoint import load_checkpoint
from minilora.cli import main
from minilora.errors import CheckpointError
from minilora.fileio import MANIFEST, NoManifestWarning, sha256_file
from tests.helpers import TINY, host, run_cli
from tests.test_lora_support import randomize_lora, tiny


def snapshot(directory):
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line(err, command):
    """The single stderr line of a failed command, checked to be ``minilora COMMAND: error:``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minilora {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def rewrite_manifest_entry(directory, name):
    """Make manifest.json agree with an edited file again (so that the field checks are reached)."""
    mpath = Path(directory) / MANIFEST
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    p = Path(directory) / name
    manifest["files"][name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    mpath.write_text(json.dumps(manifest), encoding="utf-8")


def flip_byte(path, at=None):
    data = bytearray(Path(path).read_bytes())
    at = len(data) - 3 if at is None else at  # in the tensor data, past the header
    data[at] ^= 0x01
    Path(path).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained through the CLI (1-digit addition, 4 steps)."""
    out = tmp_path_factory.mktemp("trust") / "base"
    assert main(["train", "--steps", "4", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def ck(trained, tmp_path):
    """A private copy of the trained checkpoint, free to damage."""
    path = tmp_path / "ck"
    shutil.copytree(trained, path)
    return path


# -------------------------------------------------------------- B. destinations, up front

@pytest.mark.host_only("the destination is refused before any work")
@pytest.mark.parametrize("where,needles", [
    ("file.txt", ["is a file, not a directory"]),
    ("file.txt/run", ["cannot be made", "is a file"]),
])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, where, needles):
    (tmp_path / "file.txt").write_text("keep me", encoding="utf-8")
    out = tmp_path / where
    start = time.perf_counter()
    assert main(["train", *TINY, "--steps", "100000", "--out", str(out)]) == 1
    assert time.perf_counter() - start < 5  # 100000 steps would take minutes
    captured = capsys.readouterr()
    assert "training a GPT" not in captured.out and captured.out == ""
    line = one_line(captured.err, "train")
    assert str(out) in line
    for needle in needles:
        assert needle in line
    assert (tmp_path / "file.txt").read_text(encoding="utf-8") == "keep me"


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "3", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line(captured.err, "train")
    assert str(out) in line and "already holds a save" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert main(["train", *TINY, "--steps", "3", "--out", str(out), "--overwrite"]) == 0
    assert load_checkpoint(out).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left behind


def test_resume_into_another_existing_checkpoint_needs_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--steps", "2", "--out", str(a)]) == 0
    assert main(["train", *TINY, "--steps", "3", "--out", str(b)]) == 0
    before = snapshot(b)
    capsys.readouterr()
    assert main(["train", "--resume", str(a), "--steps", "4", "--out", str(b),
                 "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert str(b) in line and "--overwrite" in line
    assert snapshot(b) == before
    assert main(["train", "--resume", str(a), "--steps", "4", "--out", str(b), "--overwrite",
                 "--no-progress"]) == 0
    assert load_checkpoint(b).step == 4


@pytest.mark.parametrize("command", ["finetune", "merge-into-base", "merge-into-adapter",
                                     "quantize", "import"])
def test_out_that_is_what_the_command_reads_is_refused_even_with_overwrite(ck, tmp_path, capsys,
                                                                           command):
    """--out naming the command's own input (--from, --checkpoint, --adapter, --hf) would replace
    what the result is made from: refused before any work, whatever --overwrite says."""
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--from", str(ck), "--task", "nocarry", "--steps", "1",
                 "--out", str(adapter), *TINY[10:]]) == 0
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ck), "--to", "hf", "--out", str(hf)]) == 0
    capsys.readouterr()
    argv, flag, source = {
        "finetune": (["finetune", "--from", str(ck), "--task", "nocarry", "--steps", "1",
                      "--out", str(ck) + "/", *TINY[10:]], "--from", ck),
        "merge-into-base": (["merge", "--checkpoint", str(ck), "--adapter", str(adapter),
                             "--out", str(ck)], "--checkpoint", ck),
        "merge-into-adapter": (["merge", "--checkpoint", str(ck), "--adapter", str(adapter),
                                "--out", str(adapter)], "--adapter", adapter),
        "quantize": (["quantize", "--checkpoint", str(ck), "--out", str(ck)], "--checkpoint", ck),
        "import": (["import", "--hf", str(hf), "--out", str(hf)], "--hf", hf),
    }[command]
    before = snapshot(source)
    assert main([*argv, "--overwrite"]) == 1
    line = one_line(capsys.readouterr().err, argv[0])
    assert f"is where {flag} " in line and "choose another path" in line
    assert snapshot(source) == before


@pytest.mark.parametrize("left", ["old", "tmp"])
def test_inspect_finishes_a_swap_a_kill_left_half_done(ck, capsys, left):
    """eval recovered such a save, inspect said the directory did not exist."""
    os.rename(ck, ck.parent / f".{ck.name}.{left}-aaaa")
    capsys.readouterr()
    assert main(["inspect", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "verified" in out and ck.is_dir()


@pytest.mark.parametrize("left", ["old", "old and tmp"])
def test_a_save_a_kill_left_half_swapped_in_needs_overwrite_too(ck, tmp_path, capsys, left):
    """A kill between the swap's two renames leaves the save beside its name (.NAME.old-*, and
    maybe the complete new one as .NAME.tmp-*). The next command that writes there recovers it
    first, so that --overwrite guards it as it guards any save."""
    old = ck.parent / f".{ck.name}.old-aaaa"
    os.rename(ck, old)
    kept = snapshot(old)
    if left == "old and tmp":
        newer = ck.parent / f".{ck.name}.tmp-bbbb"
        shutil.copytree(old, newer)
        kept = snapshot(newer)  # the swap is finished: the newer save is the one in place
    argv = ["train", "--steps", "2", "--out", str(ck), *TINY]
    assert main(argv) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert "already holds a save" in line and "--overwrite" in line
    assert snapshot(ck) == kept and load_checkpoint(ck).step == 4


@pytest.mark.host_only("the destination is refused before any work")
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_of_other_files_is_never_replaced(tmp_path, capsys, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), *overwrite]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line(captured.err, "train")
    assert str(out) in line and "'notes.txt'" in line and "holding other files" in line
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.host_only("the destination is refused before any work")
def test_destinations_the_swap_cannot_replace_are_refused_before_any_work(tmp_path, capsys,
                                                                           monkeypatch):
    """A symlinked --out was replaced by a real directory (its target kept the old save, a stray
    link came back later); a dangling link and '.' trained for the whole run, then failed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    os.symlink("target", "link")
    os.symlink("nowhere", "dangling")
    for out, words in (("link", "is a symbolic link (to 'target')"),
                       ("dangling", "is a symbolic link (to 'nowhere')"),
                       (".", "names no directory of its own"), ("..", "names no directory")):
        assert main(["train", *TINY, "--steps", "2", "--out", out, "--overwrite"]) == 1
        line = one_line(capsys.readouterr().err, "train")
        assert words in line, line
    assert sorted(os.listdir(tmp_path)) == ["dangling", "link", "target"]
    assert os.listdir(tmp_path / "target") == []


def test_overwrite_never_deletes_what_was_put_beside_a_save(tmp_path, trained, capsys):
    """A save with a manifest counted as replaceable whatever else its folder held: --overwrite
    deleted notes put beside it and the saves written inside it (a fine-tune, an export)."""
    out = tmp_path / "base"
    shutil.copytree(trained, out)
    assert main(["export", "--checkpoint", str(out), "--to", "hf", "--out",
                 str(out / "hf")]) == 0
    (out / "NOTES.txt").write_text("keep me", encoding="utf-8")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert "holding other files beside a save ('NOTES.txt', 'hf')" in line, line
    assert snapshot(out) == before
    (out / "NOTES.txt").unlink()
    shutil.rmtree(out / "hf")
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.host_only("the destination is refused before any work")
@pytest.mark.parametrize("argv", [
    ["train", *TINY, "--steps", "2", "--out", "{tmp}/new/run"],
    ["demo", "--quick", "--no-progress", "--out", "{tmp}/new/demo"],
])
def test_an_unwritable_parent_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkdtemp", refuse)  # root ignores chmod; this does not
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line(captured.err, argv[0])
    assert argv[-1] in line and "cannot be written" in line and "Permission denied" in line
    assert str(tmp_path) in line.split("cannot be written")[1]  # names where it probed
    assert list(tmp_path.iterdir()) == []


def test_the_default_out_is_runs_task_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint in {Path('runs') / 'add'}" in out
    assert load_checkpoint(tmp_path / "runs" / "add").step == 2
    assert main(["train", *TINY, "--steps", "2"]) == 1  # a second run does not clobber it
    line = one_line(capsys.readouterr().err, "train")
    assert "'runs/add'" in line and "--overwrite" in line
    (tmp_path / "story.txt").write_text("once upon a time, there was a cat. " * 10,
                                        encoding="utf-8")
    assert main(["train", "--text", "story.txt", "--block-size", "8", "--steps", "2",
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "story").step == 2


def test_finetune_refuses_a_block_size_it_would_not_use(tmp_path, trained, capsys):
    """--block-size above the base's context was cut to it, and beside --task it did nothing:
    both said nothing. Now each is one line naming the value, and nothing is written."""
    story = tmp_path / "story.txt"
    story.write_text("once upon a time, there was a cat. " * 10, encoding="utf-8")
    assert main(["train", "--text", str(story), "--block-size", "8", "--steps", "2", "--out",
                 str(tmp_path / "text"), "--n-layer", "1", "--n-head", "2", "--n-embd", "8",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--from", str(tmp_path / "text"), "--text", str(story),
                 "--block-size", "9", "--out", str(tmp_path / "a"), "--steps", "1"]) == 1
    line = one_line(capsys.readouterr().err, "finetune")
    assert "--block-size 9" in line and "context of 8" in line
    assert main(["finetune", "--from", str(trained), "--task", "nocarry", "--block-size", "4",
                 "--out", str(tmp_path / "b"), "--steps", "1"]) == 1
    line = one_line(capsys.readouterr().err, "finetune")
    assert "--block-size" in line and "--text only" in line and "--task" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["finetune", "--from", str(tmp_path / "text"), "--text", str(story),
                 "--block-size", "6", "--out", str(tmp_path / "c"), "--steps", "1",
                 "--no-progress"]) == 0  # a shorter context is what the flag is for


# --------------------------------------------------------------- F. one line per failure

@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("argv,needle", [
    (["eval", "--checkpoint", "x", "--examples", "0"], "--examples"),
    (["eval", "--checkpoint", "x", "--examples", "-5"], "--examples"),
    (["sample", "--checkpoint", "x", "--prompt", "1+1=", "--num-samples", "-3"],
     "--num-samples"),
    (["sample", "--checkpoint", "x", "--prompt", "1+1=", "--num-samples", "0"],
     "--num-samples"),
    (["eval", "--checkpoint", "x", "--show", "-1"], "--show"),
])
def test_bad_counts_are_refused_by_the_parser_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err, argv[0])
    assert needle in line and "must be at least" in line and argv[-1] in line


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "", "abc"])
def test_lora_alpha_must_be_a_positive_finite_number(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--from", "x", "--task", "nocarry", "--out", "y", "--alpha", value])
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err, "finetune")
    assert "argument --alpha:" in line and repr(value)[1:-1] in line


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("flag,value", [("--lr", "-1e-3"), ("--lr", "-inf"),
                                        ("--grad-clip", "-nan"), ("--weight-decay", "-.5"),
                                        ("--steps", "-1e3")])
def test_a_negative_number_after_an_option_is_its_value_and_is_checked(flag, value, capsys):
    """argparse alone takes -1e-3 or -inf for an unknown option ("expected one argument"): the
    value must reach its own check, which names it."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", "x", flag, value])
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err, "train")
    assert f"argument {flag}:" in line and value in line and "expected one argument" not in line


@pytest.mark.host_only("argument parsing")
def test_a_negative_number_after_a_flag_without_a_value_stays_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", "x", "--overwrite", "-1"])
    assert info.value.code == 2
    assert "unrecognized arguments: -1" in capsys.readouterr().err


@pytest.mark.host_only("argument parsing")
@pytest.mark.parametrize("argv,flag,most", [
    (["train", "--steps", str(10**20)], "--steps", "1,000,000,000"),
    (["sample", "--checkpoint", "x", "--prompt", "1+1=", "--max-new-tokens", str(10**20)],
     "--max-new-tokens", "1,000,000"),
    (["sample", "--checkpoint", "x", "--prompt", "1+1=", "--num-samples", str(10**7)],
     "--num-samples", "1,000,000"),
])
def test_counts_that_would_run_for_ever_are_refused_by_the_parser(argv, flag, most, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err, argv[0])
    assert f"argument {flag}: must be at most {most}" in line


def test_a_forged_step_count_is_refused_on_resume(ck, capsys):
    def forge(meta):
        meta["train_config"]["steps"] = 10**20
    _edit_meta(ck, forge)
    rewrite_manifest_entry(ck, "checkpoint.json")  # the manifest agrees: the value is checked
    assert main(["train", "--resume", str(ck), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert "steps must be at most MAX_STEPS = 1,000,000,000" in line


def test_eval_show_zero_prints_only_the_accuracy(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--examples", "10", "--show", "0"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and "held-out exact match" in lines[0] and "on 10 questions" in lines[0]
    assert captured.err == ""


@pytest.mark.host_only("the text file is refused as it is read")
def test_a_text_file_that_is_not_utf8_is_named(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 au lait, s'il vous pla\u00eet. ".encode("latin-1") * 20)
    out = tmp_path / "out"
    assert main(["train", "--text", str(text), "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 1
    captured = capsys.readouterr()
    line = one_line(captured.err, "train")
    assert str(text) in line and "UTF-8" in line
    assert "training a GPT" not in captured.out and not out.exists()


def _edit_meta(directory, edit):
    path = Path(directory) / "checkpoint.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    edit(meta)
    path.write_text(json.dumps(meta), encoding="utf-8")


MALFORMED = {
    "missing step": (lambda m: m.pop("step"), ["'step'", "an integer", "None"]),
    "step a string": (lambda m: m.update(step="3"), ["'step'", "an integer", "'3'"]),
    "step a bool": (lambda m: m.update(step=True), ["'step'", "an integer", "True"]),
    "step negative": (lambda m: m.update(step=-1), ["'step'", ">= 0"]),
    "shards zero": (lambda m: m.update(shards=0), ["'shards'", ">= 1"]),
    "shards a string": (lambda m: m.update(shards="2"), ["'shards'", "an integer", "'2'"]),
    "backend a number": (lambda m: m.update(backend=1), ["'backend'", "a string"]),
    "rng garbage": (lambda m: m["rng"].update(host="garbage"),
                    ["'rng.host'", "not a valid random generator state"]),
    "tokenizer kind": (lambda m: m.update(tokenizer={"kind": "words"}),
                       ["'tokenizer'", "not a valid tokenizer", "'words'"]),
    "tokenizer not an object": (lambda m: m.update(tokenizer="chars"),
                                ["'tokenizer'", "an object"]),
    "tokenizer vocab": (lambda m: m.update(tokenizer={"kind": "char", "chars": "0123456789"}),
                        ["10 tokens", "model_config.vocab_size", "inconsistent"]),
    "vocab_size negative": (lambda m: m["model_config"].update(vocab_size=-5),
                            ["model_config.vocab_size", "at least 1", "-5"]),
    "n_layer zero": (lambda m: m["model_config"].update(n_layer=0),
                     ["model_config.n_layer", "at least 1", "0"]),
    "digest of a file elsewhere": (lambda m: m["sha256"].update({"/etc/hostname": "0" * 64}),
                                   ["'sha256' lists '/etc/hostname'", "not a file of the"]),
}


@pytest.mark.host_only("checkpoint.json is refused as it is parsed")
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_json_is_one_line_naming_the_field(ck, capsys, case):
    edit, needles = MALFORMED[case]
    _edit_meta(ck, edit)
    rewrite_manifest_entry(ck, "checkpoint.json")  # as if the save itself had been written so
    assert main(["eval", "--checkpoint", str(ck), "--examples", "5"]) == 1
    line = one_line(capsys.readouterr().err, "eval")
    assert str(ck / "checkpoint.json") in line
    for needle in needles:
        assert needle in line, line


@pytest.mark.host_only("checkpoint.json is refused as it is parsed")
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_json_without_a_manifest_is_refused(ck, case):
    edit, needles = MALFORMED[case]
    _edit_meta(ck, edit)
    (ck / MANIFEST).unlink()  # an older save: the field checks are all there is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoManifestWarning)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(ck)
    assert "checkpoint.json" in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.host_only("the manifest is checked before anything is loaded")
def test_an_edited_checkpoint_json_is_caught_by_the_manifest(ck, capsys):
    _edit_meta(ck, lambda m: m.update(step=3))  # plausible, and still wrong
    assert main(["eval", "--checkpoint", str(ck), "--examples", "5"]) == 1
    line = one_line(capsys.readouterr().err, "eval")
    assert str(ck / "checkpoint.json") in line and "manifest.json" in line
    assert "corrupt or from another save" in line


def test_a_long_prompt_is_cropped_with_a_one_line_note(trained, capsys):
    prompt = "1+2=3.4+5="  # 10 tokens; the model's context is 6
    assert main(["sample", "--checkpoint", str(trained), "--prompt", prompt]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora sample: note: ")
    assert "10 tokens" in lines[0] and "context of 6" in lines[0] and "last 6" in lines[0]
    assert captured.out.startswith(prompt)


@pytest.mark.host_only("a missing checkpoint: no model is built")
def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    missing = tmp_path / "missing"
    plain = run_cli("eval", "--checkpoint", missing)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        f"minilora eval: error: no checkpoint at {str(missing)!r}: the directory does not exist"]
    debug = run_cli("eval", "--checkpoint", missing, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "minilora.errors.CheckpointError" in debug.stderr and str(missing) in debug.stderr


@pytest.mark.host_only("a missing checkpoint: no model is built")
def test_debug_in_process_raises_the_error(capsys):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        main(["eval", "--checkpoint", "no/such/run", "--debug"])


# --------------------------------------------------------------------------- G. manifests

@pytest.mark.host_only("the manifest is checked before anything is loaded")
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "history.json"])
def test_one_changed_byte_is_named(ck, capsys, name):
    flip_byte(ck / name)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ck)
    msg = str(info.value)
    assert str(ck / name) in msg and "SHA-256 differs" in msg and "manifest.json" in msg
    assert main(["sample", "--checkpoint", str(ck), "--prompt", "1+2="]) == 1
    line = one_line(capsys.readouterr().err, "sample")
    assert str(ck / name) in line


@pytest.mark.host_only("the manifest is checked before anything is loaded")
@pytest.mark.parametrize("name", ["optimizer.safetensors", "history.json"])
def test_a_listed_file_that_is_missing_is_named(ck, capsys, name):
    (ck / name).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: {name} is missing"):
        load_checkpoint(ck)
    assert main(["eval", "--checkpoint", str(ck)]) == 1
    assert f"{name} is missing" in one_line(capsys.readouterr().err, "eval")


@pytest.mark.host_only("files read into host arrays")
def test_a_checkpoint_without_a_manifest_loads_with_one_warning(ck):
    (ck / MANIFEST).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(ck)
    assert loaded.step == 4
    notes = [w for w in caught if issubclass(w.category, NoManifestWarning)]
    assert len(notes) == 1 and len(caught) == 1
    assert "manifest.json" in str(notes[0].message) and str(ck) in str(notes[0].message)


def test_sample_from_a_save_without_a_manifest_notes_it_in_one_line(ck, capsys):
    (ck / MANIFEST).unlink()
    assert main(["sample", "--checkpoint", str(ck), "--prompt", "1+2="]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora sample: note: ")
    assert "manifest.json" in lines[0] and str(ck) in lines[0]
    assert captured.out.startswith("1+2=")


def test_a_damaged_adapter_is_named_and_the_model_left_alone(tmp_path):
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model)
    adapter = tmp_path / "adapter"
    lora.save_adapter(model, str(adapter))
    flip_byte(adapter / "adapter_model.safetensors")
    target = tiny()
    before = {k: host(v).copy() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        lora.load_adapter(target, str(adapter))
    msg = str(info.value)
    assert str(adapter / "adapter_model.safetensors") in msg and "SHA-256 differs" in msg
    assert lora.lora_layers(target) == [] and lora.lora_configs(target) == {}
    after = {k: host(v) for k, v in target.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        lora.load_adapter(tiny(), str(adapter))


def test_an_adapter_without_a_manifest_loads_with_one_warning(tmp_path):
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model)
    adapter = tmp_path / "adapter"
    lora.save_adapter(model, str(adapter))
    (adapter / MANIFEST).unlink()  # as PEFT writes it
    target = tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora.load_adapter(target, str(adapter))
    assert [w.category for w in caught] == [NoManifestWarning]
    assert str(adapter) in str(caught[0].message)
    want = lora.adapter_state_dict(model)
    got = lora.adapter_state_dict(target)
    assert all(np.array_equal(host(got[k]), host(want[k])) for k in want)


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_float64_weights_beyond_float32_are_refused_not_made_inf(ck, tmp_path, capsys, kind):
    """A float64 tensor is read into a float32 model only when every value fits: 1e300 would
    become inf, another number, so the load is refused, naming the tensor."""
    from minilora.tensorfile import read_tensors, safetensors_bytes

    directory, name = ck, "model.safetensors"
    argv = ["eval", "--checkpoint", str(ck), "--show", "0"]
    if kind == "adapter":
        directory = tmp_path / "adapter"
        assert main(["finetune", "--from", str(ck), "--task", "nocarry", "--steps", "1",
                     "--out", str(directory), *TINY[10:]]) == 0
        name = next(p.name for p in directory.glob("*.safetensors"))
        argv += ["--adapter", str(directory)]
    arrays = read_tensors(directory / name, "test", float_dtype=None)
    key = next(k for k in arrays if k.endswith("weight") and arrays[k].ndim == 2)
    arrays[key] = np.full(arrays[key].shape, 1e300)  # float64
    (directory / name).write_bytes(safetensors_bytes(arrays))
    rewrite_manifest_entry(directory, name)
    capsys.readouterr()
    assert main(argv) == 1
    line = one_line(capsys.readouterr().err, "eval")
    assert key in line and "beyond the range of float32" in line and "inf" in line


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_nan_weights_are_said_on_load_and_never_exported(ck, tmp_path, capsys, kind):
    """Weights that hold NaN load (inspect and eval may want to look) with a one-line note; an
    export, as a save, refuses to write them."""
    from minilora.tensorfile import read_tensors, safetensors_bytes

    directory, name, extra = ck, "model.safetensors", []
    if kind == "adapter":
        directory = tmp_path / "adapter"
        assert main(["finetune", "--from", str(ck), "--task", "nocarry", "--steps", "1",
                     "--out", str(directory), *TINY[10:]]) == 0
        name = next(p.name for p in directory.glob("*.safetensors"))
        extra = ["--adapter", str(directory)]
    arrays = read_tensors(directory / name, "test", float_dtype=None)
    key = next(k for k in arrays if k.endswith("weight") and arrays[k].ndim == 2)
    arrays[key] = np.full(arrays[key].shape, np.nan, dtype=arrays[key].dtype)
    (directory / name).write_bytes(safetensors_bytes(arrays))
    rewrite_manifest_entry(directory, name)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck), "--show", "0", *extra]) == 0
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "NaN or inf" in line]
    assert len(notes) == 1 and notes[0].startswith("minilora eval: note: ")
    to = ["--to", "peft"] if kind == "adapter" else ["--to", "hf"]
    assert main(["export", "--checkpoint", str(ck), *extra, *to, "--out",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "NaN or inf weights; not writing them" in err and not (tmp_path / "out").exists()


def test_an_adapter_on_another_base_than_its_own_is_said_in_a_note(ck, tmp_path, capsys):
    adapter, other = tmp_path / "adapter", tmp_path / "other"
    assert main(["finetune", "--from", str(ck), "--task", "nocarry", "--steps", "1",
                 "--out", str(adapter), *TINY[10:]]) == 0
    assert main(["train", "--steps", "4", "--seed", "7", "--out", str(other), *TINY]) == 0
    capsys.readouterr()
    for base, notes in ((ck, 0), (other, 1)):
        assert main(["eval", "--checkpoint", str(base), "--adapter", str(adapter),
                     "--show", "0"]) == 0
        said = [line for line in capsys.readouterr().err.splitlines()
                if "fine-tuned from" in line]
        assert len(said) == notes, said
    assert said[0].startswith("minilora eval: note: ") and "weights differ" in said[0]


def test_a_fine_tune_resumes_from_its_base_where_it_was_moved(ck, tmp_path, capsys):
    """The base moved: --resume says so and how to name it; --from names where it is now (its
    digest checked against the record, so another model is refused), and the resumed save
    records the new place."""
    base, moved, run = tmp_path / "base", tmp_path / "moved", tmp_path / "run"
    shutil.copytree(ck, base)
    assert main(["finetune", "--from", str(base), "--task", "nocarry", "--steps", "4",
                 "--until", "2", "--out", str(run), *TINY[10:]]) == 0
    os.rename(base, moved)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err, "finetune")
    assert "is missing" in line and "--from DIR" in line
    other = tmp_path / "other"
    assert main(["train", "--steps", "4", "--seed", "7", "--out", str(other), *TINY]) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--from", str(other), "--no-progress"]) == 1
    assert "is not the one this fine-tune was made from" in one_line(capsys.readouterr().err,
                                                                      "finetune")
    assert main(["finetune", "--resume", str(run), "--from", str(moved), "--no-progress"]) == 0
    assert load_checkpoint(run).step == 4
    assert load_checkpoint(run).extra["finetune"]["base"] == str(moved.resolve())


def test_a_resumed_run_may_not_write_over_what_it_reads(ck, tmp_path, capsys):
    """finetune --resume took its base from the record, never checked against --out: with
    --overwrite it replaced the base it was fine-tuned from by the fine-tune."""
    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(ck, base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    assert main(["finetune", "--from", str(base), "--task", "nocarry", "--steps", "4",
                 "--until", "2", "--out", str(run), *TINY[10:]]) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--out", str(base), "--overwrite",
                 "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err, "finetune")
    assert f"--out {str(base)!r} is where the fine-tune's base" in line, line
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    inner = tmp_path / "outer"  # --resume inside --out: replacing --out would take it along
    shutil.copytree(ck, inner / "ck")
    assert main(["train", "--resume", str(inner / "ck"), "--out", str(inner), "--overwrite",
                 "--steps", "6", "--no-progress"]) == 1
    assert "is where --resume" in one_line(capsys.readouterr().err, "train")
    assert (inner / "ck" / "checkpoint.json").is_file()


def test_small_mistakes_get_a_line_that_names_them(ck, tmp_path, capsys):
    """A file where a checkpoint directory is expected; --lr below the default --min-lr; --text
    and --data together; --version."""
    afile = tmp_path / "afile.txt"
    afile.write_text("hello", encoding="utf-8")
    assert main(["sample", "--checkpoint", str(afile), "--prompt", "1+1="]) == 1
    assert "is a file, not a directory" in one_line(capsys.readouterr().err, "sample")
    assert main(["train", "--lr", "0", "--out", str(tmp_path / "x"), *TINY]) == 1
    line = one_line(capsys.readouterr().err, "train")
    assert "--min-lr" in line and "--lr" in line and not (tmp_path / "x").exists()
    assert main(["eval", "--checkpoint", str(ck), "--text", str(afile), "--data",
                 str(afile)]) == 1
    assert "give one of them" in one_line(capsys.readouterr().err, "eval")
    # --task add is the default, but said with --text it is a second source of data
    assert main(["train", "--task", "add", "--text", str(afile), "--out", str(tmp_path / "t"),
                 *TINY]) == 1
    assert "either --task or --text" in one_line(capsys.readouterr().err, "train")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    from minilora import __version__
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"minilora {__version__}"


def test_a_hugging_face_base_missing_half_its_tokenizer_says_which_half(ck, tmp_path, capsys):
    hf, text = tmp_path / "hf", tmp_path / "story.txt"
    assert main(["export", "--checkpoint", str(ck), "--to", "hf", "--out", str(hf)]) == 0
    text.write_text("a story " * 50, encoding="utf-8")
    (hf / "vocab.json").write_text("{}", encoding="utf-8")
    capsys.readouterr()
    assert main(["finetune", "--from", str(hf), "--text", str(text), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err, "finetune")
    assert "(merges.txt is missing beside its weights)" in line and "vocab.json" not in line


@pytest.mark.host_only("which warnings a command shows: no arrays")
def test_numpy_floating_point_warnings_are_not_notes_but_other_warnings_are(monkeypatch, capsys):
    import warnings

    import minilora.cli as cli

    def noisy(args):
        for text in ("overflow encountered in cast", "invalid value encountered in matmul",
                     "divide by zero encountered in log"):
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        warnings.warn("a cropped prompt", UserWarning, stacklevel=2)
        return 0
    monkeypatch.setattr(cli, "_sample", noisy)
    assert main(["sample", "--checkpoint", "x", "--prompt", "1+1="]) == 0
    assert capsys.readouterr().err.splitlines() == ["minilora sample: note: a cropped prompt"]


def test_import_says_which_half_of_a_tokenizer_is_missing(trained, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(trained), "--to", "hf", "--out", str(hf)]) == 0
    (hf / "vocab.json").write_text('{"a": 0}', encoding="utf-8")  # merges.txt never came along
    capsys.readouterr()
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "imported")]) == 0
    out = capsys.readouterr().out
    assert "no tokenizer (vocab.json is there, but a BPE tokenizer needs vocab.json and " \
           "merges.txt both)" in out, out


def test_import_names_the_tokenizer_it_keeps(trained, tmp_path, capsys):
    """A minilora checkpoint as --hf keeps its character tokenizer; the line said "with its BPE
    tokenizer" of any tokenizer."""
    assert main(["import", "--hf", str(trained), "--out", str(tmp_path / "imported")]) == 0
    out = capsys.readouterr().out
    assert "with its character tokenizer" in out and "BPE" not in out, out


def test_inspect_splits_a_4bit_checkpoints_bits_into_quantized_and_float(trained, tmp_path,
                                                                         capsys):
    """The mean over all parameters mixes the 4-bit weights with the float embeddings, norms and
    biases; inspect says how many of each and what the quantized ones weigh on their own."""
    import re

    from minilora.cli_lora import load_model

    q = tmp_path / "nf4"
    assert main(["quantize", "--checkpoint", str(trained), "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(q)]) == 0
    shown = capsys.readouterr().out.splitlines()
    row = next(line for line in shown if "bits per" in line)
    # a 4-bit copy of the checkpoint keeps its step (it said step 0)
    assert any(line.split() == ["step", str(load_checkpoint(trained).step)] for line in shown)
    m = re.search(r"bits per parameter\s+([\d.]+) \(([\d,]+) quantized weights at ([\d.]+) in "
                  r"codes and scales, ([\d.]+) with each layer's code tables as the file holds "
                  r"them; the other ([\d,]+) in float32\)", row)
    assert m, row
    mean, packed, codes, qbits, rest = (float(g.replace(",", "")) for g in m.groups())
    # at least what `quantize` says (QLoRA's 4 + 8/64 + 32/(64 * 256))
    assert 4.127 <= codes < qbits  # a small layer pads its last blocks: above 4.127
    model, _ = load_model(str(trained))
    layers = [mod for _, mod in model.named_modules() if type(mod).__name__ == "Linear"]
    assert packed == sum(mod.in_features * mod.out_features for mod in layers)
    assert packed + rest == model.num_parameters()
    # a layer this small carries its code and absmax tables at a high cost per weight
    assert qbits > 4.0 and abs(mean - (packed * qbits + rest * 32) / (packed + rest)) < 2e-3


def test_a_hugging_face_base_is_recovered_and_checked_like_a_checkpoint(trained, tmp_path,
                                                                        capsys):
    """import --hf and finetune --from loaded an exported directory without its manifest: a
    flipped byte imported wrong weights with rc 0, and a half-done swap read as missing."""
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(trained), "--to", "hf", "--out", str(hf)]) == 0
    os.rename(hf, tmp_path / ".hf.old-aaaa")  # a kill between the swap's two renames
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "a")]) == 0
    flip_byte(hf / "model.safetensors")
    capsys.readouterr()
    for argv in (["import", "--hf", str(hf), "--out", str(tmp_path / "b")],
                 ["finetune", "--from", str(hf), "--text", str(hf / "config.json"), "--out",
                  str(tmp_path / "c"), "--steps", "1"]):
        assert main(argv) == 1
        line = one_line(capsys.readouterr().err, argv[0])
        assert "model.safetensors' is corrupt or from another save" in line, line
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
