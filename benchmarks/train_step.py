"""One training step of a GPT, minilora against PyTorch: full fine-tuning, LoRA and QLoRA.

    python benchmarks/train_step.py --quick --mode lora    # seconds: a tiny model, two rounds
    python benchmarks/train_step.py                         # --mode full --size reference
    python benchmarks/train_step.py --mode all              # full, lora and qlora in turn
    python benchmarks/train_step.py --mode qlora --size gpt2-small --batch 4 --rounds 3

Modes: each one run builds both frameworks from the same weights (PyTorch's are copied from
minilora's; LoRA's A too, B starts at zero on both sides) and trains them on the same batch.

* ``full``: every parameter trains. minilora's GPT against the same GPT in PyTorch eager (SDPA
  attention, tanh GELU, tied head), AdamW on both.
* ``lora``: LoRA r=8, alpha=16 on q_proj and v_proj (``ml.lora.inject_lora``), AdamW over the
  adapters, against PyTorch + PEFT (``peft.get_peft_model``, the same LoraConfig, no dropout).
* ``qlora``: the same adapters on a 4-bit base, NF4 with blocksize 64 and double quantization
  (``ml.quant.quantize_model``; the tied head stays float32), against bitsandbytes'
  ``Linear4bit`` (nf4, compress_statistics=True) on the CPU + PEFT. Should bitsandbytes fail to
  quantize or to run a training step on the CPU, a note says why and only minilora is timed.

Sizes: ``reference`` (4 layers, 4 heads, n_embd 256, block 128, vocab 64, batch 16; the default)
and ``gpt2-small`` (12 layers, 12 heads, n_embd 768, block 256, vocab 50257, tied head, batch 4;
slow on 2 cores: few rounds). ``--quick``: a tiny model (2 layers, n_embd 128, block 64, batch 4),
2 rounds of 1 step, no memory part (``--memory`` adds it).

Two steps, each timed for both frameworks:

* ``loop``: what ``minilora.train.train`` runs each step: ``step.forward_backward`` with the
  batch in ``--shards`` shards (default: the loop's, 2 on the CPU, 1 for GPT-2 small) on as many
  threads with a
  one-thread OpenBLAS each, the loss and the global gradient norm read together, clipping to
  norm 1 folded into ``AdamW.step(grad_scale=...)``; AdamW as the loop builds it (weight decay
  0.1 on matrices only, betas (0.9, 0.99)). PyTorch: forward, ``backward``,
  ``clip_grad_norm_(1.0)``, ``AdamW.step``, with the same parameter groups.
* ``plain``: ``loss.backward(); opt.step()``, one shard (minilora's OpenBLAS at its own thread
  count), no clipping, on both sides.

Timing: the steps run in alternating rounds (a few steps of one framework, then of the other,
with a short untimed pause at each switch; who goes first alternates too), so load from other
processes hits both alike. Reported: median ms/step, tokens/s, and the ratio minilora tokens/s /
PyTorch tokens/s (above 1: minilora is faster). On a loaded machine compare one thread each
(``OPENBLAS_NUM_THREADS=1 python benchmarks/train_step.py --threads 1 --shards 1``).

Know the limit (``step_profile.step_matmuls``, whose docstring has the formula): the step's
FLOPs, counted from the shapes (every matmul of forward and backward; weight-gradient matmuls
only for trainable weights; attention's q k^T and P v and their backward, dense), and its
matmul-only time: one shard's matmuls run with ``np.matmul`` on each of the loop's threads at
once, each on a one-thread OpenBLAS (the loop's thread setup: two cores multiplying side by side
run slower than one alone), times shards / threads; on one shard, as the loop runs a large model,
every distinct shape timed on the BLAS's own threads, times its count; timed once in each round,
between the steps' rounds, and the median taken. "x floor" is step time /
matmul-only time: how far each side is from doing nothing but its matmuls at the rate NumPy's
BLAS reaches here.

Memory: each framework in its own child process: one step of a tiny model of the same mode first
(so that code pages and thread pools are in place), then the model and optimizer are built, the
peak resident set size is reset (VmHWM, through /proc/self/clear_refs), and the peak during
three steps is read above the resident size right after the build: activations, gradients and
the optimizer's moments (made at the first step). The children run with a fixed glibc mmap
threshold (MALLOC_MMAP_THRESHOLD_=65536), so every large buffer is mapped when allocated and
returned when freed, and the resident set follows either framework's live arrays.

Breakdown (``step_profile.breakdown``): minilora's loop step on one shard and one thread, timed
by op family (matmul, LoRA adapters, 4-bit dequantize, attention, LayerNorm, GELU,
softmax/cross-entropy, embedding, residual adds, optimizer), each family's forward calls and
backward closures wrapped by a timer; the rest is graph overhead, which includes the timers'
own cost (the table says how many calls were wrapped and what the step takes unwrapped).
Side by side (``step_profile.side_by_side``): the loop's shards run once on one thread, one
after another, and once on the loop's threads, alternating, every family timed on each thread:
each family's time summed over the threads against its time on one thread says how much slower
it runs beside the other thread (matmuls hardly at all; elementwise passes, which share the
cores' caches and memory and take the GIL between NumPy calls, markedly).

Mode full also times KV-cache generation against recomputing the whole context for each token.

Kernels: the header names the kernel table NumPy's OpenBLAS runs (``cpu.blas_core()``) and
``OPENBLAS_CORETYPE``, which overrides OpenBLAS's own choice. On a CPU that runs AVX-512 at full
width (AMD's Zen 5, say) the SkylakeX table multiplies at about twice the Haswell table's rate,
so the same code gives other ratios under the two: compare runs only under the same table
(``env -u OPENBLAS_CORETYPE python benchmarks/train_step.py`` lets OpenBLAS choose). PyTorch's
products go through its own MKL, which the variable does not touch.

Two minilora sources side by side (no PyTorch): ``--against DIR`` times this checkout's training
step against the one of another checkout DIR (say ``git worktree add ../before HEAD~3``), and
``--reference`` against this checkout's own reference forms (``MINILORA_REFERENCE=1``). Each side
runs in its own child process that builds the reference model and batch and times the steps it
is told to; the rounds alternate between the two, as above.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import step_profile as sp  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.fast import checks  # noqa: E402
from minilora.fast.cpu import blas_core, get_blas_threads, keep_freed_memory  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.optim import AdamW, clip_coefficient  # noqa: E402
from minilora.step import default_micro_batches as loop_micro_batches  # noqa: E402
from minilora.step import default_shards, default_threads, forward_backward  # noqa: E402
from minilora.train import TrainConfig, param_groups  # noqa: E402

REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
SIZES = {"reference": REFERENCE,
         "gpt2-small": dict(vocab_size=50257, block_size=256, n_layer=12, n_head=12, n_embd=768)}
QUICK = dict(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=128)
# per size: batch, rounds, steps per framework per round (gpt2-small takes seconds a step)
DEFAULTS = {"reference": (16, 10, 3), "gpt2-small": (4, 3, 1), "quick": (4, 2, 1)}
MODES = ("full", "lora", "qlora")
STEPS = ("loop", "plain")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
QUANT = dict(blocksize=64, quant_type="nf4", double_quant=True)
LOOP = TrainConfig()  # the loop's AdamW settings and clipping: betas, weight decay, grad_clip
LR = 3e-4  # the learning rate does not change a step's cost; a small one keeps losses sane
# OpenBLAS's and PyTorch's worker threads spin for a while after their last job before they sleep;
# a pause between the two frameworks' rounds keeps one's idle pool from slowing the other's start
PAUSE_S = 0.3
# --micro-batches N: the loop step's pieces per shard; None takes the training loop's default for
# the batch's shape (step.default_micro_batches), as ml.train does
MICRO_BATCHES: int | None = None


def micro_batches_of(rows: int, tokens_per_row: int, shards: int) -> int:
    """The loop step's pieces per shard: ``--micro-batches`` when given, else the loop's."""
    return MICRO_BATCHES or loop_micro_batches(rows, tokens_per_row, shards)


# ---------------------------------------------------------------------------------- minilora

def build_minilora(cfg: GPTConfig, mode: str = "full", seed: int = 0) -> tuple[GPT, dict]:
    """minilora's GPT for ``mode`` and its float weights as built (before quantizing or adding
    adapters), which the PyTorch side loads: NF4 + double quant base for qlora (quantize first,
    as QLoRA does), then LoRA r=8 on q_proj and v_proj for lora and qlora."""
    ml.manual_seed(seed)
    model = GPT(cfg)
    weights = {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
    if mode == "qlora":
        ml.quant.quantize_model(model, **QUANT)
    if mode in ("lora", "qlora"):
        ml.lora.inject_lora(model, ml.lora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA,
                                                      target_modules=LORA_TARGETS))
    return model, weights


def minilora_optimizer(model: GPT) -> AdamW:
    """AdamW over the trainable parameters as the training loop builds it (decay on matrices)."""
    return AdamW(param_groups(model, LOOP.weight_decay), lr=LR, betas=LOOP.betas,
                 weight_decay=LOOP.weight_decay)


def minilora_loop_step(model: GPT, opt: AdamW, params: list, x: Any, y: Any,
                       shards: int) -> float:
    """The training loop's step (train.py: ``_loss_and_norm``, then the update): forward and
    backward with the batch in ``shards`` shards of the loop's micro-batches, the loss and
    gradient norm read in one go, clipping folded into AdamW."""
    opt.set_lr(LR)
    micro = micro_batches_of(x.shape[0], x.shape[1], shards)
    with checks.deferred() as pending:
        loss = forward_backward(model, x, y, shards, micro_batches=micro, sync=False)
        # looked up on the module each call, so that the breakdown's timer can stand in for it
        loss, norm = pending.settle(loss, ml.optim.norm_array(params))
    scale = clip_coefficient(norm, LOOP.grad_clip) if LOOP.grad_clip > 0 else 1.0
    opt.step(grad_scale=scale)
    opt.zero_grad()
    return loss


def minilora_plain_step(model: GPT, opt: AdamW, x: Any, y: Any) -> float:
    """``loss.backward(); opt.step()`` on the whole batch: one shard, no clipping."""
    loss = model(x, y)[1]  # the logits are not kept through the backward, as torch_step
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.item())


def minilora_steps(model: GPT, opt: AdamW, x: Any, y: Any, shards: int) -> dict:
    """{"loop": step, "plain": step}, each a function of no arguments returning the loss."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"loop": lambda: minilora_loop_step(model, opt, params, x, y, shards),
            "plain": lambda: minilora_plain_step(model, opt, x, y)}


# ----------------------------------------------------------------------------------- PyTorch

def build_torch(cfg: GPTConfig, weights: dict | None = None):
    """The same GPT in plain PyTorch eager: SDPA attention, tanh GELU, tied head."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as TF

    class Attention(tnn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.q_proj, self.k_proj = tnn.Linear(C, C), tnn.Linear(C, C)
            self.v_proj, self.o_proj = tnn.Linear(C, C), tnn.Linear(C, C)

        def forward(self, x):
            Bsz, T, C = x.shape
            nh = cfg.n_head

            def heads(t):
                return t.view(Bsz, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
            y = TF.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                                heads(self.v_proj(x)), is_causal=True)
            return self.o_proj(y.transpose(1, 2).reshape(Bsz, T, C))  # (B, T, C)

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.attn, self.ln_2 = tnn.LayerNorm(C), Attention(), tnn.LayerNorm(C)
            self.mlp = tnn.ModuleDict(dict(fc=tnn.Linear(C, 4 * C), proj=tnn.Linear(4 * C, C)))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp.proj(TF.gelu(self.mlp.fc(self.ln_2(x)), approximate="tanh"))

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte = tnn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = tnn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = tnn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = tnn.LayerNorm(cfg.n_embd)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1])
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied head
            return TF.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    model = TorchGPT()
    if weights is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model


def quantize_torch(model) -> None:
    """Every ``nn.Linear`` of ``model`` to bitsandbytes' ``Linear4bit`` in place (NF4, blocksize
    64, double quant: compress_statistics), quantized on the CPU from the float weights; the tied
    head is no Linear and stays float, as on minilora's side."""
    import bitsandbytes as bnb
    import torch
    import torch.nn as tnn

    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not tnn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4",
                                             blocksize=QUANT["blocksize"])
            if child.bias is not None:
                layer.bias = tnn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, layer.to("cpu"))  # .to() on the CPU is what quantizes
    # what a transformers model loaded in 4 bits says of itself; PEFT reads it to wrap the
    # layers in its bitsandbytes LoRA class, as in a real QLoRA setup
    model.is_loaded_in_4bit = True


def bnb_report(model) -> dict:
    """What bitsandbytes made of the base: its Linear4bit layers, their settings, and where
    their packed weights live (to show it really ran on the CPU)."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [m.weight.quant_state for m in layers]
    return {"bitsandbytes": bnb.__version__, "layers": len(layers),
            "quantized": all(getattr(m.weight, "bnb_quantized", False) for m in layers),
            "devices": sorted({str(m.weight.device) for m in layers}),
            "weight_dtypes": sorted({str(m.weight.dtype) for m in layers}),
            "quant_types": sorted({s.quant_type for s in states}),
            "blocksizes": sorted({s.blocksize for s in states}),
            "double_quant": all(s.nested for s in states),
            "cuda_available": torch.cuda.is_available()}


def add_peft(model, adapters: dict):
    """PEFT's LoRA (r=8, alpha=16, q_proj and v_proj, no dropout) on ``model``, its A and B set
    to minilora's ``adapters`` ({minilora parameter name: array}) so both start the same."""
    import peft
    import torch

    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0))
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in adapters:
                p.copy_(torch.from_numpy(np.array(adapters[key])))
                copied += 1
    if copied != len(adapters):
        raise RuntimeError(f"PEFT's adapters do not match minilora's: copied {copied} of "
                           f"{len(adapters)}")
    return model


def torch_model(cfg: GPTConfig, mode: str, weights: dict, adapters: dict):
    """The PyTorch side of ``mode``: the GPT with minilora's float weights, bitsandbytes' 4-bit
    base for qlora, PEFT's adapters for lora and qlora. Returns (model, notes)."""
    model = build_torch(cfg, weights)
    notes: dict = {}
    if mode == "qlora":
        quantize_torch(model)
        notes["bnb"] = bnb_report(model)
    if mode in ("lora", "qlora"):
        import peft

        model = add_peft(model, adapters)
        layer = model.base_model.model.h[0].attn.q_proj
        notes["peft"] = f"peft {peft.__version__}, {type(layer).__module__}.{type(layer).__name__}"
    return model, notes


def torch_optimizer(model):
    """torch.optim.AdamW over the trainable parameters, in the training loop's groups."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2],
               "weight_decay": LOOP.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, betas=LOOP.betas,
                             weight_decay=LOOP.weight_decay)


def torch_step(model, opt, x, y, clip: float | None = None) -> float:
    """One PyTorch step: forward, backward, ``clip_grad_norm_`` when ``clip`` is given, AdamW."""
    import torch

    loss = model(x, y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def torch_steps(model, opt, x, y) -> dict:
    """{"loop": step with clipping as the loop's, "plain": step without}."""
    return {"loop": lambda: torch_step(model, opt, x, y, LOOP.grad_clip),
            "plain": lambda: torch_step(model, opt, x, y)}


def torch_label(mode: str) -> str:
    """The PyTorch side's name in the tables."""
    return {"full": "PyTorch eager (SDPA)", "lora": "PyTorch + PEFT",
            "qlora": "PyTorch + bitsandbytes 4-bit + PEFT"}[mode]


# ------------------------------------------------------------------------------------ timing

def make_batch(cfg: GPTConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The one batch every step trains on: (batch, T) token ids and targets."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)),
            rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)))


def time_steps(step: Callable[[], Any], n: int) -> list[float]:
    """Wall seconds of each of ``n`` calls of ``step``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def setup(cfg: GPTConfig, mode: str, batch: int, shards: int | None) -> dict:
    """Both frameworks of ``mode`` built from the same weights, with their steps, first losses
    (no update yet: the two must agree) and one warm-up step of each kind. The PyTorch side is
    None, with a note, when it cannot be built or cannot train (bitsandbytes on this CPU).
    ``shards`` None: the training loop's default for the model (``out["shards"]``)."""
    import torch

    x, y = make_batch(cfg, batch)
    model, weights = build_minilora(cfg, mode)
    shards = default_shards(model) if shards is None else shards
    opt = minilora_optimizer(model)
    with ml.no_grad():
        first = {"minilora": float(model(x, y)[1].item())}
    out = {"model": model, "opt": opt, "x": x, "y": y, "notes": {}, "shards": shards,
           "sides": {"minilora": minilora_steps(model, opt, x, y, shards)},
           "trainable": {"minilora": ml.lora.count_parameters(model)[0]}}
    adapters = {n: p.data for n, p in model.named_parameters() if "lora_" in n}
    try:
        tmodel, out["notes"] = torch_model(cfg, mode, weights, adapters)
        topt = torch_optimizer(tmodel)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        with torch.no_grad():
            first["torch"] = float(tmodel(tx, ty))
        tsteps = torch_steps(tmodel, topt, tx, ty)
        for step in tsteps.values():
            step()  # the warm-up, and the proof that this side can train at all
        out["sides"]["torch"] = tsteps
        out["trainable"]["torch"] = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
        out["torch_model"] = tmodel
    except Exception as exc:  # any failure of the PyTorch side is reported, not raised
        out["notes"]["torch_skipped"] = f"{type(exc).__name__}: {exc}"
    for step in out["sides"]["minilora"].values():
        step()
    out["first_loss"] = first
    return out


def train_speed(sides: dict, rounds: int, per_round: int,
                floor: Callable[[], dict] | None = None) -> tuple[dict, list]:
    """Median seconds per step of every (framework, step) of ``sides``, timed in alternating
    rounds: each round runs ``per_round`` steps of each, the frameworks' order flipping from
    one round to the next, with an untimed pause at each switch. ``floor()`` (the matmul-only
    time, :func:`step_profile.matmul_time`) is measured once a round too, so that the floor and
    the steps see the same machine: on a shared one its speed drifts by tens of percent within
    minutes. Returns the medians and the floors measured."""
    names = list(sides)
    times: dict = {(fw, kind): [] for fw in names for kind in STEPS}
    floors: list = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for kind in STEPS:
            for fw in order:
                time.sleep(PAUSE_S)
                times[(fw, kind)] += time_steps(sides[fw][kind], per_round)
        if floor is not None:
            time.sleep(PAUSE_S)  # PyTorch's idle worker threads spin for a while: let them settle
            floors.append(floor())
    return {f"{fw}/{kind}": statistics.median(t) for (fw, kind), t in times.items()}, floors


def generation_speed(cfg: GPTConfig, prompt_len: int, new_tokens: int, batch: int,
                     rounds: int) -> dict:
    """KV-cache generation against recomputing the context for each token (greedy, minilora)."""
    model, _ = build_minilora(cfg)
    model.eval()
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len))
    cached, uncached = [], []
    same = True
    for _ in range(rounds):
        t0 = time.perf_counter()
        a = model.generate(prompt, new_tokens, temperature=0.0)
        t1 = time.perf_counter()
        b = model.generate(prompt, new_tokens, temperature=0.0, use_cache=False)
        t2 = time.perf_counter()
        cached.append(t1 - t0)
        uncached.append(t2 - t1)
        same &= bool((ml.backend.to_numpy(a) == ml.backend.to_numpy(b)).all())
    n = batch * new_tokens
    c, u = statistics.median(cached), statistics.median(uncached)
    return {"cached_tok_s": n / c, "uncached_tok_s": n / u, "speedup": u / c,
            "same_tokens": same, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "batch": batch}


# ------------------------------------------------------------------ two minilora sources

# A child process's program: build the reference model and batch from whatever minilora its
# PYTHONPATH holds, then time ``n`` training steps each time a line "n" arrives on stdin. It
# imports the step from either layout (minilora.step today, minilora.parallel before).
WORKER = r"""
import json, sys, time
import numpy as np
import minilora as ml
try:
    from minilora.step import forward_backward
except ImportError:
    from minilora.parallel import forward_backward
try:
    from minilora.fast.cpu import keep_freed_memory
except ImportError:
    from minilora.cpu import keep_freed_memory
cfg, batch = json.loads(sys.argv[1]), int(sys.argv[2])
shards = None if sys.argv[3] == "None" else int(sys.argv[3])  # None: the loop's default
keep_freed_memory()
ml.manual_seed(0)
model = ml.GPT(ml.GPTConfig(**cfg))
opt = ml.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
rng = np.random.default_rng(0)
x = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
y = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
def step():
    loss = forward_backward(model, x, y, shards)
    opt.step()
    opt.zero_grad()
    return loss
print(json.dumps({"first_loss": step()}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)
"""


def _worker(root: str, env: dict, cfg: GPTConfig, batch: int, shards: int):
    env = dict(os.environ, PYTHONPATH=root, **env)
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg.to_dict()),
                             str(batch), str(shards)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    first = json.loads(proc.stdout.readline())
    return proc, first["first_loss"]


def _ask(proc, n: int) -> list[float]:
    proc.stdin.write(f"{n}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def sources_speed(cfg: GPTConfig, batch: int, rounds: int, per_round: int, shards: int,
                  sides: list[tuple[str, str, dict]]) -> dict:
    """Median step time of each (label, source root, environment) side, rounds alternating."""
    procs = [(label, *_worker(root, env, cfg, batch, shards)) for label, root, env in sides]
    times: dict[str, list[float]] = {label: [] for label, _, _ in procs}
    try:
        for r in range(rounds):
            order = procs if r % 2 == 0 else procs[::-1]  # who goes first alternates too
            for label, proc, _ in order:
                time.sleep(PAUSE_S)
                times[label] += _ask(proc, per_round)
    finally:
        for _, proc, _ in procs:
            proc.stdin.close()
            proc.wait()
    return {label: {"median_ms": 1e3 * statistics.median(times[label]), "first_loss": loss,
                    "steps": len(times[label])} for label, _, loss in procs}


def print_sources(cfg: GPTConfig, batch: int, rounds: int, per_round: int, shards: int,
                  sides: list[tuple[str, str, dict]]) -> dict:
    """:func:`sources_speed`'s medians as a table, relative to the first side."""
    res = sources_speed(cfg, batch, rounds, per_round, shards, sides)
    first = sides[0][0]
    print("| source | median ms/step | relative to " + first + " | first loss |")
    print("|---|---:|---:|---:|")
    for label, r in res.items():
        print(f"| {label} | {r['median_ms']:.1f} | {r['median_ms'] / res[first]['median_ms']:.3f}"
              f" | {r['first_loss']:.6f} |")
    return res


# ---------------------------------------------------------------------------------- memory

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child_step(framework: str, cfg: GPTConfig, mode: str, kind: str, batch: int,
                shards: int) -> Callable[[], Any]:
    """A fresh model and optimizer of ``framework`` for ``mode`` and its ``kind`` step."""
    x, y = make_batch(cfg, batch)
    model, weights = build_minilora(cfg, mode)
    if framework == "minilora":
        return minilora_steps(model, minilora_optimizer(model), x, y, shards)[kind]
    import torch

    adapters = {n: p.data for n, p in model.named_parameters() if "lora_" in n}
    del model
    tmodel, _ = torch_model(cfg, mode, weights, adapters)
    del weights
    steps = torch_steps(tmodel, torch_optimizer(tmodel), torch.from_numpy(x), torch.from_numpy(y))
    return steps[kind]


def memory_child(framework: str, cfg_json: str, mode: str, kind: str, batch: int,
                 shards: int) -> dict:
    """Run in a fresh process: the peak RSS during three ``kind`` steps above the RSS once the
    model and optimizer are built (after one step of a tiny model, so that code is paged in)."""
    cfg = GPTConfig(**json.loads(cfg_json))
    _child_step(framework, GPTConfig(**QUICK), mode, kind, 2, shards)()
    gc.collect()
    step = _child_step(framework, cfg, mode, kind, batch, shards)
    gc.collect()
    ok = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    for _ in range(3):
        step()
    rise = (_rss_kib("VmHWM") - rss0) / 1024 if ok else None
    return {"framework": framework, "step": kind, "built_rss_mib": rss0 / 1024,
            "rss_peak_rise_mib": rise}


def memory(cfg: GPTConfig, mode: str, batch: int, shards: int, frameworks: list[str]) -> dict:
    """{"<framework>/<step>": memory_child's result, or {"error": ...}} for every step kind."""
    results = {}
    for kind in STEPS:
        for fw in frameworks:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", fw,
                   "--config", json.dumps(cfg.to_dict()), "--mode", mode, "--step", kind,
                   "--batch", str(batch), "--shards", str(shards)]
            if MICRO_BATCHES:
                cmd += ["--micro-batches", str(MICRO_BATCHES)]
            # a fixed mmap threshold stops glibc from keeping freed large buffers in its heap,
            # so the resident set follows the live arrays of either framework
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = res.stdout.strip().splitlines()
            if res.returncode != 0 or not lines:
                err = (res.stderr.strip().splitlines() or ["no output"])[-1]
                results[f"{fw}/{kind}"] = {"error": f"exit {res.returncode}: {err}"}
            else:
                results[f"{fw}/{kind}"] = json.loads(lines[-1])
    return results


# ------------------------------------------------------------------------------------ report

def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_speed(mode: str, times: dict, tokens: int, floor_s: float, shards: int,
                micro: int = 1) -> dict:
    """The speed table (one row per step and framework) and the minilora / PyTorch ratios."""
    threads = min(shards, default_threads(shards))
    blas = f"{get_blas_threads() or '?'}-thread BLAS"
    pieces = f", {micro} micro-batches" if micro > 1 else ""
    if threads == 1:  # one shard, as the loop runs a large model: the BLAS on its own threads
        loop = f"minilora (1 shard{pieces}, {blas})"
    else:
        each = " each" if pieces else ""
        loop = f"minilora ({shards} shards{pieces}{each} on {threads} threads, 1-thread BLAS each)"
    torch_side = f"{torch_label(mode)} (torch threads: {_torch_threads()})"
    label = {"minilora/loop": loop, "minilora/plain": f"minilora (1 shard, {blas})",
             "torch/loop": torch_side, "torch/plain": torch_side}
    print("| step | framework | median ms/step | tokens/s | x floor |\n|---|---|---:|---:|---:|")
    for kind in STEPS:
        for fw in ("minilora", "torch"):
            t = times.get(f"{fw}/{kind}")
            if t is not None:
                print(f"| {kind} | {label[f'{fw}/{kind}']} | {1e3 * t:.1f} | {tokens / t:,.0f} | "
                      f"{t / floor_s:.2f} |")
    ratios = {kind: _ratio(times.get(f"torch/{kind}"), times.get(f"minilora/{kind}"))
              for kind in STEPS}
    shown = {k: "n/a" if r is None else f"{r:.2f}x" for k, r in ratios.items()}
    print(f"minilora / PyTorch tokens/s: loop {shown['loop']}, plain {shown['plain']} (medians "
          f"of alternating rounds; x floor = step time / matmul-only time, the loop's thread "
          f"setup for both steps)")
    return ratios


# issue 15's speed targets: minilora / PyTorch tokens/s, per mode and step
GOALS = {"full": {"loop": 1.15, "plain": 0.95}, "lora": {"loop": 1.3, "plain": 1.0},
         "qlora": {"loop": 1.2}}


def print_ceiling(mode: str, times: dict, floor_s: float) -> dict:
    """What the matmul floor allows, step by step: a minilora step that took only its matmul-only
    time would run PyTorch's time / floor times as fast as PyTorch (the most any step made of
    these products on this BLAS can reach), and a target r asks for a step of that ceiling / r
    times the floor. Returns {step: (ceiling, x floor the target asks, minilora's x floor)}."""
    out, parts = {}, []
    for kind, goal in GOALS.get(mode, {}).items():
        t, m = times.get(f"torch/{kind}"), times.get(f"minilora/{kind}")
        if t is None or m is None:
            continue
        ceiling = t / floor_s
        out[kind] = (ceiling, ceiling / goal, m / floor_s)
        parts.append(f"{kind} at most {ceiling:.2f}x PyTorch (its target {goal}x asks for a step "
                     f"of {ceiling / goal:.2f}x the floor; minilora's is {m / floor_s:.2f}x)")
    if parts:
        print("what the floor allows (a step of its matmuls alone): " + "; ".join(parts))
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_limit(flops: dict, floor: dict) -> None:
    """The step's FLOPs and its matmul-only time (``step_profile``)."""
    fam = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in sorted(flops["by_family"].items(),
                                                               key=lambda kv: -kv[1]))
    together = (f"a shard on each of {floor['threads']} threads at once, "
                if floor["threads"] > 1 else "")
    print(f"the limit: {flops['total'] / 1e9:.3g} GFLOP per step in {flops['matmuls']} matmuls "
          f"(forward {flops['forward'] / 1e9:.3g}, backward {flops['backward'] / 1e9:.3g}; "
          f"{fam}); matmul-only time {1e3 * floor['seconds']:.1f} ms: np.matmul on the "
          f"{floor['shapes']} distinct shapes of a shard, {floor.get('blas_threads', 1)}-thread "
          f"OpenBLAS, {together}x {floor['shards']} "
          f"shards / {floor['threads']} threads = {floor['gflop_s']:.1f} GFLOP/s (median of "
          f"{floor.get('rounds', 1)} rounds, each timed between the steps' rounds)")


def print_memory(mem: dict) -> dict:
    """The memory table: peak RSS rise during three steps, each framework in its own process."""
    print("peak RSS rise over three steps above the built model and optimizer (MiB; one child "
          "process per cell):")
    print("| step | minilora | PyTorch | minilora / PyTorch |\n|---|---:|---:|---:|")
    ratios = {}
    for kind in STEPS:
        m, p = mem.get(f"minilora/{kind}", {}), mem.get(f"torch/{kind}", {})
        a, b = m.get("rss_peak_rise_mib"), p.get("rss_peak_rise_mib")
        ratios[kind] = _ratio(a, b)
        print(f"| {kind} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratios[kind], '.2f')} |")
    for key, r in mem.items():
        if "error" in r:
            print(f"memory {key}: failed ({r['error']})")
    return ratios


def print_notes(mode: str, notes: dict, first: dict, trainable: dict, cfg: GPTConfig) -> None:
    """What the PyTorch side is (PEFT's layer class, bitsandbytes' settings) and the losses."""
    if "peft" in notes:
        print(f"PEFT: {notes['peft']} (LoraConfig r={LORA_R}, lora_alpha={LORA_ALPHA}, "
              f"target_modules={list(LORA_TARGETS)}, lora_dropout=0.0)")
    b = notes.get("bnb")
    if b:
        where = "on the CPU" if b["devices"] == ["cpu"] and b["quantized"] else "NOT as expected"
        print(f"bitsandbytes {b['bitsandbytes']}: {b['layers']} Linear4bit layers, "
              f"{'/'.join(b['quant_types'])}, blocksize {b['blocksizes']}, double quant "
              f"{b['double_quant']}, quantized {b['quantized']}, packed weights "
              f"{'/'.join(b['weight_dtypes'])} on {'/'.join(b['devices'])} (CUDA available: "
              f"{b['cuda_available']}): it quantized and trained {where}")
    if "torch_skipped" in notes:
        print(f"NOTE: the PyTorch side of mode {mode} is skipped: it could not be built or could "
              f"not run a training step here ({notes['torch_skipped']}); only minilora is timed")
    print(f"first loss: minilora {first['minilora']:.5f}, PyTorch "
          f"{_fmt(first.get('torch'), '.5f')} (ln V = {math.log(cfg.vocab_size):.5f}); trainable "
          f"parameters: minilora {trainable['minilora']:,}, PyTorch "
          f"{_fmt(trainable.get('torch'), ',')}")


def measure_speed(cfg: GPTConfig, mode: str, batch: int, rounds: int, per_round: int,
                  shards: int | None) -> tuple[dict, dict]:
    """Build both sides, time their steps, count the step's FLOPs and time its matmuls alone;
    prints the notes, the speed table and the limit. Returns (the setup, the results)."""
    s = setup(cfg, mode, batch, shards)
    shards = s["shards"]
    print_notes(mode, s["notes"], s["first_loss"], s["trainable"], cfg)
    lora = dict(rank=LORA_R, targets=LORA_TARGETS)
    times, floors = train_speed(
        s["sides"], rounds, per_round,
        lambda: sp.matmul_time(cfg, batch, mode, shards, default_threads(shards), **lora))
    flops = sp.flop_summary(sp.step_matmuls(cfg, batch, mode, **lora))
    # the median of the rounds' floors, as the steps' times are medians of the rounds
    floor = dict(floors[0], seconds=statistics.median(f["seconds"] for f in floors),
                 rounds=len(floors))
    floor["gflop_s"] = floor["flops"] / floor["seconds"] / 1e9
    tokens = batch * cfg.block_size
    micro = micro_batches_of(batch, cfg.block_size, shards)
    ratios = print_speed(mode, times, tokens, floor["seconds"], shards, micro)
    ceiling = print_ceiling(mode, times, floor["seconds"])
    print_limit(flops, floor)
    return s, {"mode": mode, "config": cfg.to_dict(), "batch": batch, "tokens_per_step": tokens,
               "shards": shards, "micro_batches": micro,
               "median_ms": {k: 1e3 * v for k, v in times.items()}, "ratios": ratios,
               "first_loss": s["first_loss"], "trainable": s["trainable"], "notes": s["notes"],
               "flops": flops, "floor": floor,
               "x_floor": {k: v / floor["seconds"] for k, v in times.items()},
               "ceiling": ceiling}


def profile_step(s: dict, steps: int) -> dict:
    """minilora's loop step of setup ``s`` on one shard and one thread, by op family; printed."""
    params = [p for g in s["opt"].param_groups for p in g["params"]]
    b = sp.breakdown(lambda: minilora_loop_step(s["model"], s["opt"], params, s["x"], s["y"], 1),
                     steps)
    print(f"minilora's loop step by op family (1 shard, 1 thread, fast forms "
          f"{'on' if ml.fast.enabled() else 'off'}; mean per step over {steps}):")
    print(sp.format_breakdown(b))
    return b


def profile_side_by_side(s: dict, steps: int) -> dict | None:
    """The loop step's shards on one thread and side by side on the loop's threads, by op
    family (``step_profile.side_by_side``); printed. None (and a line) with one shard."""
    shards = s["shards"]
    threads = default_threads(shards)
    if shards < 2 or threads < 2:
        print(f"side by side: skipped ({shards} shard(s) on {threads} thread(s))")
        return None
    model, x, y = s["model"], s["x"], s["y"]
    micro = micro_batches_of(x.shape[0], x.shape[1], shards)

    def run(t: int) -> None:
        forward_backward(model, x, y, shards, threads=t, micro_batches=micro)
        s["opt"].zero_grad()
    r = sp.side_by_side(run, threads, steps)
    print(f"minilora's shards ({shards}, {micro} micro-batches each) on 1 thread and side by "
          f"side on {threads}, by op family (forward and backward, no update; mean per step "
          f"over {steps}, alternating):")
    print(sp.format_side_by_side(r))
    return r


def print_generation(cfg: GPTConfig, quick: bool) -> dict:
    """KV-cache generation against recomputing the context (mode full only); printed."""
    g = generation_speed(cfg, prompt_len=8 if quick else 16,
                         new_tokens=24 if quick else min(cfg.block_size - 16, 112),
                         batch=1, rounds=1 if quick else 3)
    print(f"generation (batch {g['batch']}, prompt {g['prompt_len']}, {g['new_tokens']} new "
          f"tokens, greedy): KV cache {g['cached_tok_s']:,.0f} tok/s, uncached "
          f"{g['uncached_tok_s']:,.0f} tok/s, speedup {g['speedup']:.1f}x, same tokens: "
          f"{g['same_tokens']}")
    return g


def run_mode(cfg: GPTConfig, mode: str, batch: int, rounds: int, per_round: int, args: Any,
             quick: bool) -> dict:
    """Everything measured for one mode, printed, and returned as a JSON-able dict."""
    print(f"\n## mode {mode}: config {cfg.to_dict()}, batch {batch}, float32, {rounds} rounds x "
          f"{per_round} steps each, alternating; load average {os.getloadavg()[0]:.2f}")
    s, out = measure_speed(cfg, mode, batch, rounds, per_round, args.shards)
    if args.memory or (not quick and not args.no_memory):
        out["memory"] = memory(cfg, mode, batch, s["shards"], list(s["sides"]))
        out["memory_ratios"] = print_memory(out["memory"])
    else:
        print("memory: skipped (--quick or --no-memory; --memory runs it)")
    out["breakdown"] = profile_step(s, steps=max(1, min(per_round, 3)))
    out["side_by_side"] = profile_side_by_side(s, steps=max(1, min(per_round, 3)))
    if mode == "full":
        out["generate"] = print_generation(cfg, quick)
    return out


def run_sources(cfg: GPTConfig, batch: int, rounds: int, per_round: int, args: Any,
                ap: argparse.ArgumentParser) -> dict:
    """``--against DIR`` / ``--reference``: minilora sources side by side, no PyTorch."""
    here = os.path.dirname(HERE)
    sides = [("this checkout", here, {"MINILORA_REFERENCE": "0"})]
    if args.against:
        if not os.path.isdir(os.path.join(args.against, "minilora")):
            ap.error(f"--against {args.against}: no minilora/ package in that directory "
                     f"(a checkout of this repository, e.g. from git worktree add)")
        sides.append((f"--against {args.against}", os.path.abspath(args.against), {}))
    if args.reference:
        sides.append(("reference forms", here, {"MINILORA_REFERENCE": "1"}))
    print(f"minilora train_step, sources side by side: {os.cpu_count()} cpus, numpy "
          f"{np.__version__}, config {cfg.to_dict()}, batch {batch}, "
          f"{args.shards or 'default'} shards, "
          f"{rounds} rounds x {per_round} steps, alternating; load average "
          f"{os.getloadavg()[0]:.2f}")
    res = print_sources(cfg, batch, rounds, per_round, args.shards, sides)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return res


def parse_args() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line (the module docstring describes the modes) and its parser."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=(*MODES, "all"), default="full",
                    help="what trains: everything, LoRA adapters, or adapters on a 4-bit base")
    ap.add_argument("--size", choices=tuple(SIZES), default="reference")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds a mode: a tiny model, 2 rounds of 1 step, no memory")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    ap.add_argument("--per-round", type=int, default=None,
                    help="steps per framework per round")
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences per step (default: 16 reference, 4 gpt2-small and --quick)")
    ap.add_argument("--shards", type=int, default=None,
                    help="minilora's loop step: batch shards run side by side, as the training "
                    "loop does (default: the loop's for the model, step.default_shards)")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="minilora's loop step: pieces per shard run in turn (default: the "
                    "loop's, pieces of about 512 tokens on the CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (numpy: set OPENBLAS_NUM_THREADS yourself)")
    ap.add_argument("--memory", action="store_true", help="measure memory even with --quick")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory children")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="time this checkout's step against another checkout's (no PyTorch)")
    ap.add_argument("--reference", action="store_true",
                    help="time the fast forms against the reference forms (no PyTorch)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step", default="loop", choices=STEPS, help=argparse.SUPPRESS)
    return ap.parse_args(), ap


def main() -> None:
    """Run the modes asked for (or a memory child, or the sources side by side) and report."""
    args, ap = parse_args()
    global MICRO_BATCHES
    MICRO_BATCHES = args.micro_batches
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.config, args.mode, args.step,
                                      args.batch, args.shards)))
        return
    size = "quick" if args.quick else args.size
    cfg = GPTConfig(**(QUICK if args.quick else SIZES[args.size]))
    batch, rounds, per_round = DEFAULTS[size]
    batch, rounds = args.batch or batch, args.rounds or rounds
    per_round = args.per_round or per_round
    if args.against or args.reference:
        res = run_sources(cfg, batch, rounds, per_round, args, ap)
        if args.json:
            print(json.dumps(res))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"minilora train_step benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, OpenBLAS kernels {blas_core()} "
          f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}); size {size}")
    keep_freed_memory()  # as the training loop does on the CPU
    results = [run_mode(cfg, mode, batch, rounds, per_round, args, args.quick)
               for mode in (MODES if args.mode == "all" else (args.mode,))]
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(results if args.mode == "all" else results[0], default=str))


if __name__ == "__main__":
    main()
