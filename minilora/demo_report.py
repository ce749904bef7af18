"""The demo's report: a summary table, the claims it checks, six plots and ``report.md``.

Plots are written with matplotlib's non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import backend as B
from . import quant
from .fileio import Staging, atomic_directory

PLOTS = ("loss_curves.png", "accuracy.png", "trainable_params.png", "memory.png",
         "quant_error.png", "adapter_switching.png")
REPORT_FILES = ("report.md", "results.json", *PLOTS)

MIB = 2 ** 20
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4+DQ)"}
DESCRIBE = {"add": "addition", "nocarry": "the sum with its carries dropped",
            "digitmax": "the larger digit in each place", "rev": "the sum written backwards",
            "max": "the larger operand"}


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def summary_rows(results: dict) -> list[dict]:
    """One row per method: trainable parameters, accuracy, memory, step time, file size."""
    rows = []
    files = {"full": results["full_bytes"], "lora": results["adapter_bytes"]["lora"],
             "qlora": results["adapter_bytes"]["qlora"]}
    for method, r in results["methods"].items():
        rows.append({"method": LABELS[method], "trainable": r["trainable"],
                     "fraction": r["trainable"] / r["total"], "accuracy": r["accuracy"],
                     "task_a": r["task_a_accuracy"], "peak_mib": r["peak_bytes"] / MIB,
                     "step_ms": 1e3 * r["step_seconds"], "file_bytes": files[method],
                     "memory_source": r.get("memory_source", "tracemalloc")})
    return rows


MEMORY_SOURCES = {"tracemalloc": "tracemalloc (host allocations: the model runs on the CPU)",
                  "device pool": "the device memory pool (backend.memory_stats: the model runs "
                                 "on a device, whose memory tracemalloc cannot see)"}


def memory_note(results: dict) -> str:
    """What measured the peak-memory column: tracemalloc on the CPU, the device pool on a GPU."""
    sources = sorted({r["memory_source"] for r in summary_rows(results)})
    return "peak mem measured by " + " and ".join(MEMORY_SOURCES.get(s, s) for s in sources)


def format_table(results: dict) -> str:
    """The summary table as aligned text (what the CLI prints)."""
    head = (f"{'method':<18}{'trainable':>12}{'share':>8}{'task B':>9}{'task A':>9}"
            f"{'peak mem':>11}{'step':>9}{'file':>11}")
    lines = [head, "-" * len(head)]
    for r in summary_rows(results):
        lines.append(f"{r['method']:<18}{r['trainable']:>12,}{r['fraction']:>8.2%}"
                     f"{r['accuracy']:>9.1%}{r['task_a']:>9.1%}{r['peak_mib']:>8.1f} MiB"
                     f"{r['step_ms']:>6.0f} ms{_size(r['file_bytes']):>11}")
    return "\n".join(lines)


def checks(results: dict) -> list[tuple[bool, str]]:
    """The claims of the LoRA story, each with whether this run bears it out."""
    m = results["methods"]
    full, lo, ql = m["full"]["accuracy"], m["lora"]["accuracy"], m["qlora"]["accuracy"]
    share = m["lora"]["trainable"] / m["lora"]["total"]
    merge = results["merge"]
    sizes = results["adapter_bytes"]
    return [
        (lo >= full - 0.02, f"LoRA within 2 points of full fine-tuning on task B "
                            f"({lo:.1%} vs {full:.1%})"),
        (share <= 0.025, f"LoRA trains about 1-2% of the parameters ({share:.2%})"),
        (ql >= lo - 0.02, f"QLoRA within 2 points of LoRA ({ql:.1%} vs {lo:.1%})"),
        (merge["identical"] == merge["examples"],
         f"merged and unmerged LoRA give the same answer on {merge['identical']} of "
         f"{merge['examples']} held-out questions"),
        (max(sizes.values()) < 10e6, "adapter files are small: "
         + ", ".join(f"{k} {_size(v)}" for k, v in sizes.items())
         + f" (the float32 base: {_size(results['base_checkpoint_bytes'])})"),
    ]


# ------------------------------------------------------------------------------------ plots

def _plot_losses(results: dict, plt: Any, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    base = results.get("base_history")
    if base:
        ax1.plot(base["step"], base["loss"], lw=1)
        ax1.set_title("pretraining on task A (addition)")
    else:
        ax1.text(0.5, 0.5, "base reused from a previous run", ha="center", va="center")
        ax1.set_title("pretraining on task A")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (answer tokens)")
    ax1.set_yscale("log")
    for method, r in results["methods"].items():
        ax2.plot(r["history"]["step"], r["history"]["loss"], lw=1, label=LABELS[method])
    tc = results["task_c_history"]
    ax2.plot(tc["step"], tc["loss"], lw=1, ls="--", color="gray",
             label=f"LoRA on task C ({results['tasks']['C']})")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_title(f"fine-tuning on task B ({results['tasks']['B']})")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(results: dict, plt: Any, path: Path) -> None:
    methods = list(results["methods"])
    x = np.arange(len(methods) + 1)
    tasks = results["tasks"]
    b_acc = [results["base"][tasks["B"]]] + [results["methods"][m]["accuracy"] for m in methods]
    a_acc = [results["base"][tasks["A"]]] + [results["methods"][m]["task_a_accuracy"]
                                             for m in methods]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.bar(x - 0.2, b_acc, 0.4, label="task B (the new task)")
    ax.bar(x + 0.2, a_acc, 0.4, label="task A (the old task)")
    for xi, v in zip(x, b_acc):
        ax.text(xi - 0.2, v + 0.01, f"{v:.0%}", ha="center", fontsize=8)
    ax.set_xticks(x, ["base"] + [LABELS[m] for m in methods])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out exact match")
    ax.set_title("accuracy per method")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_params(results: dict, plt: Any, path: Path) -> None:
    n = k = results["settings"]["n_embd"]
    ranks = np.arange(1, n + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.plot(ranks, ranks * (n + k), label="LoRA: r (n + k)")
    ax1.axhline(n * k, color="k", ls="--", label="full: n k")
    r = results["settings"]["r"]
    ax1.plot([r], [r * (n + k)], "o", color="C3")
    ax1.annotate(f"r = {r}: {r * (n + k):,} vs {n * k:,}", (r, r * (n + k)),
                 xytext=(r + n * 0.08, r * (n + k) * 0.5), fontsize=8)
    ax1.set_xlabel("rank r")
    ax1.set_ylabel("trainable parameters")
    ax1.set_yscale("log")
    ax1.set_title(f"one {n} x {k} projection")
    ax1.legend(fontsize=8)
    methods = list(results["methods"])
    counts = [results["methods"][m]["trainable"] for m in methods]
    ax2.bar([LABELS[m] for m in methods], counts, color=["C0", "C1", "C2"])
    ax2.set_yscale("log")
    for i, c in enumerate(counts):
        ax2.text(i, c * 1.1, f"{c:,}", ha="center", fontsize=8)
    ax2.set_title("trainable parameters of the whole model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_memory(results: dict, plt: Any, path: Path) -> None:
    methods = list(results["methods"])
    peak = [results["methods"][m]["peak_bytes"] / MIB for m in methods]
    step = [1e3 * results["methods"][m]["step_seconds"] for m in methods]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.bar([LABELS[m] for m in methods], peak, color=["C0", "C1", "C2"])
    ax1.set_ylabel("MiB")
    source = {"tracemalloc": "tracemalloc, host", "device pool": "device memory pool"}
    sources = sorted({results["methods"][m].get("memory_source", "tracemalloc") for m in methods})
    seen_by = ", ".join(source.get(s, s) for s in sources)
    ax1.set_title(f"peak memory of a training step\n({seen_by})")
    ax2.bar([LABELS[m] for m in methods], step, color=["C0", "C1", "C2"])
    ax2.set_ylabel("ms")
    ax2.set_title("time of a training step (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_quant_error(base: Any, plt: Any, path: Path) -> dict:
    weights = np.concatenate([B.to_numpy(p.data).ravel() for name, p in base.named_parameters()
                              if p.ndim == 2 and "wte" not in name and "wpe" not in name])
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    errors = {}
    for qt in ("nf4", "fp4", "int4"):
        err = weights - B.to_numpy(quant.dequantize(quant.quantize(weights, 64, qt)))
        errors[qt] = float(np.abs(err).mean())
        ax.hist(err, bins=120, histtype="step", lw=1.2,
                label=f"{qt.upper()}: mean |error| {errors[qt]:.2e}")
    ax.set_yscale("log")
    ax.set_xlabel("w - dequantize(quantize(w)), blocksize 64")
    ax.set_title(f"4-bit quantization error on the base model's {weights.size:,} linear weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return errors


def _plot_switching(results: dict, plt: Any, path: Path) -> None:
    rows = list(results["switching"])
    names = results["tasks"]
    tasks = [names["A"], names["B"], names["C"]]
    grid = np.array([[results["switching"][r][t] for t in tasks] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.imshow(grid, vmin=0, vmax=1, cmap="Greens")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center",
                    color="white" if grid[i, j] > 0.6 else "black")  # readable on dark green
    ax.set_xticks(range(3), [f"task {k}\n({names[k]})" for k in "ABC"])  # two lines: no overlap
    ax.set_yticks(range(len(rows)), [f"adapter {r}" if "base" not in r else r for r in rows])
    ax.set_title("one base, two adapters: accuracy by active adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, base: Any, out: Path) -> Path:
    """Write ``out/report/``: the plots, ``results.json`` and ``report.md``, as one save (whole or
    not at all, with a manifest); returns its path."""
    with atomic_directory(Path(out) / "report", REPORT_FILES) as stage:
        _write_report(results, base, stage)
    return Path(out) / "report"


def _write_report(results: dict, base: Any, stage: Staging) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = stage.path
    _plot_losses(results, plt, out / "loss_curves.png")
    _plot_accuracy(results, plt, out / "accuracy.png")
    _plot_params(results, plt, out / "trainable_params.png")
    _plot_memory(results, plt, out / "memory.png")
    results["quant_error"] = _plot_quant_error(base, plt, out / "quant_error.png")
    _plot_switching(results, plt, out / "adapter_switching.png")
    s = results["settings"]
    lines = [
        "# minilora demo report", "",
        f"A {s['n_layer']}-layer GPT (n_embd {s['n_embd']}) pretrained on {s['digits']}-digit "
        f"addition (task A), then adapted to {DESCRIBE[results['tasks']['B']]} (task B) and to "
        f"{DESCRIBE[results['tasks']['C']]} (task C). LoRA: r={s['r']}, alpha={s['alpha']:g} "
        f"on q_proj and v_proj; QLoRA: the same "
        f"adapters on an NF4 base with double quantization. Accuracy is exact match on "
        f"{s['eval_examples']} held-out questions. Run time {results['seconds']:.0f} s.", "",
        "```", format_table(results), "```", "",
        f"Peak memory = the model's resident arrays + the peak of what two training steps "
        f"allocate on top (gradients, optimizer state, activations); {memory_note(results)}. "
        "\"file\" is what must be shipped: the whole model for full fine-tuning, the adapter "
        "files for LoRA and QLoRA.", "",
        "## Checks", "",
        *[f"- [{'x' if ok else ' '}] {text}" for ok, text in checks(results)], "",
        "## Plots", "",
        "![loss curves](loss_curves.png)", "", "![accuracy](accuracy.png)", "",
        "![trainable parameters](trainable_params.png)", "", "![memory](memory.png)", "",
        "![quantization error](quant_error.png)", "",
        "![adapter switching](adapter_switching.png)", "",
        "Reproduce with `minilora demo` (add `--quick` for a smoke run).", "",
    ]
    stage.write_bytes("report.md", "\n".join(lines).encode())
    slim = {k: v for k, v in results.items() if k not in ("base_history", "task_c_history")}
    slim["methods"] = {m: {k: v for k, v in r.items() if k != "history"}
                       for m, r in results["methods"].items()}
    stage.write_bytes("results.json", json.dumps(slim, indent=2).encode())
