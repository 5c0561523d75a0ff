"""Compile the sigmoid kernels for a Hopper GPU on a machine without one, and report their resources.

    python bench/sigmoid_aot.py [--arch 90] [--all] [--sass] [--heads 64,128,256] [--features]

Triton's wheel carries ptxas and cuobjdump, so the whole pipeline (TTIR -> TTGIR -> PTX -> cubin)
runs on the CPU against a target named by hand.  For each kernel and configuration this prints
registers per thread, spilled bytes (``ptxas -v``), shared memory, whether the matrix products
became wgmma instructions and whether ptxas had to serialise them for lack of registers (C7511), so compile errors, spills and oversubscribed shared memory show up
before any GPU time is spent.  Without ``--all`` only the spaces' defaults are compiled, for
D = 64, 128 and 256, causal and not, bf16; ``--features`` compiles every input variant the kernels
specialise on (GQA, float mask and its gradient, kv_lens, varlen, bottom-right, odd head dims,
fp16, fp32, the Newton reciprocal, score modifications — the fixed table's, generated chains, and the soft-cap
forced through the generator (``softcap_generated``: the same math as ``softcap``, to compare the two
forms' cost) — ALiBi position biases; ``--only`` picks some).  ``--sass`` also counts the special-function (MUFU)
instructions per kernel.  It never runs a kernel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sigmoid_aot: unset TRITON_INTERPRET; this compiles real kernels")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402


class _CompileOnlyDriver(CudaDriver):
    """A CUDA driver that names a target and never touches a device."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Compiled:
    """A ``launch`` wrapper for the sigmoid launchers: compiles (warmup) instead of launching.  ``generate``: a
    score-modification core to compile as a generated function even where the fixed table has it."""

    def __init__(self, generate=None):
        self.kernels = []
        self.generate = generate

    def __call__(self, kernel):
        outer = self
        if self.generate is not None:
            from attnrewrite.kernels import triton_score_mods

            kernel = triton_score_mods.specialize(kernel, "score_mod_fn",
                                                  triton_score_mods.score_function(self.generate, kernel), "forced")

        class _Grid:
            def __getitem__(self, grid):
                def warm(*args, **kwargs):
                    outer.kernels.append((kernel.fn.__name__, kernel.warmup(*args, grid=grid, **kwargs)))
                return warm
        return _Grid()


def launcher(feature: str, program) -> _Compiled:
    """The compiling ``launch`` for ``feature``: the soft-cap forced through the generator for the features of
    :data:`FORCED_GENERATED`, else the launchers' own choice (the fixed table or a generated core)."""
    return _Compiled(program.split()[2] if feature in FORCED_GENERATED else None)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(compiled) -> dict:
    """Registers, spilled bytes, shared bytes, wgmma use and wgmma serialisation of a compiled kernel,
    read from ``ptxas -v`` on its PTX (cuobjdump's resource table does not show spills)."""
    stem = Path("/tmp") / f"sigmoid_aot_{os.getpid()}"
    stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
    arch = f"sm_{ARGS.arch}a" if ARGS.arch >= 90 else f"sm_{ARGS.arch}"
    report = subprocess.run([_tool("ptxas"), f"-arch={arch}", "-v", str(stem.with_suffix(".ptx")), "-o",
                             str(stem.with_suffix(".cubin"))], capture_output=True, text=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    row = {"regs": int(re.search(r"Used (\d+) registers", report).group(1)),
           "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
           "smem": compiled.metadata.shared,
           "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
           "wgmma_serialized": "C7511" in report}
    if ARGS.sass:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(stem.with_suffix(".cubin"))],
                              capture_output=True, text=True).stdout
        row["mufu"] = len(re.findall(r"MUFU\.", sass))
    for suffix in (".ptx", ".cubin"):
        stem.with_suffix(suffix).unlink(missing_ok=True)
    return row


def compile_case(kernel: str, config: dict, head: int, causal: int, dtype=torch.bfloat16, len_q=4096, len_k=4096,
                 feature: str = "") -> dict:
    """Compile one kernel for one configuration; ``feature`` selects an input variant (see FEATURES)."""
    from attnrewrite.kernels import score_mods
    from attnrewrite.kernels.sigmoid.triton_bwd import sigmoid_bwd
    from attnrewrite.kernels.sigmoid.triton_fwd import sigmoid_fwd

    batch, heads_q, heads_kv, dim_v = 2, 4, 4, head
    if feature == "gqa":
        heads_kv = 1
    if feature == "odd_dims":
        head, dim_v = 80, 96
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(feature, dtype)
    q = torch.empty(batch, heads_q, len_q, head, dtype=dtype)
    k = torch.empty(batch, heads_kv, len_k, head, dtype=dtype)
    v = torch.empty(batch, heads_kv, len_k, dim_v, dtype=dtype)
    grad_out = torch.empty(batch, heads_q, len_q, dim_v, dtype=dtype)
    bias = torch.zeros(batch, heads_q, len_q) if feature == "row_bias" else torch.zeros(batch, heads_q)
    mask = kv_lens = cu_q = cu_k = None
    if feature in ("float_mask", "mask_grad"):
        mask = torch.zeros(1, heads_q, len_q, len_k, dtype=dtype)
    if feature == "kv_lens":
        kv_lens = torch.full((batch,), len_k // 2, dtype=torch.int32)
    if feature == "varlen":
        q, k, v, grad_out = (t[:1] for t in (q, k, v, grad_out))
        cu_q = torch.tensor([0, len_q // 2, len_q], dtype=torch.int32)
        cu_k = torch.tensor([0, len_k // 2, len_k], dtype=torch.int32)
    if feature == "bottom_right":
        causal = 2
    if feature == "newton":
        config = dict(config, RCP_NEWTON=1)
    program = score_mods.parse(SCORE_MODS.get(feature, SCORE_MODS["softcap"] if feature == "alibi_softcap" else None))
    position = {"alibi": "j-i", "alibi_softcap": "j-i", "alibi_abs": "|j-i|", "relative": "relative"}.get(feature)
    slopes = torch.zeros(heads_q, len_q + len_k - 1) if position == "relative" else torch.zeros(heads_q)
    extra = dict(program=program, position=position, slopes=slopes if position else None)
    launch = launcher(feature, program)
    if kernel == "fwd":
        sigmoid_fwd(q, k, v, mask, bias, kv_lens, cu_q, cu_k, 0.1, causal, config, launch=launch, **extra)
    else:
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv",)
        sigmoid_bwd(q, k, v, grad_out, mask, bias, kv_lens, cu_q, cu_k, 0.1, causal, feature == "mask_grad",
                    config, config, launch=launch, kernels=which, **extra)
    (_, compiled), = launch.kernels
    return resources(compiled)


#: score modifications compiled into the kernels (MOD_FN), one per nonlinear function
SCORE_MODS = {"softcap": "div 50.0; tanh; mul 50.0", "mod_sigmoid": "sigmoid; mul 2.0", "mod_exp": "mul 0.1; exp",
              "mod_abs": "abs", "mod_relu": "relu", "mod_erf": "erf; mul 3.0", "mod_square": "square; neg",
              # generated (triton_score_mods): chains of nonlinear steps, and the soft-cap forced through the generator
              "softcap_generated": "div 50.0; tanh; mul 50.0",
              "chain_softcap_sigmoid": "div 50.0; tanh; mul 50.0; sigmoid; mul 4.0",
              "chain_square_tanh": "mul 0.1; square; tanh", "chain_clamp_exp": "clamp none 2.0; exp",
              "chain_root": "abs; pow 0.5"}
FORCED_GENERATED = ("softcap_generated",)
FEATURES = ("row_bias", "gqa", "kv_lens", "varlen", "float_mask", "mask_grad", "bottom_right", "odd_dims", "fp16", "fp32",
            "newton") + tuple(SCORE_MODS) + ("alibi", "alibi_abs", "alibi_softcap", "relative")


def compile_features() -> int:
    """Every input variant the kernels specialise on, with the default configs of d128, causal."""
    from attnrewrite.kernels.sigmoid import spaces

    failures = 0
    print("| kernel | feature | config | regs | spill B | smem B | wgmma | serialized |")
    print("|---|---|---|---|---|---|---|---|")
    for feature in ARGS.only or FEATURES:
        for kernel in spaces.KERNELS:
            space = spaces.SPACES[f"{kernel}_d128"]
            dtype = "fp32" if feature == "fp32" else "16bit"
            shape = {"D": 128, "DV": 128, "Tq": 4096, "Tk": 4096, "causal": 1, "dtype": dtype,
                     "mask": int(feature in ("float_mask", "mask_grad"))}
            if feature in SCORE_MODS or feature == "alibi_softcap":  # the launcher fits its configuration to the modification's extra tile
                shape["mod"] = 1
                if ARGS.mod_defaults:  # the default a modified call starts from (op.launch_config)
                    space = spaces.with_mod_default(space, kernel, 128)
            config = spaces.fit(space, space.default, shape)
            if feature == "newton":
                config["RCP_NEWTON"] = 1
            label = ",".join(f"{k}={v}" for k, v in config.items())
            try:
                r = compile_case(kernel, config, 128, 1, feature=feature)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"| {kernel} | {feature} | {label} | FAILED: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]} |", flush=True)
                continue
            print(f"| {kernel} | {feature} | {label} | {r['regs']} | {r['spill_bytes']} | {r['smem']} | {r['wgmma']} "
                  f"| {r['wgmma_serialized']} |", flush=True)
    return failures


def main() -> int:
    from attnrewrite.kernels.sigmoid import spaces

    triton.runtime.driver.set_active(_CompileOnlyDriver(ARGS.arch))
    if ARGS.features:
        return 1 if compile_features() else 0
    print("| kernel | D | causal | config | regs | spill B | smem B | est smem | est tile regs | wgmma | serialized |"
          + (" MUFU |" if ARGS.sass else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ARGS.sass else ""))
    failures = 0
    for name, space in spaces.SPACES.items():
        kernel, head = name.rsplit("_d", 1)
        head = int(head)
        if head not in ARGS.heads:
            continue
        shape = {"D": head, "DV": head, "Tq": 4096, "Tk": 4096, "causal": 0, "mask": 0, "dtype": "16bit"}
        configs = space.configs(shape) if ARGS.all else [dict(space.default)]
        for config in configs:
            for causal in ((0,) if ARGS.all else (0, 1)):
                est_smem, est_regs = spaces.resources(kernel, config, shape)
                label = ",".join(f"{k}={v}" for k, v in config.items())
                try:
                    r = compile_case(kernel, config, head, causal)
                except Exception as exc:  # noqa: BLE001 — report every failing point, go on
                    failures += 1
                    print(f"| {kernel} | {head} | {causal} | {label} | FAILED: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]} |", flush=True)
                    continue
                print(f"| {kernel} | {head} | {causal} | {label} | {r['regs']} | {r['spill_bytes']} | {r['smem']} "
                      f"| {est_smem} | {est_regs:.0f} | {r['wgmma']} | {r['wgmma_serialized']} |"
                      + (f" {r['mufu']} |" if ARGS.sass else ""),
                      flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="every valid point of each space at T = 4096")
    parser.add_argument("--sass", action="store_true", help="count MUFU instructions in the SASS")
    parser.add_argument("--heads", default="64,128,256", help="head-dim classes to compile (default: all)")
    parser.add_argument("--features", action="store_true",
                        help="instead: every input variant (GQA, masks, kv_lens, varlen, dtypes...) at d128")
    parser.add_argument("--only", default="", help="with --features: these variants only (comma-separated)")
    parser.add_argument("--mod-defaults", action="store_true",
                        help="with --features: score modifications start from spaces.with_mod_default, as the "
                             "launcher starts a modified call (default: the plain defaults)")
    ARGS = parser.parse_args()
    ARGS.only = [f for f in ARGS.only.split(",") if f]
    unknown = set(ARGS.only) - set(FEATURES)
    if unknown:
        parser.error(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    ARGS.heads = {int(h) for h in ARGS.heads.split(",")}
    sys.exit(main())
