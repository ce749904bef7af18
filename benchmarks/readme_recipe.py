"""Time each step of the README's "Fine-tune your own model" recipe, each a fresh `minilora`
process, and print a table (command, wall seconds, the line it ends with).

    python benchmarks/readme_recipe.py            # in a temporary directory, removed after
    python benchmarks/readme_recipe.py --keep DIR # leave the runs in DIR
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = [
    "train --task add --out runs/base",
    "finetune --from runs/base --task nocarry --out runs/nocarry",
    "eval --checkpoint runs/base --adapter runs/nocarry --show 0",
    "finetune --from runs/base --task nocarry --qlora --out runs/nocarry-q",
    "merge --checkpoint runs/base --adapter runs/nocarry --out runs/merged",
    "merge --checkpoint runs/base --adapter runs/nocarry --into nf4 --out runs/merged-nf4",
    "quantize --checkpoint runs/base --out runs/base-nf4",
    "export --checkpoint runs/base --to hf --out hf/base",
    "export --checkpoint runs/base --adapter runs/nocarry --to peft --out hf/nocarry",
    "inspect runs/nocarry",
]
TRAINING = ("train", "finetune")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep what is written")
    args = parser.parse_args()
    where = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="minilora-recipe-"))
    where.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in STEPS:
        argv = shlex.split(step) + (["--no-progress"] if step.split()[0] in TRAINING else [])
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "minilora", *argv], cwd=where,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            print(f"FAILED: minilora {step}\n{done.stderr}", file=sys.stderr)
            return 1
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        rows.append((step, seconds, last))
    width = max(len(s) for s, _, _ in rows)
    print(f"{'minilora ...':<{width}}  {'s':>6}  last line")
    for step, seconds, last in rows:
        print(f"{step:<{width}}  {seconds:6.1f}  {last[:90]}")
    print(f"{'total':<{width}}  {sum(s for _, s, _ in rows):6.1f}")
    if not args.keep:
        import shutil

        shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
