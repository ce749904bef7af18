"""The demo's report: a summary table with notes on what each number means, the claims it checks,
six plots with a caption each, and ``report.md``.

Every explanation is computed from the run's own results (the share of questions with no carry,
the time a dequantization takes, the spread of repeated measurements), so it stays true when the
settings or the machine change. Plots are written with matplotlib's non-interactive Agg backend,
so no display is needed.
"""

from __future__ import annotations

import json
import textwrap
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
COLORS = ("C0", "C1", "C2")  # one per method, in every plot
DESCRIBE = {"add": "addition", "nocarry": "the sum with its carries dropped",
            "digitmax": "the larger digit in each place", "rev": "the sum written backwards",
            "max": "the larger operand"}
NO_ADAPTER = "none (base)"  # the switching row with every adapter disabled
# QLoRA's step time over LoRA's, measured on a text model with larger layers (issue 16): the
# dequantizing a 4-bit base needs in every pass is time the float32 base does not spend.
TEXT_MODEL_QLORA_SLOWDOWN = 1.7


def _same_answer(results: dict, x: str, y: str) -> float:
    """The share of held-out questions on which tasks ``x`` and ``y`` ("A", "B", "C") want the
    same answer (``demo.same_answer_share``)."""
    t = results["tasks"]
    return results["same_answer"][f"{t[x]}/{t[y]}"]


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _mib(n: float) -> str:
    return f"{n / MIB:.{2 if abs(n) < 0.095 * MIB else 1}f} MiB"  # 0.03 MiB, not 0.0 MiB


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.{1 if ms < 10 else 0}f} ms"  # 0.4 ms, not 0 ms


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
    """The summary table as aligned text."""
    head = (f"{'method':<18}{'trainable':>12}{'share':>8}{'task B':>9}{'task A':>9}"
            f"{'peak mem':>11}{'step':>9}{'file':>11}")
    lines = [head, "-" * len(head)]
    for r in summary_rows(results):
        lines.append(f"{r['method']:<18}{r['trainable']:>12,}{r['fraction']:>8.2%}"
                     f"{r['accuracy']:>9.1%}{r['task_a']:>9.1%}{r['peak_mib']:>8.1f} MiB"
                     f"{r['step_ms']:>6.0f} ms{_size(r['file_bytes']):>11}")
    return "\n".join(lines)


def format_notes(results: dict) -> str:
    """:func:`notes` as text wrapped to 100 columns, one paragraph each: what the CLI prints
    under the table."""
    return "\n".join(line for note in notes(results)
                     for line in textwrap.wrap(note, 100, subsequent_indent="  "))


# ------------------------------------------------------------------------------ the notes

def notes(results: dict) -> list[str]:
    """What each number of the summary means, in words, computed from this run's results: the
    quick mode (when it is one), the two accuracy columns, the step time, the peak memory."""
    found = [_quick_note(results)] if results.get("quick") else []
    return found + [_accuracy_note(results), _step_note(results), _memory_explained(results)]


def _quick_note(results: dict) -> str:
    s = results["settings"]
    return (f"--quick is a smoke run of the same pipeline: {s['base_steps']} steps for the base, "
            f"{s['finetune_steps']} per adapter, a model {s['n_embd']} wide. That is too few "
            f"steps to learn the tasks, so the accuracies are low and unticked boxes below are "
            f"expected: the two accuracy checks and the parameter-share check (rank {s['r']} is a "
            f"larger share of a narrower model) are meant for the full run, `minilora demo`; "
            f"merging and the file sizes are checked in both.")


def _accuracy_note(results: dict) -> str:
    t, s, m = results["tasks"], results["settings"], results["methods"]
    k = s["digits"]
    share = _same_answer(results, "A", "B")
    text = (f"task B ({t['B']}, the new task) and task A ({t['A']}, the old one) are exact match "
            f"on {s['eval_examples']} held-out questions of {k}-digit operands")
    if k < results.get("default_digits", k):
        text += (f" (the CLI's default is {results['default_digits']} digits; {k} digits keep "
                 f"the demo to minutes on a CPU)")
    text += (f". The two tasks want the same answer exactly where no place carries: "
             f"{share:.1%} of these questions ({0.55 ** k:.1%} = 0.55^{k} of all {k}-digit "
             f"pairs: in 55 of the 100 pairs of digits the two sum to 9 or less).")
    base_a, base_b = results["base"][t["A"]], results["base"][t["B"]]
    if base_a >= 0.95:
        text += (f" So the base, an adder ({base_a:.1%} on task A), already scores {base_b:.1%} "
                 f"on task B before fine-tuning.")
    else:
        text += (f" The base, which has not learned to add yet, scores {base_a:.1%} on task A "
                 f"and {base_b:.1%} on task B.")
    text += " After fine-tuning on task B, task A reads " + ", ".join(
        f"{LABELS[n]} {r['task_a_accuracy']:.1%}" for n, r in m.items())
    learned = all(r["accuracy"] >= 0.95 and abs(r["task_a_accuracy"] - share) <= 0.02
                  for r in m.values())
    if learned:
        text += (": each model now writes carry-less sums (task B), right on task A only where "
                 "there is no carry to forget.")
    else:
        text += (f" (a model that had learned task B would score {share:.1%}; these have not "
                 f"learned it yet).")
    base_off = results.get("switching", {}).get(NO_ADAPTER, {}).get(t["A"])
    if base_off is not None:
        text += (f" LoRA leaves the base untouched: with its adapters switched off the model "
                 f"scores {base_off:.1%} on task A again.")
    return text


def _step_note(results: dict) -> str:
    m = results["methods"]
    full, lo, ql = m["full"], m["lora"], m["qlora"]

    def spread(r: dict) -> str:
        times = r.get("step_seconds_all") or [r["step_seconds"]]
        return f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f} ms"

    timed = len(lo.get("step_seconds_all") or [1])
    text = (f"step is the median of {timed} timed training steps (ranges: full fine-tuning "
            f"{spread(full)}, LoRA {spread(lo)}, QLoRA {spread(ql)}). Full fine-tuning computes "
            f"weight gradients and AdamW updates for all {full['trainable']:,} parameters, LoRA "
            f"for its {lo['trainable']:,}. QLoRA does all of LoRA's work and dequantizes its "
            f"4-bit base besides, twice per shard (in the forward pass, and again in the "
            f"backward pass for the input gradient)")
    deq = ql.get("dequantize_seconds")
    if deq is not None:
        shards = ql.get("shards", 1)
        text += (f": {2 * shards} times per step here, {_ms(deq)} each when timed alone, "
                 f"{_ms(2 * shards * deq)} of work per step")
        if shards > 1:
            text += f" shared by {shards} threads"
    gap = ql["step_seconds"] - lo["step_seconds"]
    if gap < 0:
        text += (f". QLoRA's step timed {_ms(-gap)} faster than LoRA's is therefore timing noise, "
                 f"not a speed-up.")
    else:
        text += f". QLoRA's step timed {_ms(gap)} longer than LoRA's."
    return text + (f" On a text model QLoRA's step was {TEXT_MODEL_QLORA_SLOWDOWN}x LoRA's: "
                   f"dequantizing costs time; the 4-bit base saves memory, not time.")


def _memory_explained(results: dict) -> str:
    m, s = results["methods"], results["settings"]
    full, lo, ql = m["full"], m["lora"], m["qlora"]
    text = "peak mem is the model's arrays"
    if all("held_bytes" in r for r in (full, lo, ql)):
        text += (f" (full fine-tuning and LoRA {_mib(full['held_bytes'])} and "
                 f"{_mib(lo['held_bytes'])} of float32, QLoRA {_mib(ql['held_bytes'])} with its "
                 f"4-bit base)")
    text += (f" plus the most that two training steps allocate on top of them: activations of "
             f"a batch of {s['batch_size']}, gradients, AdamW's two moments. Full fine-tuning's "
             f"{_mib(full['peak_bytes'] - lo['peak_bytes'])} over LoRA is mostly gradients and "
             f"moments for all its parameters, 3 x 4 bytes x {full['trainable']:,} = "
             f"{_mib(12 * full['trainable'])}, where LoRA needs them for {lo['trainable']:,} "
             f"({_mib(12 * lo['trainable'])}).")
    if "held_bytes" in lo and "held_bytes" in ql:
        text += (f" QLoRA's 4-bit base holds {_mib(lo['held_bytes'] - ql['held_bytes'])} less "
                 f"than LoRA's float32 one; during a step it dequantizes layer by layer, and "
                 f"those temporaries take back part of the saving.")
    peaks = [r["peak_bytes_all"] for r in m.values() if r.get("peak_bytes_all")]
    if peaks:
        moved = max(max(p) - min(p) for p in peaks)
        if moved >= 0.05 * MIB:
            text += (f" Bytes are counted exactly, yet the peak moved by up to {_mib(moved)} "
                     f"between {len(peaks[0])} measurements of the same model (which arrays are "
                     f"alive at the same moment varies from step to step): smaller differences "
                     f"are noise.")
        else:
            text += (f" The peak was the same to 0.1 MiB in {len(peaks[0])} measurements of each "
                     f"model: larger differences are real.")
    return text


def checks(results: dict) -> list[tuple[bool, str]]:
    """The claims of the LoRA story, each with whether this run bears it out. In quick mode the
    claims meant for the full run say so (a smoke run trains too little to bear them out)."""
    m = results["methods"]
    full, lo, ql = m["full"]["accuracy"], m["lora"]["accuracy"], m["qlora"]["accuracy"]
    share = m["lora"]["trainable"] / m["lora"]["total"]
    merge = results["merge"]
    sizes = results["adapter_bytes"]
    found = [
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
    if results.get("quick"):  # the claims a smoke run is too small to bear out
        s = results["settings"]
        too_few = "--quick trains too few steps"
        why = {0: too_few, 2: too_few,
               1: f"the --quick model is {s['n_embd']} wide, so rank {s['r']} is a larger share "
                  f"of it"}
        found = [(ok, f"{text} [meant for the full run: {why[i]}]" if i in why else text)
                 for i, (ok, text) in enumerate(found)]
    return found


# ------------------------------------------------------------------------------------ plots

def _tail_mean(history: dict, n: int = 20) -> float:
    """The mean loss of the last ``n`` logged steps: one step's loss is noisy."""
    return float(np.mean(history["loss"][-n:]))


def _plot_losses(results: dict, plt: Any, path: Path) -> None:
    tasks = results["tasks"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    base = results.get("base_history")
    if base:
        ax1.plot(base["step"], base["loss"], lw=1, color="k")
    else:
        ax1.text(0.5, 0.5, "base reused from a previous run", ha="center", va="center",
                 transform=ax1.transAxes)
    ax1.set_title(f"1. pretraining on task A ({tasks['A']})")
    ax1.set_ylabel("cross-entropy (answer tokens)")
    for method, color in zip(results["methods"], COLORS):
        h = results["methods"][method]["history"]
        ax2.plot(h["step"], h["loss"], lw=1, label=LABELS[method], color=color)
    ax2.set_title(f"2. fine-tuning on task B ({tasks['B']})")
    ax2.legend(fontsize=8)
    tc = results["task_c_history"]
    ax3.plot(tc["step"], tc["loss"], lw=1, color="C1", label="LoRA (a second adapter)")
    ax3.set_title(f"3. a second adapter on task C ({tasks['C']})")
    ax3.legend(fontsize=8)
    ax3.sharey(ax2)  # the two adapters' tasks on one scale
    for ax in (ax1, ax2, ax3):
        ax.set_yscale("log")
        ax.set_xlabel("step")
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
    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, acc, label in ((-0.2, b_acc, f"task B ({tasks['B']}, the new task)"),
                               (0.2, a_acc, f"task A ({tasks['A']}, the old task)")):
        bars = ax.bar(x + offset, acc, 0.4, label=label)
        ax.bar_label(bars, [f"{v:.1%}" for v in acc], fontsize=8, padding=2)
    share = _same_answer(results, "A", "B")
    ax.axhline(share, color="gray", ls=":", lw=1.2,
               label=f"no carry ({share:.1%} of questions): A and B agree")
    ax.set_xticks(x, ["base\n(before fine-tuning)"] + [LABELS[m] for m in methods])
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks(np.linspace(0, 1, 6), [f"{v:.0%}" for v in np.linspace(0, 1, 6)])  # as the bars
    ax.set_ylabel("held-out exact match")
    ax.set_title("accuracy per method")
    handles, labels = ax.get_legend_handles_labels()  # the line first: put the bars first
    ax.legend(handles[1:] + handles[:1], labels[1:] + labels[:1], loc="upper center", ncol=3,
              fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.98))  # clear of the frame
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
    ax2.bar([LABELS[m] for m in methods], counts, color=COLORS)
    ax2.set_yscale("log")
    for i, c in enumerate(counts):
        ax2.text(i, c * 1.1, f"{c:,}", ha="center", fontsize=8)
    ax2.set_ylim(top=max(counts) * 3)  # room for the tallest bar's label
    ax2.set_title("trainable parameters of the whole model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _whiskers(values: list[float], around: float) -> list[list[float]]:
    """errorbar's yerr for a bar at ``around`` whose measurements spread over ``values``."""
    return [[around - min(values)], [max(values) - around]]


def _plot_memory(results: dict, plt: Any, path: Path) -> None:
    methods = list(results["methods"])
    rs = [results["methods"][m] for m in methods]
    x = np.arange(len(methods))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    peak = np.array([r["peak_bytes"] for r in rs]) / MIB
    held = np.array([r.get("held_bytes", 0) for r in rs]) / MIB
    ax1.bar(x, held, color=COLORS)
    ax1.bar(x, peak - held, bottom=held, color=COLORS, alpha=0.4)
    for i, r in enumerate(rs):
        spread = [b / MIB for b in r.get("peak_bytes_all") or [r["peak_bytes"]]]
        ax1.errorbar(i, peak[i], yerr=_whiskers(spread, peak[i]), color="k", capsize=4, lw=1)
        ax1.text(i, peak[i] * 1.03, f"{peak[i]:.1f} MiB", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, [f"{LABELS[m]}\n(model {h:.1f} MiB)" for m, h in zip(methods, held)])
    ax1.set_ylim(0, peak.max() * 1.45)  # room for the legend above the bars
    ax1.set_ylabel("MiB")
    source = {"tracemalloc": "tracemalloc, host", "device pool": "device memory pool"}
    seen_by = ", ".join(source.get(s, s) for s in sorted({r.get("memory_source", "tracemalloc")
                                                          for r in rs}))
    ax1.set_title(f"peak memory of a training step ({seen_by})\nwhiskers: range over repeated "
                  f"measurements", fontsize=10)
    solid, light = (plt.Rectangle((0, 0), 1, 1, color="gray", alpha=a) for a in (1.0, 0.4))
    ax1.legend([solid, light], ["the model's arrays", "what two training steps allocate on top"],
               loc="upper right", fontsize=8, frameon=False)
    step = np.array([r["step_seconds"] for r in rs]) * 1e3
    ax2.bar(x, step, color=COLORS)
    tops = []
    for i, r in enumerate(rs):
        times = [1e3 * t for t in r.get("step_seconds_all") or [r["step_seconds"]]]
        ax2.errorbar(i, step[i], yerr=_whiskers(times, step[i]), color="k", capsize=4, lw=1)
        tops.append(max(max(times), step[i]))
        ax2.text(i, tops[-1] * 1.03, f"{step[i]:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax2.set_ylim(0, max(tops) * 1.15)  # the labels above the whiskers, as on the left
    ax2.set_xticks(x, [LABELS[m] for m in methods])
    ax2.set_ylabel("ms")
    ax2.set_title("time of a training step (median; whiskers: range)", fontsize=10)
    ql = results["methods"].get("qlora", {})
    caveat = ("QLoRA does LoRA's work plus dequantizing its 4-bit base twice per shard"
              + (f" ({_ms(ql['dequantize_seconds'])} each time here)"
                 if "dequantize_seconds" in ql else "")
              + f": a QLoRA bar below LoRA's is timing noise.\nOn a text model QLoRA's step "
                f"was {TEXT_MODEL_QLORA_SLOWDOWN}x LoRA's: the 4-bit base saves memory, not "
                f"time.")
    fig.text(0.5, 0.015, caveat, ha="center", va="bottom", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
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
    ax.set_ylabel("weights")
    ax.set_title(f"4-bit quantization error on the base model's {weights.size:,} linear weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return errors


def _switching_label(row: str, tasks: dict) -> str:
    if row == NO_ADAPTER:
        return "no adapter (the base)"
    letter = next((k for k, name in tasks.items() if name == row), None)
    return f"adapter {row}" + (f" (task {letter})" if letter else "")


def _plot_switching(results: dict, plt: Any, path: Path) -> None:
    rows = list(results["switching"])
    names = results["tasks"]
    tasks = [names["A"], names["B"], names["C"]]
    grid = np.array([[results["switching"][r][t] for t in tasks] for r in rows])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.imshow(grid, vmin=0, vmax=1, cmap="Greens")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1%}", ha="center", va="center",
                    color="white" if grid[i, j] > 0.6 else "black")  # readable on dark green
    ax.set_xticks(range(3), [f"task {k}\n({names[k]})" for k in "ABC"])  # two lines: no overlap
    ax.set_yticks(range(len(rows)), [_switching_label(r, names) for r in rows])
    ax.set_xlabel("held-out exact match on")
    ax.set_title("one base, two adapters: accuracy by active adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the grid is square: no blank margin
    plt.close(fig)


def _compare_losses(ends: dict) -> str:
    """What the task-B panel shows: QLoRA against LoRA, full fine-tuning against both."""
    ratio = max(ends["lora"], ends["qlora"]) / max(min(ends["lora"], ends["qlora"]), 1e-12)
    text = ("QLoRA's curve follows LoRA's, so the 4-bit base hardly changes training" if ratio < 2
            else f"QLoRA ends {ends['qlora'] / ends['lora']:.1f}x LoRA's loss")
    if ends["full"] < min(ends["lora"], ends["qlora"]):
        text += "; full fine-tuning, which moves every weight, ends lower"
    return text + "."


def captions(results: dict) -> dict[str, str]:
    """One line per plot for report.md: what to see in it, with this run's numbers."""
    t, s, m = results["tasks"], results["settings"], results["methods"]
    share = _same_answer(results, "A", "B")
    ends = {n: _tail_mean(r["history"]) for n, r in m.items()}
    b_range = sorted(r["accuracy"] for r in m.values())
    n = k = s["n_embd"]
    r = s["r"]
    errors = sorted(results["quant_error"].items(), key=lambda e: e[1])
    sw = results["switching"]
    return {
        "loss_curves.png":
            "Training loss of each stage, log scale (the mean of the last 20 steps: "
            + ", ".join(f"{LABELS[name]} {v:.1e}" for name, v in ends.items())
            + f"; the task-C adapter {_tail_mean(results['task_c_history']):.1e}): "
            + _compare_losses(ends),
        "accuracy.png":
            f"Task B rises from the base's {results['base'][t['B']]:.1%} to "
            f"{b_range[0]:.1%}-{b_range[-1]:.1%} with every method, and task A falls toward the "
            f"dotted line: the {share:.1%} of questions with no carry, the only ones on which a "
            f"carry-less sum is also the right sum.",
        "trainable_params.png":
            f"LoRA's trainable parameters grow linearly with the rank: at r = {r} one {n} x {k} "
            f"projection trains {r * (n + k):,} numbers instead of {n * k:,}, the whole model "
            f"{m['lora']['trainable']:,} instead of {m['full']['trainable']:,}.",
        "memory.png":
            "Peak memory stacks the model's arrays (solid) and what a step allocates on top "
            "(light), whiskers the range of repeated measurements; the step time's whiskers show "
            "how noisy one step is, and QLoRA's step does LoRA's work plus dequantizing.",
        "quant_error.png":
            "Rounding error of each 4-bit code on the base's weights, mean |error| "
            + ", ".join(f"{qt.upper()} {e:.2e}" for qt, e in errors)
            + ": NF4's levels are quantiles of a normal distribution, which trained weights "
              "roughly follow.",
        "adapter_switching.png":
            f"Switching the adapter switches the task: task B {sw[t['B']][t['B']]:.1%} with "
            f"the {t['B']} adapter, task C {sw[t['C']][t['C']]:.1%} with the {t['C']} adapter, "
            f"and with none the base still adds ({sw[NO_ADAPTER][t['A']]:.1%} on task A): one "
            f"frozen base, two small files. The light cells off the diagonal are questions on "
            f"which two tasks want the same answer (A and B {_same_answer(results, 'A', 'B'):.1%}"
            f", A and C {_same_answer(results, 'A', 'C'):.1%}, B and C "
            f"{_same_answer(results, 'B', 'C'):.1%} of them).",
    }


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
    t = results["tasks"]
    said = captions(results)
    titles = dict(zip(PLOTS, ("loss curves", "accuracy", "trainable parameters", "memory",
                              "quantization error", "adapter switching")))
    lines = [
        "# minilora demo report", "",
        f"A {s['n_layer']}-layer GPT (n_embd {s['n_embd']}) pretrained on {s['digits']}-digit "
        f"addition (task A, `{t['A']}`), then adapted to {DESCRIBE[t['B']]} (task B, "
        f"`{t['B']}`) and to {DESCRIBE[t['C']]} (task C, `{t['C']}`). LoRA: r={s['r']}, "
        f"alpha={s['alpha']:g} on q_proj and v_proj; QLoRA: the same adapters on an NF4 base with "
        f"double quantization. Accuracy is exact match on {s['eval_examples']} held-out "
        f"questions. Run time {results['seconds']:.0f} s.", "",
        "```", format_table(results), "```", "",
        f"Peak memory = the model's resident arrays + the peak of what two training steps "
        f"allocate on top (gradients, optimizer state, activations); {memory_note(results)}. "
        "\"file\" is what must be shipped: the whole model for full fine-tuning, the adapter "
        "files for LoRA and QLoRA.", "",
        "## What the numbers mean", "",
        *[f"- {note}" for note in notes(results)], "",
        "## Checks", "",
        *[f"- [{'x' if ok else ' '}] {text}" for ok, text in checks(results)], "",
        "## Plots", "",
    ]
    for plot in PLOTS:
        lines += [f"![{titles[plot]}]({plot})", "", said[plot], ""]
    lines += ["Reproduce with `minilora demo` (add `--quick` for a smoke run).", ""]
    stage.write_bytes("report.md", "\n".join(lines).encode())
    slim = {k: v for k, v in results.items() if k not in ("base_history", "task_c_history")}
    slim["methods"] = {m: {k: v for k, v in r.items() if k != "history"}
                       for m, r in results["methods"].items()}
    stage.write_bytes("results.json", json.dumps(slim, indent=2).encode())
