"""Peak memory (RSS) of compiling and running a long-context model with attnrewrite, one process per length.

The llama target shaped like issue 14's model (:func:`bench.decode_cpu.model_config`: 4 layers, width 256,
8 query / 4 key-value heads of 32, float32, batch 1) is rewritten with ``attnrewrite.rewrite(model, to=KIND,
compiler="eager", strict=True)`` and run once on T random tokens under ``no_grad``; the first call
compiles (capture, matching, float64 certification of each site at its real size) and runs.  The peak
resident set size of the process is printed after it (``--no-rewrite``: the model run eagerly, as it is).
Peak RSS only grows, so each length needs a process of its own:

    for T in 1024 2048 4096; do PYTHONPATH=. python bench/compile_memory.py $T; done
    PYTHONPATH=. python bench/compile_memory.py 4096 --no-rewrite
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import attnrewrite
from attnrewrite.targets.llama import Llama
from bench.decode_cpu import model_config


def peak_rss_mib() -> int:
    """The process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int, help="sequence length T")
    parser.add_argument("--kind", default="softmax", help="attention kind to rewrite to")
    parser.add_argument("--no-rewrite", action="store_true", help="run the model eagerly, without attnrewrite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = model_config(args.length)
    tokens = torch.randint(0, config.vocab_size, (1, args.length))
    model = Llama(config)
    if not args.no_rewrite:
        attnrewrite.rewrite(model, to=args.kind, compiler="eager", strict=True)
    label = "eager, no rewrite" if args.no_rewrite else f"rewritten to {args.kind}"
    with torch.no_grad():
        start = time.perf_counter()
        model(tokens)
        first = time.perf_counter() - start
    print(f"T={args.length} {label}: first call {first:.1f} s, peak RSS {peak_rss_mib()} MiB")


if __name__ == "__main__":
    main()
