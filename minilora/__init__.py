"""minilora: LoRA and QLoRA from scratch on NumPy/CuPy, small enough to read in an afternoon.

    import minilora as ml
    x = ml.Tensor([[1.0, 2.0]], requires_grad=True)
    layer = ml.nn.Linear(2, 3)
    layer(x).sum().backward()      # x.grad, layer.weight.grad, layer.bias.grad

Layers, from the bottom (imports point down; ARCHITECTURE.md draws them): errors -> backend,
fileio, tensorfile, flops -> fast (the fast forms, one switch) -> tensor (autograd), functional,
attention -> nn, optim -> data, bpe, gpt, quant, lora, family, interop, jsonl -> checkpoint,
step, train -> cli, demo and this face. See the README for the tour.
"""

# first of all, before NumPy: a Ctrl-C while the command line starts is one line (startup.py)
from . import startup as _startup

_startup.guard()

# the engine, after the guard (pyproject.toml lets these come after code: E402)
from . import backend, errors, family, fast, flops, functional, interop, lora, nn, optim, quant
from .backend import get_backend, manual_seed, set_default_dtype, use_backend
from .gpt import GPT, GPTConfig
from .tensor import Tensor, cat, concatenate, is_grad_enabled, no_grad, split, stack, tensor, where

__version__ = "0.1.0"

__all__ = [
    "Tensor", "tensor", "no_grad", "is_grad_enabled", "concatenate", "cat", "stack", "split",
    "where", "use_backend", "get_backend", "manual_seed", "set_default_dtype", "backend", "errors",
    "fast", "flops", "functional", "nn", "optim", "lora", "family", "quant", "interop", "GPT",
    "GPTConfig", "__version__",
]
