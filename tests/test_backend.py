"""minilora.backend: choosing NumPy or CuPy, transfers, and the few calls that differ."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora.errors import BackendError, InvalidArgumentError
from tests.helpers import host

ROOT = Path(__file__).resolve().parents[1]


def _cupy_usable() -> bool:
    try:
        B._import_cupy()
    except BackendError:
        return False
    return True


@pytest.fixture
def restore_backend():
    """Put back whatever backend the suite runs on (MINILORA_BACKEND may have chosen CuPy)."""
    previous = B.get_backend()
    yield
    B.use_backend(previous)


def test_use_backend_numpy(restore_backend):
    ml.use_backend("numpy")
    assert ml.get_backend() == "numpy"
    assert B.xp is np
    t = ml.Tensor([1.0, 2.0])
    assert isinstance(t.data, np.ndarray)


def test_unknown_backend_raises_and_changes_nothing(restore_backend):
    before = (B.get_backend(), B.xp)
    with pytest.raises(BackendError, match="'jax'.*'numpy' or 'cupy'"):
        ml.use_backend("jax")
    assert (B.get_backend(), B.xp) == before


@pytest.mark.skipif(_cupy_usable(), reason="CuPy and a GPU are available here")
def test_cupy_without_cupy_says_how_to_install(restore_backend):
    before = (B.get_backend(), B.xp)
    with pytest.raises(BackendError) as info:
        ml.use_backend("cupy")
    msg = str(info.value)
    assert "cupy" in msg.lower()
    assert "pip install" in msg and "minilora[gpu]" in msg
    assert "use_backend('numpy')" in msg
    assert (B.get_backend(), B.xp) == before


def test_backend_context_manager_restores(restore_backend):
    start = B.get_backend()
    with B.backend("numpy"):
        assert B.get_backend() == "numpy"
    assert B.get_backend() == start
    with pytest.raises(BackendError), B.backend("nope"):
        pass
    assert B.get_backend() == start


def _run_with_env(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINILORA_BACKEND": value, "PYTHONPATH": str(ROOT)}
    code = "import minilora as ml; print(ml.get_backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_strict_backend_by_name(restore_backend):
    from minilora import strict

    ml.use_backend("strict")
    assert ml.get_backend() == "strict" and B.xp is strict and B.on_device()
    t = ml.Tensor([1.0, 2.0])
    assert isinstance(t.data, strict.ndarray) and B.is_array(t.data)
    assert B.device_extras() is strict.cupyx
    np.testing.assert_array_equal(t.numpy(), [1.0, 2.0])
    ml.use_backend("numpy")
    assert not B.on_device() and B.xp is np and B.device_extras() is None


def test_on_device_names_the_device_backends(restore_backend):
    for name, device in (("numpy", False), ("strict", True)):
        with B.backend(name):
            assert B.on_device() is device
    if _cupy_usable():
        with B.backend("cupy"):
            assert B.on_device()


def test_env_var_selects_strict():
    done = _run_with_env("strict")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "strict"
    env = {**os.environ, "MINILORA_BACKEND": "Strict", "PYTHONPATH": str(ROOT)}
    code = ("import numpy as np, minilora as ml; t = ml.Tensor([1.0]); np.asarray(t.data)")
    refused = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Implicit conversion" in refused.stderr


def test_env_var_is_honoured():
    done = _run_with_env(" NumPy ")  # spaces and case are forgiven
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "numpy"
    bad = _run_with_env("tensorflow")
    assert bad.returncode != 0
    assert "BackendError" in bad.stderr and "'tensorflow'" in bad.stderr


# ----------------------------------------------------------------------------- scatter-add

@st.composite
def index_add_cases(draw, integer_values=True):
    """Indices (often repeating) and rows; integer-valued floats make every summation order
    give the same, exact answer."""
    num_rows = draw(st.one_of(st.integers(1, 40), st.integers(1025, 1100)))
    lead = draw(st.sampled_from([(0,), (1,), (7,), (3, 4), (2, 0), (300,)]))
    width = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    hi = draw(st.sampled_from([1, 3, num_rows]))  # few distinct values: many repeats
    idx = rng.integers(0, min(hi, num_rows), size=lead)
    values = rng.standard_normal(lead + (width,))
    if integer_values:
        values = np.round(values * 20)
    return idx, values, num_rows


def _add_at(idx, values, num_rows):
    expected = np.zeros((num_rows, values.shape[-1]))
    np.add.at(expected, idx.reshape(-1), values.reshape(-1, values.shape[-1]))
    return expected


@given(index_add_cases())
def test_index_add_rows_equals_add_at(case):
    idx, values, num_rows = case
    out = B.index_add_rows(B.asarray(idx), B.asarray(values), num_rows)
    assert out.shape == (num_rows, values.shape[-1])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(host(out), _add_at(idx, values, num_rows))


@given(index_add_cases(integer_values=False))
def test_both_cpu_paths_equal_add_at(case):
    """The one-hot matmul agrees to rounding; the sorted path rounds exactly as np.add.at."""
    idx, values, num_rows = case
    flat, rows = idx.reshape(-1), values.reshape(-1, values.shape[-1])
    expected = _add_at(idx, values, num_rows)
    if flat.size:
        np.testing.assert_allclose(B._index_add_onehot(flat, rows, num_rows), expected,
                                   rtol=1e-12, atol=1e-12)
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    first = np.r_[True, s[1:] != s[:-1]] if flat.size else np.zeros(0, bool)
    got = B._index_add_sorted(s, order, first, rows, num_rows)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("num_rows", [16, 3000])
def test_index_add_rows_float32_stays_float32(num_rows):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, num_rows, size=64)
    values = rng.standard_normal((64, 8)).astype(np.float32)
    out = B.index_add_rows(B.asarray(idx), B.asarray(values), num_rows)
    assert out.dtype == np.float32
    expected = np.zeros((num_rows, 8), np.float64)
    np.add.at(expected, idx, values.astype(np.float64))
    np.testing.assert_allclose(host(out), expected, rtol=1e-5, atol=1e-5)


def test_scatter_add_adds_duplicates():
    target = B.asarray(np.zeros(4))
    B.scatter_add(target, B.asarray(np.array([0, 0, 2, 0])), B.asarray(np.array([1.0, 2, 3, 4])))
    np.testing.assert_array_equal(host(target), [7.0, 0.0, 3.0, 0.0])
    naive = np.zeros(4)
    naive[np.array([0, 0, 2, 0])] += np.array([1.0, 2, 3, 4])
    assert naive[0] != 7.0  # the reason scatter_add exists: += keeps only one of the repeats


def test_scatter_add_rows_2d():
    target = B.asarray(np.zeros((3, 2)))
    B.scatter_add(target, B.asarray(np.array([2, 2])), B.asarray(np.ones((2, 2))))
    np.testing.assert_array_equal(host(target), [[0, 0], [0, 0], [2, 2]])


# ---------------------------------------------------------------------------- randomness

def test_manual_seed_gives_identical_init():
    ml.manual_seed(123)
    a = ml.nn.Linear(7, 5)
    ml.manual_seed(123)
    b = ml.nn.Linear(7, 5)
    np.testing.assert_array_equal(host(a.weight), host(b.weight))
    np.testing.assert_array_equal(host(a.bias), host(b.bias))
    ml.manual_seed(124)
    c = ml.nn.Linear(7, 5)
    assert not np.array_equal(host(a.weight), host(c.weight))


def test_manual_seed_gives_identical_dropout_masks():
    x = ml.Tensor(np.ones((50, 20), np.float32))
    ml.manual_seed(9)
    a = ml.functional.dropout(x, 0.3)
    ml.manual_seed(9)
    b = ml.functional.dropout(x, 0.3)
    np.testing.assert_array_equal(host(a), host(b))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_manual_seed_rejects_bad_seeds(seed):
    with pytest.raises(InvalidArgumentError, match="seed"):
        ml.manual_seed(seed)


def test_random_uniform_shape_dtype_range():
    for dtype in (np.float32, np.float64):
        u = B.random_uniform((300, 7), dtype)
        assert u.shape == (300, 7) and u.dtype == dtype
        h = host(u)
        assert h.min() >= 0.0 and h.max() < 1.0
        assert abs(h.mean() - 0.5) < 0.05


# ------------------------------------------------------------------------------- the rest

def test_memory_stats_is_a_dict():
    stats = B.memory_stats()
    assert isinstance(stats, dict)
    assert set(stats) == {"backend", "used_bytes", "total_bytes"}
    assert stats["backend"] == B.get_backend()
    if B.on_device():
        assert 0 <= stats["used_bytes"] <= stats["total_bytes"]


def test_default_dtype_switching():
    assert B.default_dtype() == np.float32
    assert ml.Tensor(1.5).dtype == np.float32
    assert ml.nn.Linear(3, 2).weight.dtype == np.float32
    ml.set_default_dtype(np.float64)
    assert ml.Tensor([1.5, 2.0]).dtype == np.float64
    assert ml.nn.Linear(3, 2).weight.dtype == np.float64
    ml.set_default_dtype("float32")
    with B.default_dtype_as(np.float64):
        assert ml.nn.LayerNorm(4).weight.dtype == np.float64
    assert B.default_dtype() == np.float32
    # an explicit array keeps its own dtype whatever the default
    assert ml.Tensor(np.zeros(2, np.float64)).dtype == np.float64


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "bool"])
def test_default_dtype_rejects_non_float32_64(dtype):
    with pytest.raises(InvalidArgumentError, match="float32 or float64"):
        ml.set_default_dtype(dtype)
    assert B.default_dtype() == np.float32


def test_transfers_round_trip():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev = B.asarray(x)
    assert B.is_array(dev)
    back = B.to_numpy(dev)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, x)
    assert B.asarray([1, 2], dtype=np.float64).dtype == np.float64
    assert not B.is_array([1, 2]) and not B.is_array(3.0)
    B.synchronize()  # a no-op on NumPy, a device sync on CuPy: must not fail either way


# ------------------------------------------------------------------- the device generator

def test_device_generator_state_round_trips_through_json(restore_backend):
    for name in ("numpy", "strict"):
        with B.backend(name):
            ml.manual_seed(3)
            B.random_uniform((5,), np.float32)
            state = json.loads(json.dumps(B.generator_state()))
            first = host(B.random_uniform((4, 3), np.float32))
            B.random_uniform((7,), np.float64)  # move on, then go back
            assert B.set_generator_state(state) is True
            again = host(B.random_uniform((4, 3), np.float32))
            assert first.tobytes() == again.tobytes()


def test_generator_state_of_another_backend_is_left_unapplied(restore_backend):
    with B.backend("numpy"):
        host_state = B.generator_state()
    with B.backend("strict"):
        device_state = B.generator_state()
        assert device_state["bit_generator"] == "minilora.counter"
        assert B.set_generator_state(host_state) is False
        assert B.generator_state() == device_state
    with B.backend("numpy"):
        assert B.set_generator_state(device_state) is False
    with pytest.raises(InvalidArgumentError, match="bit_generator"):
        B.set_generator_state({"seed": 1})
    with B.backend("strict"), pytest.raises(InvalidArgumentError, match="counter"):
        B.set_generator_state({"bit_generator": "minilora.counter", "seed": 1, "counter": -1})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counter_generator_is_uniform_and_continues_its_stream(restore_backend, dtype):
    with B.backend("strict"):
        g = B.CounterGenerator(11)
        whole = host(g.random((1000,), dtype))
        h = B.CounterGenerator(11)
        parts = np.concatenate([host(h.random((300,), dtype)), host(h.random((700,), dtype))])
    assert whole.dtype == dtype and whole.tobytes() == parts.tobytes()
    assert whole.min() >= 0.0 and whole.max() < 1.0
    assert abs(whole.mean() - 0.5) < 0.03 and abs(whole.var() - 1 / 12) < 0.01
    # neighbouring samples are not correlated (a counter hash, not a bad LCG)
    assert abs(np.corrcoef(whole[:-1], whole[1:])[0, 1]) < 0.1
    assert h.state == {"bit_generator": "minilora.counter", "seed": 11, "counter": 1000}


def test_spawned_device_generators_follow_the_host_seed(restore_backend):
    with B.backend("strict"):
        ml.manual_seed(4)
        a = [host(g.random((6,), np.float32)) for g in B.spawn_generators(2)]
        ml.manual_seed(4)
        b = [host(g.random((6,), np.float32)) for g in B.spawn_generators(2)]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert a[0].tobytes() != a[1].tobytes()
