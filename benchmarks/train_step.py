"""One training step (forward, backward, AdamW) of the reference GPT: minilora against PyTorch.

    python benchmarks/train_step.py            # about a minute
    python benchmarks/train_step.py --quick    # a few seconds: smaller, no memory part

Both frameworks train the same model (same weights: PyTorch's are copied from minilora's) on the
same batch. minilora's step is the training loop's: the batch in ``--shards`` shards (default 2)
on as many threads, each with a one-thread OpenBLAS (``minilora.step``), freed memory kept
for reuse (``fast.cpu.keep_freed_memory``). Steps are timed in alternating rounds (a few minilora
steps, then a few PyTorch steps, and again, with a short untimed pause at each switch), so load
from other processes hits both alike; the report quotes medians and their ratio. On a loaded
machine compare one thread each (``OPENBLAS_NUM_THREADS=1 python benchmarks/train_step.py
--threads 1 --shards 1``): thread pools that wait on each other fall apart once other processes
take the cores.

Memory is measured in separate child processes, one framework each:

* minilora: tracemalloc's peak during one steady-state step (NumPy reports its array buffers to
  tracemalloc), above what was allocated when the step began;
* both: the rise of the process's peak resident set size (VmHWM, reset through
  /proc/self/clear_refs) during one steady-state step. The children run with a fixed glibc mmap
  threshold (MALLOC_MMAP_THRESHOLD_=65536), so every large buffer is mapped when allocated and
  returned when freed, and the resident set follows the live arrays of either framework (for
  minilora it matches tracemalloc to within 0.1 MiB).

Also measured: KV-cache generation against recomputing the whole context for every new token.

Two minilora sources side by side (no PyTorch): ``--against DIR`` times this checkout's training
step against the one of another checkout DIR (say ``git worktree add ../before HEAD~3``), and
``--reference`` against this checkout's own reference forms (``MINILORA_REFERENCE=1``). Each side
runs in its own child process that builds the same model and batch and times the steps it is
told to; the rounds alternate between the two, as above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minilora as ml  # noqa: E402
from minilora.fast.cpu import keep_freed_memory  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.step import default_shards, default_threads, forward_backward  # noqa: E402

REFERENCE = dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
# OpenBLAS's and PyTorch's worker threads spin for a while after their last job before they sleep;
# a pause between the two frameworks' rounds keeps one's idle pool from slowing the other's start
PAUSE_S = 0.3


# ---------------------------------------------------------------------------------- models

def build_minilora(cfg: GPTConfig, seed: int = 0):
    ml.manual_seed(seed)
    model = GPT(cfg)
    opt = ml.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    return model, opt


def build_torch(cfg: GPTConfig, weights: dict | None = None):
    """The same GPT in plain PyTorch eager: SDPA attention, tanh GELU, tied head, AdamW."""
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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    return model, opt


def minilora_step(model, opt, x, y, shards: int = 2):
    """The training loop's step: forward and backward in ``shards`` shards side by side."""
    loss = forward_backward(model, x, y, shards)
    opt.step()
    opt.zero_grad()
    return loss


def torch_step(model, opt, x, y):
    loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# --------------------------------------------------------------------------------- timings

def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def train_speed(cfg: GPTConfig, batch: int, rounds: int, per_round: int, shards: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    model, opt = build_minilora(cfg)
    tmodel, topt = build_torch(cfg, model.state_dict())
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():  # same weights, same batch: the first losses agree
        loss_t = float(tmodel(tx, ty))
    loss_m = minilora_step(model, opt, x, y, shards)
    torch_step(tmodel, topt, tx, ty)
    ml_times, pt_times = [], []
    for _ in range(rounds):
        time.sleep(PAUSE_S)
        ml_times += time_steps(lambda: minilora_step(model, opt, x, y, shards), per_round)
        time.sleep(PAUSE_S)
        pt_times += time_steps(lambda: torch_step(tmodel, topt, tx, ty), per_round)
    tokens = batch * cfg.block_size
    ml_med, pt_med = statistics.median(ml_times), statistics.median(pt_times)
    return {"tokens_per_step": tokens, "minilora_ms": 1e3 * ml_med, "torch_ms": 1e3 * pt_med,
            "minilora_tok_s": tokens / ml_med, "torch_tok_s": tokens / pt_med,
            "ratio": pt_med / ml_med, "first_loss_minilora": loss_m, "first_loss_torch": loss_t,
            "steps_each": len(ml_times)}


def generation_speed(cfg: GPTConfig, prompt_len: int, new_tokens: int, batch: int,
                     rounds: int) -> dict:
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
cfg, batch, shards = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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


def memory_child(framework: str, cfg_json: str, batch: int, shards: int) -> dict:
    """Run in a fresh process: two warm steps, then measure one."""
    cfg = GPTConfig(**json.loads(cfg_json))
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    if framework == "minilora":
        model, opt = build_minilora(cfg)
        step = lambda: minilora_step(model, opt, x, y, shards)
    else:
        import torch

        model, opt = build_torch(cfg)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        step = lambda: torch_step(model, opt, tx, ty)
    step()
    step()
    out = {"framework": framework}
    if framework == "minilora":
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["tracemalloc_peak_mib"] = (peak - base) / 2**20
    ok = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    step()
    out["rss_peak_rise_mib"] = (_rss_kib("VmHWM") - rss0) / 1024 if ok else None
    return out


def memory(cfg: GPTConfig, batch: int, shards: int) -> dict:
    results = {}
    for fw in ("minilora", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", fw,
               "--config", json.dumps(cfg.to_dict()), "--batch", str(batch),
               "--shards", str(shards)]
        # a fixed mmap threshold stops glibc from keeping freed large buffers in its heap, so
        # the resident set follows the live arrays of either framework
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[fw] = json.loads(res.stdout.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few-second run (smaller, fewer)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    ap.add_argument("--per-round", type=int, default=3, help="steps per framework per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shards", type=int, default=default_shards(),
                    help="minilora: batch shards run side by side, as the training loop does "
                    "(default: the loop's default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (numpy: set OPENBLAS_NUM_THREADS yourself)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="time this checkout's step against another checkout's (no PyTorch)")
    ap.add_argument("--reference", action="store_true",
                    help="time the fast forms against the reference forms (no PyTorch)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.config, args.batch, args.shards)))
        return

    cfg = GPTConfig(**REFERENCE)
    rounds = args.rounds or (2 if args.quick else 10)
    per_round = 1 if args.quick else args.per_round
    batch = 4 if args.quick else args.batch
    if args.against or args.reference:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sides = [("this checkout", here, {"MINILORA_REFERENCE": "0"})]
        if args.against:
            if not os.path.isdir(os.path.join(args.against, "minilora")):
                ap.error(f"--against {args.against}: no minilora/ package in that directory "
                         f"(a checkout of this repository, e.g. from git worktree add)")
            sides.append((f"--against {args.against}", os.path.abspath(args.against), {}))
        if args.reference:
            sides.append(("reference forms", here, {"MINILORA_REFERENCE": "1"}))
        print(f"minilora train_step, sources side by side: {os.cpu_count()} cpus, numpy "
              f"{np.__version__}, config {cfg.to_dict()}, batch {batch}, {args.shards} shards, "
              f"{rounds} rounds x {per_round} steps, alternating; load average "
              f"{os.getloadavg()[0]:.2f}")
        res = print_sources(cfg, batch, rounds, per_round, args.shards, sides)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        if args.json:
            print(json.dumps(res))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"minilora train_step benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"config {cfg.to_dict()}, batch {batch}, float32, {rounds} rounds x {per_round} "
          f"steps each, alternating; load average at start {os.getloadavg()[0]:.2f}")
    keep_freed_memory()  # as the training loop does on the CPU
    t = train_speed(cfg, batch, rounds, per_round, args.shards)
    print(f"first loss: minilora {t['first_loss_minilora']:.5f}, torch "
          f"{t['first_loss_torch']:.5f} (ln V = {math.log(cfg.vocab_size):.5f})")
    print("| framework | median ms/step | tokens/s |\n|---|---:|---:|")
    print(f"| minilora ({args.shards} shards, {min(args.shards, default_threads(args.shards))} "
          f"threads) | {t['minilora_ms']:.1f} | {t['minilora_tok_s']:,.0f} |")
    print(f"| PyTorch eager (SDPA) | {t['torch_ms']:.1f} | {t['torch_tok_s']:,.0f} |")
    print(f"minilora / PyTorch tokens/s: {t['ratio']:.2f}x")

    g = generation_speed(cfg, prompt_len=8 if args.quick else 16,
                         new_tokens=24 if args.quick else cfg.block_size - 16,
                         batch=1, rounds=1 if args.quick else 3)
    print(f"generation (batch {g['batch']}, prompt {g['prompt_len']}, {g['new_tokens']} new "
          f"tokens, greedy): KV cache {g['cached_tok_s']:,.0f} tok/s, uncached "
          f"{g['uncached_tok_s']:,.0f} tok/s, speedup {g['speedup']:.1f}x, same tokens: "
          f"{g['same_tokens']}")

    mem = None
    if args.quick:
        print("peak memory: skipped with --quick (it runs two more processes)")
    else:
        mem = memory(cfg, batch, args.shards)
        m, p = mem["minilora"], mem["torch"]

        def fmt(v):
            return "n/a" if v is None else f"{v:.1f}"
        print(f"peak memory of one step (MiB): minilora tracemalloc "
              f"{fmt(m['tracemalloc_peak_mib'])}, RSS rise minilora "
              f"{fmt(m['rss_peak_rise_mib'])}, torch {fmt(p['rss_peak_rise_mib'])}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps({"train": t, "generate": g, "memory": mem}))


if __name__ == "__main__":
    main()
