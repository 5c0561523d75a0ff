"""Compile the sliding-window kernels for a Hopper GPU on a machine without one, and report their resources.

    python bench/sliding_window_aot.py [--arch 90] [--heads 64,128,256] [--features [--only ...] [--mod-defaults]]
                                       [--sass] [--mods softcap,...]

The machinery of ``bench/sigmoid_aot.py`` (a compile-only CUDA driver, ``ptxas -v`` on the PTX): for the
default configuration of each kernel (forward, dQ, dK/dV) and head-dim class, causal and symmetric, bf16,
window 1024 and 4 sinks, it prints registers per thread, spilled bytes, shared memory, whether the
products became wgmma instructions and whether ptxas serialised them (C7511).  ``--features`` instead
compiles every input variant the kernels specialise on at d128 (GQA, a float mask, kv_lens, no sinks,
odd head dims, fp16, fp32, ALiBi computed from slopes, a relative bias table R read by diagonal with dR by
atomics, alone and after a soft-cap; ``--only`` picks some; ``--mod-defaults``: at the configurations the launcher
takes for a call with a score modification or a position bias, ``spaces.with_mod_default``).  ``--mods`` instead compiles the default configurations, causal, with each named score
modification compiled in (``sigmoid_aot.SCORE_MODS``: ``softcap`` and one program per other nonlinear
function).  It never runs a kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sliding_window_aot: unset TRITON_INTERPRET; this compiles real kernels")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

import sigmoid_aot  # noqa: E402  (the compile-only driver and the ptxas report)

FEATURES = ("gqa", "float_mask", "kv_lens", "no_sinks", "odd_dims", "fp16", "fp32", "alibi", "alibi_abs", "relative",
            "relative_softcap")


def compile_case(kernel: str, config: dict, head: int, causal: bool, feature: str = "", length: int = 4096,
                 window: int = 1024, sinks: int = 4) -> dict:
    """Compile one kernel for one configuration; ``feature`` selects an input variant (see FEATURES)."""
    from attnrewrite.kernels import score_mods
    from attnrewrite.kernels.sliding_window.triton_bwd import sliding_window_bwd
    from attnrewrite.kernels.sliding_window.triton_fwd import sliding_window_fwd

    batch, heads_q, heads_kv, dim_v = 2, 4, 4, head
    if feature == "gqa":
        heads_kv = 1
    if feature == "odd_dims":
        head, dim_v = 80, 96
    if feature == "no_sinks":
        sinks = 0
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(feature, torch.bfloat16)
    q = torch.empty(batch, heads_q, length, head, dtype=dtype)
    k = torch.empty(batch, heads_kv, length, head, dtype=dtype)
    v = torch.empty(batch, heads_kv, length, dim_v, dtype=dtype)
    grad_out = torch.empty(batch, heads_q, length, dim_v, dtype=dtype)
    out = torch.empty_like(grad_out)
    lse = torch.empty(batch, heads_q, length)
    mask = torch.zeros(1, heads_q, length, length, dtype=dtype) if feature == "float_mask" else None
    kv_lens = torch.full((batch,), length // 2, dtype=torch.int32) if feature == "kv_lens" else None
    program = score_mods.parse(sigmoid_aot.SCORE_MODS.get("softcap" if feature == "relative_softcap" else feature))
    position = {"alibi": "j-i", "alibi_abs": "|j-i|", "relative": "relative",
                "relative_softcap": "relative"}.get(feature)
    slopes = torch.zeros(heads_q, 2 * length - 1) if position == "relative" else torch.zeros(heads_q)
    extra = dict(program=program, position=position, slopes=slopes if position else None)
    launch = sigmoid_aot.launcher(feature, program)
    if kernel == "fwd":
        sliding_window_fwd(q, k, v, mask, kv_lens, 0.1, causal, window, sinks, config, launch=launch, **extra)
    else:
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv",)
        sliding_window_bwd(q, k, v, out, lse, grad_out, mask, kv_lens, 0.1, causal, window, sinks, config, config,
                           launch=launch, kernels=which, **extra)
    (_, compiled), = launch.kernels
    return sigmoid_aot.resources(compiled)


def _row(kernel, label, config, fn) -> bool:
    text = ",".join(f"{k}={v}" for k, v in config.items())
    try:
        r = fn()
    except Exception as exc:  # noqa: BLE001 — report every failing point, go on
        print(f"| {kernel} | {label} | {text} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |",
              flush=True)
        return False
    print(f"| {kernel} | {label} | {text} | {r['regs']} | {r['spill_bytes']} | {r['smem']} | {r['wgmma']} "
          f"| {r['wgmma_serialized']} |" + (f" {r['mufu']} |" if ARGS.sass else ""), flush=True)
    return True


def main() -> int:
    from attnrewrite.kernels.sliding_window import spaces

    triton.runtime.driver.set_active(sigmoid_aot._CompileOnlyDriver(ARGS.arch))
    print("| kernel | case | config | regs | spill B | smem B | wgmma | serialized |" + (" MUFU |" if ARGS.sass else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if ARGS.sass else ""))
    ok = True
    if ARGS.mods:
        for feature in ARGS.mods:
            for head in sorted(ARGS.heads):
                for kernel in spaces.KERNELS:  # the launcher's default with a modification (spaces.MOD_DEFAULTS)
                    space = spaces.with_mod_default(spaces.SPACES[f"{kernel}_d{head}"], kernel, head)
                    shape = {"D": head, "DV": head, "Tq": 4096, "Tk": 4096, "window": 1024, "sinks": 1, "causal": 1,
                             "mask": 0, "dtype": "16bit", "mod": 1}
                    config = spaces.fit(space, space.default, shape)
                    ok &= _row(kernel, f"d{head} causal {feature}", config,
                               lambda: compile_case(kernel, config, head, True, feature))
        return 0 if ok else 1
    if ARGS.features:
        for feature in ARGS.only or FEATURES:
            for kernel in spaces.KERNELS:
                space = spaces.SPACES[f"{kernel}_d128"]
                shape = {"D": 128, "DV": 128, "Tq": 4096, "Tk": 4096, "window": 1024, "sinks": 1, "causal": 1,
                         "mask": int(feature == "float_mask"), "dtype": "fp32" if feature == "fp32" else "16bit"}
                if ARGS.mod_defaults:  # as op._extra_tile has the launcher do for a modification or position bias
                    space = spaces.with_mod_default(space, kernel, 128)
                    shape["mod"] = 1
                config = spaces.fit(space, space.default, shape)
                ok &= _row(kernel, f"d128 causal {feature}", config,
                           lambda: compile_case(kernel, config, 128, True, feature))
        return 0 if ok else 1
    for name, space in spaces.SPACES.items():
        kernel, head = name.rsplit("_d", 1)
        if int(head) not in ARGS.heads:
            continue
        for causal in (True, False):
            ok &= _row(kernel, f"d{head} {'causal' if causal else 'symmetric'}", dict(space.default),
                       lambda: compile_case(kernel, dict(space.default), int(head), causal))
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--sass", action="store_true", help="count MUFU instructions in the SASS")
    parser.add_argument("--heads", default="64,128,256", help="head-dim classes to compile (default: all)")
    parser.add_argument("--features", action="store_true", help="instead: every input variant at d128")
    parser.add_argument("--mods", default="", help="instead: these score modifications (names of "
                        "sigmoid_aot.SCORE_MODS, comma-separated) at the default configs, causal")
    parser.add_argument("--only", default="", help="with --features: these variants only (comma-separated)")
    parser.add_argument("--mod-defaults", action="store_true", help="with --features: at the launcher's "
                        "configurations for a call with a score modification or a position bias")
    ARGS = parser.parse_args()
    ARGS.only = [f for f in ARGS.only.split(",") if f]
    if set(ARGS.only) - set(FEATURES):
        parser.error(f"unknown features {sorted(set(ARGS.only) - set(FEATURES))}; known: {', '.join(FEATURES)}")
    ARGS.mods = [m for m in ARGS.mods.split(",") if m]
    unknown = set(ARGS.mods) - set(sigmoid_aot.SCORE_MODS)
    if unknown:
        parser.error(f"unknown --mods {sorted(unknown)}; known: {', '.join(sigmoid_aot.SCORE_MODS)}")
    ARGS.heads = {int(h) for h in ARGS.heads.split(",")}
    sigmoid_aot.ARGS = ARGS  # its resources() reads the arch and --sass from there
    sys.exit(main())
