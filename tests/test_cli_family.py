"""``minilora finetune --method`` for the PEFT family, and its directories in sample, eval, merge,
export and inspect: every method (on a float and a 4-bit base) writes a directory whose adapter,
loaded by ``--adapter``, computes what the trained model computed; merges fold what can be folded
and refuse the rest, saying why; and each mistake is one line naming the flag and the value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora import backend as B
from minilora import cli_family, family, interop
from minilora.checkpoint import load_checkpoint, load_model, restore
from minilora.cli import main
from minilora.cli_lora import attach_adapters
from minilora.data import TaskDataset, get_task
from minilora.lora import count_parameters
from minilora.lora.io import write_adapter_files
from minilora.tensor import no_grad
from minilora.train import exact_match, greedy_answers
from tests.helpers import TINY

# a few steps at a high rate: enough to move every method away from its identity init
STEPS = ["--steps", "6", "--eval-every", "6", "--lr", "0.02", "--batch-size", "16",
         "--eval-examples", "20", "--no-progress"]
IDX = np.random.default_rng(0).integers(0, 16, (3, 6))  # (B, T) token ids of the task alphabet


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 1-digit addition base whose context (10) leaves room beside the task's 6 tokens
    for prompt and prefix tuning's virtual tokens."""
    out = tmp_path_factory.mktemp("family") / "base"
    assert main(["train", "--task", "add", "--steps", "20", "--eval-every", "20", "--block-size",
                 "10", "--out", str(out), *TINY]) == 0
    return out


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def _finetune(base, out, *flags):
    assert main(["finetune", "--from", str(base), "--task", "nocarry", "--out", str(out),
                 *STEPS, *flags]) == 0, flags
    return out


def _adapted(base, *adapters):
    """base + ``--adapter``s as sample and eval build it."""
    class Args:
        pass
    args = Args()
    args.adapter, args.use, args.no_adapter = [str(a) for a in adapters], None, False
    model, _ = load_model(base)
    attach_adapters(model, args)
    return model


def _trained(base, directory):
    """The model as it trained: the base, the method injected from the record, the saved
    trainable parameters restored (not the adapter files)."""
    ck = load_checkpoint(directory)
    record = ck.extra["finetune"]
    model, _ = load_model(base)
    cli_family.prepare(model, record["method"], cli_family.config_from_record(record, "test"),
                       record.get("quant"))
    restore(ck, model, restore_global_rng=False)
    model.eval()
    return model


def _logits(model):
    with no_grad():
        return B.to_numpy(model(IDX).data)


def _error(argv, capsys):
    """Run a command that must fail; its one-line error."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # the parser's own refusal
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1, (code, err)
    assert "Traceback" not in err
    return err


METHOD_FLAGS = {"ia3": [], "bitfit": [], "bottleneck": ["--bottleneck", "4"],
                "prompt": ["--virtual-tokens", "3"],
                "prefix": ["--virtual-tokens", "2", "--prefix-projection"]}


@pytest.mark.parametrize("qlora", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("method", cli_family.FAMILY)
def test_each_method_writes_a_directory_that_eval_and_sample_load(base, tmp_path, method, qlora,
                                                                   capsys):
    extra = ["--qlora"] if qlora else []
    out = _finetune(base, tmp_path / method, "--method", method, *METHOD_FLAGS[method], *extra)
    said = capsys.readouterr().out
    # the one-line summary: the formula's count is what count_parameters says trains
    summary = next(line for line in said.splitlines() if line.startswith(method))
    formula_count = int(summary.split(" trainable")[0].rsplit("= ", 1)[1].replace(",", ""))
    ck = load_checkpoint(out)
    record = ck.extra["finetune"]
    assert record["method"] == method and (record["quant"] is not None) == qlora
    assert formula_count == sum(int(v.size) for v in ck.weights.values())  # what trained, saved
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == cli_family.PEFT_TYPE[method]

    trained, loaded = _trained(base, out), _adapted(base, out)
    assert formula_count == count_parameters(trained)[0]
    want, got = _logits(trained), _logits(loaded)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - _logits(load_model(base)[0])).max() > 1e-4  # it learned something

    assert main(["eval", "--checkpoint", str(base), "--adapter", str(out), "--examples", "20",
                 "--show", "0"]) == 0
    data = TaskDataset(get_task("nocarry", 1), n_heldout=20)
    accuracy = exact_match(trained, data, 20)
    assert f"task 'nocarry' (1 digits): held-out exact match {accuracy:.1%} on 20" in \
        capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(base), "--adapter", str(out), "--prompt",
                 "3+4="]) == 0
    assert capsys.readouterr().out.startswith("3+4=")


def test_full_refuses_a_method_and_flags_of_other_methods_are_refused(base, tmp_path, capsys):
    def finetune(*flags):
        return _error(["finetune", "--from", str(base), "--task", "nocarry", "--out",
                       str(tmp_path / "x"), *flags], capsys)

    err = finetune("--full", "--method", "ia3")
    assert "--full" in err and "--method ia3" in err and "no adapter" in err
    assert "--method ia3" in finetune("--lora", "--method", "ia3")
    assert "--r 4" in finetune("--method", "ia3", "--r", "4")
    assert "--bottleneck 4" in finetune("--bottleneck", "4")  # LoRA, the default, has none
    assert "--virtual-tokens 3" in finetune("--method", "bitfit", "--virtual-tokens", "3")
    assert "--r 4" in finetune("--full", "--r", "4")
    err = finetune("--method", "prompt", "--virtual-tokens", "5")
    assert "--virtual-tokens 5" in err and "at most 4" in err  # 10 positions, the task takes 6
    err = finetune("--method", "ia3", "--feedforward", "k_proj")
    assert "--feedforward k_proj" in err and "c_attn" in err  # refused before any step
    assert "invalid choice: 'adalora'" in finetune("--method", "adalora")
    assert not (tmp_path / "x").exists()


def test_a_base_without_room_refuses_virtual_tokens(tmp_path, capsys):
    short = tmp_path / "short"
    assert main(["train", "--task", "add", "--steps", "2", "--out", str(short), *TINY]) == 0
    err = _error(["finetune", "--from", str(short), "--task", "nocarry", "--method", "prefix",
                  "--out", str(tmp_path / "p")], capsys)
    assert "no room" in err and "--block-size" in err
    err = _error(["train", "--task", "add", "--block-size", "4", "--out", str(tmp_path / "t"),
                  *TINY], capsys)
    assert "--block-size 4" in err and "at least 6" in err


def test_merge_of_ia3_equals_the_adapter_and_the_unmergeable_are_refused(base, tmp_path,
                                                                         capsys):
    data = TaskDataset(get_task("nocarry", 1), n_heldout=20)
    prompts, answers = data.heldout()
    for qlora in ([], ["--qlora"]):
        ia3 = _finetune(base, tmp_path / f"ia3{len(qlora)}", "--method", "ia3", *qlora)
        merged = tmp_path / f"merged{len(qlora)}"
        assert main(["merge", "--checkpoint", str(base), "--adapter", str(ia3), "--out",
                     str(merged)]) == 0
        folded, adapted = load_model(merged)[0], _adapted(base, ia3)
        assert not any(isinstance(m, family.IA3Linear) for _, m in folded.named_modules())
        np.testing.assert_allclose(_logits(folded), _logits(adapted), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(greedy_answers(folded, prompts, answers.shape[1]),
                                      greedy_answers(adapted, prompts, answers.shape[1]))
        capsys.readouterr()
        for args in (["--adapter", str(ia3)], []):
            assert main(["eval", "--checkpoint", str(merged if not args else base), *args,
                         "--task", "nocarry", "--examples", "20", "--show", "0"]) == 0
        unmerged, merged_eval = capsys.readouterr().out.splitlines()
        assert unmerged.split("(")[0] == merged_eval.split("(")[0]

    bitfit = _finetune(base, tmp_path / "bitfit", "--method", "bitfit")
    assert main(["merge", "--checkpoint", str(base), "--adapter", str(bitfit), "--out",
                 str(tmp_path / "merged-bitfit")]) == 0
    np.testing.assert_allclose(_logits(load_model(tmp_path / "merged-bitfit")[0]),
                               _logits(_adapted(base, bitfit)), rtol=1e-6, atol=1e-6)
    for method, why in (("prefix", "prefix tuning adds learned keys and values"),
                        ("prompt", "prompt tuning adds virtual tokens"),
                        ("bottleneck", "nonlinearity")):
        adapter = _finetune(base, tmp_path / method, "--method", method, *METHOD_FLAGS[method])
        err = _error(["merge", "--checkpoint", str(base), "--adapter", str(adapter), "--out",
                      str(tmp_path / f"m-{method}")], capsys)
        assert "cannot merge" in err and why in err, err
        assert not (tmp_path / f"m-{method}").exists()


def test_family_adapters_load_alone(base, tmp_path, capsys):
    ia3 = _finetune(base, tmp_path / "ia3", "--method", "ia3")
    bitfit = _finetune(base, tmp_path / "bitfit", "--method", "bitfit")
    lora = _finetune(base, tmp_path / "lora", "--r", "2")
    for pair in ((ia3, bitfit), (lora, ia3)):
        err = _error(["eval", "--checkpoint", str(base), "--adapter", str(pair[0]), "--adapter",
                      str(pair[1])], capsys)
        assert "one method of the family" in err and "loads alone" in err
    err = _error(["sample", "--checkpoint", str(base), "--adapter", str(ia3), "--use", "x",
                  "--prompt", "1+1="], capsys)
    assert "--use 'x'" in err
    assert main(["eval", "--checkpoint", str(base), "--adapter", str(ia3), "--no-adapter",
                 "--examples", "20", "--show", "0"]) == 0
    said = capsys.readouterr()
    assert "task 'add'" in said.out  # the bare base, on its own task, and a note says so
    assert said.err.strip() == f"minilora eval: note: --no-adapter: the bare base, without " \
                               f"--adapter {str(ia3)!r}"


def test_a_forged_or_damaged_adapter_is_one_line(base, tmp_path, capsys):
    forged = tmp_path / "forged"
    n = 16 * 3  # the file says c_attn's vector is (3C, 1); this one is the wrong length
    write_adapter_files(forged, {"peft_type": "IA3", "target_modules": ["attn.c_attn"],
                                 "feedforward_modules": []},
                        {"base_model.model.transformer.h.0.attn.c_attn.ia3_l":
                         np.ones((n + 1, 1), np.float32)})
    err = _error(["eval", "--checkpoint", str(base), "--adapter", str(forged)], capsys)
    assert "c_attn.ia3_l" in err and "(49, 1)" in err and "(48, 1)" in err
    write_adapter_files(forged, {"peft_type": "BOTTLENECK", "bottleneck": -3,
                                 "non_linearity": "gelu", "after": ["attn"]}, {})
    err = _error(["sample", "--checkpoint", str(base), "--adapter", str(forged), "--prompt",
                  "1+1="], capsys)
    assert "bottleneck" in err and "-3" in err
    damaged = _finetune(base, tmp_path / "prompt", "--method", "prompt")
    _flip_byte(damaged / "adapter_model.safetensors")
    err = _error(["eval", "--checkpoint", str(base), "--adapter", str(damaged)], capsys)
    assert "SHA-256" in err and "adapter_model.safetensors" in err


def test_inspect_and_export(base, tmp_path, capsys):
    prefix = _finetune(base, tmp_path / "prefix", "--method", "prefix", "--virtual-tokens", "2",
                       "--prefix-projection")
    capsys.readouterr()
    assert main(["inspect", str(prefix)]) == 0
    shown = capsys.readouterr().out
    n_file = 2 * 2 * 1 * 16  # N 2 L C: what the file holds; the MLP trained more
    assert "prefix fine-tune" in shown and "prefix tuning: 2 virtual tokens" in shown
    assert f"({n_file:,} in the adapter file)" in shown and "refused" in shown

    for method in ("ia3", "prompt"):
        adapter = _finetune(base, tmp_path / method, "--method", method, *METHOD_FLAGS[method],
                            "--qlora")
        assert main(["inspect", str(adapter)]) == 0
        shown = capsys.readouterr().out
        assert f"{method} fine-tune" in shown and "on a 4-bit base" in shown
        assert "trainable" in shown and "PEFT's" in shown
        out = tmp_path / f"peft-{method}"
        assert main(["export", "--checkpoint", str(base), "--adapter", str(adapter), "--to",
                     "peft", "--out", str(out)]) == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == cli_family.PEFT_TYPE[method]
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors",
                                                         "manifest.json"]
        # the same values, for the float base PEFT's is (the fine-tune loads onto its 4-bit one)
        float_base = family.load_adapter(load_model(base)[0], str(adapter))
        np.testing.assert_array_equal(_logits(_adapted(base, out)), _logits(float_base))
    for method in ("bitfit", "bottleneck"):
        adapter = _finetune(base, tmp_path / method, "--method", method, *METHOD_FLAGS[method])
        err = _error(["export", "--checkpoint", str(base), "--adapter", str(adapter), "--to",
                      "peft", "--out", str(tmp_path / f"peft-{method}")], capsys)
        assert f"PEFT has no {cli_family.PEFT_TYPE[method]}" in err
    assert main(["export", "--checkpoint", str(base), "--adapter", str(tmp_path / "ia3"), "--to",
                 "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "adapter merged" in capsys.readouterr().out  # and its 4-bit layers dequantized
    np.testing.assert_allclose(_logits(interop.gpt_from_hf(str(tmp_path / "hf"))),
                               _logits(_adapted(base, tmp_path / "ia3")), rtol=1e-5, atol=1e-5)


def test_a_family_fine_tune_resumes_exactly(base, tmp_path, capsys):
    flags = ["--method", "bottleneck", "--bottleneck", "3", "--steps", "8"]
    straight = _finetune(base, tmp_path / "straight", *flags)
    part = _finetune(base, tmp_path / "part", *flags, "--until", "3")
    assert load_checkpoint(part).step == 3
    err = _error(["finetune", "--resume", str(part), "--method", "ia3"], capsys)
    assert "drop --method ia3" in err
    assert main(["finetune", "--resume", str(part), "--out", str(tmp_path / "resumed"),
                 "--no-progress"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "resumed")
    assert a.step == b.step == 8 and a.weights.keys() == b.weights.keys()
    for key in a.weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key], err_msg=key)
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == \
        (straight / "adapter_model.safetensors").read_bytes()


@pytest.mark.host_only("the help text is argument parsing")
def test_help_names_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--method", *cli_family.METHODS, "--virtual-tokens", "--bottleneck",
                   "combines with every --method", "takes no --method"):
        assert needle in text, needle
