"""Adapter files: PEFT's layout, round trips, refusal of adapters made for another base."""

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from minilora import lora, nn
from minilora.errors import CheckpointError, NonFiniteWarning
from tests.helpers import host
from tests.test_lora_support import Stack, forward, inputs, randomize_lora, seeds, tiny


@given(seed=seeds, r=st.integers(1, 4), dora=st.booleans(), rs=st.booleans(),
       bias=st.sampled_from(["none", "all", "lora_only"]), dtype=st.sampled_from(
           [np.float32, np.float64]))
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(seed, r, dora, rs, bias, dtype):
    model = tiny(dtype=dtype, seed=seed)
    config = lora.LoraConfig(r=r, alpha=3 * r, use_dora=dora, use_rslora=rs, bias=bias,
                             rank_pattern={"v_proj": r + 1})
    lora.inject_lora(model, config)
    randomize_lora(model, seed)
    for name, p in model.named_parameters():  # trained biases must travel with the adapter
        if p.requires_grad and name.endswith("bias"):
            p.data += 0.25
    x = inputs((3, 5), dtype=dtype, seed=seed)
    expected = forward(model, x)
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        fresh = tiny(dtype=dtype, seed=seed)
        assert lora.load_adapter(fresh, d) is fresh
    assert np.array_equal(forward(fresh, x), expected)
    assert lora.lora_configs(fresh)["default"] == config
    assert lora.count_parameters(fresh) == lora.count_parameters(model)


def test_files_are_peft_shaped_and_small():
    model = lora.inject_lora(Stack(16, 2), lora.LoraConfig(r=2, alpha=4, use_dora=True))
    with tempfile.TemporaryDirectory() as d:
        paths = lora.save_adapter(model, d)
        assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors",
                                         "manifest.json"]
        with open(paths["config"]) as f:
            config = json.load(f)
        arrays = load_file(paths["weights"])
        size = os.path.getsize(paths["weights"])
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["fan_in_fan_out"] is False and config["bias"] == "none"
    assert config["use_rslora"] is False and config["use_dora"] is True
    assert config["init_lora_weights"] is True
    prefix = "base_model.model.blocks.0.attn.q_proj."
    assert arrays[prefix + "lora_A.weight"].shape == (2, 16)
    assert arrays[prefix + "lora_B.weight"].shape == (16, 2)
    assert arrays[prefix + "lora_magnitude_vector"].shape == (16,)
    assert len(arrays) == 2 * 2 * 3 and all(a.dtype == np.float32 for a in arrays.values())
    n_adapter = sum(a.size for a in arrays.values())
    assert n_adapter == 2 * 2 * (2 * (16 + 16) + 16)
    assert size < 4 * n_adapter + 2048  # the adapter only: float32 values plus a small header
    base_size = 4 * sum(p.size for p in Stack(16, 2).parameters())
    assert size < base_size / 4


def test_an_adapter_for_another_base_is_refused_and_the_model_left_unchanged():
    model = lora.inject_lora(tiny(5, 6, 4), lora.LoraConfig(r=2))
    other = tiny(5, 7, 4)  # q_proj is (7, 5) here, not (6, 5)
    before = {k: host(v).copy() for k, v in other.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        with pytest.raises(CheckpointError) as info:
            lora.load_adapter(other, d)
    msg = str(info.value)
    assert "base_model.model.q_proj.lora_B.weight" in msg and "(6, 2)" in msg and "(7, 2)" in msg
    assert lora.lora_layers(other) == [] and lora.lora_configs(other) == {}
    assert sorted(other.state_dict()) == sorted(before)
    assert all(p.requires_grad for p in other.parameters())


def test_an_adapter_for_modules_the_model_lacks_is_refused():
    model = lora.inject_lora(Stack(4, 2), lora.LoraConfig(r=2))
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        plain = nn.Module()
        plain.fc = nn.Linear(4, 4)
        with pytest.raises(CheckpointError, match=r"matched no linear-like module.*\['fc'\]"):
            lora.load_adapter(plain, d)
        with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_proj\.lora_A.*\(2, 4\)"):
            lora.load_adapter(tiny(), d)  # q_proj and v_proj, but at other paths
        smaller = Stack(4, 1)
        with pytest.raises(CheckpointError) as info:
            lora.load_adapter(smaller, d)
        assert "blocks.1.attn.q_proj.lora_A.weight" in str(info.value)
        assert lora.lora_layers(smaller) == []


def test_file_keys_that_the_model_lacks_are_named():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    with tempfile.TemporaryDirectory() as d:
        paths = lora.save_adapter(model, d)
        arrays = load_file(paths["weights"])
        arrays["base_model.model.nowhere.lora_A.weight"] = np.zeros((2, 3), np.float32)
        save_file(arrays, paths["weights"])
        with pytest.raises(CheckpointError, match="adapter_model.safetensors.*manifest"):
            lora.load_adapter(tiny(), d)  # the manifest ties the weights to their config
        os.remove(os.path.join(d, "manifest.json"))  # as a PEFT-made directory would be
        with pytest.raises(CheckpointError, match=r"nowhere\.lora_A\.weight.*\(2, 3\)"):
            lora.load_adapter(tiny(), d)


def test_loading_into_an_existing_adapter_checks_the_config():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model)
    x = inputs((2, 5))
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        same = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
        lora.load_adapter(same, d)
        assert np.array_equal(forward(same, x), forward(model, x))
        other = lora.inject_lora(tiny(), lora.LoraConfig(r=3))
        with pytest.raises(CheckpointError, match="r: file 2, model 3"):
            lora.load_adapter(other, d)


def test_a_second_adapter_loads_under_its_own_name():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model, 3)
    x = inputs((2, 5))
    with tempfile.TemporaryDirectory() as d:
        lora.save_adapter(model, d)
        target = lora.inject_lora(tiny(), lora.LoraConfig(r=4), "mine")
        lora.load_adapter(target, d, "theirs")
    assert lora.active_adapters(target) == ["mine"]
    lora.set_adapter(target, "theirs")
    assert np.array_equal(forward(target, x), forward(model, x))


@pytest.mark.parametrize("breakage,needle", [
    ("no_config", "adapter_config.json"), ("no_weights", "adapter_model.safetensors"),
    ("bad_json", "adapter_config.json.*not valid JSON"), ("not_lora", "peft_type"),
    ("bad_weights", "adapter_model.safetensors.*header"),
])
@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.filterwarnings("ignore::minilora.fileio.NoManifestWarning")
def test_broken_directories_give_clear_errors(breakage, needle, manifest):
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    with tempfile.TemporaryDirectory() as d:
        paths = lora.save_adapter(model, d)
        if manifest:  # the manifest names the file that does not match it
            needle = os.path.basename(paths["weights" if "weights" in breakage else "config"])
        else:
            os.remove(os.path.join(d, "manifest.json"))
        if breakage == "no_config":
            os.remove(paths["config"])
        elif breakage == "no_weights":
            os.remove(paths["weights"])
        elif breakage == "bad_json":
            with open(paths["config"], "w") as f:
                f.write("{not json")
        elif breakage == "not_lora":
            with open(paths["config"], "w") as f:
                json.dump({"peft_type": "PREFIX_TUNING"}, f)
        else:
            with open(paths["weights"], "wb") as f:
                f.write(b"\x00garbage")
        with pytest.raises(CheckpointError, match=needle):
            lora.load_adapter(tiny(), d)


def test_saving_is_atomic(monkeypatch):
    """A failure while writing leaves the previous save intact and nothing temporary behind."""
    from minilora import fileio

    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    with tempfile.TemporaryDirectory() as parent:
        d = os.path.join(parent, "adapter")
        paths = lora.save_adapter(model, d)
        before = {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)}
        randomize_lora(model)
        calls = []

        def failing_write(fd, data):
            calls.append(len(data))
            if len(calls) > 1:
                raise OSError("disk on fire")
            return os.write(fd, data[:len(data) // 2])
        monkeypatch.setattr(fileio, "_write_chunk", failing_write)
        with pytest.raises(OSError, match="disk on fire"):
            lora.save_adapter(model, d)
        monkeypatch.undo()
        assert os.listdir(parent) == ["adapter"]
        assert {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)} == before
        assert lora.read_adapter(d)[0].r == 2 and os.path.isfile(paths["config"])


def test_unknown_adapter_name_is_refused_on_save():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    with tempfile.TemporaryDirectory() as d, pytest.raises(CheckpointError, match="'other'"):
        lora.save_adapter(model, d, "other")


# ---------------------------------------------------- the one reader and writer of the files

def test_every_adapter_writer_goes_through_the_same_bytes(tmp_path):
    """save_adapter, adapter_files and interop.export_peft / peft_adapter_files write what
    adapter_file_bytes makes of their (config, arrays), byte for byte."""
    from minilora import interop
    from minilora.gpt import GPT, GPTConfig
    from minilora.lora.io import adapter_file_bytes

    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    randomize_lora(model)
    lora.save_adapter(model, str(tmp_path / "a"))
    files = lora.adapter_files(model)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, data in files.items():
        assert (tmp_path / "a" / name).read_bytes() == data
    arrays = {k: host(p) for k, p in lora.adapter_state_dict(model).items()}
    assert adapter_file_bytes(lora.lora_configs(model)["default"].to_peft_dict(), arrays) == files
    config = json.loads(files["adapter_config.json"])
    assert files["adapter_config.json"] == (json.dumps(config, indent=2, sort_keys=True)
                                            + "\n").encode()
    gpt = lora.inject_lora(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2,
                                         n_embd=8)), lora.LoraConfig(r=2))
    interop.export_peft(gpt, str(tmp_path / "p"))
    for name, data in interop.peft_adapter_files(gpt).items():
        assert (tmp_path / "p" / name).read_bytes() == data


def test_the_reader_checks_the_config_before_reading_any_tensor(tmp_path):
    from minilora.lora.io import read_adapter_files

    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    lora.save_adapter(model, str(tmp_path / "a"))
    seen = []

    def refuse(raw, path):
        seen.append((raw["r"], path))
        raise CheckpointError("refused by the caller")

    with pytest.raises(CheckpointError, match="refused by the caller"):
        read_adapter_files(tmp_path / "a", "my_loader", refuse)
    assert seen == [(2, str(tmp_path / "a" / "adapter_config.json"))]
    parsed, arrays, found = read_adapter_files(tmp_path / "a", "my_loader",
                                               lambda raw, path: raw["r"], float_dtype=np.float64)
    assert parsed == 2 and found == tmp_path / "a"
    assert all(a.dtype == np.float64 for a in arrays.values()) and len(arrays) == 4
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="my_loader: .*incomplete"):
        read_adapter_files(tmp_path / "a", "my_loader", lambda raw, path: raw)
    os.remove(tmp_path / "a" / "manifest.json")
    with pytest.raises(CheckpointError, match="my_loader: .*adapter_model.safetensors' is "
                                              "missing; an adapter directory holds"):
        read_adapter_files(tmp_path / "a", "my_loader", lambda raw, path: raw)


def test_the_header_reader_reads_no_tensor_data(tmp_path, monkeypatch):
    from minilora.lora import io
    from minilora.lora.io import adapter_header

    model = lora.inject_lora(tiny(), lora.LoraConfig(r=3))
    lora.save_adapter(model, str(tmp_path / "a"))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # the data is damaged, the header is not
        f.seek(size - 4)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):  # a load would refuse it
        lora.load_adapter(tiny(), str(tmp_path / "a"))

    def no_data(*args, **kwargs):
        raise AssertionError("adapter_header read tensor data")

    monkeypatch.setattr(io, "read_tensors", no_data)
    config, infos = adapter_header(tmp_path / "a", "inspect")
    assert config["r"] == 3 and config["peft_type"] == "LORA"
    a = infos["base_model.model.q_proj.lora_A.weight"]
    assert a.shape == (3, 5) and a.dtype == "F64"


def test_a_forged_rank_pattern_is_refused_before_any_matrix_of_that_rank_exists(tmp_path):
    """A 17 KB adapter whose config claimed rank 65536 for q_proj used to inject (65536 x in)
    matrices, hundreds of MB, before the file's (r, in) shapes were compared."""
    import tracemalloc

    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    lora.save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "manifest.json").unlink()  # as a hand-edited or foreign adapter
    path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["rank_pattern"] = {"q_proj": 65536}
    path.write_text(json.dumps(config))
    fresh = tiny()
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"r=65536 for .*q_proj.*has shape \(2, "):
            lora.load_adapter(fresh, tmp_path / "ad")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # a (65536, in) float32 matrix alone is 65536 * in * 4 bytes
    assert lora.lora_layers(fresh) == []


def test_an_adapter_holding_nan_is_not_saved_and_is_said_when_loaded(tmp_path):
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2))
    lora.save_adapter(model, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()}
    layer = lora.lora_layers(model)[0][1]
    layer.lora_B["default"].weight.data[0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"hold NaN or inf values .*lora_B.*not writing"):
        lora.save_adapter(model, tmp_path / "good")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()} == before
    # a file written elsewhere (another tool) with a NaN: loaded, with a warning naming it
    arrays = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = next(k for k in arrays if "lora_B" in k)
    arrays[key][0, 0] = np.nan
    save_file(arrays, tmp_path / "good" / "adapter_model.safetensors")
    (tmp_path / "good" / "manifest.json").unlink()
    with pytest.warns(NonFiniteWarning, match=r"1 tensor\(s\) hold NaN or inf values"):
        lora.load_adapter(tiny(), tmp_path / "good")
