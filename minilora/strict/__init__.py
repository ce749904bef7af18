"""A strict stand-in for CuPy, built on NumPy: the device code paths, checked on a CPU.

``use_backend("strict")`` (or ``MINILORA_BACKEND=strict``) makes this package the array module
``backend.xp``. Its :class:`ndarray` wraps a NumPy array the way a CuPy array holds device memory
(:mod:`.arrays`):

* implicit conversion to the host is refused: ``np.asarray(a)`` raises TypeError as CuPy's does;
* its kernels (module functions, ufuncs, array methods and operators) refuse NumPy-array operands
  (a host array in a device kernel is a bug CuPy reports); NumPy and Python scalars are fine;
* reductions and single-element indexing return 0-d device arrays, never host scalars;
* ``float() int() bool() .item() .tolist() .get() asnumpy()`` are device-to-host syncs, and
  ``asarray(host_data)`` is a host-to-device copy (an upload).

It counts kernel launches, syncs and uploads, in total and per call site ("path:line" of the first
frame outside this package and ``backend.py``): :func:`counts` and :func:`counting`
(:mod:`.counters`). It emulates the CuPy extras minilora touches: ``random.default_rng``,
``cuda.Device().synchronize()``, ``cuda.runtime.getDeviceCount()`` (:mod:`.extras`),
``get_default_memory_pool()`` with the bytes of the live device arrays (:mod:`.memory`),
``cupyx.scatter_add`` (updates applied in a shuffled order, as atomic adds land), and
:class:`ElementwiseKernel` (a small subset of CUDA C, evaluated with NumPy) and :func:`fuse`, one
launch a call (:mod:`.kernels`). Every other NumPy function is here as a kernel of the same name.

What it cannot catch: CUDA compile errors (an ``ElementwiseKernel`` or ``fuse`` body that nvcc or
CuPy's fusion would reject may run fine here), cuBLAS numerics (TF32, other summation orders, the
GPU's own ``exp``/``tanh``), differences between CuPy versions and between CuPy's API and NumPy's,
device memory limits, and real timings. It is slower than NumPy, since every call goes through a
wrapper and a frame walk: it is a checker, not a backend to train with.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from .arrays import launch, ndarray, wrap
from .counters import Counts, count, counting, counts, reset_counts
from .extras import Generator, cuda, cupyx, random
from .kernels import ElementwiseKernel, fuse
from .memory import (
    MemoryPool,
    PinnedMemoryPool,
    get_default_memory_pool,
    get_default_pinned_memory_pool,
)

newaxis = None


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """``a`` on the device: a device array as it is (or cast), host data copied (an upload)."""
    if type(a) is ndarray:
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    count("uploads")
    return wrap(np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False,
          ndmin: int = 0, *, blocking: bool = False) -> ndarray:
    """A device array of ``obj``: a copy of a device array (one launch), or an upload."""
    if type(obj) is ndarray:
        return launch("array", np.array, (obj,), {"dtype": dtype, "copy": copy, "order": order,
                                                  "ndmin": ndmin}, view=not copy)
    count("uploads")
    return wrap(np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> np.ndarray:
    """A NumPy array of ``a``: a device-to-host sync for a device array; host data as it is."""
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    """This module when any argument is a device array, else NumPy."""
    return sys.modules[__name__] if any(type(a) is ndarray for a in args) else np


class ufunc:  # noqa: N801 -- CuPy's name
    """A NumPy ufunc on device arrays: each call (and each method call) one launch."""

    def __init__(self, uf: np.ufunc) -> None:
        self._uf = uf
        self.__name__ = uf.__name__
        self.nin, self.nout, self.nargs = uf.nin, uf.nout, uf.nargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return launch(self.__name__, self._uf, args, kwargs)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        """``ufunc.reduce``."""
        return launch(f"{self.__name__}.reduce", self._uf.reduce, args, kwargs)

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        """``ufunc.accumulate``."""
        return launch(f"{self.__name__}.accumulate", self._uf.accumulate, args, kwargs)

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        """``ufunc.outer``."""
        return launch(f"{self.__name__}.outer", self._uf.outer, args, kwargs)

    def at(self, *args: Any, **kwargs: Any) -> Any:
        """``ufunc.at`` (in place, in index order: not the order atomics would take)."""
        return launch(f"{self.__name__}.at", self._uf.at, args, kwargs)

    def __repr__(self) -> str:
        return f"<strict.ufunc {self.__name__}>"


# calls that make a view when they can (no launch then)
_VIEWS = frozenset({"reshape", "ravel", "squeeze", "swapaxes", "transpose", "moveaxis",
                    "expand_dims", "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d",
                    "ascontiguousarray", "asfortranarray", "split", "array_split", "real", "imag",
                    "broadcast_arrays", "diagonal", "matrix_transpose", "permute_dims"})
# calls whose output size depends on the values: CuPy syncs to learn it
_SYNCING = frozenset({"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"})
# host files and host memory have no place on a device
_REFUSED = frozenset({"frombuffer", "fromfile", "fromiter", "load", "save", "savez", "savetxt",
                      "loadtxt", "genfromtxt", "memmap", "ctypeslib", "asarray_chkfinite"})
_cache: dict[str, Any] = {}


def _kernel(fn: Callable, name: str, view: bool, syncs: bool) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if syncs and (name != "where" or len(args) + len(kwargs) == 1):
            count("syncs")  # where(cond) alone is nonzero(cond)
        return launch(name, fn, args, kwargs, view)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"NumPy's ``{name}`` on device arrays (one launch)."
    return call


def _resolve(space: Any, name: str, prefix: str) -> Any:
    if name.startswith("__") or name in _REFUSED:
        raise AttributeError(f"module 'minilora.strict' has no attribute {prefix}{name!r}")
    try:
        obj = getattr(space, name)
    except AttributeError:
        raise AttributeError(f"module 'minilora.strict' has no attribute {prefix}{name!r} "
                             f"(NumPy has none either)") from None
    if isinstance(obj, np.ufunc):
        return ufunc(obj)
    if isinstance(obj, type) or not callable(obj):
        return obj  # dtypes (float32, dtype), constants (inf, pi), classes
    return _kernel(obj, prefix + name, view=name in _VIEWS,
                   syncs=name in _SYNCING or name == "where")


def __getattr__(name: str) -> Any:
    """NumPy's functions and ufuncs as device kernels; dtypes and constants as they are."""
    obj = _cache.get(name)
    if obj is None:
        obj = _cache[name] = _resolve(np, name, "")
    return obj


class _Namespace:
    """A NumPy submodule (``linalg``, ``fft``) as device kernels."""

    def __init__(self, space: Any, prefix: str) -> None:
        self._space, self._prefix, self._cache = space, prefix, {}

    def __getattr__(self, name: str) -> Any:
        obj = self._cache.get(name)
        if obj is None:
            obj = self._cache[name] = _resolve(self._space, name, self._prefix)
        return obj


linalg = _Namespace(np.linalg, "linalg.")
fft = _Namespace(np.fft, "fft.")

__all__ = ["ndarray", "asarray", "array", "asnumpy", "get_array_module", "ufunc", "Counts",
           "counts", "counting", "reset_counts", "Generator", "random", "cuda", "cupyx",
           "ElementwiseKernel", "fuse", "MemoryPool", "PinnedMemoryPool",
           "get_default_memory_pool", "get_default_pinned_memory_pool", "linalg", "fft",
           "newaxis"]
