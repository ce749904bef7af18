"""Blockwise 4-bit quantization (NF4, FP4, INT4) with double quantization, as in QLoRA.

A weight tensor is stored as one 4-bit code per element plus one scale per block:

* flatten row-major and cut into blocks of ``blocksize`` elements (the last block may be short;
  a block larger than the array is one short block, nothing is padded to ``blocksize``);
* ``absmax_b = max |x|`` over block b, kept in float32;
* each element is scaled to [-1, 1] with bitsandbytes' float32 arithmetic, then takes the code
  whose interval between midpoints holds it (a value exactly on a midpoint takes the lower code,
  as ``torch.bucketize`` does): a FULL block is multiplied by the float32 reciprocal,
  ``clip(x * fl(1 / max(absmax_b, 1e-38)), -1, 1)``, the short last block is divided,
  ``clip(x / max(absmax_b, 1e-38), -1, 1)`` (the two differ by an ulp now and then, which moves
  a value lying within an ulp of a midpoint to the other code);
* two codes share a byte, the first element in the HIGH nibble:
  ``packed[i] = code[2i] << 4 | code[2i + 1]`` (an odd count pads the last low nibble with the
  code of zero);
* ``dequantize``: ``x_hat = code_value[q] * absmax_b``.

Double quantization (QLoRA, section 3) compresses the float32 absmax values too: subtract their
mean (kept as an ``offset``), then quantize them blockwise (256 per block) to 8 bits with
bitsandbytes' signed "dynamic" map. Storage per parameter: ``4 + 32/64 = 4.5`` bits without it and
``4 + 8/64 + 32/(64 * 256) = 4.127`` bits with it (plus one float32 offset per tensor).

The code tables, the nibble order, the scaling arithmetic and the midpoint rule are those of
bitsandbytes' reference kernel (``backends/default/ops.py``, which its CPU build uses for
``quantize_4bit``), so packed bytes and absmax equal bitsandbytes' for every input, midpoints
included, and its arrays can be read here directly (tests/crosscheck/test_quant_bnb.py compares
them byte for byte). The one place that differs on purpose is the nested 8-bit step of double
quantization (see :func:`quantize`). The code tables are in :mod:`.codes`; the frozen layer
built on this (``QuantLinear``) and merging into a 4-bit base in :mod:`.linear`;
``quantize_model`` and the memory report in :mod:`.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import backend as B
from ..errors import DTypeError, InvalidArgumentError, ShapeError, check_bool, check_int, is_int
from ..fast.checks import check_range
from ..tensor import Tensor
from .codes import CODES, byte_table, check_quant_type, device_table, host_tables

NESTED_BLOCKSIZE = 256  # absmax values per block in double quantization (QLoRA, bitsandbytes)
# The largest blocksize accepted (bitsandbytes uses 32..4096). Nothing is allocated in proportion
# to the blocksize, but a limit turns a forged one (a corrupt file, 2**40) into a clear error.
MAX_BLOCKSIZE = 2 ** 24
_MAX_TEXT = f"2**{MAX_BLOCKSIZE.bit_length() - 1} = {MAX_BLOCKSIZE}"
# bitsandbytes scales by 1 / max(absmax, 1e-38): a block of zeros (or of subnormals) is not
# divided by zero, and a zero SHORT last block stores this value as its absmax
_TINY = np.float32(1e-38)

# ----------------------------------------------------------------------------------- validation

def check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    """``blocksize`` as an int, a power of two in [16, MAX_BLOCKSIZE], or InvalidArgumentError
    naming it."""
    ok = is_int(blocksize)
    if ok and blocksize > MAX_BLOCKSIZE:
        raise InvalidArgumentError(f"{name} must be at most MAX_BLOCKSIZE = {_MAX_TEXT} "
                                   f"(bitsandbytes uses 32..4096), got {blocksize!r}")
    if not ok or blocksize < 16 or blocksize & (blocksize - 1):
        raise InvalidArgumentError(f"{name} must be a power of two in [16, MAX_BLOCKSIZE = "
                                   f"{_MAX_TEXT}] (bitsandbytes uses 32..4096, default 64), "
                                   f"got {blocksize!r}")
    return int(blocksize)


def _as_float32(array: Any, fn: str) -> Any:
    """``array`` (a Tensor, a NumPy/CuPy array or a nested list) as float32 on the active backend.

    Integer and boolean data are refused, and so are NaN and inf, which would poison a block.
    """
    data = array.data if isinstance(array, Tensor) else array
    arr = B.asarray(data)
    if arr.dtype.kind != "f":
        raise DTypeError(f"{fn}: array must hold floats, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ShapeError(f"{fn}: array is empty (shape {tuple(arr.shape)}); nothing to quantize")
    arr = arr.astype(np.float32, copy=False)  # 4-bit codes and float32 scales, as bitsandbytes
    finite = B.xp.isfinite(arr)
    if not bool(finite.all()):
        flat = B.to_numpy(finite.reshape(-1))
        bad = np.flatnonzero(~flat)
        raise InvalidArgumentError(
            f"{fn}: array holds {bad.size} non-finite value(s) (NaN or inf), first at flat index "
            f"{int(bad[0])} of shape {tuple(arr.shape)}; a block's absmax would be meaningless")
    return arr


# --------------------------------------------------------------------------- the state object

@dataclass(repr=False)
class QuantState:
    """A quantized tensor: codes, per-block scales and what is needed to undo them.

    ``packed`` uint8 ((numel + 1) // 2,), first element in the high nibble.
    ``absmax`` float32 (n_blocks,), or uint8 (n_blocks,) codes of ``absmax - offset`` in the
    8-bit dynamic map when double quantized; then ``absmax2`` float32
    (ceil(n_blocks / 256),) holds their per-block scales and ``offset`` (float32, shape ()) the
    mean that was subtracted. ``shape`` is the logical shape of the original tensor.
    """

    packed: Any
    absmax: Any
    shape: tuple
    blocksize: int
    quant_type: str
    offset: Any = None
    absmax2: Any = None
    blocksize2: int = field(default=NESTED_BLOCKSIZE)

    @property
    def nested(self) -> bool:
        """True when the absmax values are double quantized."""
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of blocks (and of absmax values)."""
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of every array this state holds (the code tables are shared, not counted)."""
        arrays = (self.packed, self.absmax, self.absmax2, self.offset)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def bits_per_parameter(self) -> float:
        """Bits held per logical element: ``8 * nbytes / numel``."""
        return 8 * self.nbytes / self.numel

    def codes(self) -> Any:
        """The 4-bit codes, uint8 (numel,), unpacked in element order."""
        return unpack_nibbles(self.packed, self.numel)

    def dequantized_absmax(self) -> Any:
        """The per-block scales as float32 (n_blocks,), undoing double quantization if used."""
        check_state(self, "dequantized_absmax")
        if not self.nested:
            return self.absmax
        scales = _dequantize_blocks(self.absmax, self.absmax2, self.blocksize2, "dynamic8",
                                    self.n_blocks)
        return scales + self.offset

    def to_backend(self) -> QuantState:
        """A copy whose arrays live on the active backend (after ``use_backend``)."""
        move = lambda a: None if a is None else B.asarray(a)
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       offset=move(self.offset), absmax2=move(self.absmax2))

    def __repr__(self) -> str:
        dq = f", double_quant (offset {float(self.offset):.4g})" if self.nested else ""
        return (f"QuantState({self.quant_type}, shape={self.shape}, blocksize={self.blocksize}"
                f"{dq}, {self.nbytes} bytes = {self.bits_per_parameter():.3f} bits/param)")


# ------------------------------------------------------------------------------ nibble packing

def pack_nibbles(codes: Any) -> Any:
    """Pack 4-bit codes (uint8 (n,), values 0..15) two per byte, the first in the HIGH nibble.

    ``packed[i] = codes[2i] << 4 | codes[2i + 1]``; an odd n leaves the last low nibble 0 (the
    quantizer pads with the code of zero instead, as bitsandbytes does).
    """
    codes = B.asarray(codes)
    if codes.dtype != np.uint8:
        raise DTypeError(f"pack_nibbles: codes must be uint8, got dtype {codes.dtype}")
    # a code of 16 or more would spill into its neighbour's nibble (one sync on a device)
    check_range(codes, 0, 16, lambda host: InvalidArgumentError(
        f"pack_nibbles: codes must be 4-bit values 0..15, got {int(host.max())} (of "
        f"{int((host > 15).sum())} out of range)"))
    return _pack(codes)


def _pack(codes: Any) -> Any:
    """:func:`pack_nibbles` without the range check, for codes the quantizer made."""
    codes = codes.reshape(-1)
    if codes.size % 2:
        codes = B.xp.concatenate([codes, B.xp.zeros(1, dtype=np.uint8)])
    pairs = codes.reshape(-1, 2)  # (n_bytes, 2): (high, low)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Any, n: int) -> Any:
    """The inverse of :func:`pack_nibbles`: the first ``n`` codes, uint8 (n,)."""
    packed = B.asarray(packed).reshape(-1)
    if packed.dtype != np.uint8:
        raise DTypeError(f"unpack_nibbles: packed must be uint8, got dtype {packed.dtype}")
    if not is_int(n) or not 0 <= n <= 2 * packed.size:
        raise ShapeError(f"unpack_nibbles: {packed.size} bytes hold at most {2 * packed.size} "
                         f"codes, asked for n={n}")
    return B.xp.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]  # (2 * n_bytes,)


# ------------------------------------------------------------------- blockwise (de)quantization

def _quantize_blocks(x: Any, blocksize: int, kind: str) -> tuple[Any, Any]:
    """Codes (uint8 (n,)) and absmax (float32 (n_blocks,)) of the flat float32 array ``x``.

    bitsandbytes' arithmetic, step by step in float32 (``fl`` = rounding to float32):

    * full block b:  ``s_i = clip(fl(x_i * fl(1 / max(absmax_b, 1e-38))), -1, 1)``;
    * the short last block (n % blocksize elements, if any):
      ``s_i = clip(fl(x_i / max(absmax_b, 1e-38)), -1, 1)`` and its stored absmax is
      ``max(absmax_b, 1e-38)`` (so an all-zero short block stores 1e-38, a full one 0);
    * ``q_i = order[#{k : midpoint_k < s_i}]``: one ``searchsorted`` (side 'left', as
      ``torch.bucketize``) over the midpoints between sorted code values, so a value exactly on
      a midpoint takes the lower code; the work is O(n log 16), with no (n, 16) matrix.

    Memory is O(n): a block larger than ``x`` is one short block, nothing is padded.
    """
    n = x.size
    k = n // blocksize  # full blocks
    full = k * blocksize
    n_blocks = k + (full < n)
    absmax = B.xp.empty(n_blocks, dtype=np.float32)
    scaled = B.xp.empty(n, dtype=np.float32)
    if k:
        blocks = x[:full].reshape(k, blocksize)  # (k, blocksize)
        absmax[:k] = B.xp.abs(blocks).max(axis=1)
        recip = B.xp.divide(np.float32(1.0), B.xp.maximum(absmax[:k], _TINY))  # (k,) fl(1/a)
        B.xp.multiply(blocks, recip[:, None], out=scaled[:full].reshape(k, blocksize))
    if full < n:
        rest = x[full:]  # (n - full,)
        absmax[k] = B.xp.maximum(B.xp.abs(rest).max(), _TINY)
        B.xp.divide(rest, absmax[k], out=scaled[full:])
    B.xp.clip(scaled, -1, 1, out=scaled)
    _, order, midpoints = host_tables(kind)
    mids = device_table(f"mid/{kind}", lambda: midpoints)
    position = B.xp.searchsorted(mids, scaled, side="left")
    codes = device_table(f"order/{kind}", lambda: order.astype(np.uint8))[position]
    return codes, absmax


def _dequantize_blocks(codes: Any, absmax: Any, blocksize: int, kind: str, n: int) -> Any:
    """Flat float32 (n,): ``code_value[codes_i] * absmax_b`` for 8-bit codes (one per byte)."""
    values = B.xp.take(device_table(f"code/{kind}", lambda: CODES[kind]), codes)
    return _scale_blocks(values, absmax, blocksize, n)


def _scale_blocks(values: Any, absmax: Any, blocksize: int, n: int) -> Any:
    """Multiply flat ``values`` (at least n, a fresh contiguous array: it is scaled in place)
    block by block by ``absmax`` (ceil(n / blocksize),); returns (n,).

    The full blocks are one broadcast multiply, the short last block another; nothing is padded,
    so a block larger than the array costs nothing extra.
    """
    values = values[:n]
    k = n // blocksize
    full = k * blocksize
    if k:
        blocks = values[:full].reshape(k, blocksize)  # (k, blocksize), a view
        blocks *= absmax[:k, None]  # in place: dequantizing allocates one float array, not two
    if full < n:
        values[full:] *= absmax[k]
    return values


def quantize(array: Any, blocksize: int = 64, quant_type: str = "nf4",
             double_quant: bool = False) -> QuantState:
    """Quantize a float array blockwise to 4 bits; returns a :class:`QuantState`.

    ``q_i = order[#{k : midpoint_k < s_i}]``, the code nearest to ``s_i`` with ties to the lower
    one, where ``s_i`` is ``x_i`` scaled to [-1, 1] by its block's ``absmax_b = max_{j in b}
    |x_j|`` exactly as bitsandbytes scales it: ``clip(x_i * fl(1 / absmax_b), -1, 1)`` in a full
    block, ``clip(x_i / absmax_b, -1, 1)`` in the short last block (float32 throughout, absmax
    floored at 1e-38; see :func:`_quantize_blocks`). Blocks are ``blocksize`` (a power of two in
    [16, MAX_BLOCKSIZE]) consecutive elements of ``array`` flattened row-major; the result holds
    ``packed`` uint8 ((n + 1) // 2,) and ``absmax`` float32 (ceil(n / blocksize),), and equals
    bitsandbytes' ``quantize_4bit`` byte for byte for "nf4" and "fp4".

    ``quant_type``: "nf4" (normal float, the QLoRA default), "fp4" (E2M1 float) or "int4"
    (symmetric, k/7). ``double_quant`` also quantizes the absmax values to 8 bits (blocks of 256,
    mean subtracted), with the same scaling arithmetic but always the NEAREST code of the 8-bit
    map (midpoint rule); bitsandbytes' native CPU kernel for that step uses a binary search that
    lands on the neighbouring code for about 0.05 % of the absmax values, so those bytes may
    differ by one step (both stay within the 8-bit error bound). Float16/32/64 input is
    quantized from its float32 values.
    """
    check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    check_bool(double_quant, "quantize: double_quant")
    arr = _as_float32(array, "quantize")
    codes, absmax = _quantize_blocks(arr.reshape(-1), blocksize, quant_type)
    if codes.size % 2:  # pad with the code of zero, as bitsandbytes does
        zero = B.xp.asarray([_zero_code(quant_type)], dtype=np.uint8)
        codes = B.xp.concatenate([codes, zero])
    state = QuantState(_pack(codes), absmax, tuple(arr.shape), blocksize, quant_type)
    return _double_quantize(state) if double_quant else state


def _zero_code(quant_type: str) -> int:
    _, order, midpoints = host_tables(quant_type)
    return int(order[np.searchsorted(midpoints, np.float32(0.0), side="left")])


def _double_quantize(state: QuantState) -> QuantState:
    """Replace float32 absmax by 8-bit codes of ``absmax - mean`` (blocks of 256) + the mean."""
    absmax = state.absmax
    # the mean of many positive float32 values: accumulate in float64, store float32
    offset = B.xp.asarray(absmax.astype(np.float64).mean(), dtype=np.float32)
    codes, absmax2 = _quantize_blocks(absmax - offset, NESTED_BLOCKSIZE, "dynamic8")
    return replace(state, absmax=codes, offset=offset, absmax2=absmax2,
                   blocksize2=NESTED_BLOCKSIZE)


def check_state(state: Any, fn: str = "dequantize") -> None:
    """Refuse a QuantState whose arrays do not fit its shape and blocksizes (a forged or corrupt
    one), from metadata alone: nothing is allocated before every size has been checked."""
    if not isinstance(state, QuantState):
        raise InvalidArgumentError(f"{fn}: expected a QuantState, got {type(state).__name__}")
    check_quant_type(state.quant_type)
    check_blocksize(state.blocksize, "state.blocksize")
    shape = state.shape
    if not isinstance(shape, (tuple, list)) or not all(is_int(d) and d >= 0 for d in shape) \
            or math.prod(shape) < 1:
        raise ShapeError(f"{fn}: state.shape must be a tuple of positive ints, got {shape!r}")
    for name in ("packed", "absmax"):
        if not B.is_array(getattr(state, name)):
            raise InvalidArgumentError(f"{fn}: state.{name} must be an array, got "
                                       f"{type(getattr(state, name)).__name__}")
    n = state.numel
    if state.packed.dtype != np.uint8 or state.packed.size != (n + 1) // 2:
        raise ShapeError(f"{fn}: packed must be uint8 of {(n + 1) // 2} bytes for shape "
                         f"{state.shape}, got {state.packed.dtype} of {state.packed.size}")
    want = np.uint8 if state.nested else np.float32
    if state.absmax.dtype != want or state.absmax.size != state.n_blocks:
        raise ShapeError(f"{fn}: absmax must be {np.dtype(want)} of {state.n_blocks} blocks for "
                         f"shape {state.shape} at blocksize {state.blocksize}, got "
                         f"{state.absmax.dtype} of {state.absmax.size}")
    if not state.nested:
        return
    check_blocksize(state.blocksize2, "state.blocksize2")
    n2 = -(-state.n_blocks // state.blocksize2)
    a2 = state.absmax2
    if not B.is_array(a2) or a2.dtype != np.float32 or a2.size != n2:
        got = f"{a2.dtype} of {a2.size}" if B.is_array(a2) else type(a2).__name__
        raise ShapeError(f"{fn}: absmax2 must be float32 of {n2} values ({state.n_blocks} "
                         f"blocks at blocksize2 {state.blocksize2}), got {got}")
    off = state.offset
    if not B.is_array(off) or off.dtype != np.float32 or off.size != 1:
        got = f"{off.dtype} of {off.size}" if B.is_array(off) else type(off).__name__
        raise ShapeError(f"{fn}: offset must be one float32 value, got {got}")


def dequantize(state: QuantState) -> Any:
    """Undo :func:`quantize`: ``x_hat_i = code_value[q_i] * absmax_b``, float32 of ``state.shape``.

    One gather through a (256, 2) table turns each byte into its two values (high nibble first),
    then the block scales are applied in place: one broadcast multiply for the full blocks, one
    for the short last block (nothing is padded to ``blocksize``). The state's sizes are checked
    against its shape and blocksizes first, so a forged state is refused before any allocation.
    """
    check_state(state)
    pairs = device_table(f"bytes/{state.quant_type}", lambda: byte_table(state.quant_type))
    # take, not fancy indexing: NumPy's take with uint8 indices is far faster here
    values = B.xp.take(pairs, state.packed.reshape(-1), axis=0).reshape(-1)  # (2 * n_bytes,)
    flat = _scale_blocks(values, state.dequantized_absmax(), state.blocksize, state.numel)
    return flat.reshape(state.shape)


# ------------------------------------------------------------------------------ accounting

def bits_per_parameter(blocksize: int = 64, double_quant: bool = False,
                       nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Storage per element of a large tensor: ``4 + 32 / blocksize`` bits, or with double
    quantization ``4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)``.

    At blocksize 64: exactly 4.5, and 4.126953125 with double quantization (QLoRA's 4.127).
    """
    blocksize = check_blocksize(blocksize)
    if not double_quant:
        return 4 + 32 / blocksize
    nested_blocksize = check_blocksize(nested_blocksize, "nested_blocksize")
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


def storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Exact bytes a :class:`QuantState` of ``numel`` elements holds (equals ``state.nbytes``).

    ``ceil(n/2)`` packed bytes + 4 bytes per block, or with double quantization 1 byte per block
    + 4 bytes per 256 blocks + a 4-byte offset.
    """
    blocksize = check_blocksize(blocksize)
    numel = check_int(numel, "storage_bytes: numel")
    n_blocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * n_blocks
    return (numel + 1) // 2 + n_blocks + 4 * -(-n_blocks // NESTED_BLOCKSIZE) + 4


def error_stats(original: Any, approx: Any) -> dict:
    """How far ``approx`` (an array or a QuantState) is from ``original``, elementwise.

    ``mean_abs_error = mean |x - x_hat|``, ``mean_rel_error = mean(|x - x_hat| / (|x| + 1e-8))``
    (the definition bitsandbytes' tests use) and ``max_abs_error``; Python floats.
    """
    x = _as_float32(original, "error_stats")
    xh = dequantize(approx) if isinstance(approx, QuantState) else B.asarray(approx)
    if tuple(xh.shape) != tuple(x.shape):
        raise ShapeError(f"error_stats: original has shape {tuple(x.shape)} but the "
                         f"approximation {tuple(xh.shape)}")
    err = B.xp.abs(x - xh.astype(np.float32))
    rel = err / (B.xp.abs(x) + np.float32(1e-8))
    return {"mean_abs_error": float(err.mean(dtype=np.float64)),
            "mean_rel_error": float(rel.mean(dtype=np.float64)),
            "max_abs_error": float(err.max())}


__all__ = ["MAX_BLOCKSIZE", "NESTED_BLOCKSIZE", "QuantState", "quantize", "dequantize",
           "pack_nibbles", "unpack_nibbles", "bits_per_parameter", "storage_bytes", "error_stats",
           "check_blocksize", "check_state"]
