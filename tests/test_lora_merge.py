"""Merging: merged == unmerged, unmerge restores W, merge_and_unload, weighted adapters."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import lora, nn
from minilora.errors import ConfigError, InvalidArgumentError
from minilora.lora.layer import LoRALinear
from tests.helpers import host
from tests.test_lora_support import (
    RTOL,
    alphas,
    assert_close,
    dims,
    dtypes,
    forward,
    inputs,
    randomize_lora,
    ranks,
    seeds,
    tiny,
)

adapter_specs = st.lists(st.tuples(ranks, alphas, st.booleans(), st.booleans()),
                         min_size=1, max_size=3)  # (r, alpha, rslora, dora) per adapter


def adapted(k, h, o, specs, dtype, seed):
    """A TinyNet with one adapter per spec, all active, random A, B and m."""
    model = tiny(k, h, o, dtype=dtype, seed=seed)
    names = []
    for i, (r, alpha, rs, dora) in enumerate(specs):
        targets = ("q_proj", "v_proj") if i % 2 == 0 else ("k_proj", "v_proj", "head")
        lora.inject_lora(model, lora.LoraConfig(r=r, alpha=alpha, use_rslora=rs, use_dora=dora,
                                                target_modules=targets), f"a{i}")
        names.append(f"a{i}")
    randomize_lora(model, seed)
    lora.set_adapter(model, names)
    return model


def weights(model):
    return {k: host(v).copy() for k, v in model.state_dict().items() if "base_layer" in k}


def dora_condition(model):
    """max over DoRA rows of (||W|| + ||s B A||) / ||W + s B A||, at least 1.

    DoRA rescales each row by m / ||W + s B A||: when the update nearly cancels a row of W, both
    the merged weight and the unmerged forward pass carry rounding errors of the size of W and
    s B A, magnified by this ratio (in float32 it can reach 1e2 for a one-column W here).
    """
    worst = 1.0
    for _, layer in lora.lora_layers(model):
        W = host(layer.base_layer.weight).astype(np.float64)
        for name in layer.lora_A:
            if layer.use_dora[name]:
                d = host(layer.delta_weight(name)).astype(np.float64)
                norms = [np.linalg.norm(a, axis=1) for a in (W, d, W + d)]
                worst = max(worst, float(((norms[0] + norms[1]) / norms[2]).max()))
    return worst


@given(k=dims, h=dims, o=dims, specs=adapter_specs, dtype=dtypes, seed=seeds)
def test_merged_output_equals_unmerged_and_unmerge_restores_w(k, h, o, specs, dtype, seed):
    model = adapted(k, h, o, specs, dtype, seed)
    x = inputs((4, k), dtype=dtype, seed=seed)
    before, W = forward(model, x), weights(model)
    rtol = RTOL[dtype] * dora_condition(model)
    assert lora.merge(model) == {}
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    merged = forward(model, x)
    assert merged.dtype == dtype
    assert_close(merged, before, rtol)
    slack = {p: unmerge_slack(layer, W[f"{p}.base_layer.weight"]) for p, layer in
             lora.lora_layers(model)}
    lora.unmerge(model)
    for path, layer in lora.lora_layers(model):
        w0 = W[f"{path}.base_layer.weight"]
        err = np.abs(host(layer.base_layer.weight) - w0)
        assert (err <= RTOL[dtype] * (np.abs(w0) + slack[path])).all(), (err, slack[path])
    assert_close(forward(model, x), before, rtol)


def unmerge_slack(layer, w0):
    """Per row, the size of what W was added to and is recovered from, in units of W's rounding.

    Merging stores W' = c W + sum_i f_i d_i per row (f = 1, c = 1 for plain adapters; DoRA's
    f = m / ||W + d||, c = 1 + sum (f - 1)); unmerging computes (W' - sum f_i d_i) / c, so its
    rounding error is about eps * (|W'| + sum |f_i d_i|) / |c|: large deltas cost precision.
    """
    c, size = np.ones((w0.shape[0], 1)), np.abs(w0).max(axis=1, keepdims=True)
    for name in layer.merged_adapters:
        d = host(layer.delta_weight(name)).astype(np.float64)
        f = np.ones((w0.shape[0], 1))
        if layer.use_dora[name]:
            m = host(layer.lora_magnitude_vector[name].weight).astype(np.float64)
            f = (m / np.linalg.norm(w0 + d, axis=1))[:, None]
            c += f - 1
        size += 2 * np.abs(f * d).max(axis=1, keepdims=True)
    return (size + np.abs(c) * np.abs(w0).max(axis=1, keepdims=True)) / np.abs(c)


@given(k=dims, h=dims, o=dims, specs=adapter_specs, seed=seeds)
def test_merge_and_unload_leaves_plain_linears_with_the_same_output(k, h, o, specs, seed):
    model = adapted(k, h, o, specs, np.float64, seed)
    x = inputs((4, k), seed=seed)
    before = forward(model, x)
    assert lora.merge_and_unload(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(getattr(model, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj"))
    assert sorted(model.state_dict()) == sorted(tiny(k, h, o).state_dict())
    assert lora.lora_configs(model) == {}
    assert_close(forward(model, x), before, 1e-10)


def test_merge_and_unload_of_a_merged_model_keeps_its_merged_weights():
    model = adapted(4, 5, 3, [(2, 8.0, False, True)], np.float64, 2)
    x = inputs((3, 4))
    before = forward(model, x)
    lora.merge(model)
    lora.merge_and_unload(model)
    assert lora.lora_layers(model) == []
    assert_close(forward(model, x), before, 1e-10)


def test_a_second_merge_is_refused_and_changes_nothing():
    model = adapted(4, 5, 3, [(2, 8.0, False, False)], np.float64, 0)
    lora.merge(model)
    W = weights(model)
    with pytest.raises(InvalidArgumentError, match="already hold merged adapters"):
        lora.merge(model)
    assert all(np.array_equal(v, W[k]) for k, v in weights(model).items())


def test_merge_of_named_adapters_only():
    model = adapted(4, 5, 3, [(2, 8.0, False, False), (3, 4.0, False, True)], np.float64, 1)
    x = inputs((3, 4))
    before = forward(model, x)
    lora.merge(model, ["a1"])
    assert model.v_proj.merged_adapters == ["a1"] and model.q_proj.merged_adapters == []
    assert_close(forward(model, x), before, 1e-10)  # a0 still runs unmerged on top
    lora.unmerge(model)
    with pytest.raises(InvalidArgumentError, match="unknown adapter"):
        lora.merge(model, ["zzz"])
    assert not any(layer.merged for _, layer in lora.lora_layers(model))


@given(seed=seeds, dora=st.booleans())
def test_disable_adapters_on_a_merged_model_gives_the_base_and_remerges(seed, dora):
    model = tiny(seed=seed)
    x = inputs((3, 5), seed=seed)
    base = forward(model, x)
    lora.inject_lora(model, lora.LoraConfig(r=2, use_dora=dora))
    randomize_lora(model, seed)
    lora.merge(model)
    merged = forward(model, x)
    with lora.disable_adapters(model):
        assert_close(forward(model, x), base, 1e-10)
    assert model.q_proj.merged
    assert_close(forward(model, x), merged, 1e-10)


def delta(model, path, name):
    layer = dict(lora.lora_layers(model))[path]
    return host(layer.delta_weight(name)) if name in layer.lora_A else 0.0


@given(specs=st.lists(st.tuples(ranks, alphas, st.booleans()), min_size=1, max_size=3),
       w=st.lists(st.floats(-2, 2), min_size=3, max_size=3), seed=seeds)
def test_cat_combination_is_exactly_the_weighted_sum_of_deltas(specs, w, seed):
    model = adapted(5, 6, 4, [(r, a, rs, False) for r, a, rs in specs], np.float64, seed)
    names = [f"a{i}" for i in range(len(specs))]
    lora.add_weighted_adapter(model, names, w[:len(names)], "cat", combination_type="cat")
    assert not model.v_proj.lora_A["cat"].weight.requires_grad
    for path, layer in lora.lora_layers(model):
        expected = sum(wi * delta(model, path, n) for n, wi in zip(names, w))
        assert_close(host(layer.delta_weight("cat")), expected, 1e-12)
        assert layer.r["cat"] == sum(layer.r[n] for n in names if n in layer.lora_A)
        assert layer.scaling["cat"] == 1.0
    # the combined adapter alone reproduces all the weighted adapters together
    x = inputs((3, 5), seed=seed)
    for name in names:
        for _, layer in lora.lora_layers(model):
            if name in layer.lora_A:
                layer.lora_B[name].weight.data *= w[names.index(name)]
    lora.set_adapter(model, names)
    together = forward(model, x)
    lora.set_adapter(model, "cat")
    assert_close(forward(model, x), together, 1e-10)


@given(specs=st.lists(st.tuples(ranks, alphas), min_size=2, max_size=3), seed=seeds,
       keep=st.integers(1, 3))
def test_svd_combination_is_the_best_approximation_of_its_rank(specs, seed, keep):
    model = adapted(6, 7, 5, [(r, a, False, False) for r, a in specs], np.float64, seed)
    names = [f"a{i}" for i in range(len(specs))]
    w = [1.0, -0.5, 2.0][:len(names)]
    lora.add_weighted_adapter(model, names, w, "full", combination_type="svd", svd_rank=12)
    lora.add_weighted_adapter(model, names, w, "low", combination_type="svd", svd_rank=keep)
    for path, layer in lora.lora_layers(model):
        target = sum(wi * delta(model, path, n) for n, wi in zip(names, w))
        assert_close(host(layer.delta_weight("full")), target, 1e-10)  # rank 12 >= the sum
        s = np.linalg.svd(target, compute_uv=False)
        low = host(layer.delta_weight("low"))
        assert np.linalg.matrix_rank(low, tol=1e-9 * max(s[0], 1e-300)) <= keep
        # Eckart-Young: the error of the best rank-k approximation is the dropped singular values
        np.testing.assert_allclose(np.linalg.norm(target - low), np.sqrt((s[keep:] ** 2).sum()),
                                   rtol=1e-8, atol=1e-10)


def test_weighted_adapter_errors():
    model = adapted(4, 5, 3, [(2, 8.0, False, False), (2, 8.0, False, True)], np.float64, 0)
    with pytest.raises(ConfigError, match="DoRA"):
        lora.add_weighted_adapter(model, ["a0", "a1"], [1, 1], "c", "cat")
    with pytest.raises(InvalidArgumentError, match="existing adapters"):
        lora.add_weighted_adapter(model, ["a0", "zz"], [1, 1], "c", "cat")
    with pytest.raises(InvalidArgumentError, match="one finite number per adapter"):
        lora.add_weighted_adapter(model, ["a0"], [1, 2], "c", "cat")
    with pytest.raises(InvalidArgumentError, match="combination_type.*'ties'"):
        lora.add_weighted_adapter(model, ["a0"], [1], "c", "ties")
    with pytest.raises(InvalidArgumentError, match="svd_rank"):
        lora.add_weighted_adapter(model, ["a0"], [1], "c", "svd", svd_rank=0)
    with pytest.raises(ConfigError, match="already exists"):
        lora.add_weighted_adapter(model, ["a0"], [1], "a1", "cat")


def factors(model, path, name):
    """Host copies (float64) of one adapter's A (r, in) and B (out, r) in layer ``path``."""
    layer = dict(lora.lora_layers(model))[path]
    return (host(layer.lora_A[name].weight.data).astype(np.float64),
            host(layer.lora_B[name].weight.data).astype(np.float64))


@given(r=ranks, specs=st.lists(st.tuples(alphas, st.booleans()), min_size=1, max_size=3),
       w=st.lists(st.one_of(st.floats(-2, 2), st.just(0.0)), min_size=3, max_size=3),
       dtype=dtypes, seed=seeds)
def test_linear_combination_adds_the_scaled_factors(r, specs, w, dtype, seed):
    model = adapted(5, 6, 4, [(r, a, rs, False) for a, rs in specs], dtype, seed)
    names, w = [f"a{i}" for i in range(len(specs))], w[:len(specs)]
    before = {n: {p: factors(model, p, n) for p, layer in lora.lora_layers(model)
                  if n in layer.lora_A} for n in names}
    lora.add_weighted_adapter(model, names, w, "lin", combination_type="linear")
    assert lora.lora_configs(model)["lin"].r == r == lora.lora_configs(model)["lin"].alpha
    for path, layer in lora.lora_layers(model):
        present = [(n, wi) for n, wi in zip(names, w) if path in before[n]]
        if not present:
            assert "lin" not in layer.lora_A
            continue
        assert layer.r["lin"] == r and layer.scaling["lin"] == 1.0
        assert layer.lora_A["lin"].weight.data.dtype == dtype
        assert not layer.lora_A["lin"].weight.requires_grad
        c = [wi * layer.scaling[n] for n, wi in present]
        A_i = [before[n][path][0] for n, _ in present]
        B_i = [before[n][path][1] for n, _ in present]
        # A = sum_i sign(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i
        A_new, B_new = factors(model, path, "lin")
        assert_close(A_new, sum(np.sign(ci or 1.0) * np.sqrt(abs(ci)) * a
                                for ci, a in zip(c, A_i)), RTOL[dtype])
        assert_close(B_new, sum(np.sqrt(abs(ci)) * b for ci, b in zip(c, B_i)), RTOL[dtype])
        # B A = the weighted sum of the updates + the cross terms i != j
        weighted = sum(ci * b @ a for ci, a, b in zip(c, A_i, B_i))
        cross = sum(np.sqrt(abs(c[i] * c[j])) * np.sign(c[j] or 1.0) * B_i[i] @ A_i[j]
                    for i in range(len(c)) for j in range(len(c)) if i != j)
        assert_close(host(layer.delta_weight("lin")), weighted + cross, 10 * RTOL[dtype])


def test_linear_is_the_weighted_sum_only_without_cross_terms():
    """Adapters that use different rank slots (a0 only row/column 0 of A/B, a1 only 1) have
    B_i A_j = sum_k B_i[:, k] A_j[k, :] = 0 for i != j: then "linear" equals "cat"; otherwise
    it does not (PEFT's "rough approximation")."""
    w = [0.7, -1.3]
    for disjoint in (True, False):
        model = adapted(6, 6, 6, [(2, 4.0, False, False), (2, 8.0, False, False)], np.float64, 3)
        for _, layer in lora.lora_layers(model):
            for name, unused in (("a0", 1), ("a1", 0)):
                if disjoint and name in layer.lora_A:
                    layer.lora_A[name].weight.data[unused, :] = 0
                    layer.lora_B[name].weight.data[:, unused] = 0
        lora.add_weighted_adapter(model, ["a0", "a1"], w, "lin", combination_type="linear")
        lora.add_weighted_adapter(model, ["a0", "a1"], w, "cat", combination_type="cat")
        gap = max(np.abs(host(layer.delta_weight("lin")) - host(layer.delta_weight("cat"))).max()
                  for _, layer in lora.lora_layers(model))
        assert (gap < 1e-12) == disjoint, gap
    # one adapter: no cross terms, the weighted update exactly
    model = adapted(4, 5, 3, [(3, 6.0, True, False)], np.float64, 1)
    lora.add_weighted_adapter(model, ["a0"], [-0.4], "lin", combination_type="linear")
    for _, layer in lora.lora_layers(model):
        assert_close(host(layer.delta_weight("lin")), -0.4 * host(layer.delta_weight("a0")),
                     1e-12)


def test_linear_refuses_different_ranks_and_changes_nothing():
    model = adapted(4, 5, 3, [(2, 8.0, False, False), (3, 8.0, False, False)], np.float64, 0)
    with pytest.raises(ConfigError, match=r"linear.*same rank.*\['a0', 'a1'\] have r \[2, 3\]"):
        lora.add_weighted_adapter(model, ["a0", "a1"], [1, 1], "c", "linear")
    assert "c" not in lora.lora_configs(model)
    assert not any("c" in layer.lora_A for _, layer in lora.lora_layers(model))
    # equal r, but a rank_pattern makes one layer differ: refused by layer, before any change
    model = tiny(seed=2)
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj")), "a0")
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=("q_proj", "v_proj"),
                                            rank_pattern={"q_proj": 1}), "a1")
    state = sorted(model.state_dict())
    with pytest.raises(ConfigError, match=r"one rank per layer.*'q_proj'.*have r \[2, 1\]"):
        lora.add_weighted_adapter(model, ["a0", "a1"], [1, 1], "c", "linear")
    assert sorted(model.state_dict()) == state and "c" not in lora.lora_configs(model)


def test_set_adapter_on_a_merged_model_unmerges_first_as_peft_does():
    """W held the merged adapter whatever was active: switching to another gave W + delta_a0
    + delta_a1, not the other adapter alone."""
    model = adapted(4, 5, 3, [(2, 8.0, False, False), (3, 4.0, False, False)], np.float64, 1)
    x = inputs((3, 4))
    lora.set_adapter(model, "a1")
    only_a1 = forward(model, x)
    lora.set_adapter(model, "a0")
    lora.merge(model)
    assert model.v_proj.merged_adapters == ["a0"]
    with pytest.warns(UserWarning, match=r"\['a0'\] were merged; unmerging them first"):
        lora.set_adapter(model, "a1")
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    assert_close(forward(model, x), only_a1, 1e-10)
    lora.merge(model, ["a1"])
    lora.set_adapter(model, ["a0", "a1"])  # the merged one stays active: nothing to undo
    assert model.v_proj.merged_adapters == ["a1"]


def test_an_adapter_named_twice_is_refused_before_anything_changes():
    """merge(model, ["a", "a"]) added s B A twice to W; set_adapter(["a", "a"]) ran it twice in
    the forward pass."""
    model = lora.inject_lora(tiny(dtype=np.float32), lora.LoraConfig(r=2))
    randomize_lora(model)
    x = inputs((3, 5), dtype=np.float32)
    before = forward(model, x)
    for call in (lambda: lora.merge(model, ["default", "default"]),
                 lambda: lora.set_adapter(model, ["default", "default"]),
                 lambda: model.q_proj.merge(["default", "default"]),
                 lambda: model.q_proj.set_adapter(["default", "default"])):
        with pytest.raises(InvalidArgumentError, match=r"\['default'\] named more than once"):
            call()
        assert not any(layer.merged for _, layer in lora.lora_layers(model))
        np.testing.assert_array_equal(forward(model, x), before)
    with pytest.raises(InvalidArgumentError, match="must be a str or a list of str, got 3"):
        lora.merge(model, 3)
    lora.merge(model, ("default",))  # a tuple of distinct names is fine
    assert model.q_proj.merged_adapters == ["default"]
