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


import torch

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid import spaces as sigmoid_spaces
from attnrewrite.kernels.sigmoid.spaces import resources
from attnrewrite.kernels.triton_scaffold import length_bucket as _length_bucket, pow2 as _pow2

KIND = "sliding_window"
HEAD_CLASSES = (64, 128, 256)
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
SMEM_BYTES = 232448  # H100 / H200: 227 KiB per thread block
TILE_REGISTERS = {"fwd": 192, "bwd_dq": 160, "bwd_dkdv": 224}  # as the sigmoid kernels' (same tiles)


def head_class(dim: int, dim_v: int) -> int:
    """The head-dim class (64, 128 or 256) of a problem."""
    return scaffold.head_class(dim, dim_v, HEAD_CLASSES)


def space_name(kernel: str, dim: int, dim_v: int) -> str:
    return f"{kernel}_d{head_class(dim, dim_v)}"


def shape_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_mask: bool, causal: bool, window: int,
             sinks: int, has_mod: bool = False) -> dict:
    """The tuning shape of a call: what its configuration depends on (``mod``: a score modification is
    compiled in; only present when there is one, so that the other shapes' buckets stay as they were)."""
    shape = {"D": int(q.shape[-1]), "DV": int(v.shape[-1]), "Tq": int(q.shape[2]), "Tk": int(k.shape[2]),
             "window": int(window), "sinks": int(sinks > 0), "causal": int(bool(causal)), "mask": int(has_mask),
             "dtype": "fp32" if q.dtype == torch.float32 else "16bit"}
    if has_mod:
        shape["mod"] = 1
    return shape


def bucket(shape) -> str:
    return (f"d{shape['D']}-dv{shape['DV']}-q{_length_bucket(shape['Tq'])}-k{_length_bucket(shape['Tk'])}"
            f"-w{_length_bucket(shape['window'])}-sinks{shape['sinks']}-causal{shape['causal']}"
            f"-mask{shape['mask']}-{shape['dtype']}" + ("-mod" if shape.get("mod") else ""))


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


#: ``config`` if it is valid for a shape, else the valid point nearest to it (the scaffold's ``fit_config``)
fit = scaffold.fit_config


def _space(kernel: str, head: int) -> tuning.SearchSpace:
    stages = (1, 2, 3) if head == 256 else (2, 3, 4)
    defaults = {  # 16-bit starting points for a Hopper SM (unmeasured: no tuning table yet)
        ("fwd", 64): (128, 64, 4, 3), ("fwd", 128): (128, 64, 8, 3), ("fwd", 256): (64, 32, 4, 2),
        ("bwd_dq", 64): (128, 64, 8, 3), ("bwd_dq", 128): (64, 64, 4, 3), ("bwd_dq", 256): (64, 32, 8, 2),
        ("bwd_dkdv", 64): (64, 128, 8, 3), ("bwd_dkdv", 128): (64, 128, 8, 2), ("bwd_dkdv", 256): (32, 64, 8, 2),
    }
    return scaffold.tile_space(kernel, head, defaults[(kernel, head)], stages, bucket, _valid(kernel))


#: Defaults of the d128 backward kernels when a score modification is compiled in (bench/sliding_window_aot.py
#: on sm_90, bf16, causal; bench/RESULTS.md): the plain defaults spill there (dK/dV (64, 128, 8, 2): 796–1148 B,
#: (64, 64, 8, 2) still 44–108 B; dQ (64, 64, 4, 3): 8–20 B with sigmoid and erf), these do not.  Unmeasured on a
#: GPU: a tuning table or autotuning replaces them.  (BLOCK_M, BLOCK_N, num_warps, num_stages).
MOD_DEFAULTS = {("bwd_dq", 128): (64, 64, 8, 3), ("bwd_dkdv", 128): (32, 64, 8, 2)}


def with_mod_default(space: tuning.SearchSpace, kernel: str, head: int) -> tuning.SearchSpace:
    """``space`` with the default a score modification needs (:data:`MOD_DEFAULTS`), or as it is."""
    return sigmoid_spaces.with_mod_default(space, kernel, head, MOD_DEFAULTS)


SPACES: dict[str, tuning.SearchSpace] = {
    f"{kernel}_d{head}": _space(kernel, head) for kernel in KERNELS for head in HEAD_CLASSES}
