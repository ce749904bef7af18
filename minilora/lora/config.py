"""LoRA configuration: rank, scaling, which Linear layers to adapt, and PEFT's JSON form of it.

A LoRA adapter on a Linear layer with weight W (n, k) = (out, in) adds the update

    delta W = scaling * B @ A,      A (r, k), B (n, r),   scaling = alpha / r

(alpha / sqrt(r) with rsLoRA, which keeps the update's size steady as r grows: the rule lives
with the other variants, in ``variants.py``). ``LoraConfig``
holds r, alpha and the rest, checks them, and answers the per-module questions injection asks:
is this module a target, and which rank and alpha does it get.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidArgumentError, check_int, is_int, is_real
from ..tensorfile import json_field
from .variants import lora_scaling

INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
# The largest rank accepted: LoRA ranks are 1 to a few hundred (the paper uses 1 to 64), and an
# adapter's A is (r, in), so a forged r of 2^40 must be refused before anything is allocated.
MAX_RANK = 2**16


def _is_number(v: Any) -> bool:
    """A finite real number: a Python or NumPy int or float, not a bool."""
    return is_real(v) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """A NumPy scalar as the Python number it holds (JSON and PEFT know only those)."""
    return v.item() if isinstance(v, (np.integer, np.floating)) else v


@dataclass
class LoraConfig:
    """What to adapt and how; the names are the LoRA paper's (and PEFT's where they differ:
    ``lora_alpha`` and ``lora_dropout`` are aliases of ``alpha`` and ``dropout``).

    - ``r``: rank of the update (positive int); ``alpha``: its scale numerator (positive).
    - ``dropout``: dropout on the adapter's input, in [0, 1).
    - ``target_modules``: a tuple/list of module names or dotted path suffixes ("q_proj",
      "attn.v_proj"), or a str, which is a regular expression that must match a module's whole
      path (PEFT's rules), or ``"all-linear"``: every linear layer but the output head
      ``lm_head``, as PEFT's keyword. Only linear-like modules (``nn.Linear``, or any module with a
      ``dequantized_weight()`` method such as the 4-bit QuantLinear) are adapted.
    - ``bias``: "none" (all biases frozen), "all" (every bias trains), "lora_only" (the biases of
      the adapted layers train).
    - ``use_rslora``: scaling alpha / sqrt(r) instead of alpha / r.
    - ``use_dora``: DoRA, a learned magnitude per output row (see ``variants``).
    - ``init``: "kaiming" (A as nn.Linear's init, bound 1/sqrt(in); B = 0: the adapted model
      starts equal to its base), "gaussian" (A ~ N(0, 1/r^2), B = 0) or "pissa" (A and B from the
      top-r singular directions of W, and W replaced by the residual, output unchanged).
    - ``rank_pattern`` / ``alpha_pattern``: {regex: value} overrides per module; a key applies
      to a module whose path ends with a dotted component matching it (PEFT's rule), the first
      matching key wins.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.r = check_int(self.r, "LoraConfig: r", error=ConfigError)
        if self.r > MAX_RANK:
            raise ConfigError(f"LoraConfig: r={self.r} is more than MAX_RANK = {MAX_RANK}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LoraConfig: alpha must be a positive number, got {self.alpha!r}")
        self.alpha = _plain(self.alpha)
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig: dropout must lie in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = _check_targets(self.target_modules)
        if self.bias not in BIASES:
            raise ConfigError(f"LoraConfig: bias must be one of {BIASES}, got {self.bias!r}")
        if self.init not in INITS:
            raise ConfigError(f"LoraConfig: init must be one of {INITS}, got {self.init!r}")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoraConfig: {name} must be True or False, got "
                                  f"{getattr(self, name)!r}")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, is_int, MAX_RANK)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, _is_number)

    # PEFT's spellings of the same fields
    @property
    def lora_alpha(self) -> float:
        """Alias of ``alpha`` (PEFT's name)."""
        return self.alpha

    @property
    def lora_dropout(self) -> float:
        """Alias of ``dropout`` (PEFT's name)."""
        return self.dropout

    # ----------------------------------------------------------------------- per module

    def is_target(self, path: str) -> bool:
        """True if the module at dotted ``path`` is one of ``target_modules``."""
        return matches_target(path, self.target_modules)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter on module ``path`` (``rank_pattern`` overrides ``r``)."""
        return int(_pattern_value(path, self.rank_pattern, self.r))

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter on module ``path`` (``alpha_pattern`` overrides ``alpha``)."""
        return _pattern_value(path, self.alpha_pattern, self.alpha)

    def scaling_for(self, path: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)``) for module ``path``."""
        return lora_scaling(self.rank_for(path), self.alpha_for(path), self.use_rslora)

    # ---------------------------------------------------------------------- PEFT's JSON

    def to_peft_dict(self) -> dict:
        """The fields as PEFT writes them in adapter_config.json (peft_type "LORA")."""
        init: Any = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[self.init]
        targets = self.target_modules if isinstance(self.target_modules, str) \
            else list(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": targets, "fan_in_fan_out": False, "bias": self.bias,
            "use_rslora": self.use_rslora, "use_dora": self.use_dora,
            "init_lora_weights": init, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoraConfig:
        """Read PEFT's adapter_config.json fields; refuses other PEFT methods and layouts.

        The JSON types are checked first: booleans must be true/false (a string "false" is an
        error, not True), r an integer, lora_alpha and lora_dropout numbers; null means PEFT's
        default where PEFT has one. Fields that change which layers or weights the adapter
        touches (:data:`UNSUPPORTED_PEFT_FIELDS`) are refused unless unset; other fields minilora
        does not use (task_type, revision, ...) are ignored.
        """
        where = "LoraConfig.from_peft_dict"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected the adapter_config.json object (a dict), got "
                              f"{type(d).__name__}")
        if d.get("peft_type") != "LORA":
            raise ConfigError(f"{where}: peft_type must be 'LORA', got {d.get('peft_type')!r}")
        if json_field(d, "fan_in_fan_out", bool, where, False):
            raise ConfigError(f"{where}: fan_in_fan_out=True (weights stored (in, out), as HF "
                              f"GPT-2's Conv1D) is not supported here; minilora's Linear weights "
                              f"are (out, in). For a PEFT adapter of HF GPT-2 use "
                              f"minilora.interop.import_peft")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                raise ConfigError(f"{where}: missing field {key!r}")
        for key in UNSUPPORTED_PEFT_FIELDS:  # each changes what the adapter applies to
            value = d.get(key)  # unset: null, false, [] or {} (not 0: layers_to_transform=0 is one)
            if not (value is None or value is False or (isinstance(value, (list, dict))
                                                        and not value)):
                raise ConfigError(f"{where}: {key}={d[key]!r} is not supported here; read "
                                  f"without it, the adapter would act on other layers or "
                                  f"weights than PEFT's")
        init = d.get("init_lora_weights", True)
        if isinstance(init, bool):
            init = "kaiming"  # False (random B) only matters before training; weights get loaded
        elif isinstance(init, str) and init.startswith("pissa"):
            init = "pissa"
        elif init != "gaussian":
            raise ConfigError(f"{where}: init_lora_weights={init!r} is not supported; known: "
                              f"True, False, 'gaussian', 'pissa'")
        targets = d["target_modules"]  # a list of names or a regex str (LoraConfig checks which)
        if isinstance(targets, list):
            targets = tuple(targets)
        return cls(r=json_field(d, "r", int, where),
                   alpha=json_field(d, "lora_alpha", float, where),
                   dropout=json_field(d, "lora_dropout", float, where, 0.0),
                   target_modules=targets, bias=json_field(d, "bias", str, where, "none"),
                   use_rslora=json_field(d, "use_rslora", bool, where, False),
                   use_dora=json_field(d, "use_dora", bool, where, False), init=init,
                   rank_pattern=dict(json_field(d, "rank_pattern", dict, where, {})),
                   alpha_pattern=dict(json_field(d, "alpha_pattern", dict, where, {})))


# PEFT adapter_config.json fields that, set, make the adapter act on other layers or weights,
# or compute something else: only some layers' indices, extra modules trained whole and saved,
# exclusions, a bias on lora_B, repeated layers, trained token rows, raw parameters as targets,
# and the variants minilora does not implement (interop.peft keeps its own list for HF GPT-2
# files, where the file's keys say which layers are adapted)
UNSUPPORTED_PEFT_FIELDS = ("layers_to_transform", "layers_pattern", "modules_to_save",
                           "exclude_modules", "lora_bias", "layer_replication",
                           "trainable_token_indices", "target_parameters", "use_qalora",
                           "alora_invocation_tokens", "use_bdlora", "arrow_config",
                           "kasa_config", "velora_config", "monteclora_config")


def adapter_list(names: Any, who: str) -> list[str]:
    """``names`` (one adapter's name, or a list of them) as a list, refused
    (InvalidArgumentError) when an item is not a str or comes twice: an adapter named twice was
    added twice, to the forward pass or to the merged weight."""
    items = [names] if isinstance(names, str) else names
    if not isinstance(items, (list, tuple)) or not all(isinstance(n, str) for n in items):
        raise InvalidArgumentError(f"{who}: adapter names must be a str or a list of str, got "
                                   f"{names!r}")
    twice = sorted({n for n in items if items.count(n) > 1})
    if twice:
        raise InvalidArgumentError(f"{who}: adapter(s) {twice} named more than once in "
                                   f"{list(items)}; each adds its update once")
    return list(items)


def _check_targets(targets: Any) -> str | tuple[str, ...]:
    if isinstance(targets, str):
        if not targets:
            raise ConfigError("LoraConfig: target_modules must not be an empty string, got ''")
        try:
            re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"LoraConfig: target_modules {targets!r} is a str, so a regular "
                              f"expression, but it does not compile ({exc})") from None
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)):
        items = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        if items and all(isinstance(t, str) and t for t in items):
            return tuple(items)
    raise ConfigError(f"LoraConfig: target_modules must be a non-empty list/tuple of module names "
                      f"or a regex str, got {targets!r}")


def _check_pattern(name: str, pattern: Any, valid: Any, limit: int | None = None) -> dict:
    if not isinstance(pattern, dict):
        raise ConfigError(f"LoraConfig: {name} must be a dict {{regex: value}}, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"LoraConfig: {name} keys must be non-empty str, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ConfigError(f"LoraConfig: {name} key {key!r} does not compile: {exc}") from None
        if not valid(value) or value <= 0:
            raise ConfigError(f"LoraConfig: {name}[{key!r}] must be positive, got {value!r}")
        if limit is not None and value > limit:
            raise ConfigError(f"LoraConfig: {name}[{key!r}]={value} is more than MAX_RANK = "
                              f"{limit}")
    return dict(pattern)


# PEFT's keyword for every linear layer but the output head, which stays the base's (tied to
# the token embedding in GPT-2): a target_modules of its own, not a regular expression
ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"


def matches_target(path: str, targets: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a str is a regex matched against the whole path; a tuple of names matches a
    path equal to a name or ending in "." + name; ``"all-linear"`` (:data:`ALL_LINEAR`) matches
    every layer but one named ``lm_head`` (the candidates are the linear layers already)."""
    if targets == ALL_LINEAR:
        return path.rsplit(".", 1)[-1] != OUTPUT_HEAD
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _pattern_value(path: str, pattern: dict, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?(?:{key})$", path):
            return value
    return default
