"""Reading safetensors and JSON files that are distrusted until checked (no pickle, no trust),
and the bytes that writing them takes.

A safetensors file is

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON header][data buffer]

with the header ``{name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``; offsets count from the start of the data buffer, and the tensors
tile it exactly (no gaps, no overlaps, nothing after the last one), little-endian, row-major.

Every size the file claims is checked against the others and against the bytes actually present
*before* anything is allocated: N against :data:`MAX_HEADER_BYTES` and the file size, each
tensor's byte count against its shape and dtype (Python ints: no overflow), its offsets against
the data buffer, and the whole file against :func:`max_file_bytes`. A forged header can therefore
make minilora allocate no more than the file really holds. Every refusal is a
:class:`~minilora.errors.CheckpointError` naming the file, the tensor or field, what it claims and
what was expected (for a limit: its name and value).

Float tensors (F16, BF16, F32, F64) are converted to the float dtype the caller asks for; integer
and bool tensors are refused where floats belong. The JSON half (:func:`read_json`,
:func:`json_field`) gives the same care to config files: ``"false"`` is not a boolean, ``true`` is
not a number.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .errors import CheckpointError, ConfigError, InvalidArgumentError, check_int, is_int

# The limits. safetensors' own reader caps the header at 100,000,000 bytes; GPT-2 XL's header is
# about 60 KB. Files: GPT-2 XL in float32 is 6.4 GB, so 16 GiB leaves room and refuses absurd
# sizes; MINILORA_MAX_FILE_BYTES changes it for bigger models.
MAX_HEADER_BYTES = 100_000_000
MAX_FILE_BYTES = 16 * 2**30
MAX_FILE_BYTES_ENV = "MINILORA_MAX_FILE_BYTES"
MAX_JSON_BYTES = 64 * 2**20  # configs are kilobytes; a training history a few megabytes
MAX_NDIM = 32  # NumPy's limit before 2.0

# safetensors dtype -> (NumPy dtype as stored, little-endian; is it a float?). BF16 is read as
# its raw 16 bits and widened by hand (NumPy has no bfloat16).
DTYPES: dict[str, tuple[str, bool]] = {
    "F64": ("<f8", True), "F32": ("<f4", True), "F16": ("<f2", True), "BF16": ("<u2", True),
    "I64": ("<i8", False), "I32": ("<i4", False), "I16": ("<i2", False), "I8": ("i1", False),
    "U64": ("<u8", False), "U32": ("<u4", False), "U16": ("<u2", False), "U8": ("u1", False),
    "BOOL": ("u1", False),
}
_BIN_HINT = ("minilora reads only safetensors, never pickle; re-save with "
             "save_pretrained(..., safe_serialization=True)")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``dtype`` as safetensors spells it ("F32", "BF16", ...), ``shape``, and
    its bytes ``[begin, end)`` counted from the start of the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the file: end - begin."""
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        """True for F16, BF16, F32 and F64."""
        return DTYPES[self.dtype][1]


def max_file_bytes() -> int:
    """The largest safetensors file read: :data:`MAX_FILE_BYTES`, or the int in the environment
    variable MINILORA_MAX_FILE_BYTES when it is set (read at each call)."""
    raw = os.environ.get(MAX_FILE_BYTES_ENV)
    if raw is None:
        return MAX_FILE_BYTES
    try:
        value: Any = int(raw)
    except ValueError:
        value = raw
    return check_int(value, f"{MAX_FILE_BYTES_ENV} (bytes)", error=ConfigError)


def _gib(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.3g} GiB)"


def _fail(who: str, path: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{who}: {str(path)!r}: {msg}")


def _regular_file(path: str, who: str, what: str) -> int:
    """The size of the regular file at ``path``; CheckpointError otherwise (with a hint when a
    pickled .bin file lies where a safetensors file was expected)."""
    path = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
        bins = [n for n in ("pytorch_model.bin", "adapter_model.bin", stem + ".bin")
                if what == "safetensors" and os.path.isfile(os.path.join(folder, n))]
        hint = f" (found {bins[0]}: {_BIN_HINT})" if bins else ""
        raise CheckpointError(f"{who}: {path!r} is missing{hint}") from None
    except OSError as exc:
        raise CheckpointError(f"{who}: {path!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{who}: {path!r} is {kind}, expected a {what} file")
    return st.st_size


def _pickle_hint(head: bytes) -> str:
    """Why 8 bytes that do not look like a header might: PyTorch's .bin formats."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return f" (the file starts like a PyTorch zip/pickle file: {_BIN_HINT})"
    return ""


# ---------------------------------------------------------------------------- safetensors

def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice (ValueError): json
    keeps the last one, another reader may keep the first, so the file means two things."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:  # json keeps the last one; another reader may keep the first
            raise ValueError(f"the key {key!r} appears twice")
        obj[key] = value
    return obj


def _entry(name: str, raw: Any, data_len: int, who: str, path: str) -> TensorInfo:
    """One header entry, every field type-checked and its byte count checked against its shape."""
    def bad(msg: str) -> CheckpointError:
        return _fail(who, path, f"tensor {name!r}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"the header entry must be an object, got {raw!r}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in raw]
    if missing:
        raise bad(f"the header entry lacks {missing} (it has {sorted(raw)})")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is unknown or unsupported; supported: {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise bad(f"shape has {len(shape)} dimensions, more than MAX_NDIM = {MAX_NDIM}")
    if math.prod(d for d in shape if d) >= 2**62:  # with a 0 among them it is 0 bytes, but
        # NumPy refuses the shape all the same ("array is too big"): no array is that long
        raise bad(f"shape {shape} has dimensions whose product is more than any array can hold")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets must be two ints 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    want = math.prod(shape) * itemsize  # Python ints: a forged shape cannot overflow
    if end - begin != want:
        raise bad(f"data_offsets {offsets} span {end - begin:,} bytes, but shape {shape} of "
                  f"{dtype} needs {want:,} ({itemsize} bytes per element)")
    if end > data_len:
        raise bad(f"data_offsets {offsets} reach beyond the data buffer, which holds "
                  f"{data_len:,} bytes: the file is truncated or its header forged")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _parse(path: str, who: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """(infos, metadata, where the data buffer starts) of a safetensors file, all checked."""
    path = str(path)
    size = _regular_file(path, who, "safetensors")
    if size < 8:
        raise _fail(who, path, f"has {size} bytes; a safetensors file starts with an 8-byte "
                               f"header length: truncated or not safetensors")
    limit = max_file_bytes()
    if size > limit:
        raise _fail(who, path, f"has {_gib(size)}, more than MAX_FILE_BYTES = {_gib(limit)}; "
                               f"set {MAX_FILE_BYTES_ENV} to read larger files")
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _fail(who, path, f"claims a header of {n:,} bytes, more than "
                                   f"MAX_HEADER_BYTES = {MAX_HEADER_BYTES:,}{_pickle_hint(head)}")
        if 8 + n > size:
            raise _fail(who, path, f"claims a header of {n:,} bytes, but only {size - 8:,} bytes "
                                   f"follow the length: truncated{_pickle_hint(head)}")
        raw = f.read(n)
    if len(raw) != n:  # the file shrank under us
        raise _fail(who, path, f"the header is {len(raw):,} bytes, {n:,} claimed")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise _fail(who, path, f"the header is not UTF-8 (byte {8 + exc.start} of the file: "
                               f"{exc.reason}){_pickle_hint(head)}") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(who, path, f"the header is not valid JSON ({exc}){_pickle_hint(head)}") \
            from None
    if not isinstance(header, dict):
        raise _fail(who, path, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(who, path, f"__metadata__ must be an object of strings, got {metadata!r}")
    data_len = size - 8 - n
    infos = {name: _entry(name, entry, data_len, who, path) for name, entry in header.items()}
    # the tensors must tile the data buffer: no overlap (two tensors sharing bytes), no gap and
    # nothing after the last one (room for a second, hidden payload), as safetensors requires
    at = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != at:
            what = "overlaps the tensor before it" if info.begin < at else "leaves a gap"
            raise _fail(who, path, f"tensor {info.name!r} at data_offsets [{info.begin}, "
                                   f"{info.end}] {what}: the previous tensor ends at {at}")
        at = info.end
    if at != data_len:
        raise _fail(who, path, f"the tensors end at byte {at:,} of the data buffer but the file "
                               f"holds {data_len - at:,} more bytes after them")
    return infos, metadata, 8 + n


def read_header(path: str | os.PathLike, who: str) -> tuple[dict[str, TensorInfo], dict]:
    """``({name: TensorInfo}, metadata)`` of the safetensors file at ``path``, checked whole
    (module docstring) after reading only its first 8 + N bytes. ``who`` starts every error
    message (the function a user called). Raises CheckpointError."""
    infos, metadata, _ = _parse(str(path), who)
    return infos, metadata


def _check_expected(infos: dict[str, TensorInfo], selected: list[str],
                    expected: dict[str, tuple], who: str, path: str) -> None:
    missing = [k for k in expected if k not in infos]
    if missing:
        raise _fail(who, path, f"lacks key {missing[0]!r} (expected shape "
                               f"{tuple(expected[missing[0]])}; {len(missing)} keys missing)")
    unexpected = [k for k in selected if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise _fail(who, path, f"has unexpected key {k!r} (shape {infos[k].shape}; "
                               f"{len(unexpected)} such keys)")
    for k, shape in expected.items():
        if infos[k].shape != tuple(shape):
            raise _fail(who, path, f"key {k!r} has shape {infos[k].shape}, expected "
                                   f"{tuple(shape)}")


def _read_exact(f: Any, info: TensorInfo, start: int, who: str, path: str) -> np.ndarray:
    """The tensor's bytes as a uint8 array of exactly ``info.nbytes`` (checked: the header
    proved them present, but the file may have changed since)."""
    raw = np.empty(info.nbytes, dtype=np.uint8)
    f.seek(start + info.begin)
    view, got = memoryview(raw), 0
    while got < info.nbytes:  # one read(2) returns at most about 2 GiB
        k = f.readinto(view[got:])
        if not k:
            raise _fail(who, path, f"tensor {info.name!r}: only {got:,} of its {info.nbytes:,} "
                                   f"bytes could be read")
        got += k
    return raw


def _decode(raw: np.ndarray, info: TensorInfo, float_dtype: Any, who: str,
            path: str) -> np.ndarray:
    """Stored bytes -> a native-order array of the tensor's shape (floats to ``float_dtype``)."""
    stored = np.dtype(DTYPES[info.dtype][0])
    arr = raw.view(stored).reshape(info.shape)
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif info.dtype == "BOOL":
        arr = arr != 0
    if not arr.dtype.isnative:  # only on a big-endian host
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if float_dtype is not None and arr.dtype != float_dtype:
        arr, overflowed = _narrowed(arr, float_dtype)
        if overflowed:
            raise _fail(who, path, f"tensor {info.name!r} ({info.dtype}) holds values beyond "
                                   f"the range of {arr.dtype} (max {np.finfo(arr.dtype).max:.4g})"
                                   f"; read it as float64")
    return arr


def _narrowed(values: np.ndarray, dtype: Any) -> tuple[np.ndarray, bool]:
    """``values`` cast to the float ``dtype``, and whether the cast made a finite value inf:
    float64 -> float32 turns values beyond 3.4e38 into inf, another number, which a loader
    refuses."""
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    return cast, cast.dtype.itemsize < values.dtype.itemsize and \
        not np.array_equal(np.isinf(cast), np.isinf(values))


def nonfinite_keys(arrays: dict[str, Any]) -> list[str]:
    """The keys of the host arrays in ``arrays`` that hold a NaN or an inf, in order: what a
    writer refuses to put over a good save and a reader says it loaded."""
    return [k for k, a in arrays.items() if not np.isfinite(a).all()]


def overflows_when_cast(values: Any, dtype: Any) -> bool:
    """True when the host float array ``values`` holds finite numbers beyond the range of the
    narrower float ``dtype`` (a float64 1e300 read into a float32 model), as :func:`read_tensors`
    refuses them: for a loader that reads tensors as stored and casts them later. False for
    anything else (device arrays, integers, a dtype as wide or wider)."""
    target = np.dtype(dtype)
    if not isinstance(values, np.ndarray) or values.dtype.kind != "f" or target.kind != "f" or \
            target.itemsize >= values.dtype.itemsize:
        return False
    return _narrowed(values, target)[1]


def read_tensors(path: str | os.PathLike, who: str, *, names: Iterable[str] | None = None,
                 float_dtype: Any = np.float32,
                 expected_shapes: dict[str, tuple] | None = None,
                 floats_only: bool | None = None) -> dict[str, np.ndarray]:
    """``{name: host array}`` of a safetensors file, read without pickle and without trust.

    ``names`` selects the tensors to read (each must be there; default: all). ``expected_shapes``
    ``{name: shape}``, when given, must list exactly the selected tensors with their shapes in
    the header; this is checked, like the dtypes, before any tensor data is read. Float tensors
    (F16, BF16, F32, F64) become ``float_dtype``, and then integer and bool tensors are refused;
    with ``float_dtype=None`` every tensor comes as stored (BF16 as float32). ``floats_only``
    (default: ``float_dtype is not None``) refuses integer and bool tensors, also when floats keep
    their stored precision. Raises CheckpointError naming the file and the key.
    """
    path = str(path)
    if float_dtype is not None:
        float_dtype = np.dtype(float_dtype)
        if float_dtype.kind != "f":
            raise InvalidArgumentError(f"{who}: float_dtype must be a float dtype or None, got "
                                       f"{float_dtype}")
    infos, _, start = _parse(path, who)
    selected = list(infos) if names is None else list(dict.fromkeys(names))
    absent = [k for k in selected if k not in infos]
    if absent:
        raise _fail(who, path, f"lacks key {absent[0]!r} ({len(absent)} keys missing; it has "
                               f"{len(infos)} tensors)")
    if expected_shapes is not None:
        _check_expected(infos, selected, expected_shapes, who, path)
    if floats_only if floats_only is not None else float_dtype is not None:
        ints = [k for k in selected if not infos[k].is_float]
        if ints:
            k = ints[0]
            raise _fail(who, path, f"tensor {k!r} has dtype {infos[k].dtype}, where floats "
                                   f"belong (F16, BF16, F32 or F64); it cannot be converted "
                                   f"without changing its meaning")
    out = {}
    with open(path, "rb") as f:
        for k in selected:
            out[k] = _decode(_read_exact(f, infos[k], start, who, path), infos[k], float_dtype,
                             who, path)
    return out


def safetensors_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``{name: host array}`` as the bytes of a safetensors file (metadata {"format": "pt"}, so
    that transformers and PEFT load it); each array is made C-contiguous first."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={"format": "pt"})


# ------------------------------------------------------------------------------------ JSON

def _not_json(name: str) -> Any:
    """``json.loads``' ``parse_constant``: Python reads NaN and Infinity, which JSON has not."""
    raise ValueError(f"{name} is not a JSON number; a number must be finite")


def read_json(path: str | os.PathLike, who: str) -> dict:
    """The JSON object in the file at ``path``; CheckpointError naming the file when it is
    missing, not a regular file, over :data:`MAX_JSON_BYTES`, not UTF-8 (with the byte offset),
    not valid JSON (NaN and Infinity, which Python writes and JSON has not, included), gives a
    key twice in one object, or is not an object. A UTF-8 byte-order mark is allowed."""
    path = str(path)
    size = _regular_file(path, who, "JSON")
    if size > MAX_JSON_BYTES:
        raise _fail(who, path, f"has {size:,} bytes, more than MAX_JSON_BYTES = "
                               f"{MAX_JSON_BYTES:,}: not a config file")
    with open(path, "rb") as f:  # read(n) allocates n bytes first: ask for what is there
        raw = f.read(min(size, MAX_JSON_BYTES) + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise _fail(who, path, f"grew past MAX_JSON_BYTES = {MAX_JSON_BYTES:,} while read")
    try:
        obj = json.loads(raw.decode("utf-8-sig"), parse_constant=_not_json,
                         object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise _fail(who, path, f"is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(who, path, f"is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _fail(who, path, f"must hold a JSON object, got {type(obj).__name__}")
    return obj


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the UTF-8 bytes of indented JSON with sorted keys and a final newline, as
    transformers and PEFT write their configs; NaN and inf, which JSON has not, are refused."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


REQUIRED: Any = object()  # json_field's default when the field must be present
_KINDS = {bool: "a JSON boolean (true or false)", int: "an integer", float: "a number",
          str: "a string", list: "a list", dict: "an object"}


def json_field(obj: dict, key: str, kind: type, where: str, default: Any = REQUIRED) -> Any:
    """``obj[key]`` when it has the JSON type ``kind`` (bool, int, float = any number, str, list,
    dict), else a ConfigError ``"{where}: {key} must be <kind>, got <value>"``.

    Booleans are not numbers and numbers are not booleans (``"false"``, ``0`` and ``1.0`` are
    refused for a bool field, ``true`` and ``8.0`` for an int one). A missing key, or null,
    gives ``default``; without a default it is an error.
    """
    if kind not in _KINDS:
        raise InvalidArgumentError(f"json_field: kind must be one of "
                                   f"{[k.__name__ for k in _KINDS]}, got {kind!r}")
    value = obj.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"{where}: {key} must be {_KINDS[kind]}, got "
                              f"{'null' if key in obj else 'nothing (the field is missing)'}")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, int if kind is int else (int, float)) and \
            not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_KINDS[kind]}, got {value!r}")
    return value


__all__ = ["TensorInfo", "DTYPES", "MAX_HEADER_BYTES", "MAX_FILE_BYTES", "MAX_FILE_BYTES_ENV",
           "MAX_JSON_BYTES", "MAX_NDIM", "REQUIRED", "max_file_bytes", "read_header",
           "read_tensors", "read_json", "json_field", "json_bytes", "safetensors_bytes",
           "no_duplicate_keys", "nonfinite_keys", "overflows_when_cast"]
