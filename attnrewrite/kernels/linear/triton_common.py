"""Pieces shared by the linear-attention Triton kernels: feature maps, sequence and segment bounds,
dot precision per dtype, and the launch configuration of each kernel.

Importing this module defines Triton functions, so it is imported lazily (by the op
implementations), after ``TRITON_INTERPRET`` has been decided.

Layout conventions of every kernel:

- q/k/v/o/do/dq/dk/dv are [B, H, T, D] with unit stride on D (any other strides), or, for
  packed variable-length batches, [1, H, total_T, D] with ``cu_seqlens`` int32 [N+1];
- per-row fp32 side tensors (inverse denominator, γ) are contiguous [B, H, T];
- states are contiguous fp32: S [N, Hkv, (splits,) Dk, Dv], z [N, Hkv, (splits,) Dk];
- a sequence may be cut into ``num_splits`` segments, each a multiple of ``SEGMENT_ALIGN`` tokens
  (so every chunk size divides it), which run as separate programs: this is how a long
  sequence with few heads still fills the GPU.

What the kernels share lives here (:func:`segment_program`, :func:`segment_rows`, :func:`state_ptrs`,
:func:`segment_grid`) or in :mod:`attnrewrite.kernels.triton_scaffold` (``row_ptrs``).  What stays
written out in each kernel on purpose: the head of every chunk loop (rows, row_ok, the packed rows,
the key mask) and the first tile load of the loops of ``bidir_fwd_kernel`` and ``bidir_bwd_dv_kernel``.
Through an inlined ``@triton.jit`` helper they give the same PTX instructions, but with line info
(Triton's default) the helper's scope label lands at the top of the loop body, ptxas treats it as a
block boundary, and 10 of the 71 sm_90 kernels of ``bench/linear_sm90_compile.py`` were scheduled
differently (one at 6 registers fewer), ``bidir_fwd`` of ``--quick`` at 10 registers fewer; the same PTX
without the labels gives byte-identical SASS (``bench/RESULTS.md``, issue 16, 2026-12-01).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import spaces
from .. import tuning

SEGMENT_ALIGN = 128  # tokens; every chunk size in the search spaces divides it

ELU, RELU, IDENTITY = 0, 1, 2  # constexpr ids, in the order of feature_maps.FEATURE_MAPS


@triton.jit
def feature(x, FEATURE: tl.constexpr):
    """φ(x) for fp32 x."""
    if FEATURE == 0:  # elu + 1
        y = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FEATURE == 1:  # relu
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def feature_grad(x, FEATURE: tl.constexpr):
    """dφ/dx at fp32 x."""
    if FEATURE == 0:
        d = tl.where(x > 0, 1.0, tl.exp(x))
    elif FEATURE == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(first row, length, batch index) of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        seqlen = tl.load(cu_seqlens + i_n + 1).to(tl.int32) - bos
        batch = i_n * 0
    else:
        bos = 0
        seqlen = T
        batch = i_n
    return bos, seqlen, batch


@triton.jit
def segment_bounds(seqlen, i_s, num_splits, ALIGN: tl.constexpr):
    """Token range [start, end) of segment ``i_s`` of ``num_splits`` (possibly empty)."""
    seg_len = tl.cdiv(tl.cdiv(seqlen, ALIGN), num_splits) * ALIGN
    start = i_s * seg_len
    end = tl.minimum(start + seg_len, seqlen)
    return start, end


@triton.jit
def segment_program(heads):
    """(block, segment, sequence, head) of a program of the segmented kernels: grid axis 0 cuts a head dim in
    blocks, axis 1 a sequence in ``num_splits`` segments; axis 2 is (sequence, head), ``heads`` heads per
    sequence.  Kernels derive their other heads from it before they ask for :func:`segment_rows`."""
    i_blk, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return i_blk, i_s, i_nh // heads, i_nh % heads


@triton.jit
def segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN: tl.constexpr, ALIGN: tl.constexpr):
    """(first row, length, batch index) of sequence ``i_n`` (:func:`sequence_bounds`) and the rows
    [start, end) of its segment ``i_s`` of ``num_splits`` (:func:`segment_bounds`)."""
    bos, seqlen, batch = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    t_start, t_end = segment_bounds(seqlen, i_s, num_splits, ALIGN)
    return bos, seqlen, batch, t_start, t_end


@triton.jit
def state_ptrs(states, index, offs_k, offs_v, DK: tl.constexpr, DV: tl.constexpr):
    """The pointers of the [BK, BV] tile (rows ``offs_k``, columns ``offs_v``) of state ``index`` in a
    contiguous fp32 tensor of [Dk, Dv] states: S, dS and their per-segment copies, loaded and stored alike."""
    return states + index * DK * DV + offs_k[:, None] * DV + offs_v[None, :]


@triton.jit
def as_dot(x, DOT_FP32: tl.constexpr, INPUT_DTYPE: tl.constexpr):
    """Cast an fp32 tile to the operand type of this kernel's matmuls."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x.to(INPUT_DTYPE)


# --------------------------------------------------------------------------- host side


@contextlib.contextmanager
def direct_launches():
    """Launch kernels straight from the launchers, without wrap_triton's higher-order-op dispatch
    (about a millisecond per launch in eager mode): for plain eager tensors outside the ops, as
    ``triton_op`` itself does inside them."""
    from torch._library.triton import set_wrap_triton_enabled

    with set_wrap_triton_enabled(False):
        yield


def dot_mode(dtype: torch.dtype) -> tuple[bool, str, tl.dtype]:
    """(matmuls in fp32?, their input precision, the element type) for inputs of ``dtype``.

    bf16: bf16 operands, fp32 accumulation.  fp16: fp32 operands on tf32 tensor cores (tf32 keeps
    fp16's 10-bit mantissa but not its range: the state grows with T and 1/den shrinks with it,
    and either would overflow or underflow in fp16 at long T).  fp32: exact fp32 products, so an
    fp32 call is as accurate as plain torch in fp32.
    """
    if dtype == torch.bfloat16:
        return False, "tf32", tl.bfloat16
    if dtype == torch.float16:
        return True, "tf32", tl.float16
    if dtype == torch.float32:
        return True, "ieee", tl.float32
    raise ValueError(f"linear attention kernels take float16, bfloat16 or float32, got {dtype}")


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two ≥ max(n, lo) (tl.dot needs every tile side ≥ 16)."""
    return max(lo, triton.next_power_of_2(int(n)))


def segment_grid(config: dict, block: str, dim: int, num_splits: int, programs: int) -> tuple[int, tuple[int, int, int]]:
    """(block size, grid) of a segmented launch: head dim ``dim`` cut in blocks of ``config[block]`` (at most
    its padded size) × ``num_splits`` segments × ``programs`` (sequence, head) pairs (:func:`segment_program`)."""
    size = min(config[block], pow2(dim))
    return size, (triton.cdiv(dim, size), num_splits, programs)


def row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, H, T, D] tensor whose last dim is contiguous."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"the last dimension must be contiguous, got strides {tuple(x.stride())}")
    return x.stride(0), x.stride(1), x.stride(2)


def launch_config(kernel: str, shape: dict, device: torch.device, make_bench, tensors, config=None) -> dict:
    """The launch configuration of ``kernel``: ``config`` when given, else
    :func:`attnrewrite.kernels.tuning.pick_config` over the kernel's search space."""
    return tuning.pick_config("linear", spaces.SPACES[kernel], shape, device, make_bench, tensors=tensors,
                              config=config)


def tuning_shape(num_seqs: int, heads_q: int, heads_kv: int, T: int, dk: int, dv: int, dtype: torch.dtype) -> dict:
    """The shape description the search spaces bucket on (see ``spaces.bucket``)."""
    return {"N": int(num_seqs), "Hq": int(heads_q), "Hkv": int(heads_kv), "T": int(T),
            "Dk": int(dk), "Dv": int(dv), "dtype": spaces.dtype_name(dtype)}


def launch_options(config: dict) -> dict:
    """The part of a configuration that goes to the launcher rather than to the kernel's constexprs."""
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def exclusive_cumsum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Σ over the earlier (later when ``reverse``) entries of dim 2, excluding the entry itself;
    shifted rather than subtracted, so no cancellation."""
    if reverse:
        return exclusive_cumsum(x.flip(2)).flip(2)
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(2)], dim=2)


def default_num_splits(device: torch.device, programs_per_segment: int) -> int:
    """Segments per sequence so that one launch has about one program per multiprocessor.

    Splitting costs an extra pass over K and V (to sum each segment's state first), so it only
    happens when the batch and heads alone leave much of the GPU idle.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, round(sms / max(1, programs_per_segment))))
