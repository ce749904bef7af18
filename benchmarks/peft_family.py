"""The PEFT family on one base, at one budget of steps: what each method trains, learns and costs.

    python benchmarks/peft_family.py                 # the full run, seeds 0 1 2 (a few minutes)
    python benchmarks/peft_family.py --seeds 0       # one seed
    python benchmarks/peft_family.py --quick         # seconds: a smoke run, figures meaningless
    python benchmarks/peft_family.py --sweep         # the learning-rate sweep behind LR below

One small GPT is trained on task A (``add``, 2-digit operands, as tutorial 03 and the demo do:
the CLI's default is 3 digits, 2 let the base train in half a minute on a CPU), then a copy of
it is fine-tuned to task B (``nocarry``: the sum with every carry forgotten) by each method for
the same number of steps, with the same batches, warmup and cosine schedule:

    full        every parameter (AdamW, weight decay 0.1 on matrices, as the training loop)
    lora        LoRA r=8, alpha=16 on q_proj and v_proj (Hu et al. 2021); also shown merged
    ia3         IA3 vectors on k, v and the MLP's hidden activations (Liu et al. 2022)
    bitfit      the biases only (Ben Zaken et al. 2021)
    bottleneck  Houlsby adapters, m=16, after the attention and after the MLP (Houlsby 2019)
    prompt      prompt tuning, N=8 virtual tokens, initialised from vocabulary rows (Lester 2021)
    prefix      prefix tuning, N=8 learned keys and values per layer (Li and Liang 2021)

Each method has its own peak learning rate (``LR``), chosen by ``--sweep``: every rate of the
grid 1e-3 .. 3 at seed 0, then its three best again with seeds 1 and 2; the rate with the lowest
median training loss over the last tenth of the steps wins (the training loss, not held-out
accuracy, chooses, so the held-out questions stay unseen; three seeds, so that a rate at the
edge of stability that one seed survives is not chosen). Methods with few parameters that start
at an identity (IA3's ones, a prompt) want far larger rates than full fine-tuning, as their
papers use (Lester et al. train prompts at 0.3).

Why the base is trained with padding. Prompt and prefix tuning put their N virtual tokens in the
first N positions, so the real tokens sit at positions N .. N + T (as PEFT runs them on GPT-2).
A GPT with learned position embeddings knows only the positions it was trained on; GPT-2 was
pretrained on all 1,024, but a base trained on 9-token questions knows 9. So the base here is
trained on task A with 0 to ``pad`` filler tokens (the answer's end mark ``.``) before each
question and the rest after it (no loss on them): every position of its ``9 + pad`` context is
trained, and it answers a question wherever it starts. Held-out evaluation asks the questions
unpadded, from position 0; the fine-tuning batches are plain task-B questions.

Columns, per method:

* trainable parameters: the formula and the count of ``ml.lora.count_parameters`` (asserted
  equal to the library's formula function, e.g. ``ml.lora.gpt_lora_param_count``);
* task-B accuracy: exact match of greedy answers on the 500 held-out questions (after merging,
  for the rows that merge); with several seeds, the median and the range;
* train peak MiB: in a child process per method, a model of the same shape with the method
  injected runs training steps; tracemalloc sees every NumPy allocation: the arrays the model
  holds plus the peak that two steps with a fresh AdamW allocate on top (gradients, moments,
  activations), ``minilora.demo.measure_step``'s measure (on a GPU, the device pool's bytes);
* inference tokens/s against the base: greedy ``generate`` with the KV cache of the answers to
  the 500 held-out prompts (4 new tokens each), the method's model (merged where it can merge)
  and the base timed in alternating rounds; the ratio of the medians (1.00: as fast as the base);
* extra FLOPs per token: ``ml.flops.count()`` around one forward of 100 held-out task-B
  sequences (9 tokens each), the method's model minus the base, over the tokens (matrix products
  only, counted as the engine runs them);
* context lost: the positions of the context window the method takes (N virtual tokens).

The figures come from a 2-layer GPT of width 64 (102k parameters), in which Python overhead,
not matmuls, sets inference speed and activations, not weights, fill training memory: what
transfers to large models is the parameter counts, the FLOPs, the context and which methods
merge, not the speed and memory ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matmuls: a second thread only waits

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minilora as ml  # noqa: E402
from minilora import backend as B  # noqa: E402
from minilora import family, lora  # noqa: E402
from minilora.data import END, IGNORE_INDEX, TaskDataset, get_task, task_tokenizer  # noqa: E402
from minilora.demo import measure_step  # noqa: E402
from minilora.errors import TrainingDivergedError  # noqa: E402
from minilora.family.prompt import (  # noqa: E402
    PrefixTuningConfig,
    PromptTuningConfig,
    prompt_parameter_count,
)
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.train import TrainConfig, exact_match, train  # noqa: E402

OUT = ROOT / "benchmarks" / "peft_family"  # results.json and accuracy_vs_params.png
TRAINED = ("full", "lora", "ia3", "bitfit", "bottleneck", "prompt", "prefix")
ROWS = ("full", "lora", "lora_merged", "ia3", "bitfit", "bottleneck", "prompt", "prefix")
LABELS = {"full": "full fine-tuning", "lora": "LoRA r=8 (q, v)", "lora_merged": "LoRA, merged",
          "ia3": "IA3 (merged)", "bitfit": "BitFit", "bottleneck": "bottleneck m=16",
          "prompt": "prompt tuning N=8", "prefix": "prefix tuning N=8"}
MERGED = {"lora_merged", "ia3", "bitfit"}  # rows whose model is merged before inference
# peak learning rates: chosen from LR_GRID by final training loss (module docstring), measured
# with --sweep on this base (benchmarks/peft_family/sweep.json). Full fine-tuning and LoRA train
# best at 1e-2 (full breaks down at 3e-2, LoRA at 1e-1); the adapters (up = 0 at the start) at
# 1e-2 to 3e-2. IA3's vectors multiply activations around 1, so a step of 1e-2 moves them by a
# percent: they train best at 0.3 (1 wins with seed 0 and loses with seeds 1 and 2); prompts
# and prefixes at 0.3, the rate Lester et al. use; biases at 0.1 (0.3 wins with seed 0, and
# seed 2 collapses at it).
LR = {"full": 1e-2, "lora": 1e-2, "ia3": 3e-1, "bitfit": 1e-1, "bottleneck": 3e-2,
      "prompt": 3e-1, "prefix": 3e-1}
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
FINALISTS = 3  # rates of the grid's seed-0 stage rerun with seeds 1 and 2


@dataclass
class Settings:
    """Sizes of the run; ``quick()`` shrinks them to a smoke run."""

    digits: int = 2
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    pad: int = 8  # filler tokens the base learns around a question: room for N virtual tokens
    base_steps: int = 1200
    base_lr: float = 3e-3
    steps: int = 600  # the fine-tuning budget, the same for every method
    batch_size: int = 64
    warmup: int = 20
    n_eval: int = 500
    r: int = 8
    alpha: float = 16.0
    bottleneck: int = 16
    virtual_tokens: int = 8
    gen_rounds: int = 9
    memory: bool = True

    @classmethod
    def quick(cls) -> Settings:
        """Seconds: the same pipeline, a few steps (the accuracies mean nothing)."""
        return cls(base_steps=60, steps=20, n_eval=100, gen_rounds=3)


# ------------------------------------------------------------------------------------- data

class PaddedTask(TaskDataset):
    """A task whose training questions start anywhere in a context of ``seq_len - 1 + pad``.

    Row i of a batch is ``k_i`` filler tokens (``.``), the question and its answer, then
    ``pad - k_i`` more fillers, with k_i uniform in 0 .. pad; the targets are the answer's alone
    (-100 elsewhere). x, y: (batch, seq_len - 1 + pad). Held-out questions are the task's own.
    """

    def __init__(self, task: Any, pad: int, n_heldout: int = 500) -> None:
        super().__init__(task, n_heldout=n_heldout)
        self.pad = int(pad)
        self.filler = int(self.tokenizer.encode(END)[0])

    @property
    def block_size(self) -> int:
        """The positions a padded row needs: seq_len - 1 + pad."""
        return self.task.seq_len - 1 + self.pad

    def get_batch(self, batch_size: int, rng: np.random.Generator,
                  split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """x, y (batch_size, seq_len - 1 + pad): each question at a random offset 0 .. pad."""
        x, y = super().get_batch(batch_size, rng, split)  # (b, T) each
        b, T = x.shape
        offsets = rng.integers(0, self.pad + 1, size=b)  # (b,)
        xs = np.full((b, T + self.pad), self.filler, np.int64)
        ys = np.full((b, T + self.pad), IGNORE_INDEX, np.int64)
        rows, cols = np.arange(b)[:, None], offsets[:, None] + np.arange(T)  # (b, 1), (b, T)
        xs[rows, cols], ys[rows, cols] = x, y
        return xs, ys


def task_b(s: Settings) -> TaskDataset:
    """Task B, the same held-out pairs as task A's."""
    return TaskDataset(get_task("nocarry", s.digits), n_heldout=s.n_eval)


def gpt_config(s: Settings) -> GPTConfig:
    """The base's shape: a context of the question plus ``pad`` positions."""
    block = get_task("add", s.digits).seq_len - 1 + s.pad
    return GPTConfig(vocab_size=task_tokenizer().vocab_size, block_size=block,
                     n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)


def schedule(s: Settings, steps: int, lr: float, weight_decay: float, seed: int) -> TrainConfig:
    """Warmup, then a cosine to lr / 10; one evaluation at the end."""
    return TrainConfig(steps=steps, batch_size=s.batch_size, lr=lr, warmup=s.warmup,
                       min_lr=lr / 10, weight_decay=weight_decay, eval_every=steps,
                       eval_examples=s.n_eval, seed=seed)


def train_base(s: Settings) -> tuple[GPT, dict]:
    """The task-A base (seed 0): trained on padded questions; its host state and figures."""
    data = PaddedTask(get_task("add", s.digits), s.pad, s.n_eval)
    ml.manual_seed(0)
    model = GPT(gpt_config(s))
    history = train(model, data, schedule(s, s.base_steps, s.base_lr, 0.1, 0), progress=False)
    prompts, answers = data.heldout(s.n_eval)
    shifted = {}  # task A asked after k fillers: every position was trained
    for k in (0, s.pad // 2, s.pad):
        padded = np.concatenate([np.full((len(prompts), k), data.filler), prompts], axis=1)
        got = ml.train.greedy_answers(model, padded, answers.shape[1])
        shifted[k] = float((got == answers).all(axis=1).mean())
    info = {"task_a": shifted[0], "task_a_after_fillers": shifted,
            "task_b": exact_match(model, task_b(s), s.n_eval), "seconds": history["seconds"]}
    return model, info


def copy_of(model: GPT) -> GPT:
    """A fresh GPT with ``model``'s weights."""
    twin = GPT(model.config)
    twin.load_state_dict({k: B.to_numpy(v).copy() for k, v in model.state_dict().items()})
    return twin


# ---------------------------------------------------------------------------------- methods

def configs(s: Settings) -> dict[str, Any]:
    """Each adapter method's config."""
    return {"lora": lora.LoraConfig(r=s.r, alpha=s.alpha, target_modules=("q_proj", "v_proj")),
            "ia3": family.IA3Config(), "bitfit": family.BitFitConfig(),
            "bottleneck": family.BottleneckConfig(bottleneck=s.bottleneck),
            "prompt": PromptTuningConfig(s.virtual_tokens, init="vocab"),
            "prefix": PrefixTuningConfig(s.virtual_tokens)}


def inject(model: GPT, method: str, s: Settings) -> GPT:
    """``method`` put into ``model`` in place (full: nothing frozen)."""
    c = configs(s).get(method)
    if method == "full":
        return model
    if method == "lora":
        return lora.inject_lora(model, c)
    if method == "ia3":
        return family.inject_ia3(model, c)
    if method == "bitfit":
        return family.bitfit(model)
    if method == "bottleneck":
        return family.inject_bottleneck(model, c)
    return family.inject_prompt(model, c)  # prompt or prefix


def full_count(g: GPTConfig) -> int:
    """Every parameter of a GPT with biases: (V + ctx) C + L (12 C^2 + 13 C) + 2 C, ctx the
    context (block_size): wte and wpe, then per block 4 (C^2 + C) + 8 C^2 + 5 C + 2 * 2 C for
    the attention, the MLP and two LayerNorms, and ln_f's 2 C."""
    C = g.n_embd
    return g.vocab_size * C + g.block_size * C + g.n_layer * (12 * C * C + 13 * C) + 2 * C


# method -> (formula as the table prints it, the closed form, the library's count function)
FORMULAS: dict[str, tuple[str, Callable, Callable]] = {
    "full": ("(V + ctx) C + L (12 C^2 + 13 C) + 2 C", full_count, full_count),
    "lora": ("2 L r (C + C)", lambda g, c: 2 * g.n_layer * c.r * (2 * g.n_embd),
             lora.gpt_lora_param_count),
    "ia3": ("L (C + C + 4 C) = 6 L C", lambda g, c: 6 * g.n_layer * g.n_embd,
            family.ia3_param_count),
    "bitfit": ("11 L C + C", lambda g, c: 11 * g.n_layer * g.n_embd + g.n_embd,
               family.bitfit_param_count),
    "bottleneck": ("2 L (2 C m + m + C)",
                   lambda g, c: 2 * g.n_layer * (2 * g.n_embd * c.bottleneck + c.bottleneck
                                                 + g.n_embd),
                   family.bottleneck_param_count),
    "prompt": ("N C", lambda g, c: c.num_virtual_tokens * g.n_embd,
               lambda g, c: prompt_parameter_count(c, g.n_layer, g.n_embd)),
    "prefix": ("2 L C N", lambda g, c: 2 * g.n_layer * g.n_embd * c.num_virtual_tokens,
               lambda g, c: prompt_parameter_count(c, g.n_layer, g.n_embd)),
}


def counted_parameters(model: GPT, method: str, s: Settings) -> tuple[int, str]:
    """The trainable count, asserted equal to the closed form and to the library's function."""
    g, c = model.config, configs(s).get(method)
    text, closed, library = FORMULAS[method]
    args = (g,) if method == "full" else (g, c)
    trainable, _ = lora.count_parameters(model)
    assert trainable == closed(*args) == library(*args), (method, trainable, closed(*args),
                                                          library(*args))
    return trainable, text


def finetune(base: GPT, method: str, s: Settings, seed: int = 0,
             lr: float | None = None) -> tuple[GPT, dict]:
    """A copy of ``base`` with ``method`` trained on task B for ``s.steps`` steps.

    ``seed`` draws the method's initial values (LoRA's A, the adapters' down projections, the
    prompt's vocabulary rows, the prefix) and the batches (``1 + seed``, as tutorial 03)."""
    ml.manual_seed(seed)
    model = inject(copy_of(base), method, s)
    lr = LR[method] if lr is None else lr
    try:
        history = train(model, task_b(s), schedule(s, s.steps, lr, 0.1 if method == "full" else
                                                   0.0, 1 + seed), progress=False)
    except TrainingDivergedError as exc:
        history = {"diverged": str(exc).splitlines()[0], "loss": [float("inf")], "seconds": 0}
    return model, history


def for_inference(model: GPT, method: str) -> GPT:
    """The model as it would be served: merged where the method can merge (a copy for LoRA)."""
    if method == "lora_merged":
        twin = copy_of_lora(model)
        return lora.merge_and_unload(twin)
    if method in ("ia3", "bitfit"):
        return family.merge_and_unload(model)
    return model


def copy_of_lora(model: GPT) -> GPT:
    """A second LoRA model with the same base and adapter (the unmerged one stays for its row)."""
    twin = GPT(model.config)
    base_state = {k.replace(".base_layer.", "."): B.to_numpy(v).copy()
                  for k, v in model.state_dict().items() if "lora_" not in k}
    twin.load_state_dict(base_state)
    lora.inject_lora(twin, lora.lora_configs(model)["default"])
    twin.load_state_dict({k: B.to_numpy(v).copy() for k, v in model.state_dict().items()})
    return twin


def final_loss(history: dict) -> float:
    """The mean training loss of the last tenth of the steps: what the sweep compares."""
    losses = history["loss"]
    return float(np.mean(losses[-max(1, len(losses) // 10):]))


# ------------------------------------------------------------------------------- measuring

def extra_flops_per_token(model: GPT, base: GPT, s: Settings) -> float:
    """Counted matmul FLOPs of one forward of 100 held-out task-B sequences, the model's minus
    the base's, per token."""
    data = task_b(s)
    x, _ = data.inputs_targets(data.heldout_ids[:100])  # (100, 9)

    def counted(m: GPT) -> int:
        with ml.no_grad(), ml.flops.count() as c:
            m(x)
        return c.total

    return (counted(model) - counted(base)) / x.size


def generation_ratio(model: GPT, base: GPT, s: Settings) -> dict:
    """Greedy KV-cache generation of the held-out answers, model and base in alternating rounds
    (who goes first alternates); tokens/s of each (medians) and their ratio."""
    prompts, answers = task_b(s).heldout(s.n_eval)
    new = answers.shape[1]
    times: dict[str, list[float]] = {"model": [], "base": []}
    for m in (model, base):  # warm: code paths and allocator
        m.generate(prompts, new, temperature=0.0)
    for r in range(s.gen_rounds):
        order = (("model", model), ("base", base)) if r % 2 == 0 else \
            (("base", base), ("model", model))
        for name, m in order:
            t0 = time.perf_counter()
            m.generate(prompts, new, temperature=0.0)
            B.synchronize()
            times[name].append(time.perf_counter() - t0)
    tokens = len(prompts) * new
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    return {"tokens_per_s": rate["model"], "base_tokens_per_s": rate["base"],
            "ratio": rate["model"] / rate["base"]}


def memory_child(method: str, settings_json: str) -> dict:
    """In a fresh process: ``measure_step`` of a model of the base's shape with ``method``."""
    s = Settings(**json.loads(settings_json))
    ml.manual_seed(0)
    model = inject(GPT(gpt_config(s)), method, s)
    m = measure_step(model, task_b(s), s.batch_size, timed=2, shards=1, repeats=2)
    return {"peak_mib": m["peak_bytes"] / 2**20, "held_mib": m["held_bytes"] / 2**20,
            "source": m["memory_source"]}


def memory(method: str, s: Settings) -> dict:
    """``memory_child`` in a child process (its own allocator and caches), or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", method,
           "--settings", json.dumps(dataclasses.asdict(s))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------- report

def header(argv: list[str]) -> dict:
    """The command and the machine."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    command = "python benchmarks/peft_family.py" + "".join(f" {a}" for a in argv)
    return {"command": command, "date": datetime.date.today().isoformat(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "python": platform.python_version(),
            "backend": B.get_backend(), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average": [round(v, 2) for v in load], "minilora": ml.__version__}


def spread(values: list[float]) -> str:
    """``median`` or ``median (min-max)`` in percent."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.1%}"
    return f"{med:.1%} ({min(values):.1%}-{max(values):.1%})"


def markdown(rows: list[dict]) -> str:
    """The table, one row per method."""
    out = ["| method | trainable params (formula) | count | task-B accuracy | train peak MiB | "
           "inference tokens/s vs base | extra FLOPs/token | context lost | mergeable | lr |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.2f}"
        out.append(f"| {LABELS[r['method']]} | {r['formula']} | {r['trainable']:,d} | "
                   f"{spread(r['accuracy'])} | {mem} | {r['speed']['ratio']:.2f} | "
                   f"{r['extra_flops_per_token']:,.0f} | {r['context_lost']} | "
                   f"{r['mergeable']} | {r['lr']:g} |")
    return "\n".join(out)


def plot(rows: list[dict], base_on_b: float, path: Path, title: str) -> None:
    """Accuracy against trainable parameters (log x), one labelled point per trained method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"full": "#dd8452", "lora": "#4c72b0", "ia3": "#55a868", "bitfit": "#8172b3",
              "bottleneck": "#937860", "prompt": "#da8bc3", "prefix": "#c44e52"}
    # where each label sits (points, alignment): the methods at 100% crowd the top edge
    places = {"full": ((0, 11), "center"), "lora": ((-4, 11), "right"),
              "bottleneck": ((6, -13), "left"), "ia3": ((-10, 0), "right"),
              "prefix": ((-10, 0), "right"), "prompt": ((-10, 0), "right"),
              "bitfit": ((10, 0), "left")}
    for r in rows:
        if r["method"] == "lora_merged":
            continue
        accs = r["accuracy"]
        y = statistics.median(accs)
        err = [[y - min(accs)], [max(accs) - y]]
        ax.errorbar(r["trainable"], y, yerr=err, fmt="o", ms=8, capsize=4,
                    color=colors[r["method"]])
        label = "LoRA r=8 (merged or not)" if r["method"] == "lora" else LABELS[r["method"]]
        offset, ha = places[r["method"]]
        ax.annotate(f"{label}: {y:.1%}", (r["trainable"], y), textcoords="offset points",
                    xytext=offset, ha=ha, va="center", fontsize=8)
    ax.axhline(base_on_b, color="gray", ls=":", lw=1)
    ax.text(6e1, base_on_b + 0.015, f"base, no fine-tuning: {base_on_b:.1%}", fontsize=8,
            color="gray")
    ax.set_xscale("log")
    ax.set_xlim(5e1, 1e6)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("exact match on task B (held out)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- run

def run(s: Settings, seeds: list[int], out: Path | None, argv: list[str]) -> dict:
    """Train the base and every method, measure them, print the table; write the results."""
    head = header(argv)
    print(f"PEFT family on task B (nocarry, {s.digits} digits), minilora {head['minilora']}, "
          f"numpy {head['numpy']}, backend {head['backend']}, {head['cpus']} CPUs, load "
          f"{head['load_average'][0]:.2f}, Python {head['python']}, OpenBLAS threads "
          f"{head['openblas_threads']}")
    print(f"command: {head['command']}", flush=True)
    base, base_info = train_base(s)
    base.eval()
    print(f"base: {base.num_parameters():,d} parameters, task A {base_info['task_a']:.1%} "
          f"(after {s.pad} fillers {base_info['task_a_after_fillers'][s.pad]:.1%}), task B "
          f"{base_info['task_b']:.1%}, {base_info['seconds']:.0f} s", flush=True)
    rows = []
    models: dict[str, GPT] = {}
    results: dict[str, dict] = {m: {"accuracy": [], "final_loss": [], "ms_per_step": []}
                                for m in ROWS}
    for seed in seeds:
        for method in TRAINED:
            model, hist = finetune(base, method, s, seed)
            model.eval()
            count = counted_parameters(model, method, s)  # before merging: merged trains none
            served = {"lora": model, "lora_merged": for_inference(model, "lora_merged")} \
                if method == "lora" else {method: for_inference(model, method)}
            for name, m in served.items():
                res = results[name]
                res["trainable"], res["formula"] = count
                res["accuracy"].append(exact_match(m, task_b(s), s.n_eval))
                res["final_loss"].append(final_loss(hist))
                res["ms_per_step"].append(1e3 * hist["seconds"] / max(1, len(hist["loss"])))
                if seed == seeds[0]:
                    models[name] = m
            print(f"seed {seed} {method:<10s} task B {results[method]['accuracy'][-1]:.1%} "
                  f"(final loss {results[method]['final_loss'][-1]:.4f})", flush=True)
    for name in ROWS:
        res, method = results[name], "lora" if name == "lora_merged" else name
        model = models[name]
        mem = (results["lora"]["memory"] if name == "lora_merged" else memory(method, s)) \
            if s.memory else {"error": "skipped"}
        res["memory"] = mem
        rows.append({"method": name, "formula": res["formula"], "trainable": res["trainable"],
                     "accuracy": res["accuracy"], "final_loss": res["final_loss"],
                     "ms_per_step": res["ms_per_step"], "lr": LR[method],
                     "peak_mib": mem.get("peak_mib"), "held_mib": mem.get("held_mib"),
                     "memory_source": mem.get("source", mem.get("error")),
                     "speed": generation_ratio(model, base, s),
                     "extra_flops_per_token": extra_flops_per_token(model, base, s),
                     "context_lost": model.num_virtual_tokens,
                     "mergeable": "yes" if name in MERGED or name == "lora" else
                     ("n/a" if name == "full" else "no")})
    print()
    print(f"{len(seeds)} seed(s) {seeds}; {s.steps} fine-tuning steps of {s.batch_size} for "
          f"every method; accuracy: exact match on {s.n_eval} held-out task-B questions")
    print(markdown(rows))
    print()
    sources = sorted({str(r["memory_source"]) for r in rows})
    print(f"train peak MiB: {'/'.join(sources)} in a child process per method (the model's "
          f"arrays plus the peak two steps with a fresh AdamW allocate); tokens/s vs base: "
          f"medians of {s.gen_rounds} alternating rounds of greedy KV-cache generation; extra "
          f"FLOPs/token: ml.flops.count() on one forward, the method's model (merged where it "
          f"merges) minus the base")
    result = {"header": head, "settings": dataclasses.asdict(s), "seeds": seeds,
              "base": base_info, "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(rows, base_info["task_b"], out / "accuracy_vs_params.png",
             f"task B after {s.steps} steps from one base: median and range over seeds "
             f"{', '.join(map(str, seeds))} ({head['date']})")
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name}/"
              f"results.json and accuracy_vs_params.png")
    return result


def sweep(s: Settings, out: Path | None, argv: list[str]) -> dict:
    """The learning-rate sweep, in two stages. 1: every method at every rate of LR_GRID, seed 0.
    2: the ``FINALISTS`` rates of lowest final training loss again with seeds 1 and 2; the rate
    of lowest median final loss over the three seeds wins (one lucky seed at the edge of
    stability does not choose a rate that the next seed cannot train at)."""
    head = header(argv)
    print(f"learning-rate sweep, command: {head['command']}, {head['cpus']} CPUs, load "
          f"{head['load_average'][0]:.2f}", flush=True)
    base, _ = train_base(s)

    def one(method: str, lr: float, seed: int) -> dict:
        model, hist = finetune(base, method, s, seed, lr)
        acc = None if "diverged" in hist else exact_match(model, task_b(s), s.n_eval)
        print(f"{method:<10s} lr {lr:<6g} seed {seed} final loss {final_loss(hist):.4f} task B "
              f"{'diverged' if acc is None else f'{acc:.1%}'}", flush=True)
        return {"final_loss": final_loss(hist), "accuracy": acc}

    table: dict[str, dict] = {}
    best: dict[str, str] = {}
    for method in TRAINED:
        rows = table[method] = {f"{lr:g}": {"seed 0": one(method, lr, 0)} for lr in LR_GRID}
        finalists = sorted(rows, key=lambda k: rows[k]["seed 0"]["final_loss"])[:FINALISTS]
        for key in finalists:
            for seed in (1, 2):
                rows[key][f"seed {seed}"] = one(method, float(key), seed)
            rows[key]["median_final_loss"] = statistics.median(
                r["final_loss"] for r in rows[key].values())
        best[method] = min(finalists, key=lambda k: rows[k]["median_final_loss"])
        print(f"{method}: finalists {finalists}, chosen {best[method]}", flush=True)
    print("chosen (lowest median final training loss over seeds 0-2 among the finalists):", best)
    result = {"header": head, "settings": dataclasses.asdict(s), "grid": list(LR_GRID),
              "finalists": FINALISTS, "table": table, "best": best}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="fine-tuning seeds (default 0 1 2; --quick: 0)")
    ap.add_argument("--sweep", action="store_true", help="the learning-rate sweep (seed 0)")
    ap.add_argument("--out", default=None, help="where results go (default "
                    "benchmarks/peft_family; --quick writes nothing unless given)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory children")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.settings)))
        return 0
    s = Settings.quick() if args.quick else Settings()
    if args.no_memory:
        s = dataclasses.replace(s, memory=False)
    out = Path(args.out) if args.out else (None if args.quick else OUT)
    if args.sweep:
        sweep(s, out, argv)
        return 0
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    run(s, seeds, out, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
