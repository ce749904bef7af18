"""The CPU runtime under NumPy: BLAS threads, how freed memory is kept, and worker threads.

The first two are process-wide settings of C libraries that NumPy uses, changed through ctypes
while the program runs. Where a library is not there (another BLAS than OpenBLAS, a C library
other than glibc) the functions say so (``False`` / ``None``) and change nothing.

**BLAS threads.** NumPy's Linux and Windows wheels bundle OpenBLAS, which reads
``OPENBLAS_NUM_THREADS`` once, when NumPy is imported; its C API can change the count later. The
matrices here are small (hundreds of rows by 64-1024 columns): on them a second BLAS thread gains
little, and on a busy machine a BLAS thread that loses its core makes the others spin
(``benchmarks/RESULTS.md`` has the figures). So the CLI runs OpenBLAS on one thread, and
:mod:`minilora.step` keeps both cores busy with two Python threads, each running half of a batch.

**Freed memory.** A training step allocates and frees the same large arrays every step. glibc
hands each block above 128 KiB-32 MiB (its ``mmap`` threshold) back to the kernel when it is freed,
and the next step gets fresh pages, each one zeroed by the kernel on first touch: a page fault per
4 KiB, which can make a step's elementwise passes (a LayerNorm forward, say) markedly slower.
``keep_freed_memory`` raises glibc's thresholds so that freed blocks stay in the process and are
reused; the resident size then stays near the peak of a step instead of falling between steps.

**Worker threads.** NumPy releases the GIL inside BLAS calls and inside ufunc loops over large
arrays, so Python threads that each work on their own arrays keep several cores busy.
``run_in_threads`` runs a few such tasks on a shared pool, one thread per core;
:mod:`minilora.step` runs batch shards on it and the threaded AdamW its parameter updates.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# NumPy's OpenBLAS functions by role, under the names its builds have given them
_FUNCTIONS = {
    "set_threads": ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                    "openblas_set_num_threads"),
    "get_threads": ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                    "openblas_get_num_threads"),
    "corename": ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                 "openblas_get_corename"),
}

# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def _openblas_paths() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (or shipped beside NumPy)."""
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
        if paths:
            return paths
    import numpy

    libs = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    return sorted(glob.glob(os.path.join(libs, "*openblas*")))


@functools.cache
def _blas_functions() -> dict[str, Any] | None:
    """OpenBLAS's functions by role (``_FUNCTIONS``; a role it lacks is None), looked up once in
    the first library that can set and get its thread count; None if there is none."""
    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        found = {role: next((getattr(lib, n) for n in names if hasattr(lib, n)), None)
                 for role, names in _FUNCTIONS.items()}
        if found["set_threads"] is not None and found["get_threads"] is not None:
            if found["corename"] is not None:
                found["corename"].restype = ctypes.c_char_p
            return found
    return None


def blas_core() -> str | None:
    """The kernel table NumPy's OpenBLAS runs ("Haswell", "SkylakeX", ...), or None where there
    is no OpenBLAS to ask.

    OpenBLAS picks the table for the CPU when it loads, unless ``OPENBLAS_CORETYPE`` names one.
    Benchmarks print it beside that variable: on a CPU that runs 512-bit instructions at full
    width the SkylakeX kernels multiply at about twice the Haswell ones' rate
    (benchmarks/RESULTS.md), and each table adds up its products in its own order.
    """
    functions = _blas_functions()
    if functions is None or functions["corename"] is None:
        return None
    return functions["corename"]().decode("ascii", "replace")


def set_blas_threads(n: int) -> bool:
    """Make NumPy's OpenBLAS use ``n`` threads from now on; True if it could be found and told.

    Setting ``OPENBLAS_NUM_THREADS`` before Python starts does the same; this works after NumPy is
    imported.
    """
    functions = _blas_functions()
    if functions is None:
        return False
    functions["set_threads"](int(n))
    return True


def get_blas_threads() -> int | None:
    """The number of threads NumPy's OpenBLAS uses now, or None where it cannot be asked."""
    functions = _blas_functions()
    return None if functions is None else int(functions["get_threads"]())


@contextmanager
def blas_threads_as(n: int) -> Iterator[bool]:
    """Context manager: OpenBLAS uses ``n`` threads inside the block, its previous count after.

    Yields whether the count could be set.
    """
    before = get_blas_threads()
    ok = before is not None and set_blas_threads(n)
    try:
        yield ok
    finally:
        if ok and before != n:
            set_blas_threads(before)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process for reuse (see the module docstring).

    Raises the mmap threshold and the trim threshold to 1 GiB and pads heap growth by 64 MiB.
    Idempotent; True if glibc's ``mallopt`` accepted every setting, False where there is none.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into Python
    except (OSError, AttributeError, TypeError):  # no glibc (macOS, musl, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in _KEEP.items())


def available_cpus() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory this machine can give a process now without swapping (Linux's
    ``MemAvailable``, else free physical pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


_pool: ThreadPoolExecutor | None = None
_worker = threading.local()  # marks the pool's threads: a task asking for threads runs inline


def run_in_threads(tasks: list[Callable[[], Any]]) -> list:
    """Run ``tasks`` (callables without arguments) side by side on a shared pool with one thread
    per core; return their results in order, re-raising the first failure after all are done.

    One task, or a call from inside a task, runs in the calling thread: nested calls never wait
    on a pool whose threads are all busy with their callers.
    """
    global _pool
    if len(tasks) <= 1 or getattr(_worker, "active", False):
        return [task() for task in tasks]
    if _pool is None:
        _pool = ThreadPoolExecutor(max(2, available_cpus()), thread_name_prefix="minilora")

    def marked(task: Callable[[], Any]) -> Any:
        _worker.active = True
        try:
            return task()
        finally:
            _worker.active = False
    futures = [_pool.submit(marked, task) for task in tasks]
    errors = [f.exception() for f in futures]  # waits for every task
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed
    return [f.result() for f in futures]


def balanced_groups(sizes: list[int], n: int) -> list[list[int]]:
    """Split the indices of ``sizes`` into at most ``n`` non-empty groups of similar total size
    (largest first, each to the lightest group so far); each group keeps ascending order."""
    groups: list[list[int]] = [[] for _ in range(max(1, n))]
    totals = [0] * len(groups)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = totals.index(min(totals))
        groups[k].append(i)
        totals[k] += sizes[i]
    return [sorted(g) for g in groups if g]


def for_each_in_threads(fn: Callable[[int], Any], sizes: list[int], threads: int) -> None:
    """Call ``fn(i)`` for every index i of ``sizes``: the indices in ``threads`` groups of similar
    total size (``balanced_groups``), each group on its own thread (``run_in_threads``)."""
    run_in_threads([lambda group=group: [fn(i) for i in group]
                    for group in balanced_groups(sizes, threads)])


__all__ = ["blas_core", "set_blas_threads", "get_blas_threads", "blas_threads_as",
           "keep_freed_memory", "available_cpus", "available_memory", "run_in_threads",
           "balanced_groups", "for_each_in_threads"]
