"""Search spaces of the sigmoid kernels, as data (the workloads that tune them: :mod:`.tune`).

One space per kernel and head-dim class (D and Dv up to 64, 128, 256): the blocks that suit a
head dim differ, and so does a default that is fast and fits everywhere.  Axes:

    BLOCK_M, BLOCK_N   query / key rows per tile
    num_warps          4 or 8 (one or two warpgroups on Hopper)
    num_stages         software-pipelining depth of the loads
    RCP_NEWTON         0: sigmoid's reciprocal on the special-function unit; 1: on the FMA pipes
                       (Newton steps, as accurate; see triton_common.sigmoid_log2)

``valid`` removes points that cannot be fast or cannot fit: tiles far larger than the sequence,
small tiles on long sequences (fewer than 64 rows in the M dimension of the matrix products
cannot use Hopper's wgmma), shared memory over a Hopper SM's 227 KiB, and more fp32 tile
registers per thread than fit without heavy spilling.  :func:`fit` shrinks a configuration until it
is valid (float32 inputs double the shared memory of the 16-bit defaults).
"""

from __future__ import annotations

import dataclasses
import math
import torch

from attnrewrite.kernels import tuning

KIND = "sigmoid"
HEAD_CLASSES = (64, 128, 256)
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
SMEM_BYTES = 232448  # H100 / H200: 227 KiB per thread block
# Estimated fp32 tile values per thread (resources()) above which ptxas spills heavily, per kernel:
# calibrated on sm_90 with bench/sigmoid_aot.py --all (ptxas -v over every point of the spaces).
TILE_REGISTERS = {"fwd": 192, "bwd_dq": 160, "bwd_dkdv": 224}


def head_class(dim: int, dim_v: int) -> int:
    """The head-dim class (64, 128 or 256) of a problem."""
    largest = max(dim, dim_v)
    for c in HEAD_CLASSES:
        if largest <= c:
            return c
    raise ValueError(f"head dims up to {HEAD_CLASSES[-1]} are supported, got D={dim}, Dv={dim_v}")


def space_name(kernel: str, dim: int, dim_v: int) -> str:
    return f"{kernel}_d{head_class(dim, dim_v)}"


def shape_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_mask: bool, causal: int,
             has_mod: bool = False) -> dict:
    """The tuning shape of a call: what its configuration depends on (``mod``: a score modification is
    compiled in; only present when there is one, so that the other shapes' buckets stay as they were)."""
    shape = {"D": int(q.shape[-1]), "DV": int(v.shape[-1]), "Tq": int(q.shape[2]), "Tk": int(k.shape[2]),
             "causal": int(causal != 0), "mask": int(has_mask),
             "dtype": "fp32" if q.dtype == torch.float32 else "16bit"}
    if has_mod:
        shape["mod"] = 1
    return shape


def _length_bucket(n: int) -> str:
    for edge in (16, 64, 256, 1024, 4096, 16384):
        if n <= edge:
            return str(edge)
    return "big"


def bucket(shape) -> str:
    return (f"d{shape['D']}-dv{shape['DV']}-q{_length_bucket(shape['Tq'])}-k{_length_bucket(shape['Tk'])}"
            f"-causal{shape['causal']}-mask{shape['mask']}-{shape['dtype']}" + ("-mod" if shape.get("mod") else ""))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _padded(d: int) -> int:
    return max(16, _pow2(d))


def resources(kernel: str, config, shape) -> tuple[int, float]:
    """Estimated (shared-memory bytes, fp32 tile registers per thread) of a configuration.  A score
    modification (``shape["mod"]``) keeps its derivative, one more [BLOCK_M, BLOCK_N] tile, in the backward
    kernels (sm_90, d128 defaults: the dK/dV kernel spilled ~230 B without the extra tile counted)."""
    elem = 4 if shape["dtype"] == "fp32" else 2
    bd, bdv = _padded(shape["D"]), _padded(shape["DV"])
    bm, bn, stages, threads = config["BLOCK_M"], config["BLOCK_N"], config["num_stages"], 32 * config["num_warps"]
    mask_tile = 4 * bm * bn * stages * shape["mask"]
    if kernel == "fwd":  # Q resident; K and V tiles pipelined; S/P and the output accumulator live
        smem = bm * bd * elem + stages * bn * (bd + bdv) * elem + mask_tile
        regs = (bm * bdv + 2 * bm * bn) / threads
    elif kernel == "bwd_dq":  # Q, dO resident; K, V pipelined; S/P, dP and the dQ accumulator live
        smem = bm * (bd + bdv) * elem + stages * bn * (bd + bdv) * elem + mask_tile
        regs = (bm * bd + 3 * bm * bn) / threads
    else:  # K, V resident; Q, dO pipelined; S^T/P^T, dP^T and the dK, dV accumulators live
        smem = bn * (bd + bdv) * elem + stages * bm * (bd + bdv) * elem + mask_tile
        regs = (bn * (bd + bdv) + 3 * bm * bn) / threads
    if kernel != "fwd" and shape.get("mod"):
        regs += bm * bn / threads
    return smem, regs


def _valid(kernel: str):
    def valid(config, shape) -> bool:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        len_q, len_k = shape["Tq"], shape["Tk"]
        if bm > max(16, _pow2(len_q)) or bn > max(16, _pow2(len_k)):
            return False  # tiles far beyond the sequence only waste work
        smem, regs = resources(kernel, config, shape)
        if shape["dtype"] == "fp32":  # exact fp32 products run on the FMA pipes: larger tiles spill kilobytes
            return max(bm, bn) <= 32 and smem <= SMEM_BYTES
        # On long sequences the tile that is the M side of the products needs 64 rows (wgmma), and the
        # other one 32, or K/V (Q/dO) are re-read too often.  dK/dV's M side is the key block.
        rows, cols = (bn, bm) if kernel == "bwd_dkdv" else (bm, bn)
        if min(len_q, len_k) >= 1024 and (rows < 64 or cols < 32):
            return False
        return smem <= SMEM_BYTES and regs <= TILE_REGISTERS[kernel]
    return valid


def fit(space: tuning.SearchSpace, config, shape) -> dict:
    """``config`` if it is valid for ``shape``, else the valid point nearest to it: the same
    reciprocal, then the largest tiles, the deepest pipeline, the fewest warps."""
    config = dict(config)
    if space.valid is None or space.valid(config, shape):
        return config
    candidates = space.configs(shape)
    if not candidates:  # e.g. a float32 mask tile at decode: the smallest tiles always compile
        return {**{name: min(values) for name, values in space.axes.items()},
                "num_warps": 4, "RCP_NEWTON": config["RCP_NEWTON"]}
    return dict(min(candidates, key=lambda c: (c["RCP_NEWTON"] != config["RCP_NEWTON"],
                                               -c["BLOCK_M"] * c["BLOCK_N"], -c["num_stages"], c["num_warps"])))


def _space(kernel: str, head: int) -> tuning.SearchSpace:
    small_key = (16,) if head == 256 else ()
    # one stage at D = 256 leaves the backward short of registers (ptxas spills kilobytes)
    stages = ((1, 2, 3) if kernel == "fwd" else (2, 3)) if head == 256 else (2, 3, 4)
    defaults = {  # 16-bit defaults for a Hopper SM; fit() shrinks them for float32
        ("fwd", 64): (128, 64, 4, 3), ("fwd", 128): (128, 64, 8, 3), ("fwd", 256): (64, 32, 4, 2),
        ("bwd_dq", 64): (128, 64, 8, 3), ("bwd_dq", 128): (64, 64, 4, 3), ("bwd_dq", 256): (64, 32, 8, 2),
        ("bwd_dkdv", 64): (64, 128, 8, 3), ("bwd_dkdv", 128): (64, 128, 8, 2), ("bwd_dkdv", 256): (32, 64, 8, 2),
    }
    bm, bn, warps, num_stages = defaults[(kernel, head)]
    return tuning.SearchSpace(
        kernel=f"{kernel}_d{head}",
        axes={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": small_key + (32, 64, 128), "num_warps": (4, 8),
              "num_stages": stages, "RCP_NEWTON": (0, 1)},
        default={"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": num_stages, "RCP_NEWTON": 0},
        bucket=bucket,
        valid=_valid(kernel),
    )


#: Defaults of the backward kernels when a score modification is compiled in (bench/sigmoid_aot.py on sm_90,
#: bf16, causal, soft-capping): the plain d128 defaults spill there (dQ 16 B, dK/dV 232 B), these do not.
#: (BLOCK_M, BLOCK_N, num_warps, num_stages); the other kernels keep their defaults (d64: no spill; d256
#: dK/dV spills 236 B with its default, and the tiles that do not spill are too small for wgmma).
MOD_DEFAULTS = {("bwd_dq", 128): (64, 64, 8, 3), ("bwd_dkdv", 128): (64, 64, 8, 2)}


def with_mod_default(space: tuning.SearchSpace, kernel: str, head: int,
                     table: dict | None = None) -> tuning.SearchSpace:
    """``space`` with the default a score modification needs (``table``, this family's :data:`MOD_DEFAULTS` by
    default: {(kernel, head class): (BLOCK_M, BLOCK_N, num_warps, num_stages)}), or as it is."""
    table = MOD_DEFAULTS if table is None else table
    if (kernel, head) not in table:
        return space
    bm, bn, warps, stages = table[(kernel, head)]
    return dataclasses.replace(space, default={**space.default, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps,
                                               "num_stages": stages})


SPACES: dict[str, tuning.SearchSpace] = {
    f"{kernel}_d{head}": _space(kernel, head) for kernel in KERNELS for head in HEAD_CLASSES}
