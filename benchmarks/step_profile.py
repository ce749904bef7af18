"""What one training step of the GPT costs, counted and timed: the helpers of train_step.py.

Two views of minilora's step:

* **the limit** (:func:`step_matmuls`, :func:`matmul_time`): every matmul of the step's forward
  and backward pass, counted from the shapes, and the time NumPy's BLAS takes for those same
  matmuls alone, measured here. A step cannot be faster than its matmuls; step time / matmul-only
  time says how far a framework is from that floor.
* **the breakdown** (:func:`breakdown`): the step timed by op family (matmul, attention,
  LayerNorm, ...), by wrapping the functions minilora's model really calls, and the backward
  closures their outputs carry, with timers.

    from step_profile import step_matmuls, matmul_time, breakdown
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minilora.fast.cpu import blas_threads_as, get_blas_threads, run_in_threads  # noqa: E402

# ------------------------------------------------------------------------------ the FLOPs


@dataclass(frozen=True)
class Matmul:
    """One matmul of a step: ``batch`` products (m, k) @ (k, n), each operand as stored:
    ``layout`` "nn", "nt" (the right operand stored transposed, as x W^T) or "tn" (the left one
    transposed, as g^T x). ``part`` is "forward" or "backward", ``family`` what it belongs to
    ("linear", "lora", "attention", "head")."""

    what: str
    family: str
    part: str
    batch: int
    m: int
    k: int
    n: int
    layout: str = "nn"

    @property
    def flops(self) -> int:
        """2 m k n per product (a multiply and an add per term)."""
        return 2 * self.batch * self.m * self.k * self.n

    @property
    def shape(self) -> tuple:
        """What the time of the product depends on: (batch, m, k, n, layout)."""
        return (self.batch, self.m, self.k, self.n, self.layout)


def _linear(out: list, name: str, rows: int, fin: int, fout: int, x_needs: bool,
            weight_trains: bool, rank: int) -> bool:
    """The matmuls of one linear layer y = x W^T (+ s (x A^T) B^T with a LoRA adapter of rank
    ``rank`` > 0) on ``rows`` rows; returns whether its output needs a gradient."""
    out.append(Matmul(f"{name} x W^T", "linear", "forward", 1, rows, fin, fout, "nt"))
    if x_needs:
        out.append(Matmul(f"{name} dx = g W", "linear", "backward", 1, rows, fout, fin))
    if weight_trains:
        out.append(Matmul(f"{name} dW = g^T x", "linear", "backward", 1, fout, rows, fin, "tn"))
    if rank:
        out += [Matmul(f"{name} h = x A^T", "lora", "forward", 1, rows, fin, rank, "nt"),
                Matmul(f"{name} h B^T", "lora", "forward", 1, rows, rank, fout, "nt"),
                Matmul(f"{name} gh = g B", "lora", "backward", 1, rows, fout, rank),
                Matmul(f"{name} dA = gh^T x", "lora", "backward", 1, rank, rows, fin, "tn"),
                Matmul(f"{name} dB = g^T h", "lora", "backward", 1, fout, rows, rank, "tn")]
        if x_needs:
            out.append(Matmul(f"{name} dx += gh A", "lora", "backward", 1, rows, rank, fin))
    return x_needs or weight_trains or rank > 0


def _attention(out: list, sequences: int, cfg: Any, q: bool, k: bool, v: bool) -> bool:
    """The matmuls of causal attention over ``sequences`` sequences, whose q, k, v need a
    gradient as given; returns whether its output needs one."""
    T, heads = cfg.block_size, sequences * cfg.n_head
    hs = cfg.n_embd // cfg.n_head
    out += [Matmul("S = q k^T", "attention", "forward", heads, T, hs, T, "nt"),
            Matmul("y = P v", "attention", "forward", heads, T, T, hs)]
    if q or k:
        out.append(Matmul("dP = g v^T", "attention", "backward", heads, T, hs, T, "nt"))
    if v:
        out.append(Matmul("dv = P^T g", "attention", "backward", heads, T, T, hs, "tn"))
    if q:
        out.append(Matmul("dq = dS k", "attention", "backward", heads, T, T, hs))
    if k:
        out.append(Matmul("dk = dS^T q", "attention", "backward", heads, T, T, hs, "tn"))
    return q or k or v


def step_matmuls(cfg: Any, sequences: int, mode: str, rank: int = 8,
                 targets: tuple = ("q_proj", "v_proj")) -> list[Matmul]:
    """Every matmul of one training step of the GPT ``cfg`` on ``sequences`` sequences.

    With N = sequences * T rows, C = n_embd, V = vocab_size, r = ``rank``, each linear layer
    (in, out) costs 2 N in out forward, 2 N in out for its input gradient (when its input needs
    one: everything downstream of a trainable parameter does) and 2 N in out for its weight
    gradient (only when W trains: mode "full"); a LoRA adapter adds 2 N r (in + out) forward and
    2 N r (2 out + in) backward (+ 2 N r in for its input gradient). Per layer the projections
    are q, k, v, o (C, C), fc (C, 4C) and proj (4C, C): 24 N C^2 forward. Attention costs
    2 sequences T^2 C for each of q k^T and P v forward, and as much for each of dP, dv, dq, dk
    backward (those needed), counted dense: the masked half is not subtracted, though
    minilora's fused kernel skips a quarter of it from T = 64 and SDPA's kernel skips masked
    blocks. The tied head costs 2 N C V forward, 2 N C V for its input gradient and, in mode
    "full", 2 N C V for the embedding's gradient. So a full step is about
    3 x (24 N C^2 L + 2 N C V) + 12 sequences T^2 C L, as the classic 6 x parameters x tokens.
    ``mode`` is "full" (every weight trains), "lora" or "qlora" (only the adapters on
    ``targets``; the 4-bit base's matmuls are the same shapes, dequantized).
    """
    rows, C, L = sequences * cfg.block_size, cfg.n_embd, cfg.n_layer
    full = mode == "full"
    out: list[Matmul] = []
    needs = full  # the residual stream from the embeddings: trains only in full fine-tuning

    def lin(name: str, fin: int, fout: int, x_needs: bool) -> bool:
        return _linear(out, name, rows, fin, fout, x_needs, full,
                       0 if full or name not in targets else rank)

    for _ in range(L):
        a = needs or full  # ln_1's gain and bias train in full fine-tuning
        q, k, v = (lin(name, C, C, a) for name in ("q_proj", "k_proj", "v_proj"))
        y = _attention(out, sequences, cfg, q, k, v)
        needs = lin("o_proj", C, C, y) or needs
        h = lin("fc", C, 4 * C, needs or full)
        needs = lin("proj", 4 * C, C, h) or needs
    out.append(Matmul("logits = x wte^T", "head", "forward", 1, rows, C, cfg.vocab_size, "nt"))
    out.append(Matmul("head dx = g wte", "head", "backward", 1, rows, cfg.vocab_size, C))
    if full:
        out.append(Matmul("head d wte = g^T x", "head", "backward", 1, cfg.vocab_size, rows, C,
                          "tn"))
    return out


def flop_summary(matmuls: list[Matmul]) -> dict:
    """FLOPs of ``matmuls`` in all, by part (forward, backward) and by family."""
    by_part, by_family = Counter(), Counter()
    for m in matmuls:
        by_part[m.part] += m.flops
        by_family[m.family] += m.flops
    return {"total": sum(m.flops for m in matmuls), "forward": by_part["forward"],
            "backward": by_part["backward"], "by_family": dict(by_family),
            "matmuls": len(matmuls)}


# ------------------------------------------------------------------------ the matmul floor

def _operands(shape: tuple, rng: np.random.Generator) -> tuple:
    """Float32 operands of one product shape (batch, m, k, n, layout), stored as the layout
    says (a transposed operand is a transposed view, which BLAS reads without a copy)."""
    batch, m, k, n, layout = shape
    lead = (batch,) if batch > 1 else ()

    def arr(*dims: int) -> np.ndarray:
        return rng.standard_normal(lead + dims, dtype=np.float32)
    a = arr(k, m).swapaxes(-1, -2) if layout == "tn" else arr(m, k)
    b = arr(n, k).swapaxes(-1, -2) if layout == "nt" else arr(k, n)
    return a, b


def _time_product(shape: tuple, rng: np.random.Generator, min_s: float) -> float:
    """Median seconds of ``np.matmul`` on one shape, into a preallocated output: at least 3
    runs and ``min_s`` seconds, after one untimed run (pages touched, BLAS warmed)."""
    a, b = _operands(shape, rng)
    out = np.matmul(a, b)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_s and len(times) < 50):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_shard_on_threads(counts: Counter, threads: int, rng: np.random.Generator,
                           min_s: float) -> float:
    """Fastest wall seconds of ``threads`` threads each running one shard's products (every
    shape of ``counts`` as many times as it occurs, each thread on operands of its own) side by
    side, started together: at least 5 runs and ``min_s`` seconds, after one untimed run. The
    fastest, not the median: a floor is what the products take when nothing slows them, and on
    a shared machine a run now and then is slowed by others.

    Two cores multiplying at once share the caches and the power budget: each runs its products
    about 8% slower than one alone (benchmarks/RESULTS.md), so a floor timed one thread at a time
    would be one no two-thread step could reach."""
    work = [[(*_operands(s, rng), c) for s, c in counts.items()] for _ in range(threads)]
    outs = [[np.matmul(a, b) for a, b, _ in products] for products in work]

    def shard(k: int) -> None:
        for (a, b, c), out in zip(work[k], outs[k]):
            for _ in range(c):
                np.matmul(a, b, out=out)
    tasks = [lambda k=k: shard(k) for k in range(threads)]
    run_in_threads(tasks)  # untimed: the pages touched, the BLAS warmed
    times: list[float] = []
    while len(times) < 5 or (sum(times) < min_s and len(times) < 50):
        t0 = time.perf_counter()
        run_in_threads(tasks)  # the loop's own pool, as its shards run
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_time(cfg: Any, batch: int, mode: str, shards: int, threads: int,
                min_s: float = 0.02, **lora: Any) -> dict:
    """The step's matmul-only time at the rate NumPy's BLAS reaches here, in the loop's thread
    setup: the batch in ``shards`` shards on ``threads`` threads, each with a one-thread BLAS;
    or, with one thread (one shard, as the loop runs a large model), on the BLAS's own threads.

    With several threads, each runs one shard's products (:func:`step_matmuls` on the largest
    shard) at the same time as the others (:func:`_time_shard_on_threads`), as the loop's shards
    do; the floor is that wall time x shards / threads. With one thread each distinct product
    shape is timed on its own and the floor is sum(time x count) x shards. Returns its seconds,
    the step's FLOPs (all shards) and the rate they imply, the number of distinct shapes and the
    BLAS threads each product ran on.
    """
    per_shard = math.ceil(batch / shards)
    shard = step_matmuls(cfg, per_shard, mode, **lora)
    counts = Counter(m.shape for m in shard)
    rng = np.random.default_rng(0)
    threads = max(1, min(threads, shards))
    blas = 1 if threads > 1 else (get_blas_threads() or 1)
    with blas_threads_as(blas):
        if threads > 1:
            floor = _time_shard_on_threads(counts, threads, rng, max(min_s, 0.5)) * shards / threads
        else:
            seconds = {s: _time_product(s, rng, min_s) for s in counts}
            floor = sum(seconds[s] * c for s, c in counts.items()) * shards
    flops = flop_summary(step_matmuls(cfg, batch, mode, **lora))["total"]
    return {"seconds": floor, "flops": flops, "gflop_s": flops / floor / 1e9,
            "shapes": len(counts), "shards": shards, "threads": threads, "blas_threads": blas}


# ---------------------------------------------------------------------------- the breakdown

FAMILIES = ("matmul", "LoRA adapters", "4-bit dequantize", "attention", "LayerNorm", "GELU",
            "softmax/cross-entropy", "embedding", "residual adds", "optimizer (AdamW + norm)")
OVERHEAD = "graph overhead (the rest)"


def _targets() -> list[tuple[Any, str, str]]:
    """(owner, attribute, family) of everything the breakdown wraps: the names as minilora's
    modules look them up when they call them (gpt.py imports causal_self_attention by name, so
    it is wrapped there; nn.Linear calls functional.linear through the module). The MLP as one
    op (``F.mlp``) counts as matmul less its GELU passes, which ``fast.mlp`` calls through its
    module and are wrapped there (its one elementwise product ga * d stays in matmul)."""
    import minilora.fast.mlp as fast_mlp
    import minilora.functional as F
    import minilora.gpt as gpt
    import minilora.lora.layer as lora_layer
    import minilora.optim as optim
    import minilora.quant.linear as quant_linear
    from minilora.tensor import Tensor

    opt = "optimizer (AdamW + norm)"
    return [(F, "linear", "matmul"), (F, "mlp", "matmul"), (fast_mlp, "gelu", "GELU"),
            (quant_linear.QuantLinear, "forward", "matmul"),
            (quant_linear, "dequantize", "4-bit dequantize"),
            (lora_layer, "add_lora_update", "LoRA adapters"),
            (gpt, "causal_self_attention", "attention"), (F, "layer_norm", "LayerNorm"),
            (F, "gelu", "GELU"), (F, "cross_entropy", "softmax/cross-entropy"),
            (F, "embedding", "embedding"), (Tensor, "__add__", "residual adds"),
            (optim.AdamW, "step", opt), (optim, "norm_array", opt),
            (optim.Optimizer, "zero_grad", opt)]


class _Clock:
    """Exclusive time per family: a wrapped call's time less that of the wrapped calls inside
    it (a 4-bit layer's dequantization is not counted again as its matmul). Safe to use from
    several threads at once: each keeps its own stack of open calls, and the families' sums
    are the time summed over the threads."""

    def __init__(self) -> None:
        from minilora.tensor import Tensor

        self._tensor = Tensor
        self.seconds: dict = defaultdict(float)
        self.calls = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # .inner: per open call, time spent in wrapped calls

    def reset(self) -> None:
        """Forget what was counted so far."""
        with self._lock:
            self.seconds.clear()
            self.calls = 0

    def _inner(self) -> list[float]:
        inner = getattr(self._local, "inner", None)
        if inner is None:
            inner = self._local.inner = []
        return inner

    def wrap(self, fn: Callable, family: str) -> Callable:
        """``fn`` timed into ``family``; an output Tensor's backward closure is wrapped too, so
        the op's backward pass is counted where its forward pass is."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            inner = self._inner()
            inner.append(0.0)
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                own = elapsed - inner.pop()
                with self._lock:
                    self.seconds[family] += own
                    self.calls += 1
                if inner:
                    inner[-1] += elapsed
            if isinstance(out, self._tensor) and out._backward is not None:
                out._backward = self.wrap(out._backward, family)
            return out
        return timed


@contextmanager
def _wrapped(clock: _Clock) -> Iterator[None]:
    """Every target of :func:`_targets` wrapped by ``clock`` inside the block, restored after."""
    saved = []
    try:
        for owner, name, family in _targets():
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, clock.wrap(original, family))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextmanager
def single_thread() -> Iterator[None]:
    """One thread for everything inside the block: OpenBLAS on one thread and minilora's
    thread helpers told there is one core (AdamW updates a large model's parameters on every
    core otherwise), so that the families' times add up to the step's."""
    import minilora.fast.cpu as cpu

    original = cpu.available_cpus
    with blas_threads_as(1):
        cpu.available_cpus = lambda: 1
        try:
            yield
        finally:
            cpu.available_cpus = original


def breakdown(step: Callable[[], Any], steps: int) -> dict:
    """Milliseconds per step by op family of ``step`` (a single-shard training step), run on one
    thread (:func:`single_thread`): one untimed step, ``steps`` plain steps timed as a whole,
    then ``steps`` with every op family wrapped by a timer (mean per step).

    The families are :data:`FAMILIES`; each counts its ops' forward calls and their backward
    closures. :data:`OVERHEAD` is the wrapped step's time less all families: the autograd walk,
    reshapes, gradient sums, the step's own Python, and the timers themselves (each wrapped call
    costs about a microsecond or two; ``wrapped_calls`` counts them). ``plain_ms`` is the same
    step unwrapped, to show what the timers add.
    """
    clock = _Clock()
    with single_thread():
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        plain = (time.perf_counter() - t0) / steps
        with _wrapped(clock):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            wrapped = (time.perf_counter() - t0) / steps
    ms = {f: 1e3 * clock.seconds.get(f, 0.0) / steps for f in FAMILIES}
    ms = {f: v for f, v in ms.items() if v > 0 or f not in ("LoRA adapters", "4-bit dequantize")}
    ms[OVERHEAD] = 1e3 * wrapped - sum(ms.values())
    return {"families_ms": ms, "wrapped_ms": 1e3 * wrapped, "plain_ms": 1e3 * plain,
            "wrapped_calls": clock.calls // steps}


def format_breakdown(b: dict) -> str:
    """:func:`breakdown`'s result as a table: family, ms per step, share of the wrapped step."""
    lines = ["| family | ms/step | share |", "|---|---:|---:|"]
    total = b["wrapped_ms"]
    for family, ms in b["families_ms"].items():
        lines.append(f"| {family} | {ms:.2f} | {100 * ms / total:.1f}% |")
    lines.append(f"| total (wrapped step) | {total:.2f} | 100% |")
    lines.append(f"timing wrappers add overhead: {b['wrapped_calls']} wrapped calls per step, "
                 f"counted in '{OVERHEAD}'; the same step unwrapped took {b['plain_ms']:.2f} ms "
                 f"(wrapped {total:.2f} ms)")
    return "\n".join(lines)


def side_by_side(run: Callable[[int], Any], threads: int, steps: int) -> dict:
    """What running a step's shards side by side costs each op family: ``run(t)`` runs one
    step's shards on t threads (each with a one-thread BLAS); it is run ``steps`` times on one
    thread (the shards one after another) and on ``threads`` threads, in alternation, with every
    family wrapped by a thread-safe timer (:func:`breakdown`'s families).

    Returns per family the milliseconds per step summed over the threads in each setup
    (``one_ms``, ``side_ms``): a family whose sum grows side by side runs slower beside the
    other thread, from the cores' shared caches and memory or from waiting for the GIL between
    NumPy calls. ``wall_ms`` are the steps' mean wall times, ``busy_ms`` the families' sums;
    threads x wall - busy is the time outside the wrapped ops (the graph's Python, waiting at
    the end).
    """
    clock = _Clock()
    walls: dict = {1: [], threads: []}
    sums: dict = {1: defaultdict(float), threads: defaultdict(float)}
    with _wrapped(clock), blas_threads_as(1):
        for t in walls:
            run(t)  # untimed: every array of both setups allocated once
        for _ in range(steps):
            for t in walls:
                clock.reset()
                t0 = time.perf_counter()
                run(t)
                walls[t].append(time.perf_counter() - t0)
                for family, sec in clock.seconds.items():
                    sums[t][family] += sec
    families = [f for f in FAMILIES if sums[1].get(f, 0.0) > 0]
    per = {t: {f: 1e3 * sums[t].get(f, 0.0) / steps for f in families} for t in walls}
    return {"threads": threads, "families": families, "one_ms": per[1],
            "side_ms": per[threads],
            "wall_ms": {t: 1e3 * statistics.fmean(w) for t, w in walls.items()},  # as busy
            "busy_ms": {t: sum(per[t].values()) for t in walls}}


def format_side_by_side(r: dict) -> str:
    """:func:`side_by_side`'s result as a table: family, ms on one thread, ms summed over the
    threads side by side, their ratio; then the walls and the time outside the wrapped ops."""
    n = r["threads"]
    lines = [f"| family | 1 thread, shards in turn (ms) | {n} threads side by side, summed (ms) "
             f"| ratio |", "|---|---:|---:|---:|"]
    for f in r["families"]:
        one, side = r["one_ms"][f], r["side_ms"][f]
        lines.append(f"| {f} | {one:.1f} | {side:.1f} | {side / one:.2f} |")
    wall1, walln = r["wall_ms"][1], r["wall_ms"][n]
    out1 = wall1 - r["busy_ms"][1]
    outn = n * walln - r["busy_ms"][n]
    lines.append(f"wall: {wall1:.1f} ms on 1 thread, {walln:.1f} ms on {n} ({wall1 / walln:.2f}x); "
                 f"outside the wrapped ops (graph, Python, waiting): {out1:.1f} ms on 1 thread, "
                 f"{outn:.1f} ms summed over {n}")
    return "\n".join(lines)


__all__ = ["Matmul", "step_matmuls", "flop_summary", "matmul_time", "FAMILIES", "OVERHEAD",
           "breakdown", "format_breakdown", "single_thread", "side_by_side",
           "format_side_by_side"]
