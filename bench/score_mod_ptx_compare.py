"""Compare the sigmoid kernels' sm_90 PTX with the soft-cap from the fixed table and generated
(``attnrewrite.kernels.triton_score_mods``), at the d128 configurations a modified call starts from.

    python bench/score_mod_ptx_compare.py        # TRITON_INTERPRET unset; compiles, never launches

Prints, per kernel, registers, spilled bytes and MUFU instructions of both forms, their PTX instruction
counts, and whether the PTX instructions are identical once the kernel names (the specialisation's tag) and
line information are set aside.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sigmoid_aot as aot  # noqa: E402  (exits under TRITON_INTERPRET=1)
import triton  # noqa: E402


def instructions(ptx: str) -> list[str]:
    """The PTX instructions, without line information, comments, declarations, labels or kernel-name tags."""
    ptx = re.sub(r"^\s*\.loc.*$|^\s*\.file.*$|^\s*//.*$", "", ptx, flags=re.M)
    ptx = re.sub(r"\.section\s+\.debug[\s\S]*", "", ptx)
    ptx = re.sub(r"__forced|__mod_[0-9a-f]+", "", ptx)
    lines = (line.strip() for line in ptx.splitlines())
    return [line for line in lines if line and not line.startswith((".", "$", "{", "}")) and not line.endswith(":")]


def main() -> int:
    from attnrewrite.kernels.sigmoid import spaces

    aot.ARGS = argparse.Namespace(arch=90, sass=True)
    triton.runtime.driver.set_active(aot._CompileOnlyDriver(90))
    captured = {}
    resources = aot.resources

    def keep_ptx(compiled):
        captured["ptx"] = compiled.asm["ptx"]
        return resources(compiled)

    aot.resources = keep_ptx
    shape = {"D": 128, "DV": 128, "Tq": 4096, "Tk": 4096, "causal": 1, "dtype": "16bit", "mask": 0, "mod": 1}
    print("| kernel | regs table / generated | spill B | MUFU | PTX instructions | identical PTX |")
    print("|---|---|---|---|---|---|")
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        space = spaces.with_mod_default(spaces.SPACES[f"{kernel}_d128"], kernel, 128)
        config = spaces.fit(space, space.default, shape)
        rows = {}
        for feature in ("softcap", "softcap_generated"):
            rows[feature] = (aot.compile_case(kernel, config, 128, 1, feature=feature), instructions(captured["ptx"]))
        (a, pa), (b, pb) = rows["softcap"], rows["softcap_generated"]
        print(f"| {kernel} | {a['regs']} / {b['regs']} | {a['spill_bytes']} / {b['spill_bytes']} | {a['mufu']} / "
              f"{b['mufu']} | {len(pa)} / {len(pb)} | {pa == pb} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
