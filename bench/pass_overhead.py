"""How much time the rewrite pass adds to ``torch.compile`` of a 24-layer HF Llama.

For each compiler (the eager runner and inductor) the model is compiled twice in one run:
once with the plain backend, once with attnrewrite in front of it.  Printed: total compile
time (first call) of each, the pass's own time (measured inside the pass), and the pass's
share of the attnrewrite compile.  Target: under 2 % of inductor's compile time.

    python bench/pass_overhead.py [--layers 24] [--hidden 256] [--seq 128] [--compilers eager,inductor]
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(layers: int, hidden: int):
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def first_call_seconds(model, backend, ids) -> float:
    import torch

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=ids)
    return time.perf_counter() - start


def main(argv=None) -> int:
    import torch

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.report import Report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compilers", default="eager,inductor")
    args = parser.parse_args(argv)

    model = build(args.layers, args.hidden)
    ids = torch.randint(0, 1000, (1, args.seq))
    print(f"HF Llama, {args.layers} layers, hidden {args.hidden}, GQA 8/4 heads, eager attention, seq {args.seq}; "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads\n")
    rows = []
    for compiler in args.compilers.split(","):
        plain = "eager" if compiler == "eager" else "inductor"
        baseline = first_call_seconds(model, plain, ids)
        report = Report()
        ours = functools.partial(attnrewrite_backend, options={"compiler": compiler}, _report_sink=report.merge)
        total = first_call_seconds(model, ours, ids)
        rows.append((compiler, baseline, total, report.seconds, len(report.rewritten)))

    print("| compiler | compile without pass (s) | compile with pass (s) | pass (s) | pass / compile | sites |")
    print("|---|---|---|---|---|---|")
    for compiler, baseline, total, pass_s, sites in rows:
        print(f"| {compiler} | {baseline:.2f} | {total:.2f} | {pass_s:.3f} | {100 * pass_s / total:.2f} % | "
              f"{sites}/{args.layers} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
