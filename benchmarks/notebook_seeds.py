"""Run a tutorial at full size under several seeds: do its checks hold, and with what margin?

A notebook's assertions are set from one run; this reruns its source (``tutorials/src/NN_*.py``,
as a plain script, plots off) once per seed, each in its own process with ``MINILORA_SEED`` set,
and prints the figures it names, their spread, and whether the notebook's own checks passed.

    python benchmarks/notebook_seeds.py 03 --seeds 0 1 2 3 4 --show lora_on_b full_on_b
    python benchmarks/notebook_seeds.py 07 --seeds 0 1 2 --jobs 2

A notebook reads the seed as ``SEED = int(os.environ.get("MINILORA_SEED", "0"))`` and says which
random choices it drives (each notebook's text states the seeds tried and the spread measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tutorials" / "src"

# the child: run the source as __main__ in tutorials/ (where notebooks run), then print the
# named globals (as far as it got) as one JSON line; an AssertionError is reported, not raised
CHILD = r"""
import json, os, sys
os.chdir(sys.argv[2]); sys.path.insert(0, sys.argv[2])
names = sys.argv[3:]
result = {"passed": True, "error": ""}
scope = {"__name__": "__main__", "__file__": sys.argv[1]}  # kept when a check fails
try:
    exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), scope)
except AssertionError as e:
    result.update(passed=False, error="AssertionError: " + str(e)[:200])
for n in names:
    v = scope.get(n)
    result[n] = float(v) if isinstance(v, (int, float)) or hasattr(v, "__float__") else None
print("RESULT " + json.dumps(result))
"""


def source_of(prefix: str) -> Path:
    """The tutorial source whose name starts with ``prefix`` (exactly one must)."""
    found = sorted(SRC.glob(f"{prefix}*.py"))
    if len(found) != 1:
        raise SystemExit(f"notebook_seeds: {prefix!r} names {len(found)} tutorial sources in "
                         f"tutorials/src (need exactly one)")
    return found[0]


def run_seed(source: Path, seed: int, show: list[str]) -> dict:
    """One full-size run of ``source`` with ``MINILORA_SEED=seed``; its JSON result line."""
    env = {**os.environ, "MINILORA_SEED": str(seed), "MPLBACKEND": "Agg",
           "OPENBLAS_NUM_THREADS": "1"}
    env.pop("MINILORA_FAST", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(source.parent.parent),
                           *show], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"seed": seed, **json.loads(line[7:])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"seed": seed, "passed": False, "error": tail[0][:200]}


def main(argv: list[str] | None = None) -> int:
    """Run the seeds (``--jobs`` at a time) and print one row per seed and the spread."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebook", help="the tutorial's number, e.g. 03")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--show", nargs="*", default=[], help="globals of the notebook to report")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one core each)")
    args = ap.parse_args(argv)
    source = source_of(args.notebook)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda s: run_seed(source, s, args.show), args.seeds))
    print(f"{source.name} at full size, seeds {args.seeds}")
    print(f"{'seed':>5} {'checks':>7} " + " ".join(f"{n:>12}" for n in args.show))
    for row in rows:
        vals = " ".join(f"{row.get(n):>12.4f}" if row.get(n) is not None else f"{'-':>12}"
                        for n in args.show)
        print(f"{row['seed']:>5} {'pass' if row['passed'] else 'FAIL':>7} {vals}"
              + (f"   {row['error']}" if row.get("error") else ""))
    for n in args.show:
        vals = [row[n] for row in rows if row.get(n) is not None]
        if vals:
            print(f"{n}: min {min(vals):.4f}, median {statistics.median(vals):.4f}, "
                  f"max {max(vals):.4f}")
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
