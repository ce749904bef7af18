"""Cross-entropy's fast form (minilora.fast.loss) pinned bit for bit to the reference form.

Each row gets the reference form's operations in the reference form's order (a row's sum runs
along its contiguous entries whatever the piece), so the loss and the gradient must be equal to
the bit, in float32 and float64, across piece boundaries and with ignored targets.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import fast
from minilora import functional as F
from minilora.fast import loss as fast_loss
from tests.helpers import check_grads, host


def loss_and_grad(z: np.ndarray, t: np.ndarray, ignore_index: int = -100):
    """F.cross_entropy's loss and its gradient with respect to the logits, on the host."""
    logits = ml.Tensor(B.asarray(z), requires_grad=True)
    loss = F.cross_entropy(logits, B.asarray(t), ignore_index=ignore_index)
    loss.backward()
    return host(loss.data), host(logits.grad)


def both_forms(z, t, ignore_index=-100):
    with fast.forms(True):
        fast_result = loss_and_grad(z, t, ignore_index)
    with fast.reference():
        reference = loss_and_grad(z, t, ignore_index)
    return fast_result, reference


def assert_bits_equal(a, b, what: str) -> None:
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
        f"{what}: differs by up to {np.max(np.abs(a.astype(np.float64) - b))}"


@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 40), vocab=st.integers(1, 70), dtype=st.sampled_from([np.float32,
                                                                                np.float64]),
       scale=st.sampled_from([0.1, 3.0, 30.0]), piece=st.sampled_from([1, 7, 64, 1 << 16]),
       ignored=st.floats(0.0, 0.6), seed=st.integers(0, 2**16))
def test_cross_entropy_fast_form_is_the_reference_to_the_bit(rows, vocab, dtype, scale, piece,
                                                             ignored, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((rows, vocab)) * scale).astype(dtype)
    t = rng.integers(0, vocab, rows)
    t[rng.random(rows) < ignored] = -100
    with mock.patch.object(fast_loss, "PIECE", piece):  # rows per piece: piece // vocab, >= 1
        (loss_f, grad_f), (loss_r, grad_r) = both_forms(z, t)
    assert_bits_equal(loss_f, loss_r, "loss")
    assert_bits_equal(grad_f, grad_r, "gradient")


@pytest.mark.host_only("host memory traced by tracemalloc; on a device a piece is the whole array")
def test_the_forward_pass_makes_no_logits_sized_temporary():
    """lse straight from the logits: no array of the logits' size is made (the reference form's
    exp(z - max) is one), so a large vocabulary's forward pass holds only the logits."""
    import tracemalloc

    if B.on_device():
        pytest.skip("on a device a piece is the whole array")
    z = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    fast_loss.logsumexp_rows(z)  # warm
    tracemalloc.start()
    fast_loss.logsumexp_rows(z)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < z.nbytes / 8, f"peak {peak} bytes against logits of {z.nbytes}"


def test_cross_entropy_fast_form_gradients_against_finite_differences():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 5))
    t = np.array([0, 4, -100, 2, 2, 1])
    with fast.forms(True):
        check_grads(lambda logits: F.cross_entropy(logits, t), [z])
