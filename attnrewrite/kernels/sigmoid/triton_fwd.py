"""Forward kernel of sigmoid attention: out = sigmoid(scale * q.k^T + mask + b) . v, tiled over key blocks.

One program computes BLOCK_M query rows of one head against its key/value head (grouped
heads read the same K/V; nothing is repeated).  Sigmoid needs no running maximum and no
row sum, so the loop is two matmuls and an elementwise sigmoid with an fp32 accumulator.

The key range of a program is split in two loops: blocks every row may see in full (no
masks, no bounds checks: the steady state) and the boundary blocks (the causal diagonal,
the end of the keys, kv_lens), which are masked.  Blocks no row may see are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import head_strides, mod_kernel, row_mask, row_ptrs

from .triton_common import (LOG2E, LOG2E_HOST, POSITION_CODES, bias_strides, block_grid, dot_precision, head_position,
                            key_range, load_rows, locate, mask_strides, mma, mod_args, newton_steps, padded_dim,
                            sigmoid_tile)


@triton.jit
def _fwd_key_loop(acc, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                  offs_m, q_len, k_len, shift, lo, hi, scale_log2, bias_log2,
                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                  NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr,
                  POSITION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, offs_n, stride_kn, k_len, offs_d, D, MASKED, BLOCK_D != D)
        p, _ = sigmoid_tile(q, k, mask_base, stride_mm, stride_mn, offs_m, offs_n, q_len, k_len, shift, scale_log2,
                            bias_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                            False, CAUSAL, HAS_MASK, MASKED, NEWTON_STEPS, DOT_PRECISION, MOD_FN, POSITION)
        v = load_rows(v_base, offs_n, stride_vn, k_len, offs_dv, DV, MASKED, BLOCK_DV != DV)
        acc = mma(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc


@triton.jit
def sigmoid_fwd_kernel(
    Q, K, V, Out, Mask, Bias, Slopes, KvLens, CuQ, CuK, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bz, stride_bh, stride_bm,
    heads_q, len_q, len_k, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr,
    NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_BIAS: tl.constexpr = False, MOD_FN: tl.constexpr = -1, POSITION: tl.constexpr = 0,
):
    seq, batch, head, m_block, q_start, q_len, k_start, k_len = locate(
        tl.program_id(0), tl.program_id(1), heads_q, BlockSeq, BlockStart, CuQ, CuK, KvLens, len_q, len_k,
        BLOCK_M, VARLEN, HAS_KV_LENS, CAUSAL != 0 and not VARLEN)
    if seq < 0:
        return
    head_kv = head // GROUP
    batch64 = batch.to(tl.int64)
    q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + batch64 * stride_kb + head_kv.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + batch64 * stride_vb + head_kv.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    mask_base = Mask + batch64 * stride_mb + head.to(tl.int64) * stride_mh

    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_base, offs_m, stride_qm, q_len, offs_d, D, True, BLOCK_D != D)
    bias_base = Bias + seq * stride_bz + head * stride_bh + q_start.to(tl.int64) * stride_bm
    if ROW_BIAS:  # one b per query row, [BLOCK_M, 1] against the key columns
        bias_log2 = (tl.load(bias_base + offs_m * stride_bm, mask=offs_m < q_len, other=0.0) * LOG2E)[:, None]
    else:  # one b per sequence and head: a scalar keeps the registers free
        bias_log2 = tl.load(bias_base) * LOG2E
    pos_log2 = head_position(Slopes, head.to(tl.int64), len_q, len_k, POSITION)  # slope (log2 units) or R's row

    # key j is visible to row i iff j <= i + shift (causal); full blocks need no mask for any row.
    shift, full_end, hi = key_range(m0, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc = _fwd_key_loop(acc, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                        offs_m, q_len, k_len, shift, 0, full_end, scale_log2, bias_log2,
                        mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, False, NEWTON_STEPS, DOT_PRECISION,
                        MOD_FN, POSITION)
    acc = _fwd_key_loop(acc, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                        offs_m, q_len, k_len, shift, full_end, hi, scale_log2, bias_log2,
                        mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, NEWTON_STEPS, DOT_PRECISION,
                        MOD_FN, POSITION)
    tl.store(row_ptrs(o_base, offs_m, stride_om, offs_dv), acc.to(Out.dtype.element_ty),
             mask=row_mask(offs_m, q_len, offs_dv, DV))


def sigmoid_fwd(q, k, v, mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale: float, causal: int,
                config: dict, launch=lambda kernel: kernel, program=None, slopes=None,
                position: str | None = None) -> torch.Tensor:
    """Launch the forward kernel. Returns out [B, Hq, Tq, Dv] in q's dtype.

    Inputs as for ``sigmoid_attention_dispatch`` after validation: q/k/v with unit last stride, ``mask`` a
    4-d additive float mask (or None), ``bias`` float32 [Z, Hq] or, one b per query row, [Z|1, Hq, Tq]
    (Tq = total_q when packed), ``causal`` 0/1/2.  ``config`` holds
    BLOCK_M, BLOCK_N, num_warps, num_stages and RCP_NEWTON; ``launch`` wraps the kernel (torch's
    ``wrap_triton`` under ``triton_op``).  ``program``: the score modification
    (:class:`~attnrewrite.kernels.score_mods.ScoreProgram`, or None), compiled in through ``mod_args``.
    ``position`` (None, ``"j-i"`` or ``"|j-i|"``) with ``slopes`` (float32 [Hq], contiguous): the position
    bias slopes[h] · (j − i) or slopes[h] · |j − i| computed in the kernel (``POSITION_CODES``); or
    ``position="relative"`` with ``slopes`` the table R, float32 [Hq, Tq + Tk − 1] contiguous (not packed).
    """
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, heads_q, len_q, dim_v, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_m = config["BLOCK_M"]
    varlen = cu_seqlens_q is not None
    block_seq, block_start, grid = block_grid(cu_seqlens_q, block_m, len_q, batch, heads_q, q)
    mask, m_strides = mask_strides(mask, (batch, heads_q, len_q, len_k))
    mod, mod_fn = mod_args(program, scale)
    launch(mod_kernel(sigmoid_fwd_kernel, program))[grid](
        q, k, v, out, mask if mask is not None else q, bias, slopes if slopes is not None else bias,
        kv_lens if kv_lens is not None else q,
        cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q, block_seq, block_start,
        *head_strides(q, k, v, out),
        *m_strides,
        *bias_strides(bias),
        heads_q, len_q, len_k, scale * LOG2E_HOST, *mod,
        D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
        CAUSAL=causal, HAS_MASK=mask is not None, HAS_KV_LENS=kv_lens is not None, VARLEN=varlen,
        ROW_BIAS=bias.dim() == 3, MOD_FN=mod_fn, POSITION=POSITION_CODES[position], NEWTON_STEPS=newton_steps(config["RCP_NEWTON"], q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out
