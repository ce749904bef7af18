"""minilora.quant against bitsandbytes' CPU implementation: tables, packed bytes, absmax, double
quantization. What the experiments showed (bitsandbytes 0.50, CPU):

* nibble order: the first element of each pair is in the HIGH nibble, as here;
* odd element counts: the last low nibble is the code of zero (NF4: 7, FP4: 0), as here;
* a short last block gets its own absmax; the scale is floored at 1e-38, so an all-zero full
  block stores absmax 0 but an all-zero SHORT last block stores 1e-38, as here;
* full blocks are scaled by x * fl(1 / absmax), the short block by x / absmax, as here: the two
  differ for some values within an ulp of a midpoint, so both rules are checked on values at
  and one ulp either side of every midpoint;
* ``dequantize_4bit`` on the CPU returns a 1-D tensor of even length n as shape (1, n), and for
  2-D shapes whose row length is not a multiple of the blocksize while the element count is,
  e.g. (128, 96) at blocksize 64, its native kernel applies the wrong absmax to some elements
  (errors up to 1.9 on randn, far beyond the 4-bit bound); its generic path, and the same call
  on the flattened shape, agree with minilora exactly;
* the nested 8-bit step uses a native binary search that is not always the nearest code
  (about 0.05 % of codes land on the neighbour); here it is the nearest code, so those bytes
  may differ by one step while staying within the 8-bit error bound.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from minilora import backend as B  # noqa: E402
from minilora import quant as Q  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck

SHAPES = [(7,), (64,), (1000,), (33, 17), (128, 96), (3, 5, 131)]


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = rng.standard_normal(n) * np.exp(rng.uniform(-2, 2, n))
    x[rng.random(n) < 0.05] = 0.0
    return x.astype(np.float32).reshape(shape)


def _bnb(x, blocksize, quant_type, nested=False):
    return bnb_functional.quantize_4bit(torch.from_numpy(x), blocksize=blocksize,
                                        quant_type=quant_type, compress_statistics=nested)


def test_code_tables_equal_bitsandbytes():
    for qt, ours in (("nf4", Q.NF4_CODE), ("fp4", Q.FP4_CODE)):
        theirs = bnb_functional.get_4bit_type(qt, device="cpu").numpy()
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(Q.DYNAMIC_CODE, bnb_functional.create_dynamic_map().numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_bytes_and_absmax_equal_bitsandbytes(shape, blocksize, quant_type):
    x = _data(shape, seed=blocksize + len(shape))
    packed, state = _bnb(x, blocksize, quant_type)
    ours = Q.quantize(x, blocksize, quant_type)
    np.testing.assert_array_equal(host(ours.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(host(ours.absmax), state.absmax.numpy())
    # bitsandbytes' CPU kernel mis-scales some 2-D shapes (module docstring): ask it for the
    # flat tensor, which it dequantizes right, and reshape
    state.shape = torch.Size([x.size])
    theirs = bnb_functional.dequantize_4bit(packed, state).numpy().reshape(shape)
    np.testing.assert_array_equal(host(Q.dequantize(ours)), theirs)
    # bitsandbytes' arrays read directly as a QuantState
    read = Q.QuantState(B.asarray(packed.numpy().reshape(-1)), B.asarray(state.absmax.numpy()),
                        shape, blocksize, quant_type)
    np.testing.assert_array_equal(host(Q.dequantize(read)), theirs)


def _around_bnb_midpoints(a, quant_type):
    """float32 values at fl(m * a) and one ulp either side, for every midpoint m between
    bitsandbytes' sorted code values (computed from its own table, in float32)."""
    code = np.sort(bnb_functional.get_4bit_type(quant_type, device="cpu").numpy())
    mid = (code[:-1] + code[1:]) / np.float32(2)
    x0 = (mid.astype(np.float64) * a).astype(np.float32)
    up, down = np.nextafter(x0, np.float32(np.inf)), np.nextafter(x0, np.float32(-np.inf))
    return np.concatenate([x0, up, down])  # (45,)


def _midpoint_input(a_full, a_short, blocksize, quant_type):
    """One full block [a_full] + every midpoint candidate (zero-filled), and a short last block
    [a_short] + every candidate for a_short (46 values < blocksize)."""
    full = np.zeros(blocksize, np.float32)
    full[0] = a_full
    cand = _around_bnb_midpoints(abs(a_full), quant_type)
    full[1:1 + cand.size] = cand
    short = np.concatenate([[a_short], _around_bnb_midpoints(abs(a_short), quant_type)])
    return np.concatenate([full, full[::-1], short]).astype(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_values_at_and_around_every_midpoint_give_bitsandbytes_bytes(blocksize, quant_type):
    rng = np.random.default_rng(blocksize)
    scales = np.concatenate([np.exp(rng.uniform(-6, 6, 60)), 2.0 ** np.arange(-4, 5),
                             [1.0, 3.0, 0.1, 1e-3, 7e4]]).astype(np.float32)
    pairs = np.stack([scales, np.roll(scales, 7)], axis=1) * rng.choice([-1, 1], (scales.size, 2))
    _, order, mid = Q.codes.host_tables(quant_type)
    moved = 0
    for a_full, a_short in pairs.astype(np.float32):
        x = _midpoint_input(a_full, a_short, blocksize, quant_type)
        packed, state = _bnb(x, blocksize, quant_type)
        ours = Q.quantize(x, blocksize, quant_type)
        np.testing.assert_array_equal(host(ours.packed), packed.numpy().reshape(-1),
                                      err_msg=f"absmax {a_full}, {a_short}")
        np.testing.assert_array_equal(host(ours.absmax), state.absmax.numpy())
        # what dividing every block by its absmax (minilora's old arithmetic) would have given
        am = np.repeat(state.absmax.numpy(), blocksize)[:x.size]
        divided = order[np.searchsorted(mid, np.clip(x / am, -1, 1), side="left")]
        moved += int((divided != host(ours.codes())).sum())
    assert moved > 0  # these inputs tell the two arithmetics apart


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_and_subnormal_blocks_give_bitsandbytes_bytes(quant_type):
    """bitsandbytes floors the scale at 1e-38: zero blocks, subnormal blocks (scaled by 1e38,
    so they land near the zero code) and a zero or subnormal short block (which stores 1e-38)."""
    blocks = [np.zeros(64), np.full(64, 1e-40), np.full(64, -5e-39), np.linspace(-3e-39, 9e-39, 64),
              np.r_[1e-30, np.full(63, 1e-39)]]
    for short in (np.zeros(10), np.full(9, 5e-39), np.r_[2.0, np.zeros(4)], np.full(3, 1e-41)):
        x = np.concatenate(blocks + [short]).astype(np.float32)
        packed, state = _bnb(x, 64, quant_type)
        ours = Q.quantize(x, 64, quant_type)
        np.testing.assert_array_equal(host(ours.packed), packed.numpy().reshape(-1))
        np.testing.assert_array_equal(host(ours.absmax).view(np.uint32),
                                      state.absmax.numpy().view(np.uint32))


def test_nibble_order_and_odd_padding_match_bitsandbytes():
    x = np.array([0.1, -1.0, 0.5], dtype=np.float32)  # NF4 codes 8, 0, 12; pad 7
    packed, _ = _bnb(x, 64, "nf4")
    assert packed.numpy().reshape(-1).tolist() == [0x80, 0xC7]
    assert host(Q.quantize(x).packed).tolist() == [0x80, 0xC7]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(256, 256), (300, 129)])
def test_double_quantization_agrees_with_bitsandbytes(shape, quant_type):
    x = _data(shape, seed=7)
    packed, state = _bnb(x, 64, quant_type, nested=True)
    ours = Q.quantize(x, 64, quant_type, double_quant=True)
    np.testing.assert_array_equal(host(ours.packed), packed.numpy().reshape(-1))
    assert float(ours.offset) == pytest.approx(float(state.offset), rel=1e-6)
    np.testing.assert_allclose(host(ours.absmax2), state.state2.absmax.numpy(), rtol=1e-6)
    ours_q, theirs_q = host(ours.absmax).astype(int), state.absmax.numpy().astype(int)
    assert np.mean(ours_q == theirs_q) > 0.99
    assert np.abs(ours_q - theirs_q).max() <= 1  # at most one step of the 8-bit map apart
    # both dequantized scales stay within the 8-bit bound of the true absmax
    true = host(Q.quantize(x, 64, quant_type).absmax)
    theirs = bnb_functional.dequantize_blockwise(state.absmax, state.state2).numpy() \
        + float(state.offset)
    bound = np.repeat(host(ours.absmax2), 256)[:true.size] * Q.max_half_gap("dynamic8") * 1.01
    for approx in (host(ours.dequantized_absmax()), theirs):
        assert np.all(np.abs(approx - true) <= bound + 1e-6)
    state.shape = torch.Size([x.size])
    theirs_x = bnb_functional.dequantize_4bit(packed, state).numpy().reshape(shape)
    np.testing.assert_allclose(host(Q.dequantize(ours)), theirs_x, rtol=0,
                               atol=float(np.abs(x).max()) * 0.02)
