"""Helpers the tests share: finite-difference gradient checks, host copies of arrays, and the
command line in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import minilora as ml
from minilora import backend as B

ROOT = Path(__file__).resolve().parents[1]
# a task model that trains in well under a second: 1-digit addition, one 16-channel block
TINY = ["--digits", "1", "--heldout", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--batch-size", "16", "--eval-examples", "20", "--no-progress"]


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """``python -m minilora ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "minilora", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


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
