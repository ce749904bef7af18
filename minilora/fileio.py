"""Saves that appear whole or not at all: every directory minilora writes goes through here.

A save (a checkpoint, an adapter, an exported model, the demo's report) is a directory. It is
written into a sibling staging directory ``.NAME.tmp-XXXX``, each file flushed to disk, and a
``manifest.json`` listing every file's size and SHA-256 is written *last*. Only then is the staging
directory swapped in:

    1. rename DEST -> .NAME.old-XXXX      (when a previous save exists)
    2. rename .NAME.tmp-XXXX -> DEST      (the new save is live)
    3. remove .NAME.old-XXXX

A kill at any instant leaves one of: DEST old and complete (before 1); DEST missing, the old save
and a complete new one beside it (between 1 and 2); DEST new (after 2). :func:`open_save` finishes
the swap it finds half done (the staging directory is complete exactly when its manifest is there
and agrees with its files), or undoes it, so a loader always meets the old save or the new one,
never a mix. Strays are cleaned at the next save. A full disk (ENOSPC) leaves DEST untouched and
becomes one :class:`DiskFullError` line naming the path and the bytes needed.

Loading verifies the manifest (:func:`verify_manifest`) and names the file that does not match, so
an adapter's config and its weights are tied together. A load that a writer's swap overtakes
(a run saving while ``sample`` reads) must not return the old save's config with the new save's
weights: :func:`read_whole` holds the save for the load, so that the swap waits for it
(:mod:`minilora.filelock`), and reads again when the manifest changed under it. Writers take
turns at a lock beside the destination. A directory without a manifest (PEFT or transformers
output, older minilora saves) still loads, with a one-line :class:`NoManifestWarning`. Files get
the mode the umask gives, as ``open()`` would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .errors import CheckpointError, DestinationError, DiskFullError, MiniLoraError, check_path
from .filelock import claim, reading, swapping, writing

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "minilora-manifest"
_TMP, _OLD = ".tmp-", ".old-"
_PROBE = ".minilora-probe-"  # check_writable's probe directories
_CHUNK = 1 << 20
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
T = TypeVar("T")

# os.write, one chunk at a time; a module attribute so that a test can make the disk fill up
_write_chunk = os.write


class NoManifestWarning(UserWarning):
    """A save without manifest.json was loaded: its files could not be checked together."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some systems cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ destinations

# what a desktop or a tool puts into any folder it shows (Finder's .DS_Store and ._ files,
# Jupyter's checkpoints) and the probes of ours a kill left: nobody's work, so they neither make a
# folder non-empty nor keep a save there from being replaced. Any other entry counts, hidden or
# not: a .git or a .notes inside a save is someone's, and a swap would delete it.
_LITTER = frozenset({".DS_Store", ".ipynb_checkpoints"})
_LITTER_PREFIXES = ("._", _PROBE)


def _entries(path: Path) -> list[str]:
    """The entries of directory ``path`` that are someone's files (all but the litter above)."""
    return sorted(e for e in os.listdir(path)
                  if e not in _LITTER and not e.startswith(_LITTER_PREFIXES))


def is_save(path: str | Path, names: tuple[str, ...] = ()) -> bool:
    """True when ``path`` is a directory a save may replace: every entry in it is one of the
    files its manifest lists (or the manifest), or, without a manifest, one of ``names`` (the
    files this kind of save writes). A file or folder put beside a save's own (notes, another
    save written inside it) makes it not one: replacing the directory would delete them."""
    path = Path(path)
    return path.is_dir() and bool(_entries(path)) and not _foreign(path, names)


def _foreign(path: Path, names: tuple[str, ...]) -> list[str]:
    """The entries of directory ``path`` that no save there accounts for (see :func:`is_save`);
    all of them when its manifest cannot be read."""
    entries = _entries(path)
    if MANIFEST not in entries:
        return [e for e in entries if e not in names]
    files = _listed_files(path)
    if files is None:
        return entries  # a manifest this cannot read vouches for nothing
    listed = {Path(str(n)).parts[0] for n in files if Path(str(n)).parts} | {MANIFEST}
    return [e for e in entries if e not in listed]


def _listed_files(path: Path) -> dict | None:
    """The ``files`` table of ``path``'s manifest (``{name: {"bytes", "sha256"}}``), or None when
    there is none or it cannot be read (for the lenient readers; verify_manifest says why)."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def check_writable(path: str | Path, what: str = "the output", shown: str | None = None) -> Path:
    """Check, before any work, that ``path`` is not a file and that its directory can be written
    (probed by creating and removing a directory there, which also catches read-only file systems
    and, unlike ``os.access``, is true for root too). Raises :class:`DestinationError`, naming
    ``shown`` (the path the user gave, already quoted, when ``path`` is its parent) or ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{what} {str(path)!r} is a file, not a directory; choose another "
                               f"path")
    probe_at = path if path.is_dir() else path.parent
    while not probe_at.exists():  # the nearest existing ancestor is where mkdir will start
        probe_at = probe_at.parent
    if not probe_at.is_dir():
        raise DestinationError(f"{what} {str(path)!r} cannot be made: {str(probe_at)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe_at, prefix=_PROBE))
    except OSError as exc:  # shown: the path the user gave, when this probes its parent
        raise DestinationError(f"{what} {shown or str(path)!r} cannot be written: "
                               f"{str(probe_at)!r} is not writable ({exc.strerror or exc})") \
            from None
    _sweep_probes(probe_at)
    return path


def _sweep_probes(where: Path) -> None:
    """Remove the probe directories a kill left in ``where`` between making and removing one
    (inside a save, one would be a foreign file that ``--overwrite`` then refuses to delete).
    Only those older than a minute: a live probe lasts microseconds."""
    try:
        names = [e for e in os.listdir(where) if e.startswith(_PROBE)]
    except OSError:
        return
    for name in names:
        try:
            if time.time() - (where / name).lstat().st_mtime > 60:
                os.rmdir(where / name)  # empty, as a probe is: anything else stays
        except OSError:
            pass


def _exists(path: Path) -> bool:
    """``path.exists()``, False where the path cannot even be looked at (a name too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def _check_name_length(path: Path, what: str) -> None:
    """Refuse a save name too long for its staging folder ``.NAME.tmp-XXXXXXXX`` beside it: the
    file system would say so only when the work is done and the save is written."""
    at = path.parent
    while not _exists(at) and at != at.parent:
        at = at.parent
    try:
        limit = os.pathconf(at, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
        limit = 255
    for part in path.parts[:-1]:  # a folder on the way: every stat of the path would fail
        if len(os.fsencode(part)) > limit:
            raise DestinationError(f"{what} {str(path)[:60]!r}...: the folder name "
                                   f"{part[:40]!r}... has {len(os.fsencode(part))} bytes, over "
                                   f"this file system's {limit}; choose a shorter name")
    need = len(os.fsencode(f".{path.name}{_TMP}")) + 8  # mkdtemp's 8 random characters
    if need > limit:
        raise DestinationError(f"{what} {str(path)[:60]!r}...: a name of "
                               f"{len(os.fsencode(path.name))} bytes is too long for the staging "
                               f"folder a save writes beside it ({need} bytes, over this file "
                               f"system's {limit}); choose a shorter name")


def check_in_place(path: str | Path, what: str = "--resume") -> Path:
    """Check, before any work, that a save can be written back where it was read (``--resume DIR``
    without another ``--out``): the directory and its parent writable, a name short enough, and
    no other process writing there (:func:`~minilora.filelock.claim`). Returns the path."""
    path = _writable_and_claimed(path, what)
    check_writable(path.parent, what, shown=repr(str(path)))
    return path


def _writable_and_claimed(path: str | Path, what: str) -> Path:
    """What every command's output gets checked for first: writable (:func:`check_writable`), a
    name its staging folder fits beside, and claimed for the command (before a half-done swap
    there is recovered: no other process may be writing it meanwhile)."""
    _check_name_length(Path(path), what)  # first: a name over NAME_MAX fails every stat too
    path = check_writable(path, what)
    claim(path, what)  # inside a command: no other process writes here until it ends
    return path


def check_destination(path: str | Path, *, overwrite: bool = False, names: tuple[str, ...] = (),
                      what: str = "the output", flag: str = "--overwrite",
                      inputs: dict[str, Any] | None = None) -> Path:
    """Check, before any work, that a save can later be written to ``path`` as a whole.

    Refused with a :class:`DestinationError`: what :func:`check_writable` refuses; ``path``
    being (or holding) one of the ``inputs`` (``{flag: path or None}``: what the command reads),
    whatever ``overwrite`` says, since the save would replace what it was made from; an existing
    save (one a kill left half swapped in included: it is recovered first) unless
    ``overwrite``; a non-empty directory that is not a save of this kind (``names``), whatever
    ``overwrite`` says, since the swap would delete what it holds. Returns the path.
    """
    raw = Path(path)
    _check_name_length(raw, what)  # before is_symlink, which a name over NAME_MAX fails
    if raw.is_symlink():  # the swap would replace the link, leaving its target as it was
        raise DestinationError(f"{what} {str(path)!r} is a symbolic link (to "
                               f"{os.readlink(raw)!r}); give the directory itself")
    if raw.name in ("", ".", ".."):  # the swap renames the save within its parent
        raise DestinationError(f"{what} {str(path)!r} names no directory of its own; give a "
                               f"path such as {str(raw / 'run')!r}")
    for source_flag, source in (inputs or {}).items():
        if source is None:
            continue
        here, there = Path(path).resolve(), Path(source).resolve()
        if here == there or here in there.parents:
            raise DestinationError(f"{what} {str(path)!r} is where {source_flag} {str(source)!r} "
                                   f"is read from: the save would replace it; choose another "
                                   f"path")
    path = _writable_and_claimed(path, what)
    # a swap a kill interrupted is finished (or undone) first: the save it holds is what
    # --overwrite protects, and the save about to be written would otherwise finish the swap
    # itself and then replace what it recovered
    recover(path)
    if path.is_dir() and path.parent.exists():
        # the swap renames path itself inside its parent
        check_writable(path.parent, what, shown=repr(str(path)))
    entries = _entries(path) if path.is_dir() else []
    foreign = _foreign(path, names) if entries else []
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:3])
        beside = " beside a save" if len(foreign) < len(entries) else ""
        raise DestinationError(f"{what} {str(path)!r} is a directory holding other files"
                               f"{beside} ({shown}{', ...' if len(foreign) > 3 else ''}); a save "
                               f"there would replace them: choose a new or empty directory")
    if entries and not overwrite:
        raise DestinationError(f"{what} {str(path)!r} already holds a save; pass {flag} to "
                               f"replace it, or choose another path")
    return path


# ---------------------------------------------------------------------------------- staging

class Staging:
    """The staging directory of one save; write its files with :meth:`write_bytes` (or into
    :attr:`path` by any other means, e.g. ``savefig``)."""

    def __init__(self, path: Path, dest: Path) -> None:
        self.path, self.dest = path, dest
        self.requested = 0  # bytes asked for so far, to say how much a full disk needed

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` to ``name`` in the staging directory, flushed to disk."""
        self.requested += len(data)
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        try:
            view = memoryview(data)
            while view:
                view = view[_write_chunk(fd, view[:_CHUNK]):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return target

    def write_json(self, name: str, obj: Any, allow_nan: bool = False) -> Path:
        """Write ``obj`` as indented JSON (sorted keys) to ``name``; NaN and inf, which JSON does
        not have, are refused unless ``allow_nan``."""
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan)
        return self.write_bytes(name, (text + "\n").encode("utf-8"))


def _files(root: Path) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            out.append(Path(d, n).relative_to(root).as_posix())
    return sorted(out)


def _write_manifest(stage: Staging) -> None:
    files = {}
    for name in _files(stage.path):
        p = stage.path / name
        with open(p, "rb") as f:  # files written by others (savefig) are flushed here
            os.fsync(f.fileno())
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    stage.write_json(MANIFEST, {"format": MANIFEST_FORMAT, "version": 1, "files": files})
    _fsync_dir(stage.path)


def _siblings(dest: Path, kind: str) -> list[Path]:
    prefix = f".{dest.name}{kind}"
    try:
        found = [dest.parent / e for e in os.listdir(dest.parent) if e.startswith(prefix)]
    except OSError:
        return []
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.stat().st_mtime)


def _complete(path: Path) -> bool:
    """True when ``path`` has a manifest whose files are all present with their sizes (the manifest
    is written last, so this means every write before it finished)."""
    files = _listed_files(path)
    try:
        return files is not None and \
            all((path / n).stat().st_size == f["bytes"] for n, f in files.items())
    except (OSError, KeyError, TypeError):
        return False


def recover(dest: str | Path) -> Path | None:
    """Finish or undo a swap that a kill interrupted; returns where the save now lies (``dest``,
    or, if it cannot be renamed back on a read-only medium, the sibling holding it), or None."""
    dest = Path(dest)
    if dest.exists():
        return dest
    candidates = [p for p in _siblings(dest, _TMP) if _complete(p)]  # finish the swap
    if not candidates:
        candidates = [p for p in _siblings(dest, _OLD) if _complete(p) or
                      not (p / MANIFEST).exists()]  # or undo it
    if not candidates:
        return None
    best = candidates[-1]
    try:
        os.rename(best, dest)
        _fsync_dir(dest.parent)
    except OSError:
        # another reader (or the writer itself) may have put a save there first
        return dest if dest.exists() else best
    return dest


def recovered(path: str | Path) -> Path:
    """Where the save at ``path`` lies for a reader: ``path`` after :func:`recover` has finished
    (or undone) a swap a kill left half done, the sibling holding it when it could not be renamed
    back, or ``path`` itself when there is nothing to recover (the caller says what is missing)."""
    return recover(path) or Path(path)


def _clean(dest: Path) -> None:
    for p in _siblings(dest, _TMP) + _siblings(dest, _OLD):
        shutil.rmtree(p, ignore_errors=True)


def _disk_full(dest: Path, stage: Staging, exc: OSError) -> DiskFullError:
    try:
        fs = os.statvfs(dest.parent)
        free = f"{fs.f_bavail * fs.f_frsize:,} bytes free"  # shutil.disk_usage's "free"
        if fs.f_files and fs.f_favail == 0:  # ENOSPC too: bytes there, no inode (f_files 0: btrfs)
            return DiskFullError(f"no free inodes (room for new files) left on the device to "
                                 f"write {str(dest)!r} ({free}); the previous save there, if "
                                 f"any, is untouched")
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        free = "free space unknown"
    return DiskFullError(f"no space left on the device to write {str(dest)!r}: the save needs at "
                         f"least {stage.requested:,} bytes ({free}); the previous save there, if "
                         f"any, is untouched")


@contextmanager
def atomic_directory(path: str | Path, names: tuple[str, ...] = ()) -> Iterator[Staging]:
    """Write a save to ``path`` whole or not at all; yields a :class:`Staging` to write into.

    On a clean exit the manifest is written and the staging directory swapped in (see the module
    docstring); on any error the staging directory is removed and ``path`` is left as it was.
    A directory already at ``path`` is replaced only if it is a save (:func:`is_save` with
    ``names``), never a folder of other files.
    """
    check_path(path, "save: the directory")
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise DestinationError(f"cannot save to {str(dest)!r}: it is a file")
    _check_name_length(dest, "cannot save to")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder above it should be
        above = next(p for p in dest.parents if p.exists())
        raise DestinationError(f"cannot save to {str(dest)!r}: {str(above)!r} is a file, not "
                               f"a directory") from None
    with writing(dest):  # one writer at a time (filelock)
        recover(dest)
        foreign = _foreign(dest, names) if dest.is_dir() and _entries(dest) else []
        if foreign:  # what the swap would delete with the old save
            raise DestinationError(f"cannot save to {str(dest)!r}: it holds files that are not "
                                   f"a minilora save ({', '.join(foreign[:3])}"
                                   f"{', ...' if len(foreign) > 3 else ''}); choose another "
                                   f"directory")
        _clean(dest)
        stage_path = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{_TMP}"))
        os.chmod(stage_path, 0o777 & ~_umask())  # mkdtemp makes 0700; a save gets the umask's
        stage = Staging(stage_path, dest)
        stage_ino = stage_path.stat().st_ino  # to know it again under DEST (_swap_in)
        old = None
        try:
            yield stage
            _write_manifest(stage)
            with swapping(dest, stage_path):  # the loads in progress end first (filelock)
                if dest.exists():
                    old = dest.parent / f".{dest.name}{_OLD}{stage_path.name.rsplit('-', 1)[-1]}"
                    os.rename(dest, old)
                _swap_in(stage_path, stage_ino, dest)
            _fsync_dir(dest.parent)
        except BaseException as exc:
            shutil.rmtree(stage_path, ignore_errors=True)
            if old is not None and not dest.exists():
                os.rename(old, dest)  # the new save could not go in: put the old one back
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise _disk_full(dest, stage, exc) from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _swap_in(stage_path: Path, ino: int, dest: Path) -> None:
    """Step 2 of the swap. A reader that found DEST missing between steps 1 and 2 may have
    finished the swap itself (:func:`recover`): then DEST is this very staging directory (inode
    ``ino``)."""
    try:
        os.rename(stage_path, dest)
    except FileNotFoundError:
        try:
            if dest.stat().st_ino == ino:
                return
        except OSError:
            pass
        raise


def write_files(directory: str | Path, files: dict[str, bytes],
                names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Write ``files`` ({file name: bytes}) into ``directory`` as one save, whole or not at all
    (:func:`atomic_directory`; ``names``, by default the files' own names, are those a save of
    this kind holds). Returns ``{file name: path}``."""
    with atomic_directory(directory, tuple(files) if names is None else names) as stage:
        for name, data in files.items():
            stage.write_bytes(name, data)
    return {name: os.path.join(directory, name) for name in files}


# ---------------------------------------------------------------------------------- loading

def warn_no_manifest(path: str | Path, who: str = "load", checked: str = "") -> None:
    """The one-line :class:`NoManifestWarning` for a save without a manifest."""
    how = f"checked {checked} instead" if checked else "its files are loaded unchecked"
    warnings.warn(f"{who}: {str(path)!r} has no {MANIFEST} (not written by this minilora, or "
                  f"by an older one); {how}", NoManifestWarning, stacklevel=3)


def verify_manifest(path: str | Path, who: str = "load", warn: bool = True) -> bool:
    """Check every file ``manifest.json`` lists against its size and SHA-256.

    Returns False for a directory without one (after a one-line :class:`NoManifestWarning`
    when ``warn``); raises :class:`CheckpointError` naming the file that is missing or does not
    match.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        if warn:
            warn_no_manifest(path, who)
        return False
    try:
        if mpath.stat().st_size > 16 << 20:
            raise ValueError("larger than 16 MiB")
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        files = {str(n): (int(f["bytes"]), str(f["sha256"])) for n, f in
                 manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{who}: {str(mpath)!r} is not a valid manifest ({exc})") from None
    for name, (size, digest) in files.items():
        p = path / name
        parts = Path(name).parts  # a save's files lie under it: "/etc/x" or "../x" do not
        if not parts or Path(name).is_absolute() or ".." in parts or name != Path(name).as_posix():
            raise CheckpointError(f"{who}: {str(mpath)!r} lists {name!r}, which is not a file "
                                  f"of the save: the manifest is forged or corrupt")
        if not p.is_file():
            raise CheckpointError(f"{who}: the save at {str(path)!r} is incomplete: {name} is "
                                  f"missing (listed in {MANIFEST})")
        if p.stat().st_size != size:
            raise CheckpointError(f"{who}: {str(p)!r} has {p.stat().st_size:,} bytes, "
                                  f"{MANIFEST} says {size:,}: the file is corrupt or from "
                                  f"another save")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{who}: {str(p)!r} is corrupt or from another save: its "
                                  f"SHA-256 differs from the one in {MANIFEST}")
    return True


def listed_digest(path: str | Path, name: str) -> str | None:
    """The SHA-256 that ``path``'s manifest lists for file ``name`` (None without one): once
    :func:`verify_manifest` has passed, this is the file's digest without hashing it again."""
    try:
        return str((_listed_files(Path(path)) or {})[name]["sha256"])
    except (KeyError, TypeError):
        return None


READ_TRIES = 5  # reads of a save that a running writer keeps replacing, before giving up


def _manifest_bytes(path: Path) -> bytes | None:
    try:
        with open(path / MANIFEST, "rb") as f:
            return f.read((16 << 20) + 1)  # verify_manifest refuses a larger one
    except OSError:
        return None


def read_whole(path: str | Path, read: Callable[[], T], who: str = "load") -> T:
    """``read()``, a loader of the save at ``path``, made to return what one save holds.

    A loader verifies the manifest and then opens the files by name; a writer may swap a new save
    in between (a run saving while ``sample`` reads it), and the loader would get the old save's
    config with the new save's weights. The manifest lists every file's SHA-256, so it names the
    save: when it differs after the read from what it was before, the read is thrown away and
    made again (a failure too, when the manifest changed: the files vanished with the swap), up
    to :data:`READ_TRIES` times. A directory without a manifest is read once, as it is.
    """
    check_path(path, f"{who}: the directory")
    where = Path(path)
    for _ in range(READ_TRIES):
        with reading(where, f".{where.name}{_TMP}"):  # a swap waits for this load (filelock);
            before = _manifest_bytes(where)  # the check below: where it cannot, or waits too long
            try:
                result = read()
            except (MiniLoraError, OSError):  # a torn read may surface as any of them
                if _manifest_bytes(where) != before:
                    continue  # a new save went in during the read: read that one
                raise
            if _manifest_bytes(where) == before:
                return result
    raise CheckpointError(f"{who}: the save at {str(path)!r} was replaced {READ_TRIES} times while "
                          f"it was read (a run is saving there); try again")


def open_save(path: str | Path, who: str = "load", warn: bool = True) -> Path:
    """The directory to load a save from: a half-done swap beside ``path`` is finished or undone
    (:func:`recover`), then the manifest is verified (``warn``: see :func:`verify_manifest`).
    Raises CheckpointError when nothing is there."""
    found = recover(path)
    if found is None:
        raise CheckpointError(f"{who}: no save at {str(path)!r}: the directory does not exist")
    if not found.is_dir():
        raise CheckpointError(f"{who}: {str(found)!r} is a file, not a save directory")
    verify_manifest(found, who, warn)
    return found


__all__ = ["MANIFEST", "Staging", "atomic_directory", "write_files", "check_destination",
           "check_writable", "is_save", "warn_no_manifest", "listed_digest", "recover", "recovered",
           "check_in_place", "verify_manifest", "open_save", "read_whole", "READ_TRIES",
           "sha256_file",
           "NoManifestWarning"]
