"""The suite's own guards (tests/conftest.py): every test runs on the backend MINILORA_BACKEND
names, a test that leaves another one behind fails, and under strict the run fails when fewer
than 95% of the tests not marked host_only did device work. Each case runs a small suite in a
fresh pytest process with this suite's conftest."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# host_only: each test here runs pytest in a subprocess, whose device work is its own to count
pytestmark = pytest.mark.host_only("runs a small suite in a subprocess, which counts its own work")

INNER = '''
import pytest

from minilora import backend as B


def test_device_work():
    assert float(B.xp.ones(3).sum()) == 3.0


@pytest.mark.host_only("only names")
def test_host_work():
    assert "a" + "b" == "ab"
'''


def run_inner(tmp_path, files: dict, backend: str) -> subprocess.CompletedProcess:
    """pytest on ``files`` (name -> source) in ``tmp_path``, with this suite's conftest as a
    plugin, on ``backend``."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    for name, source in files.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    env = {"PYTHONPATH": str(ROOT), "MINILORA_BACKEND": backend, "PATH": "/usr/bin:/bin",
           "HYPOTHESIS_PROFILE": "ci", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_run_under_strict_counts_the_tests_that_did_device_work(tmp_path):
    done = run_inner(tmp_path, {"test_inner.py": INNER}, "strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stdout  # the host_only mark is registered
    assert "backend strict" in done.stdout  # the header says which backend the run tests
    assert "device work on strict: 1 of 1 tests (100.0%)" in done.stdout
    assert "1 host_only tests left out" in done.stdout


def test_too_little_device_work_fails_a_strict_run_and_names_the_idle_tests(tmp_path):
    idle = INNER + '''

def test_host_arithmetic_only():
    assert sum(range(4)) == 6
'''
    done = run_inner(tmp_path, {"test_inner.py": idle}, "strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 passed" in done.stdout  # every test passed: the count alone failed the run
    assert "device work on strict: 1 of 2 tests (50.0%)" in done.stdout
    assert "test_inner.py::test_host_arithmetic_only" in done.stdout
    assert "FAILED: under strict at least 95% of the tests" in done.stdout
    on_numpy = run_inner(tmp_path, {"test_inner.py": idle}, "numpy")  # counted only on a device
    assert on_numpy.returncode == 0 and "device work: none counted" in on_numpy.stdout


def test_a_test_that_leaves_another_backend_active_fails_and_the_next_runs_on_the_run_s(tmp_path):
    switching = '''
from minilora import backend as B


def test_switches_and_forgets():
    B.use_backend("numpy")
    B.xp.ones(2)


def test_after_it():
    assert B.get_backend() == "strict"
    assert float(B.xp.ones(3).sum()) == 3.0
'''
    done = run_inner(tmp_path, {"test_switch.py": switching}, "strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 passed, 1 error" in done.stdout
    assert "test_switch.py::test_switches_and_forgets left backend 'numpy' active" in done.stdout


def test_host_only_needs_its_reason(tmp_path):
    bare = '''
import pytest


@pytest.mark.host_only
def test_no_reason():
    pass
'''
    done = run_inner(tmp_path, {"test_bare.py": bare}, "numpy")
    assert done.returncode == 4, done.stdout + done.stderr  # a usage error, before any test
    assert "host_only needs its reason" in done.stdout + done.stderr


def test_every_host_only_entry_of_the_conftest_names_a_test_there_is():
    """The tables in tests/conftest.py name files and tests by name: a renamed test must not
    leave a stale entry behind (or its new name would count without its reason)."""
    from tests.conftest import HOST_ONLY_MODULES, HOST_ONLY_TESTS

    files = {p.name: p for p in (ROOT / "tests").rglob("test_*.py")}
    assert set(HOST_ONLY_MODULES) <= set(files), sorted(set(HOST_ONLY_MODULES) - set(files))
    for entry, reason in HOST_ONLY_TESTS.items():
        name, test = entry.split("::")
        assert name in files, entry
        assert f"def {test}(" in files[name].read_text(encoding="utf-8"), entry
        assert reason.strip(), entry
    for reason in HOST_ONLY_MODULES.values():
        assert reason.strip()
