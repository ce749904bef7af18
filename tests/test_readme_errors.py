"""The README's table of what bad input gets is true: each row's example is run (a `minilora`
command in a fresh process, or a Python call) and must fail with a message holding the row's text
in one line (a `note:` row must print it and still succeed)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import lora, quant
from minilora.cli import main
from tests.helpers import ROOT, TINY

CONFIG = ml.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)


def table_rows() -> list[tuple[str, str, str]]:
    """(bad input, example, message) of each row of the README's bad-input table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- bad-input table -->", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in block.strip().splitlines()[2:]:  # past the header and the |---| line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        example, message = (re.fullmatch(r"`(.*)`", c).group(1) for c in cells[1:3])
        rows.append((cells[0], example, message))
    return rows


ROWS = table_rows()


def _adapter_copy(src: Path, dst: Path) -> Path:
    """A copy of an adapter without its manifest, as PEFT would write it, to be forged."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    return dst


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding everything the examples name."""
    d = tmp_path_factory.mktemp("readme")
    assert main(["train", "--task", "add", "--out", str(d / "runs" / "base"), *TINY,
                 "--steps", "10"]) == 0
    (d / "notes.txt").write_text("not a directory\n")
    (d / "photos").mkdir()
    (d / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    (d / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    shutil.copytree(d / "runs" / "base", d / "runs" / "damaged")
    weights = d / "runs" / "damaged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))

    model = ml.GPT(CONFIG)
    lora.inject_lora(model, lora.LoraConfig(r=2))
    lora.save_adapter(model, str(d / "adapter"))
    config = json.loads((d / "adapter" / "adapter_config.json").read_text())
    forged = _adapter_copy(d / "adapter", d / "forged-r")
    (forged / "adapter_config.json").write_text(json.dumps({**config, "r": 2 ** 40}))
    forged = _adapter_copy(d / "adapter", d / "string-bool")
    (forged / "adapter_config.json").write_text(json.dumps({**config, "use_dora": "false"}))
    forged = _adapter_copy(d / "adapter", d / "int8-weights")
    arrays = load_file(forged / "adapter_model.safetensors")
    save_file({k: v.astype(np.int8) for k, v in arrays.items()},
              forged / "adapter_model.safetensors")
    forged = _adapter_copy(d / "adapter", d / "sparse-64gib")
    header = json.dumps({"base_model.model.h.0.attn.q_proj.lora_A.weight": {
        "dtype": "F32", "shape": [2 ** 34, 1], "data_offsets": [0, 2 ** 36]}}).encode()
    with open(forged / "adapter_model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2 ** 36)  # sparse: no disk is used
    return d


def test_the_table_has_rows_of_both_kinds():
    kinds = {example.startswith("minilora ") for _, example, _ in ROWS}
    assert len(ROWS) >= 15 and kinds == {True, False}


@pytest.mark.parametrize("what,example,message", ROWS, ids=[r[0] for r in ROWS])
def test_each_row_is_what_minilora_says(workdir, monkeypatch, what, example, message):
    if example.startswith("minilora "):
        argv = shlex.split(example)[1:]
        result = subprocess.run([sys.executable, "-m", "minilora", *argv], cwd=workdir,
                                capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        # the progress bar draws on stderr too; what is left must be one line
        err = "\n".join(line for line in result.stderr.strip().splitlines()
                        if not re.match(r"\w+:\s+\d+%\|", line))
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert message in err, err
        if message.startswith("note:"):
            assert result.returncode == 0, err
        else:
            assert result.returncode in (1, 2), (result.returncode, err)
        return
    monkeypatch.chdir(workdir)
    merged = ml.GPT(CONFIG)
    lora.inject_lora(merged, lora.LoraConfig(r=2))
    lora.merge(merged)
    namespace = {"ml": ml, "lora": lora, "quant": quant, "np": np, "model": ml.GPT(CONFIG),
                 "merged": merged, "w": np.ones((64, 64), np.float32)}
    with pytest.raises(ml.errors.MiniLoraError) as info:
        exec(example, namespace)
    assert message in str(info.value) and "\n" not in str(info.value)
