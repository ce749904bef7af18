"""The device memory pool, as far as minilora reads CuPy's: ``used_bytes()`` is the bytes of the
live device arrays (the ones that own their memory), ``total_bytes()`` also keeps what a pool holds
on to after arrays die (the high-water mark since the last ``free_all_blocks()``)."""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any


class MemoryPool:
    """``cupy.cuda.MemoryPool``: bytes of live device arrays, and the pool's high-water mark."""

    def __init__(self) -> None:
        self._used = 0
        self._held = 0
        self._limit = 0
        self._freed: deque[int] = deque()  # filled by finalizers, which may run mid-update (GC)

    def add(self, owner: Any, nbytes: int) -> None:
        """``nbytes`` of device memory held by ``owner`` until it dies."""
        self._settle()
        self._used += nbytes
        self._held = max(self._held, self._used)
        weakref.finalize(owner, self._freed.append, nbytes)

    def _settle(self) -> None:
        while self._freed:
            self._used -= self._freed.popleft()

    def used_bytes(self) -> int:
        """Bytes of the device arrays alive now."""
        self._settle()
        return self._used

    def total_bytes(self) -> int:
        """Bytes the pool holds: the live ones and the freed ones it keeps for reuse."""
        self._settle()
        return max(self._held, self._used)

    def free_bytes(self) -> int:
        """Bytes the pool holds that no array uses."""
        return self.total_bytes() - self.used_bytes()

    def free_all_blocks(self, stream: Any = None) -> None:
        """Give the freed bytes back: ``total_bytes()`` drops to ``used_bytes()``."""
        self._settle()
        self._held = self._used

    def n_free_blocks(self) -> int:
        """Free blocks held (none are kept as blocks here)."""
        return 0

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        """Record a limit (not enforced: the stand-in cannot run out of device memory)."""
        self._limit = int(size or 0)

    def get_limit(self) -> int:
        """The recorded limit, 0 for none."""
        return self._limit


class PinnedMemoryPool:
    """``cupy.cuda.PinnedMemoryPool``: host pinned memory, nothing to track here."""

    def free_all_blocks(self) -> None:
        """Nothing is held."""

    def n_free_blocks(self) -> int:
        """Nothing is held."""
        return 0


default_pool = MemoryPool()
default_pinned_pool = PinnedMemoryPool()


def get_default_memory_pool() -> MemoryPool:
    """The device memory pool (live bytes of the stand-in's arrays)."""
    return default_pool


def get_default_pinned_memory_pool() -> PinnedMemoryPool:
    """The pinned host memory pool (a stub)."""
    return default_pinned_pool


__all__ = ["MemoryPool", "PinnedMemoryPool", "default_pool", "default_pinned_pool",
           "get_default_memory_pool", "get_default_pinned_memory_pool"]
