# Source of tutorials/04_quantization.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 04 · Quantization and QLoRA
#
# LoRA makes the *trainable* part of a fine-tune tiny, but the frozen base still has to sit in
# memory, and in float32 it costs 32 bits per weight. QLoRA (Dettmers et al. 2023) stores the
# frozen base in **4 bits** and trains float LoRA adapters on top of it. Three ideas make that
# work, and this notebook rebuilds each from `minilora/quant.py`:
#
# 1. **NF4**, a 4-bit code whose 16 values are quantiles of the normal distribution, so Gaussian
#    weights use every code about equally often;
# 2. **blockwise absmax scaling**: every block of 64 weights gets its own float32 scale;
# 3. **double quantization**: the scales themselves are quantized to 8 bits, which takes the cost
#    from 4.5 to 4.127 bits per weight.
#
# Then we train a LoRA adapter on top of a 4-bit base and compare it with the float one.

# %%
import os
from statistics import NormalDist

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora import data, lora, quant, train
from minilora.fast.cpu import set_blas_threads

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
# the adapters' seed (their init and batch order): 0 here; benchmarks/notebook_seeds.py reruns
# the notebook with others
SEED = int(os.environ.get("MINILORA_SEED", "0"))
set_blas_threads(1)  # these matrices are small: a second BLAS thread only waits for a core
ml.manual_seed(0)
host = ml.backend.to_numpy  # library arrays (NumPy or CuPy) -> NumPy, for printing and plots

# %% [markdown]
# ## 1. NF4: sixteen quantiles of a normal distribution
#
# Pretrained weights are roughly Gaussian. After dividing a block by its largest magnitude they
# lie in $[-1, 1]$, bunched around zero. An evenly spaced grid (INT4) wastes codes in the sparse
# tails; a *quantile* grid puts equally many weights between neighbouring codes. NF4 takes the
# quantiles $\Phi^{-1}(p)$ of $N(0, 1)$ at evenly spaced probabilities, 8 on the positive side
# and 7 on the negative side, plus an exact zero (so padding and zero weights survive), then
# divides by the largest one:
#
# $$q^{+}_i = \Phi^{-1}\big(p_i\big),\ p_i \in \mathrm{linspace}(\delta, \tfrac12, 9)_{0..7},
# \qquad q^{-}_j = -\Phi^{-1}\big(p_j\big),\ p_j \in \mathrm{linspace}(\delta, \tfrac12,
# 8)_{0..6},\qquad \mathrm{NF4} = \frac{\{q^{-}, 0, q^{+}\}}{\max q^{+}}.$$
#
# The end probability $\delta = 0.9677083$ is the mean of $1 - \tfrac{1}{32}$ and
# $1 - \tfrac{1}{30}$: $\Phi^{-1}(1)$ would be infinite, so the extreme code is the quantile that
# sits half a bin inside the tail.

# %%
inv_cdf = NormalDist().inv_cdf
delta = 0.9677083
positive = [inv_cdf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
negative = [-inv_cdf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
levels = np.sort(np.array(positive + [0.0] + negative))
nf4_rebuilt = levels / levels.max()

table = quant.NF4_CODE
rebuild_error = float(np.abs(nf4_rebuilt - table).max())
print(f"delta = {delta} = mean(1 - 1/32, 1 - 1/30) = {((1 - 1/32) + (1 - 1/30)) / 2:.7f}")
print(" code   rebuilt        table (QLoRA / bitsandbytes)")
for i, (a, b) in enumerate(zip(nf4_rebuilt, table)):
    print(f"{i:5d}  {a:+.10f}  {b:+.10f}")
print(f"largest difference: {rebuild_error:.1e} (float32 rounding of the table)")

# %% [markdown]
# The picture shows why. The grey histogram is what a quantizer actually sees: Gaussian weights
# divided by the absmax of their block of 64. Each row marks one code's 16 values. INT4 spaces
# them evenly ($k/7$); FP4 (a tiny float, E2M1) packs them near zero and leaves a big gap at the
# top; NF4 follows the mass of the distribution.

# %%
rng = np.random.default_rng(0)
blocks = rng.standard_normal((2000 if FAST else 20000, 64)).astype(np.float32)
normalized = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()
codes = {"NF4": quant.NF4_CODE, "FP4": quant.FP4_CODE, "INT4": quant.INT4_CODE}
colors = {"NF4": "tab:blue", "FP4": "tab:orange", "INT4": "tab:green"}

fig, axes = plt.subplots(3, 1, figsize=(8, 5.5), sharex=True)
for ax, (name, values) in zip(axes, codes.items()):
    ax.hist(normalized, bins=120, density=True, color="0.8")
    for v in np.unique(values):
        ax.axvline(v, color=colors[name], lw=1.4)
    ax.set_ylabel("density")
    ax.set_title(f"{name}: {len(np.unique(values))} distinct values", fontsize=10, loc="left")
axes[-1].set_xlabel("weight / absmax of its block of 64")
fig.suptitle("the 16 code values over the weights they must represent")
fig.tight_layout()
plt.show()

# %% [markdown]
# FP4 has only 15 distinct values (a $+0$ and a $-0$) and INT4 15 as well (symmetric $k/7$ for
# $k = -7 \dots 7$; code 0 is never produced). NF4 uses all 16.
# The spikes at $\pm 1$ are each block's largest weight, which by construction lands exactly on a
# code.
#
# ## 2. Blockwise absmax quantization, on a tiny example
#
# Flatten the tensor row-major, cut it into blocks of $b$ elements, and for block $j$:
#
# $$s_j = \max_{i \in j} |w_i|, \qquad c_i = \arg\min_k \big|\,\mathrm{code}_k - w_i / s_j\big|,
# \qquad \hat w_i = \mathrm{code}_{c_i} \, s_j .$$
#
# One outlier only spoils its own block, which is why blocks are small (64 by default). Here are
# 20 weights in blocks of 16 (the smallest block size allowed), so the second block holds 4.

# %%
w_tiny = np.round(rng.standard_normal((4, 5)), 2).astype(np.float32)
bs_tiny = 16
flat = w_tiny.ravel()
block_of = np.arange(flat.size) // bs_tiny
absmax_tiny = np.array([np.abs(flat[block_of == j]).max() for j in range(block_of.max() + 1)])
scaled = flat / absmax_tiny[block_of]
codes_by_hand = np.abs(scaled[:, None] - quant.NF4_CODE[None, :]).argmin(axis=1)  # (20, 16)
dequant_by_hand = quant.NF4_CODE[codes_by_hand] * absmax_tiny[block_of]

state_tiny = quant.quantize(w_tiny, blocksize=bs_tiny, quant_type="nf4")
print(state_tiny)
print("absmax per block:", absmax_tiny, " library:", host(state_tiny.absmax))
print("  i  block  w        w/absmax  code  w_hat")
for i in range(8):
    print(f"{i:3d}  {block_of[i]:5d}  {flat[i]:+.2f}    {scaled[i]:+.3f}   {codes_by_hand[i]:4d}"
          f"  {dequant_by_hand[i]:+.3f}")
print("...")
codes_tiny = host(state_tiny.codes())
print("codes match the library:", bool((codes_tiny == codes_by_hand).all()))

# %% [markdown]
# Two 4-bit codes share one byte, and the **first element goes in the high nibble**:
# $\text{byte}_k = c_{2k} \cdot 16 + c_{2k+1}$. That order is bitsandbytes', so its packed bytes
# can be read here directly. 20 codes take 10 bytes.

# %%
packed = host(state_tiny.packed)
for k in range(4):
    c_hi, c_lo = codes_tiny[2 * k], codes_tiny[2 * k + 1]
    print(f"byte {k}: 0x{packed[k]:02x} = {packed[k]:08b}  high nibble {packed[k] >> 4:2d} "
          f"(element {2 * k}, code {c_hi:2d})  low nibble {packed[k] & 15:2d} "
          f"(element {2 * k + 1}, code {c_lo:2d})")
print(f"{flat.size} weights -> {packed.size} bytes of codes + {state_tiny.absmax.size} float32 "
      f"scales")
nibbles_ok = bool(((packed >> 4) == codes_tiny[0::2]).all() and
                  ((packed & 15) == codes_tiny[1::2]).all())

# %% [markdown]
# ## 3. How much does each code lose on Gaussian weights?
#
# Quantize a random Gaussian matrix with each code (blocks of 64) and look at the errors
# $w - \hat w$. The right panel shows how often each of the 16 codes is used: the closer to
# uniform, the more of the 4 bits' information capacity is put to work (the entropy of the code
# usage, at most 4 bits).

# %%
n_side = 256 if FAST else 1024
W = rng.standard_normal((n_side, n_side)).astype(np.float32)
errors, stats, usage = {}, {}, {}
for name in codes:
    state = quant.quantize(W, blocksize=64, quant_type=name.lower())
    errors[name] = (W - host(quant.dequantize(state))).ravel()
    stats[name] = quant.error_stats(W, state)
    usage[name] = np.bincount(host(state.codes()), minlength=16) / W.size
    p = usage[name][usage[name] > 0]
    stats[name]["entropy"] = float(-(p * np.log2(p)).sum())

print(f"randn({n_side}, {n_side}), blocksize 64")
print("code   mean |err|   mean rel err   max |err|   code-usage entropy (bits)")
for name, s in stats.items():
    print(f"{name:5s}  {s['mean_abs_error']:.4f}       {s['mean_rel_error']:.3f}          "
          f"{s['max_abs_error']:.3f}       {s['entropy']:.3f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
bins = np.linspace(-0.45, 0.45, 121)
for name, err in errors.items():
    ax1.hist(err, bins=bins, histtype="step", lw=1.5, color=colors[name],
             label=f"{name}: mean |err| {stats[name]['mean_abs_error']:.4f}")
ax1.set_yscale("log")
ax1.set_xlabel("w - dequant(quant(w))")
ax1.set_ylabel("count")
ax1.set_title("quantization error (tails clipped at ±0.45)")
ax1.legend(fontsize=9)
width = 0.27
for k, name in enumerate(codes):
    order = np.argsort(codes[name], kind="stable")  # show the codes from -1 to +1
    ax2.bar(np.arange(16) + (k - 1) * width, usage[name][order], width, color=colors[name],
            label=f"{name} ({stats[name]['entropy']:.2f} bits)")
ax2.axhline(1 / 16, color="k", ls=":", lw=1)
ax2.set_ylim(0, 1.25 * max(u.max() for u in usage.values()))  # room for the legend
ax2.set_xlabel("code, sorted by value (-1 ... +1)")
ax2.set_ylabel("fraction of weights")
ax2.set_title("how often each code is used (dotted: uniform)")
ax2.legend(fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# NF4 has the smallest average error (the QLoRA paper's point, and bitsandbytes' measured
# 0.0728 against FP4's 0.0965 on a 1024 x 1024 matrix) and spreads its codes almost evenly.
# Its *largest* error is bigger than INT4's, though: its widest gap is the one between $-1$ and
# $-0.696$, out in the tail where few weights live. NF4 trades a worse rare case for a better
# common one.
#
# ## 4. Bits per weight: 4.5, and 4.127 with double quantization
#
# Each block of 64 stores 64 four-bit codes and one float32 absmax:
# $4 + 32/64 = 4.5$ bits per weight. The absmax values are many (one per 64 weights) and
# all positive, so QLoRA quantizes *them* too: subtract their mean, then quantize blocks of 256
# of them to 8 bits (with one float32 scale per block of 256):
#
# $$4 + \frac{8}{64} + \frac{32}{64 \cdot 256} = 4.126953125 \text{ bits per weight.}$$

# %%
bits_plain = quant.bits_per_parameter(blocksize=64)
bits_dq = quant.bits_per_parameter(blocksize=64, double_quant=True)
state_plain = quant.quantize(W, blocksize=64, quant_type="nf4")
state_dq = quant.quantize(W, blocksize=64, quant_type="nf4", double_quant=True)
print(f"formula: {bits_plain} bits, with double quantization {bits_dq} bits")
for label, s in (("plain", state_plain), ("double", state_dq)):
    err = quant.error_stats(W, s)["mean_abs_error"]
    print(f"{label:7s} {s.nbytes:>9,d} bytes for {s.numel:,d} weights = "
          f"{s.bits_per_parameter():.6f} bits  (mean |err| {err:.5f})")
scales = host(state_plain.absmax)
scales_dq = host(state_dq.dequantized_absmax())
scale_error = np.abs(scales_dq / scales - 1).max()
print(f"8-bit absmax: largest relative error of a block scale {scale_error:.2e}")

# %% [markdown]
# The extra error from double quantization is tiny: the 8-bit scales are within about one percent
# of the float32 ones. The bytes held by the state match the formula, plus 32 bits per tensor for
# the float32 mean that was subtracted.
#
# What this means for a whole model: `quant.memory_report` counts the linear layers' weights at
# each storage and everything else (embeddings, LayerNorms, biases) at the float32 bytes it
# holds, since QLoRA quantizes only the linear layers. The model below has GPT-2 small's shapes.

# %%
if FAST:  # same layout, narrower, so the test run does not build 124M parameters
    big_config = ml.GPTConfig.gpt2(n_layer=2, n_embd=256, n_head=4, vocab_size=5000,
                                   block_size=256)
else:
    big_config = ml.GPTConfig.gpt2()
big = ml.GPT(big_config)
report = quant.memory_report(big)
del big
print(quant.format_memory_report(report))

MiB = 2 ** 20
names = {"float32": "float32", "nf4": "NF4", "nf4_dq": "NF4 + DQ"}
fig, ax = plt.subplots(figsize=(7, 3.8))
weights_mib = [report[k]["weight_bytes"] / MiB for k in names]
other_mib = report["other_bytes"] / MiB
ax.bar(list(names.values()), weights_mib, color="tab:blue", label="linear weights")
ax.bar(list(names.values()), [other_mib] * 3, bottom=weights_mib, color="0.7",
       label="embeddings, LayerNorms, biases (float32)")
for i, k in enumerate(names):
    ax.text(i, report[k]["total_bytes"] / MiB, f"{report[k]['total_bytes'] / MiB:.1f} MiB\n"
            f"weights {report[k]['weight_bits_per_param']:.3f} bits", ha="center", va="bottom",
            fontsize=9)
ax.set_ylabel("MiB")
ax.set_ylim(0, 1.3 * report["float32"]["total_bytes"] / MiB)
ax.set_title(f"memory of a GPT with {report['params'] / 1e6:.1f}M parameters")
ax.legend(fontsize=9, loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# The linear weights shrink by $32 / 4.127 = 7.75\times$. What is left is mostly the token
# embedding, which QLoRA keeps in 16 or 32 bits.
#
# ## 5. QLoRA: LoRA on top of a 4-bit base
#
# A 4-bit layer computes $y = x\,\mathrm{deq}(Q)^{\top} + b$: it dequantizes its weight for one
# matmul and drops it again. Its backward pass sends $g\,\mathrm{deq}(Q)$ to the input and
# nothing to the (frozen) weight. LoRA's $A$ and $B$ stay float32 and train as before:
#
# $$y = x\,\mathrm{deq}(Q)^{\top} + b + s\,(x A^{\top}) B^{\top}.$$
#
# The experiment, with the tasks of `minilora finetune` and notebook 03: train a small GPT on
# addition (task A, `add`: `47+85=132.`), make two copies of it, one float32 and one quantized to
# NF4 with double quantization, give both the same LoRA adapter and train them on task B,
# `nocarry`: the same question, each place added on its own and every carry forgotten
# (`47+85=022.`).
#
# The CLI's default is 3-digit operands; we use 2 so that the base trains in seconds on a laptop
# (3 digits need several times the steps). A base that adds perfectly already gets task B right
# on every question whose sum has no carry: each place carries unless its two digits sum to 9 or
# less, which 55 of the 100 digit pairs do, so that is $0.55^2 \approx 30\%$ of the questions.
# The rest is what the adapter must learn.

# %%
task_a = data.TaskDataset(data.get_task("add", digits=2), n_heldout=500)
task_b = data.TaskDataset(data.get_task("nocarry", digits=2), n_heldout=500)  # same held out
print("task A:", "".join(task_a.task.example(47, 85)), "  task B:",
      "".join(task_b.task.example(47, 85)))
no_carry_share = float(np.mean([all(int(x) + int(y) <= 9 for x, y in zip(f"{a:02d}", f"{b:02d}"))
                                for a in range(100) for b in range(100)]))
# what a perfect adder scores on task B: the held-out questions (the same 500 for both tasks)
# whose two answers agree, i.e. whose sum has no carry
no_carry_heldout = float(np.mean((task_a.heldout()[1] == task_b.heldout()[1]).all(axis=1)))

config = ml.GPTConfig(vocab_size=task_a.tokenizer.vocab_size, block_size=task_a.block_size,
                      n_layer=2, n_head=4, n_embd=64 if FAST else 128)
ml.manual_seed(0)
base = ml.GPT(config)
base_steps = 150 if FAST else 300
history_base = train.train(base, task_a, train.TrainConfig(
    steps=base_steps, batch_size=64 if FAST else 256, lr=3e-3, warmup=20, min_lr=3e-4,
    eval_every=base_steps, eval_examples=500), progress=False)
acc_base_a = history_base["eval"][-1]["accuracy"]
acc_base_b = train.exact_match(base, task_b)
print(f"base after {base_steps} steps: task A {acc_base_a:.1%} held-out exact match, "
      f"task B {acc_base_b:.1%}")
print(f"sums with no carry: {no_carry_heldout:.1%} of the held-out questions, "
      f"{no_carry_share:.2%} of all 10,000")

# %% [markdown]
# Quantize a copy. `quantize_model` replaces every `nn.Linear` by a `QuantLinear` (the head is
# tied to the embedding and stays float). The memory report of this small model shows what it now
# holds, and the quantized base still does task A about as well as the float one.

# %%
qbase = ml.GPT(config)
qbase.load_state_dict(base.state_dict())
quant.quantize_model(qbase, blocksize=64, quant_type="nf4", double_quant=True)
print(qbase.h[0].attn.q_proj)
small_report = quant.memory_report(qbase)
print(quant.format_memory_report(small_report))
acc_qbase_a = train.exact_match(qbase, task_a)
print(f"task A: float base {acc_base_a:.1%}, NF4 base {acc_qbase_a:.1%}")

# %% [markdown]
# Now the same adapter on both: rank 8 on every projection of both blocks, the same seed, the
# same batches, the same schedule.
#
# One run is one draw of the adapters' random $A$ and of the batches (`SEED` above; the base is
# always the same, trained from seed 0). `python benchmarks/notebook_seeds.py 04 --seeds 0 1 2`
# reran this notebook with seeds 0, 1 and 2: LoRA and QLoRA reached 100% held-out exact match on
# task B every time, with held-out losses of 0.0048 to 0.0051 (LoRA) and 0.0049 to 0.0051
# (QLoRA); the base model scored 100% on task A, float or NF4, and 33.2% on task B.

# %%
lora_config = lora.LoraConfig(r=8, alpha=16, target_modules=(
    "q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"))
lora_steps = 60 if FAST else 600
lora_train = train.TrainConfig(steps=lora_steps, batch_size=64, lr=5e-3, warmup=10,
                               min_lr=5e-4, weight_decay=0.0, eval_every=lora_steps,
                               eval_examples=500, seed=SEED)  # the same batches for both
runs = {}
for name, model in (("LoRA (float32 base)", base), ("QLoRA (NF4 base)", qbase)):
    ml.manual_seed(1 + SEED)  # the same A init for both
    lora.inject_lora(model, lora_config)
    print(f"{name:20s}", lora.trainable_parameters_summary(model))
    history = train.train(model, task_b, lora_train, progress=False)
    runs[name] = {"loss": history["loss"], "accuracy": history["eval"][-1]["accuracy"],
                  "val_loss": train.validation_loss(model, task_b, batch_size=250)}

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
for (name, run), color in zip(runs.items(), ("tab:gray", "tab:blue")):
    smooth = np.convolve(run["loss"], np.ones(10) / 10, mode="valid")
    ax1.plot(np.arange(10, len(run["loss"]) + 1), smooth, color=color, label=name)
ax1.set_yscale("log")
ax1.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
ax1.yaxis.set_minor_formatter(plt.NullFormatter())
ax1.set_xlabel("step")
ax1.set_ylabel("training loss (mean of 10)")
ax1.set_title("task B: adapter training")
ax1.legend()
labels = ["base\n(no adapter)"] + [n.split(" (")[0] for n in runs]
accs = [acc_base_b] + [r["accuracy"] for r in runs.values()]
ax2.bar(labels, accs, color=["0.8", "tab:gray", "tab:blue"])
for i, a in enumerate(accs):
    ax2.text(i, a + 0.01, f"{a:.1%}", ha="center", va="bottom")
ax2.axhline(no_carry_heldout, xmin=0.02, xmax=0.31, color="k", ls=":", lw=1.2)
ax2.set_ylim(0, 1.1)
ax2.set_ylabel("held-out exact match")
ax2.set_title("task B accuracy (dotted: sums with no carry)", fontsize=10)
fig.tight_layout()
plt.show()
for name, run in runs.items():
    print(f"{name:20s} task B exact match {run['accuracy']:.1%}, val loss {run['val_loss']:.4f}")

# %% [markdown]
# The adapter learns task B on the 4-bit base as well as on the float one: the small rounding of
# the frozen weights is something the adapter can absorb. That is QLoRA's claim, at a 7.75x
# smaller footprint for the frozen linear layers. The base's 33% on task B is no skill of its own:
# it adds, and an added answer is also the carry-free one exactly when nothing carries, which is
# true of 33.2% of these 500 held-out questions (30.25% of all 10,000, the $0.55^2$ above).
#
# ## What must stay true
#
# These checks fail if the story above stops being true. The thresholds leave a margin below
# what seeds 0, 1 and 2 measured (100% for both adapters, 100% for the base on task A); the
# test suite's fast mode trains too briefly for accuracies, so there only the losses are checked.

# %%
# the NF4 table is the normal-quantile construction, up to float32 rounding
assert rebuild_error < 1e-6, rebuild_error
assert np.abs(quant.normal_float_code() - quant.NF4_CODE).max() < 1e-6
assert len(np.unique(quant.NF4_CODE)) == 16 and quant.NF4_CODE[7] == 0.0
# the tiny example: by-hand codes and absmax equal the library's; first element in the high nibble
assert (codes_tiny == codes_by_hand).all() and np.allclose(host(state_tiny.absmax), absmax_tiny)
assert nibbles_ok and packed.size == (flat.size + 1) // 2
# NF4 beats FP4 and INT4 on Gaussian weights, with margin, and near the published 0.0728
nf4_err = stats["NF4"]["mean_abs_error"]
assert nf4_err < 0.9 * stats["FP4"]["mean_abs_error"], stats
assert nf4_err < 0.9 * stats["INT4"]["mean_abs_error"], stats
assert abs(nf4_err - 0.0728) < 0.002 and abs(stats["FP4"]["mean_abs_error"] - 0.0965) < 0.003
assert stats["NF4"]["entropy"] > stats["INT4"]["entropy"] + 0.1, stats
# exact bits per parameter, and the bytes a state holds equal the formula
assert bits_plain == 4.5 and bits_dq == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
assert state_plain.nbytes * 8 == bits_plain * W.size
assert state_dq.nbytes * 8 == bits_dq * W.size + 32  # + the float32 mean of the absmax values
assert report["nf4_dq"]["total_bytes"] < report["nf4"]["total_bytes"] < \
    report["float32"]["total_bytes"]
assert small_report["held_bytes"] == small_report["nf4_dq"]["total_bytes"]
# quantizing the trained base barely changes task A; QLoRA keeps up with float LoRA on task B
lora_acc, qlora_acc = (r["accuracy"] for r in runs.values())
lora_val, qlora_val = (r["val_loss"] for r in runs.values())
qlora_loss = runs["QLoRA (NF4 base)"]["loss"]
assert np.mean(qlora_loss[-10:]) < 0.6 * np.mean(qlora_loss[:5]), qlora_loss[:5]
assert qlora_val < lora_val + 0.25, (lora_val, qlora_val)
if not FAST:  # accuracies need the full-length runs
    assert acc_base_a > 0.9 and acc_qbase_a > acc_base_a - 0.05, (acc_base_a, acc_qbase_a)
    # the base adds: it gets task B right on the sums with no carry, and on little else
    assert abs(acc_base_b - no_carry_heldout) < 0.03, (acc_base_b, no_carry_heldout)
    assert lora_acc > 0.97 and qlora_acc > 0.97, (lora_acc, qlora_acc)
    assert abs(qlora_acc - lora_acc) < 0.03, (lora_acc, qlora_acc)
print("all checks passed")
