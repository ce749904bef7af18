"""bitsandbytes' ``Linear4bit`` state dicts against minilora's QuantLinear, through safetensors
files as QLoRA users save them. What the experiments showed (bitsandbytes 0.50, CPU):

* ``Linear4bit.state_dict()`` holds ``weight`` (uint8, ((n + 1) // 2, 1)), ``bias``,
  ``weight.absmax`` (float32, or uint8 with double quantization), ``weight.quant_map``,
  ``weight.nested_absmax``, ``weight.nested_quant_map`` and the JSON blob
  ``weight.quant_state.bitsandbytes__<nf4|fp4>``; minilora writes the same keys, dtypes, shapes
  and bytes (the blob included);
* a fresh ``Linear4bit`` cannot take such a state dict through ``load_state_dict`` (0.50 has no
  loading hook for the 4-bit keys, not even for its own): the weight is rebuilt with
  ``Params4bit.from_prequantized``, as transformers does, then the bias loads normally;
* ``dequantize_4bit`` on the CPU mis-scales 2-D shapes whose row length is not a multiple of the
  blocksize while the element count is (e.g. (40, 96) at 64), and so does ``Linear4bit``'s CPU
  forward, which uses it; through the flattened shape it agrees with minilora bit for bit;
* a state of a bfloat16 or float16 weight dequantizes in that dtype; minilora's float32 values
  rounded to it are bitsandbytes' exactly;
* FP4 code 8 dequantizes to +0.0 in bitsandbytes (its CPU table holds +0.0 there) and to -0.0 in
  minilora (E2M1's negative zero, kept on purpose: tests/test_quant.py); dequantized weights are
  compared bit for bit with that one sign of zero set aside (``_bits`` adds +0.0).
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
bnb_nn = pytest.importorskip("bitsandbytes.nn")
safetensors_torch = pytest.importorskip("safetensors.torch")

import minilora as ml  # noqa: E402
from minilora import nn  # noqa: E402
from minilora import quant as Q  # noqa: E402
from minilora import quant as QL  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck

SHAPES = [(40, 96), (24, 64), (7, 9), (33, 17)]  # (40, 96): bitsandbytes' mis-scaled 2-D case
SETTINGS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def _linear4bit(shape, quant_type, compress, seed=0, dtype=torch.float32):
    """A bitsandbytes Linear4bit (out, in) = shape, quantized on the CPU from a seeded weight,
    and that float weight (a NumPy copy)."""
    torch.manual_seed(seed)
    layer = bnb_nn.Linear4bit(shape[1], shape[0], bias=True, compress_statistics=compress,
                              quant_type=quant_type)
    layer.weight.data = (torch.randn(shape) * 0.1).to(dtype)
    w = layer.weight.data.float().numpy().copy()
    return layer.to("cpu"), w  # .to quantizes


def _their_weight(weight, state):
    """bitsandbytes' dequantized weight, asked for through the flat shape (module docstring)."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnb_functional.dequantize_4bit(weight.data, flat).reshape(state.shape)


def _fresh_linear4bit(sd, shape, quant_type, compress):
    """A new Linear4bit holding the state dict ``sd`` (torch tensors)."""
    fresh = bnb_nn.Linear4bit(shape[1], shape[0], bias="bias" in sd,
                              compress_statistics=compress, quant_type=quant_type)
    try:
        fresh.load_state_dict(sd)
    except RuntimeError:  # 0.50: the 4-bit keys are "unexpected" (module docstring)
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        fresh.weight = bnb_nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu",
                                                           module=fresh)
        fresh.load_state_dict({k: sd[k] for k in ("weight", "bias") if k in sd})
    return fresh


def _bits(a) -> bytes:
    """The float32 bytes of ``a`` with -0.0 turned into +0.0 (x + 0.0 changes nothing else)."""
    return (np.asarray(a, dtype=np.float32) + np.float32(0.0)).tobytes()


def _same_bytes(a, b):
    a, b = (x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("quant_type,compress", SETTINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_saved_linear4bit_loads_into_quantlinear_bit_for_bit(tmp_path, shape, quant_type,
                                                               compress):
    layer, w = _linear4bit(shape, quant_type, compress)
    model = torch.nn.ModuleDict({"q_proj": layer})
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    ql = QL.quant_linear_from_bnb_state(arrays, "q_proj")
    s = ql.quant_state
    assert (s.shape, s.blocksize, s.quant_type, s.nested) == (shape, 64, quant_type, compress)
    theirs = _their_weight(layer.weight, layer.weight.quant_state).numpy()
    ours = host(ql.dequantized_weight())
    assert _bits(ours) == _bits(theirs)
    assert _same_bytes(host(ql.bias), layer.bias)
    # the packed bytes are also what minilora's own quantizer makes of the float weight (with
    # double quantization the nested 8-bit codes may differ by a step: test_quant_bnb.py)
    mine = Q.quantize(w, 64, quant_type, double_quant=compress)
    assert host(mine.packed).tobytes() == host(s.packed).tobytes()
    if not compress:
        assert host(mine.absmax).tobytes() == host(s.absmax).tobytes()


@pytest.mark.parametrize("quant_type,compress", SETTINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_quantlinear_state_dict_loads_into_a_fresh_linear4bit(tmp_path, shape, quant_type,
                                                                compress):
    ml.manual_seed(3)
    ql = QL.QuantLinear.from_linear(nn.Linear(shape[1], shape[0]), 64, quant_type, compress)
    arrays = QL.bnb_state_from_quant_linear(ql)
    path = tmp_path / "adapter_base.safetensors"
    from safetensors.numpy import save_file

    save_file(arrays, str(path))
    sd = safetensors_torch.load_file(str(path))
    fresh = _fresh_linear4bit(sd, shape, quant_type, compress)
    theirs = _their_weight(fresh.weight, fresh.weight.quant_state).numpy()
    assert _bits(theirs) == _bits(host(ql.dequantized_weight()))
    assert _same_bytes(fresh.bias, host(ql.bias))
    # bitsandbytes writes back exactly what minilora wrote: same keys, dtypes, shapes, bytes
    again = fresh.state_dict()
    assert list(again) == list(arrays)
    for key, value in arrays.items():
        assert _same_bytes(again[key], value), key
    # and its forward pass agrees where its CPU kernel scales right (module docstring)
    x = np.random.default_rng(0).standard_normal((3, shape[1])).astype(np.float32)
    with torch.no_grad():
        y = fresh(torch.from_numpy(x)).numpy()
    if shape != (40, 96):
        np.testing.assert_allclose(y, host(ql(ml.Tensor(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type,compress", SETTINGS)
def test_both_directions_agree_on_a_state_quantized_by_bitsandbytes(tmp_path, quant_type,
                                                                    compress):
    """bitsandbytes -> minilora -> bitsandbytes: every tensor comes back byte for byte."""
    layer, _ = _linear4bit((24, 64), quant_type, compress, seed=5)
    sd = layer.state_dict()
    arrays = {k: v.numpy() for k, v in sd.items()}
    back = QL.bnb_state_from_quant_linear(QL.quant_linear_from_bnb_state(arrays))
    assert list(back) == list(sd)
    for key in sd:
        assert _same_bytes(sd[key], back[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compress", [False, True])
def test_a_half_precision_state_is_the_float32_one_rounded(dtype, compress):
    layer, _ = _linear4bit((24, 64), "nf4", compress, dtype=dtype)
    arrays = {k: v.numpy() for k, v in layer.state_dict().items()}
    ql = QL.quant_linear_from_bnb_state(arrays)
    theirs = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert theirs.dtype == dtype
    ours = torch.from_numpy(host(ql.dequantized_weight())).to(dtype)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def test_bitsandbytes_refuses_minilora_int4_instead_of_misreading_it():
    ml.manual_seed(0)
    ql = QL.QuantLinear.from_linear(nn.Linear(64, 8), 64, "int4", False)
    arrays = QL.bnb_state_from_quant_linear(ql)
    assert "weight.quant_state.minilora__int4" in arrays
    stats = {k[len("weight."):]: torch.from_numpy(v) for k, v in arrays.items()
             if k.startswith("weight.")}
    with pytest.raises(ValueError, match="quant_state"):
        bnb_functional.QuantState.from_dict(stats, device="cpu")
