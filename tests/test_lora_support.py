"""Small models and helpers shared by the LoRA tests (and a few tests of the helpers themselves).

The models use PEFT's vocabulary of module names (q_proj, k_proj, v_proj) so that the default
LoraConfig targets them, plus a non-target layer ("head") that must stay untouched.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import minilora as ml
from minilora import backend as B
from minilora import lora, nn
from tests.helpers import host


class TinyNet(nn.Module):
    """x (..., k) -> head(v_proj(tanh(q_proj(x)) + k_proj(x))): two targets, two other Linears."""

    def __init__(self, k: int = 5, h: int = 6, o: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.q_proj = nn.Linear(k, h, bias=bias)
        self.k_proj = nn.Linear(k, h, bias=bias)
        self.v_proj = nn.Linear(h, o, bias=bias)
        self.head = nn.Linear(o, 3, bias=bias)
        self.norm = nn.LayerNorm(o)

    def forward(self, x):
        hidden = self.q_proj(x).tanh() + self.k_proj(x)
        return self.head(self.norm(self.v_proj(hidden)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(d, d)
        self.attn.v_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(d, 2 * d)
        self.mlp.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn.v_proj(self.attn.q_proj(x).tanh())
        return x + self.mlp.proj(self.mlp.fc(x).tanh())


class Stack(nn.Module):
    """blocks.{i}.attn.{q_proj,v_proj}, blocks.{i}.mlp.{fc,proj}: nested paths like a GPT's."""

    def __init__(self, d: int = 4, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def tiny(k: int = 5, h: int = 6, o: int = 4, dtype=np.float64, seed: int = 0,
         bias: bool = True) -> TinyNet:
    """A TinyNet built from ``seed`` in ``dtype``."""
    ml.manual_seed(seed)
    return TinyNet(k, h, o, bias=bias).astype(dtype)


def inputs(shape: tuple, dtype=np.float64, seed: int = 1) -> ml.Tensor:
    """A standard-normal input tensor on the active backend."""
    return ml.Tensor(B.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype)))


def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter random, non-zero A, B (and perturb DoRA's m) so deltas are non-trivial."""
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        for name in layer.lora_A:
            for p in layer.adapter_parameters(name):
                noise = rng.standard_normal(p.shape) * scale
                if p.ndim == 1:  # DoRA magnitude: keep it positive, near its init
                    noise = host(p.data) * (1.0 + 0.3 * np.tanh(noise))
                p.data[...] = B.asarray(noise.astype(p.data.dtype))


def forward(model: nn.Module, x: ml.Tensor) -> np.ndarray:
    """The model's output as a host array, computed without a graph."""
    with ml.no_grad():
        return host(model(x)).copy()


def assert_close(actual, expected, rtol: float) -> None:
    """Relative agreement, with the absolute slack scaled to the size of ``expected``."""
    actual, expected = host(actual), host(expected)
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


RTOL = {np.float64: 1e-10, np.float32: 1e-5}

dims = st.integers(1, 7)
ranks = st.integers(1, 4)
alphas = st.floats(0.25, 64.0, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**16)
dtypes = st.sampled_from([np.float64, np.float32])


# ------------------------------------------------------------------- tests of the helpers

def test_tiny_models_run_and_have_the_expected_paths():
    model = tiny()
    assert forward(model, inputs((3, 5))).shape == (3, 3)
    paths = [p for p, _ in lora.linear_like_modules(Stack(4, 2))]
    assert paths == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.0.mlp.fc",
                     "blocks.0.mlp.proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj",
                     "blocks.1.mlp.fc", "blocks.1.mlp.proj"]


def test_randomize_lora_changes_every_adapter_parameter():
    model = lora.inject_lora(tiny(), lora.LoraConfig(r=2, use_dora=True))
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    randomize_lora(model)
    after = model.state_dict()
    for key, value in before.items():
        changed = not np.array_equal(value, host(after[key]))
        assert changed == ("lora_" in key), key
