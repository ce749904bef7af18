"""A FLOP counter on the engine's matrix products, counted as they run.

A matrix product of (m, k) by (k, n) costs 2 m k n floating-point operations (a multiply and an
add per term). The engine's matmul sites (linear layers, the LoRA update, 4-bit layers, attention,
the KV cache) call :func:`add_matmul` with their shapes as they run, forward and backward alike;
nothing is counted unless a :func:`count` block is open, so counting costs one list look-up per
product otherwise. A block counts the products of every thread (a training step's shards run on
threads), so open one block at a time when several threads are counting.

    with ml.flops.count() as c:
        model(idx)
    c.total            # FLOPs of every matrix product run in the block
    c.by_site          # {"linear": ..., "attention": ..., ...}

Elementwise work (GELU, LayerNorm, softmax) is not counted: matrix products are what an adapter
adds or removes, and what "the same FLOPs as the base model" means.
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter
from contextlib import contextmanager
from typing import Iterator

_counters: list = []  # the open count() blocks, outermost first
_lock = threading.Lock()


class Counter:
    """FLOPs counted in one :func:`count` block: ``total`` and ``by_site`` {site: FLOPs}."""

    def __init__(self) -> None:
        self.by_site: _Counter = _Counter()

    @property
    def total(self) -> int:
        """All FLOPs counted so far."""
        return int(sum(self.by_site.values()))

    def __repr__(self) -> str:
        return f"Counter(total={self.total}, by_site={dict(self.by_site)})"


@contextmanager
def count() -> Iterator[Counter]:
    """Context manager: count the matrix products run inside the block, in any thread (blocks
    nest: an inner block's FLOPs count in the outer one too)."""
    counter = Counter()
    with _lock:
        _counters.append(counter)
    try:
        yield counter
    finally:
        with _lock:
            _counters.remove(counter)


def add_matmul(site: str, m: int, k: int, n: int, batch: int = 1) -> None:
    """Count ``batch`` products of (m, k) by (k, n): 2 batch m k n FLOPs, under ``site``."""
    if _counters:  # the common case, nothing open, costs this test alone
        flops = 2 * int(batch) * int(m) * int(k) * int(n)
        with _lock:
            for c in _counters:
                c.by_site[site] += flops


def counting() -> bool:
    """True while a :func:`count` block is open."""
    return bool(_counters)


__all__ = ["Counter", "count", "add_matmul", "counting"]
