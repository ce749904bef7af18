"""The CuPy extras minilora touches, emulated: ``random`` (generators that give device arrays),
``cuda`` (one device, its synchronize, the runtime's device count) and ``cupyx.scatter_add``
(updates applied one at a time in a shuffled order, as atomic adds land on a GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DTypeError
from .arrays import device_index, host_refused, ndarray, unwrap, wrap
from .counters import count
from .memory import MemoryPool, default_pool

# ------------------------------------------------------------------------------------ random


class Generator:
    """``cupy.random.Generator`` on NumPy's: each draw one launch, device arrays out. Unlike
    CuPy's (cuRAND states in device memory, no ``state`` to read), ``bit_generator.state`` can be
    read and set as NumPy's can; minilora's own device generator does not rely on that
    (``backend.CounterGenerator``)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    @property
    def bit_generator(self) -> Any:
        """NumPy's bit generator (its ``state`` is a JSON-able dict)."""
        return self._rng.bit_generator

    def _draw(self, name: str, *args: Any, **kwargs: Any) -> ndarray:
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = unwrap(out, f"random.{name}")
        r = getattr(self._rng, name)(*unwrap(args, f"random.{name}"), **kwargs)
        count("launches")
        return wrap(np.asarray(r)) if out is None else out

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> ndarray:
        """U[0, 1) samples."""
        return self._draw("random", size, dtype=dtype, out=out)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64,
                        out: Any = None) -> ndarray:
        """N(0, 1) samples."""
        return self._draw("standard_normal", size, dtype=dtype, out=out)

    def integers(self, low: Any, high: Any = None, size: Any = None, dtype: Any = np.int64,
                 endpoint: bool = False) -> ndarray:
        """Integers in [low, high)."""
        return self._draw("integers", low, high, size, dtype=dtype, endpoint=endpoint)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> ndarray:
        """U[low, high) samples (float64)."""
        return self._draw("uniform", low, high, size)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> ndarray:
        """N(loc, scale^2) samples (float64)."""
        return self._draw("normal", loc, scale, size)

    def permutation(self, x: Any) -> ndarray:
        """A shuffled arange(x), or a shuffled copy of a device array."""
        return self._draw("permutation", x)


class Random:
    """``cupy.random``: ``default_rng`` and a few legacy draws from one global generator."""

    Generator = Generator

    def __init__(self) -> None:
        self._global = Generator(np.random.default_rng())

    def default_rng(self, seed: Any = None) -> Generator:
        """A generator seeded as NumPy's ``default_rng(seed)``."""
        return Generator(np.random.default_rng(seed))

    def seed(self, seed: Any = None) -> None:
        """Reseed the global generator."""
        self._global = Generator(np.random.default_rng(seed))

    def random(self, size: Any = None, dtype: Any = np.float64) -> ndarray:
        """U[0, 1) from the global generator."""
        return self._global.random(size, dtype=dtype)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64) -> ndarray:
        """N(0, 1) from the global generator."""
        return self._global.standard_normal(size, dtype=dtype)

    def randn(self, *shape: int) -> ndarray:
        """N(0, 1) of ``shape`` (float64)."""
        return self._global.standard_normal(shape or None)

    def rand(self, *shape: int) -> ndarray:
        """U[0, 1) of ``shape`` (float64)."""
        return self._global.random(shape or None)

    def randint(self, low: int, high: int | None = None, size: Any = None) -> ndarray:
        """Integers in [low, high)."""
        return self._global.integers(low, high, size)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> ndarray:
        """N(loc, scale^2) from the global generator."""
        return self._global.normal(loc, scale, size)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> ndarray:
        """U[low, high) from the global generator."""
        return self._global.uniform(low, high, size)


random = Random()


# -------------------------------------------------------------------------------------- cuda


class Device:
    """``cupy.cuda.Device``: one device, id 0."""

    def __init__(self, device: int = 0) -> None:
        self.id = int(device)

    def synchronize(self) -> None:
        """Wait for the device: counted as a sync (the host stalls as for a copy)."""
        count("syncs")

    def use(self) -> None:
        """There is one device: nothing to switch."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    @property
    def compute_capability(self) -> str:
        """No real device: "00"."""
        return "00"

    @property
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes, as ``runtime.memGetInfo``."""
        return Runtime.memGetInfo()


class Runtime:
    """``cupy.cuda.runtime``: one device of a nominal 64 GiB."""

    is_hip = False

    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802 -- CUDA's name
        """One device."""
        return 1

    @staticmethod
    def getDevice() -> int:  # noqa: N802
        """Device 0."""
        return 0

    @staticmethod
    def memGetInfo() -> tuple[int, int]:  # noqa: N802
        """(free, total) bytes of the nominal device, less what the pool holds."""
        total = 1 << 36
        return total - default_pool.total_bytes(), total

    @staticmethod
    def deviceSynchronize() -> None:  # noqa: N802
        """Wait for the device: a sync."""
        count("syncs")

    @staticmethod
    def runtimeGetVersion() -> int:  # noqa: N802
        """A nominal CUDA 12.0."""
        return 12000


class Cuda:
    """``cupy.cuda``: Device, runtime, the memory pool class."""

    Device = Device
    runtime = Runtime()
    MemoryPool = MemoryPool

    @staticmethod
    def get_device_id() -> int:
        """Device 0."""
        return 0

    @staticmethod
    def is_available() -> bool:
        """The stand-in is always there."""
        return True


cuda = Cuda()


# ------------------------------------------------------------------------------------- cupyx

_shuffle = np.random.default_rng()  # fresh entropy: atomics land in an order no seed fixes


def scatter_add(a: ndarray, slices: Any, value: Any) -> None:
    """``cupyx.scatter_add``: ``a[slices] += value`` with repeats added up, one update at a time
    in a shuffled order, so float sums round differently from call to call as atomics do (the
    reason minilora's gradients use ``backend.scatter_add``, which sorts, instead)."""
    if type(a) is not ndarray:
        if isinstance(a, np.ndarray):
            raise host_refused("cupyx.scatter_add")
        raise DTypeError(f"cupyx.scatter_add: a must be a device array, got {type(a).__name__}")
    idx, _, _ = device_index(slices)
    target = a._a
    pos = np.arange(target.size).reshape(target.shape)[idx]  # flat target of each update
    vals = np.broadcast_to(unwrap(value, "cupyx.scatter_add"), pos.shape).reshape(-1)
    pos = pos.reshape(-1)
    order = _shuffle.permutation(pos.size)
    flat = target.reshape(-1)  # a view when contiguous, else a copy written back below
    np.add.at(flat, pos[order], vals[order].astype(target.dtype, copy=False))
    if not np.shares_memory(flat, target):
        target[...] = flat.reshape(target.shape)
    count("launches")


class Cupyx:
    """``cupyx``: ``scatter_add`` (shuffled, as atomics), ``get_runtime_info``."""

    scatter_add = staticmethod(scatter_add)

    @staticmethod
    def get_runtime_info() -> str:
        """Says what this is."""
        return "minilora.strict: CuPy's API emulated on NumPy, no CUDA"


cupyx = Cupyx()

__all__ = ["Generator", "Random", "random", "Device", "Runtime", "Cuda", "cuda", "scatter_add",
           "Cupyx", "cupyx"]
