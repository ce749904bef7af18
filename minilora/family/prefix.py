"""Prefix tuning (Li and Liang 2021, "Prefix-Tuning", arXiv 2101.00190): N learned keys and
values in front of every layer's own, which every real token attends to.

With C = n_embd, L = n_layer, nh heads of hs = C / nh, the trained table is PEFT's

    past_key_values  (N, 2 L C): row j holds, for virtual position j, layer 0's key, layer 0's
                     value, layer 1's key, ... each C wide (nh heads of hs, head-major)

and each layer l attends over K = [P_k^l; k], V = [P_v^l; v] (B, N + T, C) with the causal mask
over the N + T keys with the prefix columns open (``attention.prefix_self_attention``):

    y = softmax(q K^T / sqrt(hs) + M) V,    M = causal_mask(N + T, start=N)      (T, N + T)

The real tokens take positions N .. N + T - 1 (as Hugging Face's GPT-2 gives them after a
past_key_values of length N, which is how PEFT feeds the prefix), so N + T must fit block_size.
In generation the prefix fills the first N entries of the KV cache.

Optionally (``prefix_projection=True``, the paper's reparameterisation, which it found steadier
to train) the table is computed instead as ``MLP(E)``: E (N, C) an embedding, the MLP
Linear(C, H), tanh, Linear(H, 2 L C), H = ``encoder_hidden_size`` (C by default), as PEFT's
PrefixEncoder does. Only its output is saved (PEFT saves the same): a saved prefix loads as the
plain table.

Cost: N * 2 L C trainable parameters (with the MLP: N C + C H + H + 2 L C (H + 1), all of it
discarded after training); per token and layer 2 * 2 * C * N more FLOPs (q K^T and P V over the
N prefix keys); N positions of context and N KV-cache entries. Not mergeable: the prefix is
attention input, not a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, check_int
from ..nn import Embedding, Linear, Module, Sequential, Tanh
from ..tensor import Tensor

INIT_WEIGHTS = (None, "zero")


@dataclass
class PrefixTuningConfig:
    """Prefix tuning's settings, named as PEFT's ``PrefixTuningConfig``.

    - ``num_virtual_tokens``: N, the learned positions in front of every layer (positive int;
      N plus the sequence must fit the model's block_size).
    - ``prefix_projection``: compute the keys and values with a two-layer tanh MLP from an (N, C)
      embedding (the paper's reparameterisation) instead of learning them directly.
    - ``encoder_hidden_size``: the MLP's hidden width H (None: n_embd, as PEFT).
    - ``init_weights``: None (random: N(0, 1) table or embedding, PyTorch's MLP init) or "zero"
      (keys and values start at zero; the prefix still draws attention mass, so the model is not
      the base at init).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.num_virtual_tokens = check_int(self.num_virtual_tokens,
                                            "PrefixTuningConfig: num_virtual_tokens",
                                            error=ConfigError)
        if not isinstance(self.prefix_projection, (bool, np.bool_)):
            raise ConfigError(f"PrefixTuningConfig: prefix_projection must be True or False, got "
                              f"{self.prefix_projection!r}")
        self.prefix_projection = bool(self.prefix_projection)
        if self.encoder_hidden_size is not None:
            self.encoder_hidden_size = check_int(self.encoder_hidden_size,
                                                 "PrefixTuningConfig: encoder_hidden_size",
                                                 error=ConfigError)
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"PrefixTuningConfig: init_weights must be one of {INIT_WEIGHTS}, "
                              f"got {self.init_weights!r}")


class PrefixEncoder(Module):
    """The learned prefix of every layer: ``forward(batch_size)`` -> past_key_values
    (batch_size, N, 2 L C); :meth:`key_values` cuts it into each layer's (keys, values)."""

    def __init__(self, config: PrefixTuningConfig, n_layer: int, n_embd: int,
                 dtype: Any = None) -> None:
        super().__init__()
        N, C = config.num_virtual_tokens, n_embd
        self.num_virtual_tokens, self.n_layer, self.n_embd = N, n_layer, n_embd
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:
            H = config.encoder_hidden_size or C
            self.embedding = Embedding(N, C, dtype=dtype)
            self.transform = Sequential(Linear(C, H, dtype=dtype), Tanh(),
                                        Linear(H, 2 * n_layer * C, dtype=dtype))
            last = self.transform[2]
            zeroed = (last.weight, last.bias)
        else:
            self.embedding = Embedding(N, 2 * n_layer * C, dtype=dtype)  # (N, 2 L C)
            zeroed = (self.embedding.weight,)
        if config.init_weights == "zero":
            for p in zeroed:
                p.data[...] = 0

    def forward(self, batch_size: int) -> Tensor:
        """past_key_values for ``batch_size`` sequences: (batch_size, N, 2 L C), each row the
        same (looked up by position, so the backward adds the batch's gradients up)."""
        ids = np.tile(np.arange(self.num_virtual_tokens), (batch_size, 1))  # (B, N)
        table = self.embedding(ids)  # (B, N, C) with the MLP, else (B, N, 2 L C)
        return self.transform(table) if self.prefix_projection else table

    def key_values(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer l, (keys, values), each (batch_size, N, C): past_key_values[..., l, 0 / 1]."""
        N, L, C = self.num_virtual_tokens, self.n_layer, self.n_embd
        past = self(batch_size).reshape(batch_size, N, L, 2, C)  # PEFT's order: layer, k/v
        return [(past[:, :, layer, 0], past[:, :, layer, 1]) for layer in range(L)]

    def prepare_inputs(self, x: Tensor, cache: Any) -> tuple[Tensor, np.ndarray, Any]:
        """GPT's hook at a sequence's start: x (B, T, C) unchanged, positions N .. N + T, and
        the layers' prefixes; with a KV cache they go into its first N entries instead."""
        Bsz, T, _ = x.shape
        N = self.num_virtual_tokens
        prefixes = self.key_values(Bsz)
        if cache is not None:  # generation: no graph, the cache holds them from here on
            cache.prefill([k.data for k, _ in prefixes], [v.data for _, v in prefixes])
            prefixes = None
        return x, np.arange(N, N + T), prefixes

    def past_key_values(self) -> Tensor:
        """The table a save holds: (N, 2 L C), PEFT's ``prompt_embeddings`` for prefix tuning."""
        return self(1).reshape(self.num_virtual_tokens, 2 * self.n_layer * self.n_embd)


def prefix_parameter_count(config: PrefixTuningConfig, n_layer: int, n_embd: int) -> int:
    """Trainable parameters of a prefix: N * 2 L C, or with the MLP
    N C + (C H + H) + (H * 2 L C + 2 L C)."""
    N, C, L = config.num_virtual_tokens, n_embd, n_layer
    if not config.prefix_projection:
        return N * 2 * L * C
    H = config.encoder_hidden_size or C
    return N * C + (C * H + H) + (H * 2 * L * C + 2 * L * C)


__all__ = ["PrefixTuningConfig", "PrefixEncoder", "prefix_parameter_count", "INIT_WEIGHTS"]
