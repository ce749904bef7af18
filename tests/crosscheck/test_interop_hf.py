"""gpt_from_hf / gpt_to_hf against transformers' GPT2LMHeadModel: small random models built
locally (no downloads) give the same logits, and the same loss gradient for every weight."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import minilora as ml  # noqa: E402
from minilora import interop  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck

SIZES = [  # n_layer, n_head, n_embd, vocab_size, n_positions
    (1, 1, 8, 7, 5),
    (2, 2, 16, 13, 12),
    (3, 4, 32, 50, 9),
    (2, 3, 24, 5, 16),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_gpt2(sizes, dtype, seed=0):
    """A random GPT2LMHeadModel in eval mode; every weight (LayerNorms and biases too) random."""
    n_layer, n_head, n_embd, vocab, positions = sizes
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                     vocab_size=vocab, n_positions=positions, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # wte is the head too: tied
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def tokens(sizes, seed=0):
    _, _, _, vocab, positions = sizes
    return np.random.default_rng(seed).integers(0, vocab, (3, positions))


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_logits_agree_with_transformers(tmp_path, sizes, dtype, atol):
    theirs = hf_gpt2(sizes, getattr(torch, np.dtype(dtype).name), seed=sum(sizes))
    theirs.save_pretrained(tmp_path)
    ours = interop.gpt_from_hf(tmp_path, dtype=dtype)
    idx = tokens(sizes)
    with ml.no_grad():
        actual = host(ours(idx))
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual, hf_logits(theirs, idx), rtol=0, atol=atol)


def mapped_grads(theirs):
    """The gradient of every HF weight in minilora's names: Conv1D transposed, c_attn split."""
    out = {}
    for name, p in theirs.transformer.named_parameters():
        g = p.grad.numpy()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            g = g.T
        for old, new in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")):
            name = name.replace(old, new)
        if ".c_attn." in name:
            for part, q in zip(np.split(g, 3, axis=0), ("q_proj", "k_proj", "v_proj")):
                out[name.replace("c_attn", q)] = part
        else:
            out[name] = g
    return out


@pytest.mark.parametrize("sizes", SIZES)
def test_the_loss_gradient_of_every_weight_agrees(tmp_path, sizes):
    theirs = hf_gpt2(sizes, torch.float64, seed=7)
    theirs.save_pretrained(tmp_path)
    ours = interop.gpt_from_hf(tmp_path, dtype=np.float64)
    idx, targets = tokens(sizes, 1), tokens(sizes, 2)
    _, loss = ours(idx, targets)
    loss.backward()
    logits = theirs(torch.from_numpy(idx)).logits
    their_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   torch.from_numpy(targets).reshape(-1))
    their_loss.backward()
    np.testing.assert_allclose(loss.item(), their_loss.item(), rtol=1e-12)
    grads = mapped_grads(theirs)
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(grads)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(host(p.grad), grads[name], rtol=1e-7, atol=1e-11,
                                   err_msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_gpt_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, bias, dtype, atol):
    ml.manual_seed(3)
    ours = ml.GPT(ml.GPTConfig(vocab_size=17, block_size=10, n_layer=2, n_head=2, n_embd=16,
                               bias=bias)).astype(dtype)
    rng = np.random.default_rng(0)
    for _, p in ours.named_parameters():
        p.data += ml.backend.asarray(rng.standard_normal(p.shape) * 0.1, dtype=dtype)
    interop.gpt_to_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, dtype=getattr(torch, np.dtype(dtype).name)).eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    idx = rng.integers(0, 17, (2, 10))
    with ml.no_grad():
        expected = host(ours(idx))
    np.testing.assert_allclose(hf_logits(theirs, idx), expected, rtol=0, atol=atol)
