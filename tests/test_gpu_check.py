"""benchmarks/gpu_check.sh, run as on a GPU machine but on the strict stand-in for CuPy
(``STRICT=1 QUICK=1``): the benchmark's table and plot, the named subset of the suite, the count of
tests that did device work, and an exit status that is 0 only when both parts pass."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = [
    pytest.mark.host_only("runs the GPU check in a subprocess, which counts its own device work"),
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="needs bash and coreutils' timeout"),
]


def gpu_check(out, **env) -> subprocess.CompletedProcess:
    """``STRICT=1 QUICK=1 bash benchmarks/gpu_check.sh`` with OUT=``out`` and this Python."""
    full = {"PATH": "/usr/bin:/bin", "STRICT": "1", "QUICK": "1", "OUT": str(out),
            "PYTHON": sys.executable, "HOME": str(out), **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=out.parent, env=full, capture_output=True,
                          text=True, timeout=240)


def test_the_strict_quick_check_benchmarks_tests_and_counts_the_device_work(tmp_path):
    out = tmp_path / "check"
    done = gpu_check(out)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:]
    assert "benchmarks/backends.py: passed" in summary
    assert "tests on the strict stand-in for CuPy: passed" in summary
    counted = re.search(r"tests that ran on the strict stand-in for CuPy \(did device work "
                        r"there\): (\d+) of (\d+) not marked host_only", summary)
    assert counted, summary
    did, of = map(int, counted.groups())
    work = json.loads((out / "device_work.json").read_text())
    assert (work["backend"], work["device_work"], work["counted"]) == ("strict", did, of)
    assert of > 50 and did >= 0.95 * of
    log = (out / "log.txt").read_text()
    named = re.search(r"^tests: (.*)$", log, re.M).group(1).split()
    assert "tests/test_checkpoint.py" in named and len(named) > 1  # a named subset,
    assert not any("test_gpu_check" in t for t in named)  # and not this test
    assert log.index("benchmarks/backends.py on numpy and strict") < log.index("tests on the")

    table = (out / "backends" / "backends.md").read_text()
    assert "strict ms (not a speed)" in table and "not a speed-up" in table
    assert "NumPy stand-in for CuPy" in table
    report = json.loads((out / "backends" / "backends.json").read_text())
    assert report["backends"] == ["numpy", "strict"] and report["speeds"] is False
    step = next(r for r in report["rows"] if r["op"] == "GPT step, reference")
    assert step["agree"] and step["strict_counts"]["launches"] > 100
    assert (out / "backends" / "backends.png").stat().st_size > 5000


def test_a_failing_test_makes_the_check_fail_and_say_so(tmp_path):
    out = tmp_path / "check"
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 + 1 == 3\n")
    done = gpu_check(out, TESTS=str(failing), BENCH_ARGS="--only matmul")
    summary = (out / "summary.txt").read_text()
    assert done.returncode != 0, summary
    assert "benchmarks/backends.py: passed" in summary
    assert "tests on the strict stand-in for CuPy: FAILED (status 1)" in summary
    assert "1 failed" in summary
