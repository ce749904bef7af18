"""Every differentiable op against central finite differences in float64.

Shapes are drawn by hypothesis: 1-4 axes of size 1-5, and broadcast-compatible pairs that have
size-1 axes and missing leading axes. Values come from a drawn seed and are kept away from the
points where an op is not differentiable: positive inputs for log, sqrt and fractional powers,
|x| >= 0.2 for relu and divisors, distinct values for max (a tie has no derivative). Every check
goes through ``tests.helpers.check_grads``, which weights each output element differently.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minilora as ml
from minilora import backend as B
from minilora import functional as F
from tests.helpers import check_grads, host

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=4, min_side=1,
                                          max_side=5)
seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------------ values by domain

def normal(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return rng.standard_normal(shape)


def positive(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape)


def nonzero(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """|x| in [0.2, 2]: away from relu's kink and from a division by zero."""
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)


def distinct(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """All values at least 0.07 apart, so no perturbation of 1e-6 can change which is largest."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * 0.1 + rng.uniform(0, 0.03, n)).reshape(shape)


@st.composite
def shape_and_axis(draw: st.DrawFn, shape_strategy: st.SearchStrategy = shapes) -> tuple:
    """A shape and a reduction axis: None, one int or a tuple, negative axes included."""
    shape = draw(shape_strategy)
    nd = len(shape)
    one = st.integers(-nd, nd - 1)
    many = st.lists(one, min_size=1, max_size=nd, unique_by=lambda a: a % nd).map(tuple)
    return shape, draw(st.none() | one | many)


# ------------------------------------------------------------------------------ elementwise

BINARY = {
    "add": (lambda a, b: a + b, normal, normal),
    "sub": (lambda a, b: a - b, normal, normal),
    "mul": (lambda a, b: a * b, normal, normal),
    "div": (lambda a, b: a / b, normal, nonzero),
    "pow": (lambda a, b: a ** b, positive, normal),
    "where": (lambda a, b: ml.where(a.data > 0, a, b), nonzero, normal),
}


@pytest.mark.parametrize("name", BINARY)
@given(shapes=pairs, seed=seeds)
def test_binary_op_with_broadcasting(name, shapes, seed):
    fn, make_a, make_b = BINARY[name]
    rng = np.random.default_rng(seed)
    sa, sb = shapes.input_shapes
    check_grads(fn, [make_a(rng, sa), make_b(rng, sb)])


SCALAR = {
    "radd": (lambda x: 1.5 + x, normal),
    "rsub": (lambda x: 1.5 - x, normal),
    "rmul": (lambda x: 2.5 * x, normal),
    "rdiv": (lambda x: 2.0 / x, nonzero),
    "div_scalar": (lambda x: x / 3.0, normal),
    "sub_scalar": (lambda x: x - 0.25, normal),
    "pow_int": (lambda x: x ** 3, normal),
    "pow_negative_int": (lambda x: x ** -2, nonzero),
    "pow_half": (lambda x: x ** 0.5, positive),
    "pow_fraction": (lambda x: x ** -1.5, positive),
    "rpow": (lambda x: 2.0 ** x, normal),
    "neg": (lambda x: -x, normal),
    "exp": (lambda x: x.exp(), normal),
    "log": (lambda x: x.log(), positive),
    "sqrt": (lambda x: x.sqrt(), positive),
    "tanh": (lambda x: x.tanh(), normal),
    "relu": (lambda x: x.relu(), nonzero),
    "F.relu": (lambda x: F.relu(x), nonzero),
    "F.tanh": (lambda x: F.tanh(x), normal),
    "gelu": (lambda x: F.gelu(x), normal),
    "astype": (lambda x: x.astype(np.float64) * x, normal),
    "masked_fill": (lambda x: x.masked_fill(x.data < 0, -3.0), nonzero),
}


@pytest.mark.parametrize("name", SCALAR)
@given(shape=shapes, seed=seeds)
def test_unary_or_scalar_op(name, shape, seed):
    fn, make = SCALAR[name]
    check_grads(fn, [make(np.random.default_rng(seed), shape)])


@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=1, max_dims=3, max_side=4),
       seed=seeds)
def test_where_broadcasts_condition_and_both_branches(shapes, seed):
    rng = np.random.default_rng(seed)
    sc, sx, sy = shapes.input_shapes
    cond = rng.random(sc) < 0.5
    check_grads(lambda x, y: ml.where(cond, x, y), [normal(rng, sx), normal(rng, sy)])


@given(shapes=pairs, seed=seeds)
def test_masked_fill_with_a_broadcast_mask(shapes, seed):
    rng = np.random.default_rng(seed)
    sm, sx = shapes.input_shapes
    mask = rng.random(sm) < 0.5
    # the output takes the broadcast shape, so x is stretched where the mask has more axes
    check_grads(lambda x: x.masked_fill(ml.Tensor(mask), 0.5), [normal(rng, sx)])


# ------------------------------------------------------------------------------ reductions

REDUCTIONS = {
    "sum": (lambda x, axis, keep: x.sum(axis=axis, keepdims=keep), normal),
    "mean": (lambda x, axis, keep: x.mean(axis=axis, keepdims=keep), normal),
    "max": (lambda x, axis, keep: x.max(axis=axis, keepdims=keep), distinct),
    "var": (lambda x, axis, keep: x.var(axis=axis, keepdims=keep), normal),
    "var_ddof1": (lambda x, axis, keep: x.var(axis=axis, keepdims=keep, ddof=1), normal),
}


@pytest.mark.parametrize("name", REDUCTIONS)
@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=seeds)
def test_reduction_over_axes(name, sa, keepdims, seed):
    fn, make = REDUCTIONS[name]
    shape, axis = sa
    if name == "var_ddof1":  # ddof=1 needs two elements in every reduced slice
        counts = shape if axis is None else [shape[a] for a in np.atleast_1d(axis)]
        if int(np.prod(counts)) < 2:
            shape, axis = shape + (2,), -1
    check_grads(lambda x: fn(x, axis, keepdims), [make(np.random.default_rng(seed), shape)])


def test_max_shares_the_gradient_among_ties():
    # not a finite-difference check (a tie has no derivative): torch.amax's convention
    x = ml.Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [[0, 0.5, 0.5], [0.5, 0, 0.5]])
    y = ml.Tensor(np.array([4.0, 4.0, 4.0, 1.0]), requires_grad=True)
    (y.max() * 3.0).backward()
    np.testing.assert_array_equal(host(y.grad), [1.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------- matmul

@given(n=st.integers(1, 5), k=st.integers(1, 5), m=st.integers(1, 5), seed=seeds)
def test_matmul_2d(n, k, m, seed):
    rng = np.random.default_rng(seed)
    check_grads(lambda a, b: a @ b, [normal(rng, (n, k)), normal(rng, (k, m))])


@settings(max_examples=20)
@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3),
       n=st.integers(1, 3), k=st.integers(1, 3), m=st.integers(1, 3), seed=seeds)
def test_matmul_batched_with_broadcast_batch_axes(batch, n, k, m, seed):
    rng = np.random.default_rng(seed)
    ba, bb = batch.input_shapes
    check_grads(lambda a, b: a @ b, [normal(rng, ba + (n, k)), normal(rng, bb + (k, m))])


@pytest.mark.parametrize("sa,sb", [
    ((2, 1, 3, 4), (5, 4, 2)),   # batch axes broadcast both ways
    ((2, 3, 4), (4, 5)),         # batch @ matrix: the single-GEMM backward path
    ((3, 4), (2, 4, 5)),         # matrix @ batch
    ((4,), (4, 3)),              # vector @ matrix
    ((3, 4), (4,)),              # matrix @ vector
    ((4,), (4,)),                # vector @ vector: a scalar
    ((4,), (2, 4, 3)),           # vector @ batch
    ((2, 3, 4), (4,)),           # batch @ vector
    ((1, 1), (1, 1)),
])
def test_matmul_shape_cases(sa, sb):
    rng = np.random.default_rng(0)
    a, b = normal(rng, sa), normal(rng, sb)
    check_grads(lambda x, y: x @ y, [a, b])
    with ml.no_grad():
        got = ml.Tensor(a) @ ml.Tensor(b)
    np.testing.assert_allclose(host(got), a @ b, rtol=1e-12)


def test_rmatmul_with_an_array_on_the_left():
    rng = np.random.default_rng(0)
    left = normal(rng, (2, 3))
    check_grads(lambda b: B.asarray(left) @ b, [normal(rng, (3, 4))])


@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), fan_in=st.integers(1, 4),
       fan_out=st.integers(1, 4), bias=st.booleans(), seed=seeds)
def test_linear(lead, fan_in, fan_out, bias, seed):
    rng = np.random.default_rng(seed)
    inputs = [normal(rng, lead + (fan_in,)), normal(rng, (fan_out, fan_in))]
    if bias:
        inputs.append(normal(rng, (fan_out,)))
    check_grads(lambda x, w, *b: F.linear(x, w, *b), inputs)


# ------------------------------------------------------------------------------------ shapes

@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_and_view(shape, seed, data):
    order = data.draw(st.permutations(shape))  # the same sizes regrouped: a valid new shape
    x = normal(np.random.default_rng(seed), shape)
    check_grads(lambda t: t.reshape(tuple(order)) * t.reshape(-1).view(*order), [x])


@given(shape=shapes, seed=seeds, data=st.data())
def test_permute_transpose_and_T(shape, seed, data):
    nd = len(shape)
    dims = data.draw(st.permutations(range(nd)))
    negate = data.draw(st.lists(st.booleans(), min_size=nd, max_size=nd))
    dims = [d - nd if neg else d for d, neg in zip(dims, negate)]  # negative axes too
    d0, d1 = data.draw(st.integers(-nd, nd - 1)), data.draw(st.integers(-nd, nd - 1))
    x = normal(np.random.default_rng(seed), shape)
    check_grads(lambda t: t.permute(*dims), [x])
    check_grads(lambda t: t.transpose(d0, d1) * 1.5, [x])
    check_grads(lambda t: t.T, [x])


@given(shape=shapes, seed=seeds, data=st.data())
def test_getitem_basic_slices(shape, seed, data):
    index = tuple(data.draw(st.slices(n)) for n in shape)
    check_grads(lambda t: t[index], [normal(np.random.default_rng(seed), shape)])


@given(shape=shapes, seed=seeds, data=st.data())
def test_getitem_integer_array_with_repeats(shape, seed, data):
    n = shape[0]
    idx = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=8))
    idx = idx + idx[:1]  # at least one repeat: scatter-add must add, not overwrite
    x = normal(np.random.default_rng(seed), shape)
    check_grads(lambda t: t[np.array(idx)], [x])
    check_grads(lambda t: t[ml.Tensor(np.array(idx))], [x])  # a Tensor index works the same


def test_getitem_repeated_index_adds_gradients():
    x = ml.Tensor(np.arange(4.0), requires_grad=True)
    x[np.array([1, 1, 3, 1])].sum().backward()
    np.testing.assert_array_equal(host(x.grad), [0.0, 3.0, 0.0, 1.0])


@pytest.mark.parametrize("index", [
    (slice(None), np.array([2, 0, 2])),            # gather along a later axis
    (np.array([0, 2, 0]), np.array([1, 1, 3])),    # two arrays pick single elements
    (np.array([[0], [2]]), np.array([[1, 3, 1]])),  # index arrays that broadcast
    (1, np.array([3, 3])),                          # an int with an array
    (Ellipsis, np.array([-1, 0, -1])),              # negative indices after ellipsis
    (slice(1, None), None, np.array([0, 0])),       # a new axis mixed in
    np.array([True, False, True]),                  # boolean mask on the first axis
    (np.array([[True, False, True, True]] * 3)),   # boolean mask on every element
    2,
    (-1, slice(None, None, -2)),
])
def test_getitem_advanced_and_mixed(index):
    x = normal(np.random.default_rng(3), (3, 4))
    check_grads(lambda t: t[index], [x])


@given(base=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds, data=st.data())
def test_concatenate(base, seed, data):
    rng = np.random.default_rng(seed)
    nd = len(base)
    axis = data.draw(st.integers(-nd, nd - 1))
    lengths = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    parts = []
    for n in lengths:
        s = list(base)
        s[axis] = n
        parts.append(normal(rng, tuple(s)))
    check_grads(lambda *ts: ml.concatenate(ts, axis=axis), parts)
    check_grads(lambda *ts: ml.cat(list(ts), axis=axis), parts)


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), count=st.integers(1, 3),
       seed=seeds, data=st.data())
def test_stack(shape, count, seed, data):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    check_grads(lambda *ts: ml.stack(ts, axis=axis), [normal(rng, shape) for _ in range(count)])


@given(shape=shapes, seed=seeds, data=st.data())
def test_split_by_size_and_by_sections(shape, seed, data):
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1))
    n = shape[axis]
    size = data.draw(st.integers(1, n + 1))
    cut = data.draw(st.integers(0, n))
    x = normal(np.random.default_rng(seed), shape)
    # weight the pieces differently so a gradient sent to the wrong piece shows
    check_grads(lambda t: ml.concatenate([p * (i + 1.0) for i, p in
                                          enumerate(ml.split(t, size, axis))], axis=axis), [x])
    check_grads(lambda t: ml.concatenate([p * (i + 1.0) for i, p in
                                          enumerate(t.split([cut, n - cut], axis))], axis=axis),
                [x])


# -------------------------------------------------------------------------- fused functional

@given(sa=shape_and_axis(), seed=seeds)
def test_softmax_and_log_softmax(sa, seed):
    shape, axis = sa
    axis = -1 if axis is None or isinstance(axis, tuple) else axis
    x = normal(np.random.default_rng(seed), shape) * 3
    check_grads(lambda t: F.softmax(t, axis=axis), [x])
    check_grads(lambda t: F.log_softmax(t, axis=axis), [x])


@given(lead=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), classes=st.integers(1, 5),
       ignore=st.sampled_from([-100, -1, 0]), seed=seeds)
def test_cross_entropy_with_ignored_positions(lead, classes, ignore, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, lead)
    targets[rng.random(lead) < 0.3] = ignore
    targets.reshape(-1)[0] = classes - 1  # keep one position counted (all ignored is NaN)
    if ignore == classes - 1:
        targets.reshape(-1)[0] = 0
    if ignore == 0 and classes == 1:
        ignore = -100
    check_grads(lambda z: F.cross_entropy(z, targets, ignore_index=ignore),
                [normal(rng, lead + (classes,)) * 2])


@given(lead=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), width=st.integers(2, 5),
       affine=st.sampled_from(["both", "weight", "bias", "none"]), seed=seeds)
def test_layer_norm(lead, width, affine, seed):
    rng = np.random.default_rng(seed)
    # a per-row spread of at least 0.5 keeps 1/std moderate, so finite differences stay accurate
    x = normal(rng, lead + (width,)) + np.linspace(-1.0, 1.0, width)
    params = {"weight": normal(rng, (width,)), "bias": normal(rng, (width,))}
    names = {"both": ["weight", "bias"], "weight": ["weight"], "bias": ["bias"], "none": []}[affine]

    def fn(t, *p):
        kw = dict(zip(names, p))
        return F.layer_norm(t, eps=1e-5, **kw)
    check_grads(fn, [x] + [params[n] for n in names], rtol=1e-4)


@pytest.mark.parametrize("vocab", [7, 1100])  # one-hot path (V <= 1024) and sort/reduceat path
@settings(max_examples=8)
@given(idx_shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), seed=seeds)
def test_embedding_with_repeated_indices(vocab, idx_shape, seed):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, vocab, 3)  # draw from three rows so indices repeat
    idx = pool[rng.integers(0, 3, idx_shape)]
    check_grads(lambda w: F.embedding(idx, w), [normal(rng, (vocab, 2))])


def test_embedding_backward_paths_agree():
    # the same gradient from the one-hot path and the sorted segment-sum path
    rng = np.random.default_rng(0)
    idx = np.array([[5, 3, 5], [0, 5, 3]])
    g = rng.standard_normal((2, 3, 4))
    small = B.to_numpy(B.index_add_rows(B.asarray(idx), B.asarray(g), 8))
    large = B.to_numpy(B.index_add_rows(B.asarray(idx), B.asarray(g), 2000))
    np.testing.assert_allclose(large[:8], small, rtol=1e-12)
    assert not large[8:].any()
    np.testing.assert_allclose(small[5], g[0, 0] + g[0, 2] + g[1, 1], rtol=1e-12)


def test_mse_loss():
    rng = np.random.default_rng(0)
    target = normal(rng, (3, 4))
    check_grads(lambda x: F.mse_loss(x, ml.Tensor(target)), [normal(rng, (3, 4))])
    check_grads(lambda x, y: F.mse_loss(x, y), [normal(rng, (3, 4)), normal(rng, (4,))])


@given(shape=shapes, p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 1000))
def test_dropout_gradient_is_the_scaled_mask(shape, p, seed):
    x = normal(np.random.default_rng(seed), shape)

    def fn(t):
        ml.manual_seed(seed)  # the same mask on every call, so finite differences see one function
        return F.dropout(t, p=p, training=True)
    check_grads(fn, [x])
    ml.manual_seed(seed)
    keep = host(B.random_uniform(shape, np.float64)) >= p
    t = ml.Tensor(B.asarray(x), requires_grad=True)
    fn(t).sum().backward()
    np.testing.assert_allclose(host(t.grad), keep / (1 - p), rtol=1e-15)


@pytest.mark.parametrize("p,training", [(0.0, True), (0.5, False), (1.0, False)])
def test_dropout_identity_cases_pass_the_gradient_through(p, training):
    check_grads(lambda t: F.dropout(t, p=p, training=training), [np.arange(6.0).reshape(2, 3)])


def test_dropout_p_one_zeroes_the_gradient():
    t = ml.Tensor(np.ones((2, 3)), requires_grad=True)
    F.dropout(t, p=1.0).sum().backward()
    assert not host(t.grad).any()


# --------------------------------------------------------------------- compositions

@settings(max_examples=10)
@given(seed=seeds)
def test_attention_like_composition(seed):
    # the ops a transformer block chains: matmul, transpose, scale, mask, softmax, layer_norm
    rng = np.random.default_rng(seed)
    T, C = 3, 4
    mask = np.triu(np.ones((T, T), dtype=bool), 1)

    def block(x, w):
        q = x @ w
        att = (q @ x.transpose(-2, -1)) * (1.0 / math.sqrt(C))
        att = F.softmax(att.masked_fill(mask, -1e9), axis=-1)
        return F.layer_norm(F.gelu(att @ x) + x)
    check_grads(block, [normal(rng, (2, T, C)), normal(rng, (C, C))], rtol=1e-4)
