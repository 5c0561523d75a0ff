"""Compile the sigmoid kernels for a Hopper GPU on a machine without one, and report their resources.

    python bench/sigmoid_aot.py [--arch 90] [--all] [--sass] [--heads 64,128,256]

Triton's wheel carries ptxas and cuobjdump, so the whole pipeline (TTIR -> TTGIR -> PTX -> cubin)
runs on the CPU against a target named by hand.  For each kernel and configuration this prints
registers per thread, spilled bytes (local memory), shared memory and whether the matrix products
became wgmma instructions, so compile errors, spills and oversubscribed shared memory show up
before any GPU time is spent.  Without ``--all`` only the spaces' defaults are compiled, for
D = 64, 128 and 256, causal and not, bf16.  ``--sass`` also counts the special-function (MUFU)
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
    """A ``launch`` wrapper for the sigmoid launchers: compiles (warmup) instead of launching."""

    def __init__(self):
        self.kernels = []

    def __call__(self, kernel):
        outer = self

        class _Grid:
            def __getitem__(self, grid):
                def warm(*args, **kwargs):
                    outer.kernels.append((kernel.fn.__name__, kernel.warmup(*args, grid=grid, **kwargs)))
                return warm
        return _Grid()


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(compiled) -> dict:
    """Registers, local (spill) bytes, shared bytes and wgmma use of a compiled kernel."""
    path = Path("/tmp") / f"sigmoid_aot_{os.getpid()}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    row = {"regs": regs, "spill_bytes": local, "smem": compiled.metadata.shared,
           "wgmma": "wgmma.mma_async" in compiled.asm["ptx"]}
    if ARGS.sass:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True).stdout
        row["mufu"] = len(re.findall(r"MUFU\.", sass))
    path.unlink()
    return row


def compile_case(kernel: str, config: dict, head: int, causal: int, dtype=torch.bfloat16, len_q=4096, len_k=4096):
    from attnrewrite.kernels.sigmoid.triton_bwd import sigmoid_bwd
    from attnrewrite.kernels.sigmoid.triton_fwd import sigmoid_fwd

    q = torch.empty(1, 2, len_q, head, dtype=dtype)
    k = torch.empty(1, 2, len_k, head, dtype=dtype)
    v = torch.empty(1, 2, len_k, head, dtype=dtype)
    bias = torch.zeros(1, 2)
    launch = _Compiled()
    if kernel == "fwd":
        sigmoid_fwd(q, k, v, None, bias, None, None, None, 0.1, causal, config, launch=launch)
    else:
        which = ("dq",) if kernel == "bwd_dq" else ("dkdv",)
        sigmoid_bwd(q, k, v, q, None, bias, None, None, None, 0.1, causal, False, config, config, launch=launch,
                    kernels=which)
    (_, compiled), = launch.kernels
    return resources(compiled)


def main() -> int:
    from attnrewrite.kernels.sigmoid import tune

    triton.runtime.driver.set_active(_CompileOnlyDriver(ARGS.arch))
    print("| kernel | D | causal | config | regs | spill B | smem B | est smem | est tile regs | wgmma |"
          + (" MUFU |" if ARGS.sass else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ARGS.sass else ""))
    failures = 0
    for name, space in tune.SPACES.items():
        kernel, head = name.rsplit("_d", 1)
        head = int(head)
        if head not in ARGS.heads:
            continue
        shape = {"D": head, "DV": head, "Tq": 4096, "Tk": 4096, "causal": 0, "mask": 0, "dtype": "16bit"}
        configs = space.configs(shape) if ARGS.all else [dict(space.default)]
        for config in configs:
            for causal in ((0,) if ARGS.all else (0, 1)):
                est_smem, est_regs = tune.resources(kernel, config, shape)
                label = ",".join(f"{k}={v}" for k, v in config.items())
                try:
                    r = compile_case(kernel, config, head, causal)
                except Exception as exc:  # noqa: BLE001 — report every failing point, go on
                    failures += 1
                    print(f"| {kernel} | {head} | {causal} | {label} | FAILED: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]} |", flush=True)
                    continue
                print(f"| {kernel} | {head} | {causal} | {label} | {r['regs']} | {r['spill_bytes']} | {r['smem']} "
                      f"| {est_smem} | {est_regs:.0f} | {r['wgmma']} |" + (f" {r['mufu']} |" if ARGS.sass else ""),
                      flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="every valid point of each space at T = 4096")
    parser.add_argument("--sass", action="store_true", help="count MUFU instructions in the SASS")
    parser.add_argument("--heads", default="64,128,256", help="head-dim classes to compile (default: all)")
    ARGS = parser.parse_args()
    ARGS.heads = {int(h) for h in ARGS.heads.split(",")}
    sys.exit(main())
