"""The 4-bit code tables of QLoRA and bitsandbytes: NF4, FP4 and symmetric INT4, plus the
signed 8-bit "dynamic" map that double quantization uses for the absmax values.

A code is a sorted-by-index table of 16 values in [-1, 1]; a 4-bit number q stands for
``code[q] * absmax`` of its block (:mod:`minilora.quant.blockwise`).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from .. import backend as B
from ..errors import InvalidArgumentError, is_real

QUANT_TYPES = ("nf4", "fp4", "int4")

# NF4 (QLoRA, section 3): quantiles of N(0, 1) scaled to [-1, 1]; 7 negative values, an exact
# zero and 8 positive ones, so the grid is denser where Gaussian weights are.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

# FP4 as bitsandbytes lays it out (E2M1, bit 3 = sign): raw magnitudes by code 0..7, then the
# same magnitudes negated for codes 8..15 (code 8 is -0); divided by 12 to span [-1, 1].
_FP4_RAW = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
FP4_CODE = np.concatenate([_FP4_RAW, -_FP4_RAW]) / np.float32(12.0)

# Symmetric INT4: code i stands for (i - 8) / 7, i.e. k / 7 for k in -7..7 around an exact zero at
# code 8. Code 0 (k = -8) would lie outside [-1, 1]; it is clipped to -1 and never produced, so
# the grid is symmetric and the step is uniform (1/7).
INT4_CODE = np.clip((np.arange(16, dtype=np.float32) - np.float32(8)) / np.float32(7), -1, 1)


def dynamic_map_8bit() -> np.ndarray:
    """bitsandbytes' signed 8-bit "dynamic" map (256 sorted values in [-1, 1]), rebuilt exactly.

    Dynamic-exponent floats (Dettmers 2016): for exponent e = 0..6 the 2^e + 1 evenly spaced
    boundaries in [0.1, 1] give 2^e bin centres, scaled by 10^(e - 6), with both signs; plus 0
    and 1. Every step is rounded to float32 the way ``torch.linspace`` and float32 products do,
    so the table equals ``bitsandbytes.functional.create_dynamic_map()`` bit for bit. Its largest
    gap is 0.0140625 (near 1); values near zero are far denser.
    """
    start, end = np.float32(0.1), np.float32(1.0)
    parts = [np.array([0.0, 1.0], dtype=np.float32)]
    for e in range(7):
        k = 2 ** e + 1
        step = np.float64(np.float32((end - start) / np.float32(k - 1)))
        i = np.arange(k)
        # linspace fills the first half from the start and the second from the end, with one
        # rounding per value (a fused multiply-add)
        bounds = np.where(i < k // 2, np.float64(start) + step * i,
                          np.float64(end) - step * (k - 1 - i)).astype(np.float32)
        centres = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (e - 6))
        parts += [scale * centres, -scale * centres]
    return np.sort(np.concatenate(parts))


DYNAMIC_CODE = dynamic_map_8bit()


def normal_float_code(offset: float = 0.9677083) -> np.ndarray:
    """Rebuild the NF4 table from normal quantiles (QLoRA's construction), float32 (16,).

    Positive side: the N(0, 1) quantiles at 8 evenly spaced probabilities from ``offset`` down to
    0.5 (exclusive); negative side: the negated quantiles at 7 such probabilities; plus an exact
    zero. Dividing by the largest value maps the grid to [-1, 1]. ``offset = 0.9677083`` is the
    midpoint between the extreme quantiles of 32 and 30 equal bins, so +-1 are not infinite.
    """
    # a probability above 1/2 and below 1: at 1/2 every quantile is 0 (a table of NaN after the
    # division), at 1 the largest is infinite
    if not is_real(offset) or not 0.5 < offset < 1.0:
        raise InvalidArgumentError(f"normal_float_code: offset must be a probability between 0.5 "
                                   f"and 1 (exclusive; QLoRA's is 0.9677083), got {offset!r}")
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-inv(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(pos + [0.0] + neg))
    return (values / values.max()).astype(np.float32)


CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE, "dynamic8": DYNAMIC_CODE}
# codes that quantization may emit; INT4 code 0 is a clipped duplicate of -1
EMITTED = {"nf4": np.arange(16), "fp4": np.arange(16), "int4": np.arange(1, 16),
            "dynamic8": np.arange(256)}


def host_tables(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code values, sorted emitted code indices, midpoints between neighbours), host arrays."""
    code = CODES[kind]
    emitted = EMITTED[kind]
    # a stable sort keeps FP4's two zeros in code order (+0 then -0), as bitsandbytes' CPU path
    order = emitted[np.argsort(code[emitted], kind="stable")]
    sorted_values = code[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / np.float32(2.0)
    return code, order, midpoints


def byte_table(kind: str) -> np.ndarray:
    """(256, 2) float32: the two code values a packed byte holds, high nibble first."""
    code = CODES[kind]
    byte = np.arange(256)
    return np.stack([code[byte >> 4], code[byte & 15]], axis=1)


_device_tables: dict = {}


def device_table(name: str, make: Any) -> Any:
    """A host table copied once to the active backend (cached per backend)."""
    key = (name, B.get_backend())
    if key not in _device_tables:
        _device_tables[key] = B.asarray(make())
    return _device_tables[key]


def code_values(quant_type: str) -> Any:
    """The 16 code values of ``quant_type`` (index = 4-bit code), float32 on the active backend."""
    check_quant_type(quant_type)
    return device_table(f"code/{quant_type}", lambda: CODES[quant_type])


def max_half_gap(quant_type: str) -> float:
    """Half the largest gap between adjacent code values: the worst rounding error per unit absmax.

    NF4: 0.1519 (between -1 and -0.6962), FP4: 0.1667 (between 2/3 and 1), INT4: 1/14,
    8-bit dynamic map: 0.00703 (between 0.9930 and 1).
    """
    kind = "dynamic8" if quant_type == "dynamic8" else check_quant_type(quant_type)
    values = np.unique(CODES[kind].astype(np.float64))
    return float(np.diff(values).max() / 2)


def check_quant_type(quant_type: Any) -> str:
    """``quant_type`` if it is one of QUANT_TYPES, else InvalidArgumentError naming them."""
    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type
