"""Compile the summary kernels for a Hopper GPU on a machine without one, and report their resources.

    python bench/summary_aot.py [--arch 90] [--all] [--heads 64,128,256] [--features [gqa,varlen,...]] [--mods softcap,...]

The pipeline and the report are those of ``bench/sigmoid_aot.py`` (its compile-only driver and its
``ptxas -v`` reading): registers per thread, spilled bytes, shared memory, whether the matrix products
became wgmma instructions and whether ptxas serialised them (C7511).  Without ``--all`` the spaces'
defaults are compiled for D = 64, 128 and 256, causal and not, bf16, chunk 8 and a window of 128
chunks; ``--features`` compiles the input variants the kernels specialise on (GQA, key padding, odd
head dims, fp16, fp32, three packed sequences: varlen) at d128, causal.  The dK/dV kernel is compiled twice: over the raw keys
(``bwd_dkdv``) and over the summaries (``bwd_dkdv_summary``); ``decode`` is the decode kernel over a
store slice (4 query heads per key/value head).  ``--mods`` compiles the defaults, causal, with each named
score modification compiled in (``sigmoid_aot.SCORE_MODS``; not the decode kernel, which takes none).  It
never runs a kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("summary_aot: unset TRITON_INTERPRET; this compiles real kernels")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import triton  # noqa: E402

import sigmoid_aot  # noqa: E402  (the compile-only driver, the launch recorder and the ptxas reading)

CHUNK, WINDOW, LENGTH = 8, 128, 4096


def compile_case(kernel: str, config: dict, head: int, causal: bool, feature: str = "") -> dict:
    """Compile one kernel ("fwd", "bwd_dq", "bwd_dkdv", "bwd_dkdv_summary") for one configuration."""
    from attnrewrite.kernels import score_mods
    from attnrewrite.kernels.summary.triton_bwd import summary_bwd
    from attnrewrite.kernels.summary.triton_decode import summary_decode
    from attnrewrite.kernels.summary.triton_fwd import summary_fwd

    from attnrewrite.kernels.summary.packed import packing

    batch, heads_q, heads_kv, dim_v = 2, 4, 4, head
    pack = None
    if feature == "varlen":  # three packed sequences of unequal lengths, one not a multiple of the chunk
        batch = 1
        pack = packing(torch.tensor([0, 1000, 2501, LENGTH], dtype=torch.int32), LENGTH, CHUNK)
    if feature == "gqa":
        heads_kv = 1
    if feature == "odd_dims":
        head, dim_v = 80, 96
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(feature, torch.bfloat16)
    n_chunks = -(-LENGTH // CHUNK) if pack is None else pack.slots
    q = torch.empty(batch, heads_q, LENGTH, head, dtype=dtype)
    k = torch.empty(batch, heads_kv, LENGTH, head, dtype=dtype)
    v = torch.empty(batch, heads_kv, LENGTH, dim_v, dtype=dtype)
    k_sum = torch.empty(batch, heads_kv, n_chunks, head, dtype=dtype)
    v_sum = torch.empty(batch, heads_kv, n_chunks, dim_v, dtype=dtype)
    exists = torch.ones(batch, n_chunks, dtype=torch.bool)
    key_valid = torch.ones(batch, LENGTH, dtype=torch.bool) if feature == "padding" else None
    program = score_mods.parse(sigmoid_aot.SCORE_MODS.get(feature))
    launch = sigmoid_aot.launcher(feature, program)
    common = (q, k, v, k_sum, v_sum, exists, key_valid)
    if kernel == "decode":  # one token against a store slice of T/C - W summaries + the window (GROUP 4 rows)
        entries = n_chunks - WINDOW + WINDOW * CHUNK + 1
        store_k = torch.empty(batch, 1, entries + 64, head, dtype=dtype)
        store_v = torch.empty(batch, 1, entries + 64, dim_v, dtype=dtype)
        summary_decode(q[:, :, :1], store_k[:, :, :entries], store_v[:, :, :entries],
                       key_valid[:, :entries] if key_valid is not None else None, launch=launch, **config)
    elif kernel == "fwd":
        summary_fwd(*common, 0.1, causal, CHUNK, WINDOW, config, launch=launch, program=program, pack=pack)
    else:
        lse = torch.empty(batch, heads_q, LENGTH)
        which = {"bwd_dq": ("dq",), "bwd_dkdv": ("dkdv",), "bwd_dkdv_summary": ("dkdv_summary",)}[kernel]
        summary_bwd(*common, torch.empty_like(q[..., :dim_v]), lse, lse, 0.1, causal, CHUNK, WINDOW, config, config,
                    launch=launch, kernels=which, program=program, pack=pack)
    (_, compiled), = launch.kernels
    return sigmoid_aot.resources(compiled)


FEATURES = ("gqa", "padding", "odd_dims", "fp16", "fp32", "varlen")
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv", "bwd_dkdv_summary", "decode")
DECODE_CONFIG = {"block_n": 64, "num_warps": 4}  # summary_decode's defaults (no tuning space yet)


def _space_kernel(kernel: str) -> str:
    return "bwd_dkdv" if kernel == "bwd_dkdv_summary" else kernel


def _shape(head: int, causal: bool, dtype: str = "16bit") -> dict:
    return {"D": head, "DV": head, "T": LENGTH, "window": (WINDOW + 1) * CHUNK, "chunk": CHUNK, "causal": int(causal),
            "dtype": dtype}


def main(args) -> int:
    from attnrewrite.kernels.summary import spaces

    sigmoid_aot.ARGS = argparse.Namespace(arch=args.arch, sass=False)
    triton.runtime.driver.set_active(sigmoid_aot._CompileOnlyDriver(args.arch))
    print("| kernel | D | causal | feature | config | regs | spill B | smem B | wgmma | serialized |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    plan = []
    if args.mods:
        for feature in args.mods:
            for head in args.heads:
                for kernel in KERNELS[:-1]:  # not decode
                    space = spaces.SPACES[f"{_space_kernel(kernel)}_d{head}"]
                    plan.append((kernel, head, True, feature, dict(space.default)))
    elif args.features:
        for feature in args.features:
            for kernel in KERNELS:
                if kernel == "decode" and feature == "varlen":  # decoding is one sequence per cache row
                    continue
                if kernel == "decode":
                    plan.append((kernel, 128, True, feature, dict(DECODE_CONFIG)))
                    continue
                space = spaces.SPACES[f"{_space_kernel(kernel)}_d128"]
                shape = _shape(128, True, "fp32" if feature == "fp32" else "16bit")
                plan.append((kernel, 128, True, feature, spaces.fit(space, space.default, shape)))
    else:
        for head in args.heads:
            for kernel in KERNELS:
                if kernel == "decode":
                    plan.append((kernel, head, True, "", dict(DECODE_CONFIG)))
                    continue
                space = spaces.SPACES[f"{_space_kernel(kernel)}_d{head}"]
                configs = space.configs(_shape(head, True)) if args.all else [dict(space.default)]
                for config in configs:
                    for causal in ((True,) if args.all else (True, False)):
                        plan.append((kernel, head, causal, "", config))
    failures = 0
    for kernel, head, causal, feature, config in plan:
        label = ",".join(f"{k}={v}" for k, v in config.items())
        try:
            r = compile_case(kernel, config, head, causal, feature)
        except Exception as exc:  # noqa: BLE001 — report every failing point, go on
            failures += 1
            print(f"| {kernel} | {head} | {int(causal)} | {feature} | {label} | FAILED: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:120]} |", flush=True)
            continue
        print(f"| {kernel} | {head} | {int(causal)} | {feature} | {label} | {r['regs']} | {r['spill_bytes']} "
              f"| {r['smem']} | {r['wgmma']} | {r['wgmma_serialized']} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="every valid point of each space at T = 4096, causal")
    parser.add_argument("--heads", default="64,128,256", help="head-dim classes to compile (default: all)")
    parser.add_argument("--features", nargs="?", const=",".join(FEATURES), default="",
                        help="instead: the input variants (GQA, padding, odd dims, fp16, fp32, packed sequences) "
                        "at d128; optionally only these (comma-separated names of FEATURES)")
    parser.add_argument("--mods", default="", help="instead: these score modifications (names of "
                        "sigmoid_aot.SCORE_MODS, comma-separated) at the default configs, causal")
    parsed = parser.parse_args()
    parsed.mods = [m for m in parsed.mods.split(",") if m]
    unknown = set(parsed.mods) - set(sigmoid_aot.SCORE_MODS)
    if unknown:
        parser.error(f"unknown --mods {sorted(unknown)}; known: {', '.join(sigmoid_aot.SCORE_MODS)}")
    parsed.heads = [int(h) for h in parsed.heads.split(",")]
    parsed.features = [f for f in parsed.features.split(",") if f]
    if set(parsed.features) - set(FEATURES):
        parser.error(f"unknown --features {sorted(set(parsed.features) - set(FEATURES))}; known: {', '.join(FEATURES)}")
    sys.exit(main(parsed))
