"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv 2104.08691): N learned virtual-token embeddings in front of the token embeddings.

With idx (B, T), C = n_embd and P (N, C) the learned embeddings:

    x = dropout([P; wte[idx]] + wpe[0 .. N + T))                           (B, N + T, C)
    h = blocks(x);  logits = ln_f(h[:, N:]) wte^T                          (B, T, V)

as PEFT runs it on Hugging Face's GPT-2 (inputs_embeds = [P; embeddings], positions over the
whole N + T). PEFT's logits cover all N + T positions and its loss masks the virtual ones;
minilora returns only the real tokens' logits (B, T, V) and its loss over them, the same loss as
PEFT's for labels whose first entry is -100 (HF shifts the labels itself, minilora's targets come
shifted; nothing in minilora's targets can score the last virtual position's prediction of the
first token). In generation the virtual tokens fill the first N KV-cache entries.

Cost: N C trainable parameters; every position's work (the linear layers, the N + T by N + T
attention) runs for N + T positions instead of T, the head for the T real ones; N positions of
context and N KV-cache entries. Not mergeable: P is input, not a weight.

:func:`inject_prompt` is the one entry for prompt tuning and prefix tuning
(:mod:`minilora.family.prefix`); :func:`adapter_arrays` / :func:`apply_adapter` give and take
both in PEFT's files: adapter_config.json (peft_type "PROMPT_TUNING" or "PREFIX_TUNING",
task_type "CAUSAL_LM", num_virtual_tokens, token_dim, num_layers, ...) and the one tensor
``prompt_embeddings``: P (N, C), or the prefix's past_key_values (N, 2 L C).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import backend as B
from ..errors import CheckpointError, ConfigError, InvalidArgumentError, check_int
from ..gpt import GPT
from ..nn import Embedding, Module, keep_host_rng
from ..tensor import Tensor, concatenate, no_grad
from ..tensorfile import json_field
from .core import family_config, record
from .prefix import INIT_WEIGHTS, PrefixEncoder, PrefixTuningConfig, prefix_parameter_count

INITS = ("random", "vocab")  # PEFT's prompt_tuning_init RANDOM and SAMPLE_VOCAB
_PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}
WEIGHTS_KEY = "prompt_embeddings"  # the one key PEFT's prompt-learning files hold
PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")


@dataclass
class PromptTuningConfig:
    """Prompt tuning's settings, named as PEFT's ``PromptTuningConfig``.

    - ``num_virtual_tokens``: N, the learned embeddings put before every sequence (positive
      int; N plus the sequence must fit the model's block_size).
    - ``init``: "random" (N(0, 1), as PEFT's RANDOM: torch.nn.Embedding's init) or "vocab"
      (rows of the token table wte at N token ids drawn uniformly, PEFT's SAMPLE_VOCAB, which
      the paper finds trains better than random). PEFT's TEXT init needs a tokenizer: copy
      ``wte[ids of your text]`` into ``model.prompt_encoder.embedding.weight`` instead.
    """

    num_virtual_tokens: int = 20
    init: str = "random"

    def __post_init__(self) -> None:
        self.num_virtual_tokens = check_int(self.num_virtual_tokens,
                                            "PromptTuningConfig: num_virtual_tokens",
                                            error=ConfigError)
        if self.init not in INITS:
            raise ConfigError(f"PromptTuningConfig: init must be one of {INITS}, got "
                              f"{self.init!r}")


class PromptEmbedding(Module):
    """P (N, C), the virtual-token embeddings: ``forward(batch_size)`` -> (batch_size, N, C)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, dtype: Any = None) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = Embedding(num_virtual_tokens, token_dim, dtype=dtype)  # P (N, C)

    def forward(self, batch_size: int) -> Tensor:
        """P for each of ``batch_size`` sequences (looked up by position, as PEFT does, so the
        backward adds the batch's gradients into P's rows)."""
        return self.embedding(np.tile(np.arange(self.num_virtual_tokens), (batch_size, 1)))

    def prepare_inputs(self, x: Tensor, cache: Any) -> tuple[Tensor, np.ndarray, Any]:
        """GPT's hook at a sequence's start: [P; x] (B, N + T, C), positions 0 .. N + T, no
        prefix. A KV cache needs nothing more: the N + T positions fill it from 0."""
        Bsz, T, _ = x.shape
        return concatenate([self(Bsz), x], axis=1), np.arange(self.num_virtual_tokens + T), None


# ------------------------------------------------------------------------------- injection

def _check_fits(model: GPT, N: int, who: str, error: type = ConfigError) -> None:
    block = model.config.block_size
    if N >= block:
        raise error(f"{who}: num_virtual_tokens={N} leaves no room in block_size={block}; it "
                    f"must be less than block_size (N + T <= block_size for a sequence of T)")


def _encoder(model: GPT, config: Any) -> Module:
    c, dtype = model.config, model.wte.weight.data.dtype
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config, c.n_layer, c.n_embd, dtype=dtype)
    encoder = PromptEmbedding(config.num_virtual_tokens, c.n_embd, dtype=dtype)
    if config.init == "vocab":  # rows of the token table, copied (P trains apart from wte)
        ids = B.host_rng().integers(0, c.vocab_size, config.num_virtual_tokens)
        encoder.embedding.weight.data = model.wte.weight.data[B.asarray(ids)]
    return encoder


def inject_prompt(model: GPT, config: PromptTuningConfig | PrefixTuningConfig) -> GPT:
    """Give ``model`` prompt tuning's virtual tokens or prefix tuning's prefix, by the type of
    ``config``; in place, returns ``model``.

    Every parameter of the base is frozen; the new ones live in ``model.prompt_encoder``
    (``embedding.weight`` P (N, C); for a prefix (N, 2 L C), or an embedding and an MLP), which
    the forward consults at every sequence's start. N must be less than block_size.
    """
    who = "inject_prompt"
    if not isinstance(model, GPT):
        raise ConfigError(f"{who}: model must be a minilora GPT, got {type(model).__name__}")
    if not isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        raise ConfigError(f"{who}: config must be a PromptTuningConfig or PrefixTuningConfig, "
                          f"got {type(config).__name__}")
    _check_fits(model, config.num_virtual_tokens, who)
    if model.prompt_encoder is not None:
        raise ConfigError(f"{who}: the model already has a prompt encoder with "
                          f"{model.num_virtual_tokens} virtual tokens")
    encoder = _encoder(model, config)
    record(model, config, who)  # refuses a model that carries another method of the family
    model.requires_grad_(False)
    model.prompt_encoder = encoder  # a submodule: its parameters train, count and save
    return model


def prompt_parameter_count(config: PromptTuningConfig | PrefixTuningConfig, n_layer: int,
                           n_embd: int) -> int:
    """Trainable parameters, by formula: N C for prompt tuning, N 2 L C for a prefix (more with
    its MLP: :func:`minilora.family.prefix.prefix_parameter_count`)."""
    if isinstance(config, PrefixTuningConfig):
        return prefix_parameter_count(config, n_layer, n_embd)
    return config.num_virtual_tokens * n_embd


# ---------------------------------------------------------------------- PEFT's adapter files

def _peft_dict(model: GPT, config: Any) -> dict:
    c = model.config
    d = {"peft_type": None, "task_type": "CAUSAL_LM", "num_virtual_tokens":
         config.num_virtual_tokens, "token_dim": c.n_embd, "num_transformer_submodules": 1,
         "num_attention_heads": c.n_head, "num_layers": c.n_layer, "inference_mode": True,
         "base_model_name_or_path": None, "revision": None, "modules_to_save": None,
         "auto_mapping": None}
    if isinstance(config, PrefixTuningConfig):
        d.update(peft_type="PREFIX_TUNING", prefix_projection=config.prefix_projection,
                 encoder_hidden_size=config.encoder_hidden_size or c.n_embd,
                 init_weights=config.init_weights)
    else:
        d.update(peft_type="PROMPT_TUNING", prompt_tuning_init=_PEFT_INITS[config.init],
                 prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                 tokenizer_kwargs=None)
    return d


def adapter_arrays(model: GPT) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config.json fields, {"prompt_embeddings": host array})`` of a model carrying
    prompt or prefix tuning, as PEFT saves them: P (N, C), or the prefix's keys and values
    (N, 2 L C) (computed by its MLP if it has one). Write them with
    ``minilora.lora.io.write_adapter_files``."""
    config = family_config(model)
    if not isinstance(config, (PromptTuningConfig, PrefixTuningConfig)) or \
            getattr(model, "prompt_encoder", None) is None:
        held = "nothing" if config is None else type(config).__name__
        raise InvalidArgumentError(f"adapter_arrays: the model carries {held}, not prompt or "
                                   f"prefix tuning (inject_prompt)")
    encoder = model.prompt_encoder
    with no_grad():
        table = encoder.past_key_values() if isinstance(encoder, PrefixEncoder) \
            else encoder.embedding.weight
        return _peft_dict(model, config), {WEIGHTS_KEY: B.to_numpy(table.data).copy()}


def config_from_peft_dict(d: dict) -> PromptTuningConfig | PrefixTuningConfig:
    """The config of a PEFT prompt- or prefix-tuning adapter_config.json; ConfigError names a
    field of the wrong type or a setting minilora does not run (an encoder-decoder's two
    submodules, a task other than CAUSAL_LM)."""
    where = "config_from_peft_dict"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected the adapter_config.json object (a dict), got "
                          f"{type(d).__name__}")
    kind = d.get("peft_type")
    if kind not in PEFT_TYPES:
        raise ConfigError(f"{where}: peft_type must be one of {PEFT_TYPES}, got {kind!r}")
    task = json_field(d, "task_type", str, where, "CAUSAL_LM")
    if task != "CAUSAL_LM":
        raise ConfigError(f"{where}: task_type must be 'CAUSAL_LM' (a GPT), got {task!r}")
    if json_field(d, "num_transformer_submodules", int, where, 1) != 1:
        raise ConfigError(f"{where}: num_transformer_submodules="
                          f"{d['num_transformer_submodules']!r}; a GPT has 1 (2 is for "
                          f"encoder-decoder models)")
    N = json_field(d, "num_virtual_tokens", int, where)
    if kind == "PREFIX_TUNING":
        init = d.get("init_weights")
        if init not in INIT_WEIGHTS:
            raise ConfigError(f"{where}: init_weights must be one of {INIT_WEIGHTS}, got "
                              f"{init!r}")
        return PrefixTuningConfig(N, json_field(d, "prefix_projection", bool, where, False),
                                  json_field(d, "encoder_hidden_size", int, where, None), init)
    init = json_field(d, "prompt_tuning_init", str, where, "RANDOM")
    inits = {v: k for k, v in _PEFT_INITS.items()} | {"TEXT": "random"}  # init is spent on load
    if init not in inits:
        raise ConfigError(f"{where}: prompt_tuning_init must be one of {sorted(inits)}, got "
                          f"{init!r}")
    return PromptTuningConfig(N, inits[init])


def _check_sizes(model: GPT, d: dict, config: Any, arrays: dict[str, Any], who: str) -> None:
    """The config's sizes against the model's and the one array's shape, before allocating."""
    c = model.config
    for key, ours in (("token_dim", c.n_embd), ("num_layers", c.n_layer),
                      ("num_attention_heads", c.n_head)):
        theirs = d.get(key)
        if theirs is not None and theirs != ours:
            raise CheckpointError(f"{who}: the adapter's {key}={theirs!r}, the model's is "
                                  f"{ours}; it was made for another base model")
    _check_fits(model, config.num_virtual_tokens, who, CheckpointError)
    if set(arrays) != {WEIGHTS_KEY}:
        raise CheckpointError(f"{who}: a prompt or prefix adapter holds the one tensor "
                              f"{WEIGHTS_KEY!r}, the file holds {sorted(arrays)}")
    width = c.n_embd * (2 * c.n_layer if isinstance(config, PrefixTuningConfig) else 1)
    expected = (config.num_virtual_tokens, width)
    shape = tuple(arrays[WEIGHTS_KEY].shape)
    if shape != expected:
        raise CheckpointError(f"{who}: {WEIGHTS_KEY!r} has shape {shape}, but the config's "
                              f"num_virtual_tokens={config.num_virtual_tokens} on this model "
                              f"(n_embd={c.n_embd}, n_layer={c.n_layer}) needs {expected}")


def apply_adapter(model: GPT, config_dict: dict, arrays: dict[str, Any]) -> GPT:
    """Give ``model`` the prompt or prefix adapter of ``config_dict`` (adapter_config.json's
    fields) and ``arrays`` ({"prompt_embeddings": array}), as :func:`adapter_arrays` gives them
    or PEFT saves them; in place, returns ``model``.

    The config's sizes (token_dim, num_layers, num_attention_heads, num_virtual_tokens against
    block_size) and the array's shape are checked against the model before anything is
    allocated: a mismatch is a CheckpointError naming both. A prefix saved with its MLP loads as
    the keys and values the MLP computed (PEFT loads it so too): the MLP only helps training.
    """
    who = "apply_adapter"
    if not isinstance(model, GPT):
        raise CheckpointError(f"{who}: model must be a minilora GPT, got {type(model).__name__}")
    try:
        config = config_from_peft_dict(config_dict)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{who}: not a usable prompt or prefix adapter config: "
                              f"{exc}") from None
    if isinstance(config, PrefixTuningConfig):
        config = replace(config, prefix_projection=False, encoder_hidden_size=None)
    _check_sizes(model, config_dict, config, arrays, who)
    values = arrays[WEIGHTS_KEY]
    with keep_host_rng():  # the initial values are overwritten: leave the random stream alone
        inject_prompt(model, config)
    weight = model.prompt_encoder.embedding.weight
    weight.data[...] = B.asarray(values, dtype=weight.data.dtype)
    return model


def virtual_token_flops(model: GPT, T: int) -> int:
    """The matrix-product FLOPs per sequence of T tokens that the prompt or prefix adds to the
    forward (formula; ``ml.flops.count`` measures it): prompt tuning runs every layer on N + T
    positions instead of T, a prefix adds q K^T and P V over N keys, 2 * 2 * C * N per token
    per layer."""
    c, N = model.config, model.num_virtual_tokens
    C, L = c.n_embd, c.n_layer
    if isinstance(model.prompt_encoder, PrefixEncoder):
        return L * 2 * 2 * C * N * T
    linears = 2 * (4 * C * C + 2 * 4 * C * C)  # per position: q, k, v, o; the MLP's fc, proj
    attention = 2 * 2 * C * ((N + T) ** 2 - T ** 2)  # q k^T and P v over N + T, not T, rows
    return L * (N * linears + attention)


__all__ = ["PromptTuningConfig", "PrefixTuningConfig", "PromptEmbedding", "PrefixEncoder",
           "inject_prompt", "adapter_arrays", "apply_adapter", "config_from_peft_dict",
           "prompt_parameter_count", "virtual_token_flops", "INITS", "WEIGHTS_KEY", "PEFT_TYPES"]
