"""Helpers the tests share: finite-difference gradient checks, host copies of arrays, the
command line in a fresh process, and the count of the tests that did device work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import minilora as ml
from minilora import backend as B

ROOT = Path(__file__).resolve().parents[1]
# a task model that trains in well under a second: 1-digit addition, one 16-channel block
TINY = ["--digits", "1", "--heldout", "20", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--batch-size", "16", "--eval-examples", "20", "--no-progress"]


# ``python -m minilora`` that, on a device backend, leaves its count of device work (as
# _work_reader counts it) in the file MINILORA_TEST_WORK names, for the test that started it
_COUNTED_MAIN = f"""
import atexit, os, runpy, sys
sys.path.append({str(ROOT)!r})
from minilora import backend
from tests.helpers import _work_reader
read = _work_reader(backend.get_backend())
if read is not None:
    def report():
        with open(os.environ["MINILORA_TEST_WORK"], "w") as f:
            f.write(str(read()))
    atexit.register(report)
runpy.run_module("minilora", run_name="__main__", alter_sys=True)
"""
_subprocess_work = [0]  # device work counted in the subprocesses of run_cli so far


# a notebook's last cell when its kernel's device work is to be counted: it prints the count
KERNEL_WORK_CELL = f"""import sys
sys.path.append({str(ROOT)!r})
from tests.helpers import process_work
print("MINILORA_TEST_WORK", process_work())"""


def process_work() -> int:
    """The device work this whole process has done, whichever backend is active now: strict's
    launches since it started, plus 1 if CuPy's memory pool holds any memory (every kernel that
    makes an array allocates)."""
    work = 0
    if "minilora.strict" in sys.modules:
        work += sys.modules["minilora.strict"].counts().launches
    if "cupy" in sys.modules:
        work += int(sys.modules["cupy"].get_default_memory_pool().total_bytes() > 0)
    return work


def add_kernel_work(outputs: list) -> None:
    """Count the device work a notebook's kernel printed in its last cell (``outputs``)
    towards the test that ran it."""
    for out in outputs:
        for line in out.get("text", "").splitlines():
            if line.startswith("MINILORA_TEST_WORK "):
                _subprocess_work[0] += int(line.split()[1])


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """``python -m minilora ARGS`` in a fresh interpreter (on the backend MINILORA_BACKEND names,
    which it inherits); its device work counts towards the test's."""
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "work")
        done = subprocess.run([sys.executable, "-c", _COUNTED_MAIN, *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MINILORA_TEST_WORK": work})
        if os.path.exists(work):
            with open(work, encoding="utf-8") as f:
                _subprocess_work[0] += int(f.read() or 0)
    return done


def host(x) -> np.ndarray:
    """A NumPy copy of a Tensor or backend array (works on both backends)."""
    if isinstance(x, ml.Tensor):
        x = x.data
    return B.to_numpy(x)


def numeric_grad(f: Callable[[], float], arr, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f()`` with respect to array ``arr`` (in place).

    Works on either backend: ``arr`` is perturbed element by element through a flat view.
    """
    flat = arr.reshape(-1)
    grad = np.zeros(flat.shape[0], dtype=np.float64)
    for i in range(flat.shape[0]):
        old = float(flat[i])
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(arr.shape)


def check_grads(fn: Callable[..., ml.Tensor], inputs: Sequence[np.ndarray],
                rtol: float = 1e-5, atol: float = 1e-7, eps: float = 1e-6) -> None:
    """Assert that autograd's gradients of ``sum(fn(*tensors) * w)`` match finite differences.

    ``inputs`` are float64 host arrays; a fixed random weighting ``w`` makes every output element
    matter (a plain sum would hide some errors, e.g. in softmax whose rows sum to one).
    """
    tensors = [ml.Tensor(B.asarray(np.array(x, dtype=np.float64)), requires_grad=True)
               for x in inputs]
    out = fn(*tensors)
    w = B.asarray(np.random.default_rng(1).standard_normal(out.shape))

    def value() -> float:
        with ml.no_grad():
            return float((fn(*tensors).data * w).sum())

    (out * ml.Tensor(w)).sum().backward()
    for i, t in enumerate(tensors):
        expected = numeric_grad(value, t.data, eps)
        assert t.grad is not None, f"input {i} got no gradient"
        np.testing.assert_allclose(host(t.grad), expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} (shape {t.shape})")


# ------------------------------------------------------------------------------ device work

_open_blocks: list = []


def _work_reader(backend: str) -> Callable[[], int] | None:
    """A function whose value grows with the device work done on ``backend`` (None on NumPy):
    strict's count of kernel launches; on CuPy, the allocations made through CuPy's allocator
    (every kernel that makes an array makes one), counted by wrapping the memory pool's malloc
    (the pool still does the allocating, so its statistics stay true)."""
    if backend == "strict":
        from minilora import strict

        # one counting block for the whole process, read live: no snapshot of every call site
        block = strict.counting()
        live = block.__enter__()
        _open_blocks.append(block)  # kept: a block that is garbage-collected closes
        return lambda: live.launches
    if backend == "cupy":
        cupy = B.xp
        pool = cupy.get_default_memory_pool()
        made = [0]

        def malloc(size: int):
            made[0] += 1
            return pool.malloc(size)

        cupy.cuda.set_allocator(malloc)
        return lambda: made[0]
    return None


class DeviceWork:
    """Which tests of a run did device work: the tests that ran (not skipped), those marked
    ``host_only``, and, per test, whether the backend's work counter moved while it ran."""

    HOW = {"strict": "at least one kernel launch counted by minilora.strict",
           "cupy": "at least one device allocation through CuPy's allocator"}

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.enforced = backend == "strict"  # only the stand-in's count is exact enough to gate
        here = _work_reader(backend)
        self._read = None if here is None else (lambda: here() + _subprocess_work[0])
        self._started: dict[str, int] = {}
        self.did: dict[str, bool] = {}
        self.ran: set[str] = set()
        self.host_only: set[str] = set()

    def describe(self) -> str:
        """What counts as device work on this run's backend."""
        if self._read is None:
            return "host arrays: no device work to count"
        return f"a test did device work with {self.HOW[self.backend]}"

    def start(self, item) -> None:
        """Before a test's set-up."""
        if item.get_closest_marker("host_only") is not None:
            self.host_only.add(item.nodeid)
        if self._read is not None:
            self._started[item.nodeid] = self._read()

    def stop(self, item) -> None:
        """After a test's tear-down."""
        if self._read is not None and item.nodeid in self._started:
            self.did[item.nodeid] = self._read() > self._started.pop(item.nodeid)

    def record(self, report) -> None:
        """A test's report: it ran when its call phase ran and was not skipped there."""
        if report.when == "call" and not report.skipped:
            self.ran.add(report.nodeid)

    def counted(self) -> list[str]:
        """The tests that ran and are not marked host_only, in the order they ran."""
        return [n for n in self.did if n in self.ran and n not in self.host_only]

    def idle(self) -> list[str]:
        """The counted tests that did no device work."""
        return [n for n in self.counted() if not self.did[n]]

    def enough(self, share: float) -> bool:
        """True when at least ``share`` of the counted tests did device work (or none ran)."""
        counted = self.counted()
        return not counted or (len(counted) - len(self.idle())) >= share * len(counted)

    def summary(self, share: float) -> list[str]:
        """The lines the run ends with: the count, and the tests that did no device work."""
        if self._read is None:
            return [f"device work: none counted on the {self.backend} backend "
                    f"(MINILORA_BACKEND=strict runs the suite on the stand-in for CuPy and counts "
                    f"it; MINILORA_BACKEND=cupy on a GPU)"]
        counted, idle = self.counted(), self.idle()
        did = len(counted) - len(idle)
        pct = f"{did / len(counted):.1%}" if counted else "-"
        host = len([n for n in self.host_only if n in self.ran])
        lines = [f"device work on {self.backend}: {did} of {len(counted)} tests ({pct}) not "
                 f"marked host_only did device work ({self.HOW[self.backend]}); {host} "
                 f"host_only tests left out"]
        if idle:
            lines.append(f"tests that did no device work ({len(idle)}; mark a test host_only "
                         f"only if it has no array work to do):")
            lines += [f"  {n}" for n in idle[:40]]
            if len(idle) > 40:
                lines.append(f"  ... and {len(idle) - 40} more")
        if self.enforced and not self.enough(share):
            lines.append(f"FAILED: under {self.backend} at least {share:.0%} of the tests not "
                         f"marked host_only must do device work; {pct} did")
        out = os.environ.get("MINILORA_DEVICE_WORK_FILE")
        if out:  # for scripts (benchmarks/gpu_check.sh) that report the count
            with open(out, "w", encoding="utf-8") as f:
                json.dump({"backend": self.backend, "device_work": did, "counted": len(counted),
                           "host_only": host, "idle": idle}, f, indent=1)
        return lines
