"""The demo runs end to end (quick), writes its report, reuses its base; its checks bite; it
explains each number it prints, from the run's own measurements."""

import copy
import json

import numpy as np
import pytest

from minilora import backend as B
from minilora import quant
from minilora.cli import main
from minilora.data import TaskDataset, get_task
from minilora.demo import measure_step, same_answer_share
from minilora.demo_report import MEMORY_SOURCES, captions, checks, notes
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
    # every number explained; unticked boxes said to be expected in quick mode
    for words in ("where no place carries", "saves memory, not time", "3 measurements of",
                  "the CLI's default is 3", "unticked boxes below are", "meant for the full run"):
        assert words in " ".join(text.split()), words
    report = (out / "report" / "report.md").read_text()
    lines = report.splitlines()
    for plot in PLOTS:
        assert (out / "report" / plot).stat().st_size > 5000, plot
        at = next(i for i, line in enumerate(lines) if f"({plot})" in line)
        assert len(lines[at + 2]) > 40, plot  # its caption: what to see in it
    assert "## What the numbers mean" in report
    assert load_save(out / "report")  # the report is one save, with a manifest that checks out
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["methods"]) == {"full", "lora", "qlora"}
    assert {r["memory_source"] for r in results["methods"].values()} == {source}
    assert results["quick"] and results["methods"]["qlora"]["dequantize_seconds"] > 0
    for r in results["methods"].values():  # repeated measurements behind the notes' spreads
        assert len(r["peak_bytes_all"]) == 3 and r["peak_bytes"] == max(r["peak_bytes_all"])
        assert 0 < r["held_bytes"] < r["peak_bytes"] and len(r["step_seconds_all"]) == 5
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
    assert "reusing the task-A base" in again and "[1/5] pretraining" not in again
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


@pytest.mark.host_only("arithmetic on the task datasets' held-out questions")
def test_same_answer_share_is_the_share_of_sums_without_a_carry():
    add, nocarry = (TaskDataset(get_task(name, 2), n_heldout=400) for name in ("add", "nocarry"))
    prompts, _ = add.heldout()
    texts = [add.tokenizer.decode(p) for p in prompts]  # "47+85="
    no_carry = [all(int(x) + int(y) <= 9 for x, y in zip(t[:2], t[3:5])) for t in texts]
    assert same_answer_share(add, nocarry, 400) == pytest.approx(np.mean(no_carry))
    assert abs(np.mean(no_carry) - 0.55 ** 2) < 0.07  # 400 questions drawn from 10,000 pairs


def _explained(**changes):
    """A run's results, as run_demo returns them, with the fields the notes explain."""
    method = {"trainable": 8_192, "total": 408_192, "accuracy": 0.998, "task_a_accuracy": 0.301,
              "step_seconds": 0.020, "step_seconds_all": [0.018, 0.019, 0.020, 0.024, 0.030],
              "peak_bytes": 14 * MIB, "peak_bytes_all": [13.5 * MIB, 14 * MIB, 13.9 * MIB],
              "held_bytes": 1_632_768, "shards": 2, "memory_source": "tracemalloc"}
    results = {
        "settings": {"digits": 2, "eval_examples": 1000, "batch_size": 64, "n_embd": 128, "r": 8,
                     "base_steps": 1200, "finetune_steps": 400},
        "tasks": {"A": "add", "B": "nocarry", "C": "digitmax"}, "default_digits": 3,
        "quick": False, "base": {"add": 1.0, "nocarry": 0.301, "digitmax": 0.037},
        "same_answer": {"add/nocarry": 0.301, "add/digitmax": 0.037, "nocarry/digitmax": 0.04},
        "methods": {"full": {**method, "trainable": 400_000, "total": 400_000,
                             "held_bytes": 1_600_000, "peak_bytes": 19 * MIB,
                             "peak_bytes_all": [19 * MIB, 18.6 * MIB, 18.8 * MIB]},
                    "lora": dict(method),
                    "qlora": {**method, "held_bytes": 262_800, "step_seconds": 0.017,
                              "dequantize_seconds": 0.002}},
        "switching": {"nocarry": {"add": 0.301, "nocarry": 0.998, "digitmax": 0.04},
                      "digitmax": {"add": 0.037, "nocarry": 0.04, "digitmax": 1.0},
                      "none (base)": {"add": 1.0, "nocarry": 0.301, "digitmax": 0.037}},
        "merge": {"identical": 1000, "examples": 1000},
        "adapter_bytes": {"lora": 34_000, "lora-c": 34_000, "qlora": 34_000},
        "base_checkpoint_bytes": 1_600_000, "quant_error": {"nf4": 2.6e-3, "fp4": 3.4e-3,
                                                           "int4": 3.3e-3}}
    for path, value in changes.items():
        *keys, last = path.split("__")
        target = results
        for key in keys:
            target = target[key]
        target[last] = value
    return results


MIB = 2 ** 20


@pytest.mark.host_only("the notes are text made from a dict of results")
def test_the_notes_explain_task_a_step_time_and_memory_from_the_run():
    accuracy, step, memory = (" ".join(n.split()) for n in notes(_explained()))
    # task A after fine-tuning: the no-carry share, measured on these questions and as 0.55^k
    assert f"30.1% of these questions ({0.55 ** 2:.1%} = 0.55^2 of all 2-digit pairs" in accuracy
    assert "each model now writes carry-less sums" in accuracy
    assert "the CLI's default is 3 digits" in accuracy and "100.0% on task A again" in accuracy
    # QLoRA timed faster than LoRA: said to be noise, with the dequantizing it must also do
    assert "4 times per step here, 2.0 ms each" in step and "timing noise" in step
    assert "1.7x LoRA's" in step and "saves memory, not time" in step
    # the memory column: what it holds, what full fine-tuning's extra is, its resolution
    assert "3 x 4 bytes x 400,000 = 4.6 MiB" in memory
    assert "moved by up to 0.5 MiB between 3 measurements" in memory
    slow = " ".join(notes(_explained(methods__qlora__step_seconds=0.026))[1].split())
    assert "timed 6.0 ms longer than LoRA's" in slow and "noise" not in slow
    unlearned = " ".join(notes(_explained(methods__lora__accuracy=0.5))[0].split())
    assert "these have not learned it yet" in unlearned


@pytest.mark.host_only("the notes are text made from a dict of results")
def test_quick_mode_says_its_unticked_boxes_are_expected():
    quick = _explained(quick=True, settings__n_embd=64, settings__base_steps=150,
                       settings__finetune_steps=40, methods__lora__accuracy=0.03)
    first = " ".join(notes(quick)[0].split())
    assert first.startswith("--quick is a smoke run") and "meant for the full run" in first
    marked = [text for _, text in checks(quick)]
    assert all("[meant for the full run" in text for text in marked[:3])
    assert not any("meant for the full run" in text for text in marked[3:])
    assert not any("meant for the full run" in text for _, text in checks(_explained()))
    assert not any(n.startswith("--quick") for n in notes(_explained()))


@pytest.mark.host_only("the captions are text made from a dict of results")
def test_every_plot_has_a_caption_with_the_run_s_numbers():
    results = _explained()
    for name in ("full", "lora", "qlora"):
        results["methods"][name]["history"] = {"step": [1, 2], "loss": [1.0, 0.01]}
    results["task_c_history"] = {"step": [1, 2], "loss": [1.0, 0.02]}
    said = captions(results)
    assert set(said) == set(PLOTS)
    assert "30.1% of questions with no carry" in said["accuracy.png"]
    assert "QLoRA's curve follows LoRA's" in said["loss_curves.png"]
    assert "NF4 2.60e-03, INT4 3.30e-03, FP4 3.40e-03" in said["quant_error.png"]
    assert "task C 100.0% with the digitmax adapter" in said["adapter_switching.png"]


@pytest.mark.host_only("where the demo writes by default: paths only, the run itself is stubbed")
def test_a_quick_demo_leaves_the_full_demo_s_directory_and_cache_alone(monkeypatch, tmp_path):
    import minilora.demo as demo

    seen = []

    def stub(out_dir, quick, progress):
        seen.append((str(out_dir), quick))
        raise RuntimeError("stopped by the test")
    monkeypatch.setattr(demo, "run_demo", stub)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--no-progress"]) == 1
    assert main(["demo", "--no-progress"]) == 1
    assert main(["demo", "--quick", "--no-progress", "--out", "mine"]) == 1
    assert seen == [("runs/demo-quick", True), ("runs/demo", False), ("mine", True)]
