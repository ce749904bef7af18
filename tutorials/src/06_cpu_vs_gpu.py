# Source of tutorials/06_cpu_vs_gpu.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 06 · CPU vs GPU: the same code on NumPy and CuPy
#
# Nothing in minilora calls NumPy on a tensor's data directly. Every op goes through
# `minilora.backend.xp`, which is either the `numpy` module (arrays in host memory, math on the
# CPU) or the `cupy` module (arrays in GPU memory, math in CUDA kernels). CuPy copies NumPy's API,
# so one line switches the whole engine:
#
# ```python
# ml.use_backend("cupy")     # tensors made from now on live on the GPU
# model.to_backend()         # move a model that was built before the switch
# ```
#
# This notebook runs the same code on both and times it. Timing a GPU fairly needs three rules
# that a CPU never asks for:
#
# 1. **synchronize**: a CuPy call returns as soon as its kernel is *queued*; the timer must wait
#    for the GPU (`backend.synchronize()`) or it measures the queueing, not the work;
# 2. **warm up**: the first call of each kernel compiles it (and the first matmul sets up cuBLAS),
#    so it is run once before the clock starts;
# 3. **count the copies**: data crosses from host to device memory once (`to_backend()`, the
#    batch), not inside the timed loop.

# %% [markdown]
# One setting first: the CPU side runs with one BLAS thread unless `OPENBLAS_NUM_THREADS` says
# otherwise (it must be set before NumPy is imported). On a machine shared with other jobs, a
# second BLAS thread that loses its core makes the first one wait, and small products then take
# 100 times longer than they should; one thread gives steady, comparable CPU numbers.

# %%
import math
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy is imported
BLAS_THREADS = os.environ["OPENBLAS_NUM_THREADS"]

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora import backend as B

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
ml.manual_seed(0)

try:
    ml.use_backend("cupy")
    HAS_GPU = True
    props = B.xp.cuda.runtime.getDeviceProperties(0)
    GPU_NAME = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    GPU_NOTE = f"GPU found: {GPU_NAME}, CuPy {B.xp.__version__}"
except ml.errors.BackendError as exc:
    HAS_GPU = False
    GPU_NAME = None
    CUPY_ERROR = str(exc)
    GPU_NOTE = ("NO GPU on this machine: CuPy could not start, so every CuPy cell below is "
                "skipped and only the CPU (NumPy) side is measured.\n  minilora says: "
                + CUPY_ERROR)
finally:
    ml.use_backend("numpy")

# The device side is CuPy; in the test suite's strict pass (MINILORA_BACKEND=strict) it is
# minilora.strict instead, the NumPy stand-in for CuPy that runs the same device code path and
# refuses host arrays: its times are the CPU's, not a GPU's, so only its results are checked.
DEVICE = "strict" if os.environ.get("MINILORA_BACKEND") == "strict" else "cupy"
if DEVICE == "strict":
    GPU_NOTE += ("\nThe device side runs on the strict stand-in for CuPy (device code path on "
                 "NumPy): its times are not GPU speeds.")
BACKENDS = ["numpy", DEVICE] if HAS_GPU or DEVICE == "strict" else ["numpy"]
print(GPU_NOTE)
print("backends measured here:", BACKENDS)

# %% [markdown]
# ## 1. One switch, two array libraries
#
# A tensor made inside `with B.backend(name):` holds that library's array; the code that made it
# is the same. (The context manager puts the previous backend back at the end of the block.)

# %%
for name in BACKENDS:
    with B.backend(name):
        t = ml.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
        y = (t @ t.T).data
        print(f"{name:5s}: data is a {type(y).__module__}.{type(y).__name__}, "
              f"t @ t.T = {B.to_numpy(y).tolist()}")
print("active backend after the loop:", ml.get_backend())

# %% [markdown]
# ## 2. How to time it
#
# The time of one call is measured as
#
# $$t = \frac{\text{wall time of } n \text{ calls between two } \texttt{synchronize()}}{n},$$
#
# with $n$ chosen so that the measurement lasts a few tens of milliseconds, after one warm-up
# call, and the fastest of a few rounds kept (other work on a shared machine can only slow a
# call down, never speed it up). The helper below is all of it.

# %%
def time_call(fn, rounds=5, min_seconds=0.02):
    """Seconds per call of fn() on the active backend: the fastest of ``rounds`` measurements."""
    fn()  # warm-up: kernel compilation, cuBLAS set-up, first-touch allocations
    B.synchronize()
    t0 = time.perf_counter()
    fn()
    B.synchronize()
    number = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(rounds):
        B.synchronize()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        B.synchronize()  # wait for the queued work, not just its launch
        samples.append((time.perf_counter() - t0) / number)
    return min(samples)


# %% [markdown]
# What happens without `synchronize()`: ten products of two $n \times n$ matrices, timed with and
# without waiting for the device ($n$ = 4096 on the GPU, so that each product is real work for
# it; smaller on the CPU, which is slower). NumPy is synchronous (a call returns when its result
# is ready), so the two timings agree on the CPU; on a GPU the loop without `synchronize()` only
# measures how fast Python can queue kernels.

# %%
rng = np.random.default_rng(0)
n_sync = {"numpy": 1024 if FAST else 2048, "cupy": 4096, "strict": 256}
sync_demo = {}
for name in BACKENDS:
    n = n_sync[name]
    with B.backend(name):
        a = ml.Tensor(rng.standard_normal((n, n), dtype=np.float32))
        with ml.no_grad():
            square = lambda a=a: (a @ a).data
            square()  # warm-up
            B.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                square()
            unsynced = (time.perf_counter() - t0) / 10
            B.synchronize()  # let the queue drain before the honest measurement
            synced = time_call(square, rounds=3)
        sync_demo[name] = (unsynced, synced)
        print(f"{name:5s}: ({n}, {n}) @ ({n}, {n}): without synchronize "
              f"{1e3 * unsynced:8.3f} ms/call, with it {1e3 * synced:8.3f} ms/call")

# %% [markdown]
# ## 3. Matmul: where the GPU wins, and where it does not
#
# A product of two $n \times n$ matrices costs $2n^3$ floating-point operations, so its time
# should grow like $n^3$ once $n$ is large enough to keep the hardware busy. Below that, each
# call pays a fixed price: Python and minilora's bookkeeping (microseconds), plus on a GPU a
# kernel launch (several microseconds) and the synchronisation. That is why small ops run no
# faster, or slower, on a GPU, and why a training step on a GPU wants large batches.

# %%
sizes = [64, 128, 256, 512] if FAST else [64, 128, 256, 512, 1024, 2048]
matmul = {name: [] for name in BACKENDS}
products = {name: [] for name in BACKENDS}
for n in sizes:
    x_host = rng.standard_normal((n, n), dtype=np.float32)
    w_host = rng.standard_normal((n, n), dtype=np.float32)
    for name in BACKENDS:
        with B.backend(name):
            x, w = ml.Tensor(x_host), ml.Tensor(w_host)
            with ml.no_grad():
                matmul[name].append(time_call(lambda x=x, w=w: (x @ w).data))
                products[name].append(B.to_numpy((x @ w).data))

header = f"{'n':>6} " + " ".join(f"{name + ' ms':>12} {name + ' GFLOP/s':>15}" for name in BACKENDS)
print(header + ("   speed-up" if "cupy" in BACKENDS else ""))
for i, n in enumerate(sizes):
    cells = " ".join(f"{1e3 * matmul[name][i]:12.3f} {2 * n**3 / matmul[name][i] / 1e9:15.1f}"
                     for name in BACKENDS)
    speedup = f"{matmul['numpy'][i] / matmul['cupy'][i]:10.1f}x" if "cupy" in BACKENDS else ""
    print(f"{n:6d} {cells} {speedup}")

# %%
cpu_label = f"NumPy (CPU, OPENBLAS_NUM_THREADS={BLAS_THREADS})"
style = {"numpy": dict(color="tab:blue", marker="o", label=cpu_label),
         "cupy": dict(color="tab:green", marker="s", label=f"CuPy ({GPU_NAME})"),
         "strict": dict(color="tab:gray", marker="s", label="strict stand-in (not a speed)")}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for name in BACKENDS:
    ms = [1e3 * t for t in matmul[name]]
    ax1.loglog(sizes, ms, **style[name])
    ax2.semilogx(sizes, [2 * n**3 / t / 1e9 for n, t in zip(sizes, matmul[name])], **style[name])
ref = 1e3 * matmul["numpy"][-1] * (np.array(sizes, dtype=float) / sizes[-1]) ** 3
ax1.loglog(sizes, ref, "k:", lw=1, label=r"$\propto n^3$")
for ax in (ax1, ax2):
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("n  (an (n, n) @ (n, n) product)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
ax1.set_ylabel("ms per product")
ax1.set_title("time: fixed cost for small n, then n³")
ax2.set_ylabel("GFLOP/s")
ax2.set_ylim(bottom=0)
ax2.set_title("throughput: fixed costs hold small n back")
if not HAS_GPU:
    fig.suptitle("no GPU on this machine: " + ("the device side is the strict stand-in, on the CPU"
                 if DEVICE == "strict" else "CPU (NumPy) side only"), color="tab:red")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. A GPT training step on each backend
#
# Now a whole training step (forward, backward, AdamW) of a small GPT. The model is built once
# on the host from a fixed seed and moved with `model.to_backend()`, and the batch is copied to
# the device once, so both backends start from the same weights and see the same tokens: their
# losses must agree to float32 rounding. At initialisation the logits $z = \mathrm{ln_f}(x)\,
# W_{te}^\top$ are small: unit-variance features times weights of std 0.02 give logits of std
# $\sigma = 0.02\sqrt{C}$, so the first loss is the loss of a uniform guess over $V$ tokens plus a
# little, $\mathbb{E}[\mathrm{loss}] \approx \ln V + \sigma^2 / 2$.

# %%
if FAST:
    cfg = ml.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64)
    batch = 8
else:  # the reference config of the benchmarks
    cfg = ml.GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256)
    batch = 16
tokens_host = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
x_host, y_host = tokens_host[:, :-1], tokens_host[:, 1:]  # next-token prediction

def make_step(model, opt, xb, yb):
    """One training step on whatever backend the model, optimizer and batch live on."""
    def step():
        _, loss = model(xb, yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return step


gpt_losses, gpt_step_s = {}, {}
for name in BACKENDS:
    with B.backend("numpy"):
        ml.manual_seed(0)
        model = ml.GPT(cfg)  # the same host weights for every backend
    with B.backend(name):
        model.to_backend()  # one host-to-device copy per parameter (nothing to do on NumPy)
        opt = ml.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        step = make_step(model, opt, B.asarray(x_host), B.asarray(y_host))  # batch copied once
        gpt_losses[name] = [step().item() for _ in range(3)]  # .item() copies to the host
        gpt_step_s[name] = time_call(step, rounds=3, min_seconds=0.0)
        print(f"{name:5s}: losses of the first 3 steps {np.round(gpt_losses[name], 5).tolist()}, "
              f"{1e3 * gpt_step_s[name]:.1f} ms per step = "
              f"{batch * cfg.block_size / gpt_step_s[name]:,.0f} tokens/s")
expected_loss = math.log(cfg.vocab_size) + (0.02**2 * cfg.n_embd) / 2
print(f"ln V + sigma^2 / 2 = {expected_loss:.5f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.4))
names = list(gpt_step_s)
rates = [batch * cfg.block_size / gpt_step_s[n] for n in names]
bars = ax.bar([style[n]["label"] for n in names], rates,
              color=[style[n]["color"] for n in names], width=0.5)
for bar, r in zip(bars, rates):
    ax.annotate(f"{r:,.0f} tokens/s", (bar.get_x() + bar.get_width() / 2, r), ha="center",
                va="bottom")
ax.set_ylim(0, max(rates) * 1.25)
ax.set_ylabel("training tokens / s")
ax.set_title(f"GPT training step: {cfg.n_layer} layers, n_embd {cfg.n_embd}, "
             f"batch {batch} x {cfg.block_size}" + ("" if HAS_GPU else "\n(no GPU here)"))
plt.show()

# %% [markdown]
# ## 5. What to expect on a GPU
#
# For the full table (matmul, GELU, softmax, 4-bit quantize and dequantize at several sizes, the
# reference GPT and a GPT-2-small-sized step) run `python benchmarks/backends.py`; the figures
# measured so far are in `benchmarks/RESULTS.md`. The pattern:
#
# * large matmuls, the bulk of a transformer's work, run one to two orders of magnitude faster on
#   a data-centre GPU than on a few CPU cores;
# * small ops are launch-bound on a GPU: a (16, 1024) softmax costs about as much as an empty
#   kernel, and the CPU can win there;
# * a training step is hundreds of ops, so the GPU's advantage grows with the batch and the
#   model: a tiny model barely gains, a GPT-2-sized one gains the most.
#
# The same numbers also hold the correctness story: the same seed gives the same model and the
# same losses on both backends, because every op is the same equation on a different array
# library.

# %% [markdown]
# ## 6. Measured on an H200: the GPU check
#
# On a machine with an NVIDIA GPU, `bash benchmarks/gpu_check.sh` runs `benchmarks/backends.py`
# (the full table, GPT-2 small included) and then the whole test suite on CuPy, in one call of at
# most five minutes, and says how many tests ran on the GPU. Its table and plot, copied to
# `benchmarks/gpu/`, are what `benchmarks/RESULTS.md` quotes; this cell shows them once they
# exist, and says so when they do not yet.

# %%
import json
from pathlib import Path

RECORDED = Path.cwd().parent / "benchmarks" / "gpu"  # the notebook runs in tutorials/
recorded = None
if (RECORDED / "backends.json").is_file():
    recorded = json.loads((RECORDED / "backends.json").read_text(encoding="utf-8"))
if recorded is not None and recorded.get("cupy_available"):
    print(f"GPU check of {recorded['machine']['date']}: {recorded['machine']['gpu']}\n")
    print((RECORDED / "backends.md").read_text(encoding="utf-8"))
    small = recorded.get("gpt2_small") or {}
    if "speedup_vs_reference_cpu" in small:
        print(f"GPT-2 small training step: {small['cupy_tokens_per_s']:,.0f} tokens/s on the GPU, "
              f"{small['speedup_vs_reference_cpu']:,.0f}x the reference 2-core CPU "
              f"(target {small['target']:.0f}x)")
    fig, ax = plt.subplots(figsize=(13, 7.5))
    ax.imshow(plt.imread(RECORDED / "backends.png"))
    ax.axis("off")
    plt.show()
else:
    print("The GPU figures are still to come: run `bash benchmarks/gpu_check.sh` on a machine "
          "with an NVIDIA GPU and copy its backends/ folder to benchmarks/gpu/.")

# %% [markdown]
# ## What must stay true
#
# These checks hold on a machine with or without a GPU; the CuPy ones run only where CuPy does.

# %%
assert ml.get_backend() == "numpy"  # every `with B.backend(...)` block put NumPy back
cpu = matmul["numpy"]
assert all(t > 0 for t in cpu) and gpt_step_s["numpy"] > 0
# 512x more work from the smallest to the largest size must show, whatever the machine's load
assert cpu[-1] > 4 * cpu[0], cpu
assert max(cpu[-2:]) > min(cpu[:2]), cpu
# at initialisation the loss is that of a near-uniform guess, ln V + sigma^2 / 2
assert abs(gpt_losses["numpy"][0] - expected_loss) < 0.05, (gpt_losses["numpy"], expected_loss)
assert gpt_losses["numpy"][2] < gpt_losses["numpy"][0]  # AdamW at lr 1e-3 learns something
if len(BACKENDS) == 2:  # the same products and losses on both backends
    for i, n in enumerate(sizes):
        ref = products["numpy"][i]
        rel = np.abs(products[DEVICE][i] - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (n, rel)
    np.testing.assert_allclose(gpt_losses[DEVICE], gpt_losses["numpy"], rtol=1e-4)
if HAS_GPU and DEVICE == "cupy":  # timings mean something only on a real GPU
    assert matmul["cupy"][-1] < matmul["numpy"][-1]  # the largest product is faster on the GPU
    assert sync_demo["cupy"][0] < 0.5 * sync_demo["cupy"][1]  # without synchronize: too fast
if not HAS_GPU:
    assert "pip install" in CUPY_ERROR  # no GPU: minilora said how to get one working
print("all checks passed" + ("" if HAS_GPU else " (CPU side only: no GPU here)"))
