"""Search spaces of the summary kernels, as data (the workloads that tune them: :mod:`.tune`).

One space per kernel and head-dim class (D and Dv up to 64, 128, 256).  Kernels: ``fwd``, ``bwd_dq``
and ``bwd_dkdv`` (one space for the raw keys' and the summaries' dK/dV: the same kernel).  Axes:

    BLOCK_M, BLOCK_N   query / key rows per tile
    num_warps          4 or 8 (one or two warpgroups on Hopper)
    num_stages         software-pipelining depth of the loads

The tiles are those of the sigmoid kernels (Q resident and K/V streamed in the forward and dQ
kernels; K/V resident and Q/dO streamed in dK/dV) plus two float32 row vectors, so their resource
estimate is :func:`attnrewrite.kernels.sigmoid.spaces.resources`' without a mask.  ``valid`` removes
tiles far larger than the sequence, tiles over shared memory or registers, and, on long sequences,
tiles too small for Hopper's wgmma; :func:`fit` shrinks a configuration until it is valid.  The
buckets key on the head dims, the sequence length, the window (W·C tokens) and the dtype: a block's
work is about BLOCK_M · (W·C + T/C).
"""

from __future__ import annotations

import torch

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid.spaces import SMEM_BYTES, TILE_REGISTERS, resources
from attnrewrite.kernels.triton_scaffold import length_bucket as _length_bucket, pow2 as _pow2

KIND = "summary"
HEAD_CLASSES = (64, 128, 256)
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")


def head_class(dim: int, dim_v: int) -> int:
    """The head-dim class (64, 128 or 256) of a problem."""
    return scaffold.head_class(dim, dim_v, HEAD_CLASSES)


def space_name(kernel: str, dim: int, dim_v: int) -> str:
    return f"{kernel}_d{head_class(dim, dim_v)}"


def shape_of(q: torch.Tensor, v: torch.Tensor, chunk_size: int, window_chunks: int, causal: bool) -> dict:
    """The tuning shape of a call: what its configuration depends on."""
    return {"D": int(q.shape[-1]), "DV": int(v.shape[-1]), "T": int(q.shape[2]),
            "window": int(min(q.shape[2], (window_chunks + 1) * chunk_size)), "chunk": int(chunk_size),
            "causal": int(bool(causal)), "dtype": "fp32" if q.dtype == torch.float32 else "16bit"}


def bucket(shape) -> str:
    return (f"d{shape['D']}-dv{shape['DV']}-t{_length_bucket(shape['T'])}-w{_length_bucket(shape['window'])}"
            f"-causal{shape['causal']}-{shape['dtype']}")


def _valid(kernel: str):
    def valid(config, shape) -> bool:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        if bm > max(16, _pow2(shape["T"])) or bn > max(16, _pow2(shape["T"])):
            return False  # tiles far beyond the sequence only waste work
        sigmoid_shape = {"D": shape["D"], "DV": shape["DV"], "mask": 0, "dtype": shape["dtype"]}
        smem, regs = resources(kernel, config, sigmoid_shape)
        if shape["dtype"] == "fp32":  # exact fp32 products run on the FMA pipes: larger tiles spill
            return max(bm, bn) <= 32 and smem <= SMEM_BYTES
        rows, cols = (bn, bm) if kernel == "bwd_dkdv" else (bm, bn)
        if shape["T"] >= 1024 and (rows < 64 or cols < 32):
            return False
        return smem <= SMEM_BYTES and regs <= TILE_REGISTERS[kernel]
    return valid


#: ``config`` if it is valid for a shape, else the valid point nearest to it (the scaffold's ``fit_config``)
fit = scaffold.fit_config


def _space(kernel: str, head: int) -> tuning.SearchSpace:
    stages = ((1, 2, 3) if kernel == "fwd" else (2, 3)) if head == 256 else (2, 3, 4)
    # 16-bit defaults for a Hopper SM, fit() shrinks them.  The sigmoid kernels' shapes, except where
    # bench/summary_aot.py showed spills with them (the online softmax's row vectors and the masks cost
    # registers): fwd d64 runs 8 warps (4 spilled 40 B), dK/dV d128 64-key blocks (128 spilled 16-72 B)
    defaults = {
        ("fwd", 64): (128, 64, 8, 3), ("fwd", 128): (128, 64, 8, 3), ("fwd", 256): (64, 32, 4, 2),
        ("bwd_dq", 64): (128, 64, 8, 3), ("bwd_dq", 128): (64, 64, 4, 3), ("bwd_dq", 256): (64, 32, 8, 2),
        ("bwd_dkdv", 64): (64, 128, 8, 3), ("bwd_dkdv", 128): (64, 64, 8, 2), ("bwd_dkdv", 256): (32, 64, 8, 2),
    }
    return scaffold.tile_space(kernel, head, defaults[(kernel, head)], stages, bucket, _valid(kernel))


SPACES: dict[str, tuning.SearchSpace] = {
    f"{kernel}_d{head}": _space(kernel, head) for kernel in KERNELS for head in HEAD_CLASSES}
