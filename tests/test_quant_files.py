"""4-bit weights in state dicts and checkpoints: bitsandbytes' layout, exact round trips without
re-quantizing, LoRA on a 4-bit base, and forged files refused before anything is allocated.

No torch here: tests/crosscheck/test_bnb_linear4bit.py compares with bitsandbytes itself.
"""

import json
import math
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load, save, save_file

import minilora as ml
from minilora import backend as B
from minilora import lora, nn, tensorfile
from minilora import quant as Q
from minilora import quant as QL
from minilora.checkpoint import MODEL_FILE, load_checkpoint, load_model, restore, save_checkpoint
from minilora.errors import CheckpointError, StateDictError
from minilora.gpt import GPT, GPTConfig
from minilora.quant import bnb_format as BF
from tests.helpers import host

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32)
SETTINGS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int4", False),
            ("int4", True)]
LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc", "mlp.proj")


def _quantized_gpt(quant_type="nf4", dq=True, blocksize=32, seed=0, cfg=CFG):
    ml.manual_seed(seed)
    model = GPT(cfg)
    return QL.quantize_model(model, blocksize=blocksize, quant_type=quant_type,
                             double_quant=dq)


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, CFG.block_size))


def _logits(model, x):
    model.eval()
    with ml.no_grad():
        return host(model(x)).copy()


def assert_same_state(a: Q.QuantState, b: Q.QuantState) -> None:
    """Bit for bit: every array (compared as raw bytes), shape, blocksizes and type."""
    assert (a.shape, a.blocksize, a.quant_type, a.nested) == \
        (b.shape, b.blocksize, b.quant_type, b.nested)
    names = ("packed", "absmax") + (("absmax2", "offset") if a.nested else ())
    for name in names:
        x, y = host(getattr(a, name)), host(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    if a.nested:
        assert a.blocksize2 == b.blocksize2


def _layer(shape=(24, 40), quant_type="nf4", dq=True, blocksize=64, bias=True, seed=0):
    ml.manual_seed(seed)
    return QL.QuantLinear.from_linear(nn.Linear(shape[1], shape[0], bias=bias), blocksize,
                                      quant_type, dq)


def _blob(sd, weight="weight"):
    (key,) = [k for k in sd if k.startswith(weight + ".quant_state.")]
    return key, json.loads(host(sd[key]).tobytes().decode())


# --------------------------------------------------------------------------- the key scheme

@pytest.mark.parametrize("quant_type,dq", SETTINGS)
def test_state_dict_holds_the_weight_in_bitsandbytes_layout(quant_type, dq):
    layer = _layer((24, 40), quant_type, dq, blocksize=64)
    sd = layer.state_dict()
    n, n_blocks = 24 * 40, 15
    ns = "minilora" if quant_type == "int4" else "bitsandbytes"
    want = {"weight": ("uint8", (n // 2, 1)), "bias": ("float32", (24,)),
            "weight.absmax": ("uint8" if dq else "float32", (n_blocks,)),
            "weight.quant_map": ("float32", (16,))}
    if dq:
        want.update({"weight.nested_absmax": ("float32", (1,)),
                     "weight.nested_quant_map": ("float32", (256,))})
    blob_key, meta = _blob(sd)
    assert blob_key == f"weight.quant_state.{ns}__{quant_type}"
    assert {k: (str(v.dtype), tuple(v.shape)) for k, v in sd.items() if k != blob_key} == want
    s = layer.quant_state
    assert host(sd["weight"]).reshape(-1).tobytes() == host(s.packed).tobytes()
    assert host(sd["weight.absmax"]).tobytes() == host(s.absmax).tobytes()
    want_meta = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32",
                 "shape": [24, 40]}
    if dq:
        want_meta.update(nested_blocksize=256, nested_dtype="float32",
                         nested_offset=float(s.offset))
        assert np.float32(meta["nested_offset"]).tobytes() == host(s.offset).tobytes()
        np.testing.assert_array_equal(host(sd["weight.nested_quant_map"]), Q.DYNAMIC_CODE)
    assert meta == want_meta and list(meta) == list(want_meta)  # bitsandbytes' key order
    table = {"nf4": Q.NF4_CODE, "fp4": Q.FP4_CODE, "int4": Q.INT4_CODE}[quant_type]
    np.testing.assert_array_equal(host(sd["weight.quant_map"]), table)
    # a state dict's arrays are the layer's own, as PyTorch's are
    if B.get_backend() == "numpy":
        assert np.shares_memory(sd["weight"], s.packed)


def test_fp4_table_is_written_with_bitsandbytes_positive_zero():
    sd = _layer(quant_type="fp4").state_dict()
    qm = host(sd["weight.quant_map"])
    assert not np.signbit(qm[8]) and np.signbit(Q.FP4_CODE[8])  # +0.0 there, -0.0 here
    # and a table with minilora's -0.0 is read all the same (equal as numbers)
    sd["weight.quant_map"] = Q.FP4_CODE.copy()
    assert_same_state(QL.quant_linear_from_bnb_state(sd).quant_state,
                      _layer(quant_type="fp4").quant_state)


def test_quantized_layers_finds_the_layers_by_their_blob_keys():
    keys = ["h.0.attn.q_proj.weight.quant_state.bitsandbytes__nf4", "h.0.attn.q_proj.weight",
            "weight.quant_state.minilora__int4", "h.1.mlp.fc.base_layer.weight.quant_state.x__y",
            "h.0.attn.q_proj.bias", "h.2.xweight.quant_state.bitsandbytes__nf4",
            "h.3.weight.quant_state.a.b"]
    assert BF.quantized_layers(keys) == ["", "h.0.attn.q_proj", "h.1.mlp.fc.base_layer"]


# ---------------------------------------------------------------------- state dict round trips

@given(out_f=st.integers(1, 40), in_f=st.integers(1, 70),
       blocksize=st.sampled_from([16, 32, 64, 128, 4096]),
       setting=st.sampled_from(SETTINGS), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_a_layer_comes_back_bit_for_bit_through_safetensors_bytes(out_f, in_f, blocksize,
                                                                   setting, bias, seed):
    quant_type, dq = setting
    layer = _layer((out_f, in_f), quant_type, dq, blocksize, bias, seed)
    arrays = QL.bnb_state_from_quant_linear(layer, "h.3.mlp.fc")
    again = QL.quant_linear_from_bnb_state(load(save(arrays)), "h.3.mlp.fc.")
    assert_same_state(again.quant_state, layer.quant_state)
    assert (again.bias is None) == (not bias)
    if bias:
        assert host(again.bias).tobytes() == host(layer.bias).tobytes()
        assert not again.bias.requires_grad
    np.testing.assert_array_equal(host(again.dequantized_weight()),
                                  host(layer.dequantized_weight()))
    # written again: the same bytes (the blob included)
    back = QL.bnb_state_from_quant_linear(again, "h.3.mlp.fc")
    assert list(back) == list(arrays)
    assert all(back[k].tobytes() == arrays[k].tobytes() for k in arrays)


def test_bnb_state_is_written_in_bitsandbytes_key_order():
    arrays = QL.bnb_state_from_quant_linear(_layer(dq=True), "q_proj")
    assert list(arrays) == ["q_proj.weight", "q_proj.bias", "q_proj.weight.absmax",
                            "q_proj.weight.quant_map", "q_proj.weight.nested_absmax",
                            "q_proj.weight.nested_quant_map",
                            "q_proj.weight.quant_state.bitsandbytes__nf4"]
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    _, meta = _blob(QL.bnb_state_from_quant_linear(_layer(), "", dtype="bfloat16"))
    assert meta["dtype"] == "bfloat16"
    with pytest.raises(ml.errors.InvalidArgumentError, match="dtype.*'int8'"):
        QL.bnb_state_from_quant_linear(_layer(), "", dtype="int8")


def test_load_state_dict_replaces_the_quant_state_and_keeps_nothing_shared():
    src, dst = _layer(quant_type="fp4", dq=True, seed=1), _layer(quant_type="nf4", dq=False)
    sd = {k: host(v).copy() for k, v in src.state_dict().items()}
    assert dst.load_state_dict(sd) == ([], [])
    assert_same_state(dst.quant_state, src.quant_state)
    np.testing.assert_array_equal(host(dst.bias), host(src.bias))
    before = host(dst.quant_state.packed).copy()
    sd["weight"][...] = 0  # the caller's arrays are not the layer's
    np.testing.assert_array_equal(host(dst.quant_state.packed), before)


def test_a_refused_load_changes_nothing():
    model = _quantized_gpt("nf4", True, seed=0)
    other = _quantized_gpt("fp4", False, seed=1)
    sd = dict(other.state_dict())
    sd["h.1.mlp.proj.weight.quant_map"] = np.zeros(16, np.float32)  # one bad layer, last
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictError, match=r"'h\.1\.mlp\.proj\.weight\.quant_map'"):
        model.load_state_dict(sd)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(host(after[k]).tobytes() == before[k].tobytes() for k in before)


def test_a_float_weight_or_another_shape_is_refused_for_a_4bit_layer():
    layer = _layer((24, 40))
    with pytest.raises(StateDictError, match=r"'weight' holds no 4-bit quant state.*"
                                             r"float32 \(24, 40\)"):
        layer.load_state_dict({"weight": np.zeros((24, 40), np.float32),
                               "bias": np.zeros(24, np.float32)})
    with pytest.raises(StateDictError, match=r"\(40, 24\) but the layer is \(24, 40\)"):
        layer.load_state_dict(_layer((40, 24), bias=False).state_dict() |
                              {"bias": np.zeros(24, np.float32)})


def test_missing_4bit_weight_is_reported_like_a_missing_parameter():
    layer = _layer()
    missing, unexpected = layer.load_state_dict({"bias": np.zeros(24, np.float32)}, strict=False)
    assert "weight" in missing and "weight.absmax" in missing and unexpected == []
    with pytest.raises(StateDictError, match="missing keys.*'weight'"):
        layer.load_state_dict({"bias": np.zeros(24, np.float32)})


def test_the_extra_state_hook_is_general():
    """Any module may keep non-parameter arrays in its state dict (nn.Module's hook)."""
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(np.ones(2, np.float32))
            self.count = np.zeros(3, np.int64)

        def _extra_state(self):
            return {"count": self.count}

        def _owns_extra_key(self, name):
            return name == "count"

        def _load_extra_state(self, state, prefix):
            value = np.asarray(state["count"])
            if value.shape != (3,):
                raise StateDictError(f"{prefix}count: shape {value.shape}")
            return lambda: setattr(self, "count", value.copy())

    net = nn.Sequential(nn.Linear(2, 2), Counter())
    sd = net.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.scale", "1.count"]
    sd = {k: host(v).copy() for k, v in sd.items()} | {"1.count": np.arange(3)}
    net.load_state_dict(sd)
    np.testing.assert_array_equal(net[1].count, np.arange(3))
    with pytest.raises(StateDictError, match=r"1\.count: shape \(4,\)"):
        net.load_state_dict(sd | {"1.count": np.arange(4), "0.bias": np.full(2, 7.0)})
    np.testing.assert_array_equal(net[1].count, np.arange(3))
    assert not np.any(host(net[0].bias) == 7.0)  # nothing changed, parameters included
    assert net.load_state_dict({k: v for k, v in sd.items() if k != "1.count"},
                               strict=False)[0] == ["1.count"]


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("quant_type,dq", SETTINGS)
@pytest.mark.parametrize("blocksize", [16, 64])
def test_checkpoint_of_a_quantized_gpt_loads_back_as_quantlinear_bit_for_bit(
        tmp_path, quant_type, dq, blocksize):
    model = _quantized_gpt(quant_type, dq, blocksize)
    x = _tokens()
    save_checkpoint(tmp_path, model, model_config=CFG)
    ml.manual_seed(123)  # the rebuilt model's random init must not matter
    again, ckpt = load_model(tmp_path)
    assert not again.training
    for i in range(CFG.n_layer):
        for path in LINEARS:
            a = again.get_submodule(f"h.{i}.{path}")
            b = model.get_submodule(f"h.{i}.{path}")
            assert type(a) is QL.QuantLinear
            assert_same_state(a.quant_state, b.quant_state)
            assert host(a.bias).tobytes() == host(b.bias).tobytes()
    np.testing.assert_array_equal(_logits(again, x), _logits(model, x))
    assert ckpt.weights["h.0.attn.q_proj.weight"].dtype == np.uint8


@given(n_embd=st.sampled_from([8, 24, 40]), blocksize=st.sampled_from([16, 32, 256]),
       setting=st.sampled_from(SETTINGS), bias=st.booleans(), seed=st.integers(0, 999))
def test_checkpoint_round_trip_for_any_sizes(n_embd, blocksize, setting, bias, seed):
    cfg = GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=n_embd, bias=bias)
    model = _quantized_gpt(*setting, blocksize=blocksize, seed=seed, cfg=cfg)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, model_config=cfg)
        again, _ = load_model(d)
    for path, mod in model.named_modules():
        if isinstance(mod, QL.QuantLinear):
            assert_same_state(again.get_submodule(path).quant_state, mod.quant_state)
    x = np.random.default_rng(seed).integers(0, 11, (1, 4))
    np.testing.assert_array_equal(_logits(again, x), _logits(model, x))


def test_a_partly_quantized_model_keeps_its_float_layers(tmp_path):
    ml.manual_seed(0)
    model = QL.quantize_model(GPT(CFG), skip=("fc", "h.1.attn.v_proj"))
    save_checkpoint(tmp_path, model, model_config=CFG)
    again, _ = load_model(tmp_path)
    for path, mod in model.named_modules():
        assert type(again.get_submodule(path)) is type(mod), path
    assert type(again.h[0].mlp.fc) is nn.Linear and type(again.h[1].attn.v_proj) is nn.Linear
    np.testing.assert_array_equal(_logits(again, _tokens()), _logits(model, _tokens()))


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_a_quantized_base_round_trips(tmp_path, dora):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "fc"),
                          use_dora=dora)
    model = lora.inject_lora(_quantized_gpt("nf4", True), cfg)
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data[...] = B.asarray(rng.standard_normal(p.shape).astype(np.float32) * 0.1)
    x = _tokens()
    save_checkpoint(tmp_path, model, model_config=CFG)
    ckpt = load_checkpoint(tmp_path)
    assert "h.0.attn.q_proj.base_layer.weight.quant_state.bitsandbytes__nf4" in ckpt.weights
    # the documented way: build, inject, swap in the 4-bit layers from the file, restore
    ml.manual_seed(9)
    again = lora.inject_lora(GPT(CFG), cfg)
    replaced = QL.load_quantized_layers(again, ckpt.weights)
    assert "h.0.attn.q_proj.base_layer" in replaced and "h.1.attn.o_proj" in replaced
    restore(ckpt, again)
    for path, mod in model.named_modules():
        if isinstance(mod, QL.QuantLinear):
            mine = again.get_submodule(path)
            assert type(mine) is QL.QuantLinear
            assert_same_state(mine.quant_state, mod.quant_state)
    assert again.h[0].attn.q_proj.is_quantized
    np.testing.assert_array_equal(_logits(again, x), _logits(model, x))
    # restore alone also takes the 4-bit states into a model quantized another way
    other = lora.inject_lora(_quantized_gpt("fp4", False, blocksize=64, seed=5), cfg)
    restore(ckpt, other)
    np.testing.assert_array_equal(_logits(other, x), _logits(model, x))
    # load_model cannot guess the LoRA config: it says what to do
    with pytest.raises(CheckpointError, match=r"base_layer.*inject_lora"):
        load_model(tmp_path)


def test_load_quantized_layers_checks_every_layer_before_replacing_any():
    sd = dict(_quantized_gpt().state_dict())
    model = GPT(CFG)
    small = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16))
    QL.quantize_model(small)
    sd.update({k: v for k, v in small.state_dict().items() if k.startswith("h.1.mlp.proj.")})
    with pytest.raises(StateDictError, match=r"'h\.1\.mlp\.proj\.weight'.*\(16, 64\).*"
                                             r"\(32, 128\)"):
        QL.load_quantized_layers(model, sd)
    assert not any(isinstance(m, QL.QuantLinear) for m in model.modules())
    with pytest.raises(StateDictError, match=r"'wte'.*a Embedding"):
        QL.load_quantized_layers(model, _blobbed("wte"))
    with pytest.raises(StateDictError, match=r"'h\.0\.nothing'.*no module"):
        QL.load_quantized_layers(model, _blobbed("h.0.nothing"))


def _blobbed(path):
    """A state dict with one 4-bit (32, 32) layer at ``path``."""
    return QL.bnb_state_from_quant_linear(_layer((32, 32), bias=False), path)


# ------------------------------------------------------------------------------ forged input

def _forgeable(dq=True, quant_type="nf4"):
    """A (24, 40) layer's arrays at prefix "h.0.attn.q_proj." (blocksize 64: 15 blocks)."""
    return dict(QL.bnb_state_from_quant_linear(_layer((24, 40), quant_type, dq),
                                               "h.0.attn.q_proj"))


W = "h.0.attn.q_proj.weight"
NF4_BLOB = f"{W}.quant_state.bitsandbytes__nf4"


def _reblob(sd, key=NF4_BLOB, new_key=None, **changes):
    meta = json.loads(sd[key].tobytes().decode())
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    del sd[key]
    sd[new_key or key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return sd


def _raw_blob(sd, raw: bytes):
    sd[NF4_BLOB] = np.frombuffer(raw, np.uint8).copy()
    return sd


FORGERIES = {
    "shape not matching the packed bytes": (
        lambda sd: _reblob(sd, shape=[24, 42]),
        rf"'{W}' is uint8 \(480, 1\).*shape \[24, 42\].*needs uint8 \(504, 1\)"),
    "a huge shape": (
        lambda sd: _reblob(sd, shape=[2**40, 2**40]),
        rf"'{W}' is uint8 \(480, 1\).*needs uint8 \(604462909807314587353088, 1\)"),
    "packed bytes cut short": (
        lambda sd: sd | {W: sd[W][:-1]}, rf"'{W}' is uint8 \(479, 1\).*needs uint8 \(480, 1\)"),
    "packed bytes as int8": (
        lambda sd: sd | {W: sd[W].view(np.int8)}, rf"'{W}' is int8 \(480, 1\).*needs uint8"),
    "one absmax too many": (
        lambda sd: sd | {f"{W}.absmax": np.zeros(16, np.uint8)},
        rf"'{W}.absmax' is uint8 \(16,\).*needs uint8 \(15,\)"),
    "float absmax with double quant": (
        lambda sd: sd | {f"{W}.absmax": np.ones(15, np.float32)},
        rf"'{W}.absmax' is float32 \(15,\).*needs uint8 \(15,\)"),
    "nested absmax count wrong": (
        lambda sd: sd | {f"{W}.nested_absmax": np.ones(2, np.float32)},
        rf"'{W}.nested_absmax' is float32 \(2,\).*nested_blocksize 256.*needs float32 \(1,\)"),
    "unknown quant_type in the key": (
        lambda sd: _reblob(sd, new_key=f"{W}.quant_state.bitsandbytes__af4", quant_type="af4"),
        r"names quant state 'bitsandbytes__af4', an unknown quant_type"),
    "int4 under bitsandbytes' name": (
        lambda sd: _reblob(sd, new_key=f"{W}.quant_state.bitsandbytes__int4", quant_type="int4"),
        r"'bitsandbytes__int4', an unknown quant_type"),
    "blob and key disagree": (
        lambda sd: _reblob(sd, quant_type="fp4"),
        r"the blob says quant_type 'fp4', its key says 'nf4'"),
    "blocksize 2**40": (
        lambda sd: _reblob(sd, blocksize=2**40), r"blocksize must be at most MAX_BLOCKSIZE"),
    "blocksize 0": (lambda sd: _reblob(sd, blocksize=0), r"blocksize must be a power of two"),
    "blocksize 48": (lambda sd: _reblob(sd, blocksize=48), r"power of two.*got 48"),
    "blocksize 64.0": (lambda sd: _reblob(sd, blocksize=64.0), r"power of two.*got 64\.0"),
    "blocksize true": (lambda sd: _reblob(sd, blocksize=True), r"power of two.*got True"),
    "nested_blocksize -256": (
        lambda sd: _reblob(sd, nested_blocksize=-256), r"nested_blocksize must be a power"),
    "a zero in the shape": (
        lambda sd: _reblob(sd, shape=[0, 40]), r"shape must be a list of 1 to 32 positive ints"),
    "shape not a list": (
        lambda sd: _reblob(sd, shape="24x40"), r"shape must be a list.*'24x40'"),
    "dtype int8": (lambda sd: _reblob(sd, dtype="int8"), r"dtype must be one of.*'int8'"),
    "nested_dtype float16": (
        lambda sd: _reblob(sd, nested_dtype="float16"), r"nested_dtype must be 'float32'"),
    "offset NaN": (
        lambda sd: _reblob(sd, nested_offset=math.nan), r"nested_offset must be a finite"),
    "offset beyond float32": (
        lambda sd: _reblob(sd, nested_offset=1e39), r"nested_offset must be a finite"),
    "offset a string": (
        lambda sd: _reblob(sd, nested_offset="0.1"), r"nested_offset must be a finite"),
    "half the nested fields": (
        lambda sd: _reblob(sd, nested_dtype=None),
        r"lacks fields \['nested_dtype'\] and has unknown fields \[\]"),
    "an unknown field": (
        lambda sd: _reblob(sd, compressed=True), r"unknown fields \['compressed'\]"),
    "blob not JSON": (lambda sd: _raw_blob(sd, b'{"quant_type": '), r"is not valid JSON"),
    "blob not UTF-8": (lambda sd: _raw_blob(sd, b"\xff\xfe"), r"is not UTF-8"),
    "blob a list": (lambda sd: _raw_blob(sd, b"[1, 2]"), r"must be a JSON object, got list"),
    "duplicate field": (
        lambda sd: _raw_blob(sd, b'{"blocksize": 64, "blocksize": 32}'), r"appears twice"),
    "blob too large": (
        lambda sd: _raw_blob(sd, b" " * (BF.MAX_BLOB_BYTES + 1)), r"at most MAX_BLOB_BYTES"),
    "blob not uint8": (
        lambda sd: sd | {NF4_BLOB: sd[NF4_BLOB].astype(np.float32)},
        r"must be a 1-D (uint8 array|U8 tensor)"),
    "two blobs": (
        lambda sd: sd | {f"{W}.quant_state.bitsandbytes__fp4": sd[NF4_BLOB]},
        r"has 2 quant-state blobs"),
    "a missing key": (
        lambda sd: {k: v for k, v in sd.items() if k != f"{W}.nested_quant_map"},
        rf"missing key '{W}.nested_quant_map' \(float32 \(256,\)\)"),
    "an unexpected key": (
        lambda sd: sd | {f"{W}.SCB": np.zeros(3, np.float32)}, rf"unexpected key '{W}.SCB'"),
    "nested keys without double quant": (
        lambda sd: _reblob(sd, nested_blocksize=None, nested_dtype=None, nested_offset=None),
        rf"unexpected key '{W}.nested_absmax' next to a nf4 weight \(no double quant\)"),
    "a uint8 absmax without double quant": (
        lambda sd: _reblob({k: v for k, v in sd.items() if ".nested_" not in k},
                           nested_blocksize=None, nested_dtype=None, nested_offset=None),
        rf"'{W}.absmax' is uint8 \(15,\).*needs float32 \(15,\)"),
}
# forgeries only the values show (the layout fits): caught when the arrays are read
VALUE_FORGERIES = {
    "another code table": (
        lambda sd: sd | {f"{W}.quant_map": np.linspace(-1, 1, 16, dtype=np.float32)},
        rf"'{W}.quant_map' is not minilora's nf4 table: entry 1"),
    "the fp4 table for nf4": (
        lambda sd: sd | {f"{W}.quant_map": Q.FP4_CODE.copy()},
        r"is not minilora's nf4 table: entry 0 is np.float32\(0.0\), expected .*-1\.0"),
    "another 8-bit map": (
        lambda sd: sd | {f"{W}.nested_quant_map": np.zeros(256, np.float32)},
        rf"'{W}.nested_quant_map' is not the 8-bit dynamic map"),
    "NaN nested absmax": (
        lambda sd: sd | {f"{W}.nested_absmax": np.full(1, np.nan, np.float32)},
        rf"'{W}.nested_absmax' holds a non-finite value"),
    "a negative nested absmax": (
        lambda sd: sd | {f"{W}.nested_absmax": -sd[f"{W}.nested_absmax"]},
        rf"'{W}.nested_absmax' holds a negative scale \(np.float32\(-.*at block 0\)"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES) + sorted(VALUE_FORGERIES))
def test_forged_state_dicts_are_refused_naming_the_key(name):
    forge, message = {**FORGERIES, **VALUE_FORGERIES}[name]
    sd = forge(_forgeable())
    with pytest.raises(StateDictError, match=message):
        QL.quant_linear_from_bnb_state(sd, "h.0.attn.q_proj")


def test_float_absmax_must_be_finite_and_not_negative():
    sd = _forgeable(dq=False)
    sd[f"{W}.absmax"] = sd[f"{W}.absmax"].copy()
    sd[f"{W}.absmax"][3] = np.inf
    with pytest.raises(StateDictError, match=rf"'{W}.absmax' holds a non-finite value.*block 3"):
        QL.quant_linear_from_bnb_state(sd, "h.0.attn.q_proj")
    sd[f"{W}.absmax"][3] = -0.5  # a scale below 0 would turn block 3's weights around
    with pytest.raises(StateDictError, match=rf"'{W}.absmax' holds a negative scale "
                                             rf"\(np.float32\(-0.5\) at block 3\)"):
        QL.quant_linear_from_bnb_state(sd, "h.0.attn.q_proj")
    sd[f"{W}.absmax"][3] = -0.0  # the sign of a zero scale changes nothing: accepted
    QL.quant_linear_from_bnb_state(sd, "h.0.attn.q_proj")


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_files_are_refused_from_the_header_before_the_tensors_are_read(tmp_path, name,
                                                                               monkeypatch):
    forge, message = FORGERIES[name]
    path = tmp_path / "model.safetensors"
    save_file(forge(_forgeable()) | {"wte.weight": np.zeros((4, 4), np.float32)}, str(path))
    read = []
    real = tensorfile._read_exact
    monkeypatch.setattr(tensorfile, "_read_exact",
                        lambda f, info, *a: read.append(info.name) or real(f, info, *a))
    infos, _ = tensorfile.read_header(path, "load_checkpoint")
    with pytest.raises(CheckpointError, match=message) as err:
        BF.check_quantized_file(path, infos, "load_checkpoint")
    assert str(path) in str(err.value)
    assert all(".quant_state." in k for k in read), read  # only the small blobs were read


def _forged_checkpoint(directory, monkeypatch, forge):
    """A checkpoint whose manifest and digests are right but whose 4-bit layer lies."""
    model = _quantized_gpt()
    target = model.h[0].attn.q_proj
    real = QL.QuantLinear._extra_state

    def lying(self):  # the (24, 40) layer of _forgeable, forged, in place of q_proj's weight
        if self is not target:
            return real(self)
        full = forge({k: v for k, v in _forgeable().items() if k != "h.0.attn.q_proj.bias"})
        return {k[len("h.0.attn.q_proj."):]: v for k, v in full.items()}
    with monkeypatch.context() as m:
        m.setattr(QL.QuantLinear, "_extra_state", lying)
        save_checkpoint(directory, model, model_config=CFG)


@pytest.mark.parametrize("name", ["shape not matching the packed bytes", "one absmax too many",
                                  "unknown quant_type in the key", "blocksize 2**40",
                                  "a huge shape"])
def test_a_checkpoint_with_a_forged_4bit_layer_is_refused_before_it_is_read(tmp_path, name,
                                                                            monkeypatch):
    forge, message = FORGERIES[name]
    _forged_checkpoint(tmp_path, monkeypatch, forge)
    read = []
    real = tensorfile._read_exact
    monkeypatch.setattr(tensorfile, "_read_exact",
                        lambda f, info, *a: read.append(info.name) or real(f, info, *a))
    for call in (load_checkpoint, load_model):
        read.clear()
        with pytest.raises(CheckpointError, match=message):
            call(tmp_path)
        assert all(".quant_state." in k for k in read), read
        assert read or name == "unknown quant_type in the key"  # the blob was read, only it


@pytest.mark.parametrize("name", sorted(VALUE_FORGERIES))
def test_a_checkpoint_with_a_forged_table_is_refused_when_loaded(tmp_path, name, monkeypatch):
    forge, message = VALUE_FORGERIES[name]
    _forged_checkpoint(tmp_path, monkeypatch, forge)
    with pytest.raises(CheckpointError, match=r"does not fit this model.*" + message):
        load_model(tmp_path)


def test_integer_tensors_are_refused_outside_4bit_layers(tmp_path, monkeypatch):
    model = _quantized_gpt()
    real = nn.Module.state_dict
    monkeypatch.setattr(nn.Module, "state_dict", lambda self: {
        k: (v.astype(np.int32) if k == "h.0.ln_1.weight" else v) for k, v in real(self).items()})
    save_checkpoint(tmp_path, model, model_config=CFG)
    with pytest.raises(CheckpointError, match=r"'h\.0\.ln_1\.weight' has dtype I32, where floats"
                                              r" belong.*codes of a 4-bit layer"):
        load_checkpoint(tmp_path)
    # and an integer tensor that only pretends to sit next to a 4-bit layer
    path = tmp_path / "x.safetensors"
    sd = _forgeable() | {f"{W}.extra_codes": np.zeros(3, np.uint8)}
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=rf"unexpected key '{W}.extra_codes'"):
        BF.check_quantized_file(path, tensorfile.read_header(path, "t")[0], "t")


def test_a_float_checkpoint_reads_as_before(tmp_path):
    ml.manual_seed(0)
    model = GPT(CFG)
    save_checkpoint(tmp_path, model, model_config=CFG)
    infos, _ = tensorfile.read_header(tmp_path / MODEL_FILE, "t")
    assert BF.check_quantized_file(tmp_path / MODEL_FILE, infos, "t") == set()
    again, _ = load_model(tmp_path)
    assert not any(isinstance(m, QL.QuantLinear) for m in again.modules())
    np.testing.assert_array_equal(_logits(again, _tokens()), _logits(model, _tokens()))
