"""Search spaces of the sliding-window kernels, as data (the workloads that tune them: :mod:`.tune`).

One space per kernel ("fwd", "bwd_dq", "bwd_dkdv") and head-dim class (D and Dv up to 64, 128, 256).
Axes: BLOCK_M / BLOCK_N (query / key rows per tile), num_warps, num_stages.  The window is part of
the tuning shape (bucketed): a band narrower than a tile wastes most of the tile, so short windows
want short key tiles.  ``valid`` removes tiles far larger than the sequence or the band, and points
over a Hopper SM's shared memory or far over its registers (the estimate of the sigmoid kernels:
these kernels hold one more [BLOCK_M] row statistic, nothing larger); :func:`fit` shrinks a
configuration until it is valid.
"""

from __future__ import annotations

import math

import torch

from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid.spaces import resources

KIND = "sliding_window"
HEAD_CLASSES = (64, 128, 256)
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
SMEM_BYTES = 232448  # H100 / H200: 227 KiB per thread block
TILE_REGISTERS = {"fwd": 192, "bwd_dq": 160, "bwd_dkdv": 224}  # as the sigmoid kernels' (same tiles)


def head_class(dim: int, dim_v: int) -> int:
    """The head-dim class (64, 128 or 256) of a problem."""
    largest = max(dim, dim_v)
    for c in HEAD_CLASSES:
        if largest <= c:
            return c
    raise ValueError(f"head dims up to {HEAD_CLASSES[-1]} are supported, got D={dim}, Dv={dim_v}")


def space_name(kernel: str, dim: int, dim_v: int) -> str:
    return f"{kernel}_d{head_class(dim, dim_v)}"


def shape_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_mask: bool, causal: bool, window: int,
             sinks: int) -> dict:
    """The tuning shape of a call: what its configuration depends on."""
    return {"D": int(q.shape[-1]), "DV": int(v.shape[-1]), "Tq": int(q.shape[2]), "Tk": int(k.shape[2]),
            "window": int(window), "sinks": int(sinks > 0), "causal": int(bool(causal)), "mask": int(has_mask),
            "dtype": "fp32" if q.dtype == torch.float32 else "16bit"}


def _length_bucket(n: int) -> str:
    for edge in (16, 64, 256, 1024, 4096, 16384):
        if n <= edge:
            return str(edge)
    return "big"


def bucket(shape) -> str:
    return (f"d{shape['D']}-dv{shape['DV']}-q{_length_bucket(shape['Tq'])}-k{_length_bucket(shape['Tk'])}"
            f"-w{_length_bucket(shape['window'])}-sinks{shape['sinks']}-causal{shape['causal']}"
            f"-mask{shape['mask']}-{shape['dtype']}")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _valid(kernel: str):
    def valid(config, shape) -> bool:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        band = min(shape["Tk"], shape["window"] * (1 if shape["causal"] else 2))
        if bm > max(16, _pow2(shape["Tq"])) or bn > max(16, _pow2(shape["Tk"])):
            return False  # tiles far beyond the sequence only waste work
        if min(bm, bn) > max(32, _pow2(band)):
            return False  # both tiles much wider than the band: most of every tile is masked
        smem, regs = resources(kernel, config, shape)
        if shape["dtype"] == "fp32":  # exact fp32 products run on the FMA pipes: small tiles only
            return max(bm, bn) <= 32 and smem <= SMEM_BYTES
        return smem <= SMEM_BYTES and regs <= TILE_REGISTERS[kernel]
    return valid


def fit(space: tuning.SearchSpace, config, shape) -> dict:
    """``config`` if it is valid for ``shape``, else the valid point nearest to it: the largest tiles,
    the deepest pipeline, the fewest warps (the smallest tiles when nothing is valid)."""
    config = dict(config)
    if space.valid is None or space.valid(config, shape):
        return config
    candidates = space.configs(shape)
    if not candidates:
        return {**{name: min(values) for name, values in space.axes.items()}, "num_warps": 4}
    return dict(min(candidates, key=lambda c: (-c["BLOCK_M"] * c["BLOCK_N"], -c["num_stages"], c["num_warps"])))


def _space(kernel: str, head: int) -> tuning.SearchSpace:
    stages = (1, 2, 3) if head == 256 else (2, 3, 4)
    defaults = {  # 16-bit starting points for a Hopper SM (unmeasured: no tuning table yet)
        ("fwd", 64): (128, 64, 4, 3), ("fwd", 128): (128, 64, 8, 3), ("fwd", 256): (64, 32, 4, 2),
        ("bwd_dq", 64): (128, 64, 8, 3), ("bwd_dq", 128): (64, 64, 4, 3), ("bwd_dq", 256): (64, 32, 8, 2),
        ("bwd_dkdv", 64): (64, 128, 8, 3), ("bwd_dkdv", 128): (64, 128, 8, 2), ("bwd_dkdv", 256): (32, 64, 8, 2),
    }
    bm, bn, warps, num_stages = defaults[(kernel, head)]
    return tuning.SearchSpace(
        kernel=f"{kernel}_d{head}",
        axes={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (4, 8),
              "num_stages": stages},
        default={"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": num_stages},
        bucket=bucket,
        valid=_valid(kernel),
    )


SPACES: dict[str, tuning.SearchSpace] = {
    f"{kernel}_d{head}": _space(kernel, head) for kernel in KERNELS for head in HEAD_CLASSES}
