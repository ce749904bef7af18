"""The pieces of benchmarks/peft_family.py: the padded base task, the parameter formulas, the FLOP
column, and a smoke run of the whole table (tiny sizes, seconds)."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.data import IGNORE_INDEX, TaskDataset, get_task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peft_family as bench  # noqa: E402

TINY = dataclasses.replace(bench.Settings.quick(), n_embd=16, n_head=2, base_steps=4, steps=2,
                           n_eval=20, gen_rounds=1, memory=False)


@pytest.mark.host_only("integer batches built on the host")
@settings(max_examples=25, deadline=None)
@given(pad=st.integers(0, 6), seed=st.integers(0, 2**16), digits=st.integers(1, 3))
def test_padded_rows_hold_the_question_at_an_offset(pad, seed, digits):
    task = get_task("add", digits)
    padded = bench.PaddedTask(task, pad, n_heldout=10)
    plain = TaskDataset(task, n_heldout=10)
    x, y = padded.get_batch(8, np.random.default_rng(seed))
    T = task.seq_len - 1
    assert x.shape == y.shape == (8, T + pad) and padded.block_size == T + pad
    # the same draw of questions as the plain task, each shifted by its own offset
    px, py = plain.get_batch(8, np.random.default_rng(seed))
    for row in range(8):
        k = int(np.argmax(x[row] != padded.filler)) if (x[row] != padded.filler).any() else 0
        hits = [o for o in range(pad + 1) if np.array_equal(x[row, o:o + T], px[row])
                and np.array_equal(y[row, o:o + T], py[row])]
        assert hits, (row, x[row], px[row])
        o = hits[0]
        assert (x[row, :o] == padded.filler).all() and (x[row, o + T:] == padded.filler).all()
        assert (y[row, :o] == IGNORE_INDEX).all() and (y[row, o + T:] == IGNORE_INDEX).all()
        assert k <= o
    # the loss is on the answers alone: as many targets as the plain batch has
    assert (y != IGNORE_INDEX).sum() == (py != IGNORE_INDEX).sum()


@pytest.mark.parametrize("method", bench.TRAINED)
def test_trainable_counts_equal_their_formulas(method):
    ml.manual_seed(0)
    model = bench.inject(ml.GPT(bench.gpt_config(TINY)), method, TINY)
    count, text = bench.counted_parameters(model, method, TINY)  # asserts the three agree
    assert count == ml.lora.count_parameters(model)[0] > 0 and text == bench.FORMULAS[method][0]


def test_extra_flops_column():
    ml.manual_seed(0)
    base = ml.GPT(bench.gpt_config(TINY))
    g = base.config
    bottleneck = bench.inject(bench.copy_of(base), "bottleneck", TINY)
    assert bench.extra_flops_per_token(bottleneck, base, TINY) == \
        2 * g.n_layer * 2 * 2 * g.n_embd * TINY.bottleneck
    prefix = bench.inject(bench.copy_of(base), "prefix", TINY)
    assert bench.extra_flops_per_token(prefix, base, TINY) == \
        g.n_layer * 2 * 2 * g.n_embd * TINY.virtual_tokens
    lora_model = bench.inject(bench.copy_of(base), "lora", TINY)
    assert bench.extra_flops_per_token(lora_model, base, TINY) == \
        2 * g.n_layer * 2 * 2 * TINY.r * g.n_embd
    merged = bench.for_inference(lora_model, "lora_merged")
    assert bench.extra_flops_per_token(merged, base, TINY) == 0
    assert ml.lora.lora_layers(lora_model)  # the unmerged model keeps its adapters


def test_smoke_run_writes_table_json_and_plot(tmp_path, capsys):
    result = bench.run(TINY, [0], tmp_path, ["--quick"])
    out = capsys.readouterr().out
    assert "| method |" in out and "python benchmarks/peft_family.py --quick" in out
    assert [r["method"] for r in result["rows"]] == list(bench.ROWS)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["lora_merged"]["extra_flops_per_token"] == 0
    assert rows["prompt"]["context_lost"] == TINY.virtual_tokens
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 1000
