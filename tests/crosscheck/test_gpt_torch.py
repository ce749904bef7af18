"""minilora's GPT against the same math written in plain PyTorch: logits, loss, every parameter
gradient (float64, the same weights), and greedy generation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
TF = torch.nn.functional

import minilora as ml  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from tests.helpers import host  # noqa: E402

pytestmark = pytest.mark.crosscheck


class TorchAttention(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, bias = cfg.n_embd, cfg.bias
        self.n_head = cfg.n_head
        self.q_proj, self.k_proj = tnn.Linear(C, C, bias=bias), tnn.Linear(C, C, bias=bias)
        self.v_proj, self.o_proj = tnn.Linear(C, C, bias=bias), tnn.Linear(C, C, bias=bias)

    def forward(self, x):
        Bsz, T, C = x.shape

        def heads(t):
            return t.view(Bsz, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        att = q @ k.transpose(-2, -1) / (k.shape[-1] ** 0.5)  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(Bsz, T, C)  # (B, T, C)
        return self.o_proj(y)


class TorchBlock(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, bias = cfg.n_embd, cfg.bias
        self.ln_1 = tnn.LayerNorm(C, eps=1e-5, bias=bias)
        self.attn = TorchAttention(cfg)
        self.ln_2 = tnn.LayerNorm(C, eps=1e-5, bias=bias)
        self.mlp = tnn.ModuleDict(dict(fc=tnn.Linear(C, 4 * C, bias=bias),
                                       proj=tnn.Linear(4 * C, C, bias=bias)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.proj(TF.gelu(self.mlp.fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = tnn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = tnn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = tnn.ModuleList(TorchBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = tnn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # the head tied to wte


def pair(bias=True, seed=0, **cfg):
    cfg = GPTConfig(**{**dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=16),
                       **cfg, "bias": bias})
    ml.manual_seed(seed)
    ours = GPT(cfg).double()
    theirs = TorchGPT(cfg).double()
    sd = {k: torch.from_numpy(host(v).copy()) for k, v in ours.state_dict().items()}
    theirs.load_state_dict(sd, strict=True)  # every torch parameter comes from ours
    return ours, theirs


@pytest.mark.parametrize("bias", [True, False])
def test_logits_loss_and_every_gradient_agree_with_pytorch(bias):
    ours, theirs = pair(bias)
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 13, (3, 12)), rng.integers(0, 13, (3, 12))
    tgt[0, :4] = -100  # ignored positions too
    logits, loss = ours(idx, tgt)
    loss.backward()
    tlogits = theirs(torch.from_numpy(idx))
    tloss = TF.cross_entropy(tlogits.reshape(-1, 13), torch.from_numpy(tgt).reshape(-1),
                             ignore_index=-100)
    tloss.backward()
    np.testing.assert_allclose(host(logits), tlogits.detach().numpy(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-6)
    tparams = dict(theirs.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(tparams)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(host(p.grad), tparams[name].grad.numpy(), rtol=1e-6,
                                   atol=1e-10, err_msg=name)


def test_float32_forward_agrees_with_pytorch_to_float32_precision():
    ours, theirs = pair(seed=3)
    ours.float()
    theirs.float()
    idx = np.random.default_rng(2).integers(0, 13, (2, 12))
    logits = ours(idx)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(host(logits), theirs(torch.from_numpy(idx)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_greedy_generation_agrees_with_a_pytorch_loop():
    ours, theirs = pair(seed=4, block_size=6)
    prompt = np.random.default_rng(3).integers(0, 13, (2, 4))
    out = host(ours.generate(prompt, 7, temperature=0.0))  # overflows the window of 6
    seq = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(7):
            nxt = theirs(seq[:, -6:])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    np.testing.assert_array_equal(out, seq.numpy())
