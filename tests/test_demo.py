"""The demo runs end to end (quick), writes its report, reuses its base; its checks bite."""

import copy
import json

import pytest

from minilora import backend as B
from minilora import quant
from minilora.cli import main
from minilora.data import TaskDataset, get_task
from minilora.demo import measure_step
from minilora.demo_report import MEMORY_SOURCES, checks
from minilora.fileio import verify_manifest as load_save
from minilora.gpt import GPT, GPTConfig

PLOTS = ("loss_curves.png", "accuracy.png", "trainable_params.png", "memory.png",
         "quant_error.png", "adapter_switching.png")


def test_quick_demo_writes_report_and_reuses_the_base(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for method in ("full fine-tuning", "LoRA", "QLoRA"):
        assert method in text
    assert "pretraining" in text and f"on the {B.get_backend()} backend" in text
    source = "device pool" if B.on_device() else "tracemalloc"
    assert f"peak mem measured by {MEMORY_SOURCES[source]}" in text
    report = (out / "report" / "report.md").read_text()
    for plot in PLOTS:
        assert (out / "report" / plot).stat().st_size > 5000, plot
        assert f"({plot})" in report
    assert load_save(out / "report")  # the report is one save, with a manifest that checks out
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["methods"]) == {"full", "lora", "qlora"}
    assert {r["memory_source"] for r in results["methods"].values()} == {source}
    assert MEMORY_SOURCES[source] in report
    merge = results["merge"]
    assert merge["identical"] == merge["examples"] > 0  # merged == unmerged on every question
    lora, full = results["methods"]["lora"], results["methods"]["full"]
    assert lora["trainable"] < 0.05 * full["trainable"]
    assert lora["total"] - lora["trainable"] == full["total"]  # the base is frozen, not changed
    for name in ("lora", "lora-c", "qlora"):
        assert 0 < results["adapter_bytes"][name] < results["base_checkpoint_bytes"]

    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "reusing the task-A base" in again and "pretraining" not in again
    assert json.loads((out / "report" / "results.json").read_text())["base"] == results["base"]


@pytest.mark.parametrize("where", ["run", "device"])
def test_a_step_s_peak_memory_holds_its_gradients_and_moments(where):
    """Peak memory of a full fine-tuning step: the weights, then at least as much again for the
    gradients and twice for AdamW's moments; read by tracemalloc on the CPU and from the device
    pool on a device (the run's backend, and the strict stand-in for CuPy from NumPy)."""
    name = B.get_backend() if where == "run" or B.on_device() else "strict"
    with B.backend(name):
        data = TaskDataset(get_task("add", 1), n_heldout=10)
        model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=data.block_size,
                              n_layer=1, n_head=2, n_embd=32))
        cost = measure_step(model, data, batch_size=8, timed=1)
        held = quant.memory_report(model)["held_bytes"]
        assert cost["memory_source"] == ("device pool" if B.on_device() else "tracemalloc")
    assert cost["peak_bytes"] >= 4 * held  # weights + gradients + exp_avg + exp_avg_sq
    assert cost["peak_bytes"] < 1000 * held  # and not the whole process's memory
    assert cost["step_seconds"] > 0


@pytest.fixture
def good_results():
    method = {"trainable": 8_192, "total": 408_192, "accuracy": 0.99}
    return {"methods": {"full": {**method, "trainable": 400_000, "total": 400_000},
                        "lora": dict(method), "qlora": {**method, "accuracy": 0.98}},
            "merge": {"identical": 1000, "examples": 1000},
            "adapter_bytes": {"lora": 34_000, "lora-c": 34_000, "qlora": 34_000},
            "base_checkpoint_bytes": 1_600_000}


@pytest.mark.host_only("the checks are arithmetic on a dict of results")
def test_checks_pass_on_good_results_and_fail_on_each_broken_claim(good_results):
    assert all(ok for ok, _ in checks(good_results))
    broken = []
    r = copy.deepcopy(good_results)
    r["methods"]["lora"]["accuracy"] = 0.90
    broken.append((r, 0))
    r = copy.deepcopy(good_results)
    r["methods"]["lora"]["trainable"] = 40_000
    broken.append((r, 1))
    r = copy.deepcopy(good_results)
    r["methods"]["qlora"]["accuracy"] = 0.95
    broken.append((r, 2))
    r = copy.deepcopy(good_results)
    r["merge"]["identical"] = 999
    broken.append((r, 3))
    r = copy.deepcopy(good_results)
    r["adapter_bytes"]["qlora"] = 20_000_000
    broken.append((r, 4))
    for results, index in broken:
        assert [ok for ok, _ in checks(results)] == [i != index for i in range(5)], index
