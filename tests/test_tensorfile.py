"""tensorfile: safetensors and JSON read without trust.

Round trips against the safetensors package for every dtype, bfloat16 against torch and by hand,
and one test per kind of forged file: each must be refused with a CheckpointError that names the
file, the field and the sizes, before anything large is allocated.
"""

import json
import os
import struct
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save as st_save

from minilora import tensorfile as tf
from minilora.errors import CheckpointError, ConfigError

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint64,
          np.uint32, np.uint16, np.uint8, np.bool_]
FLOATS = [np.float64, np.float32, np.float16]


def forge(path, header, data=b"", n=None):
    """Write a safetensors-like file by hand: length ``n`` (default: the header's), header
    (a dict, or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def refused(path, *words, call=tf.read_tensors, **kwargs):
    """The CheckpointError ``call`` raises on ``path``; its message names the file and words."""
    with pytest.raises(CheckpointError) as info:
        call(path, "test_read", **kwargs)
    msg = str(info.value)
    assert msg.startswith("test_read: ") and str(path) in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def sparse(path, size):
    """A file of ``size`` bytes that takes no disk space (skip where holes are not supported)."""
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(size)
    if os.stat(path).st_blocks * 512 > 2**24:
        pytest.skip("this file system does not keep sparse files")
    return path


# ------------------------------------------------------------------------------ round trips

arrays = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))


@given(st.dictionaries(st.text("abc.01_", min_size=1, max_size=6), arrays, min_size=0,
                       max_size=4),
       st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.text(max_size=5), max_size=2))
def test_round_trip_of_every_dtype_against_the_safetensors_package(tensors, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        with open(path, "wb") as f:
            f.write(st_save(tensors, metadata=metadata or None))
        infos, meta = tf.read_header(path, "test")
        back = tf.read_tensors(path, "test", float_dtype=None)
    assert meta == metadata and sorted(back) == sorted(infos) == sorted(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        assert back[name].tobytes() == a.tobytes(), name  # bit for bit: NaNs and -0.0 too
        assert infos[name].shape == a.shape and infos[name].nbytes == a.nbytes


def float_arrays(dt):
    """Arrays of dtype ``dt`` whose values float32 can hold (every kind of float, NaN, inf)."""
    width = min(32, 8 * np.dtype(dt).itemsize)
    return hnp.arrays(dt, hnp.array_shapes(max_dims=2), elements=st.floats(width=width))


@given(st.sampled_from(FLOATS).flatmap(float_arrays), st.sampled_from([np.float32, np.float64]))
def test_floats_are_converted_to_the_float_dtype_asked_for(a, float_dtype):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        with open(path, "wb") as f:
            f.write(st_save({"w": a}))
        back = tf.read_tensors(path, "test", float_dtype=float_dtype)["w"]
    assert back.dtype == float_dtype and back.flags.writeable
    np.testing.assert_array_equal(back, a.astype(float_dtype))


def test_float64_beyond_float32s_range_is_refused_not_made_infinite(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(st_save({"w": np.array([1.0, 1e300, -np.inf])}))
    refused(path, "tensor 'w'", "beyond the range of float32", "float64")
    np.testing.assert_array_equal(tf.read_tensors(path, "test", float_dtype=np.float64)["w"],
                                  [1.0, 1e300, -np.inf])


def test_bfloat16_is_widened_by_hand():
    # bfloat16 is the top 16 bits of a float32: sign, 8 exponent bits, 7 mantissa bits
    bits = {0x3F80: 1.0, 0xC000: -2.0, 0x4049: 3.140625, 0x7F80: np.inf, 0x0001: 2.0 ** -133,
            0x8000: -0.0, 0x3E20: 0.15625}
    raw = np.array(list(bits), dtype="<u2").tobytes()
    path = forge(os.path.join(tempfile.mkdtemp(), "bf16.safetensors"),
                 {"w": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, len(raw)]}},
                 raw)
    got = tf.read_tensors(path, "test", float_dtype=None)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(list(bits.values()), dtype=np.float32))
    assert np.signbit(got[5])
    assert tf.read_tensors(path, "test", float_dtype=np.float64)["w"].dtype == np.float64


def test_bfloat16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 100).to(torch.bfloat16)
    save_file({"w": t, "v": t[0].clone()}, tmp_path / "bf16.safetensors")
    got = tf.read_tensors(tmp_path / "bf16.safetensors", "test")
    np.testing.assert_array_equal(got["w"], t.float().numpy())
    np.testing.assert_array_equal(got["v"], t[0].float().numpy())


def test_names_select_tensors_and_a_missing_name_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(st_save({"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}))
    assert list(tf.read_tensors(path, "test", names=["b"])) == ["b"]
    refused(path, "lacks key 'c'", names=["b", "c"])


def test_expected_shapes_are_checked_against_the_header(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(st_save({"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}))
    ok = tf.read_tensors(path, "test", expected_shapes={"a": (3,), "b": [2, 2]})
    assert ok["b"].shape == (2, 2)
    refused(path, "'b'", "(2, 2)", "(4,)", expected_shapes={"a": (3,), "b": (4,)})
    refused(path, "lacks key 'c'", "(5,)", expected_shapes={"a": (3,), "b": (2, 2), "c": (5,)})
    refused(path, "unexpected key 'b'", "(2, 2)", expected_shapes={"a": (3,)})
    assert list(tf.read_tensors(path, "test", names=["a"], expected_shapes={"a": (3,)})) == ["a"]


# ------------------------------------------------------------------------------ forged files

def test_a_missing_file_a_directory_and_a_pickle_beside_it(tmp_path):
    refused(tmp_path / "model.safetensors", "is missing", call=tf.read_header)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    refused(tmp_path / "model.safetensors", "pytorch_model.bin", "only safetensors")
    refused(tmp_path, "is a directory")


def test_a_pickle_in_place_of_safetensors_gets_the_hint(tmp_path):
    zipped = tmp_path / "zip.safetensors"
    zipped.write_bytes(b"PK\x03\x04\x14\x00\x00\x00" + b"\x00" * 100)  # torch.save's zip
    refused(zipped, "MAX_HEADER_BYTES", "only safetensors")
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(b"\x80\x02}q\x00(X\x01\x00" + b"\x00" * 100)  # pickle protocol 2
    refused(pickled, "only safetensors")


def test_a_truncated_file(tmp_path):
    short = tmp_path / "five.safetensors"
    short.write_bytes(b"\x10\x00\x00\x00\x00")
    refused(short, "5 bytes", "8-byte header length")
    whole = st_save({"w": np.arange(100, dtype=np.float32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[:-40])  # the last ten floats are gone
    refused(cut, "tensor 'w'", "[0, 400]", "beyond the data buffer", "360 bytes")


def test_a_header_length_beyond_the_file(tmp_path):
    path = forge(tmp_path / "t.safetensors", b'{"__metadata__": {}}', n=1000)
    refused(path, "1,000 bytes", "only 20 bytes follow")


def test_a_header_length_over_the_limit(tmp_path):
    # the file really is that long (sparse), so only the limit stops a 100 MB header read
    path = sparse(forge(tmp_path / "t.safetensors", b"", n=tf.MAX_HEADER_BYTES + 1),
                  tf.MAX_HEADER_BYTES + 100)
    msg = refused(path, "MAX_HEADER_BYTES", f"{tf.MAX_HEADER_BYTES:,}", call=tf.read_header)
    assert f"{tf.MAX_HEADER_BYTES + 1:,}" in msg


@pytest.mark.parametrize("raw, words", [
    (b"{not json}", ["not valid JSON"]),
    (b'{"w": \xff\xfe}', ["not UTF-8", "byte 14"]),
    (b"[1, 2]", ["must be a JSON object", "list"]),
    (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
     b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', ["'a' appears twice"]),
    (b'{"__metadata__": {"format": 3}}', ["__metadata__", "strings"]),
    (b'{"w": [1, 2]}', ["tensor 'w'", "must be an object"]),
    (b'{"w": {"dtype": "F32", "shape": [0]}}', ["tensor 'w'", "lacks ['data_offsets']"]),
])
def test_a_header_that_is_not_a_safetensors_header(tmp_path, raw, words):
    refused(forge(tmp_path / "t.safetensors", raw), *words, call=tf.read_header)


@pytest.mark.parametrize("dtype", ["Q4", "F8_E4M3", "f32", 5])
def test_an_unknown_dtype(tmp_path, dtype):
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 1]}}, b"\x00")
    refused(path, "tensor 'w'", f"dtype {dtype!r}", "'F32'", call=tf.read_header)


@pytest.mark.parametrize("shape", [[True, 2], [2.0], [-1], ["2"], 4, [1] * 33])
def test_a_shape_that_is_not_a_list_of_sizes(tmp_path, shape):
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}}, b"\x00\x00")
    refused(path, "tensor 'w'", "shape", call=tf.read_header)


@pytest.mark.parametrize("offsets, words", [
    ([0, 12], ["span 12 bytes", "[2, 2] of F32 needs 16"]),
    ([0, 20], ["span 20 bytes", "needs 16"]),
    ([4, 0], ["begin <= end"]), ([0, True], ["two ints"]), ([0, 16.0], ["two ints"]),
    ([0], ["two ints"]), ([-4, 12], ["two ints"]),
])
def test_offsets_that_do_not_match_the_shape(tmp_path, offsets, words):
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": offsets}}, bytes(24))
    refused(path, "tensor 'w'", *words, call=tf.read_header)


def test_a_huge_shape_cannot_overflow_the_byte_count(tmp_path):
    # 2^32 * 2^32 elements wrap to 0 in int64; in Python ints they need 2^66 bytes
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": "F32", "shape": [2**31, 2**30], "data_offsets": [0, 0]}})
    refused(path, "tensor 'w'", "span 0 bytes", f"{2**63:,}", call=tf.read_header)
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    refused(path, "tensor 'w'", "more than any array can hold", call=tf.read_header)


def test_a_zero_byte_shape_no_array_can_have_is_refused(tmp_path):
    """[0, 2^62, 2^62] is 0 bytes, so the byte checks passed; NumPy then said only "array is
    too big" when the tensor was read."""
    path = forge(tmp_path / "t.safetensors",
                 {"w": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}})
    for call in (tf.read_header, tf.read_tensors):
        refused(path, "tensor 'w'", "more than any array can hold", call=call)


@pytest.mark.parametrize("b_offsets, words", [
    ([8, 24], ["tensor 'b'", "overlaps", "ends at 16"]),
    ([0, 16], ["overlaps"]),
    ([20, 36], ["tensor 'b'", "leaves a gap"]),
])
def test_tensors_must_tile_the_data_without_overlap_or_gap(tmp_path, b_offsets, words):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": b_offsets}}
    path = forge(tmp_path / "t.safetensors", header, bytes(b_offsets[1]))
    refused(path, *words, call=tf.read_header)


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(st_save({"w": np.ones(4, np.float32)}) + b"hidden payload")
    refused(path, "14 more bytes", call=tf.read_header)


def test_data_missing_from_a_64_gib_sparse_file(tmp_path, monkeypatch):
    # the header claims 4 TiB of float32; the file is 64 GiB of holes. Only the check of the
    # claim against the bytes present stops this (the file limit is lifted for the test).
    monkeypatch.setenv(tf.MAX_FILE_BYTES_ENV, str(2**50))
    header = {"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}
    path = sparse(forge(tmp_path / "t.safetensors", header), 2**36)
    start = time.perf_counter()
    refused(path, "tensor 'w'", f"[0, {2**42}]", "beyond the data buffer", call=tf.read_tensors)
    assert time.perf_counter() - start < 5


def test_a_consistent_64_gib_sparse_file_is_stopped_by_the_limit_or_the_expected_shapes(
        tmp_path, monkeypatch):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**34],
                               "data_offsets": [0, 2**36]}}).encode()
    path = sparse(forge(tmp_path / "t.safetensors", header), 8 + len(header) + 2**36)
    monkeypatch.delenv(tf.MAX_FILE_BYTES_ENV, raising=False)
    refused(path, "MAX_FILE_BYTES", f"{tf.MAX_FILE_BYTES:,}", tf.MAX_FILE_BYTES_ENV,
            call=tf.read_header)
    monkeypatch.setenv(tf.MAX_FILE_BYTES_ENV, str(2**37))
    infos, _ = tf.read_header(path, "test_read")  # nothing wrong with the file itself
    assert infos["w"].shape == (2**34,)
    start = time.perf_counter()
    refused(path, "'w'", f"({2**34},)", "(10, 10)", expected_shapes={"w": (10, 10)})
    refused(path, "lacks key 'b'", names=["b"])
    assert time.perf_counter() - start < 5
    monkeypatch.setenv(tf.MAX_FILE_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match="MINILORA_MAX_FILE_BYTES.*'lots'"):
        tf.read_header(path, "test_read")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_integers_where_floats_belong_are_refused(tmp_path, dtype):
    path = tmp_path / "t.safetensors"
    values = np.array([[1, 0], [1, 1]], dtype=dtype)
    path.write_bytes(st_save({"ok": np.ones(2, np.float32), "w": values}))
    name = {np.int8: "I8", np.int32: "I32", np.uint8: "U8", np.bool_: "BOOL"}[dtype]
    refused(path, "tensor 'w'", f"dtype {name}", "floats belong")
    got = tf.read_tensors(path, "test", float_dtype=None)["w"]  # as stored, when asked
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, values)


def test_float_dtype_must_be_a_float(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(st_save({"w": np.ones(2, np.float32)}))
    with pytest.raises(ValueError, match="float_dtype"):
        tf.read_tensors(path, "test", float_dtype=np.int32)


# ------------------------------------------------------------------------------------ JSON

def test_read_json_reads_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"r": 8, "x": [1, None]}).encode())
    assert tf.read_json(path, "test") == {"r": 8, "x": [1, None]}


@pytest.mark.parametrize("content, words", [
    (b'{"r": "caf\xe9"}', ["not UTF-8", "byte 10"]),
    (b'{"r": 8,}', ["not valid JSON"]),
    (b'[{"r": 8}]', ["JSON object", "list"]),
    (b"[" * 100_000, ["not valid JSON"]),  # deep nesting: a RecursionError in json
    (b'{"lr": NaN}', ["NaN is not a JSON number"]),  # Python's json reads it; JSON has no NaN
    (b'{"r": [Infinity]}', ["Infinity is not a JSON number"]),
    (b'{"r": -Infinity}', ["-Infinity is not a JSON number"]),
    (b'{"r": 8, "a": {"x": 1, "x": 2}}', ["key 'x' appears twice"]),
    (b'{"r": 8, "r": 65536}', ["key 'r' appears twice"]),
])
def test_read_json_refusals(tmp_path, content, words):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    refused(path, *words, call=tf.read_json)


def test_read_json_allocates_what_the_file_holds_not_its_limit(tmp_path):
    import tracemalloc

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"r": 8}))
    tracemalloc.start()
    try:
        assert tf.read_json(path, "test") == {"r": 8}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < tf.MAX_JSON_BYTES // 16, peak  # it read MAX_JSON_BYTES + 1 (64 MiB) at first


def test_read_json_refuses_missing_directories_and_huge_files(tmp_path):
    refused(tmp_path / "none.json", "is missing", call=tf.read_json)
    refused(tmp_path, "is a directory", call=tf.read_json)
    big = sparse(tmp_path / "big.json", tf.MAX_JSON_BYTES + 1)
    refused(big, "MAX_JSON_BYTES", f"{tf.MAX_JSON_BYTES:,}", call=tf.read_json)


@pytest.mark.parametrize("kind, value", [
    (bool, True), (bool, False), (int, 8), (int, -3), (float, 16), (float, 0.5), (str, "none"),
    (list, ["q"]), (dict, {}),
])
def test_json_field_returns_values_of_the_right_kind(kind, value):
    assert tf.json_field({"f": value}, "f", kind, "where") is value


@pytest.mark.parametrize("kind, value", [
    (bool, "false"), (bool, 0), (bool, 1.0), (int, True), (int, 8.0), (int, "8"), (float, True),
    (float, "16"), (str, 3), (list, "q_proj"), (dict, []),
])
def test_json_field_refuses_values_of_another_kind(kind, value):
    with pytest.raises(ConfigError) as info:
        tf.json_field({"f": value}, "f", kind, "adapter_config.json")
    msg = str(info.value)
    assert msg.startswith("adapter_config.json: f must be ") and repr(value) in msg, msg


def test_json_field_defaults_and_required_fields():
    assert tf.json_field({}, "f", bool, "w", False) is False
    assert tf.json_field({"f": None}, "f", dict, "w", {}) == {}
    with pytest.raises(ConfigError, match="w: f must be an integer, got nothing"):
        tf.json_field({}, "f", int, "w")
    with pytest.raises(ConfigError, match="w: f must be an integer, got null"):
        tf.json_field({"f": None}, "f", int, "w")


# ------------------------------------------------------------------------------- writing

@given(arrays=st.dictionaries(st.text("abc.", min_size=1, max_size=5),
                              hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64]),
                                         hnp.array_shapes(min_dims=1, max_dims=3, max_side=3)),
                              max_size=4))
def test_safetensors_bytes_read_back_exactly(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("w") / "t.safetensors"
    path.write_bytes(tf.safetensors_bytes(arrays))
    _, metadata = tf.read_header(path, "t")
    assert metadata == {"format": "pt"}  # what transformers and PEFT look for
    back = tf.read_tensors(path, "t", float_dtype=None)
    assert back.keys() == arrays.keys()
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and np.array_equal(back[k], a, equal_nan=True)


def test_safetensors_bytes_take_strided_views():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = tf.safetensors_bytes({"t": a.T})  # not contiguous
    assert data == st_save({"t": np.ascontiguousarray(a.T)}, metadata={"format": "pt"})


def test_json_bytes_are_sorted_indented_and_refuse_nan():
    data = tf.json_bytes({"b": 1, "a": [1.5, None]})
    assert data == b'{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    assert json.loads(data) == {"a": [1.5, None], "b": 1}
    with pytest.raises(ValueError):
        tf.json_bytes({"x": float("nan")})


def test_no_duplicate_keys_names_the_key():
    assert json.loads('{"a": 1, "b": 2}', object_pairs_hook=tf.no_duplicate_keys) == \
        {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="the key 'a' appears twice"):
        json.loads('{"a": 1, "a": 2}', object_pairs_hook=tf.no_duplicate_keys)
