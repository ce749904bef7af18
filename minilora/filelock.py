"""One writer at a time for each save: an advisory lock file beside the destination.

Two processes saving to one directory undo each other: each cleans the other's staging directory
(the other's save then fails on a file that vanished), or they swap in turn and the last one
silently wins. So a writer holds ``.NAME.lock`` in DEST's parent, locked with ``flock(2)``:

- :func:`writing` around each save (``fileio.atomic_directory``), waiting a while for another
  writer's save to end;
- :func:`claim` inside a :func:`claims` block, for a whole command: the command line claims its
  ``--out`` as it checks it, so a second ``train --out DEST`` beside a running one is refused at
  once, naming DEST and the other process.

The lock belongs to the thread that took it and nests there (a run that holds its ``--out``
saves into it); another thread of the same process waits for it as another process does, since
two threads saving to one destination undo each other just the same. The kernel drops it when
its holder dies, so a kill leaves at most an unlocked file, which the next
writer takes; the holder removes the file when it lets go, and a taker checks that the file it
locked is still the one at that name.
Where ``flock`` is missing (Windows) or the lock file cannot be made (a read-only medium, where
the save itself will say why it cannot be written) no lock is taken.

Readers meet writers at the save directory itself: a load holds a shared ``flock`` on DEST
(:func:`reading`), and a writer's swap, the two renames that put a new save in, holds it
exclusively (:func:`swapping`), so a swap waits for the loads in progress (up to
:data:`SWAP_WAIT` seconds; then it goes ahead, and the loader's manifest check,
``fileio.read_whole``, reads again). ``flock`` grants shared locks while an exclusive one
waits, so a stream of loads would hold a swap off for good: while it waits, the writer also
holds its staging folder exclusively, and a load first waits at any staging folder beside DEST
that a writer holds (a gate). Nothing is created for this: the locks are the directories'.

A lock file that is there but cannot serve (a symbolic link, which would have minilora write
into its target; a directory; a FIFO; a file of another user) is refused by name, since two
writers would otherwise run unlocked.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DestinationError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".lock"
WAIT = 60.0  # seconds a save waits for another writer's save to end
SWAP_WAIT = 10.0  # seconds a swap waits for the loads in progress to end

# lock file -> [fd, depth, pid, thread id]: what this process's threads hold
_held: dict[str, list[int]] = {}
# per thread, one list per open claims() block: (lock file claimed, the folders the claim made
# for it); a thread's claims are its own, as its locks are
_claim_blocks = threading.local()


def _claims_here() -> list[list[tuple[str | None, list[Path]]]]:
    """This thread's stack of open claims() blocks."""
    if not hasattr(_claim_blocks, "stack"):
        _claim_blocks.stack = []
    return _claim_blocks.stack


def lock_file(dest: str | os.PathLike) -> Path:
    """Where the lock of the save at ``dest`` lies: ``.NAME.lock`` beside it."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{SUFFIX}"


def _key(path: Path) -> str:
    """One name per file whatever the way to it (relative, through a link to the folder, after a
    chdir): the resolved parent and the name. Two names for one lock file would have this process
    wait for its own lock, flock telling two open files apart even in one process."""
    try:
        return str(path.parent.resolve() / path.name)
    except OSError:  # pragma: no cover - a parent that cannot be resolved
        return os.path.abspath(path)


# a lock file is opened without following a link (a link there would have minilora write into,
# or create, a file elsewhere) and without waiting (a FIFO there would block the open)
_OPEN = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def _holder(path: str) -> str:
    """The process id the lock file names, for the refusal ('' when it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | (_OPEN & ~os.O_RDWR))
        try:
            pid = os.read(fd, 32).decode("ascii").strip()
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def _unusable(subject: str, path: str, why: str) -> DestinationError:
    """The refusal of a lock file that is there but cannot serve."""
    return DestinationError(f"{subject} cannot be locked against a second writer: {path!r} "
                            f"{why}; remove it (no minilora process is using it then) or choose "
                            f"another path")


def _lock(path: str, subject: str) -> int | None:
    """Lock ``path`` without waiting: its fd, None if another process holds it, -1 when no lock
    can be taken there (no lock file can be made: the save itself will say why it cannot be
    written; or the file system has no flock). A lock file that is there but cannot serve (a
    link, a directory, a FIFO, another user's) is refused by name rather than skipped: two
    writers would then run unlocked."""
    for _ in range(1000):  # the holder before us may remove the file between our open and lock
        try:
            fd = os.open(path, _OPEN | os.O_CREAT, 0o666)
        except OSError as exc:
            if not os.path.lexists(path):
                return -1
            kind = "is a symbolic link" if os.path.islink(path) else \
                f"cannot be opened ({exc.strerror or exc})"
            raise _unusable(subject, path, kind) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _unusable(subject, path, "is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError:  # a file system without flock
                os.close(fd)
                return -1
            try:
                same = os.lstat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                except OSError as exc:
                    raise _unusable(subject, path, f"cannot be written ({exc.strerror or exc})") \
                        from None
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    return -1


def _acquire(dest: Path, subject: str, wait: float) -> str | None:
    """Take (or nest into) the lock of ``dest``; returns its key, None when none could be taken.
    ``subject`` begins the refusal: "--out 'runs/x'", "the save 'runs/x'"."""
    if fcntl is None:
        return None
    key = _key(lock_file(dest))
    entry = _held.get(key)
    if entry is not None and entry[2] != os.getpid():
        del _held[key]  # a forked child's copy: the lock stays its parent's
    elif entry is not None and entry[3] == threading.get_ident():
        entry[1] += 1
        return key
    # held by another thread of this process, its flock stands against this one's as another
    # process's would (flock tells open files apart): the loop below waits for either alike
    deadline = time.monotonic() + wait
    while True:
        fd = _lock(key, subject)
        if fd == -1:
            return None
        if fd is not None:
            _held[key] = [fd, 1, os.getpid(), threading.get_ident()]
            return key
        if time.monotonic() >= deadline:
            entry = _held.get(key)
            who = "another thread of this process" if entry is not None and \
                entry[2] == os.getpid() else f"another process{_holder(key)}"
            raise DestinationError(f"{subject} is being written by {who}: two writers would "
                                   f"destroy each other's saves; wait for it to finish or choose "
                                   f"another path")
        time.sleep(0.05)


def _release(key: str | None) -> None:
    """Let go of one hold of ``key``; the last one removes the lock file and closes it."""
    entry = _held.get(key) if key is not None else None
    if entry is None or entry[2] != os.getpid() or entry[3] != threading.get_ident():
        return  # a forked child unwinding its parent's hold: the lock stays the parent's
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        try:
            os.unlink(key)  # while still locked: a taker that opened it sees it went
        except OSError:
            pass
        os.close(entry[0])


@contextmanager
def writing(dest: str | os.PathLike, wait: float | None = None) -> Iterator[None]:
    """Hold the lock of the save at ``dest`` for the block, waiting up to ``wait`` seconds (None:
    :data:`WAIT`) for another process, or another thread of this one, to let go (then
    :class:`DestinationError`, naming ``dest`` and the holder)."""
    key = _acquire(Path(dest), f"the save {str(dest)!r}", WAIT if wait is None else wait)
    try:
        yield
    finally:
        _release(key)


@contextmanager
def claims() -> Iterator[None]:
    """A block (one command) in which :func:`claim` holds locks; they are let go as it ends, and
    the folders a claim made that are still empty are removed (a command that failed leaves
    none behind)."""
    stack = _claims_here()
    stack.append([])
    try:
        yield
    finally:
        for key, made in reversed(stack.pop()):
            _release(key)
            _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: the first that is not holds the
    save, and so do those above it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def claim(dest: str | os.PathLike, what: str = "the output") -> None:
    """Hold the lock of ``dest`` until the enclosing :func:`claims` block ends (outside one, do
    nothing); refused at once (:class:`DestinationError`) when another process, or another
    thread of this one, holds it."""
    if not _claims_here():
        return
    dest = Path(dest)
    missing = [p for p in dest.parents if not p.exists()]  # deepest first
    try:  # the save's parent is made now, so that two commands meet at its lock from the start
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # each save says why it cannot be written
    try:
        key = _acquire(dest, f"{what} {str(dest)!r}", wait=0.0)
    except BaseException:
        _remove_empty(missing)
        raise
    _claims_here()[-1].append((key, missing))


def _open_dir(path: Path) -> int | None:
    """A read-only fd of directory ``path``, or None when it is not there."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # missing (a swap half done, or nothing there): the loader says or recovers
        return None


def _flock_until(fd: int, op: int, seconds: float, pause: float = 0.0005) -> bool:
    """Take flock ``op`` (LOCK_SH or LOCK_EX) on ``fd``, trying again every ``pause`` seconds
    while another holds a conflicting one, for at most ``seconds``. False when it could not be
    taken in time, or at all (a file system without flock): the caller goes on unlocked. Polled,
    not blocking, so that a Ctrl-C or a hung holder never leaves anyone waiting for ever."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
        except OSError:  # ENOLCK, ENOSYS: no flock here
            return False


def _pass_gates(parent: Path, prefix: str) -> None:
    """Wait at each folder in ``parent`` whose name starts with ``prefix`` (a writer's staging
    folder) while a writer holds it: a swap about to happen goes first (see :func:`swapping`)."""
    try:
        names = [e for e in os.listdir(parent) if e.startswith(prefix)]
    except OSError:
        return
    for name in names:
        fd = _open_dir(parent / name)
        if fd is not None:
            try:  # a writer that hangs holds no one for ever
                _flock_until(fd, fcntl.LOCK_SH, SWAP_WAIT + 5.0, pause=0.002)
            finally:
                os.close(fd)


# the directories this thread is loading now: a load inside another load of the same save
# (load_base reads the checkpoint through load_model) must not wait at the gate for a writer
# that waits for the outer load
_local = threading.local()


def _loading() -> set:
    """The directories this thread is loading now."""
    if not hasattr(_local, "reading"):
        _local.reading = set()
    return _local.reading


@contextmanager
def reading(directory: str | os.PathLike, gates: str | None = None) -> Iterator[None]:
    """Hold a shared lock on the save ``directory`` for the block (a load): a writer's swap
    (:func:`swapping`) waits until the block ends. First the load waits at the writer's gate
    (folders beside ``directory`` whose names start with ``gates``, a writer's staging folders),
    so that a swap waiting for the loads in progress is not held off by new ones: flock itself
    would keep granting shared locks to a stream of loads. Nested in a load of the same directory
    it only runs the block; where no lock can be taken, the block runs unlocked."""
    key = _key(Path(directory))
    if fcntl is None or key in _loading():
        yield
        return
    path, fd = Path(directory), None
    try:
        if gates:
            _pass_gates(path.parent, gates)
        for _ in range(3):
            fd = _open_dir(path)
            if fd is None:
                break
            # a swap holds it only for its two renames, the gate keeps new swaps back meanwhile
            if _flock_until(fd, fcntl.LOCK_SH, SWAP_WAIT + 5.0):
                try:
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break  # no swap went by while it waited: the save at ``directory``
                except OSError:
                    pass
            os.close(fd)
            fd = None
        _loading().add(key)
        yield
    finally:
        _loading().discard(key)
        if fd is not None:
            os.close(fd)


def _close_gate(stage: str | os.PathLike | None) -> int | None:
    """Hold ``stage`` (the writer's staging folder) exclusively, so that loads beginning now wait
    at it (:func:`_pass_gates`); its fd, or None. Loads only touch it in passing, so a short
    wait is enough; without it the swap waits as before."""
    fd = _open_dir(Path(stage)) if stage is not None and fcntl is not None else None
    if fd is not None and not _flock_until(fd, fcntl.LOCK_EX, 1.0):
        os.close(fd)
        fd = None
    return fd


@contextmanager
def swapping(dest: str | os.PathLike, stage: str | os.PathLike | None = None,
             wait: float | None = None) -> Iterator[None]:
    """Hold the save directory ``dest`` exclusively for the block (a swap), once the loads that
    hold it (:func:`reading`) have ended, or after ``wait`` seconds (None: :data:`SWAP_WAIT`)
    whatever they do (their manifest check then reads again). Meanwhile ``stage``, the staging
    folder about to be swapped in, is the gate at which new loads wait."""
    gate = fd = None
    try:
        gate = _close_gate(stage)
        fd = _open_dir(Path(dest)) if fcntl is not None else None
        if fd is not None:
            _flock_until(fd, fcntl.LOCK_EX, SWAP_WAIT if wait is None else wait)
        yield
    finally:
        for held in (fd, gate):
            if held is not None:
                os.close(held)


__all__ = ["SUFFIX", "WAIT", "SWAP_WAIT", "lock_file", "writing", "claims", "claim", "reading",
           "swapping"]
