"""The command line's LoRA road against transformers and PEFT: an adapter that `minilora export
--to peft` writes loads with PeftModel.from_pretrained on the GPT-2 that `export --to hf` writes and
gives minilora's logits; `finetune --from` a Hugging Face GPT-2 directory tokenizes text with the
directory's BPE and writes an adapter in PEFT's GPT-2 names that PeftModel loads directly."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

import minilora as ml  # noqa: E402
from minilora import interop  # noqa: E402
from minilora.bpe import GPT2BPETokenizer  # noqa: E402
from minilora.checkpoint import load_model  # noqa: E402
from minilora.cli import main  # noqa: E402
from minilora.cli_lora import attach_adapters  # noqa: E402
from tests.helpers import TINY, host  # noqa: E402

pytestmark = [pytest.mark.crosscheck,
              pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
              pytest.mark.filterwarnings("ignore::minilora.fileio.NoManifestWarning")]
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; 12 + 30 = 42. ") * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Args:
    def __init__(self, *adapters):
        self.adapter, self.use, self.no_adapter = [str(a) for a in adapters], None, False


def their_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.double().numpy()


def our_logits(model, idx):
    with ml.no_grad():
        return host(model(idx)).astype(np.float64)


def test_an_exported_adapter_loads_in_peft_on_the_exported_base(tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--task", "add", "--out", str(base), *TINY, "--steps", "20"]) == 0
    assert main(["finetune", "--from", str(base), "--task", "nocarry", "--target", "all-linear",
                 "--out", str(tmp_path / "ft"), "--batch-size", "16", "--eval-examples", "20",
                 "--no-progress", "--steps", "20", "--lr", "0.02"]) == 0
    for argv in (["--to", "hf", "--out", str(tmp_path / "hf")],
                 ["--adapter", str(tmp_path / "ft"), "--to", "peft", "--out",
                  str(tmp_path / "peft")]):
        assert main(["export", "--checkpoint", str(base), *argv]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "peft").eval()
    ours, _ = load_model(base)
    attach_adapters(ours, Args(tmp_path / "ft"))
    idx = np.random.default_rng(0).integers(0, ours.config.vocab_size, (3, 6))
    np.testing.assert_allclose(their_logits(theirs, idx), our_logits(ours, idx), atol=1e-4)
    bare, _ = load_model(base)
    assert np.abs(our_logits(bare, idx) - our_logits(ours, idx)).max() > 1e-3  # it did train


def test_finetune_from_a_hugging_face_directory_with_its_bpe(tmp_path):
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(hf_dir))  # vocab.json + merges.txt, as GPT-2's
    vocab = bpe.get_vocab_size()
    ml.manual_seed(0)
    model = ml.GPT(ml.GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    interop.gpt_to_hf(model, tmp_path / "weights")
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).write_bytes((tmp_path / "weights" / name).read_bytes())
    story = tmp_path / "story.txt"
    story.write_text(TEXT, encoding="utf-8")
    assert main(["finetune", "--from", str(hf_dir), "--text", str(story), "--out",
                 str(tmp_path / "ft"), "--batch-size", "8", "--steps", "15", "--lr", "0.02",
                 "--no-progress"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf.eval(), tmp_path / "ft").eval()
    ours = interop.gpt_from_hf(hf_dir)
    attach_adapters(ours, Args(tmp_path / "ft"))
    idx = GPT2BPETokenizer.from_dir(hf_dir).encode("The quick brown fox jumps")[None, :]
    assert idx.shape[1] > 2
    np.testing.assert_allclose(their_logits(theirs, idx), our_logits(ours, idx), atol=1e-4)
