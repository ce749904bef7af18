"""Helpers the tests share: finite-difference gradient checks and host copies of arrays."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import minilora as ml
from minilora import backend as B


def host(x) -> np.ndarray:
    """A NumPy copy of a Tensor or backend array (works on both backends)."""
    if isinstance(x, ml.Tensor):
        x = x.data
    return B.to_numpy(x)


def numeric_grad(f: Callable[[], float], arr, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f()`` with respect to array ``arr`` (in place).

    Works on either backend: ``arr`` is perturbed element by element through a flat view.
    """
    flat = arr.reshape(-1)
    grad = np.zeros(flat.shape[0], dtype=np.float64)
    for i in range(flat.shape[0]):
        old = float(flat[i])
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(arr.shape)


def check_grads(fn: Callable[..., ml.Tensor], inputs: Sequence[np.ndarray],
                rtol: float = 1e-5, atol: float = 1e-7, eps: float = 1e-6) -> None:
    """Assert that autograd's gradients of ``sum(fn(*tensors) * w)`` match finite differences.

    ``inputs`` are float64 host arrays; a fixed random weighting ``w`` makes every output element
    matter (a plain sum would hide some errors, e.g. in softmax whose rows sum to one).
    """
    tensors = [ml.Tensor(B.asarray(np.array(x, dtype=np.float64)), requires_grad=True)
               for x in inputs]
    out = fn(*tensors)
    w = B.asarray(np.random.default_rng(1).standard_normal(out.shape))

    def value() -> float:
        with ml.no_grad():
            return float((fn(*tensors).data * w).sum())

    (out * ml.Tensor(w)).sum().backward()
    for i, t in enumerate(tensors):
        expected = numeric_grad(value, t.data, eps)
        assert t.grad is not None, f"input {i} got no gradient"
        np.testing.assert_allclose(host(t.grad), expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} (shape {t.shape})")
