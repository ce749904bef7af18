"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv 1902.00751).

A small two-layer network with a residual is inserted into each block and trained; the base
stays frozen. For a sub-layer's output h (..., C) and a bottleneck width m << C:

    adapter(h) = h + up(act(down(h)))      down: W_d (m, C), b_d (m,)    up: W_u (C, m), b_u (C,)

act is GELU (tanh form) or ReLU. Houlsby places one adapter after the attention's output
projection and one after the MLP, before the residual add: here they wrap ``h[i].attn.o_proj``
and ``h[i].mlp.proj`` (``after=("attn", "mlp")``), so the model code does not change (the
sub-layer's dropout comes after the adapter). ``up`` starts at zeros (weight and bias), so the
adapted model starts equal to its base, exactly; ``down`` is drawn from N(0, init_scale^2) with a
zero bias (Houlsby's near-identity init: std 1e-2).

Costs: per adapter 2 C m + m + C parameters (L layers, a adapters per layer: L a (2 C m + m + C);
GPT-2 small with m = 16 and both places: 608,640), and 2 * 2 * C * m FLOPs per token (two
matmuls, C -> m -> C) at inference as in training, counted by the engine (``ml.flops``); no
context. Not mergeable: act sits between down and up, so no weight absorbs the adapter; the
layers stay at inference (``merge_and_unload`` refuses them, saying so). On a 4-bit base the
adapters wrap QuantLinear projections the same way (their own weights are float).

Files: PEFT has no bottleneck adapter, so a directory of it has ``peft_type`` "BOTTLENECK" (a
name of minilora's), the config's fields, and keys in minilora's module names,
``base_model.model.h.{i}.attn.o_proj.down.weight`` (m, C), ``...down.bias`` (m,),
``...up.weight`` (C, m), ``...up.bias`` (C,), and the same under ``h.{i}.mlp.proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import backend as B
from .. import functional as F
from ..errors import CheckpointError, ConfigError, InvalidArgumentError, check_int
from ..lora.layer import is_linear_like
from ..nn import Linear, Module, keep_host_rng
from ..tensor import Tensor
from ..tensorfile import json_field
from . import core
from .bitfit import PREFIX, check_arrays, check_unmarked

# where an adapter goes -> the module under h.{i} whose output it adapts
SITES = {"attn": "attn.o_proj", "mlp": "mlp.proj"}
NON_LINEARITIES = {"gelu": F.gelu, "relu": F.relu}
MAX_BOTTLENECK = 2**16  # a width far above any use, low enough to refuse a forged config early


@dataclass(frozen=True)
class BottleneckConfig:
    """``bottleneck`` m, the hidden width; ``non_linearity`` "gelu" or "relu"; ``init_scale``
    the std of down's initial weight; ``after`` the places, a subset of ("attn", "mlp")."""

    bottleneck: int = 16
    non_linearity: str = "gelu"
    init_scale: float = 1e-2
    after: tuple[str, ...] = ("attn", "mlp")

    peft_type: ClassVar[str] = "BOTTLENECK"

    def __post_init__(self) -> None:
        m = check_int(self.bottleneck, "BottleneckConfig: bottleneck", error=ConfigError)
        if m > MAX_BOTTLENECK:
            raise ConfigError(f"BottleneckConfig: bottleneck={m} is more than MAX_BOTTLENECK = "
                              f"{MAX_BOTTLENECK}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"BottleneckConfig: non_linearity must be one of "
                              f"{sorted(NON_LINEARITIES)}, got {self.non_linearity!r}")
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ConfigError(f"BottleneckConfig: init_scale must be a number >= 0, got "
                              f"{scale!r}")
        after = (self.after,) if isinstance(self.after, str) else self.after
        if not isinstance(after, (tuple, list)) or not after or \
                any(a not in SITES for a in after) or len(set(after)) != len(after):
            raise ConfigError(f"BottleneckConfig: after must be a non-empty subset of "
                              f"{tuple(SITES)}, got {self.after!r}")
        object.__setattr__(self, "bottleneck", int(m))
        object.__setattr__(self, "init_scale", float(scale))
        object.__setattr__(self, "after", tuple(a for a in SITES if a in after))

    def to_dict(self) -> dict:
        """The fields as JSON values, with peft_type (adapter_config.json)."""
        return {"peft_type": self.peft_type, "bottleneck": self.bottleneck,
                "non_linearity": self.non_linearity, "init_scale": self.init_scale,
                "after": list(self.after)}


class BottleneckAdapter(Module):
    """``base_layer`` followed by Houlsby's adapter: x (..., in) -> h + up(act(down(h))) with
    h = base_layer(x) (..., C), down (C -> m) and up (m -> C) trainable ``nn.Linear`` layers."""

    def __init__(self, base_layer: Module, bottleneck: int, non_linearity: str = "gelu",
                 init_scale: float = 1e-2) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise InvalidArgumentError(f"BottleneckAdapter: base_layer must be linear-like, got "
                                       f"{type(base_layer).__name__}")
        C = int(base_layer.out_features)
        dtype = base_layer.weight.data.dtype if isinstance(base_layer, Linear) \
            else B.default_dtype()
        self.base_layer = base_layer
        self.non_linearity = non_linearity
        self.down = Linear(C, bottleneck, dtype=dtype)  # W_d (m, C)
        self.up = Linear(bottleneck, C, dtype=dtype)  # W_u (C, m)
        self.down.weight.data[...] = B.asarray(
            (B.host_rng().standard_normal((bottleneck, C)) * init_scale).astype(dtype))
        for p in (self.down.bias, self.up.weight, self.up.bias):
            p.data[...] = 0  # up = 0: the adapter starts as the identity

    @property
    def keeps_own_inputs(self) -> bool:  # type: ignore[override]
        """As its base: the adapter reads only the base's own output h."""
        return bool(getattr(self.base_layer, "keeps_own_inputs", False))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., C): h + up(act(down(h))), h = base_layer(x)."""
        h = self.base_layer(x)  # (..., C)
        z = NON_LINEARITIES[self.non_linearity](self.down(h))  # (..., m)
        return h + self.up(z)  # (..., C)

    def extra_repr(self) -> str:
        return f"bottleneck={self.down.out_features}, non_linearity={self.non_linearity!r}"


def adapter_sites(model: Module, config: BottleneckConfig) -> list[tuple[str, Module]]:
    """``(path, module)`` of every projection ``config.after`` names: h.{i}.attn.o_proj and
    h.{i}.mlp.proj of a GPT, in the model's order."""
    sites = "|".join(re.escape(SITES[a]) for a in config.after)
    pattern = re.compile(rf"h\.\d+\.(?:{sites})")
    return [(p, m) for p, m in model.named_modules()
            if pattern.fullmatch(p) and is_linear_like(m)]


def inject_bottleneck(model: Module, config: BottleneckConfig | None = None) -> Module:
    """Wrap the projections of ``config.after`` in every block with a BottleneckAdapter, in
    place; freeze everything but the adapters; record ``config``; return ``model``."""
    config = BottleneckConfig() if config is None else config
    if not isinstance(config, BottleneckConfig):
        raise ConfigError(f"inject_bottleneck: config must be a BottleneckConfig, got "
                          f"{type(config).__name__}")
    if not isinstance(model, Module):
        raise InvalidArgumentError(f"inject_bottleneck: model must be a Module, got "
                                   f"{type(model).__name__}")
    core.check_free(model, "inject_bottleneck")  # before its wrapped layers hide the sites
    sites = adapter_sites(model, config)
    if not sites:
        raise ConfigError(f"inject_bottleneck: {type(model).__name__} has no linear "
                          f"h.{{i}}.{{{', '.join(SITES[a] for a in config.after)}}} to adapt "
                          f"(after={config.after}); it needs a GPT's blocks")
    core.record(model, config, "inject_bottleneck")
    model.requires_grad_(False)
    for path, mod in sites:
        model.set_submodule(path, BottleneckAdapter(mod, config.bottleneck, config.non_linearity,
                                                    config.init_scale))
    return model


def bottleneck_param_count(gpt_config: Any, config: BottleneckConfig | None = None) -> int:
    """Trainable parameters :func:`inject_bottleneck` adds to ``GPT(gpt_config)``:
    L a (2 C m + m + C) for a places per block."""
    config = BottleneckConfig() if config is None else config
    C, m = gpt_config.n_embd, config.bottleneck
    return gpt_config.n_layer * len(config.after) * (2 * C * m + m + C)


def bottleneck_flops_per_token(gpt_config: Any, config: BottleneckConfig | None = None) -> int:
    """Forward FLOPs the adapters add per token: L a * 2 * 2 * C * m (down, then up)."""
    config = BottleneckConfig() if config is None else config
    return gpt_config.n_layer * len(config.after) * 2 * 2 * gpt_config.n_embd * config.bottleneck


# ------------------------------------------------------------------------------------ files

def _expected(model: Module, config: BottleneckConfig) -> dict[str, tuple]:
    """{file key: shape} of the adapters ``config`` puts into ``model``, nothing allocated."""
    m, out = config.bottleneck, {}
    for path, mod in adapter_sites(model, config):
        C = int(mod.out_features)
        out.update({f"{PREFIX}{path}.down.weight": (m, C), f"{PREFIX}{path}.down.bias": (m,),
                    f"{PREFIX}{path}.up.weight": (C, m), f"{PREFIX}{path}.up.bias": (C,)})
    return out


def adapter_arrays(model: Module) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {file key: host array})`` of a model with bottleneck adapters (module
    docstring)."""
    config = core.family_config(model)
    if not isinstance(config, BottleneckConfig):
        raise ConfigError(f"bottleneck.adapter_arrays: the model carries "
                          f"{type(config).__name__}, not BottleneckConfig")
    arrays = {}
    for path, mod in model.named_modules():
        if isinstance(mod, BottleneckAdapter):
            for name, p in (("down.weight", mod.down.weight), ("down.bias", mod.down.bias),
                            ("up.weight", mod.up.weight), ("up.bias", mod.up.bias)):
                arrays[f"{PREFIX}{path}.{name}"] = B.to_numpy(p.data)
    return config.to_dict(), arrays


def _config(raw: dict, who: str) -> BottleneckConfig:
    try:
        after = json_field(raw, "after", list, who)
        return BottleneckConfig(bottleneck=json_field(raw, "bottleneck", int, who),
                                non_linearity=json_field(raw, "non_linearity", str, who),
                                init_scale=json_field(raw, "init_scale", float, who, 1e-2),
                                after=tuple(after))
    except ConfigError as exc:
        raise CheckpointError(f"{who}: the config is not a usable bottleneck config: "
                              f"{exc}") from None


def apply_adapter(model: Module, config: dict, arrays: dict[str, np.ndarray]) -> Module:
    """Inject the file's bottleneck adapters into the plain base ``model`` and load their
    weights; keys and shapes are checked against the config and the model first
    (CheckpointError, the model unchanged). Returns ``model``."""
    who = "load_adapter (BOTTLENECK)"
    if config.get("peft_type") != BottleneckConfig.peft_type:
        raise CheckpointError(f"{who}: peft_type {config.get('peft_type')!r} is not "
                              f"'BOTTLENECK'")
    check_unmarked(model, who)
    parsed = _config(config, who)
    expected = _expected(model, parsed)
    if not expected:
        raise CheckpointError(f"{who}: the model has no h.{{i}} projections to adapt "
                              f"(after={parsed.after})")
    check_arrays(expected, arrays, who)
    with keep_host_rng():  # the init is overwritten below
        inject_bottleneck(model, parsed)
    params = dict(model.named_parameters())
    for key in expected:
        p = params[key[len(PREFIX):]]
        p.data[...] = B.asarray(arrays[key], dtype=p.data.dtype)
    return model


__all__ = ["BottleneckConfig", "BottleneckAdapter", "inject_bottleneck", "adapter_sites",
           "bottleneck_param_count", "bottleneck_flops_per_token", "adapter_arrays",
           "apply_adapter", "SITES", "MAX_BOTTLENECK"]
