"""Search spaces of the linear-attention kernels, as data: axes, defaults, shape buckets, validity.

Axes: ``BLOCK_T`` is the chunk (tokens per step), ``BLOCK_K``/``BLOCK_V`` the slice of Dk/Dv one
program owns (programs split the other way share nothing), plus warps and pipeline stages.
Shapes are bucketed by head dims, dtype and T rounded up to a power of two; batch and heads are
left out because the launcher splits long sequences into segments when they leave the GPU idle.
The workloads that tune them are in :mod:`attnrewrite.kernels.linear.tune`.
"""

from __future__ import annotations

import torch

from ..tuning import SearchSpace

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(shape) -> str:
    """e.g. ``"dk128-dv128-t8192-bf16"``; T is rounded up to a power of two between 256 and 65536."""
    t = min(max(_pow2(shape["T"]), 256), 65536)
    return f"dk{shape['Dk']}-dv{shape['Dv']}-t{t}-{shape['dtype']}"


def _fits(block_axis: str, dim_key: str, state_rows_key: str | None):
    """Valid when the block does not exceed its (padded) dim and the fp32 state a program keeps in
    registers stays within about 64 values per thread (more spills on every GPU we target)."""

    def valid(config, shape) -> bool:
        block = config[block_axis]
        if block > max(16, _pow2(shape[dim_key])):
            return False
        if state_rows_key is not None:
            state = _pow2(shape[state_rows_key]) * min(block, _pow2(shape[dim_key]))
            return state <= 64 * 32 * config["num_warps"]
        return True

    return valid


def _chunk_space(kernel: str, block_axis: str, dim_key: str, state_rows_key: str | None, stages: int = 2,
                 chunks: tuple[int, ...] = (32, 64)) -> SearchSpace:
    # chunks of 128 spill registers at D = 128 in the causal kernels (bench/linear_sm90_compile.py);
    # a third pipeline stage never helped there either: both left out to keep tuning short
    return SearchSpace(
        kernel=kernel,
        axes={"BLOCK_T": chunks, "num_warps": (4, 8), "num_stages": (1, 2), block_axis: (32, 64, 128)},
        # 8 warps: with 4, Dk = Dv = 128 spills registers in every chunked kernel (bench/linear_sm90_compile.py)
        default={"BLOCK_T": 64, "num_warps": 8, "num_stages": stages, block_axis: 64},
        bucket=bucket,
        valid=_fits(block_axis, dim_key, state_rows_key),
    )


SPACES: dict[str, SearchSpace] = {
    # causal, chunked: each program keeps a [Dk, BLOCK_V] (or [BLOCK_K, Dv]) fp32 state
    "chunk_fwd": _chunk_space("chunk_fwd", "BLOCK_V", "Dv", "Dk", stages=1),
    "chunk_state": _chunk_space("chunk_state", "BLOCK_V", "Dv", "Dk"),
    "chunk_bwd_dq": _chunk_space("chunk_bwd_dq", "BLOCK_K", "Dk", "Dv"),
    "chunk_bwd_dk": _chunk_space("chunk_bwd_dk", "BLOCK_K", "Dk", "Dv", stages=1),
    "chunk_bwd_dv": _chunk_space("chunk_bwd_dv", "BLOCK_V", "Dv", "Dk"),
    # bidirectional: rows against a fixed state
    "bidir_fwd": _chunk_space("bidir_fwd", "BLOCK_V", "Dv", "Dk", chunks=(64, 128)),
    "bidir_bwd_dq": _chunk_space("bidir_bwd_dq", "BLOCK_K", "Dk", "Dv", chunks=(64, 128)),
    "bidir_bwd_dk": _chunk_space("bidir_bwd_dk", "BLOCK_K", "Dk", "Dv", chunks=(64, 128)),
    "bidir_bwd_dv": _chunk_space("bidir_bwd_dv", "BLOCK_V", "Dv", "Dk", chunks=(64, 128)),
    # decode: one token against the state, fp32 FMAs
    "recurrent_fwd": SearchSpace(
        kernel="recurrent_fwd",
        axes={"BLOCK_V": (16, 32, 64, 128), "num_warps": (1, 2, 4, 8), "num_stages": (1,)},
        default={"BLOCK_V": 32, "num_warps": 4, "num_stages": 1},
        bucket=lambda shape: f"dk{shape['Dk']}-dv{shape['Dv']}-{shape['dtype']}",
        valid=lambda config, shape: config["BLOCK_V"] <= max(16, _pow2(shape["Dv"])),
    ),
}
