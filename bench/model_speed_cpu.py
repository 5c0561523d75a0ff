"""Whole-model speed of each attention kind on the CPU: the llama target rewritten to every kind.

For each kind of the registry that can honour the llama target (``Kind.expected_skips``), compiles the
model with attnrewrite (``compiler="eager"``, strict: every site rewritten) and times forward and
forward+backward on [B, T] tokens, the kinds taken in turn at every repeat so that machine noise hits
them alike; prints the median times and the ratio to softmax.  Options per kind are the defaults, with
``--window`` keys for the kinds that have a window (sliding_window, hashed; summary: window / chunk_size chunks).

    python bench/model_speed_cpu.py [--config char] [--batch 2] [--length 1024] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kinds_for_llama() -> list[str]:
    """The registry's kinds that rewrite every site of the llama target, softmax first."""
    import attnrewrite

    names = [n for n in attnrewrite.kinds.names() if "llama" not in attnrewrite.kinds.get(n).expected_skips]
    return sorted(names, key=lambda n: (n != "softmax", n))


def options_for(kind: str, window: int) -> dict:
    """The kind's window set to ``window`` keys (summary: window / chunk_size chunks); other options default."""
    import attnrewrite

    declared = attnrewrite.kinds.get(kind).options
    if "window_chunks" in declared:
        return {"window_chunks": max(1, window // declared["chunk_size"].default)}
    return {"window": window} if "window" in declared else {}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    # one code object (Llama.forward) compiled for every kind in both grad modes: raise the recompile
    # limit, and fail rather than silently time the original model past it
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        return run(argv)


def run(argv: list[str] | None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="char", help="llama config (default: char)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence T")
    parser.add_argument("--window", type=int, default=128, help="window of the kinds that take one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default=None, help="comma-separated kinds (default: every kind that fits)")
    args = parser.parse_args(argv)

    import torch

    import attnrewrite
    from attnrewrite.targets.llama import Llama, LlamaConfig

    torch.set_num_threads(args.threads)
    config = LlamaConfig.from_name(args.config, max_seq_len=max(args.length, 16))
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    kinds = args.kinds.split(",") if args.kinds else kinds_for_llama()

    models = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = Llama(config)
        attnrewrite.rewrite(model, to=kind, compiler="eager", strict=True, **options_for(kind, args.window))
        with torch.no_grad():
            model(tokens)                                   # compile outside the timing
        model(tokens).float().mean().backward()
        models[kind] = model

    forward = {k: [] for k in kinds}
    both = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind, model in models.items():
            with torch.no_grad():
                forward[kind].append(timed(lambda: model(tokens)))
            model.zero_grad(set_to_none=True)
            both[kind].append(timed(lambda: model(tokens).float().mean().backward()))

    print(f"llama/{args.config}, B={args.batch}, T={args.length}, window={args.window} (kinds that take one), "
          f"{args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}, {platform.machine()}")
    print("| kind | forward | ratio | forward+backward | ratio |")
    print("|---|---|---|---|---|")
    rows = []
    base_f, base_b = statistics.median(forward[kinds[0]]), statistics.median(both[kinds[0]])
    for kind in kinds:
        f, b = statistics.median(forward[kind]), statistics.median(both[kind])
        rows.append({"kind": kind, "forward_s": f, "forward_backward_s": b})
        label = f"{kind} (window {args.window})" if options_for(kind, args.window) else kind
        print(f"| {label} | {f:.3f} s | {f / base_f:.2f}× | {b:.3f} s | {b / base_b:.2f}× |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
