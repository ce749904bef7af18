"""Saves that appear whole or not at all (minilora.fileio): the half-done swaps a kill can leave,
built by hand, are finished or undone; files get the umask's mode; a save never replaces a folder
of other files, and a failed one leaves nothing behind; manifests name the file that is wrong."""

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from minilora import fileio, lora
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.errors import CheckpointError, DestinationError
from minilora.fileio import (
    MANIFEST,
    NoManifestWarning,
    atomic_directory,
    check_destination,
    check_writable,
    open_save,
    recover,
    verify_manifest,
)
from minilora.gpt import GPT, GPTConfig
from tests.helpers import host
from tests.test_lora_support import forward, inputs, randomize_lora, tiny

OLD = {"a.bin": b"old save " * 100, "b.json": b'{"which": "old"}\n'}
NEW = {"a.bin": b"new save, longer " * 200, "b.json": b'{"which": "new"}\n'}


def write_save(path, files):
    """A complete save of ``files`` at ``path`` (manifest included), made by atomic_directory."""
    with atomic_directory(path) as stage:
        for name, data in files.items():
            stage.write_bytes(name, data)
    return Path(path)


def staged(dest, kind, files, tag="x1y2z3"):
    """A complete save moved to the sibling name a swap uses: ``.NAME.tmp-TAG`` or
    ``.NAME.old-TAG``."""
    dest = Path(dest)
    scratch = write_save(dest.parent / f"scratch-{kind}-{tag}", files)
    target = dest.parent / f".{dest.name}.{kind}-{tag}"
    os.rename(scratch, target)
    return target


def contents(path):
    path = Path(path)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != MANIFEST}


def siblings(dest):
    dest = Path(dest)
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


# -------------------------------------------------------------------- half-done swaps

def test_a_complete_staging_dir_and_no_dest_finishes_the_swap(tmp_path):
    dest = tmp_path / "save"
    staged(dest, "tmp", NEW)
    assert open_save(dest) == dest  # a first save, killed just before step 2 (tmp -> DEST)
    assert contents(dest) == NEW and verify_manifest(dest)
    assert siblings(dest) == []


def test_finishing_prefers_the_new_save_over_the_old_one(tmp_path):
    dest = tmp_path / "save"
    staged(dest, "old", OLD, "aaaaaa")
    staged(dest, "tmp", NEW, "bbbbbb")  # killed between 1 (DEST -> old) and 2 (tmp -> DEST)
    assert recover(dest) == dest
    assert contents(dest) == NEW
    assert siblings(dest) == [".save.old-aaaaaa"]  # a stray, cleaned at the next save
    write_save(dest, OLD)
    assert siblings(dest) == [] and contents(dest) == OLD


def _no_manifest(stage):
    (stage / MANIFEST).unlink()


def _short_file(stage):
    data = (stage / "a.bin").read_bytes()
    (stage / "a.bin").write_bytes(data[:-10])  # the manifest promises 10 more bytes


def _bad_manifest(stage):
    (stage / MANIFEST).write_text("{not json", encoding="utf-8")


@pytest.mark.parametrize("damage", [_no_manifest, _short_file, _bad_manifest],
                         ids=["no manifest", "short file", "torn manifest"])
def test_an_incomplete_staging_dir_is_undone_to_the_old_save(tmp_path, damage):
    dest = tmp_path / "save"
    old = staged(dest, "old", OLD, "aaaaaa")
    tmp = staged(dest, "tmp", NEW, "bbbbbb")
    damage(tmp)
    assert open_save(dest) == dest
    assert contents(dest) == OLD and verify_manifest(dest)
    assert not old.exists() and tmp.exists()  # the torn new save stays aside, never loaded
    write_save(dest, NEW)  # the next save removes it
    assert siblings(dest) == [] and contents(dest) == NEW


def test_an_older_save_without_a_manifest_is_put_back_too(tmp_path):
    dest = tmp_path / "save"
    old = staged(dest, "old", OLD, "aaaaaa")
    (old / MANIFEST).unlink()  # it was written before saves had manifests
    _no_manifest(staged(dest, "tmp", NEW, "bbbbbb"))
    assert recover(dest) == dest and contents(dest) == OLD


def test_of_two_complete_staging_dirs_the_newest_is_finished(tmp_path):
    dest = tmp_path / "save"
    older = staged(dest, "tmp", OLD, "aaaaaa")
    newer = staged(dest, "tmp", NEW, "bbbbbb")
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    assert recover(dest) == dest and contents(dest) == NEW
    assert siblings(dest) == [".save.tmp-aaaaaa"]


def test_an_incomplete_staging_dir_alone_is_no_save(tmp_path):
    dest = tmp_path / "save"
    _no_manifest(staged(dest, "tmp", NEW))
    assert recover(dest) is None
    with pytest.raises(CheckpointError, match="no save at"):
        open_save(dest)
    assert not dest.exists()


def test_dest_present_wins_over_stray_siblings(tmp_path):
    dest = write_save(tmp_path / "save", OLD)
    staged(dest, "tmp", NEW, "bbbbbb")  # leftovers of older crashes beside a good save
    staged(dest, "old", NEW, "cccccc")
    assert open_save(dest) == dest and recover(dest) == dest
    assert contents(dest) == OLD
    assert siblings(dest) == [".save.old-cccccc", ".save.tmp-bbbbbb"]
    write_save(dest, NEW)
    assert contents(dest) == NEW and siblings(dest) == []


def test_a_checkpoint_killed_mid_swap_loads_the_new_one(tmp_path):
    cfg = GPTConfig(vocab_size=12, block_size=4, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg)
    dest = save_checkpoint(tmp_path / "ck", model, model_config=cfg, step=1)
    for p in model.parameters():
        p.data[...] += 1.0
    save_checkpoint(tmp_path / "scratch", model, model_config=cfg, step=2)
    os.rename(dest, tmp_path / ".ck.old-aaaaaa")  # step 1 of the swap done, step 2 not
    os.rename(tmp_path / "scratch", tmp_path / ".ck.tmp-bbbbbb")
    loaded = load_checkpoint(dest)
    assert loaded.step == 2 and loaded.directory == dest
    np.testing.assert_array_equal(loaded.weights["wte.weight"], host(model.wte.weight))


# ------------------------------------------------------------------------------- modes

@pytest.mark.parametrize("umask,dir_mode,file_mode", [
    (0o027, 0o750, 0o640), (0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_save_gets_the_mode_the_umask_gives(tmp_path, umask, dir_mode, file_mode):
    previous = os.umask(umask)
    try:
        dest = write_save(tmp_path / "save", NEW)
        model = GPT(GPTConfig(vocab_size=12, block_size=4, n_layer=1, n_head=2, n_embd=8))
        ck = save_checkpoint(tmp_path / "ck", model, step=0)
    finally:
        os.umask(previous)
    for d in (dest, ck):
        assert os.stat(d).st_mode & 0o777 == dir_mode, oct(os.stat(d).st_mode)
        names = sorted(os.listdir(d))
        assert MANIFEST in names and len(names) >= 3
        for name in names:
            assert os.stat(d / name).st_mode & 0o777 == file_mode, (name, umask)


# ------------------------------------------------------------------ refusing and failing

def test_atomic_directory_refuses_a_directory_of_other_files(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine", encoding="utf-8")
    refused = r"mine': it holds files that are not a minilora save \(notes\.txt\)"
    with pytest.raises(DestinationError, match=refused):
        with atomic_directory(dest, ("a.bin", "b.json")) as stage:
            stage.write_bytes("a.bin", b"x")
    assert os.listdir(dest) == ["notes.txt"] and siblings(dest) == []
    with pytest.raises(DestinationError, match="it is a file"):
        with atomic_directory(dest / "notes.txt"):
            pass
    for under in (dest / "notes.txt" / "sub", dest / "notes.txt" / "sub" / "deeper"):
        # pathlib's FileExistsError / NotADirectoryError named nothing the user gave
        with pytest.raises(DestinationError, match=r"notes\.txt' is a file, not a directory"):
            with atomic_directory(under):
                pass
    assert (dest / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_atomic_directory_replaces_an_older_save_without_a_manifest(tmp_path):
    dest = tmp_path / "older"
    dest.mkdir()
    (dest / "a.bin").write_bytes(b"from before manifests")
    with atomic_directory(dest, ("a.bin", "b.json")) as stage:
        stage.write_bytes("a.bin", NEW["a.bin"])
    assert contents(dest) == {"a.bin": NEW["a.bin"]} and verify_manifest(dest)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [True, False])
def test_an_error_inside_the_block_leaves_dest_as_it_was(tmp_path, error, existing):
    dest = tmp_path / "save"
    if existing:
        write_save(dest, OLD)
        before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(error):
        with atomic_directory(dest) as stage:
            stage.write_bytes("a.bin", NEW["a.bin"])
            raise error("stopped half way")
    assert siblings(dest) == [] and sorted(p.name for p in tmp_path.iterdir()) == (
        ["save"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


# ------------------------------------------------------------------------ destinations

def test_check_destination_says_what_is_wrong(tmp_path, monkeypatch):
    assert check_destination(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty")
    (tmp_path / "f").write_text("x", encoding="utf-8")
    with pytest.raises(DestinationError, match="is a file, not a directory"):
        check_destination(tmp_path / "f")
    with pytest.raises(DestinationError, match="cannot be made"):
        check_destination(tmp_path / "f" / "sub")
    save = write_save(tmp_path / "save", OLD)
    with pytest.raises(DestinationError, match="already holds a save; pass --force"):
        check_destination(save, flag="--force")
    assert check_destination(save, overwrite=True) == save
    other = tmp_path / "other"
    other.mkdir()
    for i in range(5):
        (other / f"n{i}.txt").write_text("x", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match=r"'n0\.txt', 'n1\.txt', 'n2\.txt', \.\.\."):
            check_destination(other, overwrite=overwrite, what="--out")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkdtemp", refuse)
    with pytest.raises(DestinationError) as info:
        check_writable(tmp_path / "x" / "y", what="--out")
    assert str(info.value) == (f"--out {str(tmp_path / 'x' / 'y')!r} cannot be written: "
                               f"{str(tmp_path)!r} is not writable (Permission denied)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f", "other", "save"]


@pytest.mark.host_only("files only")
@pytest.mark.parametrize("entry, is_dir", [(".git", True), (".notes", False), (".env", False),
                                           (".venv", True)])
def test_a_hidden_entry_inside_a_save_is_someones_and_no_overwrite_deletes_it(tmp_path, entry,
                                                                              is_dir):
    """Hidden or not, what a user put inside a save (a repository's .git, notes) would go with
    the old save in a swap: --overwrite is refused, naming it, and so is a save there at all."""
    save = write_save(tmp_path / "save", OLD)
    inside = save / entry
    inside.mkdir() if is_dir else inside.write_text("mine", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match=rf"other files beside a save \('\{entry}'\)"):
            check_destination(save, overwrite=overwrite, what="--out")
    with pytest.raises(DestinationError, match=rf"not a minilora save \(\{entry}\)"):
        write_save(save, NEW)
    assert inside.exists() and (save / "a.bin").read_bytes() == OLD["a.bin"]
    alone = tmp_path / "alone"  # in a folder of its own it makes the folder not empty
    alone.mkdir()
    (alone / entry).mkdir() if is_dir else (alone / entry).write_text("x", encoding="utf-8")
    with pytest.raises(DestinationError, match="holding other files"):
        check_destination(alone, overwrite=True)


@pytest.mark.host_only("files only")
def test_the_litter_of_desktops_and_tools_neither_blocks_nor_survives_a_save(tmp_path):
    """Finder's .DS_Store and ._ files, Jupyter's checkpoints and a stale probe of ours are
    nobody's work: a folder holding only them is empty, a save holding them may be replaced."""
    litter = [".DS_Store", "._a.bin", ".ipynb_checkpoints", ".minilora-probe-killed"]
    for where in (tmp_path / "empty", tmp_path / "save"):
        if where.name == "save":
            write_save(where, OLD)
        where.mkdir(exist_ok=True)
        for name in litter:
            if name in (".ipynb_checkpoints", ".minilora-probe-killed"):
                (where / name).mkdir()
            else:
                (where / name).write_bytes(b"\0")
        assert check_destination(where, overwrite=where.name == "save") == where
        write_save(where, NEW)
        assert contents(where) == NEW
    with pytest.raises(DestinationError, match="already holds a save"):
        check_destination(tmp_path / "save")


@pytest.mark.host_only("files only")
def test_the_probe_dirs_a_kill_left_are_swept(tmp_path):
    """A kill between making and removing check_writable's probe left a hidden folder behind at
    every such moment; the next check removes those a minute old or more that are empty."""
    old = time.time() - 120
    stale, fresh, full = (tmp_path / f".minilora-probe-{n}" for n in ("killed", "live", "full"))
    for d in (stale, fresh, full):
        d.mkdir()
    (full / "x").write_text("not a probe's", encoding="utf-8")
    for d in (stale, full):
        os.utime(d, (old, old))
    check_writable(tmp_path / "run", what="--out")
    assert not stale.exists() and fresh.exists() and (full / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".minilora-probe-full",
                                                           ".minilora-probe-live"]


# ---------------------------------------------------------------------------- manifests

def test_verify_manifest_names_the_file_that_does_not_match(tmp_path):
    dest = write_save(tmp_path / "save", NEW)
    assert verify_manifest(dest) is True
    data = bytearray((dest / "a.bin").read_bytes())
    data[100] ^= 0xFF
    (dest / "a.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.bin'.*SHA-256 differs"):
        verify_manifest(dest, "mine")
    (dest / "a.bin").write_bytes(NEW["a.bin"] + b"!")
    with pytest.raises(CheckpointError, match=r"^mine: .*a\.bin' has 3,401 bytes.*says 3,400"):
        verify_manifest(dest, "mine")
    (dest / "a.bin").unlink()
    with pytest.raises(CheckpointError, match="incomplete: a.bin is missing"):
        verify_manifest(dest)


def test_a_manifest_may_not_point_outside_its_directory(tmp_path):
    (tmp_path / "secret").write_bytes(b"s")
    dest = write_save(tmp_path / "save", NEW)
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"]["../secret"] = {"bytes": 1, "sha256": fileio.sha256_file(tmp_path / "secret")}
    (dest / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"lists '\.\./secret', which is not a file of"):
        verify_manifest(dest)
    del manifest["files"]["../secret"]
    manifest["files"][str(tmp_path / "secret")] = {"bytes": 1, "sha256": "0" * 64}  # absolute
    (dest / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"which is not a file of the save"):
        verify_manifest(dest)
    (dest / MANIFEST).write_text(json.dumps({"format": "other", "files": {}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a valid manifest"):
        verify_manifest(dest)


def test_no_manifest_is_one_warning_and_false(tmp_path):
    dest = write_save(tmp_path / "save", NEW)
    (dest / MANIFEST).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert verify_manifest(dest, "load_thing") is False
        assert open_save(dest, "load_thing") == dest
    assert [w.category for w in caught] == [NoManifestWarning] * 2
    assert str(caught[0].message).startswith(f"load_thing: {str(dest)!r} has no manifest.json")


# ------------------------------------------------------------------ adapters and merging

def test_loading_an_adapter_into_a_model_where_it_is_merged_is_refused(tmp_path):
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model, 1)
    lora.save_adapter(model, str(tmp_path / "a"))
    randomize_lora(model, 2)  # the model's adapter now differs from the file's
    lora.merge(model)
    x = inputs((3, 5))
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    out_before = forward(model, x)
    with pytest.raises(CheckpointError, match=r"adapter 'default' is merged.*unmerge\(model\) "
                                              r"first"):
        lora.load_adapter(model, str(tmp_path / "a"))
    after = {k: host(v) for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert np.array_equal(forward(model, x), out_before)
    lora.unmerge(model)
    lora.load_adapter(model, str(tmp_path / "a"))  # allowed once unmerged
    shutil.rmtree(tmp_path / "a")


def test_write_files_is_one_whole_save(tmp_path):
    dest = tmp_path / "out"
    paths = fileio.write_files(dest, {"a.json": b"{}\n", "b.bin": b"\x00\x01"})
    assert paths == {"a.json": str(dest / "a.json"), "b.bin": str(dest / "b.bin")}
    assert (dest / "b.bin").read_bytes() == b"\x00\x01" and verify_manifest(dest)
    fileio.write_files(dest, {"a.json": b"[]\n"}, names=("a.json", "b.bin"))  # replaced whole
    assert sorted(os.listdir(dest)) == ["a.json", "manifest.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not a minilora save"):
        fileio.write_files(tmp_path / "other", {"a.json": b"{}"})
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
