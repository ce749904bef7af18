"""The same minilora code on NumPy (CPU) and CuPy (GPU): ops, GPT training steps, quantization.

    python benchmarks/backends.py                        # full run
    python benchmarks/backends.py --quick                # small sizes
    python benchmarks/backends.py --out runs/backends    # where the table, JSON and plot go
    python benchmarks/backends.py --quick --backends numpy,strict   # the GPU path, on the CPU

``--backends`` takes ``strict`` where it takes ``cupy``: minilora.strict, the NumPy stand-in for
CuPy, runs the device code path on the CPU. Its times are NumPy's plus the stand-in's bookkeeping,
not a GPU's, and the table says so: for strict it gives the time ratio to NumPy (the stand-in's
overhead, not a speed-up) and what the stand-in counts per call, kernel launches and
device-to-host syncs, which are what a GPU's time depends on besides the arithmetic.

What is timed, on each backend that is present (CuPy needs an NVIDIA GPU; without one the script
says so and measures the NumPy side alone):

* matmul ``a @ b`` of two (n, n) float32 tensors; GELU (the elementwise chain of the MLP) and a
  row softmax over (rows, 1024); each one minilora op, forward only, under ``no_grad``;
* ``quant.quantize`` (blockwise NF4, blocksize 64) and ``quant.dequantize`` of (rows, 1024);
* one full training step (forward, backward, AdamW) of a GPT: the reference config (n_layer 4,
  n_head 4, n_embd 256, block 128, batch 16, vocab 64) and a GPT-2-small-sized one (n_layer 12,
  n_head 12, n_embd 768, vocab 50257). GPT-2 small at batch 8 x 1024 tokens is more than a small
  CPU can step through in a benchmark's time, so both backends run it at batch 2 x 256 tokens,
  and the GPU also at batch 8 x 1024; the headline figure compares tokens per second (GPU at
  8 x 1024 against the CPU at 2 x 256). That comparison flatters the CPU a little: a token at
  T = 256 attends to a quarter as many keys as at T = 1024, so it costs 11 % fewer FLOP (770
  against 855 M).

How it is timed: every case is built on each backend from the same host data (models from the
same seed, built on the host and moved with ``module.to_backend()``), run once to check that the
backends agree and to warm up (CuPy compiles each kernel on first use, cuBLAS makes its handle),
then timed in alternating rounds, NumPy then CuPy, each time between two
``backend.synchronize()`` calls (a CuPy call returns as soon as the GPU has the work queued; the
timer must wait for the work). Each measurement repeats the call enough times to last about
``--target`` seconds; the table gives the median over the rounds. Float32 throughout: CuPy uses
no TF32 tensor-core rounding unless CUPY_TF32=1 is set, so both backends do the same arithmetic.

Writes ``backends.json`` (every figure, the machine), ``backends.md`` (the table) and
``backends.png`` (the plot) under ``--out``; exits with status 1 if a case failed or the backends
disagreed, after writing everything.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minilora as ml  # noqa: E402
from minilora import backend as B  # noqa: E402
from minilora import functional as F  # noqa: E402
from minilora import quant  # noqa: E402
from minilora.errors import BackendError  # noqa: E402
from minilora.fast.cpu import blas_core  # noqa: E402
from minilora.fileio import atomic_directory  # noqa: E402

BACKENDS = ("numpy", "cupy", "strict")
DEVICES = ("cupy", "strict")  # measured against numpy; strict's times are not a GPU's
WIDTH = 1024  # row length of the elementwise, softmax and quantization inputs
REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
CPU_SHAPE = (2, 256)  # (batch, tokens) at which GPT-2 small is timed on both backends
GPU_SHAPE = (8, 1024)  # the GPU's own, a GPT-2 training shape
SPEEDUP_TARGET = 50.0  # GPT-2-small step, GPU tokens/s over the 2-core CPU's

# GPT-2-small training throughput measured on the project's reference CPU (2 cores, NumPy with
# OpenBLAS, batch 2 x 256 tokens): the "backends" section of benchmarks/RESULTS.md. The GPU check
# compares against it, because the GPU machine's own CPU is a different (larger) one.
CPU_REFERENCE = {"tokens_per_s": 31.4, "shape": list(CPU_SHAPE), "cores": 2,
                 "measured": "2026-11-28, benchmarks/backends.py, NumPy 2.4 + OpenBLAS, "
                             "1 BLAS thread, load average 7 on 2 cores"}
# The best float32 GEMM rate NumPy reached on those 2 cores (on the reference GPT's linear-layer
# shapes, unloaded). No NumPy step can beat (FLOP per token) / this, so the GPU is also compared
# with that ceiling: a speed-up over it holds whatever load the CPU measurement suffered.
CPU_MATMUL_CEILING_FLOPS = 199e9


# ---------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    """One thing to time at one size.

    ``build()`` is called inside a backend's context and returns ``(run, check)``: ``run()`` does
    the timed work on that backend, ``check`` is a host array that must agree across backends.
    ``work`` counts what the rate is quoted in (``unit``: FLOP, elements or tokens).
    """

    op: str
    size: str
    work: float
    unit: str
    build: Callable
    compare: str = "close"  # "close": max |a - b| / max |b|; "codes": fraction of bytes that differ
    tol: float = 1e-4
    backends: tuple = BACKENDS  # ("cupy",): a GPU-sized case, minutes on a CPU (strict too)
    rounds: int | None = None  # None: --rounds
    max_number: int = 100_000
    x: float = 0.0  # where the case sits on its plot's size axis
    note: str = ""
    extra: dict = field(default_factory=dict)


def _host_randn(seed: int, *shape: int) -> np.ndarray:
    """The same host data for every backend: a fresh generator per case, drawn when built."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def matmul_case(n: int) -> Case:
    def build():
        ta, tb = ml.Tensor(_host_randn(n, n, n)), ml.Tensor(_host_randn(n + 1, n, n))

        def run():
            with ml.no_grad():
                return (ta @ tb).data
        return run, B.to_numpy(run())
    return Case("matmul", f"({n}, {n}) @ ({n}, {n})", 2.0 * n ** 3, "FLOP", build, x=n)


def rowwise_case(op: str, rows: int) -> Case:
    """GELU or softmax of a (rows, WIDTH) tensor: memory-bound elementwise / row work."""
    fn = {"gelu": F.gelu, "softmax": F.softmax}[op]

    def build():
        t = ml.Tensor(_host_randn(rows, rows, WIDTH))  # copied to the active backend's device

        def run():
            with ml.no_grad():
                return fn(t).data
        return run, B.to_numpy(run())
    return Case(op, f"({rows}, {WIDTH})", float(rows * WIDTH), "elements", build, tol=1e-5,
                x=rows * WIDTH)


def quantize_case(rows: int) -> Case:
    def build():
        w = B.asarray(_host_randn(rows, rows, WIDTH))

        def run():
            return quant.quantize(w, blocksize=64, quant_type="nf4")
        return run, B.to_numpy(run().packed)
    # x / absmax and the midpoint search are exact IEEE float32 on both: the codes must match
    return Case("quantize nf4", f"({rows}, {WIDTH})", float(rows * WIDTH), "elements", build,
                compare="codes", tol=1e-6, x=rows * WIDTH)


def dequantize_case(rows: int) -> Case:
    def build():
        with B.backend("numpy"):  # quantized once on the host, as a model's weights would be
            state = quant.quantize(_host_randn(rows, rows, WIDTH), blocksize=64,
                                   quant_type="nf4")
        s = state.to_backend()

        def run():
            return quant.dequantize(s)
        return run, B.to_numpy(run())
    return Case("dequantize nf4", f"({rows}, {WIDTH})", float(rows * WIDTH), "elements", build,
                tol=1e-6, x=rows * WIDTH)


def gpt_case(name: str, config: dict, batch: int, tokens: int, backends: tuple = BACKENDS,
             rounds: int | None = None, note: str = "") -> Case:
    """One training step (forward, backward, AdamW) of a freshly initialised GPT."""
    cfg = ml.GPTConfig(**config)
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg.vocab_size, (batch, tokens))
    y = rng.integers(0, cfg.vocab_size, (batch, tokens))

    def build():
        with B.backend("numpy"):  # the same seed, the same host weights, whatever the backend
            ml.manual_seed(0)
            model = ml.GPT(cfg)
        model.to_backend()  # one host-to-device copy of every parameter (none on NumPy)
        opt = ml.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        xd, yd = B.asarray(x), B.asarray(y)  # the batch lives on the device too
        with ml.no_grad():
            first_loss = B.to_numpy(model(xd, yd)[1].data).reshape(1)

        def run():
            loss = model(xd, yd)[1]  # the logits are not kept, as on the PyTorch side
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.data
        return run, first_loss

    size = f"B{batch} x T{tokens}"
    return Case(f"GPT step, {name}", size, float(batch * tokens), "tokens", build, tol=1e-4,
                backends=backends, rounds=rounds, max_number=5, note=note,
                extra={"config": cfg.to_dict(), "batch": batch, "tokens": tokens,
                       "flops_per_token": train_flops_per_token(config, tokens)})


def make_cases(quick: bool) -> list[Case]:
    """The GPT steps first (the headline, kept if a time limit stops the run), then the ops."""
    cases = [gpt_case("reference", REFERENCE, 16, 128, rounds=3)]
    if not quick:
        cases.append(gpt_case("GPT-2 small", GPT2_SMALL, *CPU_SHAPE, rounds=2))
        cases.append(gpt_case("GPT-2 small", GPT2_SMALL, *GPU_SHAPE, backends=("cupy",),
                              rounds=3, note="GPU only: minutes per step on 2 CPU cores"))
    mat = [128, 512] if quick else [128, 512, 1024, 2048, 4096]
    rows = [16, 256] if quick else [16, 256, 4096, 16384]  # 16 K to 16 M elements
    cases += [matmul_case(n) for n in mat]
    cases += [rowwise_case("gelu", r) for r in rows]
    cases += [rowwise_case("softmax", r) for r in rows]
    cases += [quantize_case(r) for r in rows]
    cases += [dequantize_case(r) for r in rows]
    return cases


# ---------------------------------------------------------------------------------- timing

def _per_call(fn: Callable, number: int) -> float:
    B.synchronize()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    B.synchronize()  # the GPU may still be working on what the loop queued
    return (time.perf_counter() - t0) / number


def _free_device_memory() -> None:
    gc.collect()
    if B.on_device():
        B.xp.get_default_memory_pool().free_all_blocks()


def _strict_counts(run: Callable) -> dict:
    """Kernel launches, device-to-host syncs and host-to-device copies of one ``run()`` on the
    strict stand-in: the counts a GPU's time depends on besides the arithmetic."""
    from minilora import strict

    with strict.counting() as c:
        run()
    return {"launches": c.launches, "syncs": c.syncs, "uploads": c.uploads}


def _disagreement(case: Case, a: np.ndarray, ref: np.ndarray) -> float:
    if a.shape != ref.shape:
        return math.inf
    if case.compare == "codes":
        return float(np.mean(a != ref))
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - ref).max()) / scale


def run_case(case: Case, backends: list[str], rounds: int, target: float) -> dict:
    """Build, check and time ``case`` on each backend; never raises (errors go in the row)."""
    row = {"op": case.op, "size": case.size, "work": case.work, "unit": case.unit, "x": case.x,
           "note": case.note, **case.extra}
    fns, numbers, checks, errors = {}, {}, {}, {}
    samples: dict[str, list] = {}
    here = [b for b in backends if b in case.backends]
    for name in here:
        try:
            with B.backend(name):
                run, checks[name] = case.build()
                once = _per_call(run, 1)  # a second warm-up, and the calibration
                if name == "strict":
                    row["strict_counts"] = _strict_counts(run)
                numbers[name] = max(1, min(case.max_number, int(target / max(once, 1e-7))))
                fns[name] = run
                samples[name] = []
                run = None  # fns holds the only reference: clearing it frees the case
        except Exception as exc:  # report and go on: one call of the GPU check should show all
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for _ in range(case.rounds or rounds):
        for name in fns:
            if name in errors:
                continue
            try:
                with B.backend(name):
                    samples[name].append(_per_call(fns[name], numbers[name]))
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    fns.clear()
    for name in here:
        if name not in errors:
            row[f"{name}_s"] = statistics.median(samples[name])
            row[f"{name}_calls"] = numbers[name] * len(samples[name])
        with B.backend(name):
            _free_device_memory()
    for device in DEVICES:
        if "numpy" in checks and device in checks:
            row["disagreement"] = _disagreement(case, checks[device], checks["numpy"])
            row["agree"] = bool(row["disagreement"] <= case.tol)
            row["tolerance"] = case.tol
    if "numpy_s" in row and "cupy_s" in row:
        row["speedup"] = row["numpy_s"] / row["cupy_s"]
    if "numpy_s" in row and "strict_s" in row:
        row["strict_overhead"] = row["strict_s"] / row["numpy_s"]  # a ratio, not a speed-up
    if errors:
        row["errors"] = errors
    return row


# ------------------------------------------------------------------------------- reporting

def detect_cupy() -> tuple[bool, str]:
    """(True, a description of the GPU) when the CuPy backend works, else (False, why not)."""
    previous = B.get_backend()
    try:
        B.use_backend("cupy")
    except BackendError as exc:
        return False, str(exc)
    try:
        cupy = B.xp
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props.get("name", b"?")
        name = name.decode() if isinstance(name, bytes) else str(name)
        mem = props.get("totalGlobalMem", 0) / 2**30
        rt = cupy.cuda.runtime.runtimeGetVersion()
        return True, (f"{name}, {mem:.0f} GiB, CuPy {cupy.__version__}, "
                      f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}")
    except Exception as exc:  # a description is nice to have, not needed
        return True, f"GPU present (no details: {type(exc).__name__})"
    finally:
        B.use_backend(previous)


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def machine(gpu: str | None) -> dict:
    return {"date": datetime.date.today().isoformat(), "platform": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__,
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
            "openblas_kernels": blas_core(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset"),
            "gpu": gpu, "load_average_start": _load()}


def _rate(work: float, seconds: float | None, unit: str) -> str:
    if seconds is None:
        return "-"
    r = work / seconds
    if unit == "FLOP":
        return f"{r / 1e9:,.1f} GFLOP/s"
    if unit == "tokens":
        return f"{r:,.0f} tok/s"
    return f"{r / 1e6:,.0f} M/s"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = 1e3 * seconds
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:,.0f}"


STRICT_NOTE = ("strict: minilora.strict, the NumPy stand-in for CuPy, on the CPU. Its times are "
               "NumPy's plus the stand-in's bookkeeping, not a GPU's (\"strict / numpy\" is that "
               "overhead, not a speed-up); what it measures is the launches and device-to-host "
               "syncs of one call.")


def table(rows: list[dict], device: str = "cupy") -> str:
    """The markdown table: NumPy against ``device`` ("cupy": times, speed-ups and rates;
    "strict": the stand-in's time ratio to NumPy and its launches and syncs per call)."""
    if device == "strict":
        lines = ["| op | size | numpy ms | strict ms (not a speed) | strict / numpy (not a "
                 "speed-up) | launches / call | syncs / call | numpy rate | agree |",
                 "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    else:
        lines = ["| op | size | numpy ms | cupy ms | speed-up | numpy rate | cupy rate | agree |",
                 "|---|---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        agree = "-" if "agree" not in r else ("yes" if r["agree"] else
                                              f"NO ({r['disagreement']:.1e})")
        if device == "strict":
            ratio = f"{r['strict_overhead']:.2f}" if "strict_overhead" in r else "-"
            counts = r.get("strict_counts", {})
            lines.append(f"| {r['op']} | {r['size']} | {_ms(r.get('numpy_s'))} "
                         f"| {_ms(r.get('strict_s'))} | {ratio} "
                         f"| {counts.get('launches', '-')} | {counts.get('syncs', '-')} "
                         f"| {_rate(r['work'], r.get('numpy_s'), r['unit'])} | {agree} |")
            continue
        sp = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        lines.append(f"| {r['op']} | {r['size']} | {_ms(r.get('numpy_s'))} "
                     f"| {_ms(r.get('cupy_s'))} | {sp} "
                     f"| {_rate(r['work'], r.get('numpy_s'), r['unit'])} "
                     f"| {_rate(r['work'], r.get('cupy_s'), r['unit'])} | {agree} |")
    return "\n".join(lines)


def train_flops_per_token(config: dict, tokens: int) -> float:
    """Training FLOP per token of a GPT: ``6 N + 12 L T C`` (forward 2 per weight and token,
    backward twice that; attention's two (T, T) products per layer), with N = 12 L C^2 + V C the
    weights of the matmuls (the head tied to wte included, biases and LayerNorms left out)."""
    L, C, V = config["n_layer"], config["n_embd"], config["vocab_size"]
    return 6.0 * (12 * L * C * C + V * C) + 12.0 * L * tokens * C


def gpt2_summary(rows: list[dict], cpu_reference: dict) -> dict | None:
    """Tokens/s of the GPT-2-small step: CPU at CPU_SHAPE, GPU at GPU_SHAPE, and their ratio."""
    def find(shape):
        for r in rows:
            if r["op"] == "GPT step, GPT-2 small" and (r["batch"], r["tokens"]) == shape:
                return r
        return None
    small, big = find(CPU_SHAPE), find(GPU_SHAPE)
    if small is None:
        return None
    ceiling = CPU_MATMUL_CEILING_FLOPS / train_flops_per_token(GPT2_SMALL, CPU_SHAPE[1])
    out = {"cpu_shape": list(CPU_SHAPE), "gpu_shape": list(GPU_SHAPE),
           "reference_cpu_tokens_per_s": cpu_reference["tokens_per_s"],
           "cpu_ceiling_tokens_per_s": ceiling, "target": SPEEDUP_TARGET}
    if "numpy_s" in small:
        out["numpy_tokens_per_s"] = small["work"] / small["numpy_s"]
    if "cupy_s" in small:
        out["cupy_tokens_per_s_cpu_shape"] = small["work"] / small["cupy_s"]
    if big is not None and "cupy_s" in big:
        gpu = big["work"] / big["cupy_s"]
        out["cupy_tokens_per_s"] = gpu
        out["speedup_vs_reference_cpu"] = gpu / cpu_reference["tokens_per_s"]
        out["meets_target"] = bool(out["speedup_vs_reference_cpu"] >= SPEEDUP_TARGET)
        out["speedup_vs_cpu_ceiling"] = gpu / ceiling
        out["cupy_tflops"] = gpu * big["flops_per_token"] / 1e12
        if "numpy_tokens_per_s" in out:
            out["speedup_vs_this_cpu"] = gpu / out["numpy_tokens_per_s"]
    return out


def format_summary(summary: dict, cpu_reference: dict) -> str:
    """The GPT-2-small headline in a sentence or three."""
    parts = []
    if "numpy_tokens_per_s" in summary:
        parts.append(f"NumPy {summary['numpy_tokens_per_s']:,.1f} tok/s at B{CPU_SHAPE[0]} x "
                     f"T{CPU_SHAPE[1]}")
    if "cupy_tokens_per_s_cpu_shape" in summary:
        parts.append(f"CuPy {summary['cupy_tokens_per_s_cpu_shape']:,.0f} tok/s at the same shape")
    if "cupy_tokens_per_s" in summary:
        verdict = "met" if summary["meets_target"] else "NOT met"
        parts.append(f"CuPy {summary['cupy_tokens_per_s']:,.0f} tok/s at B{GPU_SHAPE[0]} x "
                     f"T{GPU_SHAPE[1]} ({summary['cupy_tflops']:.1f} TFLOP/s) = "
                     f"{summary['speedup_vs_reference_cpu']:,.0f}x the "
                     f"reference 2-core CPU ({cpu_reference['tokens_per_s']:,.1f} tok/s); target "
                     f">= {SPEEDUP_TARGET:.0f}x: {verdict}; "
                     f"{summary['speedup_vs_cpu_ceiling']:,.1f}x the 2-core matmul ceiling "
                     f"({summary['cpu_ceiling_tokens_per_s']:,.0f} tok/s)")
    if "speedup_vs_this_cpu" in summary:
        parts.append(f"{summary['speedup_vs_this_cpu']:,.0f}x this machine's NumPy")
    return "GPT-2 small training: " + "; ".join(parts)


def _human(n: float) -> str:
    for div, suffix in ((2**20, "M"), (2**10, "K")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


def plot(rows: list[dict], title: str) -> bytes:
    """Time against size for each op (log-log, one line per backend) and the GPT steps' tokens/s;
    returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ops = [op for op in dict.fromkeys(r["op"] for r in rows) if not op.startswith("GPT")]
    gpt = [r for r in rows if r["op"].startswith("GPT")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    style = {"numpy": dict(color="tab:blue", marker="o"),
             "cupy": dict(color="tab:green", marker="s"),
             "strict": dict(color="tab:orange", marker="^")}
    label = {"numpy": "numpy", "cupy": "cupy",
             "strict": "strict (NumPy stand-in for CuPy: not a GPU's speed)"}
    for ax, op in zip(axes.flat, ops[:6 - bool(gpt)]):
        rs = [r for r in rows if r["op"] == op]
        for name in BACKENDS:
            pts = [(r["x"], 1e3 * r[f"{name}_s"]) for r in rs if f"{name}_s" in r]
            if pts:
                ax.loglog(*zip(*pts), label=label[name], **style[name])
        xs = [r["x"] for r in rs]
        ax.set_xticks(xs, [_human(x) if op != "matmul" else str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(op)
        ax.set_xlabel("n, for (n, n) @ (n, n)" if op == "matmul" else f"elements (rows x {WIDTH})")
        ax.set_ylabel("ms per call (log)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    used = min(len(ops), 6 - bool(gpt))
    if gpt:
        ax = axes.flat[used]
        labels = [f"{r['op'][len('GPT step, '):]}\n{r['size']}" for r in gpt]
        xs = np.arange(len(gpt))
        values = []
        present = [b for b in BACKENDS if any(f"{b}_s" in r for r in gpt)]
        for k, name in enumerate(present):
            vals = [r["work"] / r[f"{name}_s"] if f"{name}_s" in r else 0.0 for r in gpt]
            values += [v for v in vals if v]
            bars = ax.bar(xs + (k - 0.5) * 0.38, vals, 0.38, label=label[name],
                          color=style[name]["color"])
            for bar, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, v),
                                ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        if values:  # bars on a log axis start at its bottom: put that well below the shortest
            ax.set_ylim(10 ** math.floor(math.log10(min(values)) - 0.5), max(values) * 4)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_ylabel("tokens / s, training (log)")
        ax.set_title("GPT training step (fwd, bwd, AdamW)")
        ax.legend(fontsize=7)
        used += 1
    for extra in list(axes.flat)[used:]:
        extra.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--out", default=os.path.join("runs", "backends"),
                        help="folder for backends.json, backends.md and backends.png")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per case")
    parser.add_argument("--target", type=float, default=None,
                        help="seconds each measurement should last (calls are repeated)")
    parser.add_argument("--backends", default="numpy,cupy",
                        help="comma-separated: numpy and one device, cupy (skipped if absent) or "
                        "strict (the NumPy stand-in for CuPy: counts, not speeds)")
    parser.add_argument("--only", default=None,
                        help="comma-separated words: run only the cases whose op contains one")
    parser.add_argument("--cpu-reference", default=None,
                        help="a backends.json from the reference CPU to compare the GPU with")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    target = args.target or (0.01 if args.quick else 0.05)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: unknown {unknown}; choose from {list(BACKENDS)}")
    if all(d in wanted for d in DEVICES):
        parser.error("--backends: cupy or strict, not both (strict stands in for a GPU)")
    device = "strict" if "strict" in wanted else "cupy"

    has_cupy, gpu = detect_cupy() if "cupy" in wanted else (False, "not requested")
    backends = [b for b in wanted if b != "cupy" or has_cupy]
    if not backends:
        print(f"no backend to measure: CuPy is not available ({gpu})", file=sys.stderr)
        return 1
    cpu_reference = dict(CPU_REFERENCE)
    if args.cpu_reference:
        with open(args.cpu_reference, encoding="utf-8") as f:
            ref = gpt2_summary(json.load(f)["rows"], CPU_REFERENCE)
        if ref and "numpy_tokens_per_s" in ref:
            cpu_reference = {"tokens_per_s": ref["numpy_tokens_per_s"], "shape": list(CPU_SHAPE),
                             "measured": args.cpu_reference}

    info = machine(gpu if has_cupy else None)
    info["device_backend"] = device if device in backends else None
    against = "the strict stand-in for CuPy" if device == "strict" else "CuPy"
    print(f"# minilora on NumPy and {against}: float32, medians of {rounds} alternating rounds")
    print(f"# {info['date']}, {info['platform']}, {info['cpu_count']} CPU cores, python "
          f"{info['python']}, numpy {info['numpy']}, OPENBLAS_NUM_THREADS="
          f"{info['openblas_threads']}, OpenBLAS kernels {info['openblas_kernels']} "
          f"(OPENBLAS_CORETYPE={info['openblas_coretype']}), load average at start "
          f"{info['load_average_start']}")
    if device == "strict":
        print(f"# {STRICT_NOTE}")
    elif has_cupy:
        print(f"# GPU: {gpu}")
    else:
        print(f"# no GPU: the CuPy column stays empty and only the CPU side is measured ({gpu})")
    print(flush=True)

    start = time.perf_counter()
    rows = []
    print("\n".join(table([], device).splitlines()[:2]), flush=True)
    info["interrupted"] = False
    try:
        only = [w.strip() for w in args.only.split(",")] if args.only else None
        for case in make_cases(args.quick):
            if not any(b in case.backends for b in backends):
                continue
            if only and not any(w in case.op for w in only):
                continue
            row = run_case(case, backends, rounds, target)
            rows.append(row)
            print(table([row], device).splitlines()[-1], flush=True)
            if "errors" in row:
                print(f"  errors: {row['errors']}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # a time limit (SIGINT): keep and write what was measured
        info["interrupted"] = True
        print("interrupted: writing the cases measured so far", file=sys.stderr, flush=True)
    info["seconds"] = time.perf_counter() - start
    info["load_average_end"] = _load()

    summary = gpt2_summary(rows, cpu_reference)
    text = table(rows, device)
    if device == "strict":
        text += f"\n\n{STRICT_NOTE}"
    print()
    if summary:
        print(format_summary(summary, cpu_reference))
    print(f"({len(rows)} cases, {info['seconds']:.0f} s, load average at end "
          f"{info['load_average_end']})")

    result = {"machine": info, "backends": backends, "cupy_available": has_cupy,
              "speeds": device != "strict" or backends == ["numpy"],
              "note": STRICT_NOTE if device == "strict" else None,
              "cupy_note": None if has_cupy else gpu, "rounds": rounds, "target_s": target,
              "quick": args.quick, "rows": rows, "gpt2_small": summary,
              "cpu_reference": cpu_reference}
    if device == "strict":
        title = (f"minilora on NumPy and the strict stand-in for CuPy ({info['cpu_count']} CPU "
                 f"cores; strict's times are not a GPU's), {info['date']}")
    else:
        where = gpu.split(",")[0] if has_cupy else "no GPU here: NumPy only"
        title = (f"minilora on NumPy ({info['cpu_count']} CPU cores) and CuPy ({where}), "
                 f"{info['date']}")
    # one report, whole or not at all (with a manifest), like every directory minilora writes
    with atomic_directory(args.out, ("backends.json", "backends.md", "backends.png")) as report:
        report.write_json("backends.json", result, allow_nan=True)
        report.write_bytes("backends.md", (text + "\n").encode("utf-8"))
        report.write_bytes("backends.png", plot(rows, title))
    print(f"wrote backends.json, backends.md and backends.png to {args.out}")

    failed = [r for r in rows if "errors" in r or r.get("agree") is False]
    for r in failed:
        print(f"FAILED: {r['op']} {r['size']}: {r.get('errors') or 'backends disagree'}",
              file=sys.stderr)
    return 1 if failed or info["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
