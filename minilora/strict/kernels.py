"""Fused kernels, emulated: ``fuse`` and ``ElementwiseKernel``, one launch a call.

``ElementwiseKernel`` evaluates a small subset of CUDA C with NumPy, statement by statement over
whole arrays: ``name = expr;`` and ``type name = expr;`` (also ``+= -= *= /=``), C arithmetic and
comparisons, ``&& || !``, the math functions of ``C_FUNCS``, casts such as ``(T)`` or
``(float)``, literals such as ``1.0f``, and ``i``, the element index. Each type is NumPy's:
``float`` is float32, ``double`` float64, and a ``T`` takes the type of the first input declared
``T``. Not emulated (refused with InvalidArgumentError): ``raw`` parameters, the ternary operator,
loops and branches. Not caught: C's promotion of a ``float`` times a double literal (``x * 0.5``)
to double (here the literal takes the array's type, as NumPy's Python scalars do), C's integer
division, and whatever nvcc would refuse to compile.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from ..errors import InvalidArgumentError
from .arrays import unwrap, wrap
from .counters import one_launch


def fuse(*args: Any, kernel_name: str | None = None) -> Any:
    """``cupy.fuse``: ``fn`` run with the stand-in's ufuncs, counted as one launch per call.
    Both ``@fuse`` and ``@fuse(kernel_name=...)`` work."""
    def decorate(fn: Callable) -> Callable:
        def fused(*a: Any, **k: Any) -> Any:
            with one_launch():
                return fn(*a, **k)
        fused.__name__ = kernel_name or getattr(fn, "__name__", "fused")
        fused.__doc__ = fn.__doc__
        return fused
    if len(args) == 1 and callable(args[0]):
        return decorate(args[0])
    return decorate


C_TYPES = {"float": np.float32, "double": np.float64, "float32": np.float32,
           "float64": np.float64, "float16": np.float16, "half": np.float16, "int": np.int32,
           "int32": np.int32, "int64": np.int64, "long long": np.int64, "bool": np.bool_,
           "uint8": np.uint8, "int8": np.int8, "uint32": np.uint32, "uint64": np.uint64,
           "unsigned int": np.uint32, "size_t": np.uint64, "ptrdiff_t": np.int64}


def _rsqrt(x: Any) -> Any:
    return 1 / np.sqrt(x)


C_FUNCS = {"exp": np.exp, "expf": np.exp, "log": np.log, "logf": np.log, "tanh": np.tanh,
           "tanhf": np.tanh, "sqrt": np.sqrt, "sqrtf": np.sqrt, "rsqrt": _rsqrt,
           "rsqrtf": _rsqrt, "fabs": np.abs, "fabsf": np.abs, "abs": np.abs, "pow": np.power,
           "powf": np.power, "max": np.maximum, "fmax": np.maximum, "fmaxf": np.maximum,
           "min": np.minimum, "fmin": np.minimum, "fminf": np.minimum, "sin": np.sin,
           "cos": np.cos, "floor": np.floor, "ceil": np.ceil, "log1p": np.log1p,
           "expm1": np.expm1, "isfinite": np.isfinite, "isnan": np.isnan, "isinf": np.isinf}
_C_OPS = {"+=": np.add, "-=": np.subtract, "*=": np.multiply, "/=": np.true_divide}
_CAST = re.compile(r"\(\s*(" + "|".join(sorted(map(re.escape, C_TYPES), key=len, reverse=True))
                   + r"|T\w*)\s*\)\s*")
_STATEMENT = re.compile(r"(?:(?:const\s+)?([A-Za-z_][\w ]*?)\s+)?([A-Za-z_]\w*)\s*([-+*/]?=)"
                        r"\s*(.+)", flags=re.S)
_FLOAT_SUFFIX = re.compile(r"((?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)[fF]\b")


def _params(text: str) -> list[tuple[str, str]]:
    """``"T x, float32 y"`` -> [("T", "x"), ("float32", "y")]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        words = part.split()
        if words[0] == "raw":
            raise InvalidArgumentError(f"strict.ElementwiseKernel: 'raw' parameters ({part!r}) "
                                       f"are not emulated; use fuse or whole-array calls")
        out.append((" ".join(words[:-1]), words[-1]))
    return out


def _c_type(name: str, bound: dict) -> Any:
    found = C_TYPES.get(name, bound.get(name))
    if found is None:
        raise InvalidArgumentError(f"strict.ElementwiseKernel: type {name!r} is neither a C type "
                                   f"nor bound by an input")
    return found


def _close_casts(expr: str) -> str:
    """``_cast('T', x * y`` -> ``_cast('T', x) * y``: a C cast applies to the one primary (a name
    or number, with its call or index, or a parenthesised group) that follows it."""
    out, i = "", 0
    while True:
        j = expr.find("_cast(", i)
        if j < 0:
            return out + expr[i:]
        k = expr.index(",", j) + 1
        out += expr[i:k]
        p = k
        while p < len(expr) and expr[p] == " ":
            p += 1
        start, depth = p, 0
        while p < len(expr):
            c = expr[p]
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
                if depth == 0:
                    p += 1
                    break
            elif depth == 0 and not (c.isalnum() or c in "_."):
                break
            p += 1
        out += _close_casts(expr[start:p]) + ")"
        i = p


def c_statement(text: str) -> tuple[str, str, str | None, str]:
    """One C statement -> (target, operator, declared type or None, Python expression)."""
    s = text.strip()
    m = _STATEMENT.fullmatch(s)
    if m is None or "?" in s or re.search(r"\b(for|while|if|do|switch)\b", s):
        raise InvalidArgumentError(f"strict.ElementwiseKernel: statement {s!r} is outside the "
                                   f"emulated C subset (assignments of expressions)")
    typename, target, op, expr = m.groups()
    expr = _FLOAT_SUFFIX.sub(r"\1", expr)
    expr = _close_casts(_CAST.sub(lambda mm: f"_cast({mm.group(1)!r}, ", expr))
    expr = expr.replace("&&", " & ").replace("||", " | ")
    expr = re.sub(r"!(?!=)", " ~", expr)
    return target, op, typename.strip() if typename else None, expr


class ElementwiseKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name)`` for the C subset of
    this module's docstring; outputs are made (broadcast shape, declared type) unless passed
    after the inputs. One launch per call."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 reduce_dims: bool = True, preamble: str = "", **kwargs: Any) -> None:
        self.in_params, self.out_params = _params(in_params), _params(out_params)
        self.name = name
        self.statements = [c_statement(s) for s in operation.split(";") if s.strip()]

    def __call__(self, *args: Any, size: int | None = None, **kwargs: Any) -> Any:
        n_in, n_out = len(self.in_params), len(self.out_params)
        if len(args) not in (n_in, n_in + n_out):
            raise InvalidArgumentError(f"{self.name}: takes {n_in} inputs (and optionally "
                                       f"{n_out} outputs), got {len(args)} arguments")
        ins = [np.asarray(unwrap(a, self.name)) for a in args[:n_in]]
        outs = [unwrap(a, self.name) for a in args[n_in:]]
        bound: dict[str, Any] = {}
        for (ty, _), a in zip(self.in_params, ins):
            if ty not in C_TYPES:
                bound.setdefault(ty, a.dtype)
        shape = np.broadcast_shapes(*(a.shape for a in ins), *(o.shape for o in outs))
        if not outs:
            outs = [np.empty(shape, _c_type(ty, bound)) for ty, _ in self.out_params]
        env: dict[str, Any] = {"i": np.arange(int(np.prod(shape))).reshape(shape)}
        for (ty, nm), a in zip(self.in_params, ins):
            a = a.astype(_c_type(ty, bound), copy=False)
            # CUDA reads each input once, before writing: an input that is also an output must
            # keep its old values here too
            env[nm] = a.copy() if any(np.may_share_memory(a, o) for o in outs) else a
        out_names = {nm for _, nm in self.out_params}
        for (_, nm), o in zip(self.out_params, outs):
            env[nm] = o
        names = {**C_FUNCS, "_cast": lambda ty, x: np.asarray(x).astype(_c_type(ty, bound))}
        # a GPU raises no floating-point exceptions: an overflow is inf, 0/0 NaN, silently
        with one_launch(), np.errstate(all="ignore"):
            for target, op, typename, expr in self.statements:
                value = eval(expr, {"__builtins__": {}, **names}, env)  # noqa: S307 -- C subset
                if typename is not None:
                    value = np.asarray(value).astype(_c_type(typename, bound))
                if op != "=":
                    value = _C_OPS[op](env[target], value)
                if target in out_names:
                    env[target][...] = value
                else:
                    env[target] = value
        result = [wrap(o) for o in outs]
        return result[0] if len(result) == 1 else tuple(result)


__all__ = ["fuse", "ElementwiseKernel", "C_TYPES", "C_FUNCS", "c_statement"]
