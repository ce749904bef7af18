"""The fused attention kernel (minilora.fast.attention) pinned to the reference form, the one
written with Tensor ops in minilora.attention; and the reference form against finite differences.

The two forms round differently (the fast one folds 1/sqrt(hs) into q, sums the softmax down
columns and may split the queries), so they agree within a stated tolerance, not bit for bit:
``TOL`` times the largest magnitude of the reference result (at least 1), and ``TOL`` relatively.
With dropout the forms draw their masks in different layouts, so there each form is checked on
its own: the same seed gives the same result, its kept probabilities are scaled by 1 / (1 - p),
the fraction dropped is p, and its backward uses the mask of its forward (finite differences).
"""

from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import attention as A
from minilora import backend as B
from minilora import fast
from minilora.errors import ShapeError
from minilora.fast import attention as FA
from tests.helpers import check_grads, host

TOL = {np.float32: 2e-5, np.float64: 1e-12}
FORMS = {"fast": True, "reference": False}


@contextmanager
def split_queries_from(n):
    """Make the fused kernel split its queries in two blocks from length n on."""
    with mock.patch.object(FA, "SPLIT_FROM", n):
        yield


def inputs(rng, shape, dtype, needs=(True, True, True)):
    return [ml.Tensor(B.asarray(rng.standard_normal(shape).astype(dtype)), requires_grad=n)
            for n in needs]


def attend(flag, qkv, n_head, dropout_p=0.0, weight=None):
    """y = attention(q, k, v) in the form chosen by ``flag``; with ``weight`` also backpropagate
    sum(y * weight). Returns y and the gradients of q, k, v (None where none was asked for)."""
    qkv = [ml.Tensor(t.data.copy(), requires_grad=t.requires_grad) for t in qkv]
    with fast.forms(flag):
        y = A.causal_self_attention(*qkv, n_head, dropout_p)
        if weight is not None:
            (y * ml.Tensor(weight)).sum().backward()
    return y, [t.grad for t in qkv]


def assert_close(actual, reference, dtype, what):
    reference = host(reference)
    atol = TOL[dtype] * max(1.0, float(np.abs(reference).max(initial=0.0)))
    np.testing.assert_allclose(host(actual), reference, rtol=TOL[dtype], atol=atol, err_msg=what)


def assert_fast_matches_reference(rng, shape, n_head, dtype):
    qkv = inputs(rng, shape, dtype)
    w = B.asarray(rng.standard_normal(shape).astype(dtype))
    y, grads = attend(True, qkv, n_head, weight=w)
    y_ref, grads_ref = attend(False, qkv, n_head, weight=w)
    assert y.dtype == y_ref.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, dtype, f"gradient of {name}")


# --------------------------------------------------------------------------- the mask

@given(size=st.integers(1, 9), start=st.integers(0, 9),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_causal_mask_rows_are_the_rows_of_the_square_mask(size, start, dtype):
    start = min(start, size - 1)
    square = host(A.causal_mask(size, dtype))
    assert square.dtype == dtype
    np.testing.assert_array_equal(np.isneginf(square), np.triu(np.ones((size, size), bool), 1))
    assert (square[np.tril_indices(size)] == 0).all()
    np.testing.assert_array_equal(host(A.causal_mask(size, dtype, start)), square[start:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_mask_equals_the_reference_mask_and_is_one_shared_array(dtype):
    big = FA.causal_mask(70, dtype)
    np.testing.assert_array_equal(host(big), host(A.causal_mask(70, dtype)))
    small = FA.causal_mask(5, dtype)
    np.testing.assert_array_equal(host(small), host(A.causal_mask(5, dtype)))
    assert small.base is not None and small.base is big.base  # views of one cached array


# ------------------------------------------------------------ fast form = reference form

@given(B_=st.integers(1, 3), T=st.integers(1, 9), nh=st.integers(1, 3), hs=st.integers(1, 4),
       split=st.sampled_from([2, 3, 64]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_fast_attention_matches_the_reference_with_gradients(B_, T, nh, hs, split, dtype, seed):
    with split_queries_from(split):
        assert_fast_matches_reference(np.random.default_rng(seed), (B_, T, nh * hs), nh, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B_,T,nh,hs", [(2, 63, 2, 8), (2, 64, 4, 4), (1, 65, 3, 5),
                                        (2, 97, 2, 6), (1, 128, 4, 16)])
def test_fast_attention_matches_the_reference_around_the_query_split(B_, T, nh, hs, dtype):
    assert FA.SPLIT_FROM == 64  # the lengths above sit on both sides of it
    # on a device the queries stay in one block (a second one's launches cost more there)
    assert len(FA._query_blocks(T)) == (2 if T >= 64 and not B.on_device() else 1)
    assert_fast_matches_reference(np.random.default_rng(T), (B_, T, nh * hs), nh, dtype)


# ----------------------------------------------------------------------------- dropout

def kept_probabilities(flag, T, n_head, p, batch=4):
    """The dropped-and-rescaled attention weights (B, nh, T, T) each form applies, read off y.

    With q = 0 every query weighs its visible keys equally, P[i, j] = 1 / (i + 1), and with v
    one-hot per key (hs = T) y carries P * mask itself; multiplying by i + 1 leaves the mask.
    """
    C = n_head * T
    v = np.zeros((batch, T, C))
    for h in range(n_head):
        v[:, np.arange(T), h * T + np.arange(T)] = 1.0
    q = ml.Tensor(B.asarray(np.zeros((batch, T, C))))
    k = ml.Tensor(B.asarray(np.random.default_rng(0).standard_normal((batch, T, C))))
    with fast.forms(flag):
        y = host(A.causal_self_attention(q, k, ml.Tensor(B.asarray(v)), n_head, p))
    pd = y.reshape(batch, T, n_head, T).transpose(0, 2, 1, 3)  # (B, nh, Tq, Tk)
    return pd * np.arange(1, T + 1)[:, None]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T,p", [(9, 0.5), (80, 0.25), (80, 0.6)])
def test_dropout_keeps_each_weight_with_probability_1_minus_p_rescaled(form, T, p):
    mask = kept_probabilities(FORMS[form], T, 2, p)
    visible = np.broadcast_to(np.tril(np.ones((T, T), bool)), mask.shape)
    assert (mask[~visible] == 0).all()  # dropout never reopens a masked key
    kept = mask[visible] != 0
    np.testing.assert_allclose(mask[visible][kept], 1.0 / (1.0 - p), rtol=1e-12)
    n = kept.size
    assert abs((1.0 - kept.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma, binomial
    assert (mask[:, 0] != mask[:, 1]).any()  # each head draws its own mask


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [2, 64])
def test_dropout_is_deterministic_under_a_seed(form, split):
    rng = np.random.default_rng(0)
    qkv = inputs(rng, (2, 7, 6), np.float32)
    w = B.asarray(rng.standard_normal((2, 7, 6)).astype(np.float32))
    with split_queries_from(split):
        runs = []
        for seed in (3, 3, 4):
            ml.manual_seed(seed)
            runs.append(attend(FORMS[form], qkv, 2, 0.3, w))
    (y1, g1), (y2, g2), (y3, _) = runs
    np.testing.assert_array_equal(host(y1), host(y2))
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(host(a), host(b))
    assert not np.array_equal(host(y1), host(y3))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [2, 64])
def test_gradients_match_finite_differences_also_with_dropout(form, split):
    rng = np.random.default_rng(0)
    qkv = [rng.standard_normal((2, 5, 6)) for _ in range(3)]

    def dropped(q, k, v):
        ml.manual_seed(3)  # the same mask at every evaluation
        return A.causal_self_attention(q, k, v, 2, dropout_p=0.4)
    with fast.forms(FORMS[form]), split_queries_from(split):
        check_grads(lambda q, k, v: A.causal_self_attention(q, k, v, 2), qkv)
        check_grads(dropped, qkv)


# ----------------------------------------------------------- frozen inputs and no_grad

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [2, 64])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)])
def test_frozen_inputs_get_no_gradient_and_the_others_the_same(form, split, needs):
    rng = np.random.default_rng(1)
    full = inputs(rng, (2, 5, 6), np.float64)
    part = [ml.Tensor(t.data, requires_grad=n) for t, n in zip(full, needs)]
    w = B.asarray(rng.standard_normal((2, 5, 6)))
    with split_queries_from(split):
        _, g_full = attend(FORMS[form], full, 2, weight=w)
        _, g_part = attend(FORMS[form], part, 2, weight=w)
    for need, g, g_ref in zip(needs, g_part, g_full):
        if need:
            np.testing.assert_array_equal(host(g), host(g_ref))
        else:
            assert g is None


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False,) * 3])
def test_the_kernel_returns_only_the_gradients_asked_for(needs):
    rng = np.random.default_rng(2)
    q, k, v = (B.asarray(rng.standard_normal((2, 70, 8))) for _ in range(3))
    y, backward = FA.causal_attention(q, k, v, 2, 0.0, needs)
    assert y.shape == (2, 70, 8)
    if not any(needs):
        assert backward is None  # nothing kept for a backward pass nobody will run
        return
    for need, g in zip(needs, backward(B.asarray(rng.standard_normal((2, 70, 8))))):
        assert (g is not None) == need
        assert g is None or g.shape == (2, 70, 8)


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, True)])
def test_the_backward_keeps_the_scaled_copy_of_q_not_q(needs):
    """The kernel's backward reads q only through its scaled copy, so once the caller lets q go
    (the GPT releases it) its array is freed; k and v are read as views and stay."""
    import weakref

    rng = np.random.default_rng(4)
    q, k, v = (B.asarray(rng.standard_normal((2, 70, 8)).astype(np.float32)) for _ in range(3))
    refs = [weakref.ref(a) for a in (q, k, v)]
    y, backward = FA.causal_attention(q, k, v, 2, 0.0, needs)
    del q, k, v
    assert refs[0]() is None  # q's array went with its last holder
    assert refs[1]() is not None and refs[2]() is not None  # k and v are read by the backward
    grads = backward(B.asarray(rng.standard_normal((2, 70, 8)).astype(np.float32)))
    assert [g is not None for g in grads] == list(needs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_no_graph_under_no_grad_or_without_inputs_that_need_one(form, dropout_p):
    rng = np.random.default_rng(3)
    with fast.forms(FORMS[form]):
        with ml.no_grad():
            y = A.causal_self_attention(*inputs(rng, (2, 6, 4), np.float32), 2, dropout_p)
        y2 = A.causal_self_attention(*inputs(rng, (2, 6, 4), np.float32, (False,) * 3), 2,
                                     dropout_p)
        y3 = A.causal_self_attention(*inputs(rng, (2, 6, 4), np.float32), 2, dropout_p)
    for out in (y, y2):
        assert not out.requires_grad and out._parents == () and out._backward is None
    assert y3.requires_grad and y3._backward is not None  # the check above can fail


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n_head", [0, -2, True, 2.0])
def test_n_head_must_be_a_positive_int_in_both_forms(form, n_head):
    x = ml.Tensor(np.zeros((1, 3, 4)))
    with fast.forms(FORMS[form]), pytest.raises(ShapeError, match="n_head"):
        A.causal_self_attention(x, x, x, n_head)


# ---------------------------------------------------------------------- reference form

@pytest.mark.parametrize("shape,n_head", [((2, 5, 6), 2), ((1, 4, 3), 1), ((2, 3, 6), 3)])
def test_reference_form_gradients_match_finite_differences(shape, n_head):
    rng = np.random.default_rng(4)
    qkv = [rng.standard_normal(shape) for _ in range(3)]
    with fast.reference():
        check_grads(lambda q, k, v: A.causal_self_attention(q, k, v, n_head), qkv, rtol=1e-6)


# ---------------------------------------------------------------------- cache and decoding

@contextmanager
def cached_kernel_listed():
    """The dispatch table with the cache's fast form in it (a no-op once fast.KERNELS lists it)."""
    with mock.patch.dict(fast.KERNELS, {"cached_attention": ("attention", "cached_attention")}):
        yield


def attend_in_pieces(flag, q, k, v, n_head, cuts):
    """Run q, k, v (B, T, C) through a KV cache in the pieces [a, b) of ``cuts``: y (B, T, C)."""
    Bsz, T, C = q.shape
    cache = A.KVCache(1, Bsz, n_head, T, C // n_head, q.dtype)
    pieces = []
    with fast.forms(flag), cached_kernel_listed():
        for a, b in cuts:
            pieces.append(host(cache.attend(0, *(B.asarray(x[:, a:b]) for x in (q, k, v)),
                                            n_head)))
            cache.length = b
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kv_cache_in_pieces_equals_the_full_causal_attention_in_both_forms(dtype):
    rng = np.random.default_rng(5)
    Bsz, T, nh, hs = 2, 70, 2, 4
    q, k, v = (rng.standard_normal((Bsz, T, nh * hs)).astype(dtype) for _ in range(3))
    with fast.reference():
        full = A.causal_self_attention(*(ml.Tensor(B.asarray(x)) for x in (q, k, v)), nh)
    cuts = [(0, 40), (40, 41), (41, 42), (42, 70)]
    fast_y, reference_y = (attend_in_pieces(flag, q, k, v, nh, cuts) for flag in (True, False))
    assert fast_y.dtype == reference_y.dtype == dtype
    assert_close(reference_y, full, dtype, "cached attention, reference form")
    assert_close(fast_y, reference_y, dtype, "cached attention, fast form")


@pytest.mark.parametrize("form", FORMS)
def test_the_cache_reaches_its_fast_form_only_through_the_switch(form):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 3, 4)) for _ in range(3))
    with mock.patch.object(FA, "cached_attention", wraps=FA.cached_attention) as spy:
        attend_in_pieces(FORMS[form], q, k, v, 2, [(0, 2), (2, 3)])
    assert spy.call_count == (2 if FORMS[form] else 0)


def test_greedy_generation_gives_the_same_tokens_in_both_forms_with_and_without_cache():
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=13, block_size=72, n_layer=2, n_head=2, n_embd=16))
    prompt = np.random.default_rng(6).integers(0, 13, (2, 66))  # past the query split
    runs = {}
    for form, flag in FORMS.items():
        for use_cache in (True, False):
            with fast.forms(flag), cached_kernel_listed():
                out = model.generate(B.asarray(prompt), 12, temperature=0, use_cache=use_cache)
            runs[form, use_cache] = host(out)  # 12 steps: the window fills and shifts
    first = runs["fast", True]
    assert first.shape == (2, 78)
    np.testing.assert_array_equal(first[:, :66], prompt)
    for key, tokens in runs.items():
        np.testing.assert_array_equal(tokens, first, err_msg=str(key))


# ------------------------------------------------ the device form against the host form

DEVICE = B.get_backend() if B.on_device() else "strict"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_device_kernels_are_the_host_forms_below_the_split(dtype):
    """Below SPLIT_FROM both forms use one block of queries; then the device form (its softmax
    and softmax backward fused, minilora.fast.device) gives the host form's bits on the strict
    stand-in, and its values within TOL on a GPU. The cached attention too."""
    rng = np.random.default_rng(5)
    q, k, v, g = (rng.standard_normal((2, 40, 12)).astype(dtype) for _ in range(4))
    out = []
    for name in ("numpy", DEVICE):
        with B.backend(name), fast.forms(True):
            y, backward = FA.causal_attention(*(B.asarray(a.copy()) for a in (q, k, v)), 3, 0.0,
                                              (True, True, True))
            keys = FA.split_heads(B.asarray(k), 3)[:, :, :40]
            values = FA.split_heads(B.asarray(v), 3)[:, :, :40]
            cached = FA.cached_attention(B.asarray(q[:, 30:].copy()), keys, values, 30)
            out.append([B.to_numpy(a) for a in (y, *backward(B.asarray(g)), cached)])
    for what, h, d in zip(("y", "dq", "dk", "dv", "cached"), *out):
        if DEVICE == "strict":
            assert np.array_equal(h, d), f"{what}: not the same bits"
        else:
            assert_close(d, h, dtype, what)
