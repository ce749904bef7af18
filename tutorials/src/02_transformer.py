# Source of tutorials/02_transformer.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 02 · The transformer
#
# LoRA adapts a *pretrained* model, so first we need one. This notebook builds and trains the
# GPT of `minilora/gpt.py` (GPT-2's math, nanoGPT's layout) on a task small enough to learn in
# seconds: two-digit addition, written as characters.
#
# 1. the path of a batch through one block, shape by shape, and attention done by hand;
# 2. the causal mask, and a check that the model cannot see the future;
# 3. the loss of an untrained model, $\ln V$, and a short training run;
# 4. what the trained model attends to;
# 5. greedy and sampled generation, and the KV cache that makes generation cheap.

# %%
import os

# The models here are tiny: their matmuls gain nothing from a second BLAS thread, and on a busy
# machine an extra thread that loses its core makes the others wait. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora import backend as B
from minilora import data, train
from minilora.attention import causal_mask

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
# the seed of the training batches: 0 here; benchmarks/notebook_seeds.py reruns with others
SEED = int(os.environ.get("MINILORA_SEED", "0"))
ml.manual_seed(0)

# %% [markdown]
# ## 0. The task and its tokens
#
# Every question is `a+b=` with two zero-padded digits per operand; the answer is the sum with
# three digits and an end mark `.`. One character is one token, from a vocabulary of $V = 16$
# characters shared by all the tasks of this project. The model sees the whole example shifted
# by one (inputs `x`, targets `y`); targets over the prompt are $-100$, so only the answer is
# scored.

# %%
task = data.get_task("add", digits=2)
tok = data.task_tokenizer()
dataset = data.TaskDataset(task, n_heldout=500)
V = tok.vocab_size

prompt, answer = task.example(47, 85)
print(f"vocabulary ({V} tokens): {data.TASK_VOCAB!r}")
print(f"one example: {prompt!r} -> {answer!r}")
x_demo, y_demo = dataset.get_batch(2, np.random.default_rng(0))
print("x[0] =", x_demo[0], " ->", repr(tok.decode(x_demo[0])))
print("y[0] =", y_demo[0])
print(f"{dataset.num_train} training questions, {dataset.n_heldout} held out")

# %% [markdown]
# ## 1. One block, shape by shape
#
# With batch $B$, sequence length $T$ and $C$ channels, a GPT-2 block is pre-LN:
#
# $$x \leftarrow x + \mathrm{attn}(\mathrm{LN}_1(x)), \qquad
#   x \leftarrow x + \mathrm{mlp}(\mathrm{LN}_2(x)).$$
#
# Attention projects to queries, keys and values, splits the $C$ channels into $n_h$ heads of
# $h_s = C / n_h$, and in each head mixes the values by
#
# $$P = \mathrm{softmax}\Big(\frac{q k^\top}{\sqrt{h_s}} + M\Big), \qquad y = P v,$$
#
# where $M$ is the causal mask of the next section. Below we do exactly that by hand with NumPy
# on the arrays of the model's own layers and check it against the library's attention (its fused
# fast form, `minilora/fast/attention.py`, unless `MINILORA_REFERENCE=1` selects the plain one).

# %%
n_embd = 64
config = ml.GPTConfig(vocab_size=V, block_size=dataset.block_size, n_layer=2, n_head=4,
                      n_embd=n_embd)
model = ml.GPT(config)
print(config)
print(f"{model.num_parameters():,d} parameters")


def show(name, a):
    print(f"{name:<34s} {str(tuple(a.shape)):>16s}")


def attention_by_hand(attn, h):
    """Causal self-attention of module ``attn`` on h (B, T, C), in NumPy: returns (y, P)."""
    Bsz, T, C = h.shape
    nh = attn.n_head
    hs = C // nh
    q, k, v = (proj(ml.Tensor(h)).numpy() for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k, v = (a.reshape(Bsz, T, nh, hs).transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, nh, T, hs)
    mask = np.triu(np.full((T, T), -np.inf, dtype=h.dtype), k=1)  # (T, T)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs) + mask  # (B, nh, T, T)
    P = np.exp(scores - scores.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    y = (P @ v).transpose(0, 2, 1, 3).reshape(Bsz, T, C)  # (B, nh, T, hs) -> (B, T, C)
    return attn.o_proj(ml.Tensor(y)).numpy(), P


with ml.no_grad():
    idx = x_demo  # (B, T) token ids
    Bsz, T = idx.shape
    show("idx", idx)
    x = model.wte(idx) + model.wpe(np.arange(T))  # (B, T, C) + (T, C)
    show("token + position embedding", x)
    block = model.h[0]
    h = block.ln_1(x)
    show("ln_1(x)", h)
    q = block.attn.q_proj(h).numpy()
    show("q = q_proj(ln_1(x))", q)
    nh, hs = block.attn.n_head, n_embd // block.attn.n_head
    show(f"q split into {nh} heads of {hs}", q.reshape(Bsz, T, nh, hs).transpose(0, 2, 1, 3))
    y_hand, P_hand = attention_by_hand(block.attn, h.numpy())
    show("scores / attention weights P", P_hand)
    y_lib = block.attn(h).numpy()
    show("attn(ln_1(x)), heads merged", y_lib)
    out = block(x)
    show("block output", out)
    logits = model(idx)
    show("logits (after 2 blocks, ln_f, head)", logits)

attn_gap = float(np.abs(y_hand - y_lib).max())
print(f"\nmax |attention by hand - library| = {attn_gap:.2e}")

# %% [markdown]
# ## 2. The causal mask
#
# A language model predicts token $t+1$ from tokens $0..t$, so position $t$ must not look at
# later positions. The additive mask $M$ has $0$ on and below the diagonal and $-\infty$ above:
# after the softmax those weights are exactly zero. Rows are queries, columns keys.

# %%
M = B.to_numpy(causal_mask(T, np.float32))  # a host copy: matplotlib draws host arrays
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
ax1.imshow(np.isfinite(M), cmap="Greens", vmin=0, vmax=1.3)
for i in range(T):
    for j in range(T):
        ax1.text(j, i, "0" if np.isfinite(M[i, j]) else "-inf", ha="center", va="center",
                 fontsize=6.5, color="black" if np.isfinite(M[i, j]) else "gray")
ax1.set_title("mask M: query may see key (green)")
ax2.imshow(P_hand[0, 0], cmap="viridis", vmin=0)
ax2.set_title("untrained model, layer 0 head 0: P")
for ax in (ax1, ax2):
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
plt.tight_layout()
plt.show()

# %% [markdown]
# The mask is only a claim until we test it: change the *last* input token and every earlier
# position's logits must stay exactly the same, while the last one's change.

# %%
with ml.no_grad():
    changed = idx.copy()
    changed[:, -1] = (changed[:, -1] + 1) % V  # another token at the last position
    before, after = model(idx).numpy(), model(changed).numpy()
earlier_same = bool(np.array_equal(before[:, :-1], after[:, :-1]))
last_moved = float(np.abs(before[:, -1] - after[:, -1]).max())
print(f"earlier positions bit-identical: {earlier_same};  last position moved by {last_moved:.2e}")

# %% [markdown]
# ## 3. Loss at initialisation, then training
#
# GPT-2's init draws every weight from $\mathcal N(0, 0.02^2)$, so the logits start close to
# zero and the predicted distribution is close to uniform over the $V$ tokens. The cross-entropy
# of a uniform guess is $-\ln(1/V) = \ln V$: for $V = 16$, $\ln 16 \approx 2.77$. A loss far from
# that at step 0 means a bug in the init or the loss.
#
# It comes out a little *above* $\ln V$, and the tied head says why: logits are
# $\mathrm{LN}_f(x)\, W_{te}^\top$, and at init $x$ is mostly the input token's own embedding, so
# each position gives its *input* token a higher logit than the rest: a slightly confident, wrong
# guess costs more than a uniform one.

# %%
with ml.no_grad():
    xb, yb = dataset.get_batch(256, np.random.default_rng(1))
    _, loss0 = model(xb, yb)
loss_init = loss0.item()
with ml.no_grad():
    logits0 = model(xb).numpy()  # (B, T, V)
own = np.take_along_axis(logits0, xb[..., None], axis=-1).mean()
print(f"loss at init {loss_init:.4f}   ln V = {math.log(V):.4f}")
print(f"mean logit of each position's own input token {own:.3f}, of all tokens "
      f"{logits0.mean():.3f}")

# %% [markdown]
# Now a short run of `minilora.train.train`: AdamW, a linear warmup then a cosine decay of the
# learning rate, gradient clipping at 1. Every few steps it measures *exact match* on held-out
# questions (questions never seen in training): the greedy answer must be right in every
# character.

# %%
steps = 300 if FAST else 1200
cfg = train.TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup=20, min_lr=3e-4,
                        eval_every=steps // 6, eval_examples=200 if FAST else 500, seed=SEED)
history = train.train(model, dataset, cfg, progress=False)
accuracy = train.exact_match(model, dataset)  # all 500 held-out questions
print(f"{steps} steps in {history['seconds']:.1f} s; final loss {history['loss'][-1]:.4f}")
print(f"held-out exact match: {accuracy:.1%}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(history["step"], history["loss"], lw=0.8)
ax1.axhline(math.log(V), color="gray", ls="--", label=r"$\ln V$ (uniform guess)")
ax1.set_yscale("log")
ax1.set_xlabel("step")
ax1.set_ylabel("cross-entropy on the answer")
ax1.set_title("training loss")
ax1.legend()
ax2.plot([e["step"] for e in history["eval"]], [e["accuracy"] for e in history["eval"]], "o-")
ax2.set_ylim(0, 1.02)
ax2.set_xlabel("step")
ax2.set_ylabel("exact match")
ax2.set_title("held-out accuracy (greedy answers)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. What the trained model looks at
#
# We recompute the attention weights $P$ of every head on one held-out question, feeding each
# block the residual stream of the one before. To write the first answer digit (the row of `=`),
# some heads must gather both operands; later answer digits look back at the digits they depend
# on and at what was already written. (The hand-made attention is checked against the library's
# again on the trained weights.) Below the dotted line are the rows that predict answer
# characters: the row of `=` writes the first digit.

# %%
question = dataset.heldout_ids[:1]
seq = task.encode(question)  # (1, seq_len)
inputs = seq[:, :-1]  # (1, T)
labels = list(tok.decode(inputs[0]))
maps = []
with ml.no_grad():
    x = model.wte(inputs) + model.wpe(np.arange(inputs.shape[1]))  # (1, T, C)
    for block in model.h:
        h = block.ln_1(x)
        y_hand, P = attention_by_hand(block.attn, h.numpy())
        trained_gap = float(np.abs(y_hand - block.attn(h).numpy()).max())
        maps.append(P[0])  # (nh, T, T)
        x = block(x)

fig, axes = plt.subplots(config.n_layer, config.n_head, figsize=(2.4 * config.n_head,
                                                                 2.5 * config.n_layer))
for layer, P in enumerate(maps):
    for head in range(config.n_head):
        ax = axes[layer, head]
        ax.imshow(P[head], cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.axhline(task.prompt_len - 1.5, color="white", lw=0.6, ls=":")  # prompt | answer
        ax.axvline(task.prompt_len - 1.5, color="white", lw=0.6, ls=":")
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
fig.suptitle(f"attention weights on {tok.decode(seq[0])!r} (rows: query, columns: key)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Generation
#
# `model.generate` appends one token at a time. *Greedy* decoding ($T_{\text{temp}} = 0$) takes
# the most likely token; *sampling* draws from $\mathrm{softmax}(z / T_{\text{temp}})$, which
# sharpens ($T_{\text{temp}} < 1$) or flattens ($> 1$) the model's distribution. A `seed` makes a
# sample repeatable.

# %%
prompts, answers = dataset.heldout(8)
greedy = model.generate(prompts, task.answer_len, temperature=0.0)
for row, truth in zip(B.to_numpy(greedy), answers):
    text = tok.decode(row)
    mark = "ok" if text[task.prompt_len:] == tok.decode(truth) else "WRONG"
    print(f"{text[:task.prompt_len]} {text[task.prompt_len:]}   {mark}")

one = np.repeat(prompts[:1], 400 if FAST else 2000, axis=0)  # one question, many samples
temperatures = [0.0, 0.5, 1.0, 1.5, 2.5]
right = []
for temp in temperatures:
    sampled = B.to_numpy(model.generate(one, task.answer_len, temperature=temp, seed=0))
    right.append(float((sampled[:, task.prompt_len:] == answers[:1]).all(axis=1).mean()))
again = B.to_numpy(model.generate(one[:16], task.answer_len, temperature=1.0, seed=7))
same_seed = bool(np.array_equal(again,
                                B.to_numpy(model.generate(one[:16], task.answer_len,
                                                          temperature=1.0, seed=7))))
print("\nsamples at temperature 1.0, seed 7:",
      sorted({tok.decode(r[task.prompt_len:]) for r in again}))
print("same seed, same samples:", same_seed)

fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.bar(["0 (greedy)"] + [str(t) for t in temperatures[1:]], right, color="#4c72b0")
ax.set_ylim(0, 1.02)
ax.set_xlabel("sampling temperature")
ax.set_ylabel("fraction of samples correct")
ax.set_title(f"{len(one)} samples of {tok.decode(prompts[0])!r}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The KV cache
#
# Without a cache, each new token reruns the whole prefix: $O(T^2)$ work to generate $T$ tokens.
# With it, each layer keeps the keys and values of the positions already seen, and a step only
# computes the newest token's $q, k, v$ and attends to the stored ones. Causality is what makes
# this legal: earlier positions never change when a token is appended, as section 2 checked. So
# cached and uncached generation must agree token for token.

# %%
prompts_all, _ = dataset.heldout(200 if FAST else 500)
cached, logits_c = model.generate(prompts_all, task.answer_len, temperature=0.0, use_cache=True,
                                  return_logits=True)
plain, logits_p = model.generate(prompts_all, task.answer_len, temperature=0.0, use_cache=False,
                                 return_logits=True)
cache_same_tokens = bool(np.array_equal(B.to_numpy(cached), B.to_numpy(plain)))
cache_logit_gap = float(np.abs(B.to_numpy(logits_c) - B.to_numpy(logits_p)).max())
print(f"{len(prompts_all)} prompts: identical tokens {cache_same_tokens}, "
      f"max logit difference {cache_logit_gap:.1e}")

# %% [markdown]
# ## What must stay true
#
# These checks fail if the story above stops being true. The accuracy thresholds were measured
# (fast mode about 80%, full mode 100%) and set with a wide margin: with the training batches
# drawn from seeds 0, 1 and 2 (`python benchmarks/notebook_seeds.py 02 --seeds 0 1 2 --show
# accuracy`) the full-size run reached 100% held-out exact match every time.

# %%
assert attn_gap < 1e-5 and trained_gap < 1e-5, (attn_gap, trained_gap)
assert abs(loss_init - math.log(V)) < 0.1, loss_init
assert earlier_same and last_moved > 0, (earlier_same, last_moved)
assert history["loss"][-1] < 0.3 * loss_init, history["loss"][-1]
assert accuracy > (0.5 if FAST else 0.9), accuracy
assert right[1] > right[-1], right  # a colder sampler is right more often
assert same_seed
assert cache_same_tokens and cache_logit_gap < 1e-4, cache_logit_gap
print("all checks passed")
