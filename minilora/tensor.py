"""Reverse-mode automatic differentiation over NumPy/CuPy arrays.

The whole idea in four lines:

* a :class:`Tensor` holds an array ``data`` and, once ``backward`` has run, its gradient ``grad``;
* every operation makes an output tensor that remembers its inputs (``_parents``) and a small
  closure ``_backward(g) -> (grad for each parent)`` that applies the chain rule locally;
* ``loss.backward()`` sorts the graph topologically (``loss.topological_order()``, iteratively:
  deep graphs are fine) and walks it in reverse, handing each node the sum of the gradients
  flowing into it;
* leaves (parameters, inputs) accumulate what reaches them into ``.grad``, each as soon as the
  last op that uses it has passed its gradient back.

Nothing is recorded inside ``with no_grad():`` or when no input requires a gradient, and a closure
only computes the gradients of inputs that ask for one, so frozen weights cost no gradient work.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import backend as B
from . import fast, flops
from .errors import (
    DTypeError,
    GraphError,
    InvalidArgumentError,
    ShapeError,
    check_axis,
    check_bool,
    is_int,
    shape_error,
)

_state = threading.local()


def is_grad_enabled() -> bool:
    """True unless inside ``no_grad()`` (per thread)."""
    return getattr(_state, "enabled", True)


@contextmanager
def no_grad() -> Iterator[None]:
    """Context manager: operations inside record no graph and keep no intermediate arrays."""
    previous = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


def release(*tensors: Tensor) -> None:
    """Free the values of intermediate tensors that no backward reads, keeping their place in
    the graph: the model code calls it on its own locals once their last consumer has run.

    The graph links tensors, so every intermediate's values live until the backward walk passes
    it, needed or not. Each op's closure keeps the arrays its backward needs (a linear layer's
    input for its weight gradient, GELU's derivative); an op whose backward reads only its
    input's shape (a residual add) or nothing of it (GELU's) leaves the input's values dead
    weight. ``release`` swaps such a tensor's ``data`` for a zero-stride array of the same shape
    and dtype (no memory), so the walk still finds its shape, and the memory goes back once no
    closure holds the array. Leaves (parameters, inputs) are never touched; nothing happens under
    ``no_grad`` (no graph keeps anything there) or with the fast forms off (the reference forms
    keep every value, as the equations do). It changes no number, only the peak memory.
    """
    if not (fast.enabled() and is_grad_enabled()):
        return
    for t in tensors:
        if t._op is not None and t.data.ndim and t.data.strides != (0,) * t.data.ndim:
            key = (B.get_backend(), t.data.dtype.str)
            zero = _ZEROS.get(key)
            if zero is None:  # one per backend and dtype: releasing launches nothing
                zero = _ZEROS[key] = B.xp.zeros((), dtype=t.data.dtype)
            t.data = B.xp.broadcast_to(zero, t.data.shape)


_ZEROS: dict = {}  # (backend, dtype) -> the 0-d zero that released tensors view


@contextmanager
def leaf_grads_into(store: dict) -> Iterator[dict]:
    """Context manager: inside the block, ``backward`` in this thread does not touch ``leaf.grad``
    but puts each leaf's gradient into ``store[id(leaf)] = (leaf, grad, owned)`` (adding repeats
    up); ``owned`` says that nothing else holds ``grad``, so it may be added into in place.

    :mod:`minilora.step` gives each shard of a batch its own store, so shards can run side by
    side and their gradients be added in a fixed order afterwards.
    """
    previous = getattr(_state, "sink", None)
    _state.sink = store
    try:
        yield store
    finally:
        _state.sink = previous


def unbroadcast(grad: Any, shape: tuple) -> Any:
    """Sum ``grad`` down to ``shape``: undo NumPy broadcasting in the backward pass.

    Broadcasting prepends axes and stretches size-1 axes; the gradient of a stretched input is the
    sum over the axes it was stretched along.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _as_float_array(data: Any, dtype: Any) -> Any:
    if dtype is not None:
        try:
            np.dtype(dtype)
        except TypeError:
            raise DTypeError(f"Tensor: dtype {dtype!r} is not a NumPy dtype (float32, float64, "
                             f"...)") from None
    try:
        arr = B.asarray(data, dtype=dtype)
    except ValueError as exc:  # NumPy's messages name no argument
        if "inhomogeneous" in str(exc) or "sequence" in str(exc):  # ragged lists
            raise ShapeError(f"Tensor: data must be rectangular (every row of one length), got "
                             f"{str(data)[:60]}: {exc}") from None
        raise DTypeError(f"Tensor: data {str(data)[:60]} cannot be made an array of dtype "
                         f"{dtype}: {exc}") from None
    if arr.dtype.kind not in "biuf":  # strings, objects, complex: no op here is defined on them
        raise DTypeError(f"Tensor: data must hold numbers (bool, integer or float), got dtype "
                         f"{arr.dtype}")
    typed = B.is_array(data) or isinstance(data, np.generic)  # an explicit float64 stays float64
    if dtype is None and arr.dtype == np.float64 and not typed:
        arr = arr.astype(B.default_dtype())  # Python floats become the default float dtype
    return arr


# ------------------------------------------------------------- the backward walk's helpers
#
# A gradient array may be written into in place (a sum formed in place, or kept by a leaf as its
# .grad, to be added into later) only if nothing else holds it. Three things hold arrays the walk
# did not make: the caller (the seed), a second parent (add hands one array to both of its
# inputs) and a view or its base (reshape, broadcast_to and slicing return views). ``shared``
# maps the ids of such arrays to the arrays, which it holds on to: an id is only unique while its
# object lives, and a freed array's id handed to a new one would make the new one look shared;
# everything else the walk received from a closure or formed as a sum itself, and is its own.

def _owned(arr: Any, shared: dict) -> bool:
    """True if the walk may write into ``arr``: not in ``shared``, not a view of another array,
    writeable."""
    # CuPy's flags have no "writeable" in some versions: its arrays always are
    return id(arr) not in shared and arr.base is None and getattr(arr.flags, "writeable", True)


def _note_aliases(parents: Sequence[Tensor], parent_grads: Sequence[Any], shared: dict) -> None:
    """Add to ``shared`` the gradients one closure returned that are held twice: an array handed
    to a second parent, and the base of each view (writing into the base would change the view).
    Only the gradients of parents that take one count, as only those enter the walk."""
    seen: set = set()
    for parent, pg in zip(parents, parent_grads):
        if pg is None or not parent.requires_grad:
            continue
        if id(pg) in seen:
            shared[id(pg)] = pg
        if pg.base is not None:
            shared[id(pg.base)] = pg.base
        seen.add(id(pg))


def _accumulate(grads: dict, parent: Tensor, pg: Any, shared: dict) -> None:
    """``grads[parent] += pg``: the first gradient to reach ``parent`` is kept as it is; a
    later one is added in place into the sum when the walk owns it (same shape and dtype), else
    into a new array."""
    previous = grads.get(id(parent))
    if previous is None:
        grads[id(parent)] = pg
    elif _owned(previous, shared) and previous.shape == pg.shape and previous.dtype == pg.dtype:
        previous += pg  # a sum this walk made (or the sole owner): add in place
    else:
        grads[id(parent)] = previous + pg


def _deliver(leaf: Tensor, g: Any, shared: dict, sink: dict | None) -> None:
    """Hand the gradient ``g`` that reached ``leaf`` (a node without a closure) to where leaves
    keep theirs: the per-shard store ``sink`` inside ``leaf_grads_into``, else ``leaf.grad``
    (added to what is there; a first gradient the walk does not own, or of another dtype, is
    copied, so ``leaf.grad`` is always the leaf's own writeable array)."""
    if leaf._op is not None:  # an op's output whose closure an earlier backward released
        raise GraphError("backward: the graph was freed by an earlier backward; pass "
                         "retain_graph=True to walk it twice")
    if sink is not None:
        _store(sink, leaf, g, shared)
    elif leaf.grad is not None:
        leaf.grad = leaf.grad + g
    elif not _owned(g, shared) or g.dtype != leaf.data.dtype:
        leaf.grad = g.astype(leaf.data.dtype, copy=True)
    else:
        leaf.grad = g


def _store(sink: dict, leaf: Tensor, g: Any, shared: dict) -> None:
    """``sink[id(leaf)] = (leaf, sum of the gradients, owned)``: the first gradient as it is,
    with whether the walk owns it (then whoever adds the stores up may add into it in place);
    a repeat is added into the held sum when the walk owns it (no new array: a training step's
    micro-batches add their gradients into one store), else into a new array, which is owned."""
    held = sink.get(id(leaf))
    if held is None:
        sink[id(leaf)] = (leaf, g, _owned(g, shared))
    elif held[2] and held[1].dtype == B.xp.result_type(held[1], g) and \
            held[1].shape == g.shape and id(held[1]) not in shared:
        total = held[1]
        total += g  # the same sum, in place
    else:
        sink[id(leaf)] = (leaf, held[1] + g, True)


def _leaf_arrivals(order: list) -> dict:
    """``{id(leaf): number of edges into it}`` over the nodes of ``order`` (a parent named twice by
    one node counts twice): the gradients ``backward`` waits for before it hands a leaf its sum.
    A node that no gradient reaches runs no closure, so its edges never arrive; a leaf they feed
    gets what did arrive when the walk reaches the leaf itself."""
    arrivals: dict = {}
    for node in order:
        for parent in node._parents:
            if parent.requires_grad and parent._backward is None:
                arrivals[id(parent)] = arrivals.get(id(parent), 0) + 1
    return arrivals


def _hand_on(parents: Sequence[Tensor], parent_grads: Sequence[Any], grads: dict,
             arrivals: dict, shared: dict, sink: dict | None) -> None:
    """Add what one closure returned into its parents' sums; a leaf whose last edge this was
    (``arrivals``, counting down) gets its complete sum now (:func:`_deliver`)."""
    for parent, pg in zip(parents, parent_grads):
        if not parent.requires_grad:
            continue
        if pg is not None:
            _accumulate(grads, parent, pg, shared)
        left = arrivals.get(id(parent))
        if left is None:
            continue  # not a leaf
        if left > 1:
            arrivals[id(parent)] = left - 1
            continue
        del arrivals[id(parent)]
        total = grads.pop(id(parent), None)
        if total is not None:  # None: no edge into it brought a gradient
            _deliver(parent, total, shared, sink)


def _check_not_empty(a: Tensor, axis: int | tuple | None, who: str) -> None:
    """Refuse (ShapeError) a maximum over no elements, which has no value (NumPy's error names
    a "zero-size array to reduction operation maximum")."""
    axes = range(a.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
    if a.size == 0 and any(a.shape[ax] == 0 for ax in axes):
        along = "" if axis is None else f" along axis {axis}"
        raise ShapeError(f"{who}: a tensor of shape {a.shape} has no elements{along} to take "
                         f"the maximum of")


class Tensor:
    """An array with an optional gradient and the recipe to backpropagate through it.

    ``Tensor(data, requires_grad=False, dtype=None)``: ``data`` may be a NumPy/CuPy array (its dtype
    is kept), a nested list or a number (floats become the default float dtype, float32).
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_op", "__weakref__")
    __array_ufunc__ = None  # make `ndarray * Tensor` defer to Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        self.data = _as_float_array(data, dtype)
        check_bool(requires_grad, "Tensor: requires_grad")  # "no" would be True
        if requires_grad and self.data.dtype.kind != "f":
            raise DTypeError(f"Tensor: requires_grad=True needs a float array, got dtype "
                             f"{self.data.dtype}")
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)
        self._parents: tuple = ()
        self._backward: Callable | None = None
        self._op: str | None = None

    # ------------------------------------------------------------------------- graph plumbing

    @staticmethod
    def _make(data: Any, parents: tuple, backward: Callable, op: str) -> Tensor:
        """Wrap an op's output; record the graph only when it is needed."""
        out = Tensor.__new__(Tensor)
        out.data = data
        out.grad = None
        out._op = op
        needs = is_grad_enabled() and any(p.requires_grad for p in parents)
        out.requires_grad = needs
        out._parents = parents if needs else ()
        out._backward = backward if needs else None
        return out

    def topological_order(self) -> list[Tensor]:
        """The nodes of this tensor's graph that need a gradient, each once and each after all of
        its parents, this tensor last: the order of the forward pass, which ``backward`` walks in
        reverse. An iterative depth-first search, so a graph deeper than Python's recursion limit
        is fine."""
        order: list = []
        visited: set = set()
        stack: list = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:  # all of its parents are in the order: now it may follow them
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for parent in node._parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
        return order

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Backpropagate from this tensor; leaves accumulate their gradient into ``.grad``.

        ``grad`` (the seed dL/dself, of this tensor's shape) defaults to 1 for a single-element
        tensor. Each node, from the output back to the leaves, hands the sum of the gradients that
        reached it to its closure, which returns one gradient per parent (the chain rule); a leaf
        keeps what reaches it. The graph's saved arrays are released as the walk passes them
        unless ``retain_graph=True``.
        """
        seed = self._seed(grad)
        grads = {id(self): seed}  # node -> the sum of the gradients that reached it so far
        shared = {id(seed): seed}  # arrays the walk must not write into (the seed: the caller's)
        sink = getattr(_state, "sink", None)
        order = self.topological_order()
        # a leaf is handed its gradient once the last closure that feeds it has run, not when
        # the walk reaches it: the depth-first order puts a weight before everything its layer's
        # input depends on, so waiting would hold every weight's gradient to the walk's end (a
        # second copy of the model's gradients while micro-batches add into their store)
        arrivals = _leaf_arrivals(order)
        # popped, not iterated: once the walk has passed a node and its children have dropped
        # their closures, nothing of the walk holds it, so its values go back right then
        # instead of at the walk's end (the forward pass's outputs would otherwise all live on
        # beside the gradients)
        while order:
            node = order.pop()
            g = grads.pop(id(node), None)
            if g is None:  # no gradient reached it: every closure on the way gave None
                continue
            # a leaf still here got its gradient other than through a last edge (the seed
            # itself, or an edge from a node no gradient reached); _deliver refuses a freed graph
            if node._backward is None:
                _deliver(node, g, shared, sink)
                continue
            closure, parents = node._backward, node._parents
            if not retain_graph:
                # let go of the node before its closure runs: its forward output (the logits,
                # a residual sum) is needed by no closure that has not saved it itself, and
                # unless the caller holds the node it goes back now instead of after this step
                node._backward, node._parents = None, ()
                del node
            parent_grads = closure(g)
            del closure, g
            _note_aliases(parents, parent_grads, shared)
            _hand_on(parents, parent_grads, grads, arrivals, shared, sink)
            del parents, parent_grads  # (a loop here would keep its last parent bound)

    def _seed(self, grad: Any) -> Any:
        """The gradient ``backward`` starts from: ``grad`` as an array of this tensor's shape and
        dtype, or ones for a single-element tensor when it is None."""
        if not self.requires_grad:
            raise GraphError("backward: this tensor does not require grad (no input had "
                             "requires_grad=True, or it was computed under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise GraphError(f"backward: a gradient can only be implied for a single-element "
                                 f"tensor; this one has shape {self.shape}, pass grad=")
            return B.xp.ones_like(self.data)
        grad = B.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise shape_error("backward", self.shape, grad.shape,
                              detail="grad must have the tensor's shape")
        return grad

    # ------------------------------------------------------------------------------ basics

    @property
    def shape(self) -> tuple:
        """The array's shape."""
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return self.data.ndim

    @property
    def dtype(self) -> Any:
        """The array's dtype."""
        return self.data.dtype

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(self.data.size)

    def __len__(self) -> int:
        if self.data.ndim == 0:  # as NumPy says of a 0-d array (it was an IndexError)
            raise DTypeError("len() of a 0-d tensor: it has no first axis")
        return self.data.shape[0]

    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (copied to the host on CuPy); shares memory on NumPy."""
        return B.to_numpy(self.data)

    def item(self) -> float:
        """The single value as a Python number."""
        if self.data.size != 1:
            raise ShapeError(f"item: needs a single-element tensor, got shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self) -> Tensor:
        """A tensor sharing this one's data but cut from the graph (no grad flows through)."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        """Set ``requires_grad`` in place and return self."""
        check_bool(flag, "requires_grad_: flag")
        if flag and self.data.dtype.kind != "f":
            raise DTypeError(f"requires_grad_: needs a float tensor, got dtype {self.data.dtype}")
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self) -> None:
        """Forget the accumulated gradient."""
        self.grad = None

    def __repr__(self) -> str:
        grad = f", grad_fn={self._op}" if self._backward is not None else ""
        req = ", requires_grad=True" if self.requires_grad and not grad else ""
        body = np.array2string(self.numpy(), precision=4, threshold=20, edgeitems=2,
                               separator=", ", prefix="Tensor(")
        return f"Tensor({body}, dtype={self.dtype}{req}{grad})"

    # ------------------------------------------------------------------------- elementwise

    def _other(self, other: Any) -> Tensor:
        if isinstance(other, Tensor):
            return other
        if other is None or isinstance(other, (str, bytes, dict, set)):
            # asarray(None, float32) is NaN and asarray("a") a string array: neither a number
            raise DTypeError(f"Tensor: cannot combine a tensor with {type(other).__name__} "
                             f"{other!r:.40}; use a number, an array or a Tensor")
        dtype = self.data.dtype if self.data.dtype.kind == "f" else None
        return Tensor(B.xp.asarray(other, dtype=dtype))

    def _binary(self, other: Any, fn: Callable, op: str) -> Any:
        try:
            return fn(self.data, other.data)
        except ValueError as exc:
            raise shape_error(op, self.shape, other.shape, detail=str(exc)) from None

    def __add__(self, other: Any) -> Tensor:
        a, b = self, self._other(other)
        out = a._binary(b, lambda x, y: x + y, "add")

        def backward(g: Any):
            return (unbroadcast(g, a.shape) if a.requires_grad else None,
                    unbroadcast(g, b.shape) if b.requires_grad else None)
        return Tensor._make(out, (a, b), backward, "add")

    def __sub__(self, other: Any) -> Tensor:
        a, b = self, self._other(other)
        out = a._binary(b, lambda x, y: x - y, "sub")

        def backward(g: Any):
            return (unbroadcast(g, a.shape) if a.requires_grad else None,
                    unbroadcast(-g, b.shape) if b.requires_grad else None)
        return Tensor._make(out, (a, b), backward, "sub")

    def __mul__(self, other: Any) -> Tensor:
        a, b = self, self._other(other)
        out = a._binary(b, lambda x, y: x * y, "mul")

        def backward(g: Any):
            return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                    unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
        return Tensor._make(out, (a, b), backward, "mul")

    def __truediv__(self, other: Any) -> Tensor:
        a, b = self, self._other(other)
        out = a._binary(b, lambda x, y: x / y, "div")

        def backward(g: Any):
            ga = g / b.data
            return (unbroadcast(ga, a.shape) if a.requires_grad else None,
                    unbroadcast(-ga * out, b.shape) if b.requires_grad else None)
        return Tensor._make(out, (a, b), backward, "div")

    def __neg__(self) -> Tensor:
        a = self
        return Tensor._make(-a.data, (a,), lambda g: (-g,), "neg")

    def __pow__(self, exponent: Any) -> Tensor:
        a = self
        if isinstance(exponent, Tensor):  # x ** y with y a tensor: d/dy = x^y log x
            b = exponent
            out = a._binary(b, lambda x, y: x ** y, "pow")

            def backward(g: Any):
                ga = g * b.data * a.data ** (b.data - 1) if a.requires_grad else None
                gb = g * out * B.xp.log(a.data) if b.requires_grad else None
                return (unbroadcast(ga, a.shape) if ga is not None else None,
                        unbroadcast(gb, b.shape) if gb is not None else None)
            return Tensor._make(out, (a, b), backward, "pow")
        p = float(exponent)
        out = a.data ** p
        if p == 0.0:  # x^0 = 1 everywhere: d/dx is 0, where 0 * x^-1 would be NaN at x = 0
            return Tensor._make(out, (a,), lambda g: (B.xp.zeros_like(g),), "pow")
        return Tensor._make(out, (a,), lambda g: (g * (p * a.data ** (p - 1)),), "pow")

    def __radd__(self, other: Any) -> Tensor:
        return self + other

    def __rsub__(self, other: Any) -> Tensor:
        return self._other(other) - self

    def __rmul__(self, other: Any) -> Tensor:
        return self * other

    def __rtruediv__(self, other: Any) -> Tensor:
        return self._other(other) / self

    def __rpow__(self, other: Any) -> Tensor:
        return self._other(other) ** self

    def exp(self) -> Tensor:
        """e ** x elementwise; d/dx = e ** x."""
        a = self
        out = B.xp.exp(a.data)
        return Tensor._make(out, (a,), lambda g: (g * out,), "exp")

    def log(self) -> Tensor:
        """Natural log elementwise; d/dx = 1 / x."""
        a = self
        return Tensor._make(B.xp.log(a.data), (a,), lambda g: (g / a.data,), "log")

    def sqrt(self) -> Tensor:
        """Square root elementwise; d/dx = 1 / (2 sqrt x)."""
        a = self
        out = B.xp.sqrt(a.data)
        return Tensor._make(out, (a,), lambda g: (g / (2 * out),), "sqrt")

    def tanh(self) -> Tensor:
        """tanh elementwise; d/dx = 1 - tanh(x)^2."""
        a = self
        out = B.xp.tanh(a.data)
        return Tensor._make(out, (a,), lambda g: (g * (1 - out * out),), "tanh")

    def relu(self) -> Tensor:
        """max(x, 0) elementwise; the gradient at 0 is taken as 0."""
        a = self
        mask = a.data > 0
        return Tensor._make(a.data * mask, (a,), lambda g: (g * mask,), "relu")

    def astype(self, dtype: Any) -> Tensor:
        """Cast to ``dtype``; the gradient is cast back to this tensor's dtype."""
        a = self
        src = a.data.dtype
        return Tensor._make(a.data.astype(dtype), (a,), lambda g: (g.astype(src),), "astype")

    # ----------------------------------------------------------------------------- matmul

    def __matmul__(self, other: Any) -> Tensor:
        """Matrix product with NumPy's rules: (..., n, k) @ (..., k, m) -> (..., n, m)."""
        a, b = self, self._other(other)
        if a.ndim == 0 or b.ndim == 0:
            raise shape_error("matmul", a.shape, b.shape, detail="operands must be at least 1-D")
        if a.ndim == 1 and b.ndim == 1:  # inner product of two vectors: a scalar
            if a.shape != b.shape:
                raise shape_error("matmul", a.shape, b.shape,
                                  detail=f"vector lengths {a.shape[0]} != {b.shape[0]}")
            return (a * b).sum()
        if a.ndim == 1:  # a vector on the left is a row, removed again afterwards
            return (a.reshape(1, -1) @ b).reshape(*(b.shape[:-2] + b.shape[-1:]))
        if b.ndim == 1:
            return (a @ b.reshape(-1, 1)).reshape(*a.shape[:-1])
        if a.shape[-1] != b.shape[-2]:
            raise shape_error("matmul", a.shape, b.shape,
                              detail=f"inner dimensions {a.shape[-1]} != {b.shape[-2]}")
        out = a._binary(b, lambda x, y: x @ y, "matmul")
        n_out = math.prod(out.shape[:-2])  # products in the batch (broadcast already applied)
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        flops.add_matmul("matmul", m, k, n, n_out)

        def backward(g: Any):
            ga = gb = None
            flops.add_matmul("matmul", m, n, k, n_out * (bool(a.requires_grad)
                                                           + bool(b.requires_grad)))
            if a.requires_grad:
                if a.ndim > 2 and b.ndim == 2:  # (..., n, k) @ (k, m): one GEMM, not a batch
                    ga = (g.reshape(-1, g.shape[-1]) @ b.data.T).reshape(a.shape)
                else:
                    ga = unbroadcast(g @ b.data.swapaxes(-1, -2), a.shape)
            if b.requires_grad:
                if b.ndim == 2 and a.ndim > 2:  # fold the batch into the rows: x^T g summed
                    gb = a.data.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
                else:
                    gb = unbroadcast(a.data.swapaxes(-1, -2) @ g, b.shape)
            return ga, gb
        return Tensor._make(out, (a, b), backward, "matmul")

    def __rmatmul__(self, other: Any) -> Tensor:
        return self._other(other) @ self

    # ------------------------------------------------------------------------- reductions

    def _expand(self, g: Any, axis: Any, keepdims: bool) -> Any:
        """Reshape a reduced gradient so it broadcasts back over the reduced axes."""
        if axis is None:
            return g.reshape((1,) * self.ndim)
        if not keepdims:
            axes = (axis,) if isinstance(axis, int) else axis
            g = B.xp.expand_dims(g, tuple(ax % self.ndim for ax in axes))
        return g

    def _count(self, axis: Any) -> int:
        if axis is None:
            return self.size
        axes = (axis,) if isinstance(axis, int) else axis
        return int(np.prod([self.shape[ax] for ax in axes]))

    def sum(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (all axes when None)."""
        a = self
        axis = check_axis(axis, a.shape, "sum")
        check_bool(keepdims, "sum: keepdims")
        out = a.data.sum(axis=axis, keepdims=keepdims)
        return Tensor._make(
            out, (a,), lambda g: (B.xp.broadcast_to(a._expand(g, axis, keepdims), a.shape),), "sum")

    def mean(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Mean over ``axis``; the gradient spreads g / count evenly."""
        a = self
        axis = check_axis(axis, a.shape, "mean")
        check_bool(keepdims, "mean: keepdims")
        n = a._count(axis)
        out = a.data.mean(axis=axis, keepdims=keepdims)
        return Tensor._make(
            out, (a,),
            lambda g: (B.xp.broadcast_to(a._expand(g, axis, keepdims) / n, a.shape),), "mean")

    def max(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Maximum over ``axis``; tied maxima share the gradient equally (like torch.amax)."""
        a = self
        axis = check_axis(axis, a.shape, "max")
        check_bool(keepdims, "max: keepdims")
        _check_not_empty(a, axis, "max")
        out = a.data.max(axis=axis, keepdims=keepdims)

        def backward(g: Any):
            # cast before dividing: bool / int64 counts would make float64 and upcast float32
            mask = (a.data == a._expand(out, axis, keepdims)).astype(a.data.dtype)
            share = mask / mask.sum(axis=axis, keepdims=True)
            return (share * a._expand(g, axis, keepdims),)
        return Tensor._make(out, (a,), backward, "max")

    def var(self, axis: int | tuple | None = None, keepdims: bool = False,
            ddof: int = 0) -> Tensor:
        """Variance over ``axis``: sum((x - mean)^2) / (count - ddof); ddof=0 as LayerNorm uses."""
        a = self
        axis = check_axis(axis, a.shape, "var")
        check_bool(keepdims, "var: keepdims")
        n = a._count(axis)
        if n == 0:
            raise ShapeError(f"var: a tensor of shape {a.shape} has no elements along axis "
                             f"{axis!r} to take the variance of")
        # ddof >= n divides by zero or by a negative count: inf, or a variance below 0
        if not is_int(ddof) or not 0 <= ddof < n:
            raise InvalidArgumentError(f"var: ddof must be an int from 0 to {n - 1} (the count "
                                       f"over axis {axis!r} of shape {a.shape} is {n}), got "
                                       f"{ddof!r}")
        centered = a.data - a.data.mean(axis=axis, keepdims=True)
        out = (centered * centered).sum(axis=axis, keepdims=keepdims) / (n - ddof)
        return Tensor._make(
            out, (a,), lambda g: (a._expand(g, axis, keepdims) * centered * (2.0 / (n - ddof)),),
            "var")

    def argmax(self, axis: int | None = None) -> Tensor:
        """Indices of the maxima (an integer tensor outside the graph)."""
        axis = check_axis(axis, self.shape, "argmax", many=False)
        _check_not_empty(self, axis, "argmax")
        return Tensor(self.data.argmax(axis=axis))

    # ------------------------------------------------------------------------------ shapes

    def reshape(self, *shape: Any) -> Tensor:
        """Same data, new shape (one entry may be -1); also accepts a single tuple."""
        a = self
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, np.ndarray)):
            shape = tuple(shape[0].tolist() if isinstance(shape[0], np.ndarray) else shape[0])
        if not all(is_int(d) for d in shape):
            raise InvalidArgumentError(f"reshape: the shape must be ints (one may be -1), got "
                                       f"{shape!r}")
        try:
            out = a.data.reshape(shape)
        except ValueError:
            raise shape_error("reshape", a.shape, shape,
                              detail=f"cannot reshape {a.size} elements") from None
        return Tensor._make(out, (a,), lambda g: (g.reshape(a.shape),), "reshape")

    view = reshape

    def permute(self, *dims: int) -> Tensor:
        """Reorder the axes: ``out.shape[i] == self.shape[dims[i]]``."""
        a = self
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if sorted(d % max(a.ndim, 1) for d in dims) != list(range(a.ndim)):
            raise InvalidArgumentError(f"permute: dims {dims} are not a permutation of the "
                                       f"{a.ndim} axes of shape {a.shape}")
        inverse = tuple(np.argsort([d % a.ndim for d in dims]))
        return Tensor._make(a.data.transpose(dims), (a,), lambda g: (g.transpose(inverse),),
                            "permute")

    def transpose(self, dim0: int = -2, dim1: int = -1) -> Tensor:
        """Swap two axes (PyTorch's meaning of transpose)."""
        a = self
        dim0 = check_axis(dim0, a.shape, "transpose: dim0", many=False)
        dim1 = check_axis(dim1, a.shape, "transpose: dim1", many=False)
        return Tensor._make(a.data.swapaxes(dim0, dim1), (a,),
                            lambda g: (g.swapaxes(dim0, dim1),), "transpose")

    @property
    def T(self) -> Tensor:  # noqa: N802 (the name NumPy and PyTorch use)
        """All axes reversed (the matrix transpose for 2-D)."""
        return self.permute(*reversed(range(self.ndim)))

    def __getitem__(self, index: Any) -> Tensor:
        """Indexing as NumPy: slices are views; integer arrays gather, and their backward adds up
        the gradients of repeated indices (scatter-add)."""
        a = self
        index = _unwrap_index(index)
        out = a.data[index]
        advanced = _is_advanced(index)

        def backward(g: Any):
            full = B.xp.zeros_like(a.data)
            if advanced:
                B.scatter_add(full, index, g)
            else:
                full[index] = g
            return (full,)
        return Tensor._make(out, (a,), backward, "getitem")

    def masked_fill(self, mask: Any, value: float) -> Tensor:
        """``value`` where ``mask`` is true, self elsewhere; no gradient flows to filled places."""
        return where(mask, value, self)

    def split(self, split_size: int | Sequence[int], axis: int = 0) -> list:
        """Split into pieces of ``split_size`` (an int) or of the listed sizes, along ``axis``."""
        return split(self, split_size, axis)


def _unwrap_index(index: Any) -> Any:
    if isinstance(index, tuple):
        return tuple(_unwrap_index_item(i) for i in index)
    return _unwrap_index_item(index)


def _unwrap_index_item(item: Any) -> Any:
    if isinstance(item, Tensor):
        return item.data
    if isinstance(item, (list, np.ndarray)):  # host index arrays move to the device (CuPy)
        return B.asarray(item)
    return item


def _is_advanced(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (list, np.ndarray)) or B.is_array(i) for i in items)


# ------------------------------------------------------------------------ multi-tensor ops

def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Shorthand for ``Tensor(data, requires_grad, dtype)``."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis; the gradient is cut back into the pieces."""
    ts = tuple(_as_tensor(t) for t in tensors)
    if not ts:
        raise InvalidArgumentError("concatenate: needs at least one tensor, got none")
    axis = check_axis(axis, ts[0].shape, "concatenate", many=False)
    try:
        out = B.xp.concatenate([t.data for t in ts], axis=axis)
    except ValueError as exc:
        raise shape_error("concatenate", *(t.shape for t in ts), detail=str(exc)) from None
    cuts = np.cumsum([t.shape[axis] for t in ts])[:-1].tolist()
    return Tensor._make(out, ts, lambda g: tuple(B.xp.split(g, cuts, axis=axis)), "concatenate")


cat = concatenate


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join equally shaped tensors along a new axis."""
    ts = tuple(_as_tensor(t) for t in tensors)
    if not ts:
        raise InvalidArgumentError("stack: needs at least one tensor, got none")
    places = ts[0].ndim + 1  # where the new axis may go
    if not is_int(axis) or not -places <= axis < places:
        raise ShapeError(f"stack: axis {axis!r} is not a place for a new axis beside the axes of "
                         f"shape {ts[0].shape} (ints from {-places} to {places - 1})")
    axis = int(axis) % places
    try:
        out = B.xp.stack([t.data for t in ts], axis=axis)
    except ValueError as exc:
        raise shape_error("stack", *(t.shape for t in ts), detail=str(exc)) from None
    return Tensor._make(out, ts, lambda g: tuple(B.xp.moveaxis(g, axis, 0)), "stack")


def split(t: Tensor, split_size: int | Sequence[int], axis: int = 0) -> list:
    """Pieces of ``t`` along ``axis``: of ``split_size`` each (last may be short) or of the sizes
    listed (which must add up to the axis length), as ``torch.split``."""
    axis = check_axis(axis, t.shape, "split", many=False)
    n = t.shape[axis]
    if is_int(split_size):
        if split_size <= 0:
            raise InvalidArgumentError(f"split: split_size must be positive, got {split_size}")
        sizes = [min(split_size, n - s) for s in range(0, n, split_size)]
    else:
        if isinstance(split_size, np.ndarray) and split_size.ndim == 1:
            split_size = split_size.tolist()
        if not isinstance(split_size, (list, tuple)) or not all(is_int(s) for s in split_size):
            raise InvalidArgumentError(f"split: split_size must be a positive int or a list of "
                                       f"ints, got {split_size!r}")
        sizes = [int(s) for s in split_size]
        if sum(sizes) != n or any(s < 0 for s in sizes):
            raise InvalidArgumentError(f"split: sizes {sizes} do not add up to {n}, the length of "
                                       f"axis {axis} of shape {t.shape}")
    pieces, start = [], 0
    lead = (slice(None),) * (axis % t.ndim)
    for s in sizes:
        pieces.append(t[lead + (slice(start, start + s),)])
        start += s
    return pieces


def where(condition: Any, x: Any, y: Any) -> Tensor:
    """``x`` where ``condition`` holds, else ``y`` (broadcasting); gradients follow the choice."""
    cond = condition.data if isinstance(condition, Tensor) else B.asarray(condition)
    ref = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else Tensor(x)
    a, b = ref._other(x), ref._other(y)
    try:
        out = B.xp.where(cond, a.data, b.data)
    except ValueError as exc:
        raise shape_error("where", cond.shape, a.shape, b.shape, detail=str(exc)) from None

    def backward(g: Any):
        zero = B.xp.zeros((), dtype=g.dtype)
        return (unbroadcast(B.xp.where(cond, g, zero), a.shape) if a.requires_grad else None,
                unbroadcast(B.xp.where(cond, zero, g), b.shape) if b.requires_grad else None)
    return Tensor._make(out, (a, b), backward, "where")
