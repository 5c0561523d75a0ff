"""Pieces shared by the sigmoid forward and backward kernels: the sigmoid itself, the probability tile
all three kernels compute (``sigmoid_tile``: forward, dQ, and transposed for dK/dV), tile loads, where a
program's sequence lives, and the block table of packed (varlen) batches.  ``mma``, ``load_rows``, the score
modification (``modified_scores``, ``mod_args``) and the dtype helpers live in
:mod:`attnrewrite.kernels.triton_scaffold`, shared with the other kinds' kernels, and are re-exported here.

Scores are kept in log2 units inside the kernels (z2 = log2(e) * (scale*q.k + mask + b)) so
that sigmoid(z) = 1 / (1 + 2^-z2) costs one multiply-add, one ex2 and one reciprocal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (INTERPRETED, LOG2E, LOG2E_HOST, NO_MOD, POSITION_CODES, dot_precision,
                                                 head_position, load_rows, load_tile, mask_strides, mma, mod_args,
                                                 modified_scores, padded_dim, position_scores, relative_bias_grad,
                                                 score_mod_fn)

__all__ = ["INTERPRETED", "LOG2E", "LOG2E_HOST", "NO_MOD", "POSITION_CODES", "bias_strides", "block_grid",
           "block_table", "dot_precision", "head_position", "key_range", "load_rows", "load_tile", "locate",
           "mask_strides", "mma", "mod_args", "modified_scores", "newton_steps", "padded_dim", "position_scores",
           "relative_bias_grad", "score_mod_fn", "sigmoid_log2", "sigmoid_tile"]


@triton.jit
def sigmoid_log2(z2, NEWTON_STEPS: tl.constexpr):
    """sigmoid of scores z2 given in log2 units: 1 / (1 + 2^-z2); exactly 0 where z2 = -inf.

    NEWTON_STEPS = 0 divides with the special-function unit (ex2 and rcp: two SFU operations per
    score).  NEWTON_STEPS > 0 moves the reciprocal to the FMA pipes: e = 2^-|z2| lies in (0, 1],
    so 1/(1+e) is a reciprocal of a number in (1, 2], reached from the linear minimax guess
    24/17 - 8/17*d (relative error <= 1/17 on [1, 2]) by Newton steps that square the error
    (2 steps: 1e-5, enough for 16-bit operands; 3 steps: float32 rounding); then
    sigmoid = r for z2 >= 0 and e*r for z2 < 0.  The SFU, which limits these kernels on
    Hopper, then does one operation per score instead of two.
    """
    if NEWTON_STEPS == 0:
        p = 1.0 / (1.0 + tl.exp2(-z2))
    else:
        e = tl.exp2(-tl.abs(z2))
        d = 1.0 + e
        r = 1.411764705882353 - 0.47058823529411764 * d
        for _ in tl.static_range(NEWTON_STEPS):
            r = r + r * (1.0 - d * r)
        p = tl.where(z2 >= 0, r, e * r)
    return p


@triton.jit
def sigmoid_tile(x, y, mask_base, stride_mm, stride_mn, offs_x, offs_y, q_len, k_len, shift, scale_log2, bias_log2,
                 mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                 KEY_ROWS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                 NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr,
                 POSITION: tl.constexpr):
    """(P, mod'): the probability tile P = sigmoid(mod(scale · x·yᵀ) + b + mask) of the forward, dQ and dK/dV
    kernels, with the keys no row may see at exactly 0, and the derivative of the score modification at
    scale · x·yᵀ (unused when MOD_FN = NO_MOD).

    The modification (MOD_FN >= 0) is ``post_mul · f(pre_mul · s + pre_add) + post_add``
    (:meth:`attnrewrite.kernels.score_mods.ScoreProgram.split`; f one step of the fixed table, or, MOD_FN =
    GENERATED, a generated chain in the kernel's specialisation: ``triton_scaffold.mod_kernel``), applied by the
    shared :func:`attnrewrite.kernels.triton_scaffold.modified_scores` with the host's constants of ``mod_args``.

    KEY_ROWS = False: x holds query rows ``offs_x``, y key rows ``offs_y``: a [queries, keys] tile.
    KEY_ROWS = True: x holds key rows, y query rows: the transposed [keys, queries] tile of dK/dV.
    ``bias_log2`` (log2 units) broadcasts against the tile: a scalar, or one b per query row shaped
    [queries, 1] (or [1, queries] transposed).  MASKED applies the bounds (and, transposed, the query
    bounds) and the causal rule key <= query + shift; unmasked tiles are known to be fully visible.

    POSITION adds a bias computed from the positions instead of read from memory (ALiBi): ``pos_log2`` ·
    (j − i) (POSITION = 1) or ``pos_log2`` · |j − i| (POSITION = 2), ``pos_log2`` the head's slope in log2
    units, i and j the query and key positions in their sequence; 0 adds nothing.  POSITION = 3 reads a
    relative bias by distance: ``pos_log2`` is then the pointer to the head's row of the table R [Hq, L],
    L = Tq + Tk − 1, and the tile adds R[h, j − i + Tq − 1] (an [L]-long row gathered per tile: no [Tq, Tk]
    tensor).  None depends on q or k, so the derivative of the scores is unchanged.  Both are the shared
    :func:`attnrewrite.kernels.triton_scaffold.position_scores`.
    """
    z2, d_mod = modified_scores(mma(x, tl.trans(y), None, DOT_PRECISION), scale_log2, bias_log2, mod_in_mul,
                                mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
    if KEY_ROWS:
        q_idx = offs_y[None, :]
        k_idx = offs_x[:, None]
    else:
        q_idx = offs_x[:, None]
        k_idx = offs_y[None, :]
    if HAS_MASK:
        extra = tl.load(mask_base + q_idx * stride_mm + k_idx * stride_mn, mask=(q_idx < q_len) & (k_idx < k_len),
                        other=0.0)
        z2 += extra.to(tl.float32) * LOG2E
    z2 = position_scores(z2, q_idx, k_idx, q_len, k_len, pos_log2, POSITION)
    if MASKED:
        visible = k_idx < k_len
        if KEY_ROWS:
            visible = visible & (q_idx < q_len)
        if CAUSAL != 0:
            visible = visible & (k_idx <= q_idx + shift)
        z2 = tl.where(visible, z2, float("-inf"))
    p = sigmoid_log2(z2, NEWTON_STEPS)
    return p, d_mod


@triton.jit
def key_range(m0, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(shift, full_end, hi) of the query block starting at row ``m0`` (the forward's and the dQ kernel's key
    loop): key j is visible to row i iff j <= i + shift (causal; shift = Tk − Tq bottom-right, CAUSAL = 2,
    else 0); the keys [0, full_end) are whole blocks every row of the block sees (no mask), [full_end, hi)
    the boundary blocks, and no key at or beyond hi is visible to any row."""
    shift = k_len - q_len if CAUSAL == 2 else k_len * 0
    if CAUSAL != 0:
        hi = tl.maximum(tl.minimum(k_len, m0 + BLOCK_M + shift), 0)
        full_end = tl.minimum(tl.maximum(m0 + shift + 1, 0) // BLOCK_N, k_len // BLOCK_N) * BLOCK_N
    else:
        hi = k_len
        full_end = k_len // BLOCK_N * BLOCK_N
    return shift, full_end, hi


@triton.jit
def locate(pid_block, pid_zh, heads, BlockSeq, BlockStart, CuQ, CuK, KvLens, len_q, len_k,
           BLOCK: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_LENS: tl.constexpr, REVERSE: tl.constexpr):
    """Where a program works: (seq, batch in memory, head, block in its sequence,
    q_start, q_len, k_start, k_len).  seq < 0 marks a spare program of a packed batch.

    Dense: grid (blocks, B * heads).  Packed: grid (packed blocks, heads), where BlockSeq maps
    each packed block to its sequence (-1 past the last) and BlockStart gives the first packed
    block of each sequence; blocks run over queries, or over keys for the dK/dV kernel.
    """
    if VARLEN:
        seq = tl.load(BlockSeq + pid_block)
        safe = tl.maximum(seq, 0)
        head = pid_zh
        batch = seq * 0
        block = pid_block - tl.load(BlockStart + safe)
        q_start = tl.load(CuQ + safe)
        q_len = tl.load(CuQ + safe + 1) - q_start
        k_start = tl.load(CuK + safe)
        k_len = tl.load(CuK + safe + 1) - k_start
    else:
        seq = pid_zh // heads
        head = pid_zh % heads
        batch = seq
        q_start = seq * 0
        k_start = seq * 0
        q_len = len_q + seq * 0
        k_len = len_k + seq * 0
        if HAS_KV_LENS:
            k_len = tl.minimum(tl.maximum(tl.load(KvLens + seq), 0), len_k)
        block = pid_block + seq * 0
        if REVERSE:  # causal query blocks: the longest rows first, so the last wave is made of short ones
            block = tl.cdiv(len_q, BLOCK) - 1 - pid_block
    return seq, batch, head, block, q_start, q_len, k_start, k_len


def block_table(cu_seqlens: torch.Tensor, block: int, total: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The packed-block schedule of a varlen batch, computed on the device without a host sync.

    Returns (block_seq, block_start, n_programs): each sequence of length L gets cdiv(L, block)
    consecutive programs; block_seq[p] is the sequence of program p (-1 for spare programs) and
    block_start[s] the first program of sequence s.  n_programs = cdiv(total, block) + N bounds
    the number of blocks whatever the lengths are.
    """
    n_seq = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    blocks = (lengths + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    n_programs = triton.cdiv(total, block) + n_seq
    programs = torch.arange(n_programs, device=cu_seqlens.device, dtype=torch.int64)
    block_seq = torch.searchsorted(ends, programs, right=True)
    block_seq = torch.where(block_seq < n_seq, block_seq, -1).to(torch.int32)
    return block_seq, (ends - blocks).to(torch.int32), n_programs


def block_grid(cu_seqlens: torch.Tensor | None, block: int, length: int, batch: int, heads: int,
               unread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(block_seq, block_start, grid) of a launch over blocks of ``block`` rows of ``heads`` heads: for packed
    sequences (``cu_seqlens``) the :func:`block_table` and one program per table entry and head; otherwise
    ``unread`` for both tables (pointers the kernel never reads) and cdiv(length, block) × batch · heads."""
    if cu_seqlens is not None:
        block_seq, block_start, n_programs = block_table(cu_seqlens, block, length)
        return block_seq, block_start, (n_programs, heads)
    return unread, unread, (triton.cdiv(length, block), batch * heads)


def newton_steps(use_newton: int, dtype: torch.dtype) -> int:
    """Newton steps of the reciprocal: 0 (SFU), 2 for 16-bit operands, 3 for float32."""
    if not use_newton:
        return 0
    return 3 if dtype == torch.float32 else 2


def bias_strides(bias: torch.Tensor) -> tuple[int, int, int]:
    """(stride_bz, stride_bh, stride_bm) of the bias b, float32 [Z, Hq] (one b per sequence and head) or
    [Z, Hq, Tq] (one per query row: bias="auto" in a causal call); a size-1 dim is broadcast (stride 0),
    so [1, Hq, total_q] serves every packed sequence."""
    if bias.dim() == 2:
        bias = bias.unsqueeze(-1)
    return tuple(s if n != 1 else 0 for s, n in zip(bias.stride(), bias.shape))
