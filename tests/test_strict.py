"""minilora.strict, the stand-in for CuPy: its contract, as tests (it must refuse what CuPy refuses
and count what a GPU pays for, or the strict suite proves nothing)."""

import gc
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend as B
from minilora import strict as S
from minilora.errors import InvalidArgumentError


def _dev(a):
    return S.asarray(np.asarray(a))


# ------------------------------------------------------------------------ host conversion

def test_implicit_conversion_to_numpy_is_refused():
    a = _dev([1.0, 2.0])
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError):
        np.array([a, a])


@pytest.mark.parametrize("call", [
    lambda a, h: a + h, lambda a, h: h + a, lambda a, h: a * h, lambda a, h: a @ h.reshape(2, 1),
    lambda a, h: S.add(a, h), lambda a, h: S.concatenate([a, h]), lambda a, h: S.where(a > 0, a, h),
    lambda a, h: np.add(h, a), lambda a, h: a.dot(h), lambda a, h: a.__setitem__(slice(None), h),
    lambda a, h: a[h.astype(np.int64)], lambda a, h: S.exp(h), lambda a, h: S.sum(h),
])
def test_kernels_refuse_host_arrays(call):
    a, h = _dev([1.0, 2.0]), np.array([3.0, 4.0])
    with pytest.raises(TypeError, match="NumPy array|host"):
        call(a, h)


def test_scalars_are_fine_operands():
    a = _dev([1.0, 2.0])
    assert (a * 2.0 + np.float32(1) - 1).get().tolist() == [2.0, 4.0]
    assert isinstance(a * np.float64(2), S.ndarray)


def test_reductions_and_single_elements_are_0d_device_arrays():
    a = _dev(np.arange(6.0).reshape(2, 3))
    for r in (a.sum(), a.max(), a.mean(), a.argmax(), S.sum(a), a[1, 2], a[0][0], (a > 1).any()):
        assert isinstance(r, S.ndarray) and r.shape == ()
    assert a.sum(axis=0).shape == (3,)
    assert a.sum(axis=1, keepdims=True).shape == (2, 1)


# ------------------------------------------------------------------------------- counting

def test_host_reads_are_syncs():
    a = _dev(np.arange(4.0))
    s = a.sum()
    with S.counting() as c:
        float(s), int(s), bool(s), s.item(), a.tolist(), a.get(), S.asnumpy(a)
    assert c.syncs == 7 and c.uploads == 0
    with S.counting() as c:
        b = a * 2  # a kernel: no sync
    assert c.syncs == 0 and c.launches == 1 and isinstance(b, S.ndarray)


def test_uploads_are_counted_for_host_data_only():
    with S.counting() as c:
        a = S.asarray(np.ones(3))
        S.asarray([1, 2, 3])
        S.array(np.zeros(2))
    assert c.uploads == 3
    with S.counting() as c:
        assert S.asarray(a) is a  # already on the device: nothing moves
    assert c.uploads == 0 and c.launches == 0


def test_launches_are_counted_per_call_site():
    a = _dev(np.ones((4, 4)))
    with S.counting() as c:
        for _ in range(3):
            b = a + 1  # site A
        S.exp(b)  # site B
        a.reshape(16)  # a view: no launch
    assert c.launches == 4
    sites = {k: v.launches for k, v in c.by_site.items()}
    here = [k for k in sites if k.startswith("tests/test_strict.py:")]
    assert sorted(sites[k] for k in here) == [1, 3]
    assert all(k.split(":")[-1].isdigit() for k in here)


def test_counting_is_live_inside_and_nested_blocks_see_their_own():
    a = _dev(np.ones(3))
    with S.counting() as outer:
        a + 1
        assert outer.launches == 1  # live
        with S.counting() as inner:
            a + 1
        a + 1
    assert (outer.launches, inner.launches) == (3, 1)
    before = S.counts()
    a + 1
    assert S.counts().launches == before.launches + 1
    assert before.launches == S.counts().launches - 1  # a snapshot does not move


def test_sites_outside_backend_are_named():
    """The frames of backend.py are skipped: the site is the caller of backend's function."""
    with B.backend("strict"), S.counting() as c:
        B.asarray(np.ones(2))
    assert c.uploads == 1
    (site,) = c.by_site
    assert site.startswith("tests/test_strict.py:")


# ------------------------------------------------------------------------ scatter-add

def test_cupyx_scatter_add_shuffles_the_order_of_updates():
    """float32 sums of many repeats round differently in different orders: the emulated atomics
    must show that, or the strict suite would hide order-dependent bits."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4000) * 10 ** rng.uniform(-4, 4, 4000)).astype(np.float32)
    idx = _dev(np.zeros(4000, np.int64))
    results = set()
    for _ in range(8):
        t = S.zeros(1, dtype=np.float32)
        S.cupyx.scatter_add(t, idx, _dev(values))
        results.add(t.get().tobytes())
    assert len(results) > 1
    exact = np.sum(values.astype(np.float64))
    t = S.zeros(1, dtype=np.float32)
    S.cupyx.scatter_add(t, idx, _dev(values))
    np.testing.assert_allclose(t.get()[0], exact, rtol=1e-3, atol=1e-2)


def test_cupyx_scatter_add_adds_repeats_and_refuses_host_targets():
    t = S.zeros((3, 2))
    S.cupyx.scatter_add(t, _dev([2, 2, 0]), _dev(np.ones((3, 2))))
    assert t.get().tolist() == [[1, 1], [0, 0], [2, 2]]
    with pytest.raises(TypeError):
        S.cupyx.scatter_add(np.zeros(3), _dev([0]), 1.0)


@given(st.integers(0, 2**16), st.sampled_from([(8, 3), (300, 1), (2000, 4)]))
def test_device_index_add_rows_is_deterministic_and_equals_numpy(seed, case):
    num_rows, width = case
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, min(num_rows, 5), size=512)
    values = rng.standard_normal((512, width)).astype(np.float32)
    with B.backend("strict"):
        one = B.index_add_rows(S.asarray(idx), S.asarray(values), num_rows).get()
        two = B.index_add_rows(S.asarray(idx), S.asarray(values), num_rows).get()
    assert one.tobytes() == two.tobytes() and one.dtype == np.float32
    with B.backend("numpy"):
        expected = B.index_add_rows(idx, values, num_rows)  # the CPU path
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-5)


def test_device_scatter_add_is_deterministic_with_mixed_indices():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 3, size=200)
    values = rng.standard_normal((200, 2)).astype(np.float32)
    expected = np.zeros((3, 5), np.float32)
    np.add.at(expected, (rows, slice(1, 3)), values)
    got = []
    with B.backend("strict"):
        for _ in range(2):
            t = S.zeros((3, 5), dtype=np.float32)
            B.scatter_add(t, (S.asarray(rows), slice(1, 3)), S.asarray(values))
            got.append(t.get())
        col = S.zeros((5, 3), dtype=np.float32).T  # not contiguous: written back
        B.scatter_add(col, (S.asarray(rows), slice(1, 3)), S.asarray(values))
    assert got[0].tobytes() == got[1].tobytes()
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(col.get(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- identity and base

def test_the_same_buffer_comes_back_as_the_same_wrapper():
    a = S.zeros(4)
    b = S.add(a, 1.0, out=a)
    assert b is a
    a += 1
    assert a.get().tolist() == [2.0] * 4
    c = a.astype(a.dtype, copy=False)
    assert c is a


def test_views_have_the_wrapper_of_their_base():
    a = S.zeros((2, 3))
    assert a.base is None
    for v in (a.reshape(6), a.T, a[0], a[:, 1:], a.swapaxes(0, 1), a[None]):
        assert v.base is a
        v2 = v.reshape(-1) if v.flags.c_contiguous else v[...]
        assert v2.base is a
    assert a[S.asarray([0, 1])].base is None  # a gather copies
    a.reshape(6)[0] = 5.0
    assert a.get()[0, 0] == 5.0  # and views write through


def test_wrappers_follow_numpy_dtypes_shapes_and_flags():
    a = S.zeros((2, 3), dtype=np.float32)
    assert a.dtype == np.float32 and a.shape == (2, 3) and a.ndim == 2
    assert a.size == 6 and a.nbytes == 24 and a.flags.c_contiguous and a.flags.writeable
    assert isinstance(a, S.ndarray) and S.float32 is np.float32 and S.inf == np.inf
    assert S.get_array_module(a) is S and S.get_array_module(np.ones(1)) is np


# ------------------------------------------------------------------------------ extras

def test_memory_pool_counts_live_device_bytes():
    pool = S.get_default_memory_pool()
    gc.collect()
    before = pool.used_bytes()
    a = S.zeros((256, 256), dtype=np.float32)
    v = a.reshape(-1)  # a view owns no memory
    assert pool.used_bytes() == before + a.nbytes
    assert pool.total_bytes() >= pool.used_bytes()
    del a, v
    gc.collect()
    assert pool.used_bytes() == before
    with B.backend("strict"):
        stats = B.memory_stats()
    assert stats["backend"] == "strict" and stats["used_bytes"] == pool.used_bytes()


def test_random_generator_state_round_trips_through_json():
    rng = S.random.default_rng(5)
    state = json.loads(json.dumps(rng.bit_generator.state))
    first = rng.random((3, 4), dtype=np.float32)
    assert isinstance(first, S.ndarray) and first.dtype == np.float32
    rng.bit_generator.state = state
    assert rng.random((3, 4), dtype=np.float32).get().tobytes() == first.get().tobytes()
    assert S.random.default_rng(5).integers(0, 10, size=4).shape == (4,)


def test_cuda_stand_ins():
    assert S.cuda.runtime.getDeviceCount() == 1
    with S.counting() as c:
        S.cuda.Device().synchronize()
    assert c.syncs == 1


def test_fuse_is_one_launch():
    @S.fuse()
    def gelu_like(x):
        return 0.5 * x * (1.0 + S.tanh(x * 0.7978845608))
    x = _dev(np.linspace(-3, 3, 7))
    with S.counting() as c:
        y = gelu_like(x)
    assert c.launches == 1
    h = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(y.get(), 0.5 * h * (1.0 + np.tanh(h * 0.7978845608)))


def test_elementwise_kernel_evaluates_its_c_subset():
    k = S.ElementwiseKernel("T x, T y, float32 s", "T z, T w",
                            "T t = tanhf(x * (T)s) + 1.0f; z = t * y; w = max(x, y); w += i",
                            "demo")
    x, y = _dev(np.linspace(-1, 1, 5)), _dev(np.arange(5.0))
    with S.counting() as c:
        z, w = k(x, y, np.float32(2))
    assert c.launches == 1
    hx, hy = np.linspace(-1, 1, 5), np.arange(5.0)
    np.testing.assert_allclose(z.get(), (np.tanh(hx * 2) + 1) * hy, rtol=1e-6)
    np.testing.assert_allclose(w.get(), np.maximum(hx, hy) + np.arange(5))
    with pytest.raises(InvalidArgumentError, match="outside"):
        S.ElementwiseKernel("T x", "T y", "y = x > 0 ? x : 0", "relu")


def test_elementwise_kernel_reads_an_input_before_an_aliased_output_is_written():
    k = S.ElementwiseKernel("T x", "T y, T z", "y = x * 2; z = x + 1", "alias")
    a = _dev(np.arange(4.0))
    other = S.zeros(4)
    k(a, a, other)  # a is both the input x and the output y
    assert a.get().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert other.get().tolist() == [1.0, 2.0, 3.0, 4.0]  # from x's old values


def test_a_fused_launch_is_counted_at_its_caller():
    k = S.ElementwiseKernel("T x", "T y", "y = x + 1", "inc")
    x = _dev(np.ones(3))
    with S.counting() as c:
        k(x)
    sites = {s: v.launches for s, v in c.by_site.items()}
    assert list(sites.values()) == [1]
    assert next(iter(sites)).startswith("tests/test_strict.py:")  # not contextlib's exit


def test_metadata_answers_launch_nothing():
    a = S.zeros((2, 3))
    with S.counting() as c:
        assert np.shape(a) == (2, 3) and S.ndim(a) == 2 and S.result_type(a, 1.0) == np.float64
        assert len(a) == 2 and a.T.shape == (3, 2)
    assert c.launches == 0 and c.syncs == 0
