"""Checks of device data without a sync: their flags wait for the step's one transfer.

An index check (token ids in [0, V), targets in [0, C)) asks a question of the values. On the host
the answer costs nothing. On a device, ``int(idx.min())`` is a device-to-host sync: the host stops
until every queued kernel has run, and a training step that asked four such questions per forward
pass stalled four times. So a check of device data computes its flag ``bad`` (a 0-d bool array)
on the device and hands it to :func:`require`:

* inside :func:`deferred` (the training loop opens one around each step) the flag waits, and
  :meth:`Pending.settle` brings every waiting flag back together with the values the step reads
  anyway (the loss, the gradient norm) in ONE transfer, raising the first failed check's own
  error then, before any update is applied;
* outside, the flag is read at once (one sync per check, not one per min and max).

Data that comes from the host (a batch from a data set, a prompt) is checked there, before it is
uploaded: :func:`is_host` tells the two apart. While a check waits, the kernels after it run on
values clipped into range (:func:`require` says when), so a bad index cannot take them out of
bounds before the error is raised.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from .. import backend as B

_local = threading.local()  # the open deferred() scope of this thread, if any


def is_host(arr: Any) -> bool:
    """True for an array in host memory (a NumPy array, whatever the backend): checking its values
    costs no sync."""
    return isinstance(arr, np.ndarray)


class Pending:
    """The checks waiting in one :func:`deferred` scope: (flag, make_error) pairs, in order."""

    def __init__(self) -> None:
        self.checks: list[tuple[Any, Callable[[], Exception]]] = []

    def settle(self, *values: Any) -> list[float]:
        """Bring ``values`` (0-d arrays, or Python numbers) and every waiting flag to the host in
        one transfer; raise the first failed check's error, else return the values as floats.

        The flags are read before the values are returned, so a caller that updates only after
        ``settle`` never updates from a step whose data failed a check.
        """
        parts = [v for v in values if not isinstance(v, (int, float))]
        parts += [flag for flag, _ in self.checks]
        host = B.to_numpy(B.xp.stack([B.xp.asarray(p).astype(np.float64, copy=False).reshape(())
                                      for p in parts])) if parts else np.zeros(0)
        flags = host[len(parts) - len(self.checks):]
        checks, self.checks = self.checks, []
        for (_, make_error), bad in zip(checks, flags):
            if bad:
                raise make_error()
        read = iter(host[:len(parts) - len(checks)].tolist())
        return [float(v) if isinstance(v, (int, float)) else next(read) for v in values]


@contextmanager
def deferred() -> Iterator[Pending]:
    """Context manager: device checks made in this thread inside the block wait for
    :meth:`Pending.settle` (which the block must call; checks still waiting at its end are read
    then, one sync for all)."""
    previous = getattr(_local, "pending", None)
    pending = _local.pending = Pending()
    try:
        yield pending
    finally:
        _local.pending = previous
    if pending.checks:  # the block ended without settling: read what waits, all at once
        pending.settle()


def require(bad: Any, make_error: Callable[[], Exception]) -> bool:
    """Raise ``make_error()`` if ``bad`` (a bool, or a 0-d bool array) is true: a host value now,
    a device flag now (one sync) or, inside :func:`deferred`, when the scope settles.

    Returns True when the check waits: the caller then keeps its kernels in bounds (clips) until
    the error can be raised.
    """
    if is_host(bad) or isinstance(bad, (bool, np.bool_)) or not B.on_device():
        if bool(bad):
            raise make_error()
        return False
    pending = getattr(_local, "pending", None)
    if pending is None:
        if bool(bad):  # the one sync of this check
            raise make_error()
        return False
    pending.checks.append((bad, make_error))
    return True


def check_range(values: Any, low: int, high: int,
                make_error: Callable[[np.ndarray], Exception]) -> Any:
    """``values`` (an int array, host or device) checked to lie in [low, high) and returned where
    they are: host values checked on the host, device values by :func:`require`.

    ``make_error(host_values)`` builds the error from the values brought to the host (only when the
    check fails). While a device check waits, the values come back clipped into [low, high) so
    that gathers with them stay in bounds.
    """
    if not values.size:
        return values
    if is_host(values):
        if values.min() < low or values.max() >= high:
            raise make_error(values)
        return values
    bad = ((values < low) | (values >= high)).any()
    if require(bad, lambda: make_error(B.to_numpy(values))):
        return B.xp.clip(values, low, high - 1)
    return values


__all__ = ["is_host", "Pending", "deferred", "require", "check_range"]
