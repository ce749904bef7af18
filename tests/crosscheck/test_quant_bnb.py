"""minilora.quant against bitsandbytes' CPU implementation: tables, packed bytes, absmax, double
quantization. What the experiments showed (bitsandbytes 0.50, CPU):

* nibble order: the first element of each pair is in the HIGH nibble, as here;
* odd element counts: the last low nibble is the code of zero (NF4: 7, FP4: 0), as here;
* a short last block gets its own absmax; an all-zero full block stores absmax 0, but an
  all-zero SHORT last block stores 1e-38 (a clamp); here both store 0 (either way it
  dequantizes to zeros);
* full blocks are scaled by x * (1 / absmax), the short block by x / absmax; here always
  x / absmax, which can differ only for a value within an ulp of a midpoint;
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
    read = Q.QuantState(packed.numpy().reshape(-1), state.absmax.numpy(), shape, blocksize,
                        quant_type)
    np.testing.assert_array_equal(host(Q.dequantize(read)), theirs)


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
