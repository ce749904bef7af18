"""IA3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv 2205.05638).

(IA)^3, "infused adapter by inhibiting and amplifying inner activations", learns three vectors
per block and freezes everything else: l_k, l_v (C,) rescale the attention's keys and values and
l_ff (4C,) the MLP's hidden activations,

    k = l_k * (x W_k^T + b_k)        v = l_v * (x W_v^T + b_v)                   (B, T, C)
    mlp(x) = (l_ff * gelu(x W_fc^T + b_fc)) W_proj^T + b_proj                  (B, T, 4C) -> C

PEFT states this per linear layer, which is how this file does it: for a target that is not a
feedforward module the vector scales the layer's output, ``y = (x W^T + b) * l`` with l (out,);
for a feedforward module it scales the layer's input, ``y = (x * l) W^T + b`` with l (in,). So
l_ff belongs to the MLP's output projection ``mlp.proj`` (HF GPT-2's mlp.c_proj), whose input is
the hidden activation: the default ``IA3Config(target_modules=("k_proj", "v_proj", "mlp.proj"),
feedforward_modules=("mlp.proj",))`` is the paper's, and PEFT's GPT-2 default (c_attn and
mlp.c_proj, mlp.c_proj feedforward) but for q: PEFT's vector on the fused c_attn (3C,) scales
q as well. minilora adapts k and v by default, as the paper does, and writes ones for q's third
of c_attn's vector, which gives PEFT the same function; add "q_proj" to the targets to adapt q
too, which is PEFT's default exactly. The vectors start at ones, so the adapted model starts
equal to its base, exactly.

Costs: L (C + C + 4C) = 6 L C trainable parameters by default (GPT-2 small: 55,296, 0.04%); no
matrix products of its own (an elementwise product per adapted layer, no counted FLOPs) and no
context. Mergeable: scaling a layer's output is W <- diag(l) W, b <- l * b; scaling its input is
W <- W diag(l), b unchanged; after :func:`merge_ia3` the model has the base's modules and FLOPs.

A 4-bit base (``QuantLinear``) trains IA3 as a float one does (the vectors are float
Parameters, gradients reach them through the dequantized weight). Merging into it is refused:
diag(l) W would have to be re-quantized, a lossy step that buys nothing (the vector costs one
elementwise product per token); keep the layer unmerged, or ``to_linear()`` the base first.

Files, in PEFT's format for Hugging Face GPT-2 (``PeftModel.from_pretrained`` loads them on the
base ``minilora.interop.gpt_to_hf`` writes): adapter_config.json with peft_type "IA3",
target_modules and feedforward_modules in HF's names, fan_in_fan_out true; keys

    base_model.model.transformer.h.{i}.attn.c_attn.ia3_l    (3C, 1)   [l_q; l_k; l_v], not ff
    base_model.model.transformer.h.{i}.mlp.c_proj.ia3_l     (1, 4C)   feedforward: (1, in)

as PEFT shapes them (out, 1) or (1, in). A q, k or v that is not adapted gets ones in c_attn's
vector; loading gives back k and v from c_attn always, and q when its third is not all ones (an
adapter trained in PEFT), so the logits are PEFT's exactly. Refused with the reason: q, k or v
as feedforward modules (c_attn's input is shared by all three), and modules without a GPT-2
counterpart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import backend as B
from ..errors import CheckpointError, ConfigError, InvalidArgumentError
from ..gpt import GPT
from ..interop.hf import MODULES
from ..lora.config import matches_target
from ..lora.count import GPT_LINEARS
from ..lora.layer import is_linear_like
from ..nn import Linear, Module, Parameter, keep_host_rng
from ..tensor import Tensor
from ..tensorfile import json_field
from . import core
from .bitfit import check_arrays, check_unmarked

KEY_PREFIX = "base_model.model.transformer."
_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\."
                  r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.ia3_l")
# minilora's module under h.{i} -> the name a config uses for it in every layer
SHORT = {"attn.q_proj": "q_proj", "attn.k_proj": "k_proj", "attn.v_proj": "v_proj",
         "attn.o_proj": "o_proj", "mlp.fc": "mlp.fc", "mlp.proj": "mlp.proj"}
_HF_OF = {m: hf for hf, ms in MODULES.items() for m in ms}  # "attn.k_proj" -> "attn.c_attn"


def _names(value: Any, field: str, empty: bool = True) -> str | tuple[str, ...]:
    """A regex (str) or a tuple of non-empty module names, as LoraConfig takes them; with
    ``empty=False`` at least one name."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"IA3Config: {field}={value!r} is not a valid regex: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and \
            all(isinstance(n, str) and n for n in value):
        if not value and not empty:  # no layer would be adapted: nothing would train
            raise ConfigError(f"IA3Config: {field} must name at least one module, got "
                              f"{value!r}")
        return tuple(value) if isinstance(value, (list, tuple)) else tuple(sorted(value))
    raise ConfigError(f"IA3Config: {field} must be a regex or a sequence of module names, got "
                      f"{value!r}")


@dataclass(frozen=True)
class IA3Config:
    """Which linear layers get a vector, and which of them are feedforward (input-scaled).

    Names match as PEFT's do: a tuple entry matches a module path equal to it or ending in
    "." + it; a str is a regex over the whole path. ``feedforward_modules`` must be a subset of
    ``target_modules`` when both are tuples (PEFT's rule). ``init_ia3_weights`` starts the
    vectors at ones (identity); False draws them from N(0, 1), as PEFT does.
    """

    target_modules: str | tuple[str, ...] = ("k_proj", "v_proj", "mlp.proj")
    feedforward_modules: str | tuple[str, ...] = ("mlp.proj",)
    init_ia3_weights: bool = True

    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        targets = _names(self.target_modules, "target_modules", empty=False)
        ff = _names(self.feedforward_modules, "feedforward_modules")
        if isinstance(targets, tuple) and isinstance(ff, tuple) and not set(ff) <= set(targets):
            raise ConfigError(f"IA3Config: feedforward_modules {ff} must be a subset of "
                              f"target_modules {targets}; extra: {sorted(set(ff) - set(targets))}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"IA3Config: init_ia3_weights must be True or False, got "
                              f"{self.init_ia3_weights!r}")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "feedforward_modules", ff)

    def is_target(self, path: str) -> bool:
        """True when the module at ``path`` gets a vector."""
        return matches_target(path, self.target_modules)

    def is_feedforward(self, path: str) -> bool:
        """True when the vector at ``path`` scales the layer's input (l (in,)), not its output."""
        return matches_target(path, self.feedforward_modules)


class IA3Linear(Module):
    """A frozen linear-like ``base_layer`` with a learned vector ``ia3_l``.

    ``forward(x)``: x (..., in) -> (..., out) = base(x) * l with l (out,), or base(x * l) with
    l (in,) when ``is_feedforward``. The base is an ``nn.Linear`` or a 4-bit ``QuantLinear``.
    """

    def __init__(self, base_layer: Module, is_feedforward: bool = False,
                 init_ia3_weights: bool = True) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise InvalidArgumentError(f"IA3Linear: base_layer must be an nn.Linear or have "
                                       f"dequantized_weight(), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.is_feedforward = bool(is_feedforward)
        n = self.in_features if self.is_feedforward else self.out_features
        dtype = base_layer.weight.data.dtype if isinstance(base_layer, Linear) \
            else B.default_dtype()
        if init_ia3_weights:
            data = B.xp.ones(n, dtype=dtype)
        else:
            data = B.asarray(B.host_rng().standard_normal(n).astype(dtype))
        self.ia3_l = Parameter(data)

    @property
    def keeps_own_inputs(self) -> bool:  # type: ignore[override]
        """Scaling the output reads only the base's own output, so this layer keeps its inputs
        as its base does; scaling the input keeps x itself (its product reads x for l's
        gradient), so x must stay."""
        return not self.is_feedforward and bool(getattr(self.base_layer, "keeps_own_inputs",
                                                        False))

    @property
    def is_quantized(self) -> bool:
        """True for a base that is not a float ``nn.Linear`` (merging into it is refused)."""
        return not isinstance(self.base_layer, Linear)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): base(x) * l, or base(x * l) for a feedforward layer."""
        if self.is_feedforward:
            return self.base_layer(x * self.ia3_l)  # (..., in) * (in,)
        return self.base_layer(x) * self.ia3_l  # (..., out) * (out,)

    def merge(self) -> Module:
        """Fold l into the base, in place, and return the base layer: W <- diag(l) W and
        b <- l * b (output scaling), or W <- W diag(l) (input scaling). Refused for a 4-bit
        base (module docstring)."""
        if self.is_quantized:
            raise InvalidArgumentError(
                f"IA3Linear.merge: the base is a {type(self.base_layer).__name__}; merging would "
                f"re-quantize diag(l) W (lossy) and save nothing, an IA3 vector costs one "
                f"elementwise product per token. Keep the layer unmerged, or merge into a float "
                f"base (QuantLinear.to_linear())")
        base, vec = self.base_layer, self.ia3_l.data
        if self.is_feedforward:
            base.weight.data *= vec[None, :]  # (out, in) * (1, in): column j scaled by l_j
        else:
            base.weight.data *= vec[:, None]  # (out, in) * (out, 1): row i scaled by l_i
            if base.bias is not None:
                base.bias.data *= vec
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"is_feedforward={self.is_feedforward}"


def ia3_layers(model: Module) -> list[tuple[str, IA3Linear]]:
    """``(path, layer)`` of every IA3Linear of ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, IA3Linear)]


def inject_ia3(model: Module, config: IA3Config | None = None) -> Module:
    """Swap every linear-like module that ``config`` targets for an IA3Linear, in place; freeze
    everything but the vectors; record ``config`` on the model; return ``model``."""
    config = IA3Config() if config is None else config
    if not isinstance(config, IA3Config):
        raise ConfigError(f"inject_ia3: config must be an IA3Config, got {type(config).__name__}")
    if not isinstance(model, Module) or is_linear_like(model):
        raise InvalidArgumentError(f"inject_ia3: model must be a Module holding linear layers, "
                                   f"got {type(model).__name__}")
    core.check_free(model, "inject_ia3")  # before its wrapped layers hide the targets
    candidates = [(p, m) for p, m in model.named_modules() if p and is_linear_like(m)]
    targets = [(p, m) for p, m in candidates if config.is_target(p)]
    if not targets:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates})
        raise ConfigError(f"inject_ia3: target_modules {config.target_modules!r} matched no "
                          f"linear-like module; their names are {names}")
    core.record(model, config, "inject_ia3")
    model.requires_grad_(False)
    for path, mod in targets:
        model.set_submodule(path, IA3Linear(mod, config.is_feedforward(path),
                                            config.init_ia3_weights))
    return model


def merge_ia3(model: Module) -> Module:
    """Fold every vector into its base layer and put the plain layers back (the model then has
    exactly the base's modules and FLOPs); unmarks the model; returns it. Refused, with
    nothing changed, when any base is 4-bit."""
    layers = ia3_layers(model)
    for _, layer in layers:
        if layer.is_quantized:
            layer.merge()  # refuses, saying why, before any layer has changed
    for path, layer in layers:
        model.set_submodule(path, layer.merge())
    core.forget(model)
    return model


def ia3_param_count(gpt_config: Any, config: IA3Config | None = None) -> int:
    """Trainable parameters :func:`inject_ia3` adds to ``GPT(gpt_config)``: per targeted layer
    its in features (feedforward) or out features; 6 L C for the default config."""
    config = IA3Config() if config is None else config
    C = gpt_config.n_embd
    total = 0
    for i in range(gpt_config.n_layer):
        for suffix, (n_mult, k_mult) in GPT_LINEARS.items():
            path = f"h.{i}.{suffix}"
            if config.is_target(path):
                total += (k_mult if config.is_feedforward(path) else n_mult) * C
    return total


# ------------------------------------------------------------------- files, PEFT's GPT-2 layout

def _module_names(paths: dict[str, bool], n_layer: int, rename: dict[str, str]) -> tuple:
    """(target names, feedforward names) for ``paths`` {"h.{i}.module": feedforward?}: the
    module's name when every layer has it with the same feedforward flag, else one
    "h.{i}.module" per layer."""
    by_module: dict[str, list[str]] = {}
    for path in paths:
        by_module.setdefault(path.split(".", 2)[2], []).append(path)
    targets, ff = [], []
    for module, ps in by_module.items():
        flags = {paths[p] for p in ps}
        if len(ps) == n_layer and len(flags) == 1:
            targets.append(rename.get(module, module))
            ff += [rename.get(module, module)] if flags == {True} else []
        else:
            targets += ps
            ff += [p for p in ps if paths[p]]
    return targets, ff


def adapter_arrays(model: Module) -> tuple[dict, dict[str, np.ndarray]]:
    """``(PEFT config fields, {file key: host array})`` of an IA3 GPT, in PEFT's GPT-2 layout
    (module docstring)."""
    config = core.family_config(model)
    if not isinstance(config, IA3Config) or not isinstance(model, GPT):
        raise ConfigError(f"ia3.adapter_arrays: expected a GPT carrying IA3Config, got a "
                          f"{type(model).__name__} carrying {type(config).__name__}")
    mine = {}
    for path, layer in ia3_layers(model):
        m = re.fullmatch(r"h\.(\d+)\.(.+)", path)
        if m is None or m[2] not in _HF_OF:
            raise ConfigError(f"save_adapter (IA3): {path!r} has no Hugging Face GPT-2 "
                              f"counterpart; PEFT's format holds {sorted(_HF_OF)}")
        if layer.is_feedforward and _HF_OF[m[2]] == "attn.c_attn":
            raise ConfigError(f"save_adapter (IA3): {path!r} is a feedforward module; HF GPT-2 "
                              f"fuses q, k and v into c_attn, whose input all three share, so "
                              f"only output scaling of q, k, v has PEFT's form")
        mine[path] = layer
    arrays, flags = {}, {}
    for i in range(model.config.n_layer):
        for hf, ms in MODULES.items():
            parts = [mine.get(f"h.{i}.{m}") for m in ms]
            if not any(parts):
                continue
            ff = any(p is not None and p.is_feedforward for p in parts)
            dtype = next(p for p in parts if p is not None).ia3_l.data.dtype
            # a projection of c_attn without a vector scales by ones: the same function
            vec = np.concatenate([B.to_numpy(p.ia3_l.data) if p is not None else np.ones(
                model.get_submodule(f"h.{i}.{m}").out_features, dtype)
                for p, m in zip(parts, ms)])
            arrays[f"{KEY_PREFIX}h.{i}.{hf}.ia3_l"] = np.ascontiguousarray(
                vec[None, :] if ff else vec[:, None])  # PEFT: (1, in) or (out, 1)
            flags[f"h.{i}.{hf}"] = ff
    targets, ff_names = _module_names(flags, model.config.n_layer, {})
    return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": targets,
            "feedforward_modules": ff_names, "fan_in_fan_out": True,
            "init_ia3_weights": config.init_ia3_weights, "inference_mode": True}, arrays


def _peft_matches(raw: dict, field: str, hf_path: str, who: str, suffix: str) -> bool:
    """PEFT's rule for a module of the HF model (``hf_path``, "transformer.h.0.mlp.c_proj"): a
    str field is a regex over the whole name; a list matches a name equal to an entry or ending
    in ``suffix`` + entry ("." for target_modules and exclude_modules, "" for
    feedforward_modules, as PEFT writes each)."""
    names = raw.get(field) or []
    if isinstance(names, str):
        return re.fullmatch(names, hf_path) is not None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{who}: {field} must be a regex or a list of names, got "
                              f"{names!r}")
    return any(hf_path == n or hf_path.endswith(suffix + n) for n in names)


def _expected(model: GPT, raw: dict, who: str) -> dict[str, tuple[tuple, bool]]:
    """{file key: (shape, feedforward?)} of every GPT-2 module the config targets, from the
    config and the model's sizes alone (nothing allocated, no tensor read)."""
    out = {}
    for i in range(model.config.n_layer):
        for hf, mine in MODULES.items():
            hf_path = f"transformer.h.{i}.{hf}"
            if not _peft_matches(raw, "target_modules", hf_path, who, ".") or \
                    _peft_matches(raw, "exclude_modules", hf_path, who, "."):
                continue
            ff = _peft_matches(raw, "feedforward_modules", hf_path, who, "")
            if ff and hf == "attn.c_attn":
                raise CheckpointError(f"{who}: c_attn is a feedforward module in the config: "
                                      f"one vector on the input that q, k and v share, which "
                                      f"minilora's separate q_proj, k_proj, v_proj do not hold")
            layers = [model.get_submodule(f"h.{i}.{m}") for m in mine]
            shape = (1, layers[0].in_features) if ff else (sum(x.out_features for x in layers), 1)
            out[f"{KEY_PREFIX}h.{i}.{hf}.ia3_l"] = (shape, ff)
    if not out:
        raise CheckpointError(f"{who}: target_modules {raw.get('target_modules')!r} name no "
                              f"module of this GPT-2 (its modules: {sorted(MODULES)})")
    return out


def _order(path: str) -> tuple[int, int]:
    """Sort key of "h.{i}.module": by layer, then in the order of a block's modules."""
    _, i, module = path.split(".", 2)
    return int(i), list(SHORT).index(module)


def apply_adapter(model: Module, config: dict, arrays: dict[str, np.ndarray]) -> Module:
    """Inject IA3 into the plain GPT ``model`` from a PEFT GPT-2 file's config and arrays (module
    docstring); every key and shape is checked against the config and the model first
    (CheckpointError naming the key and the shapes; the model unchanged). Returns ``model``.

    The IA3Config recorded names the adapted modules in a canonical order (by layer, then
    q, k, v, o, fc, proj), a module name when every layer has it, else one path per layer."""
    who = "load_adapter (IA3)"
    if config.get("peft_type") != "IA3":
        raise CheckpointError(f"{who}: peft_type {config.get('peft_type')!r} is not 'IA3'")
    if not isinstance(model, GPT):
        raise CheckpointError(f"{who}: PEFT's IA3 files are for GPT-2; the model is a "
                              f"{type(model).__name__}")
    check_unmarked(model, who)
    if config.get("modules_to_save"):
        raise CheckpointError(f"{who}: modules_to_save={config['modules_to_save']!r}: trained "
                              f"whole modules are not part of minilora's IA3")
    try:
        init = json_field(config, "init_ia3_weights", bool, who, True)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    expected = _expected(model, config, who)
    check_arrays({k: shape for k, (shape, _) in expected.items()}, arrays, who)
    vectors: dict[str, tuple[np.ndarray, bool]] = {}  # minilora path -> (l, feedforward?)
    for key, (_, ff) in expected.items():
        i, hf = _KEY.fullmatch(key).groups()
        parts = MODULES[hf]
        pieces = np.split(arrays[key].reshape(-1), len(parts))  # c_attn: the q, k, v thirds
        for name, piece in zip(parts, pieces):
            if name != "attn.q_proj" or not np.all(piece == 1):
                vectors[f"h.{i}.{name}"] = (piece, ff)
    flags = {p: vectors[p][1] for p in sorted(vectors, key=_order)}
    targets, ff_names = _module_names(flags, model.config.n_layer, SHORT)
    ia3 = IA3Config(tuple(targets), tuple(ff_names), init)
    with keep_host_rng():  # a random init (init_ia3_weights false) is overwritten below
        inject_ia3(model, ia3)
    for path, (vec, _) in vectors.items():
        p = model.get_submodule(path).ia3_l
        p.data[...] = B.asarray(vec, dtype=p.data.dtype)
    return model


__all__ = ["IA3Config", "IA3Linear", "inject_ia3", "merge_ia3", "ia3_layers", "ia3_param_count",
           "adapter_arrays", "apply_adapter"]
