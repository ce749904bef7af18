#!/usr/bin/env python3
"""Set up and run minilora with nothing but Python 3.10+.

    python3 dev.py demo     # make .venv, install minilora, run the demo
    python3 dev.py test     # make .venv, install minilora[dev], run ruff and the tests
    python3 dev.py test --reference          # the same on the reference forms of the ops
    python3 dev.py test --strict             # the same on the strict stand-in for CuPy
    python3 dev.py run -- finetune --help    # any minilora command, in .venv

Each command creates (or reuses) the virtual environment .venv beside this file. Extra extras for
the environment can be named with --extras (CI adds "crosscheck" to compare against PyTorch).
--reference runs the command with MINILORA_REFERENCE=1: every op in its reference form (its
equation), none of the fast forms of minilora/fast/. --strict runs it with MINILORA_BACKEND=strict:
on minilora.strict, the NumPy stand-in for CuPy that runs the GPU code path on the CPU, refuses
host arrays in device kernels and counts launches and syncs (the test run then also fails when
fewer than 95% of its tests did device work).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_env(extras: set[str]) -> None:
    """Create .venv and install minilora with ``extras`` unless it already has them."""
    stamp = VENV / "minilora-extras.txt"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if stamp.exists():
        lines = stamp.read_text().split()
        if lines and lines[0] == digest and extras <= set(lines[1:]):
            return
        extras = extras | set(lines[1:])
    if not PY.exists():
        print(f"creating virtual environment in {VENV.name}/", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    spec = f"{ROOT}[{','.join(sorted(extras))}]" if extras else str(ROOT)
    print(f"installing minilora[{','.join(sorted(extras))}] (first run takes a few minutes)",
          flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", spec], check=True)
    stamp.write_text(" ".join([digest, *sorted(extras)]))


def main() -> int:
    """Parse the command line and run ``demo``, ``test``, ``setup`` or ``run`` (any minilora
    command, e.g. ``python3 dev.py run -- train --task add``)."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,  # --r is a LoRA flag
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["demo", "test", "setup", "run"])
    parser.add_argument("--extras", default="", help="extra extras, comma separated")
    parser.add_argument("--reference", action="store_true",
                        help="run with the reference forms of the ops (MINILORA_REFERENCE=1)")
    parser.add_argument("--strict", action="store_true",
                        help="run on the strict stand-in for CuPy (MINILORA_BACKEND=strict)")
    args, rest = parser.parse_known_args()  # the rest goes on to the demo or to pytest
    extras = {e for e in args.extras.split(",") if e}
    env = dict(os.environ)
    if args.reference:
        env["MINILORA_REFERENCE"] = "1"
    if args.strict:
        env["MINILORA_BACKEND"] = "strict"
    if args.command in ("demo", "run"):
        ensure_env(extras)
        if args.command == "demo":  # runs/demo inside the checkout, wherever it is started from
            return subprocess.run([str(PY), "-m", "minilora", "demo", *rest], cwd=ROOT,
                                  env=env).returncode
        argv = rest[1:] if rest[:1] == ["--"] else rest  # paths stay relative to where you are
        return subprocess.run([str(PY), "-m", "minilora", *argv], env=env).returncode
    ensure_env(extras | {"dev"})
    if args.command == "setup":
        return 0
    lint = subprocess.run([str(PY), "-m", "ruff", "check", "."], cwd=ROOT)
    if lint.returncode:
        return lint.returncode
    return subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
