"""Framework overhead: each minilora op against the bare array calls that do the same math.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ops            # the full table, 1-2 minutes
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ops --quick    # one small size, a few seconds

(One BLAS thread keeps the timings stable on a shared machine; it must be set before NumPy is
imported, hence the environment variable.)

For every op and size the forward pass (with the graph recorded, as in training) and the forward +
backward pass are timed in minilora and in hand-written NumPy (the same equations, the same
algorithm, no graph). The two are measured alternately, round after round, so that a burst of
other work on a shared machine hits both; the table gives medians and the ratio minilora / NumPy,
which is the price of the autograd machinery (graph nodes, closures, gradient accumulation, and
the copy each leaf's gradient gets). Before timing, every pair is checked to compute the same
values, so the baseline cannot drift from what minilora does.

The bare code uses ``backend.xp``, so with MINILORA_BACKEND=cupy it measures CuPy the same way.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

import minilora as ml
from minilora import backend as B
from minilora import functional as F

GELU_C = math.sqrt(2.0 / math.pi)
FULL_SIZES = [(64, 256), (512, 512), (2048, 1024)]
QUICK_SIZES = [(64, 256)]
ATTENTION = (16, 4, 128, 64)  # (B, nh, T, hs): q @ k^T is (B, nh, T, T)
# (tokens, vocabulary, width): the reference config's wte and wpe (16 x 128 tokens), GPT-2's wte
FULL_EMBEDDINGS = [(2048, 64, 256), (2048, 128, 256), (2048, 50257, 768)]
QUICK_EMBEDDINGS = [(2048, 64, 256)]


# ----------------------------------------------------------------------- bare NumPy helpers

def np_softmax(z, axis=-1):
    e = B.xp.exp(z - z.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def np_index_add_rows(idx, g, num_rows):
    """The same algorithm minilora picks: sort the rows by index; a one-hot matmul when most of
    them repeat an index, else copy each index's first row and ``np.add.at`` only the repeats."""
    xp = B.xp
    if xp is not np:
        import cupyx

        out = xp.zeros((num_rows, g.shape[1]), dtype=g.dtype)
        cupyx.scatter_add(out, idx, g)
        return out
    n = idx.shape[0]
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    first = np.r_[True, s[1:] != s[:-1]]
    repeats = n - int(np.count_nonzero(first))
    if num_rows * n <= 500 * repeats and num_rows * n <= 1 << 24:
        onehot = np.zeros((num_rows, n), dtype=g.dtype)
        onehot[idx, np.arange(n)] = 1
        return onehot @ g
    out = np.zeros((num_rows, g.shape[1]), dtype=g.dtype)
    out[s[first]] = g[order[first]]
    if repeats:
        np.add.at(out, s[~first], g[order[~first]])
    return out


def np_add_at_rows(idx, g, num_rows):
    """The textbook scatter-add, for comparison: ``np.add.at`` over every row."""
    out = B.xp.zeros((num_rows, g.shape[1]), dtype=g.dtype)
    if B.xp is np:
        np.add.at(out, idx, g)
    else:
        import cupyx

        cupyx.scatter_add(out, idx, g)
    return out


# --------------------------------------------------------------------------------- the cases

class Case:
    """One op at one size: minilora's version and the bare one, forward and forward+backward."""

    def __init__(self, op: str, shape: str, ml_fn: Callable, leaves: list, upstream,
                 np_fwd: Callable, np_fwdbwd: Callable) -> None:
        self.op, self.shape = op, shape
        self.ml_fn, self.leaves, self.upstream = ml_fn, leaves, upstream
        self.np_fwd, self.np_fwdbwd = np_fwd, np_fwdbwd

    def ml_fwd(self):
        return self.ml_fn()

    def ml_fwdbwd(self):
        for t in self.leaves:
            t.grad = None
        out = self.ml_fn()
        out.backward(self.upstream)
        return out

    def check(self) -> None:
        """Both sides must compute the same output and the same gradients."""
        out = self.ml_fwdbwd()
        ref_out, ref_grads = self.np_fwdbwd()
        pairs = [(out.data, ref_out)] + [(t.grad, g) for t, g in zip(self.leaves, ref_grads)]
        for i, (a, b) in enumerate(pairs):
            a, b = B.to_numpy(a), B.to_numpy(b)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4):
                raise AssertionError(f"{self.op} {self.shape}: array {i} differs from the bare "
                                     f"version (max abs diff {np.abs(a - b).max()})")


def _rand(rng, *shape):
    return B.asarray(rng.standard_normal(shape).astype(np.float32))


def _leaf(arr):
    return ml.Tensor(arr, requires_grad=True)


def cases_for(R: int, C: int, rng) -> list[Case]:
    """Every op on activations of shape (R, C) (weights (C, C)), embedding aside."""
    xp = B.xp
    shape = f"({R}, {C})"
    a, b = _rand(rng, R, C), _rand(rng, R, C)
    w, bias = _rand(rng, C, C) * (1 / math.sqrt(C)), _rand(rng, C)
    g = _rand(rng, R, C)
    ta, tb, tw, tbias = _leaf(a), _leaf(b), _leaf(w), _leaf(bias)
    one = B.asarray(np.float32(1.0))
    out = []

    # add / mul: y = a + b, y = a * b
    out.append(Case("add", shape, lambda: ta + tb, [ta, tb], g,
                    lambda: a + b, lambda: (a + b, (g, g))))
    out.append(Case("mul", shape, lambda: ta * tb, [ta, tb], g,
                    lambda: a * b, lambda: (a * b, (g * b, g * a))))

    # matmul: y = a @ W, (R, C) @ (C, C)
    out.append(Case("matmul", shape + " @ (C, C)", lambda: ta @ tw, [ta, tw], g,
                    lambda: a @ w, lambda: (a @ w, (g @ w.T, a.T @ g))))

    # linear: y = a W^T + b
    def np_linear_fb():
        y = a @ w.T
        y += bias
        return y, (g @ w, g.T @ a, g.sum(axis=0))

    out.append(Case("linear", shape, lambda: F.linear(ta, tw, tbias), [ta, tw, tbias], g,
                    lambda: a @ w.T + bias, np_linear_fb))

    # sum to a scalar
    out.append(Case("sum", shape, lambda: ta.sum(), [ta], one,
                    lambda: a.sum(), lambda: (a.sum(), (xp.broadcast_to(one, a.shape),))))

    # softmax and log_softmax over the last axis
    def np_softmax_fb():
        y = np_softmax(a)
        return y, (y * (g - (g * y).sum(axis=-1, keepdims=True)),)

    out.append(Case("softmax", shape, lambda: F.softmax(ta), [ta], g,
                    lambda: np_softmax(a), np_softmax_fb))

    def np_log_softmax_f():
        s = a - a.max(axis=-1, keepdims=True)
        return s - xp.log(xp.exp(s).sum(axis=-1, keepdims=True))

    def np_log_softmax_fb():
        y = np_log_softmax_f()
        return y, (g - xp.exp(y) * g.sum(axis=-1, keepdims=True),)

    out.append(Case("log_softmax", shape, lambda: F.log_softmax(ta), [ta], g,
                    np_log_softmax_f, np_log_softmax_fb))

    # GELU, tanh form
    def np_gelu_f():
        t = xp.tanh(GELU_C * (a + 0.044715 * a * a * a))
        return 0.5 * a * (1.0 + t), t

    def np_gelu_fb():
        y, t = np_gelu_f()
        dt = GELU_C * (1.0 + 3 * 0.044715 * a * a)
        return y, (g * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dt),)

    out.append(Case("gelu", shape, lambda: F.gelu(ta), [ta], g,
                    lambda: np_gelu_f()[0], np_gelu_fb))

    # layer norm with weight and bias (eps 1e-5)
    lw, lb = _rand(rng, C), _rand(rng, C)
    tlw, tlb = _leaf(lw), _leaf(lb)

    def np_ln_f():
        mu = a.mean(axis=-1, keepdims=True)
        c = a - mu
        rstd = 1.0 / xp.sqrt((c * c).mean(axis=-1, keepdims=True) + 1e-5)
        xhat = c * rstd
        return xhat * lw + lb, xhat, rstd

    def np_ln_fb():
        y, xhat, rstd = np_ln_f()
        gh = g * lw
        gx = gh - gh.mean(axis=-1, keepdims=True)
        gx -= xhat * (gh * xhat).mean(axis=-1, keepdims=True)
        gx *= rstd
        return y, (gx, (g * xhat).sum(axis=0), g.sum(axis=0))

    out.append(Case("layer_norm", shape, lambda: F.layer_norm(ta, tlw, tlb), [ta, tlw, tlb], g,
                    lambda: np_ln_f()[0], np_ln_fb))

    # cross-entropy of (R, C) logits against R targets, mean over rows
    targets = B.asarray(rng.integers(0, C, size=R))
    rows = xp.arange(R)

    def np_ce_f():
        zmax = a.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(a - zmax).sum(axis=1)) + zmax[:, 0]
        return (lse - a[rows, targets]).sum() / R, lse

    def np_ce_fb():
        loss, lse = np_ce_f()
        p = xp.exp(a - lse[:, None])
        p[rows, targets] -= 1
        p *= 1.0 / R
        return loss, (p,)

    out.append(Case("cross_entropy", shape, lambda: F.cross_entropy(ta, targets), [ta], one,
                    lambda: np_ce_f()[0], np_ce_fb))

    # getitem: a column slice, as when q, k, v are cut out of one projection
    half = g[:, : C // 2]

    def np_getitem_fb():
        full = xp.zeros_like(a)
        full[:, : C // 2] = half
        return a[:, : C // 2], (full,)

    out.append(Case("getitem", shape + "[:, :C/2]", lambda: ta[:, : C // 2], [ta], half,
                    lambda: a[:, : C // 2], np_getitem_fb))
    return out


def embedding_cases(N: int, V: int, C: int, rng) -> list[Case]:
    """N token lookups in a (V, C) table; the backward against the same algorithm by hand, and
    against the textbook ``np.add.at`` (which is what minilora's sorting saves)."""
    table = _rand(rng, V, C)
    ttable = _leaf(table)
    idx = B.asarray(rng.integers(0, V, size=N))
    g = _rand(rng, N, C)
    shape = f"{N} of ({V}, {C})"
    return [
        Case("embedding", shape, lambda: F.embedding(idx, ttable), [ttable], g,
             lambda: table[idx], lambda: (table[idx], (np_index_add_rows(idx, g, V),))),
        Case("embedding vs np.add.at", shape, lambda: F.embedding(idx, ttable), [ttable], g,
             lambda: table[idx], lambda: (table[idx], (np_add_at_rows(idx, g, V),))),
    ]


def attention_cases(rng) -> list[Case]:
    """The batched matmul q @ k^T and the softmax over its (B, nh, T, T) scores."""
    Bn, nh, T, hs = ATTENTION
    q, kt = _rand(rng, Bn, nh, T, hs), _rand(rng, Bn, nh, hs, T)
    g = _rand(rng, Bn, nh, T, T)
    tq, tkt = _leaf(q), _leaf(kt)
    s = _rand(rng, Bn, nh, T, T)
    ts = _leaf(s)

    def np_softmax_fb():
        y = np_softmax(s)
        return y, (y * (g - (g * y).sum(axis=-1, keepdims=True)),)

    label = f"({Bn}, {nh}, {T}, {hs}) @ ({Bn}, {nh}, {hs}, {T})"
    return [
        Case("matmul", label, lambda: tq @ tkt, [tq, tkt], g, lambda: q @ kt,
             lambda: (q @ kt, (g @ kt.swapaxes(-1, -2), q.swapaxes(-1, -2) @ g))),
        Case("softmax", f"({Bn}, {nh}, {T}, {T})", lambda: F.softmax(ts), [ts], g,
             lambda: np_softmax(s), np_softmax_fb),
    ]


# ---------------------------------------------------------------------------------- timing

def _per_call(fn: Callable, number: int) -> float:
    B.synchronize()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    B.synchronize()
    return (time.perf_counter() - t0) / number


def _calibrate(fn: Callable, target: float) -> int:
    """How many calls make one measurement last about ``target`` seconds."""
    fn()  # warm up (first-touch allocations, lazy imports)
    once = _per_call(fn, 1)
    return max(1, min(10_000, int(target / max(once, 1e-7))))


def measure(case: Case, rounds: int, target: float) -> dict:
    """Medians over ``rounds`` of the four timings, taken alternately within each round."""
    fns = {"ml_f": case.ml_fwd, "np_f": case.np_fwd,
           "ml_fb": case.ml_fwdbwd, "np_fb": case.np_fwdbwd}
    numbers = {k: _calibrate(f, target) for k, f in fns.items()}
    samples: dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(_per_call(f, numbers[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def _load() -> str:
    """The 1-minute load average: other jobs on a shared machine skew every timing."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):  # not on every platform
        return "n/a"


def _fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small size, a few seconds")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per case")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    target = 0.002 if args.quick else 0.02

    rng = np.random.default_rng(0)
    cases = [c for R, C in (QUICK_SIZES if args.quick else FULL_SIZES)
             for c in cases_for(R, C, rng)]
    cases += [c for N, V, C in (QUICK_EMBEDDINGS if args.quick else FULL_EMBEDDINGS)
              for c in embedding_cases(N, V, C, rng)]
    if not args.quick:
        cases += attention_cases(rng)

    print(f"# minilora op overhead: minilora / bare {B.get_backend()}, float32, medians of "
          f"{rounds} alternating rounds")
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"python {platform.python_version()}, numpy {np.__version__}, "
          f"load average at start {_load()}")
    print()
    print("| op | shape | fwd minilora (us) | fwd numpy (us) | fwd ratio "
          "| fwd+bwd minilora (us) | fwd+bwd numpy (us) | fwd+bwd ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    ratios = []
    for case in cases:
        case.check()
        t = measure(case, rounds, target)
        rf, rfb = t["ml_f"] / t["np_f"], t["ml_fb"] / t["np_fb"]
        ratios.append((rf, rfb))
        print(f"| {case.op} | {case.shape} | {_fmt_time(t['ml_f'])} | {_fmt_time(t['np_f'])} "
              f"| {rf:.2f} | {_fmt_time(t['ml_fb'])} | {_fmt_time(t['np_fb'])} | {rfb:.2f} |",
              flush=True)
    gm_f = math.exp(statistics.fmean(math.log(r) for r, _ in ratios))
    gm_fb = math.exp(statistics.fmean(math.log(r) for _, r in ratios))
    print()
    print(f"geometric mean ratio: forward {gm_f:.2f}, forward+backward {gm_fb:.2f} "
          f"({len(cases)} cases, {time.perf_counter() - start:.0f} s, load average at end "
          f"{_load()})")


if __name__ == "__main__":
    main()
