"""KV-cache generation, minilora against Hugging Face ``generate``: same weights, greedy.

    python benchmarks/generate.py                          # reference config, batch 1 and 8
    python benchmarks/generate.py --size gpt2-small --new-tokens 64
    python benchmarks/generate.py --quick                  # seconds

Both sides get the same weights (minilora's GPT, written into a ``GPT2LMHeadModel`` through
``minilora.interop.hf_state_dict``), the same prompt (B rows of ``--prompt`` random tokens) and
generate ``--new-tokens`` tokens greedily with their KV cache: ``model.generate(idx, n,
temperature=0)`` against ``hf.generate(idx, max_new_tokens=n, do_sample=False, use_cache=True,
min_new_tokens=n)`` under ``torch.inference_mode`` (PyTorch at its default threads, minilora's
OpenBLAS at its own). The calls alternate in rounds, each side first in turn; reported are the
median tokens/s (B * n / seconds per call) and their ratio, minilora / HF (above 1: minilora is
faster), and whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minilora as ml  # noqa: E402
from minilora.gpt import GPT, GPTConfig  # noqa: E402
from minilora.interop import hf_config, hf_state_dict  # noqa: E402

SIZES = {"reference": dict(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=256),
         "gpt2-small": dict(vocab_size=50257, block_size=256, n_layer=12, n_head=12,
                            n_embd=768),
         "quick": dict(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=128)}


def build(cfg: GPTConfig, seed: int = 0):
    """minilora's GPT (eval mode) and the GPT2LMHeadModel with the same weights."""
    import torch
    import transformers

    ml.manual_seed(seed)
    model = GPT(cfg)
    model.eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(cfg)))
    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    return model, hf.eval()


def speeds(cfg: GPTConfig, batch: int, prompt: int, new: int, rounds: int) -> dict:
    """Median tokens/s of both sides over alternating rounds, their ratio, same tokens or not."""
    import torch

    model, hf = build(cfg)
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt))
    tidx = torch.from_numpy(idx)
    mask = torch.ones_like(tidx)

    def ours():
        return ml.backend.to_numpy(model.generate(idx, new, temperature=0.0))

    def theirs():
        with torch.inference_mode():
            return hf.generate(tidx, attention_mask=mask, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, use_cache=True,
                               pad_token_id=0).numpy()
    same = bool(np.array_equal(ours(), theirs()))  # also the warm-up of both
    times: dict = {"minilora": [], "hf": []}
    for r in range(rounds):
        order = (("minilora", ours), ("hf", theirs))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tok = {k: batch * new / statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "rounds": rounds,
            "minilora_tok_s": tok["minilora"], "hf_tok_s": tok["hf"],
            "ratio": tok["minilora"] / tok["hf"], "same_tokens": same}


def main() -> None:
    """Parse the command line, run batch 1 and 8 (or --batch), print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("reference", "gpt2-small"), default="reference")
    ap.add_argument("--quick", action="store_true", help="a tiny model, few tokens, 2 rounds")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens to generate (default: 112 reference, 64 gpt2-small, 16 quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7)")
    args = ap.parse_args()
    size = "quick" if args.quick else args.size
    cfg = GPTConfig(**SIZES[size])
    new = args.new_tokens or {"reference": 112, "gpt2-small": 64, "quick": 16}[size]
    rounds = args.rounds or (2 if args.quick else 7)
    if args.prompt + new > cfg.block_size:
        ap.error(f"--prompt {args.prompt} + --new-tokens {new} exceeds block_size "
                 f"{cfg.block_size}")
    import torch
    import transformers

    print(f"generation, minilora against Hugging Face generate: {os.cpu_count()} cpus, numpy "
          f"{np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; size {size} {cfg.to_dict()}; prompt "
          f"{args.prompt}, {new} new tokens, greedy, KV cache on both; {rounds} rounds, "
          f"alternating; load average {os.getloadavg()[0]:.2f}")
    print("| batch | minilora tok/s | HF generate tok/s | minilora / HF | same tokens |\n"
          "|---:|---:|---:|---:|---|")
    for b in args.batch:
        r = speeds(cfg, b, args.prompt, new, rounds)
        print(f"| {b} | {r['minilora_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f}x | "
              f"{r['same_tokens']} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
