"""Fused elementwise kernels for the device path: a chain of elementwise steps as one launch.

On a GPU every array operation is a kernel launch (some microseconds each, whatever its size), so
a chain of a dozen elementwise passes costs a dozen launches and a dozen trips through memory.
:func:`elementwise` makes one ``ElementwiseKernel`` (CuPy's, or the strict stand-in's emulation
of it) out of the chain, written in the small subset of CUDA C both understand: one assignment a
statement, C arithmetic, ``sqrt``/``exp``/``tanh``. The kernels of :mod:`.elementwise`,
:mod:`.norm`, :mod:`.attention` and :mod:`.adamw` are made here.

Each kernel does the operations of its host form in the same order, in the parameter's own type
(every constant is written as a literal of that type, every setting passed as a value of that
type), so the strict stand-in gives the host form's bits; on a GPU the compiler is told not to
contract ``a * b + c`` into one rounding (``--fmad=false``), which leaves only the GPU's own
``exp``/``tanh``/``sqrt`` rounding between the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..errors import DTypeError

# NVRTC options: keep a * b + c as two roundings, as NumPy computes it
OPTIONS = ("--fmad=false",)
# float dtype -> (its name in a kernel's parameter list, its C type in the kernel body)
C_TYPES = {np.dtype(np.float32): ("float32", "float"), np.dtype(np.float64): ("float64", "double")}

_kernels: dict = {}  # (backend, name, dtype) -> kernel: each is compiled once per device


def c_types(dtype: Any) -> tuple[str, str]:
    """(parameter type, C type) of a float ``dtype``; DTypeError for anything else."""
    found = C_TYPES.get(np.dtype(dtype))
    if found is None:
        raise DTypeError(f"fast.device: fused kernels take float32 or float64, got {dtype}")
    return found


def literal(value: float, dtype: Any) -> str:
    """``value`` as a C literal of ``dtype``: rounded to float32 (with the ``f`` suffix) for
    float32, as NumPy rounds a Python float it multiplies a float32 array by."""
    if np.dtype(dtype) == np.float32:
        return f"{float(np.float32(value))!r}f"
    return f"{float(value)!r}"


def elementwise(name: str, dtype: Any, in_params: str, out_params: str, operation: str) -> Any:
    """The elementwise kernel ``name`` for ``dtype`` on the active device, made on first use.

    ``in_params``/``out_params``/``operation`` are CuPy's; ``{P}`` in them stands for the
    parameter type of ``dtype`` ("float32"), ``{C}`` for its C type ("float").
    """
    key = (B.get_backend(), name, np.dtype(dtype).str)
    kernel = _kernels.get(key)
    if kernel is None:
        p, c = c_types(dtype)
        fill = {"P": p, "C": c}
        kernel = _kernels[key] = B.xp.ElementwiseKernel(
            in_params.format(**fill), out_params.format(**fill), operation.format(**fill),
            f"minilora_{name}_{p}", options=OPTIONS)
    return kernel


__all__ = ["OPTIONS", "C_TYPES", "c_types", "literal", "elementwise"]
