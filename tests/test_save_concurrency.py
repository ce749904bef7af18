"""Saves with company: a load while a run saves gets one save, never a mix of two; a reader that
finishes a swap does not break the writer; two writers to one destination meet at a lock (the
second command is refused at once, naming the other process; a second save waits its turn), and
a killed holder leaves nothing locked."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from minilora import checkpoint as checkpoint_module
from minilora import fileio, filelock, lora
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.cli import main
from minilora.errors import CheckpointError, DestinationError
from minilora.fileio import atomic_directory, read_whole, recover, sha256_file
from minilora.filelock import lock_file
from minilora.gpt import GPT, GPTConfig
from tests.helpers import TINY
from tests.test_save_kills import _adapter_model, _loaded, _model, _save_checkpoint_step, _saver


@contextmanager
def _held_by_another_thread(hold):
    """``with hold():`` entered in a thread of its own and held there until the block ends."""
    inside, release = threading.Event(), threading.Event()

    def run():
        with hold():
            inside.set()
            release.wait(10)
    thread = threading.Thread(target=run)
    thread.start()
    assert inside.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join()


def _save(kind: str, where, k: int) -> None:
    if kind == "checkpoint":
        _save_checkpoint_step(str(where), _model(), k)
    else:
        lora.save_adapter(_adapter_model(k), str(where))


def _consistent(kind: str, where) -> int:
    """Load what is there and check that what the load returned agrees with itself (history.json,
    read by path after the load, may be a later save's); returns its k."""
    if kind == "adapter":
        return _loaded(kind, str(where))
    ck = load_checkpoint(where)
    assert all((v == ck.step).all() for v in ck.weights.values()), ck.step
    return ck.step


def _swap_during_read(monkeypatch, kind: str, where, saves: list[int]) -> None:
    """Make the loader's tensor read save ``saves.pop(0)`` to ``where`` just before it reads: a
    swap that the load's lock did not hold back (a file system without flock, or a load longer
    than the swap's wait), which the manifest check must catch."""
    monkeypatch.setattr(filelock, "SWAP_WAIT", 0.05)  # the swap happens inside the load here
    module = checkpoint_module if kind == "checkpoint" else lora.io
    real = module.read_tensors

    def read_tensors(*args, **kwargs):
        if saves:
            _save(kind, where, saves.pop(0))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "read_tensors", read_tensors)


# ------------------------------------------------------------------------ readers


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_a_save_swapped_in_during_a_load_is_not_mixed_into_it(tmp_path, monkeypatch, kind):
    where = tmp_path / kind
    _save(kind, where, 1)
    _swap_during_read(monkeypatch, kind, where, [2])
    # the first read met save 1's config and save 2's tensors; it is thrown away and made again
    assert _loaded(kind, str(where)) == 2


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_a_save_replaced_at_every_read_is_refused_by_name(tmp_path, monkeypatch, kind):
    where = tmp_path / kind
    _save(kind, where, 1)
    _swap_during_read(monkeypatch, kind, where, list(range(2, 2 + fileio.READ_TRIES)))
    with pytest.raises(CheckpointError, match=f"replaced {fileio.READ_TRIES} times while it "
                                              f"was read"):
        _loaded(kind, str(where))


@pytest.mark.host_only("files only")
def test_read_whole_reads_a_save_without_a_manifest_once(tmp_path):
    (tmp_path / "plain").mkdir()
    calls = []
    assert read_whole(tmp_path / "plain", lambda: calls.append(1) or "read") == "read"
    assert calls == [1]
    with pytest.raises(CheckpointError, match="nothing"):  # a failure with nothing changed
        read_whole(tmp_path / "plain", lambda: (_ for _ in ()).throw(CheckpointError("nothing")))


@pytest.mark.parametrize("kind", ["checkpoint", "adapter"])
def test_loads_while_another_process_saves_each_get_one_save(tmp_path, kind):
    """The real thing: a child saves save after save; every load here must agree with itself
    (every weight equal to the step, an adapter's rank matching its alpha)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minilora", "numpy", "safetensors.numpy"])
    where = tmp_path / kind
    _save(kind, where, 0)
    started, done = ctx.Event(), ctx.Value("l", -1, lock=False)
    child = ctx.Process(target=_saver, args=(kind, str(where), 1, started, done), daemon=True)
    child.start()
    try:
        assert started.wait(30)
        seen = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline or len(seen) < 3:
            assert time.monotonic() < deadline + 30, "the saver stopped saving"
            seen.add(_consistent(kind, where))
    finally:
        child.kill()
        child.join(30)
    assert len(seen) >= 3  # the loads did meet different saves


# ------------------------------------------------------------------------ the swap


@pytest.mark.host_only("files only")
def test_a_swap_waits_for_the_load_in_progress(tmp_path):
    dest = tmp_path / "s"
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"old")
    inside, seen = threading.Event(), []

    def load():
        with filelock.reading(dest):
            inside.set()
            time.sleep(0.4)
            seen.append((dest / "a").read_bytes())  # still the save it began with
    reader = threading.Thread(target=load)
    reader.start()
    assert inside.wait(10)
    t0 = time.monotonic()
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"new")
    waited = time.monotonic() - t0
    reader.join()
    assert seen == [b"old"] and (dest / "a").read_bytes() == b"new"
    assert 0.2 < waited < filelock.SWAP_WAIT


@pytest.mark.host_only("files only")
def test_a_reader_that_finishes_the_swap_does_not_break_the_writer(tmp_path, monkeypatch):
    dest = tmp_path / "s"
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"old")
    real_rename = os.rename
    finished_by_reader = []

    def rename(src, dst):
        real_rename(src, dst)
        if os.fspath(src) == os.fspath(dest) and not finished_by_reader:
            # step 1 of the swap is done: a reader now finds DEST missing and finishes step 2
            finished_by_reader.append(recover(dest))
    monkeypatch.setattr(fileio.os, "rename", rename)
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"new")
    monkeypatch.undo()
    assert finished_by_reader == [dest]
    assert (dest / "a").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["s"]  # the old save went, no lock file stays


# ------------------------------------------------------------------------ writers


def _hold_in_another_process(path) -> subprocess.Popen:
    """A process that holds the lock file ``path`` (flock, as another minilora would) until
    killed; returns once it holds it."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'%d\\n' % os.getpid())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _refused_beside_a_holder(capsys, dest, flag: str, argv: list[str]) -> None:
    """``main(argv)`` while another process holds the lock of ``dest``: one line naming ``flag``,
    ``dest`` and that process, at once (not after a wait)."""
    holder = _hold_in_another_process(lock_file(dest))
    try:
        t0 = time.monotonic()
        rc = main(argv)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"{flag} {str(dest)!r} is being written by another process (process {holder.pid})" \
        in err[0]
    assert waited < filelock.WAIT / 2  # refused before any work, not after a wait


def test_a_second_command_writing_the_same_out_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    _refused_beside_a_holder(capsys, out, "--out", ["train", "--task", "add", "--steps", "2",
                                                    "--eval-every", "2", "--out", str(out),
                                                    *TINY])
    assert not out.exists()
    # killed, the holder leaves its (unlocked) file: the next command takes it and removes it
    assert main(["train", "--task", "add", "--steps", "2", "--eval-every", "2",
                 "--out", str(out), *TINY]) == 0
    assert load_checkpoint(out).step == 2
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.host_only("files only")
def test_a_save_waits_for_another_writers_save_to_end(tmp_path, monkeypatch):
    dest = tmp_path / "s"
    fd = os.open(lock_file(dest), os.O_RDWR | os.O_CREAT)  # another writer, by its own open file
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, (fd,)).start()  # its save ends after 0.3 s
    t0 = time.monotonic()
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"mine")
    assert time.monotonic() - t0 >= 0.25
    assert (dest / "a").read_bytes() == b"mine"
    # one that never lets go: refused after the wait, the destination untouched
    fd = os.open(lock_file(dest), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(filelock, "WAIT", 0.2)
    try:
        with pytest.raises(DestinationError, match=r"the save .* is being written by another "
                                                   r"process"):
            with filelock.writing(dest):
                pass
        with pytest.raises(DestinationError, match="is being written by another process"):
            with atomic_directory(dest) as stage:
                stage.write_bytes("a", b"other")
    finally:
        os.close(fd)
    assert (dest / "a").read_bytes() == b"mine"


@pytest.mark.host_only("files only")
def test_the_lock_nests_within_a_process_and_is_removed_when_let_go(tmp_path):
    dest = tmp_path / "s"
    with filelock.claims():
        filelock.claim(dest, "--out")
        assert lock_file(dest).read_text().strip() == str(os.getpid())
        with atomic_directory(dest) as stage:  # the command's own save, inside its claim
            stage.write_bytes("a", b"1")
        with atomic_directory(dest) as stage:
            stage.write_bytes("a", b"2")
        assert lock_file(dest).exists()  # still the command's
    assert not lock_file(dest).exists()
    filelock.claim(dest)  # outside a command: nothing is held
    assert not lock_file(dest).exists()
    assert (dest / "a").read_bytes() == b"2"


# ------------------------------------------------------------ what the sweep of the locks found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained through the CLI (2 steps)."""
    out = tmp_path_factory.mktemp("locks") / "base"
    assert main(["train", "--task", "add", "--steps", "2", "--eval-every", "2", "--out", str(out),
                 *TINY]) == 0
    return out


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_resuming_in_place_is_refused_while_another_process_writes_there(
        tmp_path, capsys, trained, command):
    """--resume DIR writing back into DIR took no lock: a second run there was accepted and the
    first silently replaced its result when it ended (or waited 60 s, then lost its own)."""
    run = tmp_path / "run"
    if command == "train":
        shutil.copytree(trained, run)
    else:
        assert main(["finetune", "--from", str(trained), "--task", "nocarry", "--steps", "2",
                     "--eval-every", "2", "--out", str(run), "--no-progress"]) == 0
    before = sha256_file(run / "model.safetensors")
    capsys.readouterr()
    _refused_beside_a_holder(capsys, run, "--resume",
                             [command, "--resume", str(run), "--steps", "4", "--no-progress"])
    assert sha256_file(run / "model.safetensors") == before


@pytest.mark.host_only("files only")
@pytest.mark.parametrize("kind", ["link", "dangling link", "directory", "fifo"])
def test_a_lock_file_that_cannot_serve_is_refused_by_name(tmp_path, kind):
    """A link was followed (its target emptied and given a pid; a dangling one made a file
    elsewhere); a directory or a file of another user made the writers run unlocked; a FIFO made
    the save spin for ever."""
    dest, lock = tmp_path / "s", lock_file(tmp_path / "s")
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir()
    if kind == "link":
        target.write_text("precious data", encoding="utf-8")
        lock.symlink_to(target)
    elif kind == "dangling link":
        lock.symlink_to(target)
    elif kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    why = {"link": "is a symbolic link", "dangling link": "is a symbolic link",
           "directory": r"cannot be opened \(Is a directory\)",
           "fifo": "is not a regular file"}[kind]
    with pytest.raises(DestinationError, match=f"the save {str(dest)!r} cannot be locked against "
                                               f"a second writer: {str(lock)!r} {why}; remove it"):
        with atomic_directory(dest) as stage:
            stage.write_bytes("a", b"1")
    assert not dest.exists()
    if kind == "link":
        assert target.read_text(encoding="utf-8") == "precious data"
    elif kind == "dangling link":
        assert not target.exists()
    assert os.path.lexists(lock)  # left for the user to look at


@pytest.mark.host_only("refused before any work")
@pytest.mark.parametrize("out, said", [
    (("L" * 245,), "a name of 245 bytes is too long for the staging folder"),
    # over NAME_MAX itself: every stat failed first, and the line named no flag
    (("L" * 300,), "a name of 300 bytes is too long for the staging folder"),
    (("x", "L" * 300, "run"), "the folder name 'LLLL"),
])
def test_a_name_too_long_for_the_staging_folder_is_refused_before_training(tmp_path, capsys,
                                                                           out, said):
    out = tmp_path.joinpath(*out)
    assert main(["train", "--task", "add", "--steps", "30", "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minilora train: error: --out ") and said in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.host_only("refused before any work")
def test_a_second_demo_writing_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    holder = _hold_in_another_process(lock_file(out))
    try:
        assert main(["demo", "--quick", "--out", str(out)]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"demo --out {str(out)!r} is being written by another process" \
        in err[0]


@pytest.mark.host_only("refused before any work")
def test_a_command_that_fails_leaves_no_folders_it_made(tmp_path, capsys):
    """The claim makes --out's parents (two commands must meet at one lock); a command refused
    later left them behind, empty."""
    out = tmp_path / "new" / "a" / "b" / "x"
    assert main(["train", "--task", "add", "--steps", "5", "--block-size", "2", "--out", str(out),
                 *TINY]) == 1
    assert "needs a context of at least" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


BIG = GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=256)


def _keep_loading(where: str, started, stop) -> None:
    """A reader process: load ``where`` until told to stop."""
    started.set()
    while not stop.is_set():
        load_checkpoint(where)


def test_a_stream_of_loads_does_not_hold_a_save_off(tmp_path):
    """flock grants shared locks while an exclusive one waits: processes loading in a loop held
    every swap for its whole wait (10 s a save beside 4 readers). The writer's gate lets the
    loads in progress end and makes the new ones wait."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minilora", "numpy", "safetensors.numpy"])
    where = tmp_path / "ck"
    model = GPT(BIG)  # loads of 13 MB: long enough that they overlap one another
    save_checkpoint(where, model, model_config=BIG, step=0)
    stop = ctx.Event()
    readers = []
    for _ in range(4):
        started = ctx.Event()
        readers.append(ctx.Process(target=_keep_loading, args=(str(where), started, stop),
                                   daemon=True))
        readers[-1].start()
        assert started.wait(30)
    try:
        time.sleep(0.3)  # the loads are running
        times = []
        for k in range(1, 4):
            t0 = time.monotonic()
            save_checkpoint(where, model, model_config=BIG, step=k)
            times.append(time.monotonic() - t0)
    finally:
        stop.set()
        for r in readers:
            r.join(30)
    assert all(r.exitcode == 0 for r in readers)  # every load succeeded
    assert max(times) < filelock.SWAP_WAIT / 2, times
    assert load_checkpoint(where).step == 3


# ------------------------------------------------------------ what the review of the locks found


@pytest.mark.host_only("files only")
def test_a_ctrl_c_while_a_swap_waits_leaves_nothing_locked(tmp_path, monkeypatch):
    """The wait ran in a thread that took the lock later and kept it for the process's life:
    every later load of the save hung."""
    dest = tmp_path / "s"
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"1")

    def interrupted(seconds):
        raise KeyboardInterrupt
    with _held_by_another_thread(lambda: filelock.reading(dest)):
        monkeypatch.setattr(filelock.time, "sleep", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with filelock.swapping(dest):
                pass
        monkeypatch.undo()
    fd = os.open(dest, os.O_RDONLY)
    try:  # nobody holds the save any more
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.host_only("files only")
def test_a_file_system_without_flock_saves_without_waiting(tmp_path, monkeypatch):
    """ENOLCK was taken for 'a load holds it': every save over an existing one waited 10 s."""
    def no_flock(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(filelock.fcntl, "flock", no_flock)
    dest = tmp_path / "s"
    t0 = time.monotonic()
    for k in range(3):
        with atomic_directory(dest) as stage:
            stage.write_bytes("a", b"%d" % k)
        assert read_whole(dest, lambda: (dest / "a").read_bytes()) == b"%d" % k
    assert time.monotonic() - t0 < filelock.SWAP_WAIT / 2


@pytest.mark.host_only("files only")
def test_a_load_inside_a_load_of_the_same_save_does_not_wait_for_the_writer(tmp_path):
    """load_base reads the checkpoint through load_model: the inner load waited at the gate of a
    writer that waited for the outer load, 10 s each."""
    dest = tmp_path / "s"
    with atomic_directory(dest) as stage:
        stage.write_bytes("a", b"old")
    gates = f".{dest.name}.tmp-"

    def save():
        with atomic_directory(dest) as stage:
            stage.write_bytes("a", b"new")
    with filelock.reading(dest, gates):
        writer = threading.Thread(target=save)
        writer.start()
        deadline = time.monotonic() + 10
        while not any(e.startswith(gates) for e in os.listdir(tmp_path)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # the writer is at its gate, waiting for this load
        t0 = time.monotonic()
        with filelock.reading(dest, gates):
            pass
        assert time.monotonic() - t0 < 1.0
    writer.join()
    assert (dest / "a").read_bytes() == b"new"


@pytest.mark.host_only("files only")
def test_one_destination_named_two_ways_is_one_lock(tmp_path, monkeypatch):
    """A claim through the real folder and a save through a link to it (or the other way) made
    two lock keys for one file: the process waited 60 s for its own lock, then blamed another."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setattr(filelock, "WAIT", 0.5)
    with filelock.claims():
        filelock.claim(tmp_path / "real" / "x", "--resume")
        with atomic_directory(tmp_path / "link" / "x") as stage:
            stage.write_bytes("a", b"1")
        monkeypatch.chdir(tmp_path / "real")
        with atomic_directory("x") as stage:  # relative, after a chdir
            stage.write_bytes("a", b"2")
    assert (tmp_path / "real" / "x" / "a").read_bytes() == b"2"
    assert sorted(os.listdir(tmp_path / "real")) == ["x"]


@pytest.mark.host_only("files only")
def test_two_threads_of_one_process_take_turns_at_one_destination(tmp_path):
    """The lock was the process's: a second thread nested into the first one's hold, and the two
    saves cleaned each other's staging folders (or swapped in turn, the last silently winning)."""
    dest = tmp_path / "s"
    errors, done = [], []

    def saver(tag: bytes) -> None:
        try:
            for k in range(25):
                with atomic_directory(dest) as stage:
                    stage.write_bytes("a", tag * (k + 1))
                    time.sleep(0.001)  # a save's work, with the other thread about
                    stage.write_bytes("b", tag)
                done.append(tag)
        except Exception as exc:  # noqa: BLE001 -- any failure of a save is the test's failure
            errors.append(exc)
    threads = [threading.Thread(target=saver, args=(t,)) for t in (b"x", b"y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 50
    a, b = (dest / "a").read_bytes(), (dest / "b").read_bytes()
    assert set(a) == set(b) and len(a) == 25 and fileio.verify_manifest(dest)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no staging folder, no lock file left


@pytest.mark.host_only("files only")
def test_a_thread_that_cannot_wait_is_told_another_thread_writes(tmp_path):
    dest = tmp_path / "s"
    with _held_by_another_thread(lambda: filelock.writing(dest)):
        with pytest.raises(DestinationError, match="being written by another thread of this "
                                                   "process"):
            with filelock.writing(dest, wait=0.2):
                pass
        with filelock.claims():  # a command's claim is refused at once, not nested
            with pytest.raises(DestinationError, match="another thread"):
                filelock.claim(dest, "--out")
    with filelock.writing(dest, wait=0.2):  # let go: this thread takes it, and nests in it
        with filelock.writing(dest, wait=0.0):
            assert lock_file(dest).exists()
    assert not lock_file(dest).exists()
