"""bitsandbytes' 4-bit state-dict layout, read and written bit for bit (no torch needed).

A bitsandbytes ``Linear4bit`` saves its 4-bit weight (``Params4bit`` plus
``QuantState.as_dict(packed=True)``) as the tensors below, next to the layer; a QLoRA model saved
with ``safetensors.torch.save_file`` holds exactly these, and minilora's checkpoints keep every
:class:`~minilora.quant.linear.QuantLinear` the same way. For a weight of ``shape`` with
``n = prod(shape)`` elements (a Linear's (out, in), flattened row-major),
``n_blocks = ceil(n / blocksize)`` and ``n_blocks2 = ceil(n_blocks / nested_blocksize)``::

    <layer>.weight                                uint8    ((n + 1) // 2, 1)  two 4-bit codes a
                                                                              byte, the first in
                                                                              the HIGH nibble
    <layer>.weight.absmax                         float32  (n_blocks,)        per-block absmax;
                                                  uint8    (n_blocks,)        its 8-bit codes
                                                                              when double quantized
    <layer>.weight.quant_map                      float32  (16,)              the 4-bit code table
    <layer>.weight.nested_absmax                  float32  (n_blocks2,)       double quant: scales
                                                                              of the absmax codes
    <layer>.weight.nested_quant_map               float32  (256,)             double quant: the
                                                                              8-bit dynamic map
    <layer>.weight.quant_state.bitsandbytes__nf4  uint8    (k,)               a UTF-8 JSON blob
    <layer>.bias                                  float32  (out,)             a plain parameter

The blob (its key ends in the quant type: ``bitsandbytes__nf4`` or ``bitsandbytes__fp4``) holds
what is not an array: ``{"quant_type": "nf4", "blocksize": 64, "dtype": "float32",
"shape": [out, in]}`` and, with double quantization, ``"nested_blocksize": 256,
"nested_dtype": "float32", "nested_offset": <the float32 mean of the absmax values>``. It is
written with ``json.dumps``' defaults and bitsandbytes' key order, so its bytes equal
bitsandbytes' own.

What reading bitsandbytes' files showed (bitsandbytes 0.50):

* the packed weight is a column, ((n + 1) // 2, 1) uint8 (a flat ((n + 1) // 2,) is read too);
  an odd n pads the last low nibble with the code of zero;
* bitsandbytes' FP4 table holds +0.0 at code 8, where E2M1 has -0.0 (its list spells it as the
  Python int ``-0``, which is 0): equal as numbers, so tables are compared by value and minilora
  writes bitsandbytes' +0.0. (Dequantized, that code gives +0.0 there and -0.0 here: the one
  bit in which the two dequantized weights can differ);
* ``dtype`` is the dtype bitsandbytes dequantizes to (the weight's original one). minilora
  dequantizes to float32 always: a "bfloat16" state gives the float32 values that bitsandbytes
  then rounds to bfloat16. minilora writes "float32" unless told otherwise;
* ``quant_storage`` other than uint8 (the packed bytes viewed as bfloat16, for FSDP) is refused;
* a plain ``Linear4bit.load_state_dict`` cannot take these keys (it has no loading hook in 0.50):
  bitsandbytes and transformers rebuild the weight with ``Params4bit.from_prequantized``;
* bitsandbytes' CPU ``dequantize_4bit`` (and so ``Linear4bit``'s CPU forward) mis-scales 2-D
  shapes whose row length is not a multiple of the blocksize while the element count is, e.g.
  (40, 96) at 64; asked for the flattened shape it agrees with minilora (the crosscheck does so).

minilora's INT4 has no bitsandbytes counterpart (bitsandbytes' "int4" table is another grid): it
uses the same layout with the blob key ``weight.quant_state.minilora__int4``, so the file stays
self-describing and a bitsandbytes reader refuses it rather than misreading it.

Nothing is trusted: every size the blob claims is checked against the dtypes and shapes of the
tensors present before any array is made (:func:`check_quantized_file` does it from a
safetensors header alone, reading only the blobs); the code tables must equal minilora's, and
absmax and the offset must be finite. Errors name the key and the values.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .. import backend as B
from ..errors import (
    CheckpointError,
    InvalidArgumentError,
    MiniLoraError,
    StateDictError,
    is_int,
)
from ..tensorfile import DTYPES, MAX_NDIM, TensorInfo, no_duplicate_keys, read_tensors
from .blockwise import QuantState, check_blocksize, check_state
from .codes import DYNAMIC_CODE, FP4_CODE, INT4_CODE, NF4_CODE

# quant type -> who defines it (the blob key is "quant_state.<namespace>__<quant type>")
NAMESPACES = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int4": "minilora"}
MAX_BLOB_BYTES = 65536  # bitsandbytes' blob is under 200 bytes
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what "dtype" may say
_MARK = "weight.quant_state."
# the tables as they are written: FP4's -0.0 at code 8 becomes bitsandbytes' +0.0 (x + 0 does it)
_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE + np.float32(0.0), "int4": INT4_CODE}
_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")

Fail = Callable[[str], Exception]


def blob_key(quant_type: str) -> str:
    """The blob's key after ``<layer>.weight.``: "quant_state.bitsandbytes__nf4" and so on."""
    if quant_type not in NAMESPACES:
        raise InvalidArgumentError(f"blob_key: quant_type must be one of {tuple(NAMESPACES)}, "
                                   f"got {quant_type!r}")
    return f"quant_state.{NAMESPACES[quant_type]}__{quant_type}"


def quantized_layers(keys: Iterable[str]) -> list[str]:
    """The layers a state dict holds in 4 bits: each ``P`` with a key
    ``P.weight.quant_state.<anything>`` ("" for a bare ``weight.quant_state...``), sorted."""
    found = set()
    for key in keys:
        head, sep, tail = key.rpartition(_MARK)
        if sep and tail and "." not in tail and (not head or head.endswith(".")):
            found.add(head[:-1])
    return sorted(found)


# ------------------------------------------------------------------------- the JSON blob

def _blob_type(key: str, tail: str, fail: Fail) -> str:
    """The quant type a blob key names ("bitsandbytes__nf4" -> "nf4"), refusing unknown ones."""
    namespace, _, quant_type = tail.partition("__")
    if NAMESPACES.get(quant_type) != namespace:
        known = [blob_key(q).split(".", 1)[1] for q in NAMESPACES]
        raise fail(f"key {key!r} names quant state {tail!r}, an unknown quant_type; known: "
                   f"{known}")
    return quant_type


def _parse_blob(raw: bytes, key: str, quant_type: str, fail: Fail) -> dict:
    """The blob's fields, each type- and range-checked: ``quant_type``, ``blocksize``,
    ``dtype``, ``shape`` (a tuple) and, when double quantized, ``nested_blocksize``,
    ``nested_dtype`` and ``nested_offset`` (np.float32)."""
    try:
        meta = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise fail(f"key {key!r}: the quant-state blob is not UTF-8 (byte {exc.start}: "
                   f"{exc.reason})") from None
    except (ValueError, RecursionError) as exc:
        raise fail(f"key {key!r}: the quant-state blob is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise fail(f"key {key!r}: the quant-state blob must be a JSON object, got "
                   f"{type(meta).__name__}")
    nested = any(f in meta for f in _NESTED_FIELDS)
    want = _FIELDS + (_NESTED_FIELDS if nested else ())
    lacking = [f for f in want if f not in meta]
    unknown = sorted(set(meta) - set(want))
    if lacking or unknown:
        raise fail(f"key {key!r}: the quant-state blob lacks fields {lacking} and has unknown "
                   f"fields {unknown}; it needs {list(_FIELDS)} (and {list(_NESTED_FIELDS)} "
                   f"when double quantized), got {sorted(meta)}")
    if meta["quant_type"] != quant_type:
        raise fail(f"key {key!r}: the blob says quant_type {meta['quant_type']!r}, its key says "
                   f"{quant_type!r}")
    for f in ("blocksize", "nested_blocksize") if nested else ("blocksize",):
        try:
            check_blocksize(meta[f], f)
        except InvalidArgumentError as exc:
            raise fail(f"key {key!r}: {exc}") from None
    if meta["dtype"] not in FLOAT_DTYPES:
        raise fail(f"key {key!r}: dtype must be one of {FLOAT_DTYPES}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_NDIM or \
            not all(is_int(d) and d > 0 for d in shape):
        raise fail(f"key {key!r}: shape must be a list of 1 to {MAX_NDIM} positive ints, got "
                   f"{shape!r:.100}")
    meta["shape"] = tuple(shape)
    if nested:
        if meta["nested_dtype"] != "float32":
            raise fail(f"key {key!r}: nested_dtype must be 'float32' (the dtype of the absmax "
                       f"values), got {meta['nested_dtype']!r}")
        off = meta["nested_offset"]
        with np.errstate(over="ignore"):
            finite = isinstance(off, (int, float)) and not isinstance(off, bool) and \
                math.isfinite(off) and bool(np.isfinite(np.float32(off)))
        if not finite:
            raise fail(f"key {key!r}: nested_offset must be a finite float32 number, got "
                       f"{off!r:.60}")
        # a float32 written as a JSON number comes back exactly; anything else is rounded to
        # float32, as bitsandbytes' torch.tensor(float(...)) rounds it
        meta["nested_offset"] = np.float32(off)
    return meta


def _layout(meta: dict, weight: str) -> dict[str, tuple[str, tuple]]:
    """Every tensor key the blob implies (bar the blob) -> (dtype, allowed shapes)."""
    n = math.prod(meta["shape"])
    n_bytes = (n + 1) // 2
    n_blocks = -(-n // meta["blocksize"])
    nested = "nested_blocksize" in meta
    out = {weight: ("uint8", ((n_bytes, 1), (n_bytes,))),
           f"{weight}.absmax": ("uint8" if nested else "float32", ((n_blocks,),)),
           f"{weight}.quant_map": ("float32", ((16,),))}
    if nested:
        n2 = -(-n_blocks // meta["nested_blocksize"])
        out[f"{weight}.nested_absmax"] = ("float32", ((n2,),))
        out[f"{weight}.nested_quant_map"] = ("float32", ((256,),))
    return out


def _find_blob(keys: Iterable[str], weight: str, fail: Fail,
               found: Callable[[str], tuple | None]) -> str:
    """The one blob key among ``weight``'s keys (``found(key)``: (dtype name, shape) or None)."""
    blobs = [k for k in keys if k.startswith(f"{weight}.quant_state.")]
    if not blobs:
        qt = ", ".join(f"{weight}.{blob_key(q)}" for q in NAMESPACES)
        got = found(weight)
        what = f"; {weight!r} is {got[0]} {got[1]}" if got else ""
        raise fail(f"{weight!r} holds no 4-bit quant state: expected one key of {qt}{what} "
                   f"(a float weight is quantized by QuantLinear.from_linear, not loaded as one)")
    if len(blobs) > 1:
        raise fail(f"{weight!r} has {len(blobs)} quant-state blobs {sorted(blobs)}; a weight has "
                   f"exactly one")
    return blobs[0]


def _check_tensors(meta: dict, weight: str, blob: str, keys: Iterable[str],
                   found: Callable[[str], tuple[str, tuple]], fail: Fail) -> list[str]:
    """Each tensor of ``weight`` against the layout its blob implies: dtype and shape, none
    missing, none unexpected. ``found(key)`` gives (dtype name, shape). Returns the keys."""
    expected = _layout(meta, weight)
    mine = [k for k in keys if k == weight or k.startswith(weight + ".")]
    unexpected = sorted(set(mine) - set(expected) - {blob})
    if unexpected:
        raise fail(f"unexpected key {unexpected[0]!r} next to a {meta['quant_type']} weight "
                   f"({'double quantized' if 'nested_blocksize' in meta else 'no double quant'}"
                   f"); {weight!r} takes {sorted(expected)}")
    for key, (dtype, shapes) in expected.items():
        if key not in mine:
            raise fail(f"missing key {key!r} ({dtype} {shapes[0]}), which the quant state in "
                       f"{blob!r} needs (shape {list(meta['shape'])}, blocksize "
                       f"{meta['blocksize']})")
        got_dtype, got_shape = found(key)
        if got_dtype != dtype or got_shape not in shapes:
            raise fail(f"key {key!r} is {got_dtype} {got_shape}, but the quant state in {blob!r} "
                       f"(shape {list(meta['shape'])}, blocksize {meta['blocksize']}"
                       + (f", nested_blocksize {meta['nested_blocksize']}"
                          if "nested_blocksize" in meta else "")
                       + f") needs {dtype} {shapes[0]}")
    return [*expected, blob]


# ------------------------------------------------------------------------- dict -> QuantState

def _owned(x: Any, dtype: Any) -> Any:
    """``x`` as a backend array of its own (a copy: later changes to ``x`` do not reach it)."""
    a = B.asarray(x, dtype=dtype)
    return a.copy() if a is x or getattr(a, "base", None) is not None else a


def quant_state_from_bnb(state: Mapping[str, Any], prefix: str = "weight",
                         who: str = "quant_state_from_bnb") -> QuantState:
    """The :class:`QuantState` that the keys ``prefix``, ``prefix + ".absmax"``, ... of ``state``
    hold in bitsandbytes' layout (module docstring); its arrays are copies on the active backend.

    ``prefix`` is the weight's key ("h.0.attn.q_proj.weight"). Keys of other layers are ignored;
    one under ``prefix + "."`` that the layout does not name is refused, as bitsandbytes'
    ``QuantState.from_dict`` refuses it. The blob's sizes are checked against every array's dtype
    and shape before anything is allocated; then the 4-bit table (``quant_map``) must equal
    minilora's NF4/FP4/INT4 table and the 8-bit one (``nested_quant_map``) the dynamic map, by
    value, and absmax (float32), nested_absmax and the offset must be finite (the scales, also
    not negative). Raises
    StateDictError naming ``who``, the key and the values.
    """
    def fail(msg: str) -> StateDictError:
        return StateDictError(f"{who}: {msg}")

    def found(key: str) -> Any:
        if key not in state:
            return None
        arr = state[key]
        if not B.is_array(arr):
            raise fail(f"key {key!r} must be an array, got {type(arr).__name__}")
        return str(arr.dtype), tuple(arr.shape)

    blob = _find_blob(state, prefix, fail, found)
    quant_type = _blob_type(blob, blob.rsplit(".", 1)[1], fail)
    raw = state[blob]
    if not B.is_array(raw) or raw.dtype != np.uint8 or raw.ndim != 1 or \
            raw.size > MAX_BLOB_BYTES:
        got = f"{raw.dtype} {tuple(raw.shape)}" if B.is_array(raw) else type(raw).__name__
        raise fail(f"key {blob!r} must be a 1-D uint8 array of at most MAX_BLOB_BYTES = "
                   f"{MAX_BLOB_BYTES} bytes (UTF-8 JSON), got {got}")
    meta = _parse_blob(B.to_numpy(raw).tobytes(), blob, quant_type, fail)
    _check_tensors(meta, prefix, blob, state, found, fail)
    return _build(meta, {k: state[k] for k in _layout(meta, prefix)}, prefix, fail)


def _build(meta: dict, arrays: dict[str, Any], weight: str, fail: Fail) -> QuantState:
    """A checked QuantState from arrays whose dtypes and shapes fit ``meta`` (checked before)."""
    quant_type = meta["quant_type"]
    host = {k: B.to_numpy(v) for k, v in arrays.items()
            if k != weight and arrays[k].dtype == np.float32}  # the small float arrays
    tables = [(f"{weight}.quant_map", _TABLES[quant_type], f"minilora's {quant_type} table")]
    if "nested_blocksize" in meta:
        tables.append((f"{weight}.nested_quant_map", DYNAMIC_CODE, "the 8-bit dynamic map"))
    for key, table, what in tables:
        if not np.array_equal(host[key], table):
            bad = int(np.flatnonzero(~(host[key] == table))[0])
            raise fail(f"key {key!r} is not {what}: entry {bad} is {host[key][bad]!r}, expected "
                       f"{table[bad]!r}; a file made with another code table cannot be read "
                       f"with this one")
    for key in (f"{weight}.absmax", f"{weight}.nested_absmax"):
        if key in host and not np.isfinite(host[key]).all():
            i = int(np.flatnonzero(~np.isfinite(host[key]))[0])
            raise fail(f"key {key!r} holds a non-finite value ({host[key][i]!r} at block {i})")
        # each is a block's largest |value|: one below 0 is a corrupt file, and would turn the
        # block's weights around without a word
        if key in host and (host[key] < 0).any():
            i = int(np.flatnonzero(host[key] < 0)[0])
            raise fail(f"key {key!r} holds a negative scale ({host[key][i]!r} at block {i}); "
                       f"a block's absmax is its largest |value|, never below 0")
    nested = "nested_blocksize" in meta
    state = QuantState(
        packed=_owned(arrays[weight], np.uint8).reshape(-1),
        absmax=_owned(arrays[f"{weight}.absmax"], None), shape=meta["shape"],
        blocksize=int(meta["blocksize"]), quant_type=quant_type,
        offset=B.asarray(np.asarray(meta["nested_offset"], dtype=np.float32)) if nested else None,
        absmax2=_owned(arrays[f"{weight}.nested_absmax"], None) if nested else None,
        blocksize2=int(meta["nested_blocksize"]) if nested else 256)
    try:
        check_state(state, "quant_state_from_bnb")  # a second line of defence: cannot fail here
    except MiniLoraError as exc:
        raise fail(f"{weight!r}: {exc}") from None
    return state


# ------------------------------------------------------------------------- QuantState -> dict

def quant_state_to_bnb(state: QuantState, prefix: str = "weight",
                       dtype: str = "float32") -> dict[str, Any]:
    """``state`` in bitsandbytes' layout: ``{prefix: packed ((n + 1) // 2, 1) uint8,
    prefix + ".absmax": ..., prefix + ".quant_map": (16,), [".nested_absmax", ".nested_quant_map"],
    prefix + ".quant_state.<namespace>__<type>": the JSON blob}``, in bitsandbytes' key order.

    The arrays are backend arrays: the state's own (views, as a state dict's are), the tables and
    the blob fresh. ``dtype`` is what the blob says bitsandbytes should dequantize to.
    """
    check_state(state, "quant_state_to_bnb")
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"quant_state_to_bnb: dtype must be one of {FLOAT_DTYPES}, got "
                                   f"{dtype!r}")
    qt = state.quant_type
    meta: dict[str, Any] = {"quant_type": qt, "blocksize": int(state.blocksize), "dtype": dtype,
                            "shape": [int(d) for d in state.shape]}
    out = {prefix: state.packed.reshape(-1, 1), f"{prefix}.absmax": state.absmax,
           f"{prefix}.quant_map": B.asarray(_TABLES[qt].copy())}
    if state.nested:
        meta.update(nested_blocksize=int(state.blocksize2), nested_dtype="float32",
                    nested_offset=float(state.offset))
        out[f"{prefix}.nested_absmax"] = state.absmax2
        out[f"{prefix}.nested_quant_map"] = B.asarray(DYNAMIC_CODE.copy())
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    out[f"{prefix}.{blob_key(qt)}"] = B.asarray(blob)
    return out


# ------------------------------------------------------------------------- safetensors files

_DTYPE_NAMES = {k: ("bfloat16" if k == "BF16" else "bool" if k == "BOOL" else np.dtype(v[0]).name)
                for k, v in DTYPES.items()}


def check_quantized_file(path: str | os.PathLike, infos: Mapping[str, TensorInfo],
                         who: str) -> set[str]:
    """Check a safetensors file's 4-bit layers from its header ``infos`` (from
    ``tensorfile.read_header``) and their blobs alone; returns every key of those layers.

    Each layer's blob must be a small 1-D U8 tensor (checked in the header before it is read);
    its fields are checked, and every tensor of the layer must have the dtype and shape they
    imply (the module docstring's layout). Integer tensors anywhere else are refused: floats
    belong there. After this, reading the whole file allocates only what the 4-bit layers
    really need. Raises CheckpointError naming ``who``, the file and the key.
    """
    path = str(path)

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{who}: {path!r}: {msg}")

    def found(key: str) -> Any:
        info = infos.get(key)
        return None if info is None else (_DTYPE_NAMES[info.dtype], info.shape)

    layers = quantized_layers(infos)
    blobs = {}
    for layer in layers:
        weight = f"{layer}.weight" if layer else "weight"
        blob = _find_blob(infos, weight, fail, found)
        info = infos[blob]
        if info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > MAX_BLOB_BYTES:
            raise fail(f"key {blob!r} must be a 1-D U8 tensor of at most MAX_BLOB_BYTES = "
                       f"{MAX_BLOB_BYTES} bytes (UTF-8 JSON), the header says {info.dtype} "
                       f"{list(info.shape)}")
        blobs[weight] = (blob, _blob_type(blob, blob.rsplit(".", 1)[1], fail))
    raw = read_tensors(path, who, names=[b for b, _ in blobs.values()], float_dtype=None,
                       floats_only=False) if blobs else {}
    keys: set[str] = set()
    for weight, (blob, quant_type) in blobs.items():
        meta = _parse_blob(raw[blob].tobytes(), blob, quant_type, fail)
        keys.update(_check_tensors(meta, weight, blob, infos, found, fail))
    ints = sorted(k for k, info in infos.items() if not info.is_float and k not in keys)
    if ints:
        k = ints[0]
        raise fail(f"tensor {k!r} has dtype {infos[k].dtype}, where floats belong (F16, BF16, "
                   f"F32 or F64); integer tensors are read only as the codes of a 4-bit layer "
                   f"(next to a '{_MARK}<type>' blob)")
    return keys


__all__ = ["NAMESPACES", "MAX_BLOB_BYTES", "FLOAT_DTYPES", "blob_key", "quantized_layers",
           "quant_state_from_bnb", "quant_state_to_bnb", "check_quantized_file"]
