"""The LoRA update written into the base layer's output array: no second (N, out) array.

The reference form (:func:`minilora.lora.layer.add_lora_update`) computes ``y + s (x A^T) B^T``
as a new array. A LoRA layer's base output y is an array of its own that a linear layer's
backward never reads, so the sum may take y's place, when nothing else reads y either: this
kernel adds the update into y. It is the same arithmetic, so the two forms agree bit for bit.

Its contract is explicit: the caller passes ``y_is_fresh=True`` to say that y is its own fresh
output and that nothing reads y after this call, neither an op built later nor the backward of
one built before (which may still hold y). Anything else is refused, before any work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgumentError


def add_lora_update_into(y: Any, x: Any, a: Any, b: Any, s: float, *,
                         y_is_fresh: bool) -> tuple[Any, Any]:
    """``y + s (x a^T) b^T``, written into y's array; returns ``(out, h)`` with h = s x a^T
    (N, r), which the backward pass needs. y (N, out), x (N, in), a (r, in), b (out, r).

    Refused (InvalidArgumentError) unless ``y_is_fresh`` is True (module docstring). ``out`` is
    y itself, or a new array where y cannot hold the sum (read-only, or of a narrower dtype than
    the update: writing would round it), so the values are always the reference form's.
    """
    if y_is_fresh is not True:
        raise InvalidArgumentError(f"add_lora_update_into: writes into y, so the caller must say "
                                   f"y_is_fresh=True (y is its own fresh output and nothing reads "
                                   f"it afterwards), got y_is_fresh={y_is_fresh!r}; use the "
                                   f"reference form, which returns a new array")
    if y.shape != (x.shape[0], b.shape[0]):
        raise InvalidArgumentError(f"add_lora_update_into: y must have shape (N, out) = "
                                   f"{(x.shape[0], b.shape[0])}, got {y.shape}")
    h = x @ a.T  # (N, r)
    h *= s
    update = h @ b.T  # (N, out)
    if np.promote_types(y.dtype, update.dtype) != y.dtype or \
            not getattr(y.flags, "writeable", True):
        return y + update, h
    y += update  # in place: y's array becomes the sum
    return y, h


__all__ = ["add_lora_update_into"]
