"""The LoRA update's two forms: the reference form (a new array) and the fast form, which writes
into the base layer's output. Same arithmetic, so the same bits; the fast form's contract (the
caller's word that y is its own and unread afterwards) and the guard that holds callers to it."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import fast, nn
from minilora.errors import GraphError, InvalidArgumentError
from minilora.fast.lora import add_lora_update_into
from minilora.lora.layer import LoRALinear, add_lora_update, was_handed_over
from tests.helpers import host
from tests.test_lora_support import dims, ranks, seeds

FORMS = [True, False]  # fast, reference


def arrays(seed, n, k, o, r, dtype):
    rng = np.random.default_rng(seed)
    return [B.asarray(rng.standard_normal(shape).astype(dtype))
            for shape in ((n, o), (n, k), (r, k), (o, r))]  # y, x, A, B


def update(y, x, a, b, s, flag, fresh=True, grads=True):
    """add_lora_update under the fast forms ``flag``: (output, the grads of y, x, A, B)."""
    ts = [ml.Tensor(v.copy(), requires_grad=grads) for v in (y, x, a, b)]
    with fast.forms(flag):
        out = add_lora_update(*ts, s, y_is_fresh=fresh)
    g = B.asarray(np.random.default_rng(7).standard_normal(out.shape).astype(out.dtype))
    out_values = host(out).copy()
    if not grads:
        return out_values, []
    out.backward(g)
    return out_values, [host(t.grad) for t in ts]


@given(n=dims, k=dims, o=dims, r=ranks, s=st.floats(0.01, 8.0), seed=seeds,
       dtype=st.sampled_from([np.float32, np.float64]))
def test_fast_and_reference_forms_agree_bit_for_bit(n, k, o, r, s, seed, dtype):
    y, x, a, b = arrays(seed, n, k, o, r, dtype)
    fast_out, fast_grads = update(y, x, a, b, s, True)
    ref_out, ref_grads = update(y, x, a, b, s, False)
    assert fast_out.dtype == ref_out.dtype == dtype
    assert np.array_equal(fast_out, ref_out)
    for f, g in zip(fast_grads, ref_grads):
        assert np.array_equal(f, g)
    # and both are the equation y + s (x A^T) B^T
    expected = host(y) + s * (host(x) @ host(a).T) @ host(b).T
    np.testing.assert_allclose(ref_out, expected, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


@given(n=dims, k=dims, o=dims, r=ranks, seed=seeds)
def test_the_kernel_is_the_reference_arithmetic_on_arrays(n, k, o, r, seed):
    y, x, a, b = arrays(seed, n, k, o, r, np.float32)
    h = x @ a.T
    h *= np.float32(0.5)
    expected = y + h @ b.T
    target = y.copy()
    out, h_fast = add_lora_update_into(target, x, a, b, np.float32(0.5), y_is_fresh=True)
    assert out is target  # written in place
    assert np.array_equal(host(out), host(expected)) and np.array_equal(host(h_fast), host(h))


def test_only_the_fast_form_with_the_callers_word_writes_into_y():
    y, x, a, b = arrays(0, 4, 3, 5, 2, np.float32)
    for flag, fresh in ((True, True), (True, False), (False, True), (False, False)):
        ty = ml.Tensor(y.copy())
        with fast.forms(flag):
            out = add_lora_update(ty, ml.Tensor(x), ml.Tensor(a), ml.Tensor(b), 2.0,
                                  y_is_fresh=fresh)
        written = not np.array_equal(host(ty), host(y))
        assert written == (flag and fresh), (flag, fresh)
        before = host(ty).copy()
        out.data[...] += 1  # the output is y's own array exactly when y was written into
        assert (not np.array_equal(host(ty), before)) == written
        assert was_handed_over(ty) == fresh  # the word is recorded in both forms


def test_a_handed_over_op_output_keeps_only_its_shape():
    """A base output handed over to the fast form holds the sum in its array, so the graph keeps
    it only as a shape: the array lives in the update's output alone and goes when that is
    released (as the GPT releases q), and the gradients are the reference form's."""
    import weakref

    from minilora.tensor import release

    y, x, a, b = arrays(1, 6, 4, 5, 2, np.float32)
    results = {}
    for flag in FORMS:
        leaves = [ml.Tensor(v.copy(), requires_grad=True) for v in (y, x, a, b)]
        with fast.forms(flag):
            ty = leaves[0] * 1.0  # an op's own output, as a base layer's is
            out = add_lora_update(ty, *leaves[1:], 2.0, y_is_fresh=True)
            assert ty.shape == (6, 5)
            assert (ty.data.strides == (0, 0)) == flag  # the reference forms keep every value
            values = host(out).copy()
            ref = weakref.ref(out.data.base if out.data.base is not None else out.data)
            loss = (out * 1.0).sum()
            release(out)
            assert (ref() is None) == flag  # nothing else held the sum's array
            loss.backward()
        results[flag] = [values] + [host(t.grad) for t in leaves]
    for fast_v, ref_v in zip(results[True], results[False]):
        assert np.array_equal(fast_v, ref_v)


def test_the_kernel_refuses_without_the_callers_word():
    y, x, a, b = arrays(0, 4, 3, 5, 2, np.float32)
    before = host(y).copy()
    for word in (False, None, 1):
        with pytest.raises(InvalidArgumentError, match=f"y_is_fresh=True.*got y_is_fresh={word}"):
            add_lora_update_into(y, x, a, b, 1.0, y_is_fresh=word)
    with pytest.raises(InvalidArgumentError, match=r"shape \(N, out\) = \(4, 5\), got \(5, 4\)"):
        add_lora_update_into(y.T.copy(), x, a, b, 1.0, y_is_fresh=True)
    assert np.array_equal(host(y), before)


def test_the_kernel_makes_a_new_array_where_y_cannot_hold_the_sum():
    y32, x, a, b = arrays(0, 4, 3, 5, 2, np.float64)
    y32 = y32.astype(np.float32)  # a narrower y: writing would round the float64 sum
    out, _ = add_lora_update_into(y32, x, a, b, 1.5, y_is_fresh=True)
    assert out is not y32 and out.dtype == np.float64
    assert np.array_equal(host(out), host(y32 + 1.5 * (x @ a.T) @ b.T))
    if not B.on_device():
        frozen = x @ a.T @ b.T
        frozen.flags.writeable = False
        out, _ = add_lora_update_into(frozen, x, a, b, 1.5, y_is_fresh=True)
        assert out is not frozen


def wrong_order(layer, x):
    """A DoRA layer's forward in the wrong order: the plain update is handed base(x) first, and
    DoRA's term reads base(x) after it."""
    base_out = layer.base_layer(x)
    result = add_lora_update(base_out, x, layer.lora_A["p"].weight, layer.lora_B["p"].weight,
                             layer.scaling["p"], y_is_fresh=True)
    return result + layer._dora_term("d", x, x, base_out)


def two_adapter_layer(bias, seed=0):
    ml.manual_seed(seed)
    layer = LoRALinear(nn.Linear(5, 4, bias=bias).double())
    layer.update_layer("p", r=2, alpha=4.0)
    layer.update_layer("d", r=3, alpha=2.0, use_dora=True)
    layer.set_adapter(["p", "d"])
    rng = np.random.default_rng(seed + 1)
    for name in ("p", "d"):
        for table in (layer.lora_A, layer.lora_B):
            w = table[name].weight
            w.data[...] = B.asarray(rng.standard_normal(w.shape))
    return layer


@pytest.mark.parametrize("flag", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_the_wrong_order_is_refused_in_both_forms(flag, bias):
    layer = two_adapter_layer(bias)
    x = ml.Tensor(B.asarray(np.random.default_rng(3).standard_normal((6, 5))))
    with fast.forms(flag):
        with pytest.raises(GraphError, match="DoRA's term reads base\\(x\\), which was handed"):
            wrong_order(layer, x)
        y = layer.base_layer(x)  # and a y handed over twice
        add_lora_update(y, x, layer.lora_A["p"].weight, layer.lora_B["p"].weight, 1.0,
                        y_is_fresh=True)
        with pytest.raises(GraphError, match="already handed over"):
            add_lora_update(y, x, layer.lora_A["p"].weight, layer.lora_B["p"].weight, 1.0)


@given(seed=seeds, bias=st.booleans(), dropout=st.sampled_from([0.0, 0.3]),
       adapters=st.sampled_from([["p"], ["d"], ["p", "d"], ["d", "p"]]))
def test_the_layer_gives_the_same_bits_in_both_forms(seed, bias, dropout, adapters):
    """Plain adapters only, DoRA only, both (a DoRA term holds base(x), so nothing is written
    into it), with or without a bias and dropout: outputs and every gradient, bit for bit."""
    results = []
    for flag in FORMS:
        layer = two_adapter_layer(bias, seed)
        layer.update_layer("q", r=1, alpha=1.0, dropout=dropout)  # a second plain adapter
        layer.set_adapter(adapters + ["q"])
        layer.train()
        x = ml.Tensor(B.asarray(np.random.default_rng(seed).standard_normal((2, 3, 5))),
                      requires_grad=True)
        ml.manual_seed(seed)  # the same dropout masks
        with fast.forms(flag):
            out = layer(x)
            g = B.asarray(np.random.default_rng(seed + 9).standard_normal(out.shape))
            out.backward(g)
        params = [p for n in layer.lora_A for p in layer.adapter_parameters(n)]
        results.append([host(out), host(x.grad)] + [host(p.grad) for p in params
                                                     if p.grad is not None])
    fast_run, reference_run = results
    assert len(fast_run) == len(reference_run) > 2
    for a, b in zip(fast_run, reference_run):
        assert np.array_equal(a, b)
