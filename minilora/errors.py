"""Errors raised by minilora.

Every error derives from :class:`MiniLoraError`, and each also subclasses the built-in exception a
Python user would expect (``ValueError`` for bad values and shapes, ``TypeError`` for bad types),
so ``except ValueError`` keeps working. Messages name the argument and the values involved.
"""

from __future__ import annotations


class MiniLoraError(Exception):
    """Base class of every error minilora raises on purpose."""


class ShapeError(MiniLoraError, ValueError):
    """Shapes that do not fit an operation; the message names the op and both shapes."""


class DTypeError(MiniLoraError, TypeError):
    """An array of the wrong kind (for example integers where floats are needed)."""


class InvalidArgumentError(MiniLoraError, ValueError):
    """An argument with a value outside what the function accepts."""


class ConfigError(InvalidArgumentError):
    """A configuration (model, LoRA, quantization, training) with an invalid field."""


class BackendError(MiniLoraError, RuntimeError):
    """The requested array backend is unknown or cannot run here (no CuPy, no GPU)."""


class GraphError(MiniLoraError, RuntimeError):
    """Misuse of the autograd graph: backward on a non-scalar, twice on a freed graph, ..."""


class StateDictError(MiniLoraError, KeyError):
    """A state dict whose keys or shapes do not fit the module it is loaded into."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class CheckpointError(MiniLoraError, ValueError):
    """A checkpoint or adapter file that is missing, corrupt or made for another model."""


def shape_error(op: str, *shapes: tuple, detail: str = "") -> ShapeError:
    """Build a :class:`ShapeError` that names ``op`` and every shape involved."""
    listed = " and ".join(str(tuple(s)) for s in shapes)
    msg = f"{op}: incompatible shapes {listed}"
    return ShapeError(f"{msg}: {detail}" if detail else msg)


class DestinationError(MiniLoraError, ValueError):
    """A place to save that cannot or must not be written: a file, a read-only folder, an existing
    save without --overwrite, a folder of other files."""


class DiskFullError(MiniLoraError, OSError):
    """The disk filled up during a save; the previous save is untouched."""


class TrainingDivergedError(MiniLoraError, FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the update."""


class NonFiniteWarning(UserWarning):
    """Weights that were loaded hold NaN or inf (loaded, since one may want to look at them, but
    said: every output of the model is then NaN)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two steps; ``checkpoint`` is where the completed steps were
    saved (None when they were not), ``step`` how many there are, ``history`` what they did."""

    def __init__(self, step: int, checkpoint: str | None, history: dict | None = None) -> None:
        super().__init__(f"training interrupted after step {step}")
        self.step, self.checkpoint, self.history = step, checkpoint, history or {}


class DataError(InvalidArgumentError):
    """A data file (training text, task data) that cannot be read or does not hold what it
    should; the message names the file and, for bad text, the byte offset."""


def is_real(value: object) -> bool:
    """True for a Python or NumPy int or float, False for a bool (a switch, never a rate or a
    weight here), a string and everything else. Finite or not: the caller says what range."""
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and \
        not isinstance(value, bool)


def is_int(value: object) -> bool:
    """True for a Python or NumPy integer, False for a bool (``True`` is an int in Python, never
    a count here) and for everything else."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
        type(value).__name__ != "bool_"


def check_bool(value: object, name: str, error: type[MiniLoraError] = DTypeError) -> None:
    """Refuse (``error``, naming ``name`` and the value) a switch that is not True or False (a
    NumPy bool is one): a string such as "no" is truthy, and would turn the switch on."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise error(f"{name} must be True or False, got {value!r}")


def check_nonnegative(value: object, name: str,
                      error: type[MiniLoraError] = InvalidArgumentError) -> None:
    """Refuse (``error``, naming ``name`` and the value) a ``value`` that is not a finite real
    number >= 0 (a learning rate, a decay, a clipping norm): a bool or a string is not one, and a
    NaN, which ``x < 0`` lets through, turns every weight it touches to NaN."""
    import math

    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise error(f"{name} must be a finite number >= 0, got {value!r}")


def check_int(value: object, name: str, minimum: int | None = 1,
              error: type[MiniLoraError] = InvalidArgumentError) -> int:
    """``value`` as a Python int if it is an integer (not a bool) >= ``minimum`` (None: any);
    else ``error`` with a message naming ``name`` (say "GPTConfig: n_layer") and the value."""
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else " >= 0" if minimum == 0 else \
            " >= 1 (positive)" if minimum == 1 else f" >= {minimum}"
        raise error(f"{name} must be an int{bound}, got {value!r}")
    return int(value)


def check_axis(axis: object, shape: tuple, who: str, many: bool = True) -> int | tuple | None:
    """Refuse (:class:`ShapeError`, naming ``who``, the axis and ``shape``) an ``axis`` that is not
    None, an int in [-ndim, ndim) or (when ``many``) a tuple of distinct such ints: NumPy's own
    error would name an array deep inside the op, not the argument given. Returns the axis with
    each int a Python int in [0, ndim) (a NumPy integer as given would trip the backward pass's
    ``isinstance(axis, int)``), a tuple staying a tuple; None stays None."""
    ndim = len(shape)
    axes = axis if many and isinstance(axis, tuple) else (axis,)
    if axis is None:
        return None
    normal = [int(a) % ndim if is_int(a) and -ndim <= a < ndim else None for a in axes]
    if None in normal or len(set(normal)) != len(normal):
        what = "an axis or a tuple of distinct axes" if many else "an axis"
        raise ShapeError(f"{who}: axis {axis!r} is not {what} of a tensor of shape "
                         f"{tuple(shape)} (ints from {-ndim} to {ndim - 1})")
    return tuple(normal) if isinstance(axis, tuple) else normal[0]


def check_path(value: object, name: str) -> None:
    """Refuse (:class:`InvalidArgumentError`, naming ``name``) a path that is not a str or an
    ``os.PathLike``: None would otherwise fail deep inside ``os`` with a message naming nothing."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(f"{name} must be a path (a str or os.PathLike), got "
                                   f"{type(value).__name__}")
