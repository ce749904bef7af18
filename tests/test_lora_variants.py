"""The LoRA variants on their own (lora/variants.py): rsLoRA's scaling, DoRA's norm, merge factor
and merged delta, PiSSA's init and its conversion to a plain LoRA of the untouched base."""

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend as B
from minilora.lora import variants as V
from tests.helpers import host
from tests.test_lora_support import alphas, dims, ranks, seeds


def rand(seed, *shape):
    return B.asarray(np.random.default_rng(seed).standard_normal(shape))


@given(r=st.integers(1, 512), alpha=alphas)
def test_rslora_scales_by_the_root_of_the_rank(r, alpha):
    assert V.lora_scaling(r, alpha) == alpha / r
    assert V.lora_scaling(r, alpha, use_rslora=True) == alpha / math.sqrt(r)
    # the point of rsLoRA: at alpha = sqrt(r) the scaling stays 1 whatever the rank
    assert math.isclose(V.lora_scaling(r, math.sqrt(r), use_rslora=True), 1.0, rel_tol=1e-15)


@given(n=dims, k=dims, seed=seeds)
def test_the_magnitude_starts_at_the_row_norms(n, k, seed):
    W = rand(seed, n, k)
    m = V.DoraMagnitude.from_weight(W).weight
    np.testing.assert_allclose(host(m), np.linalg.norm(host(W), axis=1), rtol=1e-13)
    assert m.requires_grad


@given(n=dims, k=dims, seed=seeds)
def test_a_dora_merge_gives_each_row_its_learned_length(n, k, seed):
    W, d = rand(seed, n, k), 0.3 * rand(seed + 1, n, k)
    m = B.asarray(np.random.default_rng(seed + 2).uniform(0.5, 2.0, n))
    f = V.dora_merge_factor(m, W, d)
    merged = host(W + V.dora_merged_delta(W, d, f))
    np.testing.assert_allclose(merged, host(f)[:, None] * host(W + d), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), host(m), rtol=1e-12)


@given(n=st.integers(2, 7), k=st.integers(2, 7), r=ranks, s=st.floats(0.1, 4.0), seed=seeds)
def test_pissa_takes_the_principal_directions_and_leaves_the_residual(n, k, r, s, seed):
    r = min(r, n, k)
    W = rand(seed, n, k)
    W0 = host(W).copy()
    A, Bm = V.pissa_init(W, r, s)
    np.testing.assert_allclose(host(W) + s * host(Bm) @ host(A), W0, rtol=1e-12, atol=1e-12)
    U, S, Vh = np.linalg.svd(W0)
    np.testing.assert_allclose(s * host(Bm) @ host(A), (U[:, :r] * S[:r]) @ Vh[:r],
                               rtol=1e-10, atol=1e-10)


@given(n=dims, k=dims, r=ranks, alpha=alphas, rs=st.booleans(), seed=seeds)
def test_a_trained_pissa_adapter_is_an_exact_lora_of_the_untouched_base(n, k, r, alpha, rs,
                                                                        seed):
    A0, B0 = rand(seed, r, k), rand(seed + 1, n, r)
    A, Bm = A0 + rand(seed + 2, r, k), B0 + rand(seed + 3, n, r)
    s = V.lora_scaling(r, alpha, rs)
    wide_A, wide_B = V.pissa_as_lora(A, Bm, A0, B0)
    wide_alpha = V.pissa_lora_alpha(alpha, rs)
    assert wide_A.shape == (2 * r, k) and wide_B.shape == (n, 2 * r)
    s2 = V.lora_scaling(2 * r, wide_alpha, rs)
    assert math.isclose(s2, s, rel_tol=1e-15)
    # residual W - s B0 A0 plus s B A equals W plus the wide adapter's update
    np.testing.assert_allclose(s2 * host(wide_B) @ host(wide_A),
                               s * (host(Bm) @ host(A) - host(B0) @ host(A0)),
                               rtol=1e-12, atol=1e-12)
