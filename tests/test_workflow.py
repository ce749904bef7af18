"""The LoRA road from the front door, each step a `minilora` command in a fresh process: train a
base, fine-tune a LoRA adapter on task B, evaluate with it, merge it (the merged model answers
every held-out question as base + adapter does), quantize, fine-tune a QLoRA adapter, export to
PEFT and HF, import, and inspect every directory."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minilora import lora
from minilora.checkpoint import load_checkpoint, load_model
from minilora.cli import main
from minilora.cli_lora import attach_adapters
from minilora.data import TaskDataset, get_task
from minilora.train import greedy_answers
from tests.helpers import TINY, run_cli

STEPS = ["--steps", "40", "--eval-every", "40"]


@pytest.fixture(scope="module")
def road(tmp_path_factory):
    d = tmp_path_factory.mktemp("road")
    ok = run_cli("train", "--task", "add", "--out", d / "base", *TINY, *STEPS)
    assert ok.returncode == 0, ok.stderr
    return d


def _ok(*args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _adapted(base, adapter):
    class Args:  # what sample/eval pass to attach_adapters
        pass
    args = Args()
    args.adapter, args.use, args.no_adapter = [str(adapter)], None, False
    model, _ = load_model(base)
    attach_adapters(model, args)
    return model


def test_the_whole_road(road):
    base = road / "base"
    out = _ok("finetune", "--from", base, "--task", "nocarry", "--out", road / "lora", "--r", "4",
              "--batch-size", "16", "--eval-examples", "20", "--no-progress", *STEPS)
    assert "r(n+k) = 4(16+16) = 128 per layer against n k = 256" in out
    ck = load_checkpoint(road / "lora")
    assert ck.partial and ck.step == 40 and ck.extra["finetune"]["method"] == "lora"
    config, arrays = lora.read_adapter(str(road / "lora"))  # the deliverable, as save_adapter's
    assert config.r == 4 and all(k.startswith("base_model.model.h.") for k in arrays)

    evaluated = _ok("eval", "--checkpoint", base, "--adapter", road / "lora", "--show", "0")
    assert "task 'nocarry'" in evaluated  # the adapter's own task is the default
    bare = _ok("eval", "--checkpoint", base, "--adapter", road / "lora", "--no-adapter",
               "--show", "0")
    assert "task 'add'" in bare

    _ok("merge", "--checkpoint", base, "--adapter", road / "lora", "--out", road / "merged")
    merged, _ = load_model(road / "merged")
    assert not lora.lora_layers(merged)
    data = TaskDataset(get_task("nocarry", 1), n_heldout=20)
    prompts, answers = data.heldout()
    unmerged = greedy_answers(_adapted(base, road / "lora"), prompts, answers.shape[1])
    np.testing.assert_array_equal(greedy_answers(merged, prompts, answers.shape[1]), unmerged)

    said = _ok("quantize", "--checkpoint", base, "--out", road / "base-nf4")
    assert "4.127 bits per weight" in said and "model.safetensors" in said
    sizes = re.search(r"model\.safetensors ([\d,]+) bytes \(the float one ([\d,]+), ", said)
    quantized, full = (int(g.replace(",", "")) for g in sizes.groups())
    assert quantized < full and f"{full / quantized:.1f}x" in said  # weights file against file
    four_bit, _ = load_model(road / "base-nf4")  # back as QuantLinear layers, not re-quantized
    assert type(four_bit.h[0].attn.q_proj).__name__ == "QuantLinear"
    assert "held-out exact match" in _ok("eval", "--checkpoint", road / "base-nf4", "--show", "0")
    said = _ok("merge", "--checkpoint", base, "--adapter", road / "lora", "--into", "nf4",
               "--out", road / "merged-nf4")
    assert "|delta W| lost max" in said and "held-out answers change" in said
    _ok("eval", "--checkpoint", road / "merged-nf4", "--task", "nocarry", "--show", "0")

    _ok("finetune", "--from", base, "--task", "nocarry", "--qlora", "--out", road / "qlora",
        "--batch-size", "16", "--eval-examples", "20", "--no-progress", *STEPS)
    assert load_checkpoint(road / "qlora").extra["finetune"]["quant"]["quant_type"] == "nf4"
    _ok("eval", "--checkpoint", base, "--adapter", road / "qlora", "--show", "0")

    _ok("export", "--checkpoint", base, "--adapter", road / "lora", "--to", "peft",
        "--out", road / "peft")
    assert json.loads((road / "peft" / "adapter_config.json").read_text())["target_modules"] == \
        ["attn.c_attn"]
    _ok("export", "--checkpoint", base, "--to", "hf", "--out", road / "hf")
    _ok("import", "--hf", road / "hf", "--out", road / "imported")

    for name, needle in (("base", "checkpoint"), ("lora", "lora fine-tune"),
                         ("qlora", "qlora fine-tune"), ("merged", "checkpoint"),
                         ("peft", "adapter"), ("hf", "Hugging Face"), ("imported", "checkpoint"),
                         ("base-nf4", "4-bit")):
        shown = _ok("inspect", road / name)
        assert needle in shown and "manifest" in shown and "verified" in shown, (name, shown)


def test_sample_and_eval_switch_between_adapters(road, capsys):
    base = road / "base"
    for task in ("nocarry", "max"):
        assert main(["finetune", "--from", str(base), "--task", task, "--out",
                     str(road / f"sw-{task}"), "--adapter-name", task, "--batch-size", "16",
                     "--eval-examples", "20", "--no-progress", *STEPS]) == 0
    both = ["--adapter", str(road / "sw-nocarry"), "--adapter", str(road / "sw-max")]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(base), *both, "--use", "max", "--show", "0"]) == 0
    assert "task 'max'" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(base), *both, "--use", "nope"]) == 1
    assert "--use 'nope'" in capsys.readouterr().err


def test_finetune_resumes_exactly(road):
    base = road / "base"
    args = ["finetune", "--from", base, "--task", "nocarry", "--lora-dropout", "0.1",
            "--batch-size", "16", "--eval-examples", "20", "--no-progress", "--steps", "12"]
    _ok(*args, "--out", road / "straight")
    _ok(*args, "--out", road / "part", "--until", "5")
    refused = run_cli("finetune", "--resume", road / "part", "--batch-size", "4")
    assert refused.returncode == 1 and "drop --batch-size" in refused.stderr  # not ignored
    _ok("finetune", "--resume", road / "part", "--out", road / "resumed", "--no-progress")
    a, b = load_checkpoint(road / "straight"), load_checkpoint(road / "resumed")
    assert a.step == b.step == 12 and a.weights.keys() == b.weights.keys()
    for key in a.weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key], err_msg=key)


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--task", "nocarry", "--out", "x"], "--from DIR"),
    (["finetune", "--from", "nowhere", "--task", "nocarry", "--out", "x"], "nowhere"),
    (["finetune", "--from", "BASE", "--out", "x"], "exactly one of --task"),
    (["finetune", "--from", "BASE", "--task", "nocarry", "--target", ",", "--out", "x"],
     "--target"),
    (["finetune", "--from", "BASE", "--task", "nocarry", "--r", "0", "--out", "x"], "--r"),
    (["merge", "--checkpoint", "BASE", "--adapter", "nowhere", "--out", "x"], "nowhere"),
    (["sample", "--checkpoint", "BASE", "--prompt", "1+1=", "--use", "b"], "--use 'b'"),
    (["export", "--checkpoint", "BASE", "--to", "peft", "--out", "x"], "--adapter DIR"),
    (["inspect", "nowhere"], "nowhere"),
])
def test_workflow_mistakes_are_one_line(road, tmp_path, argv, needle, capsys):
    argv = [str(road / "base") if a == "BASE" else (str(tmp_path / a) if a == "x" else a)
            for a in argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # the parser's own refusal
        code = stop.code
    assert code in (1, 2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def _loss(text):
    return float(text.split("validation loss ")[1].split(",")[0])


def test_a_byte_base_adapts_to_a_text_with_new_characters_and_to_jsonl(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("the cat sat on the mat and the dog sat on the log " * 40)
    second.write_text("Prix: 12,50 € — café crème 3,20 €; thé 2,10 € (TTC)! " * 40)
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
             "--batch-size", "16", "--no-progress"]
    _ok("train", "--text", first, "--out", tmp_path / "base", "--steps", "60", *small)
    base = tmp_path / "base"
    assert load_checkpoint(base).tokenizer.to_dict() == {"kind": "byte", "eot": True}
    _ok("finetune", "--from", base, "--text", second, "--out", tmp_path / "fr", "--target",
        "all-linear", "--r", "16", "--steps", "150", "--lr", "0.02", "--batch-size", "16",
        "--no-progress")
    before = _loss(_ok("eval", "--checkpoint", base, "--text", second))
    after = _loss(_ok("eval", "--checkpoint", base, "--adapter", tmp_path / "fr", "--text",
                      second))
    assert after < 0.9 * before, (before, after)  # the embeddings of the new bytes stay frozen

    pairs = tmp_path / "pairs.jsonl"
    words = ["ab", "cd", "ef", "gh", "abc", "bcd", "cde", "def"] * 6
    pairs.write_text("".join(json.dumps({"prompt": f"rev {w}=", "completion": w[::-1]}) + "\n"
                             for w in words))
    _ok("finetune", "--from", base, "--data", pairs, "--out", tmp_path / "rev", "--steps", "10",
        "--batch-size", "8", "--eval-examples", "4", "--no-progress")
    said = _ok("eval", "--checkpoint", base, "--adapter", tmp_path / "rev", "--examples", "4",
               "--show", "2")
    assert "held-out exact match" in said and "prompts" in said
    # its examples are shown as a task's are: prompt, the model's completion, the true one
    shown = [line for line in said.splitlines() if line.startswith("  ")]
    assert len(shown) == 2 and all(re.fullmatch(r"  (ok   |WRONG) 'rev \w+=' -> '.*'   \(true "
                                                 r"'\w+'\)", line) for line in shown), shown
    sampled = _ok("sample", "--checkpoint", base, "--adapter", tmp_path / "rev", "--prompt",
                  "rev ab=", "--max-new-tokens", "5")
    assert sampled.startswith("rev ab=")  # greedy, and cut at the end-of-text token
    said = _ok("merge", "--checkpoint", base, "--adapter", tmp_path / "rev", "--into", "fp4",
               "--out", tmp_path / "rev-fp4")
    assert "held-out completions change" in said
    said = _ok("merge", "--checkpoint", base, "--adapter", tmp_path / "fr", "--into", "nf4",
               "--out", tmp_path / "fr-nf4")
    assert "validation loss" in said and "->" in said


@pytest.mark.parametrize("command", ["finetune", "merge", "quantize", "export", "import",
                                     "inspect", "sample", "eval"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert f"minilora {command} " in capsys.readouterr().out


def test_a_pissa_adapter_is_written_for_the_untouched_base(road):
    """PiSSA trains on the residual W - s B0 A0; its files hold the exact rank-2r LoRA of
    s (B A - B0 A0), so base + files computes what the trained model computes."""
    import minilora as ml
    from minilora.checkpoint import restore

    base = road / "base"
    _ok("finetune", "--from", base, "--task", "nocarry", "--init", "pissa", "--r", "2",
        "--out", road / "pissa", "--batch-size", "16", "--eval-examples", "20", "--no-progress",
        "--steps", "15", "--lr", "0.02")
    trained, _ = load_model(base)  # rebuilt as it trained: residual base + trained A, B
    ck = load_checkpoint(road / "pissa")
    record = ck.extra["finetune"]
    lora.inject_lora(trained, lora.LoraConfig(**{**record["lora"], "target_modules": tuple(
        record["lora"]["target_modules"])}))
    restore(ck, trained, restore_global_rng=False)
    trained.eval()
    config, _ = lora.read_adapter(str(road / "pissa"))
    assert config.r == 4 and config.init == "kaiming"
    idx = np.random.default_rng(0).integers(0, 16, (4, 5))
    with ml.no_grad():
        want, got = trained(idx).numpy(), _adapted(base, road / "pissa")(idx).numpy()
        bare = load_model(base)[0](idx).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(bare - want).max() > 1e-3
