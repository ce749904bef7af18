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
