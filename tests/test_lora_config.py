"""LoraConfig: defaults, validation, target matching, per-module patterns, PEFT's JSON form."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import lora
from minilora.errors import ConfigError
from minilora.lora import config as lora_config
from minilora.lora.config import lora_scaling, matches_target


def test_defaults_are_the_design_ones():
    c = lora.LoraConfig()
    assert (c.r, c.alpha, c.dropout, c.target_modules, c.bias) == \
        (8, 16, 0.0, ("q_proj", "v_proj"), "none")
    assert (c.use_rslora, c.use_dora, c.init, c.rank_pattern, c.alpha_pattern) == \
        (False, False, "kaiming", {}, {})
    assert c.lora_alpha == c.alpha and c.lora_dropout == c.dropout
    assert c.scaling_for("q_proj") == 2.0


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -3), ("r", 2.5), ("r", True), ("r", "8"),
    ("alpha", 0), ("alpha", -1.0), ("alpha", float("nan")), ("alpha", float("inf")),
    ("alpha", "16"),
    ("dropout", -0.1), ("dropout", 1.0), ("dropout", float("nan")),
    ("init", "xavier"), ("init", True), ("bias", "some"), ("bias", None),
    ("target_modules", ()), ("target_modules", ""), ("target_modules", "(q"),
    ("target_modules", ["q_proj", ""]), ("target_modules", 5),
    ("use_rslora", "yes"), ("use_dora", 1), ("rank_pattern", []),
])
def test_invalid_fields_raise_config_error_naming_field_and_value(field, value):
    with pytest.raises(ConfigError) as info:
        lora.LoraConfig(**{field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg, msg


@pytest.mark.parametrize("field,pattern,shown", [
    ("rank_pattern", {"q_proj": 0}, "0"), ("rank_pattern", {"q_proj": 1.5}, "1.5"),
    ("rank_pattern", {"(": 2}, "'('"), ("alpha_pattern", {"v_proj": -1}, "-1"),
])
def test_invalid_patterns_name_the_field_key_and_value(field, pattern, shown):
    with pytest.raises(ConfigError) as info:
        lora.LoraConfig(**{field: pattern})
    msg = str(info.value)
    assert field in msg and repr(next(iter(pattern))) in msg and shown in msg, msg


@given(r=st.integers(1, 4096), alpha=st.floats(1e-3, 1e4), rs=st.booleans())
def test_scaling_is_alpha_over_r_or_over_sqrt_r(r, alpha, rs):
    c = lora.LoraConfig(r=r, alpha=alpha, use_rslora=rs)
    expected = alpha / math.sqrt(r) if rs else alpha / r
    assert c.scaling_for("anything") == expected == lora_scaling(r, alpha, rs)


names = st.text(alphabet="abcxyz_", min_size=1, max_size=5)


@given(parts=st.lists(names, min_size=1, max_size=4), extra=names)
def test_target_names_match_whole_trailing_components_only(parts, extra):
    path = ".".join(parts)
    assert matches_target(path, (parts[-1],))
    assert matches_target(path, (".".join(parts[-2:]),))
    assert matches_target(path, (path,))
    # a name matches only whole components: a longer or a partial name never does
    assert not matches_target(path, (extra + parts[-1],)) or (extra + parts[-1]) in parts[-1:]
    if len(parts[-1]) > 1:
        assert not matches_target(path, (parts[-1][1:],))


@given(parts=st.lists(names, min_size=2, max_size=4))
def test_a_str_target_is_a_full_match_regex(parts):
    path = ".".join(parts)
    assert matches_target(path, re.escape(path))
    assert matches_target(path, r".*\." + re.escape(parts[-1]))
    assert not matches_target(path, re.escape(parts[-1]))  # not a search: the whole path
    assert not matches_target(path, re.escape(path) + "x")


def test_rank_and_alpha_patterns_override_per_module_first_match_wins():
    c = lora.LoraConfig(r=4, alpha=8, rank_pattern={"v_proj": 2, r"1\.attn\.q_proj": 6},
                        alpha_pattern={"attn.v_proj": 1, "v_proj": 99})
    assert c.rank_for("h.0.attn.q_proj") == 4 and c.alpha_for("h.0.attn.q_proj") == 8
    assert c.rank_for("h.0.attn.v_proj") == 2 and c.alpha_for("h.0.attn.v_proj") == 1
    assert c.rank_for("h.1.attn.q_proj") == 6
    assert c.rank_for("h.11.attn.q_proj") == 4  # the key must match whole components
    assert c.scaling_for("h.0.attn.v_proj") == 0.5


configs = st.builds(
    lora.LoraConfig, r=st.integers(1, 64), alpha=st.integers(1, 128),
    dropout=st.sampled_from([0.0, 0.05, 0.5]),
    target_modules=st.one_of(st.just(("q_proj", "v_proj")), st.just(r".*\.fc"),
                             st.just(("attn.o_proj",))),
    bias=st.sampled_from(["none", "all", "lora_only"]), use_rslora=st.booleans(),
    use_dora=st.booleans(), init=st.sampled_from(["kaiming", "gaussian", "pissa"]),
    rank_pattern=st.sampled_from([{}, {"v_proj": 2}]),
    alpha_pattern=st.sampled_from([{}, {"q_proj": 3}]))


@given(configs)
def test_peft_dict_round_trip(config):
    d = config.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["fan_in_fan_out"] is False
    assert d["r"] == config.r and d["lora_alpha"] == config.alpha
    assert lora.LoraConfig.from_peft_dict(d) == config


@pytest.mark.parametrize("change,needle", [
    ({"peft_type": "IA3"}, "peft_type"), ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "loftq"}, "loftq"), ({"r": None}, "r must"),
])
def test_peft_dicts_lora_cannot_use_are_refused(change, needle):
    d = {**lora.LoraConfig().to_peft_dict(), **change}
    with pytest.raises(ConfigError, match=needle):
        lora.LoraConfig.from_peft_dict(d)


@pytest.mark.parametrize("field, value", [
    ("layers_to_transform", [5]), ("layers_pattern", "h"), ("modules_to_save", ["wte"]),
    ("exclude_modules", ["q_proj"]), ("lora_bias", True), ("layer_replication", [[0, 1]]),
    ("trainable_token_indices", [3]), ("target_parameters", ["mlp.fc.weight"]),
    ("use_qalora", True),
])
def test_peft_fields_that_move_the_adapter_elsewhere_are_refused_unless_unset(field, value):
    """layers_to_transform=[5] on a 1-layer base and modules_to_save=['wte'] loaded without a
    word: the adapter then acted on other layers (or fewer weights) than PEFT's would."""
    d = lora.LoraConfig().to_peft_dict()
    for unset in (None, False, [], {}):
        lora.LoraConfig.from_peft_dict({**d, field: unset})  # PEFT's defaults pass
    with pytest.raises(ConfigError, match=rf"{field}={re.escape(repr(value))} is not supported"):
        lora.LoraConfig.from_peft_dict({**d, field: value})


def test_peft_dict_missing_field_is_named():
    d = lora.LoraConfig().to_peft_dict()
    del d["lora_alpha"]
    with pytest.raises(ConfigError, match="lora_alpha"):
        lora.LoraConfig.from_peft_dict(d)


def test_peft_init_spellings():
    base = lora.LoraConfig().to_peft_dict()
    for value, init in [(True, "kaiming"), (False, "kaiming"), ("gaussian", "gaussian"),
                        ("pissa_niter_4", "pissa")]:
        assert lora.LoraConfig.from_peft_dict({**base, "init_lora_weights": value}).init == init


# ------------------------------------------------------- JSON types and limits (issue #11)

@pytest.mark.parametrize("field,value,shown", [
    ("use_rslora", "false", "'false'"), ("use_dora", "false", "'false'"),
    ("use_rslora", 0, "0"), ("fan_in_fan_out", "false", "'false'"),
    ("lora_alpha", True, "True"), ("lora_alpha", "16", "'16'"), ("lora_dropout", "0.1", "'0.1'"),
    ("rank_pattern", ["q_proj"], "['q_proj']"), ("alpha_pattern", "q_proj=2", "'q_proj=2'"),
])
def test_peft_dict_values_must_have_their_json_types(field, value, shown):
    d = {**lora.LoraConfig().to_peft_dict(), field: value}
    with pytest.raises(ConfigError) as info:
        lora.LoraConfig.from_peft_dict(d)
    msg = str(info.value)
    assert f"{field} must be" in msg and shown in msg, msg


@pytest.mark.parametrize("change, shown", [
    ({"r": 2**40}, "r=1099511627776"),
    ({"rank_pattern": {"v_proj": 2**40}}, "rank_pattern['v_proj']=1099511627776"),
])
def test_ranks_over_the_limit_are_refused_by_name(change, shown):
    d = {**lora.LoraConfig().to_peft_dict(), **change}
    with pytest.raises(ConfigError) as info:
        lora.LoraConfig.from_peft_dict(d)
    assert shown in str(info.value) and f"MAX_RANK = {lora_config.MAX_RANK}" in str(info.value)
    lora.LoraConfig(r=lora_config.MAX_RANK)  # the limit itself is allowed
    with pytest.raises(ConfigError, match="MAX_RANK"):
        lora.LoraConfig(r=lora_config.MAX_RANK + 1)


def test_a_real_peft_adapter_config_loads():
    """adapter_config.json as PEFT 0.13+ writes it: many fields minilora ignores, nulls, a list
    of targets (a set in PEFT, so in any order), and a regex str."""
    d = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "gpt2",
         "bias": "none", "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
         "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
         "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
         "lora_alpha": 32, "lora_bias": False, "lora_dropout": 0.05, "megatron_config": None,
         "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
         "r": 16, "rank_pattern": {}, "revision": None, "target_modules": ["v_proj", "q_proj"],
         "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
         "runtime_config": {"ephemeral_gpu_offload": False}, "peft_version": "0.17.0"}
    c = lora.LoraConfig.from_peft_dict(d)
    assert (c.r, c.alpha, c.dropout, c.target_modules) == (16, 32, 0.05, ("v_proj", "q_proj"))
    nulls = {**d, "rank_pattern": None, "alpha_pattern": None, "use_rslora": None,
             "lora_dropout": None, "target_modules": r".*\.(q|v)_proj", "lora_alpha": 8.5}
    c = lora.LoraConfig.from_peft_dict(nulls)
    assert (c.rank_pattern, c.use_rslora, c.dropout, c.alpha) == ({}, False, 0.0, 8.5)
    assert c.target_modules == r".*\.(q|v)_proj"
    with pytest.raises(ConfigError, match="dict"):
        lora.LoraConfig.from_peft_dict(["peft_type", "LORA"])


def test_all_linear_is_peft_keyword_not_a_regex():
    """"all-linear" compiled as a regular expression, matched no path, and injection then said
    nothing matched: PEFT (and the command line) read it as every linear layer but the head."""
    import minilora as ml

    assert matches_target("h.3.mlp.fc", lora.ALL_LINEAR) and matches_target("proj", "all-linear")
    assert not matches_target("lm_head", "all-linear")
    assert not matches_target("transformer.lm_head", "all-linear")
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules="all-linear"))
    assert [p for p, _ in lora.lora_layers(model)] == [
        f"h.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                 "attn.o_proj", "mlp.fc", "mlp.proj")]
