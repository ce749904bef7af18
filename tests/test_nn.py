"""minilora.nn: registration, state dicts, modes, and the layers' layouts, inits and behaviour."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import functional as F
from minilora.errors import DTypeError, InvalidArgumentError, ShapeError, StateDictError
from minilora.nn import (
    GELU,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    ModuleDict,
    ModuleList,
    Parameter,
    Sequential,
    Tanh,
    keep_host_rng,
)
from tests.helpers import host, numeric_grad


class Block(Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.scale = Parameter(B.asarray(np.ones(d, np.float32)))
        self.fc = Linear(d, d)
        self.norm = LayerNorm(d)
        self.drop = Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(self.fc(x) * self.scale))


class Net(Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Embedding(10, 4)
        self.blocks = ModuleList([Block(), Block()])
        self.head = Linear(4, 3, bias=False)


def snapshot(module):
    return {k: host(v).copy() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- registration

def test_parameters_and_submodules_found_by_dotted_path():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == [
        "embed.weight",
        "blocks.0.scale", "blocks.0.fc.weight", "blocks.0.fc.bias",
        "blocks.0.norm.weight", "blocks.0.norm.bias",
        "blocks.1.scale", "blocks.1.fc.weight", "blocks.1.fc.bias",
        "blocks.1.norm.weight", "blocks.1.norm.bias",
        "head.weight",
    ]
    assert list(net.state_dict()) == names
    modules = dict(net.named_modules())
    assert modules[""] is net and modules["blocks.1.fc"] is net.blocks[1].fc
    assert net.get_submodule("blocks.1.norm") is net.blocks[1].norm
    assert net.get_submodule("") is net
    assert list(net.children()) == [net.embed, net.blocks, net.head]
    with pytest.raises(InvalidArgumentError, match="'nope'.*'blocks.nope'"):
        net.get_submodule("blocks.nope")


def test_plain_tensors_and_values_are_not_registered():
    block = Block()
    block.buffer = ml.Tensor(np.zeros(3, np.float32))  # a Tensor, not a Parameter
    block.note = "hello"
    assert "buffer" not in dict(block.named_parameters())
    assert len(block.parameters()) == 5


def test_reassigning_replaces_and_deleting_removes():
    block = Block()
    block.fc = Linear(4, 4, bias=False)
    assert "fc.bias" not in dict(block.named_parameters())
    block.fc = None  # a module slot cleared
    assert not any(n.startswith("fc.") for n, _ in block.named_parameters())
    block.fc = Parameter(np.zeros(2, np.float32))  # the same name, now a parameter
    assert "fc" in dict(block.named_parameters())
    assert "fc" not in dict(block.named_modules())
    del block.scale
    assert "scale" not in dict(block.named_parameters())
    assert not hasattr(block, "scale")


def test_replacing_keeps_the_place_in_the_order():
    """Swapping a layer (as LoRA injection does) must not reorder named_parameters."""
    net = Net()
    before = [n for n, _ in net.named_parameters()]
    net.embed = Embedding(10, 4)
    net.blocks[0].scale = Parameter(np.zeros(4, np.float32))
    assert [n for n, _ in net.named_parameters()] == before


def test_forgetting_super_init_is_explained():
    class Bad(Module):
        def __init__(self) -> None:
            self.fc = Linear(2, 2)

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\).*'fc'"):
        Bad()


def test_tied_parameters_once_in_parameters_twice_in_state_dict():
    class Tied(Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = Embedding(6, 4)
            self.lm_head = Linear(4, 6, bias=False)
            self.lm_head.weight = self.wte.weight

    m = Tied()
    assert len(m.parameters()) == 1
    assert [n for n, _ in m.named_parameters()] == ["wte.weight"]
    assert m.num_parameters() == 24
    sd = m.state_dict()
    assert list(sd) == ["wte.weight", "lm_head.weight"]
    assert sd["wte.weight"] is sd["lm_head.weight"]
    # loading either name writes the one shared array
    new = np.arange(24, dtype=np.float32).reshape(6, 4)
    m.load_state_dict({"wte.weight": new, "lm_head.weight": new})
    np.testing.assert_array_equal(host(m.lm_head.weight), new)


def test_parameter_defaults_and_repr():
    p = Parameter(np.zeros((2, 2), np.float32))
    assert p.requires_grad and isinstance(p, ml.Tensor)
    assert repr(p).startswith("Parameter containing:\nTensor(")
    assert not Parameter(np.zeros(2, np.float32), requires_grad=False).requires_grad
    with pytest.raises(DTypeError):
        Parameter(np.zeros(2, np.int64))


# ----------------------------------------------------------------------------- state dicts

@given(d_in=st.integers(1, 6), d_hidden=st.integers(1, 6), d_out=st.integers(1, 6),
       bias=st.booleans())
def test_state_dict_round_trip(d_in, d_hidden, d_out, bias):
    def make(seed):
        ml.manual_seed(seed)
        return Sequential(Linear(d_in, d_hidden, bias=bias), LayerNorm(d_hidden), GELU(),
                          Linear(d_hidden, d_out, bias=bias))

    src, dst = make(1), make(2)
    sd = {k: host(v).copy() for k, v in src.state_dict().items()}
    params_before = [id(p) for p in dst.parameters()]
    missing, unexpected = dst.load_state_dict(sd)
    assert missing == [] and unexpected == []
    assert [id(p) for p in dst.parameters()] == params_before  # copied in place, same objects
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(host(v), sd[k])
    x = ml.Tensor(np.random.default_rng(0).standard_normal((3, d_in)).astype(np.float32))
    np.testing.assert_array_equal(host(dst(x)), host(src(x)))
    # the values were copied, not aliased: changing the source dict afterwards changes nothing
    first = next(iter(sd))
    sd[first] += 1.0
    assert not np.array_equal(host(dst.state_dict()[first]), sd[first])


def test_state_dict_holds_the_parameters_own_arrays():
    fc = Linear(3, 2)
    assert fc.state_dict()["weight"] is fc.weight.data


def test_load_state_dict_strict_names_missing_and_unexpected_keys():
    net = Net()
    sd = snapshot(net)
    del sd["blocks.1.fc.bias"]
    sd["blocks.7.fc.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(StateDictError) as info:
        net.load_state_dict(sd)
    msg = str(info.value)
    assert "missing keys ['blocks.1.fc.bias']" in msg
    assert "unexpected keys ['blocks.7.fc.weight']" in msg


def test_load_state_dict_non_strict_loads_the_rest():
    fc = Linear(3, 2)
    new_w = np.full((2, 3), 0.25, np.float32)
    old_b = host(fc.bias).copy()
    missing, unexpected = fc.load_state_dict({"weight": new_w, "extra": np.zeros(1)},
                                             strict=False)
    assert missing == ["bias"] and unexpected == ["extra"]
    np.testing.assert_array_equal(host(fc.weight), new_w)
    np.testing.assert_array_equal(host(fc.bias), old_b)


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_names_key_and_both_shapes(strict):
    net = Net()
    sd = snapshot(net)
    sd["blocks.0.fc.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(StateDictError, match=r"'blocks.0.fc.weight'.*\(4, 5\).*\(4, 4\)"):
        net.load_state_dict(sd, strict=strict)


def test_failing_load_changes_nothing():
    net = Net()
    before = snapshot(net)
    # every other value is new, but one shape is wrong: nothing at all may be written
    sd = {k: v + 1.0 for k, v in before.items()}
    sd["head.weight"] = np.zeros((4, 3), np.float32)
    with pytest.raises(StateDictError):
        net.load_state_dict(sd)
    after = snapshot(net)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    # and likewise when a key is missing under strict
    sd = {k: v + 1.0 for k, v in before.items() if k != "embed.weight"}
    with pytest.raises(StateDictError):
        net.load_state_dict(sd)
    after = snapshot(net)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_load_keeps_the_parameters_dtype():
    fc = Linear(2, 2)
    fc.load_state_dict({"weight": np.ones((2, 2), np.float64), "bias": np.ones(2, np.float64)})
    assert fc.weight.dtype == np.float32 and fc.bias.dtype == np.float32


# ------------------------------------------------------------------------ modes and grads

def test_train_eval_propagate():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.blocks[0].train()  # a subtree only
    assert net.blocks[0].drop.training and not net.blocks[1].drop.training and not net.training
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_forgets_gradients():
    fc = Linear(3, 2)
    fc(ml.Tensor(np.ones((4, 3), np.float32))).sum().backward()
    assert fc.weight.grad is not None and fc.bias.grad is not None
    fc.zero_grad()
    assert fc.weight.grad is None and fc.bias.grad is None


def test_requires_grad_false_freezes():
    mlp = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    assert mlp.requires_grad_(False) is mlp
    assert not any(p.requires_grad for p in mlp.parameters())
    assert mlp.num_parameters(trainable_only=True) == 0
    assert mlp.num_parameters() == 3 * 4 + 4 + 4 * 2 + 2
    x = ml.Tensor(np.ones((5, 3), np.float32), requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None for p in mlp.parameters())
    # nothing requires grad at all: no graph is recorded
    assert not mlp(ml.Tensor(np.ones((5, 3), np.float32))).requires_grad
    mlp[2].requires_grad_(True)
    assert mlp.num_parameters(trainable_only=True) == 10


def test_double_and_float_cast_parameters():
    mlp = Sequential(Linear(3, 4), LayerNorm(4), Linear(4, 2))
    mlp(ml.Tensor(np.ones((2, 3), np.float32))).sum().backward()
    before = [host(p).astype(np.float64) for p in mlp.parameters()]
    assert mlp.double() is mlp
    assert all(p.dtype == np.float64 and p.grad is None for p in mlp.parameters())
    for b, p in zip(before, mlp.parameters()):
        np.testing.assert_array_equal(host(p), b)
    assert mlp(ml.Tensor(np.ones((2, 3), np.float64))).dtype == np.float64
    mlp.float()
    assert all(p.dtype == np.float32 for p in mlp.parameters())


# ---------------------------------------------------------------------------------- Linear

@given(d_in=st.integers(1, 7), d_out=st.integers(1, 7), lead=st.sampled_from([(), (3,), (2, 3)]),
       bias=st.booleans())
def test_linear_layout_and_math(d_in, d_out, lead, bias):
    fc = Linear(d_in, d_out, bias=bias, dtype=np.float64)
    assert fc.weight.shape == (d_out, d_in)
    assert (fc.bias is None) != bias
    assert list(fc.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    x = np.random.default_rng(d_in).standard_normal(lead + (d_in,))
    y = fc(ml.Tensor(x))
    expected = x @ host(fc.weight).T + (host(fc.bias) if bias else 0.0)
    assert y.shape == lead + (d_out,)
    np.testing.assert_allclose(host(y), expected, rtol=1e-12, atol=1e-12)


def test_linear_rejects_wrong_input_and_bad_sizes():
    fc = Linear(3, 2)
    with pytest.raises(ShapeError, match=r"linear.*\(5, 4\).*\(2, 3\)"):
        fc(ml.Tensor(np.ones((5, 4), np.float32)))
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(InvalidArgumentError, match="in_features"):
            Linear(bad, 2)
        with pytest.raises(InvalidArgumentError, match="out_features"):
            Linear(2, bad)


def test_linear_init_bounds_match_pytorch():
    """W and b are uniform in [-1/sqrt(in), 1/sqrt(in)]: bounded, centred, variance bound^2/3."""
    d_in = 1024
    fc = Linear(d_in, 512)
    bound = 1.0 / math.sqrt(d_in)
    w = host(fc.weight).astype(np.float64)
    b = host(fc.bias).astype(np.float64)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert w.max() > 0.999 * bound and w.min() < -0.999 * bound  # the whole range is used
    # 524,288 draws: the sample mean's std is bound/sqrt(3n) ~ 8e-4 * bound
    assert abs(w.mean()) < 0.005 * bound
    assert abs(w.var() / (bound**2 / 3) - 1) < 0.01
    # the same for a small fan-in: the bound follows in_features, not out_features
    small = host(Linear(4, 2000).weight)
    assert np.abs(small).max() <= 0.5 and np.abs(small).max() > 0.49


# ------------------------------------------------------------------- Embedding, LN, Dropout

def test_embedding_lookup_init_and_backward():
    emb = Embedding(50, 8, dtype=np.float64)
    assert emb.weight.shape == (50, 8)
    idx = np.array([[1, 4, 4], [0, 49, 1]])
    out = emb(idx)
    assert out.shape == (2, 3, 8)
    np.testing.assert_array_equal(host(out), host(emb.weight)[idx])
    g = np.random.default_rng(0).standard_normal((2, 3, 8))
    out.backward(g)
    expected = np.zeros((50, 8))
    np.add.at(expected, idx.reshape(-1), g.reshape(-1, 8))
    np.testing.assert_allclose(host(emb.weight.grad), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 50\)"):
        emb(np.array([3, 50]))
    with pytest.raises(DTypeError, match="integer"):
        emb(np.array([1.0]))


def test_embedding_init_is_standard_normal():
    w = host(Embedding(1000, 256).weight).astype(np.float64)
    assert abs(w.mean()) < 0.01 and abs(w.std() - 1.0) < 0.01


def test_layer_norm_behaviour():
    ln = LayerNorm(6, dtype=np.float64)
    np.testing.assert_array_equal(host(ln.weight), np.ones(6))
    np.testing.assert_array_equal(host(ln.bias), np.zeros(6))
    assert ln.eps == 1e-5
    x = np.random.default_rng(0).standard_normal((3, 4, 6)) * 5 + 2
    y = host(ln(ml.Tensor(x)))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-5)  # eps makes it a little under 1
    rng = np.random.default_rng(1)
    ln.load_state_dict({"weight": rng.standard_normal(6), "bias": rng.standard_normal(6)})
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * host(ln.weight) + host(ln.bias)
    np.testing.assert_allclose(host(ln(ml.Tensor(x))), expected, rtol=1e-12, atol=1e-12)
    assert list(LayerNorm(3, bias=False).state_dict()) == ["weight"]


def test_dropout_behaviour():
    drop = Dropout(0.25)
    x = ml.Tensor(np.ones((200, 100), np.float32), requires_grad=True)
    y = drop(x)
    h = host(y)
    kept = h != 0
    assert abs(kept.mean() - 0.75) < 0.01  # 20,000 draws: std of the fraction ~0.003
    np.testing.assert_allclose(h[kept], 1 / 0.75, rtol=1e-6)
    assert y.dtype == np.float32
    y.sum().backward()
    np.testing.assert_array_equal(host(x.grad), h)  # the gradient goes through the same mask
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0)(x) is x
    assert not host(Dropout(1.0)(x)).any()
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidArgumentError, match=r"p must be a number in \[0, 1\]"):
            Dropout(bad)


# -------------------------------------------------------------------------------- containers

def test_module_list():
    layers = ModuleList([Linear(2, 2), Linear(2, 3)])
    layers.append(Linear(3, 1))
    assert len(layers) == 3
    assert [m.out_features for m in layers] == [2, 3, 1]
    assert layers[-1] is layers[2]
    assert [n for n, _ in layers.named_parameters()][:2] == ["0.weight", "0.bias"]
    with pytest.raises(IndexError, match="3 modules"):
        layers[3]
    with pytest.raises(IndexError):
        layers[-4]
    new = Linear(2, 3, bias=False)
    layers[1] = new
    assert layers[1] is new and "1.bias" not in layers.state_dict()
    tail = layers[1:]
    assert isinstance(tail, ModuleList) and list(tail) == [layers[1], layers[2]]
    assert len(ModuleList()) == 0
    with pytest.raises(IndexError):
        ModuleList()[0]


def test_sequential_composes_in_order():
    ml.set_default_dtype(np.float64)
    seq = Sequential(Linear(3, 5), GELU(), Linear(5, 2), Tanh())
    x = ml.Tensor(np.random.default_rng(0).standard_normal((4, 3)))
    manual = seq[3](seq[2](seq[1](seq[0](x))))
    np.testing.assert_array_equal(host(seq(x)), host(manual))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    head = seq[:2]
    assert isinstance(head, Sequential)
    np.testing.assert_array_equal(host(head(x)), host(F.gelu(seq[0](x))))


def test_repr():
    assert repr(Linear(3, 2)) == "Linear(in_features=3, out_features=2, bias=True)"
    assert repr(Embedding(10, 4)) == "Embedding(10, 4)"
    assert repr(LayerNorm(4)) == "LayerNorm((4,), eps=1e-05)"
    assert repr(Dropout(0.1)) == "Dropout(p=0.1)"
    text = repr(Sequential(Linear(3, 2, bias=False), Sequential(GELU())))
    assert text == ("Sequential(\n"
                    "  (0): Linear(in_features=3, out_features=2, bias=False)\n"
                    "  (1): Sequential(\n"
                    "    (0): GELU()\n"
                    "  )\n"
                    ")")


# ----------------------------------------------------------------------- gradient check

def test_mlp_gradients_match_finite_differences():
    """Every parameter's gradient and the input's, against central differences, in float64."""
    ml.set_default_dtype(np.float64)
    ml.manual_seed(3)
    mlp = Sequential(Linear(3, 5), LayerNorm(5), GELU(), Linear(5, 4), Tanh(), Linear(4, 4))
    rng = np.random.default_rng(0)
    x = ml.Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    targets = np.array([1, 3])
    for p in mlp.parameters():  # LayerNorm starts at 1 and 0: move it off that special point
        p.data += B.asarray(0.1 * rng.standard_normal(p.shape))

    def loss():
        return F.cross_entropy(mlp(x), targets)

    def value():
        with ml.no_grad():
            return float(loss().item())

    loss().backward()
    for name, p in [("x", x)] + list(mlp.named_parameters()):
        assert p.grad is not None, name
        np.testing.assert_allclose(host(p.grad), numeric_grad(value, p.data), rtol=1e-5,
                                   atol=1e-8, err_msg=name)


# ---------------------------------------------------------------- ModuleDict, set_submodule

def test_module_dict_keys_any_name_and_keeps_them_out_of_the_attributes():
    d = ModuleDict({"b": Linear(2, 2)})
    d["train"] = Linear(2, 3)  # a method's name: stays a key, the method stays a method
    d["a-1"] = Linear(3, 1)
    assert list(d) == d.keys() == ["b", "train", "a-1"] and len(d) == 3 and "train" in d
    assert callable(d.train) and d.train() is d
    assert [k for k, _ in d.items()] == d.keys() and d.values()[1] is d["train"]
    holder = Module()
    holder.adapters = d
    assert list(holder.state_dict()) == [f"adapters.{k}.{p}" for k in ("b", "train", "a-1")
                                         for p in ("weight", "bias")]
    assert holder.get_submodule("adapters.a-1") is d["a-1"]
    del d["b"]
    assert d.keys() == ["train", "a-1"] and "adapters.b.weight" not in holder.state_dict()
    for bad in ("", "x.y", 3):
        with pytest.raises(InvalidArgumentError, match="ModuleDict: a key must be"):
            d[bad] = Linear(1, 1)
    with pytest.raises(InvalidArgumentError, match=r"ModuleDict: \['c'\] must be a Module"):
        d["c"] = Parameter(np.zeros(2))


def test_set_submodule_replaces_in_place_keeping_the_order():
    net = Sequential(Linear(3, 4), Block(4), Linear(4, 2))
    before = list(net.state_dict())
    new = Linear(4, 4)
    net.set_submodule("1.fc", new)
    assert net[1].fc is new and list(net.state_dict()) == before
    net.set_submodule("2", Linear(4, 2, bias=False))
    assert net[2].bias is None and len(net) == 3
    holder = Module()
    holder.d = ModuleDict({"x": Linear(1, 1)})
    holder.set_submodule("d.x", Linear(1, 2))
    holder.set_submodule("d.y", Linear(1, 3))  # strict=False may add, as torch
    assert holder.d.keys() == ["x", "y"] and holder.d["x"].out_features == 2
    assert not hasattr(holder.d, "x")  # still a key only


def test_set_submodule_refuses_what_it_cannot_put_in_place():
    net = Sequential(Linear(3, 4), Block(4))
    with pytest.raises(InvalidArgumentError, match="has no submodule 'nope'"):
        net.set_submodule("nope.fc", Linear(1, 1))
    with pytest.raises(InvalidArgumentError, match="holds no module to replace"):
        net.set_submodule("1.extra", Linear(1, 1), strict=True)
    with pytest.raises(InvalidArgumentError, match="holds a parameter or attribute"):
        net.set_submodule("1.fc.weight", Linear(1, 1))
    with pytest.raises(InvalidArgumentError, match="has no index '5'"):
        net.set_submodule("5", Linear(1, 1))
    with pytest.raises(InvalidArgumentError, match="must be a Module"):
        net.set_submodule("0", Parameter(np.zeros(2)))
    for bad in ("", "1..fc", None):
        with pytest.raises(InvalidArgumentError, match="target must be a dotted path"):
            net.set_submodule(bad, Linear(1, 1))
    assert isinstance(net[0], Linear) and net[0].out_features == 4 and len(net) == 2


def test_keep_host_rng_leaves_the_stream_where_it_was():
    ml.manual_seed(3)
    expected = B.host_rng().standard_normal(4)
    ml.manual_seed(3)
    with keep_host_rng():
        Linear(50, 50)  # draws its init
    assert np.array_equal(B.host_rng().standard_normal(4), expected)
