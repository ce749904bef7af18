"""Array backend: NumPy on the CPU, or a device: CuPy on a GPU, or the strict stand-in for it.

Everything in minilora computes with ``backend.xp``: ``numpy``, ``cupy``, or ``minilora.strict``
(CuPy's API on NumPy, with CuPy's rules enforced and launches, syncs and uploads counted; it runs
the device code paths on a CPU). Pick it with ``minilora.use_backend("cupy")`` or the environment
variable ``MINILORA_BACKEND``. Code asks :func:`on_device` for the device's ways, never the name,
so ``strict`` runs exactly what ``cupy`` runs. The few calls that differ between host and device
(scatter-add, random numbers, memory statistics, moving data to the host) live here and nowhere
else; the device module and its cupyx-like extras are resolved in one place (:func:`use_backend`).

Random numbers come in two kinds: parameter initialisation draws from a NumPy generator on the host
(so a seed gives the same weights on every backend); dropout masks draw from the device generator.
On NumPy that is the host generator itself. On a device it is a counter-based generator computed
with array operations (:class:`CounterGenerator`): its whole state is two integers, so checkpoints
save it (:func:`generator_state`), and CuPy and the strict stand-in draw the same bits.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .errors import BackendError, DTypeError, InvalidArgumentError, check_int

xp: Any = np  # the active array module; read it as `backend.xp`, it changes with use_backend
_name = "numpy"
_extras: Any = None  # cupyx, or the strict stand-in's emulation of it; None on NumPy
_default_dtype: Any = np.float32
_seed = 0  # the last manual_seed; the device generator is derived from it, not from _host_rng
_host_rng = np.random.default_rng(_seed)
_device_rng: Any = _host_rng
_counter_rng: Any = None  # the device generator, made once per seed (switching draws nothing)
_local = threading.local()  # per-thread generator for dropout masks (generator_as)
_NAMES = ("numpy", "cupy", "strict")

_CUPY_HELP = (
    "install the CuPy package that matches your CUDA driver (`pip install 'minilora[gpu]'` gives "
    "cupy-cuda12x; use cupy-cuda13x for CUDA 13) on a machine with an NVIDIA GPU, or use the "
    "default backend: use_backend('numpy')"
)


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # not installed, or its CUDA libraries are missing
        raise BackendError(f"backend 'cupy' needs CuPy, which could not be imported ({exc}); "
                           f"{_CUPY_HELP}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy is there but the driver or device is not
        raise BackendError(f"backend 'cupy': CuPy is installed but no GPU is usable ({exc}); "
                           f"{_CUPY_HELP}") from exc
    if count < 1:
        raise BackendError(f"backend 'cupy': no GPU found; {_CUPY_HELP}")
    return cupy


def _import_strict() -> tuple[Any, Any]:
    from . import strict

    return strict, strict.cupyx


def _device_modules(name: str) -> tuple[Any, Any]:
    """The array module of device backend ``name`` and its cupyx (scatter-add and friends)."""
    if name == "cupy":
        cupy = _import_cupy()
        import cupyx

        return cupy, cupyx
    return _import_strict()


def use_backend(name: str) -> None:
    """Make ``name`` ("numpy", "cupy" or "strict") the array module for every tensor created from
    now on. "strict" is CuPy's API on NumPy with CuPy's rules (see :mod:`minilora.strict`).

    Existing tensors keep their arrays; move parameters with ``module.to_backend()`` after a switch.
    Raises BackendError with install instructions when CuPy or a GPU is missing.
    """
    global xp, _name, _extras, _device_rng
    if name not in _NAMES:
        raise BackendError(f"use_backend: unknown backend {name!r}; choose 'numpy' or 'cupy' "
                           f"(or 'strict', the CuPy stand-in that checks the device code on a CPU)")
    if name == "numpy":
        xp, _name, _extras = np, "numpy", None
        _device_rng = _host_rng
        return
    module, extras = _device_modules(name)
    xp, _name, _extras = module, name, extras
    _device_rng = _counter_generator()


def get_backend() -> str:
    """Return the name of the active backend: "numpy", "cupy" or "strict"."""
    return _name


def device_extras() -> Any:
    """The active device's ``cupyx`` (CuPy's, or the strict stand-in's emulation of it), for
    benchmarks that time its calls; None on NumPy. minilora's gradients do not use its atomic
    scatter-add (see :func:`scatter_add`)."""
    return _extras


def on_device() -> bool:
    """True when arrays live on a device (CuPy, or the strict stand-in for it), not on the host:
    the one test code makes for the device's ways (no worker threads, whole-array kernels)."""
    return _name != "numpy"


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` inside the block, then restore the previous one."""
    previous = _name
    use_backend(name)
    try:
        yield
    finally:
        use_backend(previous)


# ----------------------------------------------------------------------------------------- dtypes

def default_dtype() -> Any:
    """The float dtype new parameters and float tensors get (float32 unless changed)."""
    return _default_dtype


def float_dtype(dtype: Any, who: str) -> np.dtype:
    """``dtype`` as a NumPy float dtype (float16, float32, float64), or :class:`DTypeError` naming
    ``who`` and what was given: NumPy's "data type not understood" names no argument, and an int
    dtype would make weights that no gradient can move."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.kind != "f":
        raise DTypeError(f"{who}: dtype must be a float dtype (float16, float32, float64), got "
                         f"{dtype!r}")
    return dt


def set_default_dtype(dtype: Any) -> None:
    """Set the default float dtype: float32 (fast, the default) or float64 (gradient checks)."""
    global _default_dtype
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):  # a name NumPy does not know ("float77")
        dt = None
    if dt not in (np.float32, np.float64):
        raise InvalidArgumentError(f"set_default_dtype: dtype must be float32 or float64, got "
                                   f"{dtype if dt is None else dt!r}")
    _default_dtype = dt.type


@contextmanager
def default_dtype_as(dtype: Any) -> Iterator[None]:
    """Context manager: make ``dtype`` the default float dtype inside the block."""
    previous = _default_dtype
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(previous)


# -------------------------------------------------------------------------------------- transfers

def asarray(data: Any, dtype: Any = None) -> Any:
    """Return ``data`` as an array of the active backend (copying across devices if needed: on a
    device, host data is one host-to-device copy)."""
    if _name != "numpy":
        return xp.asarray(data, dtype=dtype)
    if not isinstance(data, np.ndarray) and hasattr(data, "get") and _is_device_array(data):
        data = data.get()
    return np.asarray(data, dtype=dtype)


def to_numpy(array: Any) -> np.ndarray:
    """Return a NumPy array holding ``array``'s values (a device-to-host copy, a sync, for a
    device array)."""
    if isinstance(array, np.ndarray):
        return array
    if _is_device_array(array):
        return array.get()
    return np.asarray(array)


def _is_device_array(obj: Any) -> bool:
    module = type(obj).__module__
    return module.startswith("cupy") or module == "minilora.strict"


def is_array(obj: Any) -> bool:
    """True for a NumPy ndarray or a device array (CuPy's, or the strict stand-in's)."""
    return isinstance(obj, np.ndarray) or (_is_device_array(obj) and hasattr(obj, "shape"))


# --------------------------------------------------------------------------- calls that differ

def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """In place: ``target[indices] += values``, adding repeated indices up (unlike ``+=``).

    On a device the repeats are summed by :func:`_segment_sums` (sorted, no atomic adds), so the
    result is the same bits on every run, not an order atomics happen to land in.
    """
    if _name == "numpy":
        np.add.at(target, indices, values)
        return
    # the flat position in target of every update, in the index's own shape
    pos = xp.arange(target.size).reshape(target.shape)[indices]
    vals = xp.broadcast_to(values, pos.shape).reshape(-1, 1)
    keys, sums = _segment_sums(pos.reshape(-1), vals)
    contiguous = target.flags.c_contiguous
    flat = target.reshape(-1) if contiguous else target.ravel()  # a view, or a copy written back
    flat[keys] = flat[keys] + sums[:, 0]
    if not contiguous:
        target[...] = flat.reshape(target.shape)


def _segment_sums(keys: Any, values: Any) -> tuple[Any, Any]:
    """For each row i: ``sum_{j: keys[j] = keys[i]} values[j]``, keys (N,) and values (N, C), as
    (sorted keys, their sums): rows of one key all carry the same sum, so writing them to
    ``out[keys]`` gives the same result whichever of the repeats lands last.

    Sorted once (by key, then position, so the order is fixed), summed as differences of a float64
    running sum at the ends of each key's run: no atomic adds, no sync, the same bits every time.
    """
    n = keys.shape[0]
    order = xp.argsort(keys.astype(xp.int64, copy=False) * max(n, 1) + xp.arange(n))  # unique keys
    sorted_keys = keys[order]
    running = xp.cumsum(values[order].astype(xp.float64), axis=0)  # (N, C)
    running = xp.concatenate([xp.zeros((1, values.shape[1]), dtype=xp.float64), running])
    first = xp.searchsorted(sorted_keys, sorted_keys, side="left")
    last = xp.searchsorted(sorted_keys, sorted_keys, side="right")
    return sorted_keys, (running[last] - running[first]).astype(values.dtype)


def index_add_rows(indices: Any, values: Any, num_rows: int) -> Any:
    """Sum rows of ``values`` (N, C) into ``num_rows`` bins by ``indices`` (N,) -> (num_rows, C).

    ``out[k] = sum_{i: indices[i] = k} values[i]``; indices (...) and values (..., C) also work;
    indices must lie in [0, num_rows). This is the backward of an embedding lookup.

    On a device the rows are sorted by index once and summed per index by :func:`_segment_sums`
    (deterministic, unlike atomic adds). On the CPU ``np.add.at`` is slow per element, so the rows
    are sorted by index: when most of them repeat an index (a small table, many tokens) a one-hot
    matmul sums them on BLAS; otherwise the first row of each index is copied into place and only
    the repeats go through ``np.add.at``.
    """
    # the row width is whatever follows the index axes, so empty index arrays work too
    width = int(np.prod(values.shape[indices.ndim:]))
    indices = indices.reshape(-1)
    values = values.reshape(indices.shape[0], width)  # (N, C)
    n = indices.shape[0]
    if n == 0:
        return xp.zeros((num_rows, width), dtype=values.dtype)
    if _name != "numpy":
        out = xp.zeros((num_rows, width), dtype=values.dtype)
        keys, sums = _segment_sums(indices, values)
        out[keys] = sums
        return out
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    first = np.r_[True, sorted_idx[1:] != sorted_idx[:-1]]  # first row of each distinct index
    repeats = n - int(np.count_nonzero(first))
    # measured crossover: the matmul costs ~num_rows * n * C, np.add.at ~500x more per repeat
    if num_rows * n <= 500 * repeats and num_rows * n <= 1 << 24:
        return _index_add_onehot(indices, values, num_rows)
    return _index_add_sorted(sorted_idx, order, first, values, num_rows)


def _index_add_onehot(indices: Any, values: Any, num_rows: int) -> Any:
    """``onehot(indices)^T @ values``: (num_rows, N) @ (N, C), one GEMM."""
    onehot = np.zeros((num_rows, indices.shape[0]), dtype=values.dtype)
    onehot[indices, np.arange(indices.shape[0])] = 1
    return onehot @ values


def _index_add_sorted(sorted_idx: Any, order: Any, first: Any, values: Any,
                      num_rows: int) -> Any:
    """Copy each index's first row into place, then ``np.add.at`` the repeats (in row order, so
    the sums round exactly as ``np.add.at`` over all rows would)."""
    out = np.zeros((num_rows, values.shape[1]), dtype=values.dtype)
    out[sorted_idx[first]] = values[order[first]]
    rest = ~first
    if rest.any():
        np.add.at(out, sorted_idx[rest], values[order[rest]])
    return out


class CounterGenerator:
    """Uniform [0, 1) numbers on the device from a counter: sample k of the stream is
    ``u_k = top bits of splitmix64(key + (counter + k) * phi)``, so the generator's whole state is
    (seed, counter), drawing n numbers adds n to the counter, and the same state gives the same
    bits on CuPy and on the strict stand-in (a few elementwise kernels a draw, no cuRAND states).
    """

    _PHI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the splitmix64 increment
    _M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

    def __init__(self, seed: int, counter: int = 0) -> None:
        self.seed, self.counter = int(seed), int(counter)
        key = np.random.SeedSequence(self.seed).generate_state(1, np.uint64)[0]
        self._key = np.uint64(key)

    def random(self, shape: tuple, dtype: Any = np.float64) -> Any:
        """``shape`` samples of U[0, 1) in ``dtype`` (float32: 24 random bits; float64: 53)."""
        n = int(np.prod(shape))
        z = (xp.arange(n, dtype=xp.uint64) + np.uint64(self.counter % 2**64)) * self._PHI \
            + self._key
        self.counter += n
        z = (z ^ (z >> np.uint64(30))) * self._M1
        # splitmix64's last step, z ^ (z >> 31), leaves the top bits taken below as they are
        z = (z ^ (z >> np.uint64(27))) * self._M2
        dt = np.dtype(dtype)
        bits = 24 if dt == np.float32 else 53
        u = (z >> np.uint64(64 - bits)).astype(dt) * dt.type(2.0 ** -bits)
        return u.reshape(shape)

    @property
    def state(self) -> dict:
        """``{"bit_generator": "minilora.counter", "seed", "counter"}``: JSON-able."""
        return {"bit_generator": "minilora.counter", "seed": self.seed, "counter": self.counter}

    @state.setter
    def state(self, value: dict) -> None:
        self.__init__(value["seed"], value["counter"])


def _counter_generator() -> CounterGenerator:
    global _counter_rng
    if _counter_rng is None:
        _counter_rng = CounterGenerator(_seed)
    return _counter_rng


def manual_seed(seed: int) -> None:
    """Seed every random generator minilora uses (host initialisation and device dropout)."""
    global _host_rng, _device_rng, _counter_rng, _seed
    _seed = check_int(seed, "manual_seed: seed", minimum=0)
    _host_rng = np.random.default_rng(_seed)
    _counter_rng = None
    _device_rng = _counter_generator() if _name != "numpy" else _host_rng


def host_rng() -> np.random.Generator:
    """The NumPy generator used for parameter initialisation (seeded by ``manual_seed``)."""
    return _host_rng


def generator_state() -> dict:
    """The device generator's state, JSON-able, for checkpoints: on NumPy the host generator's
    (``bit_generator.state``, PCG64), on a device the counter generator's ``{"bit_generator":
    "minilora.counter", "seed", "counter"}``."""
    if _name == "numpy":
        return _host_rng.bit_generator.state
    return _counter_generator().state


def set_generator_state(state: dict) -> bool:
    """Restore :func:`generator_state`'s dict; True when it was applied. A state of the other
    kind (a NumPy checkpoint resumed on a device, or back) is left unapplied (False): dropout
    masks of different backends are different streams, and the host generator is restored from
    its own field of the checkpoint."""
    if not isinstance(state, dict) or "bit_generator" not in state:
        raise InvalidArgumentError(f"set_generator_state: expected a dict with a 'bit_generator' "
                                   f"field, got {state!r:.80}")
    counter = state["bit_generator"] == "minilora.counter"
    if counter != (_name != "numpy"):
        return False
    if counter:
        seed = check_int(state.get("seed"), "set_generator_state: seed", minimum=0)
        count = check_int(state.get("counter"), "set_generator_state: counter", minimum=0)
        _counter_generator().state = {"seed": seed, "counter": count}
    else:
        _host_rng.bit_generator.state = state
    return True


def random_uniform(shape: tuple, dtype: Any) -> Any:
    """Uniform [0, 1) samples of ``shape`` on the active device (used for dropout masks), from
    this thread's generator when ``generator_as`` set one, else from the global one."""
    rng = getattr(_local, "rng", None)
    return (_device_rng if rng is None else rng).random(shape, dtype=dtype)


def spawn_generators(n: int) -> list:
    """``n`` new device generators for dropout masks, seeded by draws from the global host
    generator: a seed fixes them, and a checkpoint (which saves the host generator) too."""
    seeds = _host_rng.integers(0, 2**63, size=n)
    if _name == "numpy":
        return [np.random.default_rng(int(s)) for s in seeds]
    return [CounterGenerator(int(s)) for s in seeds]


@contextmanager
def generator_as(rng: Any) -> Iterator[None]:
    """Context manager: dropout masks drawn in this thread come from ``rng`` inside the block."""
    previous = getattr(_local, "rng", None)
    _local.rng = rng
    try:
        yield
    finally:
        _local.rng = previous


def synchronize() -> None:
    """Wait for queued device work to finish (a no-op on NumPy); call before reading a timer."""
    if _name != "numpy":
        xp.cuda.Device().synchronize()


def memory_stats() -> dict:
    """Device memory in use: ``{"backend", "used_bytes", "total_bytes"}`` (the device's memory
    pool: CuPy's, or the strict stand-in's count of live device arrays).

    On NumPy the host allocations are not tracked here; use ``tracemalloc`` for those.
    """
    if _name != "numpy":
        pool = xp.get_default_memory_pool()
        return {"backend": _name, "used_bytes": int(pool.used_bytes()),
                "total_bytes": int(pool.total_bytes())}
    return {"backend": "numpy", "used_bytes": None, "total_bytes": None}


def _started_as_cli() -> bool:
    """True when this process is the ``minilora`` command (the console script, or ``python -m
    minilora``), which reads MINILORA_BACKEND itself (``--backend`` defaults to it)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script in ("minilora", "minilora.exe", "minilora-script.py"):
        return True
    return any(a == "-m" and nxt == "minilora" for a, nxt in zip(argv, argv[1:])) or \
        "-mminilora" in argv


_env = os.environ.get("MINILORA_BACKEND", "").strip().lower()
if _env:
    try:
        use_backend(_env)
    except BackendError:
        # the command line applies the variable again as its --backend default and reports a
        # backend it cannot use on one line (its promise: no traceback), so it starts on NumPy;
        # a program that imports minilora learns it here, before any work
        if not _started_as_cli():
            raise
