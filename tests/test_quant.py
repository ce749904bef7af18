"""Blockwise 4-bit quantization: code tables, the identities of QLoRA's scheme, errors, storage."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import quant as Q
from minilora.errors import DTypeError, InvalidArgumentError, ShapeError
from tests.helpers import host

TYPES = st.sampled_from(Q.QUANT_TYPES)
BLOCKSIZES = st.sampled_from([16, 32, 64, 128])


def _sample(seed: int, n: int, zero_frac: float = 0.0) -> np.ndarray:
    """Gaussian values whose scale varies from element to element, some exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))
    x[rng.random(n) < zero_frac] = 0.0
    return x.astype(np.float32)


def _block_absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    """Per-element absmax of its block, the slow and obvious way."""
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, blocksize):
        out[start:start + blocksize] = np.abs(flat[start:start + blocksize]).max()
    return out


def _bnb_scaled(x: np.ndarray, blocksize: int) -> np.ndarray:
    """bitsandbytes' scaling, written out block by block: a full block times the float32
    reciprocal of its absmax, the short last block divided by it (absmax floored at 1e-38).

    float32 products and quotients are computed exactly in float64 and rounded once, which is
    what a float32 multiply or divide does."""
    flat = x.reshape(-1).astype(np.float32)
    out = np.empty(flat.size, dtype=np.float32)
    for start in range(0, flat.size, blocksize):
        blk = flat[start:start + blocksize]
        m = max(np.float32(np.abs(blk).max()), np.float32(1e-38))
        if blk.size == blocksize:
            recip = np.float32(1.0 / np.float64(m))
            s = (blk.astype(np.float64) * np.float64(recip)).astype(np.float32)
        else:
            s = (blk.astype(np.float64) / np.float64(m)).astype(np.float32)
        out[start:start + blocksize] = np.clip(s, -1, 1)
    return out


def _reference_codes(x: np.ndarray, blocksize: int, quant_type: str) -> np.ndarray:
    """An independent oracle: loop over blocks, argmin of the distance to every emitted code."""
    code = Q.codes.CODES[quant_type].astype(np.float64)
    allowed = np.arange(1, 16) if quant_type == "int4" else np.arange(16)
    scaled = _bnb_scaled(x, blocksize).astype(np.float64)
    dist = np.abs(scaled[:, None] - code[allowed][None, :])
    return allowed[dist.argmin(axis=1)].astype(np.uint8)


def _midpoint_codes(x: np.ndarray, blocksize: int, quant_type: str) -> np.ndarray:
    """The midpoint rule on bitsandbytes' scaled values, by counting: code = order[number of
    midpoints strictly below s] (torch.bucketize), midpoints (a + b) / 2 in float32."""
    code = Q.codes.CODES[quant_type]
    emitted = np.arange(1, 16) if quant_type == "int4" else np.arange(16)
    order = emitted[np.argsort(code[emitted], kind="stable")]
    mid = (code[order[:-1]] + code[order[1:]]) / np.float32(2)
    s = _bnb_scaled(x, blocksize)
    return order[(s[:, None] > mid[None, :]).sum(axis=1)].astype(np.uint8)


# --------------------------------------------------------------------------------- the tables

def test_nf4_table_is_rebuilt_from_normal_quantiles():
    rebuilt = Q.normal_float_code(offset=0.9677083)
    np.testing.assert_allclose(rebuilt, Q.NF4_CODE, rtol=0, atol=2e-7)
    code = Q.NF4_CODE
    assert np.all(np.diff(code) > 0)
    assert (code < 0).sum() == 7 and (code == 0).sum() == 1 and (code > 0).sum() == 8
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0
    # another offset gives another grid: the constant matters
    assert np.abs(Q.normal_float_code(offset=0.99) - Q.NF4_CODE).max() > 1e-2


@pytest.mark.host_only("the code tables are host arrays")
@pytest.mark.parametrize("offset", [0.5, 1.0, 0.3, 0, 1, 64, 3, float("nan"), "0.9", True,
                                    None])
def test_an_offset_that_is_no_probability_between_a_half_and_one_is_refused(offset):
    """0.5 made a table of 16 NaNs; 0, 1 and 64 a StatisticsError; a str a dtype error."""
    with pytest.raises(InvalidArgumentError, match=r"normal_float_code: offset must be a "
                                                   r"probability between 0.5 and 1"):
        Q.normal_float_code(offset)


@pytest.mark.host_only("the code tables are host arrays")
@given(offset=st.floats(0.5, 1.0, exclude_min=True, exclude_max=True))
def test_any_offset_between_a_half_and_one_gives_a_finite_sorted_table(offset):
    code = Q.normal_float_code(offset)
    assert np.isfinite(code).all() and code[-1] == 1.0 and (np.diff(code) >= 0).all()


def test_fp4_table_is_e2m1_over_12_with_a_sign_bit():
    raw = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3])
    np.testing.assert_allclose(Q.FP4_CODE[:8] * 12, raw, rtol=1e-6)
    np.testing.assert_array_equal(Q.FP4_CODE[8:], -Q.FP4_CODE[:8])
    assert np.all(np.signbit(Q.FP4_CODE[8:])) and not np.any(np.signbit(Q.FP4_CODE[:8]))


def test_int4_table_is_symmetric_k_over_7():
    k = np.arange(16) - 8
    np.testing.assert_allclose(Q.INT4_CODE, np.clip(k / 7, -1, 1), rtol=1e-6)
    assert Q.INT4_CODE[8] == 0.0 and Q.INT4_CODE[15] == 1.0 and Q.INT4_CODE[1] == -1.0
    np.testing.assert_allclose(np.diff(Q.INT4_CODE[1:]), 1 / 7, rtol=1e-5)


def test_dynamic_8bit_map_shape_and_gaps():
    code = Q.DYNAMIC_CODE
    assert code.shape == (256,) and code.dtype == np.float32
    assert np.all(np.diff(code) > 0) and code[0] > -1 and code[-1] == 1.0
    assert 0.0 in code
    # symmetric apart from +1, which has no negative twin
    np.testing.assert_array_equal(code[:127], -code[128:255][::-1])
    assert Q.max_half_gap("dynamic8") == pytest.approx(0.0140625 / 2, rel=1e-5)
    assert Q.max_half_gap("nf4") == pytest.approx((1 - 0.6961928009986877) / 2, rel=1e-6)
    assert Q.max_half_gap("fp4") == pytest.approx(1 / 6, rel=1e-6)
    assert Q.max_half_gap("int4") == pytest.approx(1 / 14, rel=1e-6)


def test_known_bytes_and_nibble_order():
    # 0.1 -> NF4 code 8 (0.0796), -1 -> 0, 0.5 -> 12 (0.4407), 0 -> 7, 0.3 -> 11 (0.3379), and the
    # odd count pads with the code of zero (7): bytes 0x80, 0xC7, 0xB7. FP4: 6, 11 | 5, 0 | 4, pad 0
    x = np.array([0.1, -1.0, 0.5, 0.0, 0.3], dtype=np.float32)
    assert host(Q.quantize(x).packed).tolist() == [0x80, 0xC7, 0xB7]
    assert host(Q.quantize(x, quant_type="fp4").packed).tolist() == [0x6B, 0x50, 0x40]
    # INT4: k = round(7 x): 0.1 -> 1 (code 9), -1 -> code 1, 0.45 -> 3 (11), 0 -> 8, 0.3 -> 2 (10)
    y = np.array([0.1, -1.0, 0.45, 0.0, 0.3], dtype=np.float32)
    assert host(Q.quantize(y, quant_type="int4").packed).tolist() == [0x91, 0xB8, 0xA8]


# ------------------------------------------------------------------------------- properties

@given(seed=st.integers(0, 2**31), n=st.integers(1, 700), blocksize=BLOCKSIZES, qt=TYPES)
def test_error_bound_and_nearest_code(seed, n, blocksize, qt):
    x = _sample(seed, n, zero_frac=0.1)
    state = Q.quantize(x, blocksize, qt)
    xh = host(Q.dequantize(state))
    assert xh.dtype == np.float32 and xh.shape == x.shape
    am = _block_absmax(x, blocksize)
    bound = am * Q.max_half_gap(qt) * (1 + 1e-5) + 1e-30
    assert np.all(np.abs(x - xh) <= bound)
    codes = host(state.codes())
    ref = _reference_codes(x, blocksize, qt)
    values = Q.codes.CODES[qt]
    if qt == "fp4":  # +0 and -0 are the same value; compare values
        np.testing.assert_array_equal(values[codes], values[ref])
    else:
        np.testing.assert_array_equal(codes, ref)


@given(seed=st.integers(0, 2**31), n=st.integers(1, 500), blocksize=BLOCKSIZES, qt=TYPES)
def test_zero_stays_exactly_zero(seed, n, blocksize, qt):
    x = _sample(seed, n, zero_frac=0.3)
    xh = host(Q.dequantize(Q.quantize(x, blocksize, qt)))
    assert np.all(xh[x == 0] == 0)


@given(seed=st.integers(0, 2**31), n=st.integers(1, 500), blocksize=BLOCKSIZES, qt=TYPES)
def test_each_block_absmax_element_is_exact(seed, n, blocksize, qt):
    x = _sample(seed, n)
    state = Q.quantize(x, blocksize, qt)
    xh = host(Q.dequantize(state))
    absmax = host(state.absmax)
    for b, start in enumerate(range(0, n, blocksize)):
        blk = x[start:start + blocksize]
        i = start + int(np.abs(blk).argmax())
        assert absmax[b] == np.abs(blk).max()
        assert xh[i] == x[i]  # value and sign


@given(seed=st.integers(0, 2**31), n=st.integers(0, 600))
def test_pack_unpack_is_a_bijection(seed, n):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, n).astype(np.uint8)
    packed = Q.pack_nibbles(B.asarray(codes))
    assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
    np.testing.assert_array_equal(host(Q.unpack_nibbles(packed, n)), codes)
    data = rng.integers(0, 256, n // 2).astype(np.uint8)  # every byte string is some code pair
    unpacked = Q.unpack_nibbles(B.asarray(data), 2 * data.size)
    np.testing.assert_array_equal(host(Q.pack_nibbles(unpacked)), data)


def test_pack_puts_the_first_element_in_the_high_nibble():
    assert host(Q.pack_nibbles(B.asarray(np.array([1, 2, 3], np.uint8)))).tolist() == [0x12, 0x30]


@given(seed=st.integers(0, 2**31), n=st.integers(1, 300), big=st.integers(16, 255))
def test_pack_refuses_a_code_that_is_not_4_bits(seed, n, big):
    """A code of 16 or more would spill into its neighbour's nibble: a silent wrong weight."""
    codes = np.random.default_rng(seed).integers(0, 16, n).astype(np.uint8)
    codes[seed % n] = big
    with pytest.raises(InvalidArgumentError, match=f"0..15, got {big}"):
        Q.pack_nibbles(B.asarray(codes))


@given(seed=st.integers(0, 2**31), n=st.integers(1, 600), blocksize=BLOCKSIZES, qt=TYPES,
       dq=st.booleans())
def test_quantize_of_dequantize_is_the_same_state(seed, n, blocksize, qt, dq):
    x = _sample(seed, n, zero_frac=0.1)
    q1 = Q.quantize(x, blocksize, qt, dq)
    q2 = Q.quantize(Q.dequantize(q1), blocksize, qt, dq)
    c1, c2 = host(q1.codes()), host(q2.codes())
    values = Q.codes.CODES[qt]
    if qt == "fp4":  # -0 dequantizes to a zero that quantizes to +0: the same value
        np.testing.assert_array_equal(values[c1], values[c2])
    else:
        np.testing.assert_array_equal(c1, c2)
    if not dq:  # nested: the 8-bit scales of the new absmax values have a new mean, so they move
        np.testing.assert_array_equal(host(q1.absmax), host(q2.absmax))
        np.testing.assert_array_equal(host(Q.dequantize(q1)), host(Q.dequantize(q2)))


@given(seed=st.integers(0, 2**31), n_blocks=st.integers(1, 700), qt=TYPES)
def test_double_quantized_absmax_within_the_8bit_bound(seed, n_blocks, qt):
    blocksize = 16
    x = _sample(seed, n_blocks * blocksize - int(seed % 7 == 0))  # sometimes a short last block
    plain = Q.quantize(x, blocksize, qt)
    dq = Q.quantize(x, blocksize, qt, double_quant=True)
    assert dq.nested and dq.absmax.dtype == np.uint8 and dq.absmax.size == plain.absmax.size
    assert dq.absmax2.size == math.ceil(plain.absmax.size / 256) and dq.absmax2.dtype == np.float32
    np.testing.assert_array_equal(host(dq.packed), host(plain.packed))  # 4-bit codes unchanged
    true, approx = host(plain.absmax).astype(np.float64), host(dq.dequantized_absmax())
    offset = float(dq.offset)
    assert offset == pytest.approx(true.mean(), rel=1e-6)
    scale2 = np.repeat(host(dq.absmax2), 256)[:true.size].astype(np.float64)
    assert np.all(np.abs(approx - true) <= scale2 * Q.max_half_gap("dynamic8") * (1 + 1e-5)
                  + 4e-7 * (np.abs(true) + abs(offset)))
    # and so each element moves by at most |code| * its absmax error on top of the 4-bit error
    xh = host(Q.dequantize(dq))
    am = _block_absmax(x, blocksize)
    am_err = np.repeat(np.abs(approx - true), blocksize)[:x.size]
    assert np.all(np.abs(x - xh) <= am * Q.max_half_gap(qt) * (1 + 1e-5) + am_err * (1 + 1e-5)
                  + 1e-30)


@pytest.mark.parametrize("shape", [(1,), (3,), (15,), (63,), (65,), (7, 9), (2, 3, 5), ()])
@pytest.mark.parametrize("blocksize", [16, 64])
def test_short_last_block_and_odd_sizes(shape, blocksize):
    x = _sample(sum(shape) + 1, max(math.prod(shape), 1)).reshape(shape)
    state = Q.quantize(x, blocksize)
    n = x.size
    assert state.shape == shape and state.numel == n
    assert state.packed.shape == ((n + 1) // 2,) and state.packed.dtype == np.uint8
    assert state.absmax.shape == (math.ceil(n / blocksize),) and state.absmax.dtype == np.float32
    xh = host(Q.dequantize(state))
    assert xh.shape == shape
    np.testing.assert_array_equal(host(state.codes()), _reference_codes(x, blocksize, "nf4"))
    if n % 2:  # the pad nibble is the code of zero
        assert int(host(state.packed)[-1]) & 15 == 7


def test_all_zero_blocks_do_not_divide_by_zero():
    x = np.zeros(200, dtype=np.float32)
    x[70:80] = np.linspace(-2, 3, 10)
    # not underflow: the zero short block's absmax is bitsandbytes' 1e-38, a float32 subnormal
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        for dq in (False, True):
            for qt in Q.QUANT_TYPES:
                state = Q.quantize(x, 64, qt, dq)
                xh = host(Q.dequantize(state))
                assert np.all(np.isfinite(xh))
                assert np.all(xh[:64] == 0) and np.all(xh[128:] == 0)
                assert xh[79] == np.float32(3.0) or dq
        zeros = Q.quantize(np.zeros(33, np.float32), 16, double_quant=True)
        assert np.all(host(Q.dequantize(zeros)) == 0)
    # as bitsandbytes: a zero full block stores absmax 0, a zero short block 1e-38 (its floor)
    absmax = host(Q.quantize(x, 64).absmax)
    assert np.all(absmax[[0, 2]] == 0) and absmax[3] == np.float32(1e-38)


def test_bad_input_raises_clear_errors():
    x = np.ones(64, dtype=np.float32)
    for bad in (0, 8, 48, 100, -64, True, 64.0, "64", None):
        with pytest.raises(InvalidArgumentError, match="blocksize") as info:
            Q.quantize(x, blocksize=bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(InvalidArgumentError, match="'nf8'"):
        Q.quantize(x, quant_type="nf8")
    with pytest.raises(DTypeError, match="int64"):
        Q.quantize(np.arange(64))
    with pytest.raises(DTypeError, match="bool"):
        Q.quantize(np.ones(64, dtype=bool))
    for value in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[37] = value
        with pytest.raises(InvalidArgumentError, match="non-finite.*index 37"):
            Q.quantize(y)
    with pytest.raises(ShapeError, match="empty"):
        Q.quantize(np.zeros((0, 4), np.float32))
    with pytest.raises(InvalidArgumentError, match="QuantState"):
        Q.dequantize(x)
    state = Q.quantize(x)
    state.packed = state.packed[:-1]
    with pytest.raises(ShapeError, match="packed"):
        Q.dequantize(state)
    with pytest.raises(InvalidArgumentError, match="blocksize"):
        Q.bits_per_parameter(blocksize=24)


# ------------------------------------------------------------- midpoints: bitsandbytes' arithmetic

def _around_midpoints(a: float, quant_type: str, ulps: int = 2) -> np.ndarray:
    """float32 values at fl(m * a) and up to ``ulps`` ulps either side, for every midpoint m of
    ``quant_type``'s sorted codes: the inputs whose code depends on the last bit of the scaling."""
    code = Q.codes.CODES[quant_type]
    emitted = np.arange(1, 16) if quant_type == "int4" else np.arange(16)
    v = np.sort(code[emitted])
    mid = (v[:-1] + v[1:]) / np.float32(2)
    x0 = (mid.astype(np.float64) * a).astype(np.float32)
    out, up, down = [x0], x0, x0
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.concatenate(out)


def _midpoint_array(a_full: float, a_short: float, blocksize: int, quant_type: str,
                    rotate: int = 0) -> np.ndarray:
    """Full blocks, each [absmax a_full] + candidates around every midpoint (zero-filled), then
    a short last block [absmax a_short] + blocksize - 2 such candidates (rotated by ``rotate``)."""
    cand = _around_midpoints(abs(a_full), quant_type)
    per = blocksize - 1
    cand = np.concatenate([cand, np.zeros(-cand.size % per, np.float32)]).reshape(-1, per)
    full = np.concatenate([np.full((cand.shape[0], 1), a_full, np.float32), cand], axis=1)
    short = np.roll(_around_midpoints(abs(a_short), quant_type), -rotate)[:blocksize - 2]
    return np.concatenate([full.reshape(-1), [np.float32(a_short)], short]).astype(np.float32)


def _one_rule_codes(x: np.ndarray, blocksize: int, quant_type: str, multiply: bool) -> np.ndarray:
    """Codes under ONE rule for every block: x / absmax (minilora's old arithmetic) or
    x * fl(1 / absmax) (bitsandbytes' full-block rule applied to the short block too)."""
    flat = x.reshape(-1)
    n_blocks = -(-flat.size // blocksize)
    am = np.repeat([np.abs(flat[i * blocksize:(i + 1) * blocksize]).max()
                    for i in range(n_blocks)], blocksize)[:flat.size].astype(np.float32)
    s = flat * (np.float32(1) / am) if multiply else flat / am
    _, order, mid = Q.codes.host_tables(quant_type)
    return order[np.searchsorted(mid, np.clip(s, -1, 1), side="left")].astype(np.uint8)


float32_absmax = st.one_of(
    st.integers(-8, 8).map(lambda e: 2.0 ** e),  # an exact reciprocal: values exactly on midpoints
    st.floats(2.0 ** -10, 2.0 ** 10, width=32))


@given(a_full=float32_absmax, a_short=float32_absmax, neg=st.booleans(), rotate=st.integers(0, 90),
       blocksize=BLOCKSIZES, qt=TYPES)
def test_codes_follow_bitsandbytes_arithmetic_at_every_midpoint(a_full, a_short, neg, rotate,
                                                                blocksize, qt):
    x = _midpoint_array(-a_full if neg else a_full, a_short, blocksize, qt, rotate)
    state = Q.quantize(x, blocksize, qt)
    np.testing.assert_array_equal(host(state.codes()), _midpoint_codes(x, blocksize, qt))
    n_full = x.size // blocksize
    absmax = host(state.absmax)
    assert absmax.size == n_full + 1
    assert np.all(absmax[:n_full] == np.float32(a_full)) and absmax[-1] == np.float32(a_short)


def test_exactly_on_a_midpoint_takes_the_lower_code():
    for qt in Q.QUANT_TYPES:
        _, order, mid = Q.codes.host_tables(qt)
        for a in (np.float32(1.0), np.float32(4.0), np.float32(0.125)):  # exact reciprocals
            x = np.concatenate([[a], mid * a]).astype(np.float32)  # s = mid exactly
            for bs in (16, 32):  # 16: a full block (nf4, fp4: 1 + 15 values), 32: a short one
                codes = host(Q.quantize(x, bs, qt).codes())[1:]
                np.testing.assert_array_equal(codes, order[:-1], err_msg=f"{qt} {a} {bs}")


@pytest.mark.parametrize("qt", Q.QUANT_TYPES)
def test_full_blocks_multiply_by_the_reciprocal_and_the_short_block_divides(qt):
    """Values within an ulp of a midpoint: x * fl(1 / a) and x / a land on different codes for
    some of them, in full blocks and in the short one; only bitsandbytes' rule matches."""
    rng = np.random.default_rng(3)
    xs = [_midpoint_array(float(a), float(b), 64, qt)
          for a, b in np.exp(rng.uniform(-5, 5, (40, 2))).astype(np.float32)]
    ours = np.concatenate([host(Q.quantize(xi, 64, qt).codes()) for xi in xs])
    rule = np.concatenate([_midpoint_codes(xi, 64, qt) for xi in xs])
    np.testing.assert_array_equal(ours, rule)
    in_full = np.concatenate([np.arange(xi.size) < xi.size // 64 * 64 for xi in xs])
    divided = ours != np.concatenate([_one_rule_codes(xi, 64, qt, False) for xi in xs])
    multiplied = ours != np.concatenate([_one_rule_codes(xi, 64, qt, True) for xi in xs])
    # the test means something: dividing everywhere (the old arithmetic) moves codes in full
    # blocks, multiplying everywhere moves codes in short ones; each rule is right in its part
    assert divided[in_full].sum() >= 5 and not divided[~in_full].any(), divided.sum()
    assert multiplied[~in_full].sum() >= 5 and not multiplied[in_full].any(), multiplied.sum()


def test_huge_blocksizes_are_refused_by_name_and_large_ones_allocate_nothing_extra():
    import tracemalloc

    x = _sample(4, 7)
    with pytest.raises(InvalidArgumentError, match="MAX_BLOCKSIZE") as info:
        Q.quantize(x, blocksize=2**40)
    assert repr(2**40) in str(info.value)
    assert Q.MAX_BLOCKSIZE == 2**24
    # a block larger than the array is one short block: no padding to 2**24 elements (64 MiB)
    for dq in (False, True):
        tracemalloc.start()
        state = Q.quantize(x, blocksize=Q.MAX_BLOCKSIZE, double_quant=dq)
        xh = host(Q.dequantize(state))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, peak  # NumPy reports its buffers to tracemalloc
        assert state.n_blocks == 1 and state.absmax.size == 1
        small = Q.quantize(x, blocksize=64, double_quant=dq)
        np.testing.assert_array_equal(host(state.packed), host(small.packed))
        np.testing.assert_array_equal(xh, host(Q.dequantize(small)))
    # a forged state: the blocksize is checked before anything is allocated
    forged = Q.quantize(x)
    forged.blocksize = 2**40
    with pytest.raises(InvalidArgumentError, match="state.blocksize.*MAX_BLOCKSIZE"):
        Q.dequantize(forged)


def test_forged_states_are_refused_before_allocating():
    x = _sample(5, 1000)
    bad_shape = Q.quantize(x)
    bad_shape.shape = (10**12,)  # would need 5e11 packed bytes
    with pytest.raises(ShapeError, match="packed must be uint8 of 500000000000 bytes"):
        Q.dequantize(bad_shape)
    bad_block = Q.quantize(x, 64)
    bad_block.blocksize = 16  # 63 blocks' worth of absmax needed, 16 present
    with pytest.raises(ShapeError, match="absmax must be float32 of 63 blocks.*got float32 of 16"):
        Q.dequantize(bad_block)
    nested = Q.quantize(x, 16, double_quant=True)  # 63 blocks -> one absmax2 value
    for field, value, match in (("absmax2", np.zeros(0, np.float32), "absmax2 must be float32 "
                                 "of 1"), ("absmax2", np.zeros(1, np.float64), "absmax2"),
                                ("offset", np.zeros(2, np.float32), "offset"),
                                ("blocksize2", 2**30, "state.blocksize2.*MAX_BLOCKSIZE")):
        forged = Q.quantize(x, 16, double_quant=True)
        setattr(forged, field, value)
        with pytest.raises((ShapeError, InvalidArgumentError), match=match):
            Q.dequantize(forged)
        with pytest.raises((ShapeError, InvalidArgumentError), match=match):
            forged.dequantized_absmax()
    for shape in ((-4, -250), (0,), "1000"):
        forged = Q.quantize(x)
        forged.shape = shape
        with pytest.raises(ShapeError, match="shape"):
            Q.dequantize(forged)
    assert host(Q.dequantize(nested)).shape == (1000,)


# --------------------------------------------------------------------------------- the figures

def test_gaussian_errors_match_qlora_figures():
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    stats = {qt: Q.error_stats(w, Q.quantize(w, 64, qt)) for qt in Q.QUANT_TYPES}
    assert stats["nf4"]["mean_abs_error"] <= 0.0734
    assert stats["nf4"]["mean_rel_error"] <= 0.206
    assert stats["fp4"]["mean_abs_error"] <= 0.0975
    assert stats["fp4"]["mean_rel_error"] <= 0.263
    assert stats["nf4"]["mean_abs_error"] < stats["int4"]["mean_abs_error"]
    assert stats["nf4"]["mean_abs_error"] < stats["fp4"]["mean_abs_error"]
    nested = Q.error_stats(w, Q.quantize(w, 64, "nf4", double_quant=True))
    assert stats["nf4"]["mean_abs_error"] <= nested["mean_abs_error"] <= 0.0734


def test_bits_per_parameter_is_exact():
    assert Q.bits_per_parameter(64) == 4.5
    assert Q.bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / 16384
    assert round(Q.bits_per_parameter(64, double_quant=True), 3) == 4.127
    assert Q.bits_per_parameter(128) == 4.25
    assert Q.bits_per_parameter(32, True, nested_blocksize=128) == 4 + 8 / 32 + 32 / 4096


@given(n=st.integers(1, 5000), blocksize=BLOCKSIZES, dq=st.booleans())
def test_storage_bytes_match_the_arrays_held(n, blocksize, dq):
    state = Q.quantize(_sample(n, n), blocksize, double_quant=dq)
    held = sum(a.nbytes for a in (state.packed, state.absmax, state.absmax2, state.offset)
               if a is not None)
    assert state.nbytes == held == Q.storage_bytes(n, blocksize, dq)


def test_large_tensor_bits_per_parameter_reach_the_formula():
    n = 64 * 256 * 4
    x = _sample(3, n)
    assert Q.quantize(x).bits_per_parameter() == Q.bits_per_parameter(64) == 4.5
    nested = Q.quantize(x, double_quant=True).bits_per_parameter()
    assert nested == Q.bits_per_parameter(64, double_quant=True) + 32 / n  # + the offset


# ------------------------------------------------------------------------------- conventions

def test_deterministic_dtypes_and_inputs():
    x = _sample(5, 300).reshape(20, 15)
    a, b = Q.quantize(x), Q.quantize(x.copy())
    np.testing.assert_array_equal(host(a.packed), host(b.packed))
    np.testing.assert_array_equal(host(a.absmax), host(b.absmax))
    for other in (x.astype(np.float64), ml.Tensor(x), x.tolist()):
        c = Q.quantize(other)
        np.testing.assert_array_equal(host(c.packed), host(a.packed))
        np.testing.assert_array_equal(host(c.absmax), host(a.absmax))
    half = Q.quantize(x.astype(np.float16))
    assert half.absmax.dtype == np.float32
    assert Q.dequantize(half).dtype == np.float32
    before = x.copy()
    Q.quantize(x, double_quant=True)
    np.testing.assert_array_equal(x, before)  # the input is not touched


def test_repr_and_code_values():
    state = Q.quantize(_sample(1, 128), 64, "nf4", double_quant=True)
    text = repr(state)
    assert "nf4" in text and "double_quant" in text and "bits/param" in text
    np.testing.assert_array_equal(host(Q.code_values("nf4")), Q.NF4_CODE)
    with pytest.raises(InvalidArgumentError):
        Q.code_values("int8")
