"""A Ctrl-C while the command line is still importing NumPy and the engine is one line and exit
status 130, as at any later moment; imported as a library, minilora leaves SIGINT alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minilora import startup
from minilora.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _interrupt_while_importing(command: list[str], env: dict) -> tuple[int, list[str]]:
    """Run ``command`` with Python's import timing on, send SIGINT as soon as NumPy's import has
    finished (the engine's own imports still to come), and return the exit status and the lines
    of stderr that are not import timings."""
    env = {**os.environ, **env, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                            cwd=ROOT, text=True)
    lines, sent = [], False
    for line in proc.stderr:
        timing = line.startswith("import time:")
        if not sent and timing and re.search(r"\|\s+numpy$", line.rstrip()):
            proc.send_signal(signal.SIGINT)
            sent = True
        elif not timing:
            lines.append(line.rstrip("\n"))
    rc = proc.wait(timeout=60)
    assert sent, "NumPy's import was never seen"
    return rc, lines


@pytest.mark.host_only("a process's start")
@pytest.mark.parametrize("how", ["python -m minilora", "console script"])
def test_a_ctrl_c_while_the_command_starts_is_one_line(tmp_path, how):
    if how == "python -m minilora":
        command = [sys.executable, "-m", "minilora"]
    else:
        script = Path(sys.executable).parent / "minilora"
        if not script.exists():
            script = shutil.which("minilora")
        if script is None:
            pytest.skip("no minilora console script installed beside this Python")
        command = [sys.executable, str(script)]
    rc, lines = _interrupt_while_importing(
        [*command, "train", "--out", str(tmp_path / "run"), "--steps", "5"],
        {"PYTHONPATH": str(ROOT)})
    assert rc == startup.EXIT_INTERRUPTED and lines == ["minilora: interrupted while starting"], \
        lines
    assert not (tmp_path / "run").exists()


@pytest.mark.host_only("signal handlers")
def test_a_library_import_leaves_sigint_alone_and_the_command_hands_it_back(monkeypatch):
    assert signal.getsignal(signal.SIGINT) is not startup._while_starting  # pytest imported us
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-c", "import minilora"])
    assert startup.is_the_command() is False and startup.guard() is False
    previous = signal.getsignal(signal.SIGINT)
    for argv in (["python3", "-m", "minilora", "train"], ["python3", "-X", "dev", "-mminilora"],
                 ["python3", "-W", "ignore", "-m", "minilora"]):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert startup.is_the_command(), argv
    for argv in (["python3", "-m", "pytest", "minilora"], ["python3", "script.py", "-m",
                                                         "minilora"]):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert not startup.is_the_command(), argv
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "minilora"])
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert startup.guard() is True
        assert signal.getsignal(signal.SIGINT) is startup._while_starting
        with pytest.raises(SystemExit) as stop:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert stop.value.code == 130
        # the command runs: SIGINT is Python's own again
        main(["sample", "--checkpoint", "no-such-dir", "--prompt", "1"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a caller's own handler is kept
        assert startup.guard() is False and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
