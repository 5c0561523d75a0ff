"""Peak memory of one T5 self-attention layer rewritten to sigmoid, forward and backward, at a long sequence:
its relative position bias as a dense [1, H, T, T] mask (the rewrite before issue 16) vs read by distance
from the table R [H, 2T − 1] (``position="relative"``).

``--kind hashed``: a causal T5 decoder self-attention layer (``is_decoder``, the causal mask built from
``arange``) rewritten to hashed (its default options): before, hashed skipped the site ("a mask that differs
across heads"), so ``dense`` is the layer as it ran then — unrewritten, softmax over the dense bias — and
``relative`` is hashed reading R per selected key.

Each variant runs in its own process (peak RSS, ``ru_maxrss``, is per process): the layer is compiled with the
attnrewrite backend (``dynamic=True``) on 16 tokens, then run once at T tokens, forward and backward; the line
printed is the process's peak RSS minus its RSS just before the long call.

    python bench/relative_bias_memory.py --length 4096
    python bench/relative_bias_memory.py --length 4096 --kind hashed
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(variant: str, length: int, heads: int, d_model: int, kind: str = "sigmoid") -> dict:
    import torch
    import transformers as T

    import attnrewrite  # noqa: F401
    from attnrewrite.patterns import relative
    from attnrewrite.rewriter.report import Report
    from attnrewrite.testing.checks import compile_rewritten

    torch.set_num_threads(1)
    if variant == "dense":  # the rewrite as it was: the bias stays an additive [1, H, T, T] mask
        relative.as_relative_bias = lambda site, evaluator: (None, [])
    config = T.T5Config(d_model=d_model, d_kv=d_model // heads, num_heads=heads, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, dropout_rate=0.0, is_decoder=kind == "hashed")
    torch.manual_seed(0)
    layer = T.models.t5.modeling_t5.T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    layer.config._attn_implementation = "eager"
    report = Report(to=kind)
    if kind == "hashed":  # causal: T5's decoder bias (one direction) and a causal mask from arange
        def run(x):
            position = torch.arange(x.shape[1])
            causal = torch.zeros(x.shape[1], x.shape[1]).masked_fill(position[None, :] > position[:, None],
                                                                     float("-inf"))
            return layer(x, mask=causal[None, None])[0]

        compiled = compile_rewritten(run, report, dynamic=True, to="hashed", strict=variant == "relative")
    else:
        compiled = compile_rewritten(lambda x: layer(x)[0], report, dynamic=True, to="sigmoid", strict=True,
                                     bias=-3.0)
    compiled(torch.randn(1, 16, d_model, requires_grad=True)).sum().backward()
    x = torch.randn(1, length, d_model, requires_grad=True)
    before = _rss_mib()
    start = time.process_time()
    compiled(x).sum().backward()
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes = [n for s in report.sites for n in s.notes if "R[h, j" in n]
    return {"variant": variant, "kind": kind, "length": length, "peak_over_start_mib": round(peak - before, 1),
            "cpu_s": round(seconds, 2), "relative": bool(notes), "sites": len(report.sites),
            "rewritten": sum(s.status == "rewritten" for s in report.sites),
            "grad_ok": bool(layer.relative_attention_bias.weight.grad.abs().sum() > 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--variant", choices=["dense", "relative"])
    parser.add_argument("--kind", choices=["sigmoid", "hashed"], default="sigmoid")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.length, args.heads, args.d_model, args.kind)))
        return
    print(f"T5 self-attention -> {args.kind}, T={args.length}, H={args.heads}, d_model={args.d_model}, torch path, "
          f"forward + backward, 1 thread")
    for variant in ("dense", "relative"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--length", str(args.length),
                              "--heads", str(args.heads), "--d-model", str(args.d_model), "--kind", args.kind],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
