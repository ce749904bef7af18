"""The stand-in's device array: a NumPy array behind CuPy's rules.

* no implicit host conversion (``__array__`` raises TypeError, as CuPy's does);
* kernels (operators, methods, ufuncs, module functions) refuse NumPy-array operands;
* reductions and single-element indexing give 0-d device arrays, never host scalars;
* ``float() int() bool() .item() .tolist() .get()`` are syncs, counted;
* a NumPy array always comes back as the same wrapper object while that wrapper lives, and a
  view's ``.base`` is its base's wrapper: minilora tracks aliasing by ``id`` and ``.base``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import DTypeError
from .counters import count
from .memory import default_pool

_live: dict[int, weakref.ref] = {}  # id(NumPy array) -> its wrapper, while the wrapper lives
_lock = threading.RLock()  # reentrant: a wrapper's death (GC) may come inside a locked block
_SCALARS = (int, float, complex, bool, np.generic)


def _forget(key: int, ref: weakref.ref) -> None:
    with _lock:
        if _live.get(key) is ref:
            del _live[key]


def wrap(x: Any) -> Any:
    """The device array for NumPy result ``x`` (tuples and lists of them element by element):
    the same wrapper for the same NumPy array while it lives; NumPy scalars become 0-d arrays;
    anything else (a shape, a dtype) as it is."""
    t = type(x)
    if t is np.ndarray:
        ref = _live.get(id(x))
        w = ref() if ref is not None else None
        if w is not None and w._a is x:
            return w
        return ndarray._own(x)
    if isinstance(x, np.generic):
        return ndarray._own(np.asarray(x))
    if t is tuple or t is list:
        return t(wrap(i) for i in x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple (linalg.svd's result)
        return t(*(wrap(i) for i in x))
    return x


def host_refused(where: str) -> DTypeError:
    """The error for a host array handed to a device kernel (a TypeError, as CuPy raises)."""
    return DTypeError(f"{where}: got a NumPy array (host memory) where a device array is needed; "
                      f"move it with asarray() first (CuPy refuses it too)")


def unwrap(x: Any, where: str) -> Any:
    """NumPy's view of a kernel operand (tuples and lists element by element); host arrays are
    refused, scalars and other values pass."""
    t = type(x)
    if t is ndarray:
        return x._a
    if isinstance(x, np.ndarray):
        raise host_refused(where)
    if t is tuple or t is list:
        return t(unwrap(i, where) for i in x)
    return x


def unwrap_kw(kwargs: dict, where: str) -> dict:
    """:func:`unwrap` of every keyword argument (``out=`` included)."""
    return {k: unwrap(v, where) for k, v in kwargs.items()} if kwargs else kwargs


def launch(where: str, fn: Callable, args: tuple, kwargs: dict, view: bool = False) -> Any:
    """Run NumPy's ``fn`` on the operands' arrays, count one launch, wrap the result. ``view``:
    the call only makes a view when it can (reshape, transpose), which launches nothing; an answer
    from metadata alone (a shape, a dtype) launches nothing either."""
    a = unwrap(args, where)
    r = fn(*a, **unwrap_kw(kwargs, where))
    if not (view and is_view(r, a)) and not is_host_value(r):
        count("launches")
    return wrap(r)


def is_host_value(r: Any) -> bool:
    """A shape, a dtype, a flag: what NumPy answers from metadata, with no kernel (``None`` is a
    kernel that wrote in place)."""
    if r is None or isinstance(r, (np.ndarray, np.generic)):
        return False
    if isinstance(r, (tuple, list)):
        return all(is_host_value(i) for i in r)
    return True


def is_view(r: Any, args: tuple) -> bool:
    """True when ``r`` is one of the NumPy arrays in ``args`` or a view of one."""
    if type(r) is not np.ndarray:
        return False
    for a in args:
        if type(a) is np.ndarray and (r is a or (r.base is not None and
                                                 r.base is (a if a.base is None else a.base))):
            return True
    return False


def operand(x: Any) -> bool:
    """True for what an operator takes (device arrays and scalars), False for what it leaves to
    the other operand (a Tensor); host arrays are refused."""
    if type(x) is ndarray or isinstance(x, _SCALARS):
        return True
    if isinstance(x, np.ndarray):
        raise host_refused("operator")
    return False


def device_index(index: Any) -> tuple[Any, bool, bool]:
    """NumPy's form of an index, whether it is advanced (a gather), whether it holds a boolean
    mask. An Ellipsis is appended so that one element comes back as a 0-d array, not a host
    scalar. A list index is copied to the device (an upload, as CuPy does)."""
    items = index if type(index) is tuple else (index,)
    out, advanced, mask, ellipsis = [], False, False, False
    for i in items:
        if type(i) is ndarray:
            advanced = True
            mask = mask or i._a.dtype == np.bool_
            out.append(i._a)
        elif isinstance(i, np.ndarray):
            raise host_refused("ndarray index")
        elif type(i) is list:
            count("uploads")
            advanced = True
            arr = np.asarray(i)
            mask = mask or arr.dtype == np.bool_
            out.append(arr)
        else:
            ellipsis = ellipsis or i is Ellipsis
            out.append(i)
    if not ellipsis:
        out.append(Ellipsis)
    return tuple(out), advanced, mask


_MEMBER_VIEWS = frozenset({"reshape", "ravel", "squeeze", "swapaxes", "transpose", "view",
                           "astype", "diagonal"})
_MEMBER_KERNELS = frozenset({
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "clip", "conj", "copy", "cumprod",
    "cumsum", "dot", "fill", "flatten", "max", "mean", "min", "nonzero", "partition", "prod",
    "put", "repeat", "round", "sort", "std", "sum", "take", "trace", "var"})


class ndarray:  # noqa: N801 -- CuPy's name
    """A device array: NumPy memory behind CuPy's rules (no implicit host conversion)."""

    __slots__ = ("_a", "_base", "__weakref__")
    __array_priority__ = 100.0

    def __init__(self, shape: Any, dtype: Any = float) -> None:
        self._a = np.empty(shape, dtype)
        self._base = None
        with _lock:
            _live[id(self._a)] = weakref.ref(self, lambda r, k=id(self._a): _forget(k, r))
        default_pool.add(self, self._a.nbytes)
        count("launches")

    @classmethod
    def _own(cls, a: np.ndarray) -> ndarray:
        """Wrap NumPy array ``a`` (not yet wrapped); a view keeps its base's wrapper alive."""
        w = object.__new__(cls)
        w._a = a
        w._base = wrap(a.base) if type(a.base) is np.ndarray else None
        ref = weakref.ref(w, lambda r, k=id(a): _forget(k, r))
        with _lock:
            _live[id(a)] = ref
        if w._base is None:
            default_pool.add(w, a.nbytes)
        return w

    # ---- what needs no kernel
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    base = property(lambda self: self._base)
    T = property(lambda self: launch("ndarray.T", np.transpose, (self,), {}, view=True))
    mT = property(  # noqa: N815 -- NumPy's and CuPy's name
        lambda self: launch("ndarray.mT", np.matrix_transpose, (self,), {}, view=True))
    real = property(lambda self: launch("ndarray.real", np.real, (self,), {}, view=True))
    imag = property(lambda self: launch("ndarray.imag", np.imag, (self,), {}, view=True))

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        for i in range(len(self._a)):
            yield self[i]

    # ---- refusals and syncs
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__":
            return NotImplemented
        return launch(ufunc.__name__, ufunc, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        return launch(func.__name__, func, args, kwargs)

    def _sync(self) -> np.ndarray:
        count("syncs")
        return self._a

    def get(self, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> np.ndarray:
        """A NumPy copy of the values (a device-to-host sync)."""
        a = self._sync()
        if out is not None:
            out[...] = a
            return out
        return np.array(a, order=order)

    def item(self, *args: Any) -> Any:
        """One element as a Python scalar (a sync)."""
        return self._sync().item(*args)

    def tolist(self) -> Any:
        """The values as nested Python lists (a sync)."""
        return self._sync().tolist()

    def __float__(self) -> float:
        return float(self._sync())

    def __int__(self) -> int:
        return int(self._sync())

    def __index__(self) -> int:
        return self._sync().__index__()

    def __bool__(self) -> bool:
        return bool(self._sync())

    def __complex__(self) -> complex:
        return complex(self._sync())

    def __repr__(self) -> str:
        return repr(self._sync())

    def __str__(self) -> str:
        return str(self._sync())

    def __format__(self, spec: str) -> str:
        return format(self._sync(), spec)

    def __reduce__(self) -> Any:
        raise TypeError("strict.ndarray cannot be pickled: move it to the host with .get()")

    def __copy__(self) -> ndarray:
        return launch("copy", np.copy, (self,), {})

    def __deepcopy__(self, memo: dict) -> ndarray:
        return launch("copy", np.copy, (self,), {})

    __hash__ = None  # type: ignore[assignment]

    # ---- methods: NumPy's, as kernels (views where NumPy makes a view)
    def __getattr__(self, name: str) -> Any:
        if name in _MEMBER_KERNELS or name in _MEMBER_VIEWS:
            view = name in _MEMBER_VIEWS
            return lambda *args, **kwargs: _member(self, name, args, kwargs, view)
        raise AttributeError(f"strict.ndarray has no attribute {name!r} (CuPy's ndarray may "
                             f"not either; NumPy-only attributes are refused here)")

    # ---- indexing
    def __getitem__(self, index: Any) -> ndarray:
        idx, advanced, mask = device_index(index)
        r = self._a[idx]
        if mask:
            count("syncs")  # CuPy must learn how many elements a boolean mask selects
        if advanced:
            count("launches")
        return wrap(r)

    def __setitem__(self, index: Any, value: Any) -> None:
        idx, _, _ = device_index(index)
        self._a[idx] = unwrap(value, "ndarray.__setitem__")
        count("launches")


def _member(self: ndarray, name: str, args: tuple, kwargs: dict, view: bool) -> Any:
    a = self._a
    where = f"ndarray.{name}"
    r = getattr(a, name)(*unwrap(args, where), **unwrap_kw(kwargs, where))
    if name == "nonzero":
        count("syncs")  # the output size depends on the values
    if not (view and is_view(r, (a,))) and not is_host_value(r):
        count("launches")
    return wrap(r)


def _binary(ufunc: np.ufunc) -> tuple[Callable, Callable, Callable]:
    name = ufunc.__name__

    def op(self: ndarray, other: Any) -> Any:
        if not operand(other):
            return NotImplemented
        return launch(name, ufunc, (self, other), {})

    def rop(self: ndarray, other: Any) -> Any:
        if not operand(other):
            return NotImplemented
        return launch(name, ufunc, (other, self), {})

    def iop(self: ndarray, other: Any) -> Any:
        if not operand(other):
            return NotImplemented
        return launch(name, ufunc, (self, other), {"out": self})

    return op, rop, iop


for _name, _uf in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                   ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                   ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                   ("lshift", np.left_shift), ("rshift", np.right_shift)):
    _op, _rop, _iop = _binary(_uf)
    setattr(ndarray, f"__{_name}__", _op)
    setattr(ndarray, f"__r{_name}__", _rop)
    setattr(ndarray, f"__i{_name}__", _iop)
for _name, _uf in (("lt", np.less), ("le", np.less_equal), ("eq", np.equal),
                   ("ne", np.not_equal), ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(ndarray, f"__{_name}__", _binary(_uf)[0])
for _name, _uf in (("neg", np.negative), ("pos", np.positive), ("abs", np.absolute),
                   ("invert", np.invert)):
    setattr(ndarray, f"__{_name}__", lambda self, _uf=_uf: launch(_uf.__name__, _uf, (self,), {}))
ndarray.__module__ = "minilora.strict"  # CuPy's arrays say cupy; backend tells device arrays so

__all__ = ["ndarray", "wrap", "unwrap", "unwrap_kw", "launch", "host_refused", "device_index",
           "is_host_value", "is_view", "operand"]
