"""Modules: containers of parameters and sub-modules, in PyTorch's shape and vocabulary.

A :class:`Module` registers every :class:`Parameter` and sub-module assigned to it as an attribute,
so ``named_parameters()`` and ``state_dict()`` find them by their dotted path
(``h.0.attn.q_proj.weight``). Layers keep PyTorch's layouts and initialisations: a Linear weight is
(out, in) and ``y = x W^T + b``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import backend as B
from . import functional as F
from .errors import (
    DTypeError,
    InvalidArgumentError,
    StateDictError,
    check_bool,
    check_int,
    is_int,
    is_real,
)
from .tensor import Tensor
from .tensorfile import overflows_when_cast


class Parameter(Tensor):
    """A tensor that a Module registers as one of its parameters (requires grad by default)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


def _uniform(shape: tuple, bound: float, dtype: Any) -> Any:
    return B.asarray(B.host_rng().uniform(-bound, bound, size=shape).astype(dtype))


def _normal(shape: tuple, std: float, dtype: Any) -> Any:
    return B.asarray((B.host_rng().standard_normal(size=shape) * std).astype(dtype))


@contextmanager
def keep_host_rng() -> Iterator[None]:
    """Context manager: minilora's host generator is restored on exit. Building modules whose
    initial values a file then overwrites draws random numbers, and loading a file should not
    shift a training run's random stream."""
    state = B.host_rng().bit_generator.state
    try:
        yield
    finally:
        B.host_rng().bit_generator.state = state


def check_module(model: Any, who: str) -> None:
    """Refuse (DTypeError, naming ``who``) a ``model`` that is not a minilora :class:`Module`: None
    or a name would fail deep inside, as an AttributeError naming nothing given."""
    if not isinstance(model, Module):
        raise DTypeError(f"{who}: model must be a minilora nn.Module, got "
                         f"{type(model).__name__}")


class Module:
    """Base class: assign Parameters and Modules as attributes and they are tracked.

    ``keeps_own_inputs`` is a module's word that its backward pass reads no tensor it was given,
    only arrays its own closures hold (a linear layer keeps its input array for its weight
    gradient, or nothing when the weight is frozen): a caller may then ``tensor.release`` the
    input once the module has run. False unless a subclass says otherwise.
    """

    keeps_own_inputs: bool = False

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        # replacing keeps the entry's place (and so the order of named_parameters/state_dict)
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            self._modules[name] = value
        else:
            params.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the module's output; subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------ traversal

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Yield ``(path, module)`` for this module and every descendant, each module once."""
        seen: set = set()
        stack = [(prefix, self)]
        while stack:
            path, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield path, mod
            children = [(f"{path}.{n}" if path else n, m) for n, m in mod._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        """Every module in the tree, this one first."""
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        """The direct sub-modules."""
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Yield ``(path, parameter)``, each shared (tied) parameter once, under its first path."""
        seen: set = set()
        for path, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> list[Parameter]:
        """All parameters, tied ones once."""
        return [p for _, p in self.named_parameters()]

    def get_submodule(self, path: str) -> Module:
        """The module at dotted ``path`` ("" is this module)."""
        mod = self
        for part in path.split(".") if path else []:
            if part not in mod._modules:
                raise InvalidArgumentError(f"get_submodule: {type(mod).__name__} has no "
                                           f"submodule {part!r} (path {path!r})")
            mod = mod._modules[part]
        return mod

    def set_submodule(self, target: str, module: Module, strict: bool = False) -> None:
        """Put ``module`` at dotted path ``target``, as torch's ``set_submodule``: the module at
        the path's head (which must exist) holds it under the last name from then on, in the
        place of the module there before (its place in the order kept).

        With ``strict`` a module must already be there. A name that holds a parameter or a plain
        attribute is refused either way: the model code reads it as something else.
        """
        if not isinstance(target, str) or not target or "" in target.split("."):
            raise InvalidArgumentError(f"set_submodule: target must be a dotted path such as "
                                       f"'h.0.attn', got {target!r}")
        if not isinstance(module, Module):
            raise InvalidArgumentError(f"set_submodule: module must be a Module, got "
                                       f"{type(module).__name__} (for {target!r})")
        parent_path, _, name = target.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            taken = name in parent._parameters or name in parent.__dict__
            if strict or taken:
                what = "holds a parameter or attribute, not a module" if taken else \
                    "holds no module to replace (strict=True)"
                raise InvalidArgumentError(f"set_submodule: {target!r}: {name!r} of "
                                           f"{type(parent).__name__} {what}")
        parent._set_child(name, module)

    def _set_child(self, name: str, module: Module) -> None:
        """Register ``module`` as this module's child ``name`` (containers override it)."""
        setattr(self, name, module)

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call ``fn`` on every module of the tree; returns self."""
        for m in self.modules():
            fn(m)
        return self

    # ---------------------------------------------------------------------- modes, grads

    def train(self, mode: bool = True) -> Module:
        """Set training mode (dropout active) on the whole tree; returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Set evaluation mode (dropout off); returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget every parameter's gradient."""
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter; returns self."""
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar parameters (tied ones once)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def astype(self, dtype: Any) -> Module:
        """Cast every parameter to ``dtype`` (a float dtype) in place (gradients are dropped);
        returns self."""
        dtype = B.float_dtype(dtype, f"{type(self).__name__}.astype")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def double(self) -> Module:
        """Cast the parameters to float64 (for gradient checks)."""
        return self.astype(np.float64)

    def float(self) -> Module:
        """Cast the parameters to float32."""
        return self.astype(np.float32)

    def to_backend(self) -> Module:
        """Move every module's arrays to the active backend's device (after ``use_backend``)."""
        for m in self.modules():
            m._move_arrays()
        return self

    def _move_arrays(self) -> None:
        """Move this module's own arrays; a module holding arrays that are not Parameters (a
        quantized weight) extends this."""
        for p in self._parameters.values():
            p.data = B.asarray(p.data)
            p.grad = None

    # ------------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict[str, Any]:
        """``{path: array}`` of every parameter under every path (tied ones under each name),
        then of the arrays a module holds besides its parameters (its :meth:`_extra_state`, e.g.
        a 4-bit layer's packed codes and scales).

        The arrays are the parameters' own (not copies), as PyTorch's tensors are.
        """
        out = {}
        for path, mod in self.named_modules():
            pre = f"{path}." if path else ""
            for name, p in mod._parameters.items():
                out[pre + name] = p.data
            for name, arr in mod._extra_state().items():
                out[pre + name] = arr
        return out

    # A module may hold arrays that are not Parameters (a quantized weight: codes, scales and a
    # small metadata blob) and still want them in its state dict. It overrides these three; the
    # keys are relative to the module, and they must not name one of its parameters.

    def _extra_state(self) -> dict[str, Any]:
        """``{local key: array}`` this module adds to :meth:`state_dict`; none by default."""
        return {}

    def _owns_extra_key(self, name: str) -> bool:
        """True when the state-dict key ``name`` (relative to this module) belongs to its extra
        state; :meth:`load_state_dict` routes such keys to :meth:`_load_extra_state`."""
        return False

    def _load_extra_state(self, state: dict[str, Any], prefix: str) -> Callable[[], None]:
        """Check ``state`` (this module's extra-state entries, local keys; at least one) and
        return a function that installs it. Must change nothing itself and raise
        StateDictError (naming ``prefix + key`` and the values) when the entries do not fit,
        so that a refused load leaves the model as it was."""
        raise StateDictError(f"load_state_dict: {type(self).__name__} at {prefix!r} takes no "
                             f"extra state, got keys {sorted(state)[:5]}")

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> tuple:
        """Copy values into the parameters in place; returns ``(missing, unexpected)`` keys.

        Shapes must match exactly (the error names the key and both shapes); with ``strict`` a
        missing or an unexpected key is an error too. A module's extra state (see
        :meth:`_extra_state`) is handed to that module, which checks it and replaces its arrays;
        a module none of whose extra keys are given reports its current keys as missing.
        Nothing is changed when an error is raised.
        """
        if not isinstance(state_dict, dict):
            raise StateDictError(f"load_state_dict: expected a dict of arrays, got "
                                 f"{type(state_dict).__name__}")
        # a Tensor's values are its array (as PyTorch users pass tensors)
        state_dict = {k: v.data if isinstance(v, Tensor) else v for k, v in state_dict.items()}
        own: dict[str, Parameter] = {}
        holders: dict[str, Module] = {}  # path -> a module that may take extra state
        for path, mod in self.named_modules():
            for name, p in mod._parameters.items():
                own[f"{path}.{name}" if path else name] = p
            if type(mod)._owns_extra_key is not Module._owns_extra_key:
                holders[path] = mod
        extra: dict[str, dict[str, Any]] = {path: {} for path in holders}
        for key in state_dict if holders else ():
            if key in own:
                continue
            parts = key.split(".")
            for i in range(len(parts) - 1, -1, -1):  # the deepest module that claims the key
                path = ".".join(parts[:i])
                if path in holders and holders[path]._owns_extra_key(".".join(parts[i:])):
                    extra[path][".".join(parts[i:])] = state_dict[key]
                    break
        claimed = {f"{p}.{k}" if p else k for p, entries in extra.items() for k in entries}
        missing = sorted((set(own) - set(state_dict)) | {
            f"{p}.{k}" if p else k for p, entries in extra.items() if not entries
            for k in holders[p]._extra_state()})
        unexpected = sorted(set(state_dict) - set(own) - claimed)
        if strict and (missing or unexpected):
            raise StateDictError(f"load_state_dict: missing keys {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}, unexpected keys "
                                 f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        for key in own.keys() & state_dict.keys():
            value = state_dict[key]
            dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
            if dtype.kind not in "biuf":  # complex would lose its imaginary part silently
                raise StateDictError(f"load_state_dict: key {key!r} holds {dtype} values; a "
                                     f"parameter takes real numbers")
            shape = tuple(np.shape(state_dict[key]))
            if shape != own[key].shape:
                raise StateDictError(f"load_state_dict: key {key!r} has shape {shape} in the "
                                     f"state dict but {own[key].shape} in the model")
        installs = [holders[p]._load_extra_state(entries, f"{p}." if p else "")
                    for p, entries in extra.items() if entries]
        for key in own.keys() & state_dict.keys():
            if overflows_when_cast(state_dict[key], own[key].data.dtype):
                dtype = own[key].data.dtype
                raise StateDictError(f"load_state_dict: key {key!r} holds "
                                     f"{state_dict[key].dtype} values beyond the range of "
                                     f"{dtype} (max {np.finfo(dtype).max:.4g}), which would "
                                     f"become inf")
        for key in own.keys() & state_dict.keys():
            p = own[key]
            p.data[...] = B.asarray(state_dict[key], dtype=p.data.dtype)
        for install in installs:
            install()
        return missing, unexpected

    # ---------------------------------------------------------------------------- repr

    def extra_repr(self) -> str:
        """One-line description of this module's own settings, shown by ``repr``."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


class Linear(Module):
    """``y = x W^T + b`` with W (out_features, in_features), b (out_features,).

    Initialised as PyTorch: W and b uniform in [-1/sqrt(in), 1/sqrt(in)]
    (kaiming-uniform with a = sqrt 5).
    """

    keeps_own_inputs = True  # F.linear holds its input array itself, and only when W trains

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = None) -> None:
        super().__init__()
        check_bool(bias, "Linear: bias")  # "no" is truthy: it would make a bias
        self.in_features = check_int(in_features, "Linear: in_features")
        self.out_features = check_int(out_features, "Linear: out_features")
        dtype = dtype or B.default_dtype()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(_uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Embedding(Module):
    """A table of ``num_embeddings`` rows of size ``embedding_dim``, looked up by integer index."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = None) -> None:
        super().__init__()
        self.num_embeddings = check_int(num_embeddings, "Embedding: num_embeddings")
        self.embedding_dim = check_int(embedding_dim, "Embedding: embedding_dim")
        self.weight = Parameter(_normal((num_embeddings, embedding_dim), 1.0,
                                        dtype or B.default_dtype()))

    def forward(self, indices: Any) -> Tensor:
        """(...) ints -> (..., embedding_dim)."""
        return F.embedding(indices, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last axis to zero mean and unit variance, then scale and shift (eps 1e-5)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True,
                 dtype: Any = None) -> None:
        super().__init__()
        dtype = dtype or B.default_dtype()
        check_int(normalized_shape, "LayerNorm: normalized_shape")
        check_bool(bias, "LayerNorm: bias")
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or \
                not 0 < eps < float("inf"):  # eps <= 0 divides by a zero variance: NaN
            raise InvalidArgumentError(f"LayerNorm: eps must be a finite number > 0, got {eps!r}")
        self.normalized_shape, self.eps = int(normalized_shape), float(eps)
        self.weight = Parameter(B.xp.ones(normalized_shape, dtype=dtype))
        self.bias = Parameter(B.xp.zeros(normalized_shape, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., C)."""
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"({self.normalized_shape},), eps={self.eps}"


class Dropout(Module):
    """Zero elements with probability p while training (scaling the rest by 1/(1-p))."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not is_real(p) or not 0.0 <= p <= 1.0:  # NaN fails the comparison too
            raise InvalidArgumentError(f"Dropout: p must be a number in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """Same shape out as in."""
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ModuleList(Module):
    """A list of modules, registered under their indices ("0", "1", ...)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        """Add ``module`` at the end; returns self."""
        self._check_module(module)
        setattr(self, str(len(self._modules)), module)
        return self

    def _check_module(self, module: Any) -> None:
        # setattr files anything that is not a Module as a plain attribute: it would vanish
        if not isinstance(module, Module):
            raise DTypeError(f"{type(self).__name__}: entries must be Modules, got "
                             f"{type(module).__name__} {module!r:.40}")

    def _index(self, i: int) -> str:
        n = len(self._modules)
        if not is_int(i) or not -n <= i < n:
            raise IndexError(f"{type(self).__name__}: index {i!r} out of range for {n} modules")
        return str(int(i) % n)

    def __getitem__(self, i: int | slice) -> Module:
        if isinstance(i, slice):  # a slice is a new container sharing the same modules
            picked = list(self._modules.values())[i]
            return Sequential(*picked) if isinstance(self, Sequential) else ModuleList(picked)
        return self._modules[self._index(i)]

    def __setitem__(self, i: int, module: Module) -> None:
        self._check_module(module)
        setattr(self, self._index(i), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def _set_child(self, name: str, module: Module) -> None:
        if name.isdigit() and name not in self._modules:  # it would break the run of indices
            raise InvalidArgumentError(f"set_submodule: a {type(self).__name__} of {len(self)} "
                                       f"modules has no index {name!r} to replace; append instead")
        setattr(self, name, module)


class ModuleDict(Module):
    """Modules under string keys, as torch's ``nn.ModuleDict``: ``d[key] = module``.

    Entries live in ``_modules`` only, never as attributes, so any key is safe (an adapter named
    "train" does not hide the method) and state keys read "<dict path>.<key>.<parameter>".
    A key is a non-empty str without a dot (a dot would split its state keys).
    """

    def __init__(self, modules: dict[str, Module] | None = None) -> None:
        super().__init__()
        for key, module in (modules or {}).items():
            self[key] = module

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise InvalidArgumentError(f"ModuleDict: a key must be a non-empty str without '.', "
                                       f"got {key!r}")
        if not isinstance(module, Module):
            raise InvalidArgumentError(f"ModuleDict: [{key!r}] must be a Module, got "
                                       f"{type(module).__name__}")
        self._modules[key] = module

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))  # a copy: deleting while iterating is safe

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> list[str]:
        """The keys, in insertion order."""
        return list(self._modules)

    def values(self) -> list[Module]:
        """The modules, in insertion order."""
        return list(self._modules.values())

    def items(self) -> list[tuple[str, Module]]:
        """``(key, module)`` pairs, in insertion order."""
        return list(self._modules.items())

    def _set_child(self, name: str, module: Module) -> None:
        self[name] = module


class Sequential(ModuleList):
    """Modules applied one after another: ``Sequential(a, b)(x) == b(a(x))``."""

    def __init__(self, *modules: Module) -> None:
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        """Feed ``x`` through each module in order."""
        for m in self:
            x = m(x)
        return x


class GELU(Module):
    """The GPT-2 (tanh) GELU as a module."""

    def forward(self, x: Tensor) -> Tensor:
        """Same shape out as in."""
        return F.gelu(x)


class Tanh(Module):
    """tanh as a module."""

    def forward(self, x: Tensor) -> Tensor:
        """Same shape out as in."""
        return x.tanh()
