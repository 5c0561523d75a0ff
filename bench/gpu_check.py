"""One prepared GPU check: every kernel against its reference, then timed against torch SDPA.

Usage (on a machine with a CUDA GPU; a few minutes in all):

    python bench/gpu_check.py [--quick] [--only sigmoid,linear] [--out bench/out/gpu_check.md]

Each kernel family contributes a module ``bench/gpu_checks/<family>.py`` with

    NAME: str
    def correctness(device) -> list[dict]   # rows: case, dtype, max_err, bound, ok
    def timings(device, quick: bool) -> list[dict]   # rows: case, shape, ms, tflops, baseline, ratio ...

Rows are printed as markdown tables and written to ``--out`` (and to ``$OUT`` when set,
so a device run brings the table back).  The exit code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))


def families() -> list[str]:
    return sorted(p.stem for p in (HERE / "gpu_checks").glob("*.py") if not p.stem.startswith("_"))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--out", default=str(HERE / "out" / "gpu_check.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to do", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    chosen = [f for f in families() if not args.only or f in args.only.split(",")]
    name = torch.cuda.get_device_name(device)
    header = (f"# GPU check — {name}, {dt.date.today().isoformat()}\n\n"
              f"torch {torch.__version__}, triton {importlib.import_module('triton').__version__}, "
              f"CUDA {torch.version.cuda}\n\n")
    report, failed = [header], False
    for fam in chosen:
        module = importlib.import_module(f"gpu_checks.{fam}")
        for part in ("correctness", "timings"):
            start = time.perf_counter()
            try:
                rows = module.correctness(device) if part == "correctness" else module.timings(device, args.quick)
            except Exception:  # noqa: BLE001 — one family's crash must not hide the others' tables
                rows, failed = [], True
                report.append(f"## {module.NAME}: {part} crashed\n\n```\n{traceback.format_exc()}```\n")
                print(report[-1], flush=True)
                continue
            failed |= any(r.get("ok") is False for r in rows)
            section = f"## {module.NAME}: {part} ({time.perf_counter() - start:.0f} s)\n\n{markdown(rows)}\n"
            report.append(section)
            print(section, flush=True)

    text = "".join(report)
    outs = [Path(args.out)] + ([Path(os.environ["OUT"]) / "gpu_check.md"] if os.environ.get("OUT") else [])
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
