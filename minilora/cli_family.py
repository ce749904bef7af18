"""The PEFT family on the command line: ``finetune --method`` IA3, BitFit, bottleneck adapters,
prompt tuning or prefix tuning, and those fine-tunes in ``sample``, ``eval``, ``merge``,
``export`` and ``inspect``.

    minilora finetune --from runs/base --task nocarry --method ia3 --out runs/ia3
    minilora finetune --from runs/base --task nocarry --method bottleneck --bottleneck 8 --qlora \\
        --out runs/bn-q
    minilora eval --checkpoint runs/base --adapter runs/ia3
    minilora merge --checkpoint runs/base --adapter runs/ia3 --out runs/ia3-merged

A family fine-tune directory is the LoRA fine-tune's save (minilora.cli_lora), with the method's
adapter files in place of LoRA's: adapter_config.json (``peft_type`` IA3, BITFIT, BOTTLENECK,
PROMPT_TUNING or PREFIX_TUNING) and adapter_model.safetensors as ``ml.family.save_adapter``
writes them, the trained parameters and optimizer state, and checkpoint.json naming the base, the
data and the method's config; written whole or not at all at every save. ``--adapter DIR``
detects the method from the config's ``peft_type`` and loads it with ``ml.family.load_adapter``.
A model carries one method of the family and nothing beside it, so such an adapter loads alone.

What the methods cost, and which can merge (the family's modules say why):

    method      trainable (C n_embd, L n_layer)        merge            PEFT's format
    ia3         6 L C (k, v, the MLP's hidden)          yes: l into W    yes
    bitfit      L 11 C + C (every bias)                 nothing to fold  no (minilora's)
    bottleneck  L a (2 C m + m + C)                     no: act(.)       no (minilora's)
    prompt      N C, N positions of context             no: input        yes
    prefix      N 2 L C, N positions of context         no: input        yes

The papers: IA3 Liu et al. 2022 (arXiv 2205.05638), BitFit Ben Zaken et al. 2021 (2106.10199),
bottleneck adapters Houlsby et al. 2019 (1902.00751), prompt tuning Lester et al. 2021
(2104.08691), prefix tuning Li and Liang 2021 (2101.00190); each module of ``ml.family`` states
its equation and shapes.

Every method trains on a 4-bit base too (``--qlora`` quantizes the base first): its own
parameters are float Parameters on top of the frozen QuantLinear layers. A merge of IA3 trained
on a 4-bit base folds the vectors into deq(Q(W)), the float weights it learned against, as a
QLoRA merge does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

from . import family, quant
from .cli_common import positive_int
from .errors import CheckpointError, ConfigError
from .family.core import family_config
from .family.io import PEFT_TYPES, method_functions, peft_type_of
from .family.merge import REFUSED
from .family.prompt import INITS as PROMPT_INITS
from .family.prompt import prompt_parameter_count
from .lora import count_parameters
from .lora.io import adapter_file_bytes, adapter_header

METHODS = ("lora", "ia3", "bitfit", "bottleneck", "prompt", "prefix")
FAMILY = METHODS[1:]
PEFT_TYPE = {"ia3": "IA3", "bitfit": "BITFIT", "bottleneck": "BOTTLENECK",
             "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
METHOD_OF = {v: k for k, v in PEFT_TYPE.items()}
CONFIGS = {"ia3": family.IA3Config, "bitfit": family.BitFitConfig,
           "bottleneck": family.BottleneckConfig, "prompt": family.PromptTuningConfig,
           "prefix": family.PrefixTuningConfig}
# the family writes PEFT's own files for these (PeftModel loads them on an HF GPT-2 base)
PEFT_FORMAT = ("IA3", "PROMPT_TUNING", "PREFIX_TUNING")
# The peak learning rate a method fine-tunes at when --lr is not given. A few hundred learned
# scales, biases or virtual tokens move far less per step than a LoRA update at the same rate
# (at the training loop's 3e-3, IA3 reached 69% on task B where LoRA reached 100%): these are the
# rates `python benchmarks/peft_family.py --sweep` chose on task B (benchmarks/RESULTS.md).
DEFAULT_LR = {"ia3": 0.3, "bitfit": 0.1, "bottleneck": 0.03, "prompt": 0.3, "prefix": 0.3}
DEFAULT_VIRTUAL_TOKENS = 20  # PEFT's PromptTuningConfig default, when the context has room

# dest -> (flag, the methods that use it); the LoRA flags default to None so that a flag given
# to a method that ignores it is refused, not silently dropped
FLAGS = {
    "r": ("--r", ("lora",)), "alpha": ("--alpha", ("lora",)),
    "lora_dropout": ("--lora-dropout", ("lora",)), "rslora": ("--rslora", ("lora",)),
    "dora": ("--dora", ("lora",)), "init": ("--init", ("lora",)),
    "adapter_name": ("--adapter-name", ("lora",)), "target": ("--target", ("lora", "ia3")),
    "feedforward": ("--feedforward", ("ia3",)),
    "bottleneck": ("--bottleneck", ("bottleneck",)),
    "non_linearity": ("--non-linearity", ("bottleneck",)),
    "virtual_tokens": ("--virtual-tokens", ("prompt", "prefix")),
    "prompt_init": ("--prompt-init", ("prompt",)),
    "prefix_projection": ("--prefix-projection", ("prefix",)),
}


# ------------------------------------------------------------------------------ flags

def add_method_flags(p: argparse.ArgumentParser) -> None:
    """--method and the family's own flags on ``finetune`` (LoRA's stay in cli_lora)."""
    p.add_argument("--method", choices=METHODS, default=None,
                   help="the adapter: lora (default), ia3 (Liu et al. 2022: vectors rescaling "
                   "k, v and the MLP's hidden activations), bitfit (only the biases train), "
                   "bottleneck (Houlsby et al. 2019: small residual MLPs after attention and "
                   "the MLP), prompt (Lester et al. 2021: learned virtual tokens at the input) or "
                   "prefix (Li and Liang 2021: learned keys and values at every layer); every "
                   "one combines with --qlora. Without --lr the family's methods train at their "
                   "own rate: " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()))
    p.add_argument("--feedforward", default=None, metavar="NAMES",
                   help="ia3: the targets whose input (not output) is scaled (default mlp.proj, "
                   "the MLP's hidden activations); --target sets ia3's targets (default "
                   "k_proj,v_proj,mlp.proj)")
    p.add_argument("--bottleneck", type=positive_int, default=None, metavar="M",
                   help="bottleneck: the adapters' hidden width m (default 16)")
    p.add_argument("--non-linearity", choices=("gelu", "relu"), default=None,
                   help="bottleneck: the activation between down and up (default gelu)")
    p.add_argument("--virtual-tokens", type=positive_int, default=None, metavar="N",
                   help="prompt, prefix: N learned positions; they take N of the base's context "
                   f"(default {DEFAULT_VIRTUAL_TOKENS}; fewer when a task's sequences leave "
                   "less room, and at most half the context beside text or JSONL, whose "
                   "sequences are cut to leave the room)")
    p.add_argument("--prompt-init", choices=PROMPT_INITS, default=None,
                   help="prompt: random N(0, 1) virtual tokens (default, as PEFT's RANDOM) or "
                   "rows of the token table (vocab, PEFT's SAMPLE_VOCAB)")
    p.add_argument("--prefix-projection", action="store_true", default=None,
                   help="prefix: compute the keys and values with a tanh MLP while training "
                   "(the paper's reparameterisation); only its output is saved")


def check_flags(args: argparse.Namespace) -> str:
    """The method a ``finetune`` runs: "full", "lora" (also under --qlora) or one of
    :data:`FAMILY`. Refused with one line: --full with --method, --lora with another method,
    and any flag of a method that does not run (it would be ignored)."""
    method, mode = getattr(args, "method", None), getattr(args, "mode", None)
    if mode == "full" and method is not None:
        raise ConfigError(f"finetune --full trains every weight with no adapter, so it takes no "
                          f"--method; drop --method {method} or --full")
    if mode == "lora" and method not in (None, "lora"):
        raise ConfigError(f"finetune --lora means --method lora; it cannot be combined with "
                          f"--method {method} (--qlora quantizes the base for any method)")
    method = method or ("full" if mode == "full" else "lora")
    who = "--full" if method == "full" else f"--method {method}"
    for dest, (flag, owners) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or value is False or method in owners:
            continue
        shown = flag if value is True else f"{flag} {value}"
        raise ConfigError(f"finetune: {shown} is a flag of --method {' or '.join(owners)}; "
                          f"{who} does not use it (drop it)")
    return method


def refuse_method_flags(args: argparse.Namespace, who: str) -> None:
    """A resumed fine-tune keeps its method and settings: any method flag is refused, naming
    it, rather than ignored."""
    given = [("--method " + args.method) if getattr(args, "method", None) else None,
             ("--" + args.mode) if getattr(args, "mode", None) else None]
    given += [flag for dest, (flag, _) in FLAGS.items()
              if getattr(args, dest, None) not in (None, False)]
    given = [g for g in given if g]
    if given:
        raise ConfigError(f"{who} continues a fine-tune with its saved method and settings; "
                          f"drop {', '.join(given)}")


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ConfigError(f"{flag} must name modules (e.g. k_proj,v_proj), got {text!r}")
    return names


def method_config(args: argparse.Namespace, method: str, virtual_tokens: int,
                  all_linear: tuple[str, ...]) -> Any:
    """The family config the flags describe (``virtual_tokens`` from :func:`virtual_tokens`);
    a bad value is a ConfigError naming the flag."""
    if method == "ia3":
        if args.target is None:
            targets: tuple[str, ...] = family.IA3Config().target_modules
        else:
            targets = all_linear if args.target == "all-linear" else \
                _names(args.target, "--target")
        ff = _names(args.feedforward, "--feedforward") if args.feedforward is not None else \
            tuple(t for t in targets if t in ("mlp.proj", "proj"))
        try:
            return family.IA3Config(target_modules=targets, feedforward_modules=ff)
        except ConfigError as exc:
            raise ConfigError(f"--target {args.target or ','.join(targets)!r} / --feedforward "
                              f"{args.feedforward or ','.join(ff)!r}: {exc}") from None
    if method == "bitfit":
        return family.BitFitConfig()
    if method == "bottleneck":
        return family.BottleneckConfig(bottleneck=args.bottleneck or 16,
                                       non_linearity=args.non_linearity or "gelu")
    if method == "prompt":
        return family.PromptTuningConfig(virtual_tokens, init=args.prompt_init or "random")
    return family.PrefixTuningConfig(virtual_tokens, prefix_projection=bool(args.prefix_projection))


def virtual_tokens(args: argparse.Namespace, method: str, block: int,
                   task_length: int | None) -> int:
    """N for prompt and prefix tuning (0 for the other methods): ``--virtual-tokens`` or the
    default, checked against the base's context ``block`` and a task's ``task_length`` T
    (N + T <= block); text and JSONL data are cut to block - N instead."""
    if method not in ("prompt", "prefix"):
        return 0
    N = args.virtual_tokens
    room = block - 1 if task_length is None else block - task_length
    if room < 1:
        raise ConfigError(f"finetune --method {method}: the base's context of {block} tokens has "
                          f"no room for virtual tokens beside the task's {task_length}; train "
                          f"the base with a longer --block-size")
    if N is None:
        return min(DEFAULT_VIRTUAL_TOKENS, room if task_length is not None else block // 2)
    if N > room:
        beside = f"beside the task's {task_length}" if task_length is not None else \
            "with a token of data left"
        raise ConfigError(f"--virtual-tokens {N}: the base's context is {block} tokens, so at "
                          f"most {room} virtual tokens fit {beside} (N + T <= block_size)")
    return N


# ------------------------------------------------------------------------- training

def prepare(model: Any, method: str, config: Any, quant_cfg: dict | None) -> dict:
    """Quantize the base (``quant_cfg``, for --qlora) and inject the method, in place; returns
    the fine-tune record's method fields (what ``--resume`` rebuilds it from)."""
    if quant_cfg is not None:
        quant.quantize_model(model, **quant_cfg)
    if method == "ia3":
        family.inject_ia3(model, config)
    elif method == "bitfit":
        family.bitfit(model)
    elif method == "bottleneck":
        family.inject_bottleneck(model, config)
    else:
        family.inject_prompt(model, config)
    return {"method": method, "quant": quant_cfg, "lora": None,
            "family": {"peft_type": PEFT_TYPE[method], "config": dataclasses.asdict(config)}}


def check_savable(model: Any, method: str, args: argparse.Namespace) -> None:
    """Build the adapter's files once before training, so that a setting the format cannot
    hold (IA3 with q, k or v input-scaled: PEFT's GPT-2 fuses them into one c_attn) is refused
    now, naming the flags, not after the last step."""
    try:
        adapter_bytes(model)()
    except ConfigError as exc:
        flags = " ".join(f"{FLAGS[d][0]} {getattr(args, d)}" for d in ("target", "feedforward")
                         if method == "ia3" and getattr(args, d, None) is not None)
        raise ConfigError(f"finetune --method {method}{' ' + flags if flags else ''}: "
                          f"{exc}") from None


def config_from_record(record: dict, who: str) -> Any:
    """The family config a fine-tune's record holds; CheckpointError when it does not parse."""
    method = record.get("method")
    saved = (record.get("family") or {}).get("config")
    if method not in FAMILY or not isinstance(saved, dict):
        raise CheckpointError(f"{who}: the fine-tune record names method {method!r} without a "
                              f"usable family config")
    try:
        return CONFIGS[method](**saved)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{who}: the saved {method} config {saved!r} does not parse: "
                              f"{exc}") from None


def adapter_bytes(model: Any) -> Callable[[], dict[str, bytes]]:
    """A function giving the method's adapter files for each save (``ml.family.save_adapter``'s
    two files, to go into the fine-tune's one save)."""
    peft_type = peft_type_of(family_config(model))
    to_arrays = method_functions(peft_type)[0]
    return lambda: adapter_file_bytes(*to_arrays(model))


def formula(model: Any, method: str, config: Any) -> tuple[str, int]:
    """(the trainable-parameter formula with its numbers, its value) for ``model``'s config."""
    c = model.config
    L, C = c.n_layer, c.n_embd
    if method == "bitfit":
        return f"L * 11 C + C = {L} * 11 * {C} + {C}", family.bitfit_param_count(c)
    if method == "ia3":
        n = family.ia3_param_count(c, config)
        if config == family.IA3Config():
            return f"6 L C = 6 * {L} * {C}", n
        return f"the sum of the {len(_ia3_layers(model))} scaled layers' widths", n
    if method == "bottleneck":
        a, m = len(config.after), config.bottleneck
        return (f"L a (2 C m + m + C) = {L} * {a} * (2 * {C} * {m} + {m} + {C})",
                family.bottleneck_param_count(c, config))
    N = config.num_virtual_tokens
    n = prompt_parameter_count(config, L, C)
    if method == "prompt":
        return f"N C = {N} * {C}", n
    if config.prefix_projection:
        H = config.encoder_hidden_size or C
        return f"N C + C H + H + 2 L C (H + 1) with H = {H}", n
    return f"N 2 L C = {N} * 2 * {L} * {C}", n


def _ia3_layers(model: Any) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, family.IA3Linear)]


def print_trainable(model: Any, method: str, config: Any) -> None:
    """The one-line summary of what trains, as the LoRA path prints it."""
    trainable, total = count_parameters(model)
    text, n = formula(model, method, config)
    extra = ""
    if method in ("prompt", "prefix"):
        extra = f"; {config.num_virtual_tokens} of the {model.config.block_size} positions of " \
                f"context go to virtual tokens"
    base = " on a 4-bit base" if any(isinstance(m, quant.QuantLinear)
                                      for _, m in model.named_modules()) else ""
    print(f"{method}{base}: {text} = {n:,} trainable{extra}; {trainable:,} of {total:,} "
          f"parameters train ({trainable / total:.2%})", flush=True)


# ----------------------------------------------------------------- adapters on a base

def peft_type_in(directory: str) -> str | None:
    """The family peft_type of an adapter directory's config, or None (LoRA, or unreadable:
    the LoRA loader then names the problem)."""
    try:
        config, _ = adapter_header(directory, "--adapter")
    except CheckpointError:
        return None
    found = config.get("peft_type") if isinstance(config, dict) else None
    return found if found in PEFT_TYPES else None


def attach(model: Any, dirs: list[str], records: list[dict], peft_types: list[str | None],
           use: str | None) -> dict:
    """Load the one family adapter of ``dirs`` into ``model`` (quantizing the base first when
    it was trained on a 4-bit one); returns its record with ``peft_type``. Refused: a family
    adapter beside any other adapter, and ``--use`` (there is nothing to choose)."""
    where = next(i for i, t in enumerate(peft_types) if t is not None)
    directory, peft_type = dirs[where], peft_types[where]
    method = METHOD_OF[peft_type]
    if len(dirs) > 1:
        raise ConfigError(f"--adapter {directory!r} is a {method} adapter ({peft_type}); a model "
                          f"carries one method of the family and no other adapter beside it, so "
                          f"it loads alone (got {len(dirs)} --adapter)")
    if use is not None:
        raise ConfigError(f"--use {use!r}: the {method} adapter {directory!r} is the model's one "
                          f"method; --use chooses among LoRA adapters")
    record = records[where]
    saved = (record.get("family") or {}).get("peft_type")
    if record.get("method") is not None and saved != peft_type:
        raise CheckpointError(f"--adapter {directory!r}: checkpoint.json records method "
                              f"{record.get('method')!r} but adapter_config.json holds "
                              f"peft_type {peft_type!r}")
    quant_cfg = record.get("quant")
    if quant_cfg is not None:
        if not isinstance(quant_cfg, dict):
            raise CheckpointError(f"--adapter {directory!r}: its quantization record "
                                  f"{quant_cfg!r} is not a setting")
        quant.quantize_model(model, **quant_cfg)
    family.load_adapter(model, directory)
    model.eval()
    return {**record, "method": method, "peft_type": peft_type}


def carries_family(model: Any) -> bool:
    """True when ``model`` carries a method of the family (after :func:`attach`)."""
    return family_config(model) is not None


def merge(model: Any) -> None:
    """Fold the method into the weights (``ml.family.merge_and_unload``); IA3 on a 4-bit base
    merges into deq(Q(W)), the weights it learned against. Refused (the family's reason) for
    bottleneck adapters, prompt and prefix tuning."""
    for layer in _ia3_layers(model):
        if layer.is_quantized:
            layer.base_layer = layer.base_layer.to_linear()
    family.merge_and_unload(model)


def export_peft(model: Any, out: str) -> str:
    """Write the method as PEFT's adapter files (IA3, prompt and prefix tuning: the family's
    files are PEFT's format); refused, saying why, for BitFit and bottleneck adapters. Returns
    the method's name."""
    peft_type = peft_type_of(family_config(model))
    if peft_type not in PEFT_FORMAT:
        raise ConfigError(f"export --to peft: PEFT has no {peft_type} method; minilora writes "
                          f"{METHOD_OF[peft_type]} in its own format (peft_type {peft_type!r}), "
                          f"which only minilora loads")
    family.save_adapter(model, out)
    return METHOD_OF[peft_type]


# -------------------------------------------------------------------------- inspect

def describe(config: dict) -> str:
    """One line on the method an adapter_config.json holds."""
    t = config.get("peft_type")
    if t == "IA3":
        return f"IA3: vectors on {config.get('target_modules')} (input-scaled: " \
               f"{config.get('feedforward_modules')})"
    if t == "BITFIT":
        return "BitFit: every bias of the base"
    if t == "BOTTLENECK":
        return f"bottleneck adapters: m={config.get('bottleneck')}, " \
               f"{config.get('non_linearity')}, after {config.get('after')}"
    what = "prompt tuning" if t == "PROMPT_TUNING" else "prefix tuning"
    return f"{what}: {config.get('num_virtual_tokens')} virtual tokens"


def _merge_text(peft_type: str) -> str:
    reason = REFUSED.get({"BOTTLENECK": "BottleneckConfig", "PROMPT_TUNING": "PromptTuningConfig",
                          "PREFIX_TUNING": "PrefixTuningConfig"}.get(peft_type, ""))
    if reason is not None:
        return "refused: " + reason.split(":")[0]
    return "folds into the weights" if peft_type == "IA3" else "nothing to fold (the biases are " \
                                                               "the model's own)"


def adapter_rows(directory: str, trained: dict | None = None) -> list[tuple[str, str]] | None:
    """``inspect``'s rows for a family adapter (method, trainable parameters, merge), or None
    when ``directory``'s adapter is not one. ``trained``: a fine-tune's saved trainable
    parameters ({name: array}), which a prefix's MLP makes more than the file holds."""
    config, infos = adapter_header(directory, "inspect")
    if not isinstance(config, dict) or config.get("peft_type") not in PEFT_TYPES:
        return None
    stored = sum(math.prod(i.shape) for i in infos.values())
    n = stored if trained is None else sum(int(v.size) for v in trained.values())
    text = f"{n:,} trainable"
    if n != stored:
        text += f" ({stored:,} in the adapter file)"
    fmt = "PEFT's" if config["peft_type"] in PEFT_FORMAT else "minilora's own"
    return [("method", describe(config)), ("parameters", text),
            ("merge", _merge_text(config["peft_type"])), ("format", f"{fmt} (peft_type "
                                                                     f"{config['peft_type']!r})")]


__all__ = ["METHODS", "FAMILY", "PEFT_TYPE", "add_method_flags", "check_flags",
           "refuse_method_flags", "method_config", "virtual_tokens", "prepare", "check_savable",
           "config_from_record", "adapter_bytes", "print_trainable", "peft_type_in", "attach",
           "carries_family", "merge", "export_peft", "adapter_rows", "formula", "describe"]
