"""Array backend: NumPy on the CPU or CuPy on a GPU, one module at a time.

Everything in minilora computes with ``backend.xp``, which is either ``numpy`` or ``cupy``. Pick
it with ``minilora.use_backend("cupy")`` or the environment variable ``MINILORA_BACKEND``. The two
libraries share almost all of their API; the few calls that differ (scatter-add, random numbers,
memory statistics, moving data to the host) live here and nowhere else.

Random numbers come in two kinds: parameter initialisation draws from a NumPy generator on the host
(so a seed gives the same weights on both backends), dropout masks draw on the device.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .errors import BackendError, InvalidArgumentError, check_int

xp: Any = np  # the active array module; read it as `backend.xp`, it changes with use_backend
_name = "numpy"
_default_dtype: Any = np.float32
_seed = 0  # the last manual_seed; the GPU generator is derived from it, not from _host_rng
_host_rng = np.random.default_rng(_seed)
_device_rng: Any = _host_rng
_cupy_rng: Any = None  # made once per seed, so switching backends back and forth draws nothing
_local = threading.local()  # per-thread generator for dropout masks (generator_as)

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


def use_backend(name: str) -> None:
    """Make ``name`` ("numpy" or "cupy") the array module for every tensor created from now on.

    Existing tensors keep their arrays; move parameters with ``module.to_backend()`` after a switch.
    Raises BackendError with install instructions when CuPy or a GPU is missing.
    """
    global xp, _name, _device_rng, _cupy_rng
    if name == "numpy":
        xp, _name = np, "numpy"
        _device_rng = _host_rng
    elif name == "cupy":
        cupy = _import_cupy()
        xp, _name = cupy, "cupy"
        if _cupy_rng is None:
            _cupy_rng = cupy.random.default_rng(_seed)
        _device_rng = _cupy_rng
    else:
        raise BackendError(f"use_backend: unknown backend {name!r}; choose 'numpy' or 'cupy'")


def get_backend() -> str:
    """Return the name of the active backend, "numpy" or "cupy"."""
    return _name


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


def set_default_dtype(dtype: Any) -> None:
    """Set the default float dtype: float32 (fast, the default) or float64 (gradient checks)."""
    global _default_dtype
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise InvalidArgumentError(f"set_default_dtype: dtype must be float32 or float64, got {dt}")
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
    """Return ``data`` as an array of the active backend (copying across devices if needed)."""
    if _name == "cupy":
        return xp.asarray(data, dtype=dtype)
    if hasattr(data, "get") and type(data).__module__.startswith("cupy"):
        data = data.get()
    return np.asarray(data, dtype=dtype)


def to_numpy(array: Any) -> np.ndarray:
    """Return a NumPy array holding ``array``'s values (a device-to-host copy for CuPy)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


def is_array(obj: Any) -> bool:
    """True for a NumPy or CuPy ndarray."""
    return isinstance(obj, np.ndarray) or type(obj).__module__.startswith("cupy")


# --------------------------------------------------------------------------- calls that differ

def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """In place: ``target[indices] += values``, adding repeated indices up (unlike ``+=``)."""
    if _name == "cupy":
        import cupyx

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def index_add_rows(indices: Any, values: Any, num_rows: int) -> Any:
    """Sum rows of ``values`` (N, C) into ``num_rows`` bins by ``indices`` (N,) -> (num_rows, C).

    ``out[k] = sum_{i: indices[i] = k} values[i]``; indices (...) and values (..., C) also work;
    indices must lie in [0, num_rows). This is the backward of an embedding lookup.

    CuPy has a fast atomic scatter-add. On the CPU ``np.add.at`` is slow per element, so the rows
    are sorted by index: when most of them repeat an index (a small table, many tokens) a one-hot
    matmul sums them on BLAS; otherwise the first row of each index is copied into place and only
    the repeats go through ``np.add.at``.
    """
    # the row width is whatever follows the index axes, so empty index arrays work too
    width = int(np.prod(values.shape[indices.ndim:]))
    indices = indices.reshape(-1)
    values = values.reshape(indices.shape[0], width)  # (N, C)
    if _name == "cupy":
        out = xp.zeros((num_rows, width), dtype=values.dtype)
        scatter_add(out, indices, values)
        return out
    n = indices.shape[0]
    if n == 0:
        return np.zeros((num_rows, width), dtype=values.dtype)
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


def manual_seed(seed: int) -> None:
    """Seed every random generator minilora uses (host initialisation and device dropout)."""
    global _host_rng, _device_rng, _cupy_rng, _seed
    _seed = check_int(seed, "manual_seed: seed", minimum=0)
    _host_rng = np.random.default_rng(_seed)
    _cupy_rng = xp.random.default_rng(_seed) if _name == "cupy" else None
    _device_rng = _cupy_rng if _name == "cupy" else _host_rng


def host_rng() -> np.random.Generator:
    """The NumPy generator used for parameter initialisation (seeded by ``manual_seed``)."""
    return _host_rng


def random_uniform(shape: tuple, dtype: Any) -> Any:
    """Uniform [0, 1) samples of ``shape`` on the active device (used for dropout masks), from
    this thread's generator when ``generator_as`` set one, else from the global one."""
    rng = getattr(_local, "rng", None)
    return (_device_rng if rng is None else rng).random(shape, dtype=dtype)


def spawn_generators(n: int) -> list:
    """``n`` new device generators for dropout masks, seeded by draws from the global host
    generator: a seed fixes them, and a checkpoint (which saves the host generator) too."""
    seeds = _host_rng.integers(0, 2**63, size=n)
    return [xp.random.default_rng(int(s)) for s in seeds]


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
    """Wait for queued GPU work to finish (a no-op on NumPy); call before reading a timer."""
    if _name == "cupy":
        xp.cuda.Device().synchronize()


def memory_stats() -> dict:
    """Device memory in use: ``{"backend", "used_bytes", "total_bytes"}`` (CuPy's memory pool).

    On NumPy the host allocations are not tracked here; use ``tracemalloc`` for those.
    """
    if _name == "cupy":
        pool = xp.get_default_memory_pool()
        return {"backend": "cupy", "used_bytes": int(pool.used_bytes()),
                "total_bytes": int(pool.total_bytes())}
    return {"backend": "numpy", "used_bytes": None, "total_bytes": None}


_env = os.environ.get("MINILORA_BACKEND", "").strip().lower()
if _env:
    use_backend(_env)
