"""A 2-layer MLP (Linear - GELU(tanh) - Linear + cross-entropy) in minilora and in PyTorch with the
same float64 weights: same loss, same gradients, and the same weights after AdamW and SGD steps."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minilora as ml  # noqa: E402
from minilora import backend as B  # noqa: E402
from minilora import functional as F  # noqa: E402
from minilora.nn import GELU, Linear, Sequential  # noqa: E402
from minilora.optim import SGD, AdamW, clip_grad_norm  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck

D_IN, D_HIDDEN, N_CLASSES, BATCH = 8, 16, 5, 12


def make_pair(seed=0):
    """The same MLP in both libraries, minilora's weights copied into torch (names match)."""
    ml.manual_seed(seed)
    ours = Sequential(Linear(D_IN, D_HIDDEN), GELU(), Linear(D_HIDDEN, N_CLASSES)).double()
    theirs = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HIDDEN),
                                 torch.nn.GELU(approximate="tanh"),
                                 torch.nn.Linear(D_HIDDEN, N_CLASSES)).double()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(host(ours.state_dict()[name]).copy()))
    return ours, theirs


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, D_IN)), rng.integers(0, N_CLASSES, size=BATCH)


def loss_pair(ours, theirs, seed):
    x, t = batch(seed)
    ours_loss = F.cross_entropy(ours(ml.Tensor(B.asarray(x))), B.asarray(t))
    theirs_loss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)),
                                                    torch.from_numpy(t))
    return ours_loss, theirs_loss


def assert_same_weights(ours, theirs, rtol, what=""):
    mine = ours.state_dict()
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(host(mine[name]), p.detach().numpy(), rtol=rtol, atol=1e-14,
                                   err_msg=f"{name} {what}")


def test_loss_and_gradients_match():
    ours, theirs = make_pair()
    ours_loss, theirs_loss = loss_pair(ours, theirs, seed=1)
    assert ours_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-13)
    ours_loss.backward()
    theirs_loss.backward()
    named = dict(ours.named_parameters())
    assert set(named) == {n for n, _ in theirs.named_parameters()}
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(host(named[name].grad), p.grad.numpy(), rtol=1e-10,
                                   atol=1e-15, err_msg=name)


def test_one_adamw_step_matches():
    ours, theirs = make_pair()
    opt = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.1)
    ours_loss, theirs_loss = loss_pair(ours, theirs, seed=1)
    ours_loss.backward()
    theirs_loss.backward()
    opt.step()
    topt.step()
    assert_same_weights(ours, theirs, rtol=1e-12)


def _train_both(ours, theirs, opt, topt, steps, max_norm=None):
    """Run both for ``steps``, comparing every step; returns how many steps were clipped."""
    clipped = 0
    for step in range(steps):
        opt.zero_grad()
        topt.zero_grad()
        ours_loss, theirs_loss = loss_pair(ours, theirs, seed=100 + step)
        assert ours_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-9), step
        ours_loss.backward()
        theirs_loss.backward()
        if max_norm is not None:
            norm = clip_grad_norm(ours.parameters(), max_norm)
            tnorm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
            assert norm == pytest.approx(float(tnorm), rel=1e-10), step
            clipped += norm > max_norm
        opt.step()
        topt.step()
        assert_same_weights(ours, theirs, rtol=1e-9, what=f"after step {step + 1}")
    return clipped


@pytest.mark.parametrize("max_norm", [None, 0.1])
def test_adamw_ten_steps_match(max_norm):
    ours, theirs = make_pair(seed=2)
    settings = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    clipped = _train_both(ours, theirs, AdamW(ours.parameters(), **settings),
                          torch.optim.AdamW(theirs.parameters(), **settings), 10, max_norm)
    assert max_norm is None or clipped >= 5  # clipping really happened


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.9, 0.01), (0.0, 0.01)])
def test_sgd_ten_steps_match(momentum, weight_decay):
    ours, theirs = make_pair(seed=3)
    settings = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    clipped = _train_both(ours, theirs, SGD(ours.parameters(), **settings),
                          torch.optim.SGD(theirs.parameters(), **settings), 10, max_norm=0.3)
    assert clipped > 0  # clipping really happened


def test_adamw_frozen_and_late_parameters_match():
    """A frozen layer, and a parameter whose first gradient arrives at step 3: torch counts each
    parameter's own steps for the bias correction, and so must we."""
    ours, theirs = make_pair(seed=4)
    ours[0].bias.requires_grad_(False)
    theirs[0].bias.requires_grad_(False)
    opt = AdamW(ours.parameters(), lr=2e-2, weight_decay=0.1)
    topt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2,
                             weight_decay=0.1)
    for step in range(6):
        opt.zero_grad()
        topt.zero_grad()
        ours_loss, theirs_loss = loss_pair(ours, theirs, seed=200 + step)
        ours_loss.backward()
        theirs_loss.backward()
        if step < 2:  # no gradient for the output bias yet
            ours[2].bias.grad = None
            theirs[2].bias.grad = None
        opt.step()
        topt.step()
    assert ours[0].bias.grad is None
    assert_same_weights(ours, theirs, rtol=1e-9)
