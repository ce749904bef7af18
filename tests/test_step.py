"""step.forward_backward: a batch in shards gives the whole batch's loss and gradients, the same
bits whatever the number of threads, and changes nothing when a shard fails; with the fast forms
off the same shards give the same numbers, one after another. Also the CPU helpers it runs on."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import GPT, GPTConfig, fast
from minilora import functional as F
from minilora.errors import GraphError, InvalidArgumentError, ShapeError
from minilora.fast import cpu
from minilora.step import PIECE_TOKENS, default_micro_batches, default_threads, forward_backward
from minilora.tensor import leaf_grads_into
from tests.helpers import host

V, T = 11, 6


def tiny_gpt(dropout=0.0, seed=0):
    ml.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=8,
                         dropout=dropout))


def batch(rows, seed=0, ignored=()):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (rows, T))
    y = rng.integers(0, V, (rows, T))
    for r, t in ignored:
        y[r % rows, t % T] = -100
    return x, y


def grads(model):
    return {n: None if p.grad is None else host(p.grad).copy()
            for n, p in model.named_parameters()}


def whole_batch(model, x, y):
    _, loss = model(x, y)
    loss.backward()
    return float(loss.item()), grads(model)


@given(rows=st.integers(1, 7), shards=st.integers(1, 5), threads=st.sampled_from([None, 1, 2]),
       ignored=st.lists(st.tuples(st.integers(0, 6), st.integers(0, T - 1)), max_size=12),
       micro=st.integers(1, 4))
def test_shards_give_the_whole_batchs_loss_and_gradients(rows, shards, threads, ignored, micro):
    """Shards, and each shard's micro-batches (gradient accumulation), give the whole batch's
    loss and gradients (float64)."""
    ml.set_default_dtype(np.float64)
    x, y = batch(rows, ignored=ignored)
    model = tiny_gpt()
    model.double()
    loss, expected = whole_batch(model, x, y)
    model.zero_grad()
    got_loss = forward_backward(model, x, y, shards=shards, threads=threads, micro_batches=micro)
    got = grads(model)
    assert got_loss == pytest.approx(loss, rel=1e-12, abs=1e-12) or (np.isnan(loss) and
                                                                    np.isnan(got_loss))
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("shards,micro", [(1, 2), (2, 2), (2, 3)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_micro_batches_give_the_same_bits_whatever_the_threads(shards, micro, dropout):
    x, y = batch(7, ignored=[(0, 1), (4, 2)])
    results = []
    for threads in (1, 2):
        model = tiny_gpt(dropout)
        ml.manual_seed(7)
        loss = forward_backward(model, x, y, shards=shards, threads=threads, micro_batches=micro)
        results.append((loss, grads(model)))
    (first_loss, first), (loss, got) = results
    assert loss == first_loss
    for name, g in got.items():
        assert np.array_equal(g, first[name]), name


def test_a_shard_of_pieces_is_the_pieces_run_in_turn_bit_for_bit():
    """One shard of two pieces is exactly: backward of piece 1 weighted n_1 / n, then of piece 2
    weighted n_2 / n, the second gradient added into the first (the store's order)."""
    x, y = batch(4)
    model = tiny_gpt()
    forward_backward(model, x, y, shards=1, micro_batches=2)
    got = grads(model)
    model.zero_grad()
    for a, b in ((0, 2), (2, 4)):
        _, loss = model(x[a:b], y[a:b])
        loss.backward(np.asarray(0.5, dtype=np.float32))
    for name, g in grads(model).items():
        assert np.array_equal(got[name], g), name


def test_only_one_piece_per_shard_holds_its_graph_at_a_time():
    """What a step holds for its backward shrinks with the pieces: with m pieces per shard only
    one piece's graph is alive at a time (peak traced memory of a step, 1 piece against 4)."""
    import tracemalloc

    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=64))
    x = np.random.default_rng(0).integers(0, V, (16, 32))
    peaks = {}
    for micro in (1, 4, 1, 4):  # twice each: the first may page code in
        model.zero_grad()
        tracemalloc.start()
        forward_backward(model, x, x, shards=1, micro_batches=micro)
        peaks[micro] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[4] < 0.5 * peaks[1], peaks


@pytest.mark.host_only("a rule about sizes: it makes no arrays")
def test_default_micro_batches_aim_at_pieces_of_a_few_hundred_tokens(monkeypatch):
    monkeypatch.setattr(ml.backend, "on_device", lambda: False)  # the CPU's rule, on any backend
    assert default_micro_batches(16, 128, 2) == 16 * 128 // 2 // PIECE_TOKENS
    assert default_micro_batches(64, 12, 2) == 1  # short rows: the shard is one piece already
    assert default_micro_batches(3, 4096, 2) == 1  # never less than a row a piece
    monkeypatch.setattr(ml.backend, "on_device", lambda: True)
    assert default_micro_batches(16, 128, 1) == 1  # a device has the memory, and wants the rows
    with pytest.raises(InvalidArgumentError, match="tokens_per_row"):
        default_micro_batches(16, 0, 2)


def test_one_shard_is_the_plain_step_bit_for_bit():
    x, y = batch(4)
    model = tiny_gpt()
    loss, expected = whole_batch(model, x, y)
    model.zero_grad()
    assert forward_backward(model, x, y, shards=1) == loss
    for name, g in grads(model).items():
        assert np.array_equal(g, expected[name]), name


@pytest.mark.parametrize("shards", [2, 3, 5])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_result_depends_on_the_shards_not_the_threads(shards, dropout):
    x, y = batch(6, ignored=[(0, 1), (4, 2)])
    results = []
    for threads in (1, 2, shards):
        model = tiny_gpt(dropout)
        ml.manual_seed(7)  # dropout masks come from generators seeded by the global one
        loss = forward_backward(model, x, y, shards=shards, threads=threads)
        results.append((loss, grads(model)))
    first_loss, first = results[0]
    for loss, got in results[1:]:
        assert loss == first_loss
        for name, g in got.items():
            assert np.array_equal(g, first[name]), name


def test_dropout_masks_follow_the_seed():
    x, y = batch(4)

    def run(seed):
        model = tiny_gpt(0.5)
        ml.manual_seed(seed)
        return forward_backward(model, x, y, shards=2, threads=2)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_gradients_are_added_to_what_is_there():
    x, y = batch(4)
    model = tiny_gpt()
    _, once = whole_batch(model, x, y)
    forward_backward(model, x, y, shards=2)  # a second time, on top of the first
    for name, g in grads(model).items():
        np.testing.assert_allclose(g, 2 * once[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_failing_shard_changes_no_gradient():
    x, y = batch(4)
    model = tiny_gpt()
    _, before = whole_batch(model, x, y)
    calls = []

    class Failing:
        def __call__(self, idx, targets):
            calls.append(len(idx))
            if len(calls) == 2:
                raise RuntimeError("shard failed")
            return model(idx, targets)

    with pytest.raises(RuntimeError, match="shard failed"):
        forward_backward(Failing(), x, y, shards=2, threads=1)
    for name, g in grads(model).items():
        assert np.array_equal(g, before[name]), name


def test_a_shard_with_nothing_scored_adds_nothing():
    x, y = batch(4)
    y[:2] = -100  # the first shard scores no target
    model = tiny_gpt()
    loss, expected = whole_batch(model, x, y)
    model.zero_grad()
    assert forward_backward(model, x, y, shards=2) == pytest.approx(loss, rel=1e-6)
    for name, g in grads(model).items():
        np.testing.assert_allclose(g, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_nothing_scored_at_all_is_the_plain_step():
    x, y = batch(4)
    y[:] = -100
    model = tiny_gpt()
    assert np.isnan(forward_backward(model, x, y, shards=2))


def test_leaf_gradients_can_be_collected_instead_of_stored():
    w = ml.Tensor(np.arange(3.0), requires_grad=True)
    store = {}
    with leaf_grads_into(store):
        (w * w).sum().backward()
        (w * 2.0).sum().backward()
    assert w.grad is None
    leaf, g, _ = store[id(w)]
    assert leaf is w and np.allclose(host(g), 2 * np.arange(3.0) + 2.0)
    (w * w).sum().backward()  # outside the block: into .grad again
    assert np.allclose(host(w.grad), 2 * np.arange(3.0))


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(shards=0), InvalidArgumentError, r"shards must be an int >= 1 \(positive\), got 0"),
    (dict(shards=True), InvalidArgumentError, "shards.*got True"),
    (dict(shards=2.0), InvalidArgumentError, "shards.*got 2.0"),
    (dict(threads=0), InvalidArgumentError, r"threads must be an int >= 1 \(positive\), got 0"),
    (dict(threads="2"), InvalidArgumentError, "threads.*got '2'"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    x, y = batch(2)
    with pytest.raises(error, match=words):
        forward_backward(tiny_gpt(), x, y, **kwargs)


def test_mismatched_rows_and_no_grad_are_refused():
    x, y = batch(3)
    with pytest.raises(ShapeError, match=r"\(3, 6\).*\(2, 6\)"):
        forward_backward(tiny_gpt(), x, y[:2])
    with ml.no_grad(), pytest.raises(GraphError, match="no_grad"):
        forward_backward(tiny_gpt(), x, y)


def test_default_threads_use_the_cores_there_are():
    with fast.forms(True):
        assert 1 <= default_threads(2) <= 2
        assert default_threads(1) == 1
        if not ml.backend.on_device():
            assert default_threads(64) == cpu.available_cpus()
    with fast.reference():
        assert default_threads(2) == default_threads(64) == 1


# ------------------------------------------------------------------ with the fast forms off

class Plain:
    """A model made of tensor ops alone (no op that has a fast form), with dropout: the fast
    forms switch changes nothing in it but how the shards are run."""

    def __init__(self, p=0.3):
        rng = np.random.default_rng(0)
        self.wte = ml.Tensor(rng.standard_normal((V, 8)), requires_grad=True)
        self.w = ml.Tensor(rng.standard_normal((8, V)) / 3, requires_grad=True)
        self.b = ml.Tensor(rng.standard_normal(V) / 3, requires_grad=True)
        self.p = p

    def __call__(self, idx, targets):
        h = F.dropout(self.wte[idx].tanh(), self.p)  # (B, T, 8): the dropout masks' generators
        logits = h @ self.w + self.b  # (B, T, V)
        return logits, F.cross_entropy(logits, targets)

    def grads(self):
        return {n: host(t.grad).copy() for n, t in (("wte", self.wte), ("w", self.w),
                                                      ("b", self.b))}


def sharded(model, x, y, forms, threads, shards=2):
    ml.manual_seed(5)
    with fast.forms(forms):
        loss = forward_backward(model, x, y, shards=shards, threads=threads)
    return loss, model.grads()


@pytest.mark.parametrize("shards", [2, 3])
def test_reference_forms_give_the_same_shards_the_same_bits(shards):
    """Without ops that have fast forms, the switch changes only how shards run: the same cuts,
    generators and order of sums give the same bits, threads or not."""
    x, y = batch(6, ignored=[(1, 0), (5, 3)])
    ref_loss, ref = sharded(Plain(), x, y, False, None, shards)
    for threads in (1, 2):
        loss, got = sharded(Plain(), x, y, True, threads, shards)
        assert loss == ref_loss
        for name, g in got.items():
            assert np.array_equal(g, ref[name]), (threads, name)


def test_reference_shards_in_a_gpt_give_the_fast_shards_numbers():
    """A GPT's ops do have fast forms (fused GELU, LayerNorm, attention), whose sums may run in
    another order, and a fast form may draw a dropout mask in its own layout (the same
    distribution, other numbers): so without dropout the reference run equals the fast run at
    threads=1 within float64 rounding; with dropout, and the kernels taken out of the fast run
    (what is left of the fast forms is the shards' threads), bit for bit."""
    ml.set_default_dtype(np.float64)
    x, y = batch(5, ignored=[(0, 2)])

    def run(forms, threads, kernels=True):
        model = tiny_gpt(dropout=0.0 if kernels else 0.2)
        model.double()
        ml.manual_seed(11)
        with fast.forms(forms):
            if kernels:
                loss = forward_backward(model, x, y, shards=2, threads=threads)
            else:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(fast, "kernel", lambda name: None)
                    loss = forward_backward(model, x, y, shards=2, threads=threads)
        return loss, grads(model)

    ref_loss, ref = run(False, None)
    loss, got = run(True, 1)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name, g in got.items():
        np.testing.assert_allclose(g, ref[name], rtol=1e-9, atol=1e-12, err_msg=name)
    ref_loss, ref = run(False, None, kernels=False)
    for threads in (1, 2):
        loss, got = run(True, threads, kernels=False)
        assert loss == ref_loss
        for name, g in got.items():
            assert np.array_equal(g, ref[name]), (threads, name)


def test_reference_forms_run_the_shards_one_after_another(monkeypatch):
    """Under fast.reference() every shard runs in the calling thread, even when threads are asked
    for, and OpenBLAS's thread count is not touched."""
    import threading

    pools, blas = [], []
    real_run = cpu.run_in_threads
    monkeypatch.setattr(cpu, "run_in_threads", lambda tasks: pools.append(len(tasks)) or
                        real_run(tasks))
    monkeypatch.setattr(cpu, "set_blas_threads", lambda n: blas.append(n) or True)
    model, where = Plain(), []

    def spy(idx, targets):
        where.append(threading.current_thread())
        return model(idx, targets)
    x, y = batch(6)
    with fast.reference():
        forward_backward(spy, x, y, shards=3, threads=3)
    assert where == [threading.current_thread()] * 3
    assert pools and max(pools) == 1 and blas == []
    if cpu.available_cpus() > 1 and not ml.backend.on_device():  # the spies can fail
        pools.clear()
        with fast.forms(True):
            forward_backward(spy, x, y, shards=3, threads=3)
        assert max(pools) > 1


def test_blas_threads_are_restored_after_a_block():
    before = cpu.get_blas_threads()
    if before is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    with cpu.blas_threads_as(before + 1) as ok:
        assert ok and cpu.get_blas_threads() == before + 1
    assert cpu.get_blas_threads() == before


@pytest.mark.host_only("asks OpenBLAS for a name in child processes; makes no arrays")
def test_blas_core_names_the_kernel_table_openblas_was_told_to_run():
    import os
    import platform
    import subprocess
    import sys

    if cpu.blas_core() is None:
        pytest.skip("NumPy's OpenBLAS cannot say its kernels here")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the kernel tables named below are x86's")
    ask = "from minilora.fast import cpu; print(cpu.blas_core())"
    for table in ("Haswell", "Sandybridge"):  # tables every x86-64 CPU of the last decade runs
        env = {**os.environ, "OPENBLAS_CORETYPE": table}
        out = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        assert out.stdout.strip() == table, (table, out.stdout, out.stderr)


def test_freed_memory_can_be_kept_where_glibc_is():
    import platform

    kept = cpu.keep_freed_memory()
    assert isinstance(kept, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kept


def test_tasks_run_side_by_side_and_report_in_order():
    import threading
    import time

    barrier = threading.Barrier(2, timeout=10)  # both must be running at once to pass it

    def task(k):
        barrier.wait()
        time.sleep(0.01 * (2 - k))  # the first finishes last
        return k, threading.current_thread().name
    out = cpu.run_in_threads([lambda: task(0), lambda: task(1)])
    assert [k for k, _ in out] == [0, 1]
    assert out[0][1] != out[1][1]


def test_a_failing_task_is_raised_after_all_have_finished():
    finished = []

    def ok():
        finished.append(1)
        return 1

    def bad():
        raise ValueError("task 1 failed")
    with pytest.raises(ValueError, match="task 1 failed"):
        cpu.run_in_threads([ok, bad, ok])
    assert len(finished) == 2


def test_tasks_inside_a_task_run_inline():
    import threading

    def outer():
        inner = cpu.run_in_threads([threading.current_thread, threading.current_thread])
        return threading.current_thread(), inner
    for me, inner in cpu.run_in_threads([outer, outer]):
        assert inner == [me, me]


@given(st.lists(st.integers(0, 1000), max_size=30), st.integers(1, 5))
def test_balanced_groups_split_every_index_once_and_evenly(sizes, n):
    groups = cpu.balanced_groups(sizes, n)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) <= n and all(g == sorted(g) and g for g in groups)
    totals = [sum(sizes[i] for i in g) for g in groups]
    if len(groups) == n and sizes:
        assert max(totals) - min(totals) <= max(sizes)


def test_two_leaves_handed_one_gradient_array_keep_their_own():
    """add gives p and q the same gradient array in each shard; summing the shards into it in
    place would write one leaf's gradient into the other's."""
    from minilora import functional as F

    class TwoLeaves:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.p = ml.Tensor(rng.standard_normal(V), requires_grad=True)
            self.q = ml.Tensor(rng.standard_normal(V), requires_grad=True)

        def __call__(self, idx, targets):
            logits = (self.p + self.q) * ml.Tensor(np.ones((len(idx), T, V)))
            return logits, F.cross_entropy(logits, targets)

    x, y = batch(4)
    plain = TwoLeaves()
    plain(x, y)[1].backward()
    sharded = TwoLeaves()
    forward_backward(sharded, x, y, shards=2)
    assert sharded.p.grad is not sharded.q.grad
    for name in ("p", "q"):
        np.testing.assert_allclose(host(getattr(sharded, name).grad),
                                   host(getattr(plain, name).grad), rtol=1e-5, atol=1e-7)


@given(st.lists(st.integers(0, 100), max_size=20), st.integers(1, 4))
def test_for_each_in_threads_calls_every_index_once(sizes, threads):
    import threading

    seen, lock = [], threading.Lock()

    def fn(i):
        with lock:
            seen.append(i)
    cpu.for_each_in_threads(fn, sizes, threads)
    assert sorted(seen) == list(range(len(sizes)))


# ----------------------------------------------------------- the loss left on the device

@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("on_device", [False, True])
def test_the_loss_can_stay_on_the_device_as_the_same_float64(shards, on_device):
    """sync=False gives a 0-d float64 array holding exactly the float forward_backward returns,
    for batches from the host or already on the device."""
    x, y = batch(5, ignored=[(0, 1), (3, 2)])
    if on_device:
        x, y = ml.backend.asarray(x), ml.backend.asarray(y)
    values = []
    for sync in (True, False):
        model = tiny_gpt()
        values.append(forward_backward(model, x, y, shards=shards, sync=sync))
        values.append(grads(model))
    loss, g_loss, arr, g_arr = values
    assert isinstance(loss, float) and arr.shape == () and arr.dtype == np.float64
    assert float(host(arr)) == loss
    for name, g in g_loss.items():
        assert np.array_equal(g, g_arr[name]), name


def test_unchosen_shards_are_two_on_the_cpu_and_one_on_a_device(monkeypatch):
    from minilora import step

    assert step.default_shards() == (1 if ml.backend.on_device() else 2)
    cuts = []
    real = step._scored
    monkeypatch.setattr(step, "_scored", lambda t, bounds, i: cuts.append(bounds) or
                        real(t, bounds, i))
    x, y = batch(4)
    forward_backward(tiny_gpt(), x, y)
    assert cuts == ([] if ml.backend.on_device() else [[0, 2, 4]])  # one shard needs no counts


def test_a_model_from_one_shard_from_parameters_trains_on_one_shard(monkeypatch):
    """default_shards(model): one shard on the CPU from ONE_SHARD_FROM parameters on (and on a
    device always), two below; forward_backward without shards asks it about its model."""
    from minilora import step

    model = tiny_gpt()
    size = model.num_parameters()
    two = 1 if ml.backend.on_device() else 2
    assert step.default_shards(model) == two  # far below GPT-2 small's size
    monkeypatch.setattr(step, "ONE_SHARD_FROM", size)
    assert step.default_shards(model) == 1
    monkeypatch.setattr(step, "ONE_SHARD_FROM", size + 1)
    assert step.default_shards(model) == two
    monkeypatch.setattr(step, "ONE_SHARD_FROM", size)
    cuts = []
    real = step._scored
    monkeypatch.setattr(step, "_scored", lambda t, bounds, i: cuts.append(bounds) or
                        real(t, bounds, i))
    x, y = batch(4)
    forward_backward(model, x, y)
    assert cuts == []  # one shard of one piece: the plain step, no counts
