# Source of tutorials/01_autograd.ipynb (built by tutorials/build.py).

# %% [markdown]
# # 01 · Autograd from scratch
#
# Training any network, LoRA included, needs the gradient of a loss with respect to millions of
# numbers. *Reverse-mode automatic differentiation* gets all of them for the price of about two
# forward passes. This notebook opens up `minilora/tensor.py`, which does it in a few hundred lines:
#
# 1. every operation records its inputs and a tiny `backward` closure (the local chain rule);
# 2. `loss.backward()` sorts the recorded graph topologically and walks it in reverse;
# 3. we check the result against finite differences, the slow but obvious way.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
import minilora.functional as F

FAST = os.environ.get("MINILORA_FAST") == "1"  # the test suite runs this notebook small
ml.manual_seed(0)

# %% [markdown]
# ## 1. A graph, by hand
#
# Take $f(a, b) = a b + e^{a}$. Each operation returns a new `Tensor` that remembers its parents
# and how to push a gradient back to them. Nothing is differentiated yet.

# %%
a = ml.Tensor(np.float64(1.5), requires_grad=True)
b = ml.Tensor(np.float64(-2.0), requires_grad=True)
ab = a * b
ea = a.exp()
f = ab + ea

# %% [markdown]
# `f.topological_order()` lists the nodes that need a gradient, each after all of its parents
# (found by an iterative depth-first search, so a graph 10,000 ops deep is fine). It is the order
# of the forward pass; `backward` walks it in reverse.

# %%
for node in f.topological_order():
    parents = [p._op or "leaf" for p in node._parents]
    print(f"{(node._op or 'leaf'):5s} value={float(node.data):+.4f}  parents={parents}")

# %% [markdown]
# Here is the same graph drawn, leaves on the left, the output on the right.

# %%
def draw_graph(root, labels):
    """Place nodes by their depth from the leaves and draw parent -> child arrows."""
    order = root.topological_order()
    depth = {}
    for node in order:
        depth[id(node)] = 1 + max((depth[id(p)] for p in node._parents), default=-1)
    columns = {}
    pos = {}
    for node in order:
        d = depth[id(node)]
        pos[id(node)] = (d, -columns.get(d, 0))
        columns[d] = columns.get(d, 0) + 1
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for node in order:
        x, y = pos[id(node)]
        for p in node._parents:
            px, py = pos[id(p)]
            ax.annotate("", xy=(x - 0.12, y), xytext=(px + 0.12, py),
                        arrowprops=dict(arrowstyle="->", color="gray"))
        ax.text(x, y, labels.get(id(node), node._op), ha="center", va="center",
                bbox=dict(boxstyle="round", fc="#dbe9f6" if node._op else "#f6e3db"))
    ax.set_xlim(-0.5, max(depth.values()) + 0.5)
    ax.set_ylim(-1.6, 0.6)
    ax.axis("off")
    ax.set_title("f = a*b + exp(a): forward left to right, backward right to left")
    plt.show()


draw_graph(f, {id(a): "a = 1.5", id(b): "b = -2", id(ab): "mul", id(ea): "exp", id(f): "add"})

# %% [markdown]
# ## 2. Backward
#
# `f.backward()` seeds $\partial f / \partial f = 1$ and visits the nodes in reverse order. The add
# node passes its gradient unchanged to both inputs; the mul node sends $g \cdot b$ to $a$ and
# $g \cdot a$ to $b$; the exp node sends $g \cdot e^{a}$ to $a$. Because $a$ is used twice, its two
# contributions are summed:
# $\partial f/\partial a = b + e^{a}$ and $\partial f/\partial b = a$.
#
# The walk is short enough to run by hand, as micrograd's is (`Tensor.backward` is this loop; its
# helpers decide when a sum may be formed in place, without a copy, and hand a leaf its sum as
# soon as the last op that uses it has run, so a weight's gradient is not held to the walk's end):

# %%
grads = {id(f): np.ones_like(f.data)}  # the seed: df/df = 1
by_walk = {}
for node in reversed(f.topological_order()):
    g = grads.pop(id(node))
    if node._backward is None:  # a leaf keeps what reaches it
        by_walk[id(node)] = g
        continue
    for parent, pg in zip(node._parents, node._backward(g)):  # the chain rule, one op
        grads[id(parent)] = grads.get(id(parent), 0.0) + pg
print("by the walk df/da =", float(by_walk[id(a)]), " df/db =", float(by_walk[id(b)]))

# %%
f.backward()
print("autograd   df/da =", float(a.grad), " df/db =", float(b.grad))
print("by hand    df/da =", -2.0 + np.exp(1.5), " df/db =", 1.5)

# %% [markdown]
# ## 3. Checking against finite differences
#
# The central difference $\big(f(a+\epsilon) - f(a-\epsilon)\big) / 2\epsilon$ has a truncation
# error of order $\epsilon^2$ and a rounding error of order $u / \epsilon$ ($u$ the machine
# epsilon). Too large an $\epsilon$ and the slope is wrong; too small and we divide rounding noise.
# In float32 ($u \approx 10^{-7}$) the best achievable error is poor, which is why minilora's
# gradient tests run in float64.

# %%
def f_value(a_val, dtype):
    a_ = np.asarray(a_val, dtype=dtype)
    return a_ * dtype(-2.0) + np.exp(a_)


exact = -2.0 + np.exp(1.5)
eps_values = np.logspace(-1, -12, 12 if FAST else 45)
errors = {}
for dtype in (np.float32, np.float64):
    errs = []
    for eps in eps_values:
        up = f_value(dtype(1.5) + dtype(eps), dtype)
        down = f_value(dtype(1.5) - dtype(eps), dtype)
        errs.append(abs(float(up - down) / (2 * eps) - exact))
    errors[dtype.__name__] = np.maximum(errs, 1e-17)

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, errs in errors.items():
    ax.loglog(eps_values, errs, "o-", ms=3, label=name)
ax.set_xlabel("step epsilon")
ax.set_ylabel("|finite difference - exact|")
ax.invert_xaxis()
ax.legend()
ax.set_title("central differences: truncation (left) vs rounding (right)")
plt.show()
best64, best32 = errors["float64"].min(), errors["float32"].min()
print(f"best error float64 {best64:.1e}, float32 {best32:.1e}")

# %% [markdown]
# ## 4. Broadcasting, and summing it back
#
# Adding a (3, 1) column to a (4,) row gives a (3, 4) table: NumPy *stretches* both inputs. The
# gradient of a stretched input is the sum of the gradients of all its copies, which is what the
# single helper `unbroadcast` does for every op.

# %%
col = ml.Tensor(np.ones((3, 1)), requires_grad=True)
row = ml.Tensor(np.arange(4.0), requires_grad=True)
table = col + row  # (3, 1) + (4,) -> (3, 4)
table.sum().backward()
print("table", table.shape, " col.grad", col.grad.ravel(), " row.grad", row.grad)

# %% [markdown]
# ## 5. A small network learns
#
# The same machinery trains a two-layer MLP on two interleaved half-moons. `Linear`, `GELU`,
# `cross_entropy` and `AdamW` are the pieces the transformer uses later.

# %%
rng = np.random.default_rng(0)
n = 400 if FAST else 1000
angle = rng.uniform(0, np.pi, n)
label = rng.integers(0, 2, n)
points = np.stack([np.cos(angle) + label * 1.0 - 0.5, np.sin(angle) * (1 - 2 * label) + 0.25 * label],
                  axis=1)
points = (points + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)

model = ml.nn.Sequential(ml.nn.Linear(2, 32), ml.nn.GELU(), ml.nn.Linear(32, 32), ml.nn.GELU(),
                         ml.nn.Linear(32, 2))
opt = ml.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.0)
losses = []
for _ in range(150 if FAST else 400):
    loss = F.cross_entropy(model(ml.Tensor(points)), label)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())

with ml.no_grad():
    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 120), np.linspace(-1.5, 1.8, 100)), -1)
    probs = F.softmax(model(ml.Tensor(grid.reshape(-1, 2).astype(np.float32)))).numpy()
    accuracy = float((model(ml.Tensor(points)).numpy().argmax(1) == label).mean())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(losses)
ax1.set_xlabel("step")
ax1.set_ylabel("cross-entropy")
ax1.set_yscale("log")
ax1.set_title("training loss")
ax2.contourf(grid[..., 0], grid[..., 1], probs[:, 1].reshape(grid.shape[:2]), levels=20,
             cmap="coolwarm", alpha=0.6)
ax2.scatter(points[:, 0], points[:, 1], c=label, cmap="coolwarm", s=6)
ax2.set_title(f"decision surface, accuracy {accuracy:.1%}")
plt.show()

# %% [markdown]
# ## What must stay true
#
# These checks fail if the story above stops being true.

# %%
assert abs(float(a.grad) - (-2.0 + np.exp(1.5))) < 1e-12
assert abs(float(b.grad) - 1.5) < 1e-12
assert float(by_walk[id(a)]) == float(a.grad) and float(by_walk[id(b)]) == float(b.grad)
assert best64 < 1e-8 < best32, (best64, best32)
assert col.grad.ravel().tolist() == [4.0, 4.0, 4.0] and row.grad.tolist() == [3.0] * 4
assert losses[-1] < 0.5 * losses[0] and accuracy > 0.9, (losses[-1], accuracy)
print("all checks passed")
