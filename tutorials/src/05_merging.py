# Source of tutorials/05_merging.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 05 · Merging and adapters
#
# A trained LoRA adapter is a pair of small matrices per adapted layer. This notebook is about
# what you can do with them once training is over:
#
# 1. **merge** them into the base weight, so the model runs exactly as fast as the base;
# 2. keep **several adapters** on one base and switch between them, or switch them all off;
# 3. **combine** adapters into a new one, exactly ("cat") or at a lower rank ("svd");
# 4. **save and load** an adapter on its own: kilobytes next to the base's megabytes;
# 5. merge into a **4-bit** base, which is not exact, and see how much of an update survives.
# 6. take the model and its adapter to **PyTorch**: Hugging Face GPT-2 and PEFT files.

# %%
import contextlib
import io
import json
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from safetensors.numpy import load_file

import minilora as ml
from minilora import data, interop, lora, quant, train
from minilora.errors import InvalidArgumentError
from minilora.fast.cpu import set_blas_threads

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
# the adapters' seed (their init and batch order): 0 here; benchmarks/notebook_seeds.py reruns
# the notebook with others
SEED = int(os.environ.get("MINILORA_SEED", "0"))
set_blas_threads(1)  # these matrices are small: a second BLAS thread only waits for a core
ml.manual_seed(0)
host = ml.backend.to_numpy  # library arrays (NumPy or CuPy) -> NumPy, for printing and plots
rng = np.random.default_rng(0)


def logits(model, idx):
    """The model's logits for token ids ``idx`` as a NumPy array, without recording a graph."""
    with ml.no_grad():
        return host(model(idx).data)


# %% [markdown]
# ## 1. Merging is exact
#
# A LoRA layer computes $y = x W^{\top} + s\,(x A^{\top}) B^{\top}$ with two skinny matmuls.
# Because matrix products distribute, the same output comes from one matmul with a merged weight:
#
# $$W' = W + s\,B A, \qquad x W'^{\top} = x W^{\top} + s\,(x A^{\top}) B^{\top}.$$
#
# After merging, serving costs exactly what the base costs: the LoRA paper's "no additional
# inference latency". The two sides differ only by rounding, so we check on a tiny GPT in float64
# and in float32. LoRA starts with $B = 0$ (the adapted model *is* the base); to have something
# to merge we fill $B$ with random numbers.

# %%
tiny_config = ml.GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32)
tiny_lora = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "fc"))


def randomize_b(model, adapter_name, scale):
    """Give every B of ``adapter_name`` random N(0, scale^2) entries (training would, slowly)."""
    for _, layer in lora.lora_layers(model):
        B = layer.lora_B[adapter_name].weight
        B.data[...] = ml.backend.asarray(scale * rng.standard_normal(B.shape), dtype=B.dtype)


x_tiny = rng.integers(0, 16, size=(4, 8))
merge_error = {}
for dtype in (np.float32, np.float64):  # the float64 model stays in `tiny` afterwards
    ml.manual_seed(0)
    tiny = ml.GPT(tiny_config).astype(dtype)
    y_base = logits(tiny, x_tiny)
    lora.inject_lora(tiny, tiny_lora)
    randomize_b(tiny, "default", 0.2)
    y_unmerged = logits(tiny, x_tiny)
    lora.merge(tiny)
    y_merged = logits(tiny, x_tiny)
    merge_error[dtype.__name__] = float(np.abs(y_merged - y_unmerged).max())
    print(f"{dtype.__name__}: max |merged - unmerged| = {merge_error[dtype.__name__]:.1e}   "
          f"(the adapter moved the logits by up to {np.abs(y_unmerged - y_base).max():.2f})")

# %% [markdown]
# ## 2. A flag refuses a double merge
#
# Merging twice would add $sBA$ twice, silently. Each LoRA layer keeps a `merged` flag (the
# names of the adapters folded into $W$) and refuses until `unmerge` has subtracted them again.
# (loralib merges automatically on `eval()`; here merging is always an explicit call.)

# %%
print("merged:", tiny.h[0].attn.q_proj.merged, tiny.h[0].attn.q_proj.merged_adapters)
try:
    lora.merge(tiny)
    double_merge_refused = False
except InvalidArgumentError as err:
    double_merge_refused = True
    print(f"InvalidArgumentError: {err}")
lora.unmerge(tiny)
y_unmerged_again = logits(tiny, x_tiny)
print("after unmerge: merged =", tiny.h[0].attn.q_proj.merged,
      f" max |output - unmerged output| = {np.abs(y_unmerged_again - y_unmerged).max():.1e}")

# %% [markdown]
# For serving, `merge_and_unload` merges and then puts plain `Linear` layers back where the LoRA
# layers were: the model is a base-shaped model again, with the same outputs.

# %%
lora.merge_and_unload(tiny)
y_unloaded = logits(tiny, x_tiny)
print("LoRA layers left:", len(lora.lora_layers(tiny)), "  q_proj is now",
      type(tiny.h[0].attn.q_proj).__name__,
      f"  max |output - unmerged output| = {np.abs(y_unloaded - y_unmerged).max():.1e}")


# %% [markdown]
# ## 3. One base, two adapters
#
# The point of keeping adapters separate: one frozen base serves many tasks, and switching task
# means switching a few small matrices. These are the tasks of `minilora finetune` and the demo.
# We train a small GPT on addition (task A, `add`: `47+85=132.`), store it in 4 bits as QLoRA
# does, and train two adapters on it: "nocarry" learns task B, each place added on its own with
# every carry forgotten (`47+85=022.`), and "digitmax" learns task C, the larger digit in each
# place (`47+85=087.`). All three ask the same question and write a 3-digit answer.
#
# The CLI's default is 3-digit operands; we use 2 so that the base trains in seconds on a laptop
# (3 digits need several times the steps).

# %%
tasks = {name: data.TaskDataset(data.get_task(name, digits=2), n_heldout=500)  # same held out
         for name in ("add", "nocarry", "digitmax")}
for name, ds in tasks.items():
    print(f"{name:8s} {''.join(ds.task.example(47, 85)):11s} {ds.task.description}")

config = ml.GPTConfig(vocab_size=tasks["add"].tokenizer.vocab_size,
                      block_size=max(ds.block_size for ds in tasks.values()),
                      n_layer=2, n_head=4, n_embd=64 if FAST else 128)
ml.manual_seed(0)
base = ml.GPT(config)
base_steps = 120 if FAST else 300
train.train(base, tasks["add"], train.TrainConfig(
    steps=base_steps, batch_size=64 if FAST else 256, lr=3e-3, warmup=20, min_lr=3e-4,
    eval_every=base_steps, eval_examples=500), progress=False)
float_state = base.state_dict()  # quantizing is deterministic: this rebuilds the same 4-bit base


def quantized_base():
    """A fresh copy of the trained base with every Linear in NF4 + double quantization."""
    model = ml.GPT(config)
    model.load_state_dict(float_state)
    return quant.quantize_model(model, blocksize=64, quant_type="nf4", double_quant=True)


base = quantized_base()
x_probe = tasks["nocarry"].heldout(8)[0]  # 8 held-out prompts, to compare outputs
y_probe_base = logits(base, x_probe)

# %% [markdown]
# `inject_lora` adds the first adapter active and trainable. A second one is added *inactive and
# frozen* (PEFT's rule); `set_adapter` makes it the one that runs and trains.

# %%
adapter_config = lora.LoraConfig(r=8, alpha=16, target_modules=(
    "q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"))
adapter_steps = 50 if FAST else 500
adapter_train = train.TrainConfig(steps=adapter_steps, batch_size=64, lr=5e-3, warmup=10,
                                  min_lr=5e-4, weight_decay=0.0, eval_every=adapter_steps,
                                  eval_examples=500, seed=SEED)
ml.manual_seed(1 + SEED)  # both adapters' random A matrices
lora.inject_lora(base, adapter_config, adapter_name="nocarry")
lora.inject_lora(base, adapter_config, adapter_name="digitmax")
print("active:", lora.active_adapters(base), " ", lora.trainable_parameters_summary(base))
train.train(base, tasks["nocarry"], adapter_train, progress=False)
lora.set_adapter(base, "digitmax")
print("active:", lora.active_adapters(base), " ", lora.trainable_parameters_summary(base))
train.train(base, tasks["digitmax"], adapter_train, progress=False)

# %% [markdown]
# Now every combination: the base with its adapters switched off (`disable_adapters`), and each
# adapter, on each task. Switching is `set_adapter(model, name)`: no weights are copied.

# %%
def score(model, task):
    """Held-out exact match and validation loss of ``model`` on ``task``."""
    ds = tasks[task]
    return train.exact_match(model, ds), train.validation_loss(model, ds, batch_size=250)


rows = ["adapters off", "nocarry", "digitmax"]
accuracy = np.zeros((3, 3))
val_loss = np.zeros((3, 3))
with lora.disable_adapters(base):
    y_probe_disabled = logits(base, x_probe)
    for j, task in enumerate(tasks):
        accuracy[0, j], val_loss[0, j] = score(base, task)
for i, adapter in enumerate(rows[1:], start=1):
    lora.set_adapter(base, adapter)
    for j, task in enumerate(tasks):
        accuracy[i, j], val_loss[i, j] = score(base, task)

# All three tasks ask the same question, so a model answers its own task whatever it is asked,
# and is right on another task exactly where the two tasks' answers agree. The share of the 500
# held-out questions (the same for every task) on which they do:
does = ["add", "nocarry", "digitmax"]  # what each row's model was trained to answer
answers = {name: ds.heldout()[1] for name, ds in tasks.items()}  # (500, 4) token ids
agree = np.array([[np.mean((answers[r] == answers[t]).all(axis=1)) for t in tasks] for r in does])
print("held-out accuracy, and in brackets the share on which the row's own task agrees:")
print(f"{'':14s}" + "".join(f"{'task ' + t:>18s}" for t in tasks))
for i, row in enumerate(rows):
    print(f"{row:14s}" + "".join(f"{accuracy[i, j]:>10.1%} ({agree[i, j]:5.1%})"
                                 for j in range(3)))

fig, axes = plt.subplots(1, 2, figsize=(8.8, 4), sharey=True)
panels = ((accuracy, "held-out exact match\n(grey: share where the answers agree)", "{:.0%}",
           accuracy),
          (val_loss, "validation loss (darker = lower)", "{:.3f}", -np.log(val_loss)))
for ax, (values, title, fmt, shade) in zip(axes, panels):
    ax.imshow(shade, cmap="Blues")
    middle = (shade.min() + shade.max()) / 2
    for i in range(3):
        for j in range(3):
            dark = shade[i, j] > middle
            below = values is accuracy and i != j
            ax.text(j, i - (0.12 if below else 0), fmt.format(values[i, j]), ha="center",
                    va="center", fontsize=11, color="white" if dark else "black")
            if below:
                ax.text(j, i + 0.22, f"agree {agree[i, j]:.0%}", ha="center", va="center",
                        fontsize=9, color="0.85" if dark else "0.4")
    ax.set_xticks(range(3), [f"task {c}\n{t}" for c, t in zip("ABC", tasks)])
    ax.set_title(title, fontsize=10)
axes[0].set_yticks(range(3), ["adapters off", "adapter\nnocarry", "adapter\ndigitmax"])
fig.suptitle("one 4-bit base, two adapters: each answers its own task")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each adapter is right on its own task, and on the others right exactly where their answers
# agree with its own. With adapters off the model adds: asked task B it is right on every sum
# without a carry, about $0.55^2 \approx 30\%$ of all questions (each place carries unless its
# digits sum to 9 or less, which 55 of the 100 digit pairs do), and the "nocarry" adapter, asked
# task A, is right on the same questions. The larger digit equals the digits' sum, carry-free,
# only when the other digit is 0 (19 of the 100 pairs), so "digitmax" agrees with the other two
# on about $0.19^2 \approx 3.6\%$ of questions. The validation losses say the same without the
# luck of the draw: each task's loss is lowest under its own adapter.
#
# The adapters' random $A$ and their batches come from `SEED` (the base is always the same,
# trained from seed 0). `python benchmarks/notebook_seeds.py 05 --seeds 0 1 2` reran this notebook
# with seeds 0, 1 and 2: both adapters reached 100% held-out exact match on their own tasks every
# time, and every other cell equalled the share where the answers agree exactly (largest gap 0).
#
# Some answers side by side, one prompt for all three tasks:

# %%
tok = tasks["add"].tokenizer


def answer(model, prompt, answer_len):
    """The greedy answer of ``model`` to one prompt string."""
    out = model.generate(tok.encode(prompt)[None, :], answer_len, temperature=0.0)
    return tok.decode(host(out)[0, len(prompt):])


print(f"{'prompt':8s}  {'wanted: A':>9s} {'B':>5s} {'C':>5s}   {'adapters off':>12s} "
      f"{'nocarry':>8s} {'digitmax':>8s}")
for a, b in ((47, 85), (90, 12), (5, 61), (38, 50)):
    prompt = tasks["add"].task.example(a, b)[0]  # the same prompt for every task
    wanted = [tasks[t].task.example(a, b)[1] for t in tasks]
    n = len(wanted[0])
    with lora.disable_adapters(base):
        got = [answer(base, prompt, n)]
    for adapter in rows[1:]:
        lora.set_adapter(base, adapter)
        got.append(answer(base, prompt, n))
    print(f"{prompt:8s}  {wanted[0]:>9s} {wanted[1]:>5s} {wanted[2]:>5s}   {got[0]:>12s} "
          f"{got[1]:>8s} {got[2]:>8s}")

# %% [markdown]
# ## 4. Switching off gives back the base, exactly
#
# Inside `with disable_adapters(model):` every LoRA layer returns its base layer's output, so the
# logits equal those the base produced before any adapter existed, bit for bit.

# %%
disabled_difference = float(np.abs(y_probe_disabled - y_probe_base).max())
print("max |adapters off - base before injection| =", disabled_difference)

# %% [markdown]
# ## 5. Combining adapters
#
# `add_weighted_adapter` makes a new adapter whose update is a weighted sum
# $\Delta = \sum_i w_i\, s_i B_i A_i$. With **"cat"** the factors are stacked,
#
# $$A = \begin{bmatrix} w_1 s_1 A_1 \\ w_2 s_2 A_2 \end{bmatrix},\quad B = [B_1\ B_2],\quad
# BA = w_1 s_1 B_1 A_1 + w_2 s_2 B_2 A_2,$$
#
# exact, at rank $r_1 + r_2$. With **"svd"** the sum is formed and only its top $k$ singular
# directions are kept: the best rank-$k$ approximation (Eckart-Young), whose error is the norm of
# the dropped singular values, $\|\Delta - \Delta_k\|_F = \sqrt{\sum_{i > k} \sigma_i^2}$.
# (Whether the *sum of two skills* is a useful model is another question; here we check the
# arithmetic.)

# %%
weights = [1.0, 0.5]
lora.add_weighted_adapter(base, ["nocarry", "digitmax"], weights, "both", combination_type="cat")
layers = lora.lora_layers(base)
exact = {p: weights[0] * host(m.delta_weight("nocarry")).astype(np.float64)
         + weights[1] * host(m.delta_weight("digitmax")).astype(np.float64) for p, m in layers}
cat_error = max(float(np.abs(host(m.delta_weight("both")) - exact[p]).max()
                      / np.abs(exact[p]).max()) for p, m in layers)
print(f"'cat': rank {layers[0][1].r['both']}, largest relative difference from "
      f"1.0 * delta_nocarry + 0.5 * delta_digitmax: {cat_error:.1e}")

total = np.sqrt(sum((d ** 2).sum() for d in exact.values()))
singular = {p: np.linalg.svd(d, compute_uv=False) for p, d in exact.items()}
ranks = list(range(1, 17))
svd_error, eckart_young = [], []
for k in ranks:
    lora.add_weighted_adapter(base, ["nocarry", "digitmax"], weights, f"svd{k}",
                              combination_type="svd", svd_rank=k)
    err2 = sum(((host(m.delta_weight(f"svd{k}")) - exact[p]) ** 2).sum() for p, m in layers)
    svd_error.append(float(np.sqrt(err2) / total))
    eckart_young.append(float(np.sqrt(sum((s[k:] ** 2).sum() for s in singular.values()))
                              / total))
    lora.delete_adapter(base, f"svd{k}")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.semilogy(ranks, np.maximum(svd_error, 1e-9), "o-", label="'svd' adapter, measured")
ax.semilogy(ranks, np.maximum(eckart_young, 1e-9), "k:", lw=2,
            label="norm of the dropped singular values")
ax.axvline(8, color="0.7", lw=1)
ax.text(8.3, 1e-4, "rank of each\ninput adapter", fontsize=9, color="0.4")
ax.set_xlabel("rank k of the combined adapter")
ax.set_ylabel("relative error  ||delta_k - delta|| / ||delta||")
ax.set_title(f"delta_nocarry + 0.5 delta_digitmax at rank k ({len(layers)} layers)")
ax.legend(loc="lower left")
fig.tight_layout()
plt.show()
print("relative error by rank:", ", ".join(f"{k}: {e:.2g}" for k, e in zip(ranks, svd_error)))

# %% [markdown]
# The sum of two rank-8 updates has rank at most 16, so "svd" at rank 16 is exact up to float32
# rounding, and every lower rank loses exactly the singular values it drops.
#
# ## 6. An adapter is a small file
#
# `save_adapter` writes what PEFT writes: `adapter_config.json` and
# `adapter_model.safetensors` holding $A$ (r, in) and $B$ (out, r) per layer, nothing of the
# base. Per layer that is $r(n + k)$ numbers against the base's $nk$. Loading it into a fresh
# copy of the base reproduces the adapted model exactly.

# %%
lora.set_adapter(base, "nocarry")
y_probe_nocarry = logits(base, x_probe)
adapter_numbers = sum(p.size for p in lora.adapter_state_dict(base, "nocarry").values())
base_report = quant.memory_report(quantized_base())

workdir = tempfile.TemporaryDirectory()  # its name is machine-specific: never printed
adapter_dir = os.path.join(workdir.name, "nocarry")
paths = lora.save_adapter(base, adapter_dir, adapter_name="nocarry")
sizes = {os.path.basename(p): os.path.getsize(p) for p in paths.values()}
fresh = lora.load_adapter(quantized_base(), adapter_dir, adapter_name="nocarry")
loaded_difference = float(np.abs(logits(fresh, x_probe) - y_probe_nocarry).max())

for name, size in sizes.items():
    print(f"{name:28s} {size / 1024:7.1f} KiB")
print(f"the adapter: {adapter_numbers:,} float32 numbers = {4 * adapter_numbers / 1024:.1f} KiB")
print(f"the base: {base_report['float32']['total_bytes'] / 1024:.0f} KiB in float32, "
      f"{base_report['held_bytes'] / 1024:.0f} KiB as held in 4 bits")
print("loaded adapter vs trained adapter, max |logit difference| =", loaded_difference)

fig, ax = plt.subplots(figsize=(7, 2.4))
bars = {"base, float32": base_report["float32"]["total_bytes"],
        "base, NF4 + DQ": base_report["held_bytes"],
        "adapter file": sizes["adapter_model.safetensors"]}
ax.barh(list(bars), [v / 1024 for v in bars.values()], color=["0.6", "tab:blue", "tab:orange"])
for i, v in enumerate(bars.values()):
    ax.text(v / 1024, i, f" {v / 1024:.0f} KiB", va="center")
ax.set_xlim(0, 1.2 * max(bars.values()) / 1024)
ax.set_xlabel("KiB")
ax.invert_yaxis()
ax.set_title("what has to be stored")
fig.tight_layout()
plt.show()

# %% [markdown]
# In this toy the adapter is a sizeable fraction of the base, because the base is tiny and every
# projection is adapted. For GPT-3 with $r = 8$ on $W_q$ and $W_v$ it is 37.7M numbers next to
# 175B, about 0.02%; and one base can serve every task's file.
#
# ## 7. Merging into a 4-bit base
#
# A 4-bit base cannot simply add $sBA$: its weights live on the NF4 grid. Merging means
# dequantize, add, quantize again,
#
# $$Q' = \mathrm{quant}\big(\mathrm{deq}(Q) + sBA\big),$$
#
# and the result snaps back to the grid. A change smaller than half the gap between neighbouring
# codes (times the block's absmax) leaves the code where it was: **small updates vanish**. If a
# block's absmax moves, every weight in the block is re-rounded, touched by the update or not.
#
# To see it, take the "nocarry" update of one layer and scale it from far smaller to far larger than
# what training produced, merging each into the 4-bit layer and, for comparison, into a float32
# copy of the dequantized layer. `merge_into_quantized` reports the share of the update that
# arrived, $\langle W' - W, \Delta\rangle / \|\Delta\|^2$, and the fraction of codes unchanged.

# %%
layer = base.h[0].mlp.fc  # a LoRALinear on a 4-bit QuantLinear base, (4C, C)
qlinear = layer.base_layer
delta_b = layer.delta_weight("nocarry")
half_step = float(host(qlinear.quant_state.dequantized_absmax()).mean()) * \
    quant.max_half_gap("nf4")
update_rms = float(np.sqrt((host(delta_b) ** 2).mean()))
print(f"the trained update of h.0.mlp.fc: RMS {update_rms:.4f}, "
      f"largest {float(np.abs(host(delta_b)).max()):.4f}")
print(f"half the widest NF4 gap times the mean block absmax: {half_step:.4f}")

factors = np.logspace(-3, 1.5, 10 if FAST else 28)
sweep = {"codes unchanged (4-bit)": [], "update retained (4-bit)": [],
         "update retained (float32)": []}
for c in factors:
    _, report_q = quant.merge_into_quantized(qlinear, c * delta_b)
    _, report_f = quant.merge_into_float(qlinear, c * delta_b)
    sweep["codes unchanged (4-bit)"].append(report_q["frac_codes_unchanged"])
    sweep["update retained (4-bit)"].append(report_q["delta_retained"])
    sweep["update retained (float32)"].append(report_f["delta_retained"])

fig, ax = plt.subplots(figsize=(7.5, 3.8))
styles = {"codes unchanged (4-bit)": ("tab:red", "o-"),
          "update retained (4-bit)": ("tab:blue", "s-"),
          "update retained (float32)": ("0.3", "--")}
for name, values in sweep.items():
    color, style = styles[name]
    ax.semilogx(factors, values, style, color=color, ms=4, label=name)
ax.axvline(1.0, color="tab:green", lw=1)
ax.text(1.15, 0.5, "as trained", color="tab:green", fontsize=9)
ax.set_xlabel("scale c of the merged update c * s B A  (1 = the trained adapter)")
ax.set_ylabel("fraction")
ax.set_ylim(-0.05, 1.1)
ax.set_title("merging into a 4-bit layer: small updates vanish")
ax.legend(fontsize=9, loc="center left")
fig.tight_layout()
plt.show()

# %% [markdown]
# Now the whole model: the "nocarry" adapter merged into the 4-bit base, against merged into a
# float32 copy of the dequantized base (exact, but at 32 bits per weight again), against not
# merged at all (the adapter on top of the 4-bit base, as it was trained).

# %%
def dequantized(model):
    """``model`` with every 4-bit layer replaced by a float32 Linear of its dequantized weight."""
    for path, module in list(model.named_modules()):
        if isinstance(module, quant.QuantLinear):
            model.set_submodule(path, module.to_linear())
    return model


results = {}
for kind in ("not merged", "merged into 4-bit", "merged into float32"):
    model = quantized_base()
    if kind == "merged into float32":
        model = dequantized(model)
    lora.load_adapter(model, adapter_dir, adapter_name="nocarry")
    reports = lora.merge(model) if kind != "not merged" else {}
    results[kind] = {"accuracy": train.exact_match(model, tasks["nocarry"]),
                     "val_loss": train.validation_loss(model, tasks["nocarry"], batch_size=250),
                     "logits": logits(model, x_probe), "reports": reports}
workdir.cleanup()

reference = results["not merged"]["logits"]
print(f"{'':22s}{'task B exact match':>20s}{'val loss':>10s}{'max |logit change|':>20s}")
for kind, r in results.items():
    r["change"] = float(np.abs(r["logits"] - reference).max())
    print(f"{kind:22s}{r['accuracy']:>20.1%}{r['val_loss']:>10.4f}{r['change']:>20.2e}")
merge_reports = results["merged into 4-bit"]["reports"]
retained = np.array([rep["delta_retained"] for rep in merge_reports.values()])
unchanged = np.array([rep["frac_codes_unchanged"] for rep in merge_reports.values()])
rel_error = np.array([rep["relative_error"] for rep in merge_reports.values()])
print(f"4-bit merge, mean over {len(merge_reports)} layers: update retained {retained.mean():.3f}, "
      f"codes unchanged {unchanged.mean():.1%}, ||error|| / ||update|| {rel_error.mean():.2f}")

# %% [markdown]
# Where the trained adapter sits on the curve above decides what a 4-bit merge costs. Here the
# RMS of its update is a little under twice half a grid step (both printed above; 1.6 to 1.8
# times over seeds 0 to 2), so nearly all of it arrives, but most codes move and re-rounding adds
# an error of roughly a sixth of the update's size: the logits change visibly while the answers
# do not (task B stayed at 100% for every seed). A gentler fine-tune (lower learning rate, fewer
# steps) would sit further left, where updates start to vanish. Merging into a float32 copy is
# exact but gives up the memory saving; keeping the adapter unmerged on the 4-bit base is exact
# too and costs two skinny matmuls per layer. Whichever you choose, measure it, as above.
#
# ## 8. Out to PyTorch and back
#
# minilora's GPT is GPT-2's math, so a model and its adapter can leave as the files Hugging Face
# transformers and PEFT read (written with NumPy and safetensors; no torch needed). Two things
# are stored differently there: HF's `Conv1D` layers keep $W$ as (in, out), and q, k, v are one
# fused `c_attn` of shape (C, 3C). An adapter on separate q and v becomes one *exact* LoRA on
# `c_attn`, with the $A$'s stacked, $B$ block-structured and the ranks added:
#
# $$\Delta W_{qkv} = \begin{bmatrix} s B_q A_q \\ 0 \\ s B_v A_v \end{bmatrix}
#   = s \begin{bmatrix} B_q & 0 \\ 0 & 0 \\ 0 & B_v \end{bmatrix}
#       \begin{bmatrix} A_q \\ A_v \end{bmatrix}.$$
#
# `gpt_to_hf` writes the base, `export_peft` the adapter; `gpt_from_hf` and `import_peft` read
# them back (splitting $B$'s rows again), here into a fresh model.

# %%
hub_dir = tempfile.TemporaryDirectory()  # machine-specific name: never printed
base_path, adapter_path = (os.path.join(hub_dir.name, n) for n in ("gpt2", "gpt2-lora"))
ml.manual_seed(0)
small = ml.GPT(tiny_config)
interop.gpt_to_hf(small, base_path)  # config.json + model.safetensors
lora.inject_lora(small, tiny_lora)  # q_proj, v_proj and fc, r = 4
randomize_b(small, "default", 0.2)
y_small = logits(small, x_tiny)
interop.export_peft(small, adapter_path)  # adapter_config.json + adapter_model.safetensors

with open(os.path.join(adapter_path, "adapter_config.json")) as f:
    peft_config = json.load(f)
print({k: peft_config[k] for k in ("target_modules", "r", "lora_alpha", "rank_pattern",
                                   "alpha_pattern", "fan_in_fan_out")})
exported = load_file(os.path.join(adapter_path, "adapter_model.safetensors"))
for key, value in exported.items():
    if ".h.0." in key:
        print(f"{key:62s} {value.shape}")

again = interop.import_peft(interop.gpt_from_hf(base_path), adapter_path)
round_trip_difference = float(np.abs(logits(again, x_tiny) - y_small).max())
print("ranks after the round trip:", {p: m.r["default"] for p, m in lora.lora_layers(again)
                                     if p.startswith("h.0.")})
print("max |logit difference| after the round trip:", round_trip_difference)
lora.merge_and_unload(small)
lora.merge_and_unload(again)
merged_difference = max(float(np.abs(host(a) - host(again.state_dict()[k])).max())
                        for k, a in small.state_dict().items())
print("max |merged weight difference|:", merged_difference)

# %% [markdown]
# With PyTorch, transformers and PEFT installed, the same two directories load there and give the
# same logits (skipped without them, and in the fast mode the tests run this notebook in).

# %%
def torch_logits(base_path, adapter_path, idx):
    """Logits of the two directories loaded in transformers + PEFT; None without them."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    base = transformers.GPT2LMHeadModel.from_pretrained(base_path)
    model = peft.PeftModel.from_pretrained(base, adapter_path).eval()
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


with contextlib.redirect_stderr(io.StringIO()):  # their progress bars and notices: not the story
    y_torch = None if FAST else torch_logits(base_path, adapter_path, x_tiny)
torch_difference = None if y_torch is None else float(np.abs(y_torch - y_small).max())
print("transformers + PEFT against minilora, max |logit difference| =", torch_difference)
hub_dir.cleanup()

# %% [markdown]
# ## What must stay true
#
# These checks fail if the story above stops being true. The accuracy thresholds leave a margin
# below what seeds 0, 1 and 2 measured (100% for each model on its own task, no gap at all
# between the other cells and the shares where the answers agree, no change from the 4-bit
# merge); the test suite's fast mode trains too briefly for accuracies, so there only the
# validation losses are compared.

# %%
# merging is exact up to rounding; a second merge is refused; unmerge restores the outputs
assert merge_error["float64"] < 1e-12 and merge_error["float32"] < 1e-4, merge_error
assert double_merge_refused
assert np.abs(y_unmerged_again - y_unmerged).max() < 1e-12
assert not lora.lora_layers(tiny) and np.abs(y_unloaded - y_unmerged).max() < 1e-12
# switching adapters off gives the base bit for bit; each adapter is best at its own task and,
# on the others, right where their answers agree with its own
add_on_a, nocarry_on_b, digitmax_on_c = np.diag(accuracy)
off_diagonal_gap = float(np.abs(accuracy - agree)[~np.eye(3, dtype=bool)].max())
merge_4bit_change = results["merged into 4-bit"]["accuracy"] - results["not merged"]["accuracy"]
assert disabled_difference == 0.0
assert val_loss[1, 1] < min(val_loss[0, 1], val_loss[2, 1]) - 0.1, val_loss
assert val_loss[2, 2] < min(val_loss[0, 2], val_loss[1, 2]) - 0.1, val_loss
assert val_loss[0, 0] < val_loss[1, 0] and val_loss[0, 0] < val_loss[2, 0], val_loss
if not FAST:  # accuracies need the full-length runs
    assert add_on_a > 0.97 and nocarry_on_b > 0.97 and digitmax_on_c > 0.97, accuracy
    assert off_diagonal_gap < 0.03, (accuracy, agree)
# "cat" is the weighted sum exactly; "svd" at rank k loses exactly the dropped singular values
assert cat_error < 1e-5, cat_error
assert svd_error[-1] < 1e-5 and svd_error[0] > 0.1, svd_error
assert np.allclose(svd_error, eckart_young, atol=1e-5), (svd_error, eckart_young)
assert all(a >= b - 1e-7 for a, b in zip(svd_error, svd_error[1:]))
# the adapter file holds r (n + k) float32 numbers per layer and loads back exactly
assert 4 * adapter_numbers < sizes["adapter_model.safetensors"] < 4 * adapter_numbers + 8192
assert sizes["adapter_model.safetensors"] < 0.5 * base_report["float32"]["total_bytes"]
assert loaded_difference == 0.0
# merging into 4 bits: tiny updates vanish, large ones arrive; a float32 merge keeps all of it
codes_unchanged, kept_4bit, kept_float = (np.array(v) for v in sweep.values())
assert codes_unchanged[0] > 0.95 and kept_4bit[0] < 0.5, (codes_unchanged[0], kept_4bit[0])
assert kept_4bit[-1] > 0.9 and codes_unchanged[-1] < 0.2, (kept_4bit[-1], codes_unchanged[-1])
assert np.abs(kept_float - 1).max() < 1e-3, kept_float
assert results["merged into float32"]["change"] < 1e-3
assert results["merged into 4-bit"]["change"] > 100 * results["merged into float32"]["change"]
assert rel_error.mean() > 0.05, rel_error
if not FAST:
    assert abs(merge_4bit_change) < 0.02, merge_4bit_change
# out to HF GPT-2 + PEFT files and back: c_attn holds q and v at rank 8, the outputs are the same
assert exported["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 8)
assert round_trip_difference < 1e-6 and merged_difference < 1e-6
assert torch_difference is None or torch_difference < 1e-4, torch_difference
print("all checks passed")
