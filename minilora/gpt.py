"""A GPT-2-style language model: nanoGPT's layout, GPT-2's math, minilora's autograd.

With idx (B, T) token ids, C = n_embd, V = vocab_size:

    x = dropout(wte[idx] + wpe[0 .. T))                               (B, T, C)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))      pre-LN residual blocks
    logits = ln_f(x) wte^T                                            (B, T, V), head tied to wte

attn is causal multi-head self-attention with separate q_proj, k_proj, v_proj and o_proj, and
mlp is fc (C -> 4C), GELU (tanh form), proj (4C -> C). Every LayerNorm uses eps 1e-5, so GPT-2's
released weights run on it unchanged (HF stores its c_attn/c_fc/c_proj weights transposed and
q, k, v fused; the interop module converts them).

Every projection is an ``nn.Linear`` attribute called as ``self.q_proj(x)``: LoRA swaps those
modules for adapted ones and the model code does not change. Prompt and prefix tuning
(:mod:`minilora.family`) enter through one hook instead, ``GPT.prompt_encoder``: N virtual
tokens prepended to the embeddings, or N learned keys and values per layer, in the first N
positions of the context.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backend as B
from . import functional as F
from .attention import KVCache, causal_self_attention, prefix_self_attention
from .errors import ConfigError, DTypeError, InvalidArgumentError, ShapeError, check_int, is_int
from .fast import checks, cpu
from .nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter
from .tensor import Tensor, no_grad, release

# The largest sizes a GPTConfig accepts: far above GPT-2 XL (vocab 50257, block 1024, 48 layers,
# 25 heads, 1600 channels) and GPT-3 (96 layers, 96 heads, 12288 channels), yet low enough that a
# forged config (a vocab of 10^12) is refused by name before any weight is allocated.
MAX_VOCAB_SIZE = 2**20
MAX_BLOCK_SIZE = 2**16
MAX_N_LAYER = 2**10
MAX_N_HEAD = 2**10
MAX_N_EMBD = 2**15
MAX_NEW_TOKENS = 10**6  # per generate call: as the CLI's --max-new-tokens
_LIMITS = {"vocab_size": ("MAX_VOCAB_SIZE", MAX_VOCAB_SIZE),
           "block_size": ("MAX_BLOCK_SIZE", MAX_BLOCK_SIZE),
           "n_layer": ("MAX_N_LAYER", MAX_N_LAYER), "n_head": ("MAX_N_HEAD", MAX_N_HEAD),
           "n_embd": ("MAX_N_EMBD", MAX_N_EMBD)}


@dataclass
class GPTConfig:
    """Model size: ``vocab_size`` V, context ``block_size``, ``n_layer`` blocks of ``n_head`` heads
    over ``n_embd`` channels; ``dropout`` on embeddings, attention and residuals; ``bias`` in the
    Linear and LayerNorm layers (GPT-2 has them)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name, (limit_name, limit) in _LIMITS.items():
            value = check_int(getattr(self, name), f"GPTConfig: {name}", error=ConfigError)
            if value > limit:
                raise ConfigError(f"GPTConfig: {name}={value} is more than {limit_name} = "
                                  f"{limit}")
            setattr(self, name, value)
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig: n_embd={self.n_embd} must be divisible by "
                              f"n_head={self.n_head}")
        if not isinstance(self.dropout, (int, float, np.floating)) or \
                isinstance(self.dropout, bool):
            raise ConfigError(f"GPTConfig: dropout must be a number in [0, 1), got "
                              f"{self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig: dropout must lie in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.bias, (bool, np.bool_)):
            raise ConfigError(f"GPTConfig: bias must be True or False, got {self.bias!r}")
        self.bias = bool(self.bias)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what checkpoints store as JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Rebuild a config from :meth:`to_dict`'s output (say, a checkpoint's JSON): unknown
        and missing keys are errors, and every value is checked as the constructor checks it
        (ints that are ints, not bools or floats, within the MAX_* limits)."""
        if not isinstance(d, dict):
            raise ConfigError(f"GPTConfig.from_dict: expected a dict of fields, got "
                              f"{type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"GPTConfig.from_dict: unknown keys {unknown}; known: "
                              f"{sorted(known)}")
        missing = sorted(f.name for f in fields
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"GPTConfig.from_dict: missing {missing}; a config needs "
                              f"{sorted(_LIMITS)}")
        return cls(**d)

    @classmethod
    def gpt2(cls, **overrides: Any) -> GPTConfig:
        """GPT-2 small (124M): V 50257, block 1024, 12 layers, 12 heads, 768 channels."""
        d = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
        d.update(overrides)
        return cls(**d)


def parameter_count(config: GPTConfig) -> int:
    """The parameters of ``GPT(config)``, from its sizes alone: the tied token table V C, the
    positions T C, per layer 12 C^2 (q, k, v, o: 4 C^2; the MLP 8 C^2) and 13 C of biases and
    LayerNorm gains and shifts (2 C, the gains alone, with ``bias=False``), and the final
    LayerNorm's 2 C (C). GPT-2 small: 124,439,808."""
    V, T, L, C = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    per_layer = 12 * C * C + (13 * C if config.bias else 2 * C)
    return V * C + T * C + L * per_layer + (2 * C if config.bias else C)


def check_fits_in_memory(config: GPTConfig, available: int | None) -> None:
    """Refuse (ConfigError) a config whose weights alone (in the default float dtype) need more
    than ``available`` bytes, before any is allocated: each size may lie within its limit
    (``MAX_N_LAYER``...) while together they ask for terabytes. None (the machine's memory
    unknown) checks nothing."""
    if available is None:
        return
    dtype = np.dtype(B.default_dtype())
    n = parameter_count(config)
    need = n * dtype.itemsize
    if need > available:
        raise ConfigError(f"GPT: n_layer={config.n_layer}, n_embd={config.n_embd}, "
                          f"vocab_size={config.vocab_size:,}, block_size={config.block_size:,} "
                          f"make {n:,} parameters, {need / 2**30:,.1f} GiB in {dtype} "
                          f"before any training state, more than the "
                          f"{available / 2**30:,.1f} GiB of memory available; choose smaller "
                          f"sizes (--n-layer, --n-embd)")


class CausalSelfAttention(Module):
    """Multi-head causal self-attention: (B, T, C) -> (B, T, C).

    q, k, v = q_proj(x), k_proj(x), v_proj(x); y = o_proj(attention(q, k, v)) with the fused
    attention node of :mod:`minilora.attention`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = Linear(C, C, bias=config.bias)
        self.k_proj = Linear(C, C, bias=config.bias)
        self.v_proj = Linear(C, C, bias=config.bias)
        self.o_proj = Linear(C, C, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); with ``cache`` (no graph) also attend to cached positions.

        ``prefix`` (prefix tuning, :mod:`minilora.family.prefix`): keys and values (B, N, C) of N
        learned positions before the sequence, which every query attends to as well.
        """
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, C) each
        release_input(x, self.q_proj, self.k_proj, self.v_proj)  # ln_1's output: kept by them
        if cache is None:
            p = self.dropout if self.training else 0.0
            if prefix is None:
                y = causal_self_attention(q, k, v, self.n_head, p)
                release(q)  # the attention keeps its own scaled copy of q (k and v as views)
            else:  # [prefix; k], [prefix; v], in the reference ops (the fused form has no prefix)
                y = prefix_self_attention(q, k, v, prefix[0], prefix[1], self.n_head, p)
        else:
            y = Tensor(cache.attend(layer, q.data, k.data, v.data, self.n_head))
        out = self.o_proj(y)
        release_input(y, self.o_proj)  # the attention keeps what it needs of y itself
        return self.resid_dropout(out)


class MLP(Module):
    """Position-wise feed-forward: proj(gelu(fc(x))), C -> 4C -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        if type(self.fc) is Linear and type(self.proj) is Linear:  # the plain layers: one op
            out = F.mlp(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias)
            release(x)  # ln_2's output: the op keeps it itself where fc's weight trains
            return self.dropout(out)
        # adapted layers (LoRA, IA3, adapters, 4-bit): module by module
        h = self.fc(x)
        release_input(x, self.fc)  # ln_2's output: a trainable fc keeps it, a frozen one needn't
        a = F.gelu(h)
        release(h)  # GELU's backward keeps its derivative, not its input
        out = self.proj(a)
        release_input(a, self.proj)  # only a trainable proj's weight gradient reads a
        return self.dropout(out)


class Block(Module):
    """A pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C); ``prefix``: this layer's learned keys and values, if any."""
        a = self.attn(self.ln_1(x), cache, layer, prefix)
        x = x + a
        m = self.mlp(self.ln_2(x))
        out = x + m
        # a residual add's backward reads no values, and LayerNorm keeps its own: the graph
        # would hold these (B, T, C) arrays to the end of the forward pass for nothing
        release(a, m, x)
        return out


def release_input(x: Tensor, *consumers: Module) -> None:
    """``release(x)`` once ``consumers`` have run, if every one of them keeps its own arrays
    (``Module.keeps_own_inputs``): a module swapped in whose backward reads x (an adapter of
    another kind) keeps x's values alive."""
    if all(m.keeps_own_inputs for m in consumers):
        release(x)


def _normal_(p: Parameter, std: float) -> None:
    """Refill ``p`` with N(0, std^2) from the host generator (float64 draws, then cast, so a
    float32 and a float64 model built from one seed hold the same weights up to rounding)."""
    p.data = B.asarray((B.host_rng().standard_normal(p.shape) * std).astype(p.data.dtype))


class GPT(Module):
    """The language model; ``GPT(config)(idx, targets=None)`` -> logits (B, T, V) or (logits, loss).

    Initialised as GPT-2: every Linear and embedding weight N(0, 0.02^2), the residual
    projections (o_proj, mlp.proj) N(0, (0.02 / sqrt(2 n_layer))^2) so the residual stream's
    variance does not grow with depth, biases 0, LayerNorm weights 1.
    """

    # Prompt or prefix tuning (minilora.family.prompt) sets this to its prompt encoder, whose N
    # virtual tokens take the first N positions of the context: the forward asks it for them
    # (``prepare_inputs``) at the start of a sequence. None, the base model, skips that.
    prompt_encoder: Module | None = None

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        check_fits_in_memory(config, cpu.available_memory())
        self.config = config
        C = config.n_embd
        self.wte = Embedding(config.vocab_size, C)
        self.wpe = Embedding(config.block_size, C)
        self.drop = Dropout(config.dropout)
        self.h = ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(C, eps=1e-5, bias=config.bias)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "mlp.proj.weight")):
                _normal_(p, residual_std)
            elif p.ndim == 2:
                _normal_(p, 0.02)
            elif name.endswith("bias"):
                p.data[...] = 0

    def num_parameters(self, trainable_only: bool = False, non_embedding: bool = False) -> int:
        """Number of scalar parameters (the tied wte/head once); ``non_embedding`` leaves out
        the position table wpe, as GPT-2's parameter counts do."""
        n = super().num_parameters(trainable_only)
        if non_embedding and (self.wpe.weight.requires_grad or not trainable_only):
            n -= self.wpe.weight.size
        return n

    @property
    def num_virtual_tokens(self) -> int:
        """N, the context positions prompt or prefix tuning's virtual tokens take (0: none)."""
        return 0 if self.prompt_encoder is None else self.prompt_encoder.num_virtual_tokens

    # -------------------------------------------------------------------------------- forward

    def _check_idx(self, idx: Any, start: int = 0) -> Any:
        """idx as an integer array (B, T) that fits the context window and the vocabulary, left
        where it is: host ids (a batch, a prompt) are checked on the host and uploaded by the
        embedding, device ids are checked without a sync (:mod:`minilora.fast.checks`)."""
        arr = idx.data if isinstance(idx, Tensor) else idx
        if not B.is_array(arr):
            arr = np.asarray(arr)
        if arr.dtype.kind not in "iu":
            raise DTypeError(f"GPT: idx must hold integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ShapeError(f"GPT: idx must have shape (B, T) with T >= 1, got {arr.shape}")
        T = arr.shape[1]
        N = 0 if start else self.num_virtual_tokens  # a sequence's start runs them first
        if N and N + T > self.config.block_size:
            raise ShapeError(f"GPT: num_virtual_tokens N={N} and a sequence of length T={T} "
                             f"exceed block_size={self.config.block_size} (N + T = {N + T}); "
                             f"crop idx to the last {self.config.block_size - N} tokens")
        if start + T > self.config.block_size:
            where = f" after {start} cached positions" if start else ""
            raise ShapeError(f"GPT: sequence of length {T}{where} exceeds block_size="
                             f"{self.config.block_size}; crop idx to the last "
                             f"{self.config.block_size - start} tokens")
        V = self.config.vocab_size

        def out_of_range(host: np.ndarray) -> InvalidArgumentError:
            return InvalidArgumentError(f"GPT: token ids must lie in [0, {V}) (vocab_size), got "
                                        f"values from {int(host.min())} to {int(host.max())}")
        return checks.check_range(arr, 0, V, out_of_range)  # host ids: checked there, no sync

    def _logits(self, idx: Any, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        start = cache.length if cache is not None else 0
        T = idx.shape[1]
        pos = np.arange(start, start + T)  # (T,), on the host: checked there, not on the device
        x, prefix = self.wte(idx), None  # (B, T, C)
        if start == 0 and self.prompt_encoder is not None:  # virtual tokens take 0 .. N first
            x, pos, prefix = self.prompt_encoder.prepare_inputs(x, cache)
        x = self.drop(x + self.wpe(pos))  # (B, T, C) + (T, C); N + T rows after prompt tuning
        n = x.shape[1]  # the positions the blocks run: T, or N + T with virtual tokens in front
        for i, block in enumerate(self.h):
            x, previous = block(x, cache, i, None if prefix is None else prefix[i]), x
            release(previous)  # the block's input: its ops kept what they need of it
        if cache is not None:
            cache.length += n
        if last_only:
            x = x[:, -1:]  # (B, 1, C): generation only needs the newest position
        elif n != T:
            x = x[:, -T:]  # (B, T, C): the real tokens' positions, the virtual ones left out
        # the head is tied to the token table: logits = ln_f(x) wte^T, both uses share one grad
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V)

    def forward(self, idx: Any, targets: Any = None) -> Any:
        """idx (B, T) ints -> logits (B, T, V); with targets (B, T) -> (logits, mean CE loss).

        Targets equal to -100 are left out of the loss (``F.cross_entropy``'s ignore_index).
        """
        logits = self._logits(self._check_idx(idx))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)

    def forward_with_cache(self, idx: Any, cache: KVCache, last_only: bool = False) -> Tensor:
        """Logits for idx (B, T), the tokens that follow the ``cache.length`` already cached.

        Equals ``forward(all tokens so far)[:, -T:]`` (to rounding); runs under no_grad and
        advances the cache. ``last_only`` returns only the newest position's logits (B, 1, V).
        """
        with no_grad():
            return self._logits(self._check_idx(idx, cache.length), cache, last_only)

    def make_cache(self, batch_size: int, size: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``size`` positions
        (block_size by default)."""
        c = self.config
        size = c.block_size if size is None else size
        if not is_int(size) or not 1 <= size <= c.block_size:
            raise InvalidArgumentError(f"GPT.make_cache: size must be an int in [1, "
                                       f"{c.block_size}] (block_size), got {size!r}")
        return KVCache(c.n_layer, batch_size, c.n_head, int(size), c.n_embd // c.n_head,
                       self.wte.weight.data.dtype)

    # ------------------------------------------------------------------------------ generate

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, use_cache: bool = True,
                 return_logits: bool = False) -> Any:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns a (B, T + n) int array.

        Each step samples from softmax(logits / temperature) of the last position, keeping only
        the ``top_k`` largest logits when given; ``temperature=0`` takes the argmax (greedy).
        ``seed`` fixes the sampling (else the generator of ``manual_seed`` is used). The model runs
        in eval mode (no dropout) and records no graph; its mode is restored afterwards.

        The context is cropped to the last block_size tokens (block_size - N beside the N
        virtual tokens of prompt or prefix tuning, which fill the first N cache entries). With
        ``use_cache`` the keys and values of earlier positions are kept, so each step runs only
        the newest token; once the window is full the positions shift, so each further step
        recomputes the cropped window (as the uncached path always does). With
        ``return_logits`` the logits each token was sampled from come back too, as (B, n, V):
        the cache is checked against them.

        Sampling runs on the host, so on a device each token costs one device-to-host transfer
        (its last logits) and nothing else waits for the device: the tokens are checked on the
        host and uploaded, not checked on the device. A prompt already on the device comes to
        the host once, first.
        """
        self._check_generate_args(max_new_tokens, temperature, top_k, seed)
        tokens = self._check_idx_any_length(idx).astype(np.int64)  # (B, T) host
        rng = np.random.default_rng(seed) if seed is not None else B.host_rng()
        N = self.num_virtual_tokens  # the first N positions (and cache entries) are virtual
        block = self.config.block_size - N  # the window of real tokens
        steps = []
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                # sized to what this call can fill, so a large batch of short answers is cheap
                size = N + min(block, tokens.shape[1] + max_new_tokens)
                cache = self.make_cache(tokens.shape[0], size) if use_cache else None
                for step in range(max_new_tokens):
                    # host tokens: the embedding checks them there and uploads them
                    if cache is None:
                        logits = self._logits(tokens[:, -block:], None, True)
                    elif step == 0 or cache.length == cache.size:  # (re)fill, cropped window
                        cache.reset()
                        logits = self._logits(tokens[:, -block:], cache, True)
                    else:
                        logits = self._logits(tokens[:, -1:], cache, True)
                    last = B.to_numpy(logits.data[:, -1])  # (B, V): the token's one sync
                    nxt = _sample(last, temperature, top_k, rng)  # (B,)
                    tokens = np.concatenate([tokens, nxt[:, None]], axis=1)  # (B, T + 1)
                    if return_logits:
                        steps.append(last)
        finally:
            self.train(was_training)
        out = B.asarray(tokens)
        if not return_logits:
            return out
        V = self.config.vocab_size
        dtype = self.wte.weight.data.dtype
        logits_all = np.stack(steps, axis=1) if steps else np.zeros((len(tokens), 0, V), dtype)
        return out, B.asarray(logits_all)  # (B, n, V)

    def _check_idx_any_length(self, idx: Any) -> np.ndarray:
        """The prompt idx (B, T), any T, on the host (sampling happens there), checked there."""
        arr = B.to_numpy(idx.data if isinstance(idx, Tensor) else idx)
        if arr.ndim != 2:
            raise ShapeError(f"GPT.generate: idx must have shape (B, T), got {arr.shape}")
        self._check_idx(arr[:, -(self.config.block_size - self.num_virtual_tokens):])
        return arr

    def _check_generate_args(self, max_new_tokens: Any, temperature: Any, top_k: Any,
                             seed: Any) -> None:
        check_int(max_new_tokens, "GPT.generate: max_new_tokens", minimum=0)
        if max_new_tokens > MAX_NEW_TOKENS:  # 10^12 tokens would run until killed
            raise InvalidArgumentError(f"GPT.generate: max_new_tokens={max_new_tokens} is more "
                                       f"than MAX_NEW_TOKENS = {MAX_NEW_TOKENS:,}")
        if not isinstance(temperature, (int, float, np.number)) or not temperature >= 0:
            raise InvalidArgumentError(f"GPT.generate: temperature must be >= 0 (0 is greedy), "
                                       f"got {temperature!r}")
        if top_k is not None:
            check_int(top_k, "GPT.generate: top_k, if given,")
        if seed is not None:
            check_int(seed, "GPT.generate: seed, if given,", minimum=0)


def _sample(logits: np.ndarray, temperature: float, top_k: int | None,
            rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits (B, V) on the host: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest (ties at the k-th all kept)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        k = z.shape[-1] - top_k
        kth = np.partition(z, k, axis=-1)[:, k:k + 1]  # (B, 1), the k-th largest
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)  # (B, V), unnormalised
    u = (1.0 - rng.random((len(z), 1))) * cdf[:, -1:]  # in (0, total]: never picks a zero-p token
    return np.minimum((cdf < u).sum(axis=-1), z.shape[-1] - 1)
