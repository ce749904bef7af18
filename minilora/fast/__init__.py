"""The fast forms: array-level kernels that compute what the reference ops compute, faster.

The teaching files (``functional``, ``attention``, ``optim``, ``tensor``) hold each op as its
equation. Where a faster way to compute the same thing exists on NumPy (a chain of elementwise
passes fused into cache-sized pieces, attention with its scores held transposed and its masked
quarter skipped, AdamW's parameters updated on several threads), it lives here, as a function of
arrays that imports only the backend and the CPU helpers (:mod:`minilora.fast.cpu`). A reference
op asks :func:`kernel` for its fast form, nanoGPT's ``if self.flash:`` turned into one lookup:

    fused = fast.kernel("gelu")
    if fused is not None:
        ...                     # the fast form
    ...                         # the equation

One switch, on by default, chooses the fast forms for the whole process: ``MINILORA_REFERENCE=1``
in the environment turns them off from the start, ``with fast.reference():`` inside a block,
``fast.set_enabled(False)`` from then on. Each fast form has a test that pins it to its reference
form (``tests/test_fast_*.py``): bit for bit where the order of operations is the same, else
within a stated tolerance. With the switch off a training step still cuts its batch into the
same shards (a run depends on their number), but runs them one after another.

(``MINILORA_FAST=1`` is another thing: the notebooks' small sizes.)
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import ConfigError

# op name -> (module in this package, function): every fast form there is, in one table
KERNELS: dict[str, tuple[str, str]] = {
    "gelu": ("elementwise", "gelu"),
    "mlp": ("mlp", "mlp"),
    "layer_norm": ("norm", "layer_norm"),
    "column_sums": ("norm", "column_sums"),
    "attention": ("attention", "causal_attention"),
    "cached_attention": ("attention", "cached_attention"),
    "adamw": ("adamw", "adamw_step"),
    "lora_update": ("lora", "add_lora_update_into"),
    "logsumexp_rows": ("loss", "logsumexp_rows"),
    "cross_entropy_grad": ("loss", "cross_entropy_grad"),
    "sum_of_squares": ("squares", "sum_of_squares"),
}


def _from_environment() -> bool:
    value = os.environ.get("MINILORA_REFERENCE", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return True
    if value in ("1", "true", "yes", "on"):
        return False
    raise ConfigError(f"MINILORA_REFERENCE must be 1 (reference forms) or 0 (fast forms, the "
                      f"default), got {value!r}")


_enabled = _from_environment()
_modules: dict[str, Any] = {}  # the kernel modules imported so far, by name


def enabled() -> bool:
    """True while the fast forms are on (the default; off under ``MINILORA_REFERENCE=1``)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fast forms on (True) or off (False) for the whole process, from now on."""
    global _enabled
    if not isinstance(flag, bool):
        raise ConfigError(f"fast.set_enabled: flag must be True or False, got {flag!r}")
    _enabled = flag


@contextmanager
def reference() -> Iterator[None]:
    """Context manager: every op runs its reference form inside the block."""
    with forms(False):
        yield


@contextmanager
def forms(flag: bool) -> Iterator[None]:
    """Context manager: the fast forms on (True) or off (False) inside the block."""
    previous = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def kernel(name: str) -> Callable[..., Any] | None:
    """The fast form of op ``name`` while the switch is on, else None: the one dispatch point."""
    if name not in KERNELS:
        raise ConfigError(f"fast.kernel: no fast form named {name!r}; known: {sorted(KERNELS)}")
    if not _enabled:
        return None
    module, function = KERNELS[name]
    found = _modules.get(module)
    if found is None:  # imported on first use: a reference run never loads the fast forms
        found = _modules[module] = importlib.import_module(f"{__name__}.{module}")
    return getattr(found, function)  # read each time: a test may replace the function


__all__ = ["KERNELS", "enabled", "set_enabled", "reference", "forms", "kernel"]
