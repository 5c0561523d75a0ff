"""Whole-model forward on the CPU: the summary and hashed kinds (default options) against the exact softmax rewrite.

Issue 14's targets for these kinds: in the forward of its model (4 layers, width 256, 8 query / 4 key-value
heads of 32; here the llama target of that shape, as in ``bench/decode_cpu.py --prompt``), summary and
hashed at least as fast as the exact rewrite at T = 4k and twice as fast at 8k, on one thread.  Every kind
is rewritten with ``attnrewrite.rewrite(model, to=kind, compiler="eager", strict=True)`` and its default
options; the kinds are timed in turn at each repeat (interleaved, so that load on a shared machine hits
them alike) under ``torch.no_grad``, and the table gives the medians and the ratios of the softmax
rewrite's time to each kind's (higher is faster), in CPU time of the process (``--wall``: wall-clock).
``--backward`` adds a forward+backward column (a training step of the model; the op's gradients with ``--ops``).
``--ops`` times one attention call instead of the model: q [1, 8, T, 32] against k, v [1, 4, T, 32],
causal, SDPA (what the softmax rewrite runs) against the two ops with default options.  Times are the
process's CPU time (one thread: what the shared machine's other jobs do not inflate; ``--wall`` for wall time),
and ``--kinds softmax,summary`` limits the run to those kinds.

    PYTHONPATH=. python bench/sparse_kinds_cpu.py --lengths 4096 8192 --repeats 3
    PYTHONPATH=. python bench/sparse_kinds_cpu.py --ops --lengths 4096 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


CLOCK = time.process_time  # CPU time of this process (one torch thread): load from other jobs does not count


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def run(length: int, kinds: list[str], repeats: int, backward: bool) -> list[dict]:
    import attnrewrite
    from attnrewrite.targets.llama import Llama
    from bench.decode_cpu import model_config

    config = model_config(length)
    tokens = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    models = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = Llama(config)
        attnrewrite.rewrite(model, to=kind, compiler="eager", strict=True)
        with torch.no_grad():  # compile outside the timing, on short sequences first (the pass checks each site
            for warm in (256, 512, length):  # on the shapes it compiles for; the second length makes them dynamic)
                model(tokens[:, :warm])
        if backward:
            model(tokens).float().mean().backward()
        models[kind] = model
    forward = {kind: [] for kind in kinds}
    both = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind, model in models.items():
            with torch.no_grad():
                forward[kind].append(timed(lambda: model(tokens)))
            if backward:
                model.zero_grad(set_to_none=True)
                both[kind].append(timed(lambda: model(tokens).float().mean().backward()))
    rows = []
    base_f = statistics.median(forward[kinds[0]])
    base_b = statistics.median(both[kinds[0]]) if backward else None
    for kind in kinds:
        f = statistics.median(forward[kind])
        row = dict(length=length, kind=kind, forward_s=f, forward_ratio=base_f / f)
        if backward:
            b = statistics.median(both[kind])
            row.update(forward_backward_s=b, forward_backward_ratio=base_b / b)
        rows.append(row)
    return rows


def run_ops(length: int, kinds: list[str], repeats: int, backward: bool = False) -> list[dict]:
    """One causal attention call per kind, interleaved; ratios to SDPA (module docstring).  With ``backward``
    also forward+backward of the call (the gradient of a fixed weighted sum of the output)."""
    import torch.nn.functional as F

    from attnrewrite import ops

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, length, 32, generator=generator)
    k, v = (torch.randn(1, 4, length, 32, generator=generator) for _ in range(2))
    calls = {"softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "summary": lambda q, k, v: ops.summary_attention(q, k, v, is_causal=True, enable_gqa=True),
             "hashed": lambda q, k, v: ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True)}
    calls = {name: calls[name] for name in kinds}
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    weights = torch.randn(1, 8, length, 32, generator=generator)

    def both(call):
        torch.autograd.grad((call(*leaves) * weights).sum(), leaves)

    times = {name: [] for name in calls}
    both_times = {name: [] for name in calls}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for name, call in calls.items():
            with torch.no_grad():
                times[name].append(timed(lambda: call(q, k, v)))
            if backward:
                both_times[name].append(timed(lambda: both(call)))
    base = statistics.median(times[kinds[0]][1:])
    rows = []
    for name, t in times.items():
        row = dict(length=length, kind=name, forward_s=statistics.median(t[1:]),
                   forward_ratio=base / statistics.median(t[1:]))
        if backward:
            b, base_b = statistics.median(both_times[name][1:]), statistics.median(both_times[kinds[0]][1:])
            row.update(forward_backward_s=b, forward_backward_ratio=base_b / b)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--kinds", default="softmax,summary,hashed", help="comma-separated, the baseline first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--ops", action="store_true", help="one attention call per kind instead of the model")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of this process's CPU time")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    what = ("one call, q [1, 8, T, 32], k/v [1, 4, T, 32], causal (softmax = SDPA)" if args.ops else
            "llama target 4 layers, width 256, 8q/4kv heads x 32, batch 1")
    print(f"sparse_kinds_cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), commit {commit.strip() or '?'}; {what}, float32; default options; "
          f"median of {args.repeats} ({'wall' if args.wall else 'CPU'} time), ratios = {kinds[0]} / kind")
    head = "| T | kind | forward | vs " + kinds[0] + (" | forward+backward | vs " + kinds[0] if args.backward else "")
    print(head + " |")
    print("|---" * (6 if args.backward else 4) + "|", flush=True)
    rows = []
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        for length in args.lengths:  # each length's rows printed as soon as they are measured
            measured = run_ops(length, kinds, args.repeats, args.backward) if args.ops else run(length, kinds, args.repeats, args.backward)
            for row in measured:
                rows.append(row)
                line = f"| {row['length']} | {row['kind']} | {row['forward_s']:.3f} s | {row['forward_ratio']:.2f}× "
                if args.backward:
                    line += f"| {row['forward_backward_s']:.3f} s | {row['forward_backward_ratio']:.2f}× "
                print(line + "|", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
