"""Compile the hashed-attention kernels for a Hopper GPU on a machine without one, and report their resources.

    python bench/hashed_aot.py [--arch 90] [--mods softcap,...] [--learned]

The same compile-only pipeline as ``bench/sigmoid_aot.py`` (its driver and ``ptxas -v`` reader are
reused): every kernel of :mod:`attnrewrite.kernels.hashed` — codes, selection, attention forward and
backward, and the three decode kernels — at the configuration a call would get from
:mod:`attnrewrite.kernels.hashed.spaces` (the defaults, fitted), over the variants the kernels
specialise on (group size 1/4/8, head dims 64/128, 16- and 32-bit inputs, masks, padding).  Prints
a markdown table: registers per thread, spilled bytes, shared memory.  ``--mods`` instead compiles the
attention forward and backward (bf16, no bias) with each named score modification compiled in
(``sigmoid_aot.SCORE_MODS``); ``--learned`` instead the attention backward with learned hashes' straight-through
gradient compiled in (``SOFT``: the soft codes' gradients, 64 bits, no bias).  It never runs a kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("hashed_aot: unset TRITON_INTERPRET; this compiles real kernels")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

import sigmoid_aot as aot  # noqa: E402


def _cases(mod: str = "", learned: bool = False):
    """(label, kernel space name, compile function taking (launch, config)) for every variant; with ``mod`` (a
    name of ``sigmoid_aot.SCORE_MODS``) the attention kernels only, bf16, with that modification; with
    ``learned`` the attention backward only, with the learned hashes' soft codes."""
    from attnrewrite.kernels import score_mods
    from attnrewrite.kernels.hashed import spaces
    from attnrewrite.kernels.hashed.codes import random_hyperplanes
    from attnrewrite.kernels.hashed.triton_attn import attend_backward, attend_forward
    from attnrewrite.kernels.hashed.triton_codes import pack_codes
    from attnrewrite.kernels.hashed.triton_decode import decode_select
    from attnrewrite.kernels.hashed.triton_select import select_keys

    bits, top_k, window, sinks = 64, 256, 64, 4
    program = score_mods.parse(aot.SCORE_MODS.get(mod))
    for head in (64, 128):
        for groups in (1, 4, 8):
            for dtype in ((torch.bfloat16,) if mod else (torch.bfloat16, torch.float32)):
                name = str(dtype).removeprefix("torch.")
                batch, heads_kv, length = 1, 2, 4096
                q = torch.empty(batch, heads_kv * groups, length, head, dtype=dtype)
                k = torch.empty(batch, heads_kv, length, head, dtype=dtype)
                v = torch.empty(batch, heads_kv, length, head, dtype=dtype)
                slots = sinks + window + top_k
                index = torch.empty(batch, heads_kv, length, slots, dtype=torch.int32)
                lse = torch.empty(batch, heads_kv * groups, length)
                shape = spaces.shape_of(q, k, v, bits)
                tag = f"D{head} g{groups} {name}" + (f" {mod}" if mod else "")
                if learned:
                    soft = (torch.empty(batch, heads_kv * groups, length, bits), torch.empty(batch, heads_kv, length, bits))
                    yield (f"{tag} learned", "bwd", shape, lambda launch, c, a=(q, k, v, q, q, lse, index, None), s=soft:
                           attend_backward(*a, 0.1, c, launch=launch, soft=s))
                    continue
                if mod:
                    yield (tag, "fwd", shape, lambda launch, c, a=(q, k, v, index, None):
                           attend_forward(*a, 0.1, c, launch=launch, program=program))
                    yield (tag, "bwd", shape, lambda launch, c, a=(q, k, v, q, q, lse, index, None):
                           attend_backward(*a, 0.1, c, launch=launch, program=program))
                    continue
                plane = random_hyperplanes(head, bits, 0)
                if groups == 4:  # the codes do not depend on the group
                    yield f"{tag}", "codes", shape, lambda launch, c, x=q, p=plane: pack_codes(x, p, c, launch=launch)
                    codes_q = torch.empty(batch, heads_kv * groups, length, bits // 8, dtype=torch.uint8)
                    codes_k = torch.empty(batch, heads_kv, length, bits // 8, dtype=torch.uint8)
                    keep = torch.empty(batch, length, length, dtype=torch.uint8)
                    for causal, mask in ((True, None), (False, keep)):
                        yield (f"{tag} causal={causal} mask={mask is not None}", "select", shape,
                               lambda launch, c, a=codes_q, b=codes_k, m=mask, z=causal:
                               select_keys(a, b, m, z, top_k, window, sinks, c, launch=launch))
                for bias in (None, torch.empty(batch, length, length, dtype=dtype)):
                    label = f"{tag} bias={bias is not None}"
                    yield (label, "fwd", shape, lambda launch, c, a=(q, k, v, index, bias):
                           attend_forward(*a, 0.1, c, launch=launch))
                    yield (label, "bwd", shape, lambda launch, c, a=(q, k, v, q, q, lse, index, bias):
                           attend_backward(*a, 0.1, c, launch=launch))
                if dtype == torch.bfloat16:
                    context = 65536
                    codes_q = torch.empty(batch, heads_kv * groups, 1, bits // 8, dtype=torch.uint8)
                    codes_k = torch.empty(batch, heads_kv, context, bits // 8, dtype=torch.uint8)
                    dshape = dict(shape, Tq=1, Tk=context)
                    for valid in (None, torch.ones(batch, context, dtype=torch.bool)):
                        yield (f"{tag} T=64k padded={valid is not None}", "decode", dshape,
                               lambda launch, c, a=codes_q, b=codes_k, m=valid:
                               decode_select(a, b, m, top_k, window, sinks, c, launch=launch))


def main() -> int:
    from attnrewrite.kernels.hashed import spaces

    triton.runtime.driver.set_active(aot._CompileOnlyDriver(ARGS.arch))
    print(f"triton {triton.__version__}, sm_{ARGS.arch}")
    print("| kernel | variant | config | regs | spill B | smem B |")
    print("|---|---|---|---|---|---|")
    failures = 0
    cases = [case for mod in ARGS.mods for case in _cases(mod)] if ARGS.mods else _cases(learned=ARGS.learned)
    for label, kernel, shape, compile_with in cases:
        config = spaces.fit(kernel, spaces.SPACES[kernel].default, shape)
        text = ",".join(f"{k}={v}" for k, v in config.items())
        launch = aot._Compiled()
        try:
            compile_with(launch, config)
            rows = [(name, aot.resources(compiled)) for name, compiled in launch.kernels]
        except Exception as exc:  # noqa: BLE001 — report every failing point, go on
            failures += 1
            print(f"| {kernel} | {label} | {text} | FAILED: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:120]} |", flush=True)
            continue
        for name, r in rows:
            print(f"| {name} | {label} | {text} | {r['regs']} | {r['spill_bytes']} | {r['smem']} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--mods", default="", help="instead: the attention kernels with these score modifications "
                        "(names of sigmoid_aot.SCORE_MODS, comma-separated)")
    parser.add_argument("--learned", action="store_true", help="instead: the attention backward with learned hashes "
                        "(the straight-through gradient's soft codes)")
    ARGS = parser.parse_args()
    ARGS.mods = [m for m in ARGS.mods.split(",") if m]
    if set(ARGS.mods) - set(aot.SCORE_MODS):
        parser.error(f"unknown --mods {sorted(set(ARGS.mods) - set(aot.SCORE_MODS))}")
    aot.ARGS = argparse.Namespace(arch=ARGS.arch, sass=False)
    sys.exit(main())
