"""A Ctrl-C while the command line is still importing NumPy and the engine is one line and exit
status 130, as at any later moment; imported as a library, minilora leaves SIGINT alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
    real_done = startup.done
    for argv in (["python3", "-m", "minilora", "train"], ["python3", "-X", "dev", "-mminilora"],
                 ["python3", "-W", "ignore", "-m", "minilora"]):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert startup.is_the_command(), argv
    for argv in (["python3", "-m", "pytest", "minilora"], ["python3", "script.py", "-m",
                                                         "minilora"]):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert not startup.is_the_command(), argv
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "minilora"])
    monkeypatch.setattr(startup, "_guarded", False)  # put back after: the process is pytest
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert startup.guard() is True
        assert signal.getsignal(signal.SIGINT) is startup._while_starting
        with pytest.raises(SystemExit) as stop:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert stop.value.code == 130
        # the command runs with SIGINT Python's own again, and as it ends a Ctrl-C ends the
        # process quietly
        seen = []
        monkeypatch.setattr(startup, "done", lambda: seen.append(signal.getsignal(signal.SIGINT))
                            or real_done())
        main(["sample", "--checkpoint", "no-such-dir", "--prompt", "1"])
        assert seen == [startup._while_starting]
        assert signal.getsignal(signal.SIGINT) is startup._at_exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a caller's own handler is kept
        assert startup.guard() is False and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.host_only("a process's signals")
@pytest.mark.parametrize("when", ["as it starts", "once it trains"])
def test_ctrl_c_pressed_again_and_again_never_prints_a_traceback(tmp_path, when):
    """The first Ctrl-C stops the run after its step and saves it; the second stops at once.
    Pressed a few times more, the rest struck while Python wound down (joining the worker
    threads, leaving main's with-block) and printed their KeyboardInterrupt tracebacks."""
    command = [sys.executable, "-m", "minilora", "train", "--steps", "5000", "--out",
               str(tmp_path / "run"), "--digits", "1", "--heldout", "20", "--n-layer", "2",
               "--n-head", "2", "--n-embd", "64", "--batch-size", "32", "--eval-examples", "20",
               "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if when == "once it trains":
        assert proc.stdout.readline().startswith("training a GPT")
    for _ in range(150):  # a storm: every 2 ms for 0.3 s, or until the process is gone
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    # 130 from minilora itself; -2 when the last signal found Python's own exit under way
    assert proc.returncode in (startup.EXIT_INTERRUPTED, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert len(err.splitlines()) <= 2, err  # "interrupted after step ...", its resume command
