"""The ``minilora`` command line.

    minilora demo        # a small end-to-end training example
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import functional as F
from . import nn, optim
from .backend import manual_seed, use_backend
from .tensor import Tensor


def _demo(args: argparse.Namespace) -> int:
    """Train a two-layer MLP on a synthetic classification task and report its accuracy."""
    use_backend(args.backend)
    manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n, d, classes = 2048, 16, 4
    centers = rng.standard_normal((classes, d)).astype(np.float32) * 2
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.standard_normal((n, d))).astype(np.float32)
    model = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, classes))
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = rng.integers(0, n, 128)
        loss = F.cross_entropy(model(Tensor(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    from .tensor import no_grad

    with no_grad():
        acc = float((model(Tensor(x)).numpy().argmax(-1) == y).mean())
    print(f"accuracy {acc:.3f} after {args.steps} steps in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="minilora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end example")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minilora`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
