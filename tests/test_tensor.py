"""Behaviour of the autograd engine: accumulation, graph shape, no_grad, detach, frozen inputs,
deep graphs, freed graphs, errors, dtypes, unbroadcast and repr."""

import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minilora as ml
from minilora import backend as B
from minilora import functional as F
from minilora.errors import DTypeError, GraphError, InvalidArgumentError, ShapeError
from minilora.tensor import leaf_grads_into, unbroadcast
from tests.helpers import check_grads, host


def leaf(values, requires_grad=True, dtype=np.float64) -> ml.Tensor:
    return ml.Tensor(B.asarray(np.asarray(values, dtype=dtype)), requires_grad=requires_grad)


# ----------------------------------------------------------------------- accumulation, sharing

def test_gradients_accumulate_over_two_backward_calls():
    x = leaf([1.0, -2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), [2.0, -4.0, 6.0])
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(host(x.grad), [5.0, -1.0, 9.0])
    x.zero_grad()
    assert x.grad is None


def test_a_tensor_used_twice_gets_both_contributions():
    x = leaf([0.5, 2.0])
    (x * x + x).sum().backward()  # d/dx (x^2 + x) = 2x + 1
    np.testing.assert_allclose(host(x.grad), [2.0, 5.0])


def test_a_shared_intermediate_node_is_walked_once_with_summed_gradient():
    x = leaf([0.3, -0.7])
    h = x.exp()  # h feeds three consumers: a diamond in the graph
    (h * h + h - h.tanh()).sum().backward()
    hx = np.exp([0.3, -0.7])
    expected = (2 * hx + 1 - (1 - np.tanh(hx) ** 2)) * hx
    np.testing.assert_allclose(host(x.grad), expected, rtol=1e-12)


def test_leaf_grad_is_a_private_writable_copy():
    # add passes its gradient through unchanged, so both leaves would share one array otherwise
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).backward(grad=np.array([1.0, 1.0]))
    assert a.grad is not b.grad
    a.grad += 1.0  # writable: a broadcast view would raise here
    np.testing.assert_allclose(host(b.grad), [1.0, 1.0])
    c = leaf([[1.0, 2.0]])
    c.sum().backward()  # sum's backward is a read-only broadcast view
    c.grad *= 2.0
    np.testing.assert_allclose(host(c.grad), [[2.0, 2.0]])


def test_intermediate_nodes_keep_no_grad():
    x = leaf([1.0, 2.0])
    y = x * 2.0
    (y * y).sum().backward()
    assert y.grad is None
    np.testing.assert_allclose(host(x.grad), [8.0, 16.0])


# ------------------------------------------------------------------ no_grad, detach, frozen

def test_no_grad_records_nothing():
    x = leaf(np.ones((2, 3)))
    w = leaf(np.ones((4, 3)))
    with ml.no_grad():
        assert not ml.is_grad_enabled()
        outs = [x * 2.0, x @ w.T, x.sum(), x[0], F.gelu(x), F.softmax(x), F.layer_norm(x),
                F.linear(x, w), F.cross_entropy(x, np.array([0, 2])), F.embedding([1, 0], w),
                ml.concatenate([x, x]), ml.stack([x, x]), ml.where(x.data > 0, x, 0.0)]
    assert ml.is_grad_enabled()
    for y in outs:
        assert not y.requires_grad
        assert y._parents == ()
        assert y._backward is None
    with pytest.raises(GraphError):
        outs[2].backward()


def test_no_grad_restores_the_previous_state_after_an_exception_and_nests():
    with pytest.raises(RuntimeError), ml.no_grad():
        raise RuntimeError("inside")
    assert ml.is_grad_enabled()
    with ml.no_grad():
        with ml.no_grad():
            pass
        assert not ml.is_grad_enabled()
    assert ml.is_grad_enabled()


def test_no_grad_is_per_thread():
    seen = []
    with ml.no_grad():
        worker = threading.Thread(target=lambda: seen.append(ml.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


def test_no_input_requiring_grad_records_nothing():
    x = leaf([1.0, 2.0], requires_grad=False)
    y = (x * 2.0).exp()
    assert not y.requires_grad and y._parents == ()


def test_detach_cuts_the_graph_and_shares_data():
    x = leaf([1.0, 2.0])
    d = x.detach()
    assert not d.requires_grad and d._parents == ()
    assert d.data is x.data  # the same array, on every backend
    (d * x * 3.0).sum().backward()  # only the non-detached factor is differentiated
    np.testing.assert_allclose(host(x.grad), [3.0, 6.0])


def test_frozen_weight_in_linear_gets_no_grad_and_no_work():
    x = leaf(np.ones((2, 3)))
    w = leaf(np.ones((4, 3)), requires_grad=False)
    b = leaf(np.zeros(4))
    y = F.linear(x, w, b)
    gx, gw, gb = y._backward(B.asarray(np.ones((2, 4))))
    assert gw is None  # the weight-gradient matmul is skipped, not computed and dropped
    assert gx is not None and gb is not None
    y.sum().backward()
    assert w.grad is None
    np.testing.assert_allclose(host(x.grad), np.full((2, 3), 4.0))
    np.testing.assert_allclose(host(b.grad), [2.0] * 4)


def test_frozen_input_to_linear_gets_no_input_gradient_work():
    x = leaf(np.ones((2, 3)), requires_grad=False)
    w = leaf(np.ones((4, 3)))
    y = F.linear(x, w)
    gx, gw = y._backward(B.asarray(np.ones((2, 4))))
    assert gx is None and gw is not None


FROZEN_SECOND = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
    "matmul": lambda a, b: a @ b,
    "where": lambda a, b: ml.where(np.array([[True, False]] * 2), a, b),
}


@pytest.mark.parametrize("name", FROZEN_SECOND)
@pytest.mark.parametrize("frozen", [0, 1])
def test_closures_return_none_for_frozen_parents(name, frozen):
    a = leaf([[1.0, 2.0], [3.0, 4.0]], requires_grad=frozen != 0)
    b = leaf([[0.5, 1.5], [2.5, 0.5]], requires_grad=frozen != 1)
    y = FROZEN_SECOND[name](a, b)
    grads = y._backward(B.asarray(np.ones(y.shape)))
    assert grads[frozen] is None
    for i, g in enumerate(grads):
        assert (g is None) == (i == frozen)
    y.sum().backward()
    assert (a, b)[frozen].grad is None


def test_frozen_layer_norm_affine_parameters():
    x, w, b = leaf(np.arange(6.0).reshape(2, 3)), leaf(np.ones(3), False), leaf(np.zeros(3))
    y = F.layer_norm(x, w, b)
    gx, gw, gb = y._backward(B.asarray(np.ones((2, 3))))
    assert gw is None and gx is not None and gb is not None


# ------------------------------------------------------------------------------- deep graphs

def test_a_chain_of_10000_ops_backpropagates_without_recursion():
    assert sys.getrecursionlimit() < 10_000 * 2  # the walk would overflow were it recursive
    x = leaf([1.0])
    y = x
    for i in range(10_000):
        y = y * 1.0001 if i % 2 else y + 0.5
    y.sum().backward()
    np.testing.assert_allclose(host(x.grad), [1.0001 ** 5000], rtol=1e-10)


def test_a_deep_graph_with_a_shared_leaf():
    x = leaf([2.0])
    y = x
    for _ in range(10_000):
        y = y + x  # x reached from every level
    y.sum().backward()
    np.testing.assert_allclose(host(x.grad), [10_001.0])


def test_dropping_a_deep_unused_graph_does_not_crash():
    x = leaf([1.0])
    y = x
    for _ in range(50_000):
        y = y * 1.0
    del y  # releasing nested closures must not exhaust the C stack


# -------------------------------------------------------------------------- backward misuse

def test_second_backward_on_a_freed_graph_raises_and_retain_graph_allows_it():
    x = leaf([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(GraphError, match="retain_graph"):
        y.backward()
    x.zero_grad()
    z = (x.exp() * x).sum()
    z.backward(retain_graph=True)
    first = host(x.grad).copy()
    z.backward()
    np.testing.assert_allclose(host(x.grad), 2 * first, rtol=1e-12)


def test_backward_on_a_non_scalar_needs_a_grad():
    x = leaf([1.0, 2.0])
    y = x * 3.0
    with pytest.raises(GraphError, match=r"\(2,\)"):
        y.backward()
    with pytest.raises(ShapeError):
        y.backward(grad=np.ones(3))
    y.backward(grad=np.array([1.0, -1.0]), retain_graph=True)
    np.testing.assert_allclose(host(x.grad), [3.0, -3.0])
    y.backward(grad=ml.Tensor(np.array([2.0, 0.0])))  # a Tensor works as grad too
    np.testing.assert_allclose(host(x.grad), [9.0, -3.0])


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(GraphError):
        leaf([1.0], requires_grad=False).backward()


def test_requires_grad_needs_a_float_tensor():
    with pytest.raises(DTypeError, match="int"):
        ml.Tensor(np.array([1, 2]), requires_grad=True)
    with pytest.raises(DTypeError):
        ml.Tensor(np.array([1, 2])).requires_grad_()


@pytest.mark.host_only("the dtype is refused before any array reaches the device")
@pytest.mark.parametrize("data,dtype", [
    ("abc", "<U3"), (np.array(["a", "b"]), "<U1"), (np.array([object()]), "object"),
    (np.array([1 + 2j]), "complex128"), (b"xy", "|S2")])
def test_a_tensor_holds_numbers_only(data, dtype):
    # a string or object array used to become a Tensor whose first op failed somewhere deep
    with pytest.raises(DTypeError, match=f"must hold numbers.*got dtype {dtype}"):
        ml.Tensor(data)
    for fine in (np.array([True]), np.array([1], np.uint8), 3, [1.5]):
        assert ml.Tensor(fine).data.dtype.kind in "biuf"


# ------------------------------------------------------------------------------ shape errors

SHAPE_ERRORS = [
    ("add", lambda: leaf(np.ones((2, 3))) + leaf(np.ones(4)), (2, 3), (4,)),
    ("sub", lambda: leaf(np.ones((2, 3))) - leaf(np.ones((3, 2))), (2, 3), (3, 2)),
    ("mul", lambda: leaf(np.ones((2, 3))) * leaf(np.ones((2, 2))), (2, 3), (2, 2)),
    ("div", lambda: leaf(np.ones(3)) / leaf(np.ones(2)), (3,), (2,)),
    ("matmul", lambda: leaf(np.ones((2, 3))) @ leaf(np.ones((4, 5))), (2, 3), (4, 5)),
    ("matmul", lambda: leaf(np.ones((2, 2, 3))) @ leaf(np.ones((3, 3, 1))), (2, 2, 3), (3, 3, 1)),
    ("matmul", lambda: leaf(np.ones(3)) @ leaf(np.ones(4)), (3,), (4,)),
    ("reshape", lambda: leaf(np.ones((2, 3))).reshape(4, 2), (2, 3), (4, 2)),
    ("concatenate", lambda: ml.concatenate([leaf(np.ones((2, 3))), leaf(np.ones((2, 4)))]),
     (2, 3), (2, 4)),
    ("stack", lambda: ml.stack([leaf(np.ones(2)), leaf(np.ones(3))]), (2,), (3,)),
    ("where", lambda: ml.where(np.ones(4, bool), leaf(np.ones(3)), 0.0), (4,), (3,)),
    ("linear", lambda: F.linear(leaf(np.ones((2, 3))), leaf(np.ones((5, 4)))), (2, 3), (5, 4)),
    ("linear", lambda: F.linear(leaf(np.ones((2, 3))), leaf(np.ones((5, 3))), leaf(np.ones(4))),
     (5, 3), (4,)),
    ("cross_entropy", lambda: F.cross_entropy(leaf(np.ones((2, 3))), np.array([0, 1, 2])),
     (2, 3), (3,)),
    ("layer_norm", lambda: F.layer_norm(leaf(np.ones((2, 3))), leaf(np.ones(4))), (2, 3), (4,)),
]


@pytest.mark.parametrize("op,make,sa,sb", SHAPE_ERRORS, ids=[f"{s[0]}-{i}" for i, s in
                                                             enumerate(SHAPE_ERRORS)])
def test_shape_errors_name_the_op_and_both_shapes(op, make, sa, sb):
    with pytest.raises(ShapeError) as info:
        make()
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg.startswith(op), msg
    assert str(sa) in msg and str(sb) in msg, msg


def test_bad_arguments_raise_invalid_argument_errors():
    x = leaf(np.ones((2, 3)))
    with pytest.raises(InvalidArgumentError, match="permute"):
        x.permute(0, 0)
    with pytest.raises(InvalidArgumentError, match="split"):
        x.split(0)
    with pytest.raises(InvalidArgumentError, match=r"\[1, 1\]"):
        x.split([1, 1], axis=1)
    with pytest.raises(InvalidArgumentError):
        ml.concatenate([])
    with pytest.raises(InvalidArgumentError):
        ml.stack([])
    with pytest.raises(ShapeError, match="item"):
        x.item()


# -------------------------------------------------------------------------- float32 stays

F32_OPS = {
    "add_scalar": lambda x, w: x + 1.5,
    "radd": lambda x, w: 1.5 + x,
    "rsub": lambda x, w: 2.5 - x,
    "rmul": lambda x, w: 0.1 * x,
    "np_float64_scalar_left": lambda x, w: np.float64(0.1) * x,
    "np_float64_scalar_right": lambda x, w: x + np.float64(0.1),
    "rdiv": lambda x, w: 1.0 / (x * x + 1.0),
    "div_scalar": lambda x, w: x / 3.0,
    "pow_float": lambda x, w: (x * x + 1.0) ** 0.5,
    "pow_int": lambda x, w: x ** 2,
    "rpow": lambda x, w: 2.0 ** x,
    "neg": lambda x, w: -x,
    "exp_log_sqrt": lambda x, w: (x.exp() + 1.0).log().sqrt(),
    "tanh_relu": lambda x, w: x.tanh().relu(),
    "matmul": lambda x, w: x @ w.T,
    "sum_mean": lambda x, w: x.sum(axis=0) + x.mean(axis=-1, keepdims=True),
    "max": lambda x, w: x.max(axis=1),
    "var": lambda x, w: x.var(axis=-1),
    "getitem": lambda x, w: x[np.array([0, 0, 1])] + x[:1, 1:2],
    "shapes": lambda x, w: x.reshape(-1).reshape(3, 2).T.permute(1, 0).transpose(0, 1),
    "concat_split_stack": lambda x, w: ml.stack(ml.split(ml.concatenate([x, x], axis=1), 3, 1)),
    "where": lambda x, w: ml.where(x.data > 0, x, 0.5),
    "masked_fill": lambda x, w: x.masked_fill(x.data < 0, -1e9),
    "gelu": lambda x, w: F.gelu(x),
    "softmax": lambda x, w: F.softmax(x),
    "log_softmax": lambda x, w: F.log_softmax(x, axis=0),
    "layer_norm": lambda x, w: F.layer_norm(x, w[0], w[1]),
    "linear": lambda x, w: F.linear(x, w, w[:, 0]),
    "cross_entropy": lambda x, w: F.cross_entropy(x, np.array([2, -100])),
    "embedding": lambda x, w: F.embedding(np.array([[3, 0, 3]]), w),
    "dropout": lambda x, w: F.dropout(x, 0.3),
    "mse_loss": lambda x, w: F.mse_loss(x, 0.5),
}


@pytest.mark.parametrize("name", F32_OPS)
def test_float32_stays_float32_forward_and_backward(name):
    x = ml.Tensor(np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=np.float32),
                  requires_grad=True)
    w = ml.Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), requires_grad=True)
    y = F32_OPS[name](x, w)
    assert y.dtype == np.float32, f"{name} forward gave {y.dtype}"
    captured = []
    node_grads(y, captured)
    y.backward(grad=np.ones(y.shape, dtype=np.float32))
    for op, g in captured:
        assert g.dtype == np.float32, f"{name}: the backward of {op} made {g.dtype}"
    for t in (x, w):
        assert t.grad is None or t.grad.dtype == np.float32


def node_grads(y: ml.Tensor, captured: list) -> None:
    """Wrap every closure in y's graph to record the dtype of the gradients it returns."""
    for node in y.topological_order():
        if node._backward is None:
            continue

        def spy(g, fn=node._backward, op=node._op):
            out = fn(g)
            captured.extend((op, pg) for pg in out if pg is not None)
            return out
        node._backward = spy


def test_python_floats_become_float32_and_float64_arrays_stay_float64():
    assert ml.Tensor(1.5).dtype == np.float32
    assert ml.Tensor([1.0, 2.0]).dtype == np.float32
    assert ml.tensor(np.ones(2)).dtype == np.float64
    x = leaf([1.0, 2.0])
    assert (x * 0.5 + 1).dtype == np.float64
    assert ml.Tensor(np.array([1, 2])).dtype.kind == "i"


# ----------------------------------------------------------------------------- unbroadcast

@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=1, min_dims=0, max_dims=4, max_side=4),
       seed=st.integers(0, 2**32 - 1))
def test_unbroadcast_is_the_adjoint_of_broadcasting(shapes, seed):
    # <unbroadcast(g), v> == <g, broadcast_to(v)> for all g, v defines the gradient of a broadcast
    (shape,), full = shapes.input_shapes, shapes.result_shape
    rng = np.random.default_rng(seed)
    g, v = rng.standard_normal(full), rng.standard_normal(shape)
    r = unbroadcast(B.asarray(g), shape)
    assert r.shape == shape
    np.testing.assert_allclose(float((r * B.asarray(v)).sum()),  # <r, v> on the device
                               (g * np.broadcast_to(v, full)).sum(), rtol=1e-10, atol=1e-10)


@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=1, min_dims=0, max_dims=4, max_side=4),
       seed=st.integers(0, 2**32 - 1))
def test_unbroadcast_of_a_broadcast_sums_copies(shapes, seed):
    (shape,), full = shapes.input_shapes, shapes.result_shape
    v = np.random.default_rng(seed).standard_normal(shape)
    copies = int(np.prod(full)) // int(np.prod(shape))
    r = unbroadcast(B.xp.broadcast_to(B.asarray(v), full), shape)
    np.testing.assert_allclose(host(r - B.asarray(v) * copies), 0.0, atol=1e-12 * copies)


@pytest.mark.host_only("an identity: the array comes back as it is, no kernel runs")
def test_unbroadcast_keeps_a_gradient_of_the_right_shape_untouched():
    g = B.asarray(np.ones((2, 3)))
    assert unbroadcast(g, (2, 3)) is g


# ------------------------------------------------------------------------------ the basics

def test_repr_shows_values_dtype_and_graph():
    x = ml.Tensor([1.0, 2.0], requires_grad=True)
    r = repr(x)
    assert r.startswith("Tensor(") and "1." in r and "float32" in r and "requires_grad=True" in r
    assert "grad_fn=mul" in repr(x * 2.0)
    assert "requires_grad" not in repr(ml.Tensor([1.0]))
    big = repr(ml.Tensor(np.arange(1000.0)))
    assert "..." in big and len(big) < 200


def test_properties_item_numpy_len():
    x = ml.Tensor(np.arange(6.0).reshape(2, 3))
    assert x.shape == (2, 3) and x.ndim == 2 and x.size == 6 and len(x) == 2
    assert x.dtype == np.float64
    assert x[1, 2].item() == 5.0 and isinstance(x[1, 2].item(), float)
    np.testing.assert_array_equal(x.numpy(), np.arange(6.0).reshape(2, 3))
    assert x.argmax(axis=1).numpy().tolist() == [2, 2]
    assert ml.Tensor(x).shape == (2, 3)  # from another tensor


def test_argmax_is_outside_the_graph():
    x = leaf([[1.0, 3.0]])
    assert not x.argmax().requires_grad


@given(st.integers(0, 2**16))
def test_gradient_sums_formed_in_place_leave_other_branches_alone(seed):
    """add hands one gradient array to both its parents p and q; each gets more from a chain
    of its own, and whichever sum is formed first must not write into the array q still needs.
    The caller's seed gradient is an array nobody may write into either."""
    ml.set_default_dtype(np.float64)

    def fn(x):
        p, q = x * 2.0, x.tanh()
        s = p + q
        r = (p * p).tanh().tanh()
        u = (q * q).tanh().tanh()
        return s * 1.5 + r + u
    x = np.random.default_rng(seed).standard_normal((3, 4))
    check_grads(fn, [x])
    t = ml.Tensor(x, requires_grad=True)
    seed_grad = np.ones((3, 4))
    fn(t).backward(seed_grad)
    assert np.array_equal(seed_grad, np.ones((3, 4)))


# ------------------------------------------------------------------ the walk: order and helpers

@st.composite
def dags(draw):
    """A random graph: a few leaves (some frozen), then nodes that each add or multiply two
    earlier nodes (possibly the same one twice) or apply tanh to one."""
    n_leaves = draw(st.integers(1, 4))
    frozen = draw(st.lists(st.booleans(), min_size=n_leaves, max_size=n_leaves))
    nodes = [leaf([0.5, -1.0], requires_grad=not f) for f in frozen]
    for _ in range(draw(st.integers(0, 14))):
        i = draw(st.integers(0, len(nodes) - 1))
        j = draw(st.integers(0, len(nodes) - 1))
        op = draw(st.sampled_from(["add", "mul", "tanh"]))
        a, b = nodes[i], nodes[j]
        nodes.append(a + b if op == "add" else a * b if op == "mul" else a.tanh())
    return nodes


@given(dags())
def test_topological_order_lists_each_node_once_after_its_parents(nodes):
    root = nodes[-1]
    order = root.topological_order()
    if not root.requires_grad:
        assert order == [root]
        return
    # what it must hold: every node that needs a gradient and is reachable from the root
    reachable, stack = {id(root): root}, [root]
    while stack:
        for p in stack.pop()._parents:
            if p.requires_grad and id(p) not in reachable:
                reachable[id(p)] = p
                stack.append(p)
    assert len(order) == len({id(n) for n in order}) == len(reachable)
    assert {id(n) for n in order} == set(reachable) and order[-1] is root
    position = {id(n): k for k, n in enumerate(order)}
    for node in order:
        for p in node._parents:
            if p.requires_grad:
                assert position[id(p)] < position[id(node)]


def test_topological_order_of_a_small_graph():
    a, b = leaf([1.5]), leaf([-2.0])
    ab, ea = a * b, a.exp()
    f = ab + ea
    order = f.topological_order()
    assert order[-1] is f and len(order) == 5
    pos = {id(n): k for k, n in enumerate(order)}
    assert pos[id(a)] < pos[id(ab)] and pos[id(a)] < pos[id(ea)] and pos[id(b)] < pos[id(ab)]
    assert max(pos[id(ab)], pos[id(ea)]) < pos[id(f)]
    c = leaf([1.0], requires_grad=False)
    assert (a * c).topological_order()[0] is a  # a frozen input is not part of the walk
    assert len((a * c).topological_order()) == 2


@pytest.mark.host_only("bookkeeping of array ids: no kernel runs")
def test_note_aliases_marks_an_array_handed_twice_and_the_base_of_a_view():
    from minilora.tensor import _note_aliases

    p, q, frozen = leaf([1.0]), leaf([2.0]), leaf([3.0], requires_grad=False)
    g, base = B.asarray(np.ones(2)), B.asarray(np.ones((2, 2)))
    view = base[0]
    shared = {}
    _note_aliases((p, q, frozen), (g, g, view), shared)
    assert shared == {id(g): g}  # the view went to a frozen parent: it never enters the walk
    _note_aliases((p, q), (view, None), shared)
    assert shared == {id(g): g, id(base): base}  # held: no new array can take their ids
    alone = B.asarray(np.ones(2))
    _note_aliases((p, q), (alone, B.asarray(np.ones(2))), shared)
    assert id(alone) not in shared


def test_accumulate_keeps_the_first_adds_into_its_own_sums_and_copies_the_rest():
    from minilora.tensor import _accumulate

    p = leaf([0.0, 0.0])
    grads, shared = {}, {}
    first = B.asarray(np.array([1.0, 2.0]))
    _accumulate(grads, p, first, shared)
    assert grads[id(p)] is first
    _accumulate(grads, p, B.asarray(np.array([10.0, 10.0])), shared)
    assert grads[id(p)] is first  # owned by the walk: added into in place
    np.testing.assert_array_equal(host(first), [11.0, 12.0])
    # an array someone else holds (the seed, one handed to two parents) is never written into
    held = B.asarray(np.array([1.0, 2.0]))
    grads = {id(p): held}
    _accumulate(grads, p, B.asarray(np.array([5.0, 5.0])), {id(held): held})
    assert grads[id(p)] is not held
    np.testing.assert_array_equal(host(held), [1.0, 2.0])
    np.testing.assert_array_equal(host(grads[id(p)]), [6.0, 7.0])
    # nor a view (its base would change), nor an array of another shape or dtype
    base = B.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]))
    for previous, pg in ((base[0], np.ones(2)), (B.asarray(np.ones(1)), np.ones(2)),
                         (B.asarray(np.ones(2, np.float32)), np.ones(2))):
        grads = {id(p): previous}
        before = host(previous).copy()
        _accumulate(grads, p, B.asarray(pg), {})
        assert grads[id(p)] is not previous
        np.testing.assert_array_equal(host(previous), before)
    np.testing.assert_array_equal(host(base), [[1.0, 2.0], [3.0, 4.0]])


def test_deliver_gives_a_leaf_its_own_writeable_array():
    from minilora.tensor import _deliver

    x = leaf([1.0, 2.0])
    mine = B.asarray(np.array([3.0, 4.0]))
    _deliver(x, mine, {}, None)
    assert x.grad is mine  # the walk's own array: kept, no copy
    _deliver(x, mine, {}, None)
    assert x.grad is not mine  # a second gradient is added into a new array
    np.testing.assert_array_equal(host(mine), [3.0, 4.0])
    np.testing.assert_array_equal(host(x.grad), [6.0, 8.0])
    for g, shared in ((mine, {id(mine): mine}),  # held elsewhere (the seed, say)
                      (B.xp.broadcast_to(B.asarray(np.ones(1)), (2,)), {}),  # a view
                      (B.asarray(np.ones(2, np.float32)), {})):  # another dtype
        y = leaf([0.0, 0.0])
        before = host(g).copy()
        _deliver(y, g, shared, None)
        assert y.grad is not g and y.grad.dtype == np.float64
        y.grad += 1.0  # writeable, and nobody else sees it
        np.testing.assert_array_equal(host(g), before)
    freed = leaf([1.0]) * 2.0
    freed._backward = None  # what an earlier backward leaves behind
    with pytest.raises(GraphError, match="retain_graph"):
        _deliver(freed, mine, set(), None)


def test_the_seed_stays_the_callers_even_when_it_reaches_a_leaf_unchanged():
    x = leaf([1.0, 2.0])
    seed = np.array([1.0, -1.0])
    (x + 0.0).backward(seed)  # add hands the seed itself on to x
    assert x.grad is not seed
    (x + 0.0).backward(seed)
    x.grad *= 3.0
    np.testing.assert_array_equal(seed, [1.0, -1.0])
    x.zero_grad()
    x.backward(seed)  # the seed is the leaf's own gradient: still copied
    assert x.grad is not seed
    x.grad += 1.0
    np.testing.assert_array_equal(seed, [1.0, -1.0])


def test_a_parent_repeated_in_one_op_gets_both_contributions():
    x = leaf([1.0, -3.0])
    seed = np.array([2.0, 5.0])
    (x + x).backward(seed)  # one array handed to x twice
    np.testing.assert_array_equal(host(x.grad), 2 * seed)
    np.testing.assert_array_equal(seed, [2.0, 5.0])
    x.zero_grad()
    (x * x + x).backward(seed)
    np.testing.assert_array_equal(host(x.grad), seed * (2 * np.array([1.0, -3.0]) + 1))


def test_the_sink_adds_repeats_and_says_who_owns_the_first():
    from minilora.tensor import _store, leaf_grads_into

    x = leaf([1.0, 2.0])
    sink = {}
    g = B.asarray(np.array([1.0, 1.0]))
    _store(sink, x, g, {id(g)})
    assert sink[id(x)][0] is x and sink[id(x)][1] is g and sink[id(x)][2] is False
    _store(sink, x, B.asarray(np.array([2.0, 3.0])), set())
    leaf_, total, owned = sink[id(x)]
    assert owned is True and total is not g
    np.testing.assert_array_equal(host(total), [3.0, 4.0])
    np.testing.assert_array_equal(host(g), [1.0, 1.0])
    own = B.asarray(np.array([1.0, 1.0]))
    _store(sink, leaf([0.0]), own, set())
    assert list(sink.values())[-1][2] is True
    # through backward: the caller's seed reaching a leaf is not owned; leaf.grad is untouched
    seed = np.array([1.0, 1.0])
    store = {}
    with leaf_grads_into(store):
        (x + 0.0).backward(seed)
        assert store[id(x)][2] is False
        (x * 2.0).sum().backward()
    assert x.grad is None
    np.testing.assert_array_equal(host(store[id(x)][1]), [3.0, 3.0])
    assert store[id(x)][2] is True


# ------------------------------------------------------- when the walk lets go of what it holds

def _probe(x: ml.Tensor, seen: list, look) -> ml.Tensor:
    """An identity op whose backward first records ``look()``: what the walk has done by then."""
    def backward(g):
        seen.append(look())
        return (g,)
    return ml.Tensor._make(x.data, (x,), backward, "probe")


def test_a_leaf_gets_its_gradient_once_its_last_consumer_has_run():
    # the depth-first order puts w2 before everything h depends on; the walk must not wait
    # for the probe (which runs later) to hand w2 its gradient
    x, w1, w2 = leaf([[1.0, 2.0]]), leaf([[0.5], [-1.0]]), leaf([[3.0]])
    seen: list = []
    h = _probe(x @ w1, seen, lambda: (w2.grad is not None, w1.grad is None))
    (h @ w2).sum().backward()
    assert seen == [(True, True)]
    np.testing.assert_array_equal(host(w2.grad), [[-1.5]])  # h = 0.5 - 2.0
    np.testing.assert_array_equal(host(w1.grad), [[3.0], [6.0]])


def test_a_leaf_used_twice_waits_for_both_and_gets_their_sum():
    w = leaf([2.0, -1.0])
    seen: list = []
    # w feeds the product (walked first) and, through the probe, the sum: its gradient is
    # complete only after the probe's branch has run
    inner = _probe(w * 1.0, seen, lambda: w.grad is None)
    (w * 3.0 + inner).sum().backward()
    assert seen == [True]
    np.testing.assert_array_equal(host(w.grad), [4.0, 4.0])
    store: dict = {}
    with leaf_grads_into(store):  # the same through a shard's store: the sum, once
        (w * w).sum().backward()
    np.testing.assert_array_equal(host(store[id(w)][1]), [4.0, -2.0])


def test_a_leaf_whose_other_consumer_gets_no_gradient_still_gets_what_arrived():
    # one edge into w never arrives (the node it comes from receives no gradient, so its closure
    # never runs): w gets the other edge's gradient when the walk reaches w itself
    w = leaf([1.0, 2.0])
    dead = ml.Tensor._make(w.data * 5.0, (w,), lambda g: (g * 5.0,), "dead")
    cut = ml.Tensor._make(dead.data, (dead,), lambda g: (None,), "cut")  # no gradient through
    (cut + w * 2.0).sum().backward()
    np.testing.assert_array_equal(host(w.grad), [2.0, 2.0])


def test_a_node_nobody_else_holds_is_let_go_before_its_closure_runs():
    import weakref

    x = leaf([1.0, -2.0])
    seen: list = []
    data = x.data * 2.0
    ref = weakref.ref(data)

    def backward(g):  # holds nothing of its output: only what the walk keeps alive can
        seen.append(ref() is None)
        return (g * 2.0,)
    out = ml.Tensor._make(data, (x,), backward, "double")
    del data
    loss = out.sum()
    del out
    loss.backward()
    assert seen == [True]
    np.testing.assert_array_equal(host(x.grad), [2.0, 2.0])
    # with retain_graph the graph (and so the node) stays, and a second walk gives the same
    again = ml.Tensor._make(x.data * 2.0, (x,), lambda g: (g * 2.0,), "double").sum()
    again.backward(retain_graph=True)
    again.backward()
    np.testing.assert_array_equal(host(x.grad), [6.0, 6.0])


# ---------------------------------------------------------------- reductions at their edges

@pytest.mark.parametrize("op", ["sum", "mean", "max", "var"])
@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-1), (np.int64(0),), (0, np.int8(1))])
def test_a_numpy_integer_axis_reduces_and_back_propagates_like_an_int(op, axis):
    """check_axis let a NumPy integer through, and the backward pass's isinstance(axis, int)
    then tried to iterate it (TypeError)."""
    data = np.random.default_rng(0).standard_normal((2, 3))
    plain = tuple(int(a) for a in axis) if isinstance(axis, tuple) else int(axis)
    grads = []
    for ax in (axis, plain):
        x = ml.Tensor(B.asarray(data), requires_grad=True)
        y = getattr(x, op)(axis=ax)
        (y * y).sum().backward()
        grads.append((host(y).copy(), host(x.grad).copy()))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


def test_var_refuses_a_ddof_that_leaves_no_count_and_keepdims_must_be_a_bool():
    x = ml.Tensor(B.asarray(np.arange(6.0).reshape(2, 3)))
    for ddof in (6, 7, -1, "1", 1.0):  # 6: inf, 7: a negative variance
        with pytest.raises(InvalidArgumentError, match=r"var: ddof must be an int from 0 to 5 "
                                                       r"\(the count over axis None"):
            x.var(ddof=ddof)
    np.testing.assert_allclose(host(x.var(axis=1, ddof=1)), [1.0, 1.0])
    with pytest.raises(ShapeError, match=r"var: a tensor of shape \(2, 0\) has no elements"):
        ml.Tensor(B.asarray(np.zeros((2, 0)))).var(axis=1)
    for op in ("sum", "mean", "max", "var"):
        with pytest.raises(DTypeError, match=f"{op}: keepdims must be True or False, got 'no'"):
            getattr(x, op)(keepdims="no")


def test_a_maximum_of_nothing_is_a_shape_error_and_softmax_of_nothing_is_empty():
    empty = ml.Tensor(B.asarray(np.zeros((0, 2))), requires_grad=True)
    for call in (lambda: empty.max(), lambda: empty.max(axis=0), lambda: empty.argmax()):
        with pytest.raises(ShapeError, match=r"shape \(0, 2\) has no elements"):
            call()
    assert empty.max(axis=1).shape == (0,)  # over a non-empty axis: an empty result
    for fn in (F.softmax, F.log_softmax):
        for shape, axis in (((0, 3), -1), ((2, 0), -1), ((0, 3), 0)):
            x = ml.Tensor(B.asarray(np.zeros(shape)), requires_grad=True)
            y = fn(x, axis)
            y.sum().backward()
            assert y.shape == shape and x.grad.shape == shape


def test_the_gradient_of_x_to_the_zero_is_zero_even_at_zero():
    """0 * x^-1 made it NaN at x = 0 (torch: 0)."""
    x = ml.Tensor(B.asarray(np.array([0.0, 1.0, -2.0])), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [0.0, 0.0, 0.0])
    y = ml.Tensor(B.asarray(np.array([0.0, 3.0])), requires_grad=True)
    (y ** 2).sum().backward()
    np.testing.assert_array_equal(host(y.grad), [0.0, 6.0])
