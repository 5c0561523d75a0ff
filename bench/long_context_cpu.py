"""One attention layer at long context on the CPU: softmax (torch SDPA) against the linear kind.

For T = 1k … 16k, times forward and forward+backward of causal attention (B=1, 8 heads, D=64)
for ``F.scaled_dot_product_attention`` and ``attnrewrite.ops.linear_attention`` (its CPU path),
alternating the two so that machine noise hits both, and prints median times and ratios.
Peak memory is measured separately, each case in a fresh process: the growth of the peak
resident set over the process's baseline, with large allocations served by mmap so that it
follows the live tensors.  Writes a plot when matplotlib is installed.

    python bench/long_context_cpu.py [--lengths 1024,2048,4096,8192,16384] [--plot bench/out/long_context_cpu.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def inputs(t: int, heads: int, dim: int, grad: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, t, dim, generator=g).requires_grad_(grad) for _ in range(3)]


def run_once(kind: str, t: int, heads: int, dim: int, backward: bool) -> float:
    import torch
    import torch.nn.functional as F

    from attnrewrite import ops

    q, k, v = inputs(t, heads, dim, backward)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if kind == "softmax":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = ops.linear_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure_peak_mb(kind: str, t: int, heads: int, dim: int, backward: bool) -> float:
    """In this process: peak resident-set growth of one call (MB). Linux only.

    ``ru_maxrss`` is no use here (it carries over the peak of the process that forked this one);
    the high-water mark ``VmHWM`` is reset by writing 5 to /proc/self/clear_refs.
    """
    run_once(kind, 256, heads, dim, backward)  # warm up imports and kernels
    base = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_once(kind, t, heads, dim, backward)
    return (_status_kb("VmHWM:") - base) / 1024


def peak_memory_mb(kind: str, t: int, heads: int, dim: int, backward: bool) -> float:
    """Peak RSS growth of one call, measured in a fresh process (MB)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r});"
            "import long_context_cpu as b, torch; torch.set_num_threads(1);"
            f"print(b.measure_peak_mb({kind!r}, {t}, {heads}, {dim}, {backward}))")
    # Large allocations straight from mmap (a fixed threshold also stops glibc from raising it):
    # each big tensor then adds to the resident set while alive and returns it when freed, so
    # the peak RSS growth follows the live tensors instead of reused heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--plot", default=str(ROOT / "bench" / "out" / "long_context_cpu.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(t) for t in args.lengths.split(",")]

    print(f"causal attention, B=1, {args.heads} heads, D={args.dim}, fp32; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s)\n")
    rows = []
    for t in lengths:
        row = {"T": t}
        for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
            times = {"softmax": [], "linear": []}
            run_once("linear", min(t, 512), args.heads, args.dim, backward)
            for _ in range(args.repeats):  # alternate, so noise hits both
                for kind in times:
                    times[kind].append(run_once(kind, t, args.heads, args.dim, backward))
            for kind in times:
                row[f"{kind} {name} s"] = statistics.median(times[kind])
            row[f"ratio {name}"] = row[f"softmax {name} s"] / row[f"linear {name} s"]
            if not args.no_memory:
                for kind in times:
                    row[f"{kind} {name} MB"] = peak_memory_mb(kind, t, args.heads, args.dim, backward)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, axes = plt.subplots(1, 2 if not args.no_memory else 1, figsize=(10, 4), squeeze=False)
    for kind in ("softmax", "linear"):
        axes[0][0].plot(lengths, [r[f"{kind} fwd+bwd s"] for r in rows], marker="o", label=f"{kind} fwd+bwd")
        axes[0][0].plot(lengths, [r[f"{kind} fwd s"] for r in rows], marker=".", linestyle="--", label=f"{kind} fwd")
        if not args.no_memory:
            axes[0][1].plot(lengths, [r[f"{kind} fwd+bwd MB"] for r in rows], marker="o", label=kind)
    axes[0][0].set(xscale="log", yscale="log", xlabel="T", ylabel="seconds", title="time (1 layer, CPU)")
    axes[0][0].legend()
    if not args.no_memory:
        axes[0][1].set(xscale="log", yscale="log", xlabel="T", ylabel="MB", title="peak memory growth, fwd+bwd")
        axes[0][1].legend()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
