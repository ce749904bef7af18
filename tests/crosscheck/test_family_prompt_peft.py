"""Prompt tuning and prefix tuning against PEFT on transformers' GPT-2: the HF mapping of a tiny
minilora GPT (``interop.gpt_to_hf``) with the same virtual-token embeddings (or the same prefix
table) gives the same logits on the real positions, the same loss and the same greedy tokens;
PeftModel.from_pretrained loads minilora's saved directories, and minilora loads PEFT's."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import minilora as ml  # noqa: E402
from minilora import family, interop  # noqa: E402
from minilora.family import prompt as pt  # noqa: E402
from minilora.lora.io import read_adapter_files, write_adapter_files  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = [pytest.mark.crosscheck,  # transformers warns of its own deprecations
              pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

V, BLOCK, L, NH, C = 13, 12, 2, 2, 16
CASES = [("prompt", 1, 4), ("prompt", 4, 8), ("prefix", 1, 4), ("prefix", 3, 9)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def our_base(seed=0, block=BLOCK):
    """A float64 minilora GPT with weights far from their init (so every term shows)."""
    ml.manual_seed(seed)
    model = ml.GPT(ml.GPTConfig(vocab_size=V, block_size=block, n_layer=L, n_head=NH,
                                n_embd=C)).astype(np.float64)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data += ml.backend.asarray(rng.standard_normal(p.shape) * 0.1)
    return model.eval()


def their_base(ours, directory):
    interop.gpt_to_hf(ours, directory)
    return transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float64).eval()


def peft_config(method, N, **kw):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **kw)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **kw)


def ours_with(method, N, seed=0, block=BLOCK):
    """The base with prompt or prefix tuning and learned (random) values."""
    ours = our_base(seed, block)
    config = family.PromptTuningConfig(N) if method == "prompt" else family.PrefixTuningConfig(N)
    family.inject_prompt(ours, config)
    w = ours.prompt_encoder.embedding.weight
    w.data[...] = ml.backend.asarray(np.random.default_rng(seed + 7).standard_normal(w.shape)
                                     * 0.5)
    return ours


def table_of(ours):
    return host(ours.prompt_encoder.embedding.weight)  # P (N, C), or the prefix (N, 2 L C)


def their_logits(model, idx, N, method):
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(idx)).logits.numpy()
    return logits[:, N:] if method == "prompt" else logits  # PEFT keeps the virtual positions


def our_logits(model, idx):
    with ml.no_grad():
        return host(model(idx))


def tokens(seed, b, t):
    return np.random.default_rng(seed).integers(0, V, (b, t))


@pytest.mark.parametrize("method,N,T", CASES)
def test_the_same_virtual_tokens_give_peft_logits(tmp_path, method, N, T):
    ours = ours_with(method, N, seed=N + T)
    theirs = peft.get_peft_model(their_base(our_base(N + T), tmp_path / "base"),
                                 peft_config(method, N)).double().eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(table_of(ours)))
    idx = tokens(T, 3, T)
    np.testing.assert_allclose(our_logits(ours, idx), their_logits(theirs, idx, N, method),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(our_logits(ours, idx), their_logits(theirs, idx, N, method),
                               rtol=1e-9, atol=1e-10)  # float64 both sides: much closer


@pytest.mark.parametrize("method,N,T", CASES)
def test_the_loss_is_peft_loss(tmp_path, method, N, T):
    """minilora's targets (B, T) are HF's labels shifted by one: labels = [-100, targets[:-1]]
    (HF shifts them itself, and the last virtual position's guess of the first token, which PEFT
    could score, is not scored: the first label is -100)."""
    ours = ours_with(method, N, seed=1)
    theirs = peft.get_peft_model(their_base(our_base(1), tmp_path / "base"),
                                 peft_config(method, N)).double().eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(table_of(ours)))
    idx = tokens(2, 2, T)
    targets = np.roll(idx, -1, axis=1)
    targets[:, -1] = -100
    targets[1, : T // 2] = -100  # a prompt, left out of the loss
    labels = np.concatenate([np.full((2, 1), -100), targets[:, :-1]], axis=1)
    with ml.no_grad():
        _, loss = ours(idx, targets)
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(idx), labels=torch.from_numpy(labels)).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # HF's loss is float32


def peft_greedy(model, idx, new):
    """Greedy decoding by PEFT's forward alone: the whole sequence again at every step."""
    tokens_ = torch.from_numpy(idx)
    for _ in range(new):
        with torch.no_grad():
            last = model(input_ids=tokens_).logits[:, -1]
        tokens_ = torch.cat([tokens_, last.argmax(-1, keepdim=True)], dim=1)
    return tokens_.numpy()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_greedy_generation_gives_peft_tokens(tmp_path, method):
    """minilora's cached generate against greedy decoding by PEFT's forward, and for a prefix
    against PEFT's generate too. (PEFT's generate with prompt tuning on GPT-2, transformers 5,
    leaves its own forward after the first new token: with the cache its logits differ by ~0.3,
    and with N=3, T=4, n_positions=12 it raises IndexError in wpe from 3 new tokens on. So the
    reference for prompt tuning is PEFT's forward, and the block is 40.)"""
    N, T, new, block = 3, 4, 8, 40
    ours = ours_with(method, N, seed=5, block=block)
    theirs = peft.get_peft_model(their_base(our_base(5, block), tmp_path / "base"),
                                 peft_config(method, N)).double().eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(table_of(ours)))
    idx = tokens(3, 2, T)
    got = host(ours.generate(idx, new, temperature=0))
    assert np.array_equal(got, peft_greedy(theirs, idx, new))
    if method == "prefix":
        with torch.no_grad():
            generated = theirs.generate(input_ids=torch.from_numpy(idx), max_new_tokens=new,
                                        attention_mask=torch.ones(idx.shape, dtype=torch.long),
                                        do_sample=False, pad_token_id=0).numpy()
        assert np.array_equal(got, generated)


@pytest.mark.parametrize("method,N,T", CASES)
def test_peft_loads_a_directory_minilora_saved(tmp_path, method, N, T):
    ours = ours_with(method, N, seed=2)
    write_adapter_files(tmp_path / "adapter", *pt.adapter_arrays(ours))
    theirs = peft.PeftModel.from_pretrained(their_base(our_base(2), tmp_path / "base"),
                                            tmp_path / "adapter").double().eval()
    assert theirs.peft_config["default"].peft_type.value == pt.adapter_arrays(ours)[0][
        "peft_type"]
    # PEFT builds its prompt encoder in float32 and loads the float64 file into it
    loaded = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(loaded, table_of(ours).astype(np.float32))
    idx = tokens(4, 2, T)
    np.testing.assert_allclose(our_logits(ours, idx), their_logits(theirs, idx, N, method),
                               rtol=0, atol=1e-5)
    ours.prompt_encoder.embedding.weight.data[...] = ml.backend.asarray(loaded)
    np.testing.assert_allclose(our_logits(ours, idx), their_logits(theirs, idx, N, method),
                               rtol=1e-9, atol=1e-10)  # the same float32-rounded table


@pytest.mark.parametrize("method,kw", [("prompt", {}),
                                       ("prompt", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
                                       ("prefix", {}), ("prefix", {"prefix_projection": True})])
def test_minilora_loads_a_directory_peft_saved(tmp_path, method, kw):
    N, T = 3, 6
    theirs = peft.get_peft_model(their_base(our_base(3), tmp_path / "base"),
                                 peft_config(method, N, **kw)).double().eval()
    with torch.no_grad():  # moved away from the init, so the check sees the learned values
        for p in theirs.prompt_encoder["default"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path / "adapter")
    config, arrays, _ = read_adapter_files(tmp_path / "adapter", "test", lambda d, path: d)
    ours = pt.apply_adapter(our_base(3), config, arrays)
    idx = tokens(5, 2, T)
    np.testing.assert_allclose(our_logits(ours, idx), their_logits(theirs, idx, N, method),
                               rtol=1e-9, atol=1e-10)
