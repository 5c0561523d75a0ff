"""CPU time of the linear kind's torch path against SDPA softmax, causal, forward and forward+backward.

    python bench/linear_cpu_path.py [--T 16384] [--heads 8] [--dim 64] [--threads 1]

Times are process CPU seconds (not wall clock), so a busy shared machine skews them less;
with --threads 1 they are the single-core cost.  One layer's attention only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnrewrite.kernels.linear import linear_attention_dispatch  # noqa: E402


def cpu_seconds(fn, backward: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        best = min(best, time.process_time() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.T, args.dim, requires_grad=True) for _ in range(3))
    impls = {"linear (torch path)": lambda: linear_attention_dispatch(q, k, v, is_causal=True, impl="torch"),
             "sdpa softmax": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    results = {}
    for name, fn in impls.items():
        repeats = 3 if name.startswith("linear") else 1  # softmax at 16k takes seconds per call
        fn()  # warm-up
        results[name] = (cpu_seconds(fn, False, repeats), cpu_seconds(fn, True, repeats))
    print(f"T={args.T} heads={args.heads} D={args.dim} threads={args.threads} (CPU seconds, best of runs)")
    for name, (fwd, both) in results.items():
        print(f"  {name:22s} fwd {fwd:8.3f}   fwd+bwd {both:8.3f}")
    (lf, lb), (sf, sb) = results["linear (torch path)"], results["sdpa softmax"]
    print(f"  softmax / linear:      fwd {sf / lf:8.1f}x  fwd+bwd {sb / lb:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
