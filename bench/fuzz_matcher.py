"""Fuzz the matcher with thousands of random attention spellings and near misses; print the counts.

The programs come from :mod:`attnrewrite.testing.spellings` (the generator the CI test drives
with hypothesis); here a seeded RNG draws them, so every seed explores new ones.  A spelling of
real attention must be rewritten with the expected spec and the same output; a near miss must
stay untouched, bit for bit.  Exit status 1 when any example fails.

    python bench/fuzz_matcher.py [--attention 2000] [--near-misses 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_SIZES = {"heads", "kv_heads", "t_q", "t_k", "head_dim"}


def _reason_class(reason: str) -> str:
    """The reason without its particulars (shapes, node names, numbers), to count reasons by kind."""
    if not reason:
        return "no anchor (not a softmax / SDPA)"
    reason = re.sub(r"\(.*?\)|\[.*?\]", "…", reason.split(": ")[0])
    reason = re.sub(r"reused in [\w.]+", "reused in …", reason)
    return re.sub(r"(?<![\w])-?\d+(\.\d+)?", "N", reason)[:80]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", type=int, default=2000, help="spellings of real attention")
    parser.add_argument("--near-misses", type=int, default=1000, help="near misses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="failing examples to print")
    args = parser.parse_args(argv)

    import torch

    from attnrewrite.testing import spellings

    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    choose = lambda name, options: rng.choice(options)  # noqa: E731
    start = time.perf_counter()
    failures = []
    by_choice: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rewritten = 0
    for _ in range(args.attention):
        outcome = spellings.check(spellings.draw_attention(choose))
        ok = not outcome.problems
        rewritten += ok
        for name, value in outcome.program.choices.items():
            if name not in _SIZES:
                by_choice[f"{name}={value}"][ok] += 1
        if not ok:
            failures.append(outcome)
    untouched, false_positives = 0, 0
    reasons: collections.Counter = collections.Counter()
    by_miss: collections.Counter = collections.Counter()
    for _ in range(args.near_misses):
        outcome = spellings.check(spellings.draw_near_miss(choose))
        false_positives += any("FALSE POSITIVE" in p for p in outcome.problems)
        untouched += not outcome.problems
        by_miss[outcome.program.choices["near_miss"]] += 1
        for reason in outcome.reasons or [""]:
            reasons[_reason_class(reason)] += 1
        if outcome.problems:
            failures.append(outcome)
    seconds = time.perf_counter() - start

    machine = f"{platform.machine()}, {os.cpu_count()} CPU(s)"
    print(f"attnrewrite matcher fuzz — seed {args.seed}, torch {torch.__version__}, {machine}")
    print(f"real attention: {rewritten}/{args.attention} rewritten with the expected spec and output")
    print(f"near misses:    {untouched}/{args.near_misses} untouched; false positives: {false_positives}")
    print(f"time: {seconds:.0f} s ({seconds / max(1, args.attention + args.near_misses) * 1e3:.0f} ms per example)")
    print("\nreal attention by choice (ok / total):")
    for key in sorted(by_choice):
        c = by_choice[key]
        print(f"  {key:32s} {c[True]:5d} / {c[True] + c[False]}")
    print("\nnear misses by kind:")
    for key, n in sorted(by_miss.items()):
        print(f"  {key:32s} {n:5d}")
    print("\nwhy near misses were left alone (reason, first words):")
    for key, n in reasons.most_common():
        print(f"  {n:5d}  {key}")
    for outcome in failures[:args.show]:
        print(f"\nFAILED {outcome.program}\n  {outcome.problems}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
