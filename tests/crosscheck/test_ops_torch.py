"""Every op's values and gradients against PyTorch, in float64.

One helper, :func:`compare`, does all the work (the pattern of tinygrad's test_ops): it builds the
same float64 inputs for both libraries, runs the minilora function and the torch function, and
compares the outputs and the gradient of every input under one random output weighting.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minilora as ml  # noqa: E402
from minilora import backend as B  # noqa: E402
from minilora import functional as F  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck
TF = torch.nn.functional


def make_input(spec, rng: np.random.Generator, values: str) -> np.ndarray:
    if isinstance(spec, np.ndarray):
        return spec.astype(np.float64)
    if values == "positive":
        return rng.uniform(0.5, 2.0, spec)
    if values == "nonzero":
        return rng.choice([-1.0, 1.0], spec) * rng.uniform(0.2, 2.0, spec)
    return rng.standard_normal(spec)


def compare(ml_fn, torch_fn, *specs, values: str = "normal", rtol: float = 1e-7,
            atol: float = 1e-9, seed: int = 0) -> None:
    """Assert ml_fn and torch_fn agree on values and on the gradients of every input.

    ``specs`` are shapes (filled with ``values``: normal, positive or nonzero) or ready arrays.
    The gradients are those of ``sum(out * w)`` for one fixed random ``w``.
    """
    rng = np.random.default_rng(seed)
    arrays = [make_input(s, rng, values) for s in specs]
    mts = [ml.Tensor(B.asarray(a), requires_grad=True) for a in arrays]
    tts = [torch.tensor(a, requires_grad=True) for a in arrays]
    mout, tout = ml_fn(*mts), torch_fn(*tts)
    assert mout.shape == tuple(tout.shape), f"shape {mout.shape} != torch {tuple(tout.shape)}"
    assert mout.dtype == np.float64
    np.testing.assert_allclose(host(mout), tout.detach().numpy(), rtol=rtol, atol=atol,
                               err_msg="forward values")
    w = rng.standard_normal(mout.shape)
    (mout * ml.Tensor(B.asarray(w))).sum().backward()
    (tout * torch.from_numpy(w)).sum().backward()
    for i, (m, t) in enumerate(zip(mts, tts)):
        assert (m.grad is None) == (t.grad is None), f"input {i}: only one library has a grad"
        if t.grad is not None:
            np.testing.assert_allclose(host(m.grad), t.grad.numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"gradient of input {i}")


# ------------------------------------------------------------------------------ elementwise

def test_add_broadcast():
    compare(lambda a, b: a + b, lambda a, b: a + b, (2, 1, 3), (4, 1))


def test_sub_broadcast():
    compare(lambda a, b: a - b, lambda a, b: a - b, (3,), (2, 4, 3))


def test_mul_broadcast():
    compare(lambda a, b: a * b, lambda a, b: a * b, (2, 3, 1), (1, 4))


def test_div_broadcast():
    compare(lambda a, b: a / b, lambda a, b: a / b, (2, 3), (3,), values="nonzero")


def test_neg_and_scalars():
    compare(lambda a: 2.0 - (-a) * 3.0 / 4.0 + 1.0 / a, lambda a: 2.0 - (-a) * 3.0 / 4.0 + 1.0 / a,
            (3, 4), values="nonzero")


def test_pow_scalar_exponents():
    compare(lambda a: a ** 3 + a ** 0.5 + a ** -1.5, lambda a: a ** 3 + a ** 0.5 + a ** -1.5,
            (2, 5), values="positive")


def test_pow_tensor_exponent_and_rpow():
    compare(lambda a, b: a ** b + 2.0 ** b, lambda a, b: a ** b + 2.0 ** b, (2, 3), (3,),
            values="positive")


def test_exp_log_sqrt():
    compare(lambda a: a.exp() + a.log() * a.sqrt(), lambda a: a.exp() + a.log() * a.sqrt(),
            (3, 4), values="positive")


def test_tanh():
    compare(lambda a: a.tanh(), torch.tanh, (4, 5))


def test_relu():
    compare(lambda a: a.relu(), torch.relu, (4, 5), values="nonzero")


def test_gelu_tanh_form():
    compare(F.gelu, lambda a: TF.gelu(a, approximate="tanh"), (4, 6))


def test_where_and_masked_fill():
    mask = np.random.default_rng(1).random((3, 4)) < 0.5
    tmask = torch.from_numpy(mask)
    compare(lambda a, b: ml.where(mask, a, b) + a.masked_fill(mask, -2.0),
            lambda a, b: torch.where(tmask, a, b) + a.masked_fill(tmask, -2.0), (3, 4), (4,))


# ----------------------------------------------------------------------------------- matmul

def test_matmul_2d():
    compare(lambda a, b: a @ b, lambda a, b: a @ b, (3, 4), (4, 5))


def test_matmul_batched_broadcast():
    compare(lambda a, b: a @ b, lambda a, b: a @ b, (2, 1, 3, 4), (5, 4, 2))


def test_matmul_batch_times_matrix():
    compare(lambda a, b: a @ b, lambda a, b: a @ b, (2, 3, 4), (4, 5))


@pytest.mark.parametrize("sa,sb", [((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,)),
                                   ((4,), (2, 4, 3)), ((2, 3, 4), (4,))])
def test_matmul_vectors(sa, sb):
    compare(lambda a, b: a @ b, lambda a, b: a @ b, sa, sb)


def test_linear():
    compare(F.linear, TF.linear, (2, 3, 4), (5, 4), (5,))
    compare(F.linear, TF.linear, (4,), (5, 4))


# ------------------------------------------------------------------------------- reductions

@pytest.mark.parametrize("axis,keepdims", [(None, False), (1, True), (-1, False), ((0, 2), True)])
def test_sum_and_mean(axis, keepdims):
    dims = axis if axis is not None else tuple(range(3))
    compare(lambda a: a.sum(axis=axis, keepdims=keepdims) * a.mean(axis=axis, keepdims=keepdims),
            lambda a: a.sum(dim=dims, keepdim=keepdims) * a.mean(dim=dims, keepdim=keepdims),
            (2, 3, 4))


def test_amax_with_ties():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, -1.0], [5.0, 4.0, 5.0, 5.0]])
    compare(lambda a: a.max(axis=1), lambda a: torch.amax(a, dim=1), x)
    compare(lambda a: a.max(axis=0, keepdims=True), lambda a: torch.amax(a, 0, keepdim=True), x)
    compare(lambda a: a.max(), torch.amax, x)


@pytest.mark.parametrize("ddof", [0, 1])
def test_var(ddof):
    compare(lambda a: a.var(axis=-1, ddof=ddof), lambda a: torch.var(a, dim=-1, correction=ddof),
            (3, 5))
    compare(lambda a: a.var(axis=(0, 2), keepdims=True, ddof=ddof),
            lambda a: torch.var(a, dim=(0, 2), keepdim=True, correction=ddof), (2, 3, 4))


# ------------------------------------------------------------------------------------ shapes

def test_reshape_transpose_permute():
    compare(lambda a: a.reshape(4, 6).T.reshape(2, 3, 4).permute(2, 0, 1).transpose(0, 2) * 2.0,
            lambda a: a.reshape(4, 6).T.reshape(2, 3, 4).permute(2, 0, 1).transpose(0, 2) * 2.0,
            (2, 3, 4))


def test_getitem_with_repeated_indices():
    idx = np.array([2, 0, 2, 2])
    tidx = torch.from_numpy(idx)
    compare(lambda a: a[idx] * a[2:, 1::2][:, -1:], lambda a: a[tidx] * a[2:, 1::2][:, -1:],
            (3, 4))
    compare(lambda a: a[:, idx], lambda a: a[:, tidx], (3, 4))


def test_concatenate_split_stack():
    def mine(a, b):
        pieces = ml.split(ml.concatenate([a, b], axis=1), [1, 4], axis=1)
        return ml.stack([pieces[0] * 2.0, pieces[1][:, :1]], axis=-1)

    def theirs(a, b):
        pieces = torch.split(torch.cat([a, b], dim=1), [1, 4], dim=1)
        return torch.stack([pieces[0] * 2.0, pieces[1][:, :1]], dim=-1)
    compare(mine, theirs, (3, 2), (3, 3))
    compare(lambda a: ml.concatenate(ml.split(a, 2, axis=0)[::-1]),
            lambda a: torch.cat(torch.split(a, 2, dim=0)[::-1]), (5, 2))


# -------------------------------------------------------------------------- fused functional

@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax(axis):
    compare(lambda a: F.softmax(a, axis=axis), lambda a: torch.softmax(a, dim=axis), (3, 4, 5))
    compare(lambda a: F.log_softmax(a, axis=axis), lambda a: torch.log_softmax(a, dim=axis),
            (3, 4, 5))


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_with_ignore_index(ignore_index):
    targets = np.array([[0, 2, 4], [ignore_index, 1, ignore_index]])
    tt = torch.from_numpy(targets)
    compare(lambda z: F.cross_entropy(z, targets, ignore_index=ignore_index),
            lambda z: TF.cross_entropy(z.reshape(-1, 5), tt.reshape(-1),
                                       ignore_index=ignore_index), (2, 3, 5))


def test_layer_norm():
    compare(lambda x, w, b: F.layer_norm(x, w, b),
            lambda x, w, b: TF.layer_norm(x, (6,), w, b, eps=1e-5), (2, 3, 6), (6,), (6,))
    compare(lambda x: F.layer_norm(x, eps=1e-3), lambda x: TF.layer_norm(x, (4,), eps=1e-3),
            (5, 4))


@pytest.mark.parametrize("vocab", [6, 1500])  # both backward paths of index_add_rows
def test_embedding(vocab):
    idx = np.array([[1, 3, 1], [5, 1, 0]])
    compare(lambda w: F.embedding(idx, w), lambda w: TF.embedding(torch.from_numpy(idx), w),
            (vocab, 4))


def test_mse_loss():
    compare(F.mse_loss, TF.mse_loss, (3, 4), (3, 4))


def test_dropout_matches_the_same_mask():
    # the masks come from different generators, so feed torch minilora's mask
    ml.manual_seed(7)
    keep = host(B.random_uniform((4, 5), np.float64)) >= 0.3
    tkeep = torch.from_numpy(keep)

    def mine(a):
        ml.manual_seed(7)
        return F.dropout(a, 0.3)
    compare(mine, lambda a: a * tkeep / 0.7, (4, 5))
