"""Command line: ``python -m attnrewrite <command>``.

Commands:
    demo   compile the pretrained MiniLM with the attnrewrite backend and show what changed
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnrewrite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="rewrite the pretrained MiniLM and compare its embeddings")
    demo.add_argument("--to", default="softmax", help="attention kind to rewrite to (default: softmax)")
    demo.add_argument("--compiler", default="eager", choices=("eager", "inductor"),
                      help="what runs the graph after the rewrite (default: eager, fastest to start)")
    demo.set_defaults(func=_cmd_demo)

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
