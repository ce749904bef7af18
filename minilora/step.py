"""The training step's shards: one step's forward and backward on a batch cut into shards.

This is the train layer's own machinery (``train`` calls :func:`forward_backward` every step); the
model and the autograd below it know nothing of shards.

A batch of B rows is cut into S shards of consecutive rows. With L_s the mean loss over the n_s
scored targets of shard s (targets equal to ``ignore_index`` are not scored) and n = sum_s n_s,
the batch's mean loss and its gradient are

    L = sum_s (n_s / n) L_s            dL/dtheta = sum_s (n_s / n) dL_s/dtheta

so each shard runs its own forward pass and starts its backward pass from n_s / n instead of 1.

Micro-batches: a shard may run its rows as m consecutive pieces, one after another in its thread
(gradient accumulation): the same sum over pieces instead of shards, each piece's backward
starting from n_p / n. Only one piece per shard holds its activations at a time, so what a step
holds for its backward pass shrinks m-fold while the matrix products stay as large as the BLAS
needs (``default_micro_batches``: pieces of about 512 tokens on the CPU). The pieces of one shard
add their gradients into the shard's store in piece order.

Why: NumPy releases the GIL inside BLAS calls and ufunc loops, so two Python threads, each with a
one-thread BLAS, keep two cores busy through the matmuls *and* the elementwise work between them
(GELU, LayerNorm, softmax, which NumPy runs on one thread). A multi-threaded BLAS parallelises
only the matmuls, and on matrices this small its threads spend much of their time waiting for
each other (benchmarks/RESULTS.md has the figures).

Running the shards on threads is a fast form: with the fast forms off (``fast.enabled()`` False,
``MINILORA_REFERENCE=1``) the batch is cut into the same shards, with the same generators, and
their gradients are added in the same order, so the numbers are the same, but the shards run one
after another in the calling thread and the BLAS thread count is left alone.

Same seed, same result: each shard writes its gradients into its own store
(``tensor.leaf_grads_into``) and the stores are added in shard order once all are done, so the
result depends on the number of shards and micro-batches, never on the number of threads or on
which finished first. Each shard draws its dropout masks from its own generator (its pieces in
turn), seeded from the global one before the shards start. One shard of one piece is exactly
``loss = model(idx, targets)[1]; loss.backward()``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np

from . import backend as B
from . import fast
from .errors import GraphError, ShapeError, check_int
from .fast import cpu
from .tensor import is_grad_enabled, leaf_grads_into

# parameters from which a model trains on one shard on the CPU: GPT-2 small (124M) steps as fast on
# one shard as on two, and two shards hold two pieces' activations and two copies of the
# gradients at once (benchmarks/RESULTS.md, "third pass")
ONE_SHARD_FROM = 1 << 25


def default_shards(model: Any = None) -> int:
    """Shards for a step when none are asked for: one on a device (which runs each kernel in
    parallel already, and whose shards would only run one after another); on the CPU two (two
    threads keep two cores busy), or one for a ``model`` of ``ONE_SHARD_FROM`` parameters or
    more, whose matrix products are large enough for OpenBLAS's own threads and whose second
    shard would cost far more memory than it saves time."""
    if B.on_device():
        return 1
    size = model.num_parameters() if hasattr(model, "num_parameters") else 0
    return 1 if size >= ONE_SHARD_FROM else 2


# Tokens per micro-batch the CPU default aims at: OpenBLAS runs the linear layers' products at
# the same rate from 256 rows up (benchmarks/RESULTS.md), and a piece this size keeps what a
# forward pass holds for its backward a few MiB per layer.
PIECE_TOKENS = 512


def default_micro_batches(rows: int, tokens_per_row: int, shards: int) -> int:
    """Micro-batches per shard when none are asked for: on the CPU, pieces of about
    ``PIECE_TOKENS`` tokens (at least one row each), so a shard runs its rows in turn and only
    one piece per shard holds activations at a time; one on a device, which has the memory and
    whose kernels gain from the larger batch."""
    for name, v in (("rows", rows), ("tokens_per_row", tokens_per_row), ("shards", shards)):
        check_int(v, f"default_micro_batches: {name}")
    if B.on_device():
        return 1
    per_shard = max(1, rows // shards)
    return max(1, min(per_shard, per_shard * tokens_per_row // PIECE_TOKENS))


def default_threads(shards: int) -> int:
    """Threads for ``shards`` shards: one per shard up to the cores there are on the CPU; one on a
    device, where the device already runs each kernel in parallel; one with the fast forms off
    (``fast.enabled()`` False), where the shards run one after another."""
    if not fast.enabled() or B.on_device():
        return 1
    return max(1, min(shards, cpu.available_cpus()))


def _rows(data: Any) -> Any:
    """``data`` as an array where it is: host data stays on the host (the model checks and
    uploads it), device data on the device."""
    return data if B.is_array(data) else np.asarray(data)


def _check(idx: Any, targets: Any, shards: Any, threads: Any) -> tuple[Any, Any]:
    check_int(shards, "forward_backward: shards")
    if threads is not None:
        check_int(threads, "forward_backward: threads")
    if not is_grad_enabled():
        raise GraphError("forward_backward: called under no_grad(), but it exists to compute "
                         "gradients")
    idx, targets = _rows(idx), _rows(targets)
    if idx.ndim < 1 or targets.shape[:1] != idx.shape[:1]:
        raise ShapeError(f"forward_backward: idx {tuple(idx.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same number of rows (axis 0)")
    return idx, targets


def _scored(targets: Any, bounds: list[int], ignore_index: int) -> list[int]:
    """The scored targets (not ``ignore_index``) of each shard: counted on the host for host
    targets, for device ones on the device and brought back in one transfer."""
    counts = [(targets[a:b] != ignore_index).sum() for a, b in zip(bounds, bounds[1:])]
    if isinstance(targets, np.ndarray):
        return [int(c) for c in counts]
    return [int(c) for c in B.to_numpy(B.xp.stack(counts))]


def forward_backward(model: Any, idx: Any, targets: Any, shards: int | None = None,
                     threads: int | None = None, ignore_index: int = -100, *,
                     micro_batches: int = 1, sync: bool = True) -> Any:
    """Run ``model(idx, targets) -> (logits, loss)`` and its backward pass, the batch cut into
    ``shards`` row-shards (default :func:`default_shards` of the model); returns the batch's mean
    loss as a float, or with ``sync=False`` as a 0-d float64 array on the active device, so that
    the caller can bring it to the host together with what else it needs (one transfer, not two).

    idx and targets have the same number of rows B (axis 0); at most B shards are used. They are
    handed to the model where they are (host data stays on the host, where the model checks it
    for free). The loss must be a mean over the targets not equal to ``ignore_index`` (as
    ``F.cross_entropy``'s). Gradients are added into each parameter's ``.grad``, as
    ``loss.backward()`` would. ``threads`` (default :func:`default_threads`) run the shards; while
    more than one does, OpenBLAS is held at one thread. With the fast forms off the shards run one
    after another, whatever ``threads`` says. Should a shard fail, no gradient is changed.
    ``micro_batches`` m: each shard runs its rows as m pieces in turn (at most one row each);
    1 runs each shard whole, and with one shard that is the plain step.
    """
    shards = default_shards(model) if shards is None else shards
    idx, targets = _check(idx, targets, shards, threads)
    check_int(micro_batches, "forward_backward: micro_batches")
    loss = _loss_and_grads(model, idx, targets, shards, threads, ignore_index, micro_batches)
    return float(loss) if sync else loss


def _loss_and_grads(model: Any, idx: Any, targets: Any, shards: int, threads: int | None,
                    ignore_index: int, micro: int = 1) -> Any:
    """:func:`forward_backward`'s work; the loss as a 0-d float64 device array (no sync)."""
    rows = idx.shape[0]
    shards = min(shards, rows)
    micro = max(1, min(micro, rows // shards))
    if shards * micro == 1:  # the plain step, unchanged
        return _plain_step(model, idx, targets)
    pieces = shards * micro  # shard s runs pieces s * micro .. (s + 1) * micro - 1, in order
    bounds = [rows * s // pieces for s in range(pieces + 1)]
    counts = _scored(targets, bounds, ignore_index)
    total = sum(counts)
    if total == 0:  # nothing scored: the plain step, its loss NaN
        return _plain_step(model, idx, targets)
    generators = B.spawn_generators(shards)
    # threads are a fast form: with the fast forms off the same shards run one after another
    threads = min(threads or default_threads(shards), shards) if fast.enabled() else 1
    results: list = [None] * shards

    def run(s: int) -> None:
        store: dict = {}
        part = None
        with leaf_grads_into(store), B.generator_as(generators[s]):
            for p in range(s * micro, (s + 1) * micro):
                if counts[p] == 0:  # its loss is NaN and its weight 0: it adds nothing
                    continue
                a, b = bounds[p], bounds[p + 1]
                weight = counts[p] / total
                loss = model(idx[a:b], targets[a:b])[1]  # the logits go now, not next piece
                loss.backward(B.xp.asarray(weight, dtype=loss.dtype))
                # (n_p / n) L_p in float64, on the device: the host would need a sync per piece
                term = loss.data.astype(np.float64, copy=False).reshape(()) * weight
                part = term if part is None else part + term
                del loss  # its graph goes before the next piece's is built
        results[s] = (part, store)

    rows_per_shard = [bounds[(s + 1) * micro] - bounds[s * micro] for s in range(shards)]
    with cpu.blas_threads_as(1) if threads > 1 else nullcontext():
        # re-raises a shard's failure before any gradient is touched
        cpu.for_each_in_threads(run, rows_per_shard, threads)
    _add_in_order([store for _, store in results], threads)
    parts = [part for part, _ in results if part is not None]
    loss_sum = parts[0]
    for part in parts[1:]:  # in shard order, as a running sum
        loss_sum = loss_sum + part
    return loss_sum


def _plain_step(model: Any, idx: Any, targets: Any) -> Any:
    """``model(idx, targets)[1].backward()`` on the whole batch; its loss as a 0-d float64."""
    loss = model(idx, targets)[1]  # the logits go now: nothing of the backward needs them
    loss.backward()
    return loss.data.astype(np.float64, copy=False).reshape(())


def _add_in_order(stores: list[dict], threads: int) -> None:
    """Add the shards' gradients into ``leaf.grad``: g_0 + g_1 + ... per leaf, in shard order,
    the leaves split among ``threads`` threads (each leaf's sum is its own, so the bits do not
    depend on the split)."""
    parts: dict = {}
    for store in stores:
        for key, (leaf, g, owned) in store.items():
            parts.setdefault(key, (leaf, [], owned))[1].append(g)
    work = list(parts.values())

    def add(i: int) -> None:
        leaf, gs, owned = work[i]
        first = gs[0]
        if not owned or first.dtype != leaf.data.dtype:  # shared with its graph: copy
            first = first.astype(leaf.data.dtype, copy=True)
        for g in gs[1:]:
            first += g  # into the first shard's array: no third copy of the gradients
        leaf.grad = first if leaf.grad is None else leaf.grad + first

    cpu.for_each_in_threads(add, [gs[0].size for _, gs, _ in work], threads)


__all__ = ["forward_backward", "default_shards", "default_threads", "default_micro_batches",
           "PIECE_TOKENS", "ONE_SHARD_FROM"]
