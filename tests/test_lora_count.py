"""Parameter accounting: the LoRA paper's figures, per-layer tables, counts of real models."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import lora
from minilora.errors import InvalidArgumentError
from tests.test_lora_support import Stack, tiny


@pytest.mark.parametrize("d,layers,r,expected", [
    (768, 12, 8, 294_912),          # RoBERTa-base, q and v
    (1024, 24, 8, 786_432),         # RoBERTa-large
    (12288, 96, 1, 4_718_592),      # GPT-3 175B
    (12288, 96, 8, 37_748_736),
])
def test_the_lora_papers_parameter_counts(d, layers, r, expected):
    assert lora.lora_param_count(d, layers, r) == expected


@given(d=st.integers(1, 64), layers=st.integers(1, 6), r=st.integers(1, 8),
       targets=st.sampled_from([("q_proj",), ("q_proj", "v_proj")]))
def test_analytic_count_equals_a_real_injected_model(d, layers, r, targets):
    model = lora.inject_lora(Stack(d, layers), lora.LoraConfig(r=r, target_modules=targets))
    expected = lora.lora_param_count(d, layers, r, n_targets=len(targets))
    assert lora.count_parameters(model)[0] == expected == layers * len(targets) * r * 2 * d


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_analytic_count_rejects_bad_sizes(bad):
    with pytest.raises(InvalidArgumentError, match="d_model"):
        lora.lora_param_count(bad, 2, 2)


def test_per_layer_table_shows_r_n_plus_k_against_n_k():
    model = lora.inject_lora(Stack(4, 2), lora.LoraConfig(r=2, target_modules=("q_proj", "fc")))
    rows = lora.lora_parameter_table(model)
    assert [row["path"] for row in rows] == ["blocks.0.attn.q_proj", "blocks.0.mlp.fc",
                                             "blocks.1.attn.q_proj", "blocks.1.mlp.fc"]
    fc = rows[1]
    assert (fc["n"], fc["k"], fc["r"], fc["lora"], fc["full"]) == (8, 4, 2, 2 * (8 + 4), 32)
    assert fc["fraction"] == 24 / 32
    text = lora.format_parameter_table(rows)
    assert "blocks.1.mlp.fc" in text and "8 x 4" in text
    total = sum(r["lora"] for r in rows)
    assert text.splitlines()[-1].startswith("total") and f"{total:,d}" in text.splitlines()[-1]


def test_print_trainable_parameters(capsys):
    model = lora.inject_lora(tiny(5, 6, 4), lora.LoraConfig(r=2))
    lora.print_trainable_parameters(model)
    trainable, total = lora.count_parameters(model)
    assert trainable == 2 * (6 + 5) + 2 * (4 + 6)
    out = capsys.readouterr().out.strip()
    assert out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                   f"trainable%: {100 * trainable / total:.4f}")


def test_tied_parameters_count_once():
    model = Stack(3, 1)
    model.blocks[0].attn.v_proj.weight = model.blocks[0].attn.q_proj.weight
    _, total = lora.count_parameters(model)
    assert total == sum(p.size for p in model.parameters())
    # q (9 + 3), v (its bias only: 3), fc (18 + 6), proj (18 + 3)
    assert total == 12 + 3 + 24 + 21


@pytest.mark.parametrize("dora", [False, True])
def test_the_cli_s_per_layer_formula_names_every_layer_shape(dora):
    """``minilora finetune`` prints r(n+k) per layer: one formula per shape (all-linear adapts
    C x C attention and C x 4C MLP layers), each adding up, DoRA's magnitude named."""
    import re

    import minilora as ml
    from minilora.cli_lora import per_layer_counts

    model = ml.GPT(ml.GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
    lora.inject_lora(model, lora.LoraConfig(r=2, alpha=4, use_dora=dora, target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")))
    rows = lora.lora_parameter_table(model)
    text = per_layer_counts(rows)
    found = re.findall(r"r\(n\+k\) = (\d+)\((\d+)\+(\d+)\)(?: \+ (\d+) \(DoRA's magnitude\))? = "
                       r"([\d,]+) per layer against n k = ([\d,]+) on (\d+) layers", text)
    assert {(int(n), int(k)) for _, n, k, *_ in found} == {(8, 8), (32, 8), (8, 32)}
    assert sum(int(f[6]) for f in found) == len(rows) == 12
    for r, n, k, magnitude, count, full, _ in found:
        r, n, k = int(r), int(n), int(k)
        assert int(count.replace(",", "")) == r * (n + k) + (n if dora else 0)
        assert int(full.replace(",", "")) == n * k and (magnitude == (str(n) if dora else ""))
    one_shape = [row for row in rows if row["n"] == row["k"]]
    assert per_layer_counts(one_shape) == (
        "r(n+k) = 2(8+8)" + (" + 8 (DoRA's magnitude)" if dora else "") +
        f" = {32 + 8 * dora} per layer against n k = 64")
