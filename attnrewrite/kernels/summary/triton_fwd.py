"""Forward kernel of summary attention: one online softmax over a query block's summaries and its window.

One program computes BLOCK_M query rows of one query head against its key/value head (grouped
heads read the same K/V and summaries; nothing is repeated).  It makes two passes of one online
softmax (running max, running sum, rescaled accumulator, all float32): first over the summary rows
the block may see (chunks older than its window; all chunks when bidirectional), then over the raw
keys of its window.  Blocks outside those ranges are never visited, so a block costs
O(BLOCK_M · (N + (W + 1) · C)) instead of O(BLOCK_M · T).  It writes the output and, for the
backward, each row's log-sum-exp (log2 units; 0 for a row that sees nothing, whose output is 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (LOG2E_HOST, dot_precision, empty_out_lse, head_strides, load_rows,
                                                 mod_args, mod_kernel, online_softmax_step, padded_dim, program_heads, row_mask,
                                                 row_ptrs)

from .chunked import hide_padding
from .packed import block_table, query_programs
from .triton_common import key_block, raw_key_range, sequence_block, summary_range


@triton.jit
def _fwd_pass(acc, m_i, l_i, q, k_base, v_base, flags_base, stride_kn, stride_vn, offs_m, len_q, n_keys, lo, hi,
              chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SUMMARY: tl.constexpr,
              HAS_FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, vis, z2, _ = key_block(q, k_base, v_base, flags_base, stride_kn, stride_vn, offs_m, offs_n, len_q,
                                     n_keys, chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul,
                                     mod_out_add, mod_grad_mul, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, SUMMARY, HAS_FLAGS,
                                     DOT_PRECISION, MOD_FN)
        z2 = tl.where(vis, z2, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, z2, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def summary_fwd_kernel(
    Q, K, V, KSum, VSum, Valid, Exists, Out, Lse, CuSeqlens, CuChunks, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_sb, stride_sh, stride_sn,
    stride_tb, stride_th, stride_tn,
    stride_ob, stride_oh, stride_om,
    stride_valid_b, stride_exists_b,
    heads_q, len_q, n_chunks, chunk, window, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, VARLEN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL and not VARLEN:  # the longest rows first, so the last wave is made of short ones
        pid_m = tl.cdiv(len_q, BLOCK_M) - 1 - pid_m
    pid_zh = tl.program_id(1)
    batch, head, head_kv = program_heads(pid_zh, heads_q, GROUP)
    # packed sequences: this program's sequence starts at token tok0 and summary chunk0 (0 and 0 otherwise)
    m0, tok0, length, chunk0, chunks = sequence_block(pid_m, BLOCK_M, len_q, n_chunks, CuSeqlens, CuChunks,
                                                      BlockSeq, BlockStart, VARLEN)
    q_base = Q + batch * stride_qb + head * stride_qh + tok0 * stride_qm
    k_base = K + batch * stride_kb + head_kv * stride_kh + tok0 * stride_kn
    v_base = V + batch * stride_vb + head_kv * stride_vh + tok0 * stride_vn
    ks_base = KSum + batch * stride_sb + head_kv * stride_sh + chunk0 * stride_sn
    vs_base = VSum + batch * stride_tb + head_kv * stride_th + chunk0 * stride_tn
    valid_base = Valid + batch * stride_valid_b + tok0
    exists_base = Exists + batch * stride_exists_b + chunk0

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_base, offs_m, stride_qm, length, offs_d, D, True, BLOCK_D != D)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_sum = summary_range(m0, BLOCK_M, length, chunks, chunk, window, CAUSAL)
    acc, m_i, l_i = _fwd_pass(acc, m_i, l_i, q, ks_base, vs_base, exists_base, stride_sn, stride_tn, offs_m, length,
                              chunks, 0, n_sum, chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul,
                              mod_out_add, mod_grad_mul,
                              D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, True, True, DOT_PRECISION, MOD_FN)
    lo, hi = raw_key_range(m0, BLOCK_M, length, chunk, window, CAUSAL)
    acc, m_i, l_i = _fwd_pass(acc, m_i, l_i, q, k_base, v_base, valid_base, stride_kn, stride_vn, offs_m, length,
                              length, lo, hi, chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul,
                              mod_out_add, mod_grad_mul,
                              D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, False, HAS_VALID, DOT_PRECISION, MOD_FN)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = Out + batch * stride_ob + head * stride_oh + tok0 * stride_om
    tl.store(row_ptrs(o_base, offs_m, stride_om, offs_dv), out.to(Out.dtype.element_ty),
             mask=row_mask(offs_m, length, offs_dv, DV))
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), 0.0)
    tl.store(Lse + pid_zh.to(tl.int64) * len_q + tok0 + offs_m, lse, mask=offs_m < length)


def flag_args(q: torch.Tensor, key_valid: torch.Tensor | None, exists: torch.Tensor):
    """(valid uint8 [B, T] or a dummy, exists uint8 [B, N]): the per-key flags as the kernels read them."""
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else q
    return valid, exists.to(torch.uint8).contiguous()


def varlen_args(q: torch.Tensor, pack, sizes: str, block: int, heads: int) -> tuple[tuple, tuple, dict]:
    """(the four table pointers, the grid, the VARLEN flag) of a launch over blocks of ``block`` rows of each
    sequence's ``sizes`` ("lengths" or "chunks") — or, with ``pack`` None, dummies and {} (one sequence)."""
    if pack is None:
        return (q, q, q, q), None, {}
    items = pack.slots if sizes == "chunks" else q.shape[2]
    programs = query_programs(items, pack.n_seqs, block)
    seq, first = block_table(getattr(pack, sizes), block, programs)
    return (pack.cu_seqlens, pack.cu_chunks, seq, first), (programs, heads), dict(VARLEN=True)


def summary_fwd(q, k, v, k_sum, v_sum, exists, key_valid, scale: float, causal: bool, chunk_size: int,
                window_chunks: int, config: dict, launch=lambda kernel: kernel, program=None, pack=None):
    """Launch the forward kernel. Returns (out [B, Hq, T, Dv] in q's dtype, lse float32 [B, Hq, T]).

    q/k/v with unit last stride; ``k_sum``/``v_sum`` [B, Hkv, N, D|Dv] and ``exists`` bool [B, N] from
    :func:`attnrewrite.kernels.summary.chunked.chunk_summaries`; ``key_valid`` bool [B, T] or None.
    ``config`` holds BLOCK_M, BLOCK_N, num_warps, num_stages; ``launch`` wraps the kernel (``wrap_triton``
    under ``triton_op``).  ``program``: the score modification (a
    :class:`~attnrewrite.kernels.score_mods.ScoreProgram`, or None), applied to every score — summaries' and
    window keys' — and compiled in through :func:`~attnrewrite.kernels.triton_scaffold.mod_args`.
    """
    batch, heads_q, length, dim = q.shape
    heads_kv, dim_v, n_chunks = k.shape[1], v.shape[3], k_sum.shape[2]
    out, lse = empty_out_lse(q, dim_v)
    if out.numel() == 0:
        return out, lse
    valid, exists8 = flag_args(q, key_valid, exists)
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)  # a -inf score does not stop 0·nan
    block_m = config["BLOCK_M"]
    mod, mod_fn = mod_args(program, scale)
    tables, grid, varlen = varlen_args(q, pack, "lengths", block_m, heads_q)
    grid = grid or (triton.cdiv(length, block_m), batch * heads_q)
    launch(mod_kernel(summary_fwd_kernel, program))[grid](
        q, k, v, k_sum, v_sum, valid, exists8, out, lse, *tables,
        *head_strides(q, k, v, k_sum, v_sum, out),
        valid.stride(0) if key_valid is not None else 0, exists8.stride(0),
        heads_q, length, n_chunks, chunk_size, window_chunks, scale * LOG2E_HOST, *mod,
        D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
        CAUSAL=bool(causal), HAS_VALID=key_valid is not None, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], MOD_FN=mod_fn,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **varlen,
    )
    return out, lse
