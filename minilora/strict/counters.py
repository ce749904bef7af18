"""What a GPU pays for, counted: kernel launches, device-to-host syncs, host-to-device uploads,
in total and per call site (the "path:line" of the first frame outside this package and
``backend.py``, so a count points at the minilora line that asked for the work)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

KINDS = ("launches", "syncs", "uploads")


@dataclass
class Counts:
    """Launches (kernel calls), syncs (device-to-host) and uploads (host-to-device) counted, and,
    in ``by_site``, the same three per call site ("path:line")."""

    launches: int = 0
    syncs: int = 0
    uploads: int = 0
    by_site: dict = field(default_factory=dict)

    def copy(self) -> Counts:
        """A snapshot that later events do not change."""
        return Counts(self.launches, self.syncs, self.uploads,
                      {k: Counts(v.launches, v.syncs, v.uploads) for k, v in self.by_site.items()})


_total = Counts()
_active: list[Counts] = []  # the live objects of open counting() blocks
_lock = threading.RLock()  # reentrant: a weakref callback may count inside a locked block (GC)
_HERE = os.path.dirname(os.path.abspath(__file__))
_BACKEND = os.path.join(os.path.dirname(_HERE), "backend.py")
_CONTEXTLIB = os.path.abspath(contextlib.__file__)  # one_launch counts on its way out of a with
_ROOT = os.path.dirname(os.path.dirname(_HERE))  # the repository, for short site names
_short: dict[str, str] = {}  # co_filename -> its short form, or "" for a frame to skip
_fused = threading.local()  # inside a fuse()/ElementwiseKernel body the launches count as one


def _site_name(filename: str) -> str:
    short = _short.get(filename)
    if short is None:
        full = os.path.abspath(filename)
        if full in (_BACKEND, _CONTEXTLIB) or os.path.dirname(full) == _HERE:
            short = ""
        elif full.startswith(_ROOT + os.sep):
            short = os.path.relpath(full, _ROOT)
        else:
            short = filename
        _short[filename] = short
    return short


def site() -> str:
    """"path:line" of the first frame outside this package and backend.py (the path relative to
    the repository when it is inside it)."""
    f = sys._getframe(1)
    while f is not None:
        short = _site_name(f.f_code.co_filename)
        if short:
            return f"{short}:{f.f_lineno}"
        f = f.f_back
    return "?"


def count(kind: str) -> None:
    """One more of ``kind`` ("launches", "syncs" or "uploads"), at the caller's site."""
    if kind == "launches" and getattr(_fused, "depth", 0):
        return
    where = site()
    with _lock:
        for c in (_total, *_active):
            setattr(c, kind, getattr(c, kind) + 1)
            s = c.by_site.get(where)
            if s is None:
                s = c.by_site[where] = Counts()
            setattr(s, kind, getattr(s, kind) + 1)


def counts() -> Counts:
    """A snapshot of everything counted since the process started (or :func:`reset_counts`)."""
    with _lock:
        return _total.copy()


def reset_counts() -> None:
    """Set the process totals back to zero (open :func:`counting` blocks keep theirs)."""
    global _total
    with _lock:
        _total = Counts()


@contextmanager
def counting() -> Iterator[Counts]:
    """``with counting() as c:``: ``c`` holds the launches, syncs and uploads made inside the
    block (live while inside, final once it exits), with ``c.by_site`` per call site."""
    c = Counts()
    with _lock:
        _active.append(c)
    try:
        yield c
    finally:
        with _lock:
            _active.remove(c)


@contextmanager
def one_launch() -> Iterator[None]:
    """The launches made inside the block count as one (a fused kernel), counted at its end."""
    depth = getattr(_fused, "depth", 0)
    _fused.depth = depth + 1
    try:
        yield
    finally:
        _fused.depth = depth
    if depth == 0:
        count("launches")


__all__ = ["KINDS", "Counts", "site", "count", "counts", "reset_counts", "counting", "one_launch"]
