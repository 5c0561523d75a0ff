"""Backward kernels of sigmoid attention, without saved statistics.

With P = sigmoid(S) recomputed from q and k (sigmoid has no row statistics to save):

    dV = P^T dO        dP = dO V^T        dS = P (1 - P) dP
    dQ = scale dS K    dK = scale dS^T Q

Two kernels, deterministic (no atomics) except for the gradient of a relative bias table R (POSITION = 3):
the dQ kernel adds each tile's dS into dR[h, j − i + Tq − 1] with atomics (a diagonal's entries come
from many tiles and programs).

- ``sigmoid_bwd_dkdv_kernel``: one program per key block of one key/value head; it loops
  over the query heads of its group and their query blocks, accumulating dK and dV in
  registers.  It works on transposed tiles (S^T = K Q^T) so no tile is transposed in the loop.
- ``sigmoid_bwd_dq_kernel``: one program per query block of one query head, looping over key
  blocks like the forward.  When the float mask needs a gradient it also writes dS.

Like the forward, each loop visits only blocks some row may see, and only boundary blocks
are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import head_strides, load_row_pair, mod_kernel, row_mask, row_ptrs

from .triton_common import (LOG2E, LOG2E_HOST, POSITION_CODES, bias_strides, block_grid, dot_precision, head_position,
                            key_range, locate, mask_strides, mma, mod_args, newton_steps, padded_dim,
                            relative_bias_grad, sigmoid_tile)


@triton.jit
def _dq_key_loop(dq, q, do, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn, stride_mm, stride_mn,
                 stride_dsm, offs_m, q_len, k_len, shift, lo, hi, scale_log2, bias_log2,
                 mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_base,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, STORE_DS: tl.constexpr,
                 MASKED: tl.constexpr, NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MOD_FN: tl.constexpr, POSITION: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_row_pair(k_base, stride_kn, v_base, stride_vn, offs_n, k_len, D, DV, BLOCK_D, BLOCK_DV, MASKED)
        p, d_mod = sigmoid_tile(q, k, mask_base, stride_mm, stride_mn, offs_m, offs_n, q_len, k_len, shift,
                                scale_log2, bias_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                                pos_log2, False, CAUSAL, HAS_MASK, MASKED, NEWTON_STEPS, DOT_PRECISION, MOD_FN,
                                POSITION)
        if MOD_FN >= 0 and not STORE_DS and POSITION != 3:
            # mod' is folded into p(1 − p) before the dP product, so that one tile, not two, is held in
            # registers across it (as without a modification)
            w = p * (1.0 - p) * d_mod
            dp = mma(do, tl.trans(v), None, DOT_PRECISION)
            ds = w * dp
        else:
            dp = mma(do, tl.trans(v), None, DOT_PRECISION)
            ds = p * (1.0 - p) * dp
        if STORE_DS:  # the mask is added after the modification: its gradient is dS before mod'
            tl.store(ds_base + offs_m[:, None] * stride_dsm + offs_n[None, :], ds,
                     mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :])
        if POSITION == 3:  # so is R: dR[h, j − i + Tq − 1] += dS, summed along the tile's diagonals
            relative_bias_grad(dr_base, ds, offs_m, offs_n, q_len, k_len)
        if (STORE_DS or POSITION == 3) and MOD_FN >= 0:
            ds = ds * d_mod
        dq = mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def sigmoid_bwd_dq_kernel(
    Q, K, V, DO, DQ, DS, Mask, Bias, Slopes, DR, KvLens, CuQ, CuK, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dsb, stride_dsh, stride_dsm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bz, stride_bh, stride_bm,
    heads_q, len_q, len_k, scale, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, STORE_DS: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    VARLEN: tl.constexpr, NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BIAS: tl.constexpr = False, MOD_FN: tl.constexpr = -1,
    POSITION: tl.constexpr = 0,
):
    seq, batch, head, m_block, q_start, q_len, k_start, k_len = locate(
        tl.program_id(0), tl.program_id(1), heads_q, BlockSeq, BlockStart, CuQ, CuK, KvLens, len_q, len_k,
        BLOCK_M, VARLEN, HAS_KV_LENS, CAUSAL != 0 and not VARLEN)
    if seq < 0:
        return
    head_kv = head // GROUP
    batch64, head64, head_kv64 = batch.to(tl.int64), head.to(tl.int64), head_kv.to(tl.int64)
    q_row0, k_row0 = q_start.to(tl.int64), k_start.to(tl.int64)
    q_base = Q + batch64 * stride_qb + head64 * stride_qh + q_row0 * stride_qm
    do_base = DO + batch64 * stride_dob + head64 * stride_doh + q_row0 * stride_dom
    dq_base = DQ + batch64 * stride_dqb + head64 * stride_dqh + q_row0 * stride_dqm
    k_base = K + batch64 * stride_kb + head_kv64 * stride_kh + k_row0 * stride_kn
    v_base = V + batch64 * stride_vb + head_kv64 * stride_vh + k_row0 * stride_vn
    mask_base = Mask + batch64 * stride_mb + head64 * stride_mh
    ds_base = DS + batch64 * stride_dsb + head64 * stride_dsh

    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, do = load_row_pair(q_base, stride_qm, do_base, stride_dom, offs_m, q_len, D, DV, BLOCK_D, BLOCK_DV, True)
    bias_base = Bias + seq * stride_bz + head * stride_bh + q_start.to(tl.int64) * stride_bm
    if ROW_BIAS:  # one b per query row, [BLOCK_M, 1] against the key columns
        bias_log2 = (tl.load(bias_base + offs_m * stride_bm, mask=offs_m < q_len, other=0.0) * LOG2E)[:, None]
    else:  # one b per sequence and head
        bias_log2 = tl.load(bias_base) * LOG2E
    pos_log2 = head_position(Slopes, head64, len_q, len_k, POSITION)  # slope (log2 units) or R's row
    dr_base = DR
    if POSITION == 3:  # the head's row of the gradient of R, [Hq, Tq + Tk - 1]
        dr_base = head_position(DR, head64, len_q, len_k, POSITION)

    shift, full_end, hi = key_range(m0, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_loop(dq, q, do, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      stride_dsm, offs_m, q_len, k_len, shift, 0, full_end, scale_log2, bias_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                      pos_log2, dr_base, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, STORE_DS, False,
                      NEWTON_STEPS, DOT_PRECISION, MOD_FN, POSITION)
    dq = _dq_key_loop(dq, q, do, k_base, v_base, mask_base, ds_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      stride_dsm, offs_m, q_len, k_len, shift, full_end, hi, scale_log2, bias_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                      pos_log2, dr_base, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, STORE_DS, True,
                      NEWTON_STEPS, DOT_PRECISION, MOD_FN, POSITION)
    tl.store(row_ptrs(dq_base, offs_m, stride_dqm, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask(offs_m, q_len, offs_d, D))


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, stride_qm, stride_dom, stride_mm, stride_mn,
                     offs_n, q_len, k_len, shift, lo, hi, scale_log2, bias_log2, bias_base, stride_bm,
                     mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                     NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_BIAS: tl.constexpr,
                     MOD_FN: tl.constexpr, POSITION: tl.constexpr):
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do = load_row_pair(q_base, stride_qm, do_base, stride_dom, offs_m, q_len, D, DV, BLOCK_D, BLOCK_DV, MASKED)
        if ROW_BIAS:  # b per query row: loaded for this block of rows only (a whole row would cost registers)
            bias_t = (tl.load(bias_base + offs_m * stride_bm, mask=offs_m < q_len, other=0.0) * LOG2E)[None, :]
        else:
            bias_t = bias_log2
        pt, d_mod = sigmoid_tile(k, q, mask_base, stride_mm, stride_mn, offs_n, offs_m, q_len, k_len, shift,
                                 scale_log2, bias_t, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                                 pos_log2, True, CAUSAL, HAS_MASK, MASKED, NEWTON_STEPS, DOT_PRECISION, MOD_FN,
                                 POSITION)  # [N, M]
        dv = mma(pt.to(do.dtype), do, dv, DOT_PRECISION)
        if MOD_FN >= 0:  # mod' folded in before the dPᵀ product (see the dQ loop): one tile held across it
            wt = pt * (1.0 - pt) * d_mod
            dpt = mma(v, tl.trans(do), None, DOT_PRECISION)
            dst = wt * dpt
        else:
            dpt = mma(v, tl.trans(do), None, DOT_PRECISION)
            dst = pt * (1.0 - pt) * dpt
        dk = mma(dst.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def sigmoid_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, Mask, Bias, Slopes, KvLens, CuQ, CuK, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bz, stride_bh, stride_bm,
    heads_kv, len_q, len_k, scale, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr,
    NEWTON_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_BIAS: tl.constexpr = False, MOD_FN: tl.constexpr = -1, POSITION: tl.constexpr = 0,
):
    seq, batch, head_kv, n_block, q_start, q_len, k_start, k_len = locate(
        tl.program_id(0), tl.program_id(1), heads_kv, BlockSeq, BlockStart, CuQ, CuK, KvLens, len_q, len_k,
        BLOCK_N, VARLEN, HAS_KV_LENS, False)
    if seq < 0:
        return
    batch64, head_kv64 = batch.to(tl.int64), head_kv.to(tl.int64)
    q_row0, k_row0 = q_start.to(tl.int64), k_start.to(tl.int64)
    k_base = K + batch64 * stride_kb + head_kv64 * stride_kh + k_row0 * stride_kn
    v_base = V + batch64 * stride_vb + head_kv64 * stride_vh + k_row0 * stride_vn
    dk_base = DK + batch64 * stride_dkb + head_kv64 * stride_dkh + k_row0 * stride_dkn
    dv_base = DV_ + batch64 * stride_dvb + head_kv64 * stride_dvh + k_row0 * stride_dvn

    n0 = n_block * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = load_row_pair(k_base, stride_kn, v_base, stride_vn, offs_n, k_len, D, DV, BLOCK_D, BLOCK_DV, True)

    # Query blocks: [m_lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, m_hi) masked.
    # Rows above the causal diagonal of this key block never see it and are not visited; a block of
    # keys that are all padding (beyond kv_lens) visits nothing and stores zeros.
    shift = k_len - q_len if CAUSAL == 2 else k_len * 0
    m_hi = tl.where(n0 < k_len, tl.cdiv(q_len, BLOCK_M) * BLOCK_M, 0)
    if CAUSAL != 0:
        m_lo = tl.minimum(tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M, m_hi)
        first_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = m_hi * 0
        first_full = m_hi * 0
    full_lo = tl.minimum(tl.maximum(m_lo, first_full), m_hi)
    full_hi = tl.where(n0 + BLOCK_N <= k_len, tl.maximum(full_lo, q_len // BLOCK_M * BLOCK_M), full_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        head64 = head_kv64 * GROUP + g
        q_base = Q + batch64 * stride_qb + head64 * stride_qh + q_row0 * stride_qm
        do_base = DO + batch64 * stride_dob + head64 * stride_doh + q_row0 * stride_dom
        mask_base = Mask + batch64 * stride_mb + head64 * stride_mh
        bias_base = Bias + seq * stride_bz + head64 * stride_bh + q_row0 * stride_bm
        bias_log2 = tl.load(bias_base) * LOG2E  # the b of this head, unless ROW_BIAS
        pos_log2 = head_position(Slopes, head64, len_q, len_k, POSITION)  # slope (log2 units) or R's row
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, stride_qm, stride_dom, stride_mm,
                                  stride_mn, offs_n, q_len, k_len, shift, m_lo, full_lo, scale_log2, bias_log2,
                                  bias_base, stride_bm, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                                  pos_log2, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, True,
                                  NEWTON_STEPS, DOT_PRECISION, ROW_BIAS, MOD_FN, POSITION)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, stride_qm, stride_dom, stride_mm,
                                  stride_mn, offs_n, q_len, k_len, shift, full_lo, full_hi, scale_log2, bias_log2,
                                  bias_base, stride_bm, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                                  pos_log2, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, False,
                                  NEWTON_STEPS, DOT_PRECISION, ROW_BIAS, MOD_FN, POSITION)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, stride_qm, stride_dom, stride_mm,
                                  stride_mn, offs_n, q_len, k_len, shift, full_hi, m_hi, scale_log2, bias_log2,
                                  bias_base, stride_bm, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                                  pos_log2, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, True,
                                  NEWTON_STEPS, DOT_PRECISION, ROW_BIAS, MOD_FN, POSITION)
    # Dense: every key row up to Tk is stored (padding keys get zeros); packed: only this sequence's.
    n_store = k_len if VARLEN else len_k
    tl.store(row_ptrs(dk_base, offs_n, stride_dkn, offs_d), (dk * scale).to(DK.dtype.element_ty),
             mask=row_mask(offs_n, n_store, offs_d, D))
    tl.store(row_ptrs(dv_base, offs_n, stride_dvn, offs_dv), dv.to(DV_.dtype.element_ty),
             mask=row_mask(offs_n, n_store, offs_dv, DV))


def sigmoid_bwd(q, k, v, grad_out, mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale: float, causal: int,
                want_mask_grad: bool, config_dq: dict, config_dkdv: dict, launch=lambda kernel: kernel,
                kernels=("dq", "dkdv"), program=None, slopes=None, position: str | None = None):
    """Launch both backward kernels. Returns (dq, dk, dv, ds, dr) where ds is the float32 [B, Hq, Tq, Tk]
    score gradient when ``want_mask_grad`` (zeros where no row sees a key) and an empty tensor otherwise, and
    dr the float32 [Hq, Tq + Tk − 1] gradient of a relative bias table (``position="relative"``; empty
    otherwise, or when the dQ kernel is not launched).

    Arguments as for :func:`attnrewrite.kernels.sigmoid.triton_fwd.sigmoid_fwd`, plus ``grad_out``
    [B, Hq, Tq, Dv] (unit last stride) and one config per kernel; ``kernels`` names the kernels
    to launch (tuning times one at a time); ``program`` the score modification and ``slopes`` /
    ``position`` the position bias, as for the forward.
    """
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    ds = (torch.zeros(batch, heads_q, len_q, len_k, dtype=torch.float32, device=q.device) if want_mask_grad
          else torch.empty(0, dtype=torch.float32, device=q.device))
    relative = position == "relative"
    dr = (torch.zeros(heads_q, len_q + len_k - 1, dtype=torch.float32, device=q.device) if relative
          else torch.empty(0, dtype=torch.float32, device=q.device))
    if q.numel() == 0 and k.numel() == 0:
        return dq, dk, dv, ds, dr
    varlen = cu_seqlens_q is not None
    mask, m_strides = mask_strides(mask, (batch, heads_q, len_q, len_k))
    ds_strides = ds.stride()[:3] if want_mask_grad else (0, 0, 0)
    common = dict(D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
                  CAUSAL=causal, HAS_MASK=mask is not None, HAS_KV_LENS=kv_lens is not None, VARLEN=varlen,
                  DOT_PRECISION=dot_precision(q.dtype), ROW_BIAS=bias.dim() == 3,
                  POSITION=POSITION_CODES[position])
    slopes_arg = slopes if slopes is not None else bias
    mod, common["MOD_FN"] = mod_args(program, scale)
    mask_arg = mask if mask is not None else q
    kv_lens_arg = kv_lens if kv_lens is not None else q
    cu_q_arg, cu_k_arg = (cu_seqlens_q, cu_seqlens_k) if varlen else (q, q)

    if q.numel() > 0 and "dq" in kernels:
        block_m = config_dq["BLOCK_M"]
        block_seq, block_start, grid = block_grid(cu_seqlens_q, block_m, len_q, batch, heads_q, q)
        launch(mod_kernel(sigmoid_bwd_dq_kernel, program))[grid](
            q, k, v, grad_out, dq, ds if want_mask_grad else q, mask_arg, bias, slopes_arg,
            dr if relative else bias, kv_lens_arg,
            cu_q_arg, cu_k_arg, block_seq, block_start,
            *head_strides(q, k, v, grad_out, dq),
            *ds_strides, *m_strides, *bias_strides(bias),
            heads_q, len_q, len_k, scale, scale * LOG2E_HOST, *mod,
            STORE_DS=want_mask_grad, NEWTON_STEPS=newton_steps(config_dq["RCP_NEWTON"], q.dtype),
            BLOCK_M=block_m, BLOCK_N=config_dq["BLOCK_N"],
            num_warps=config_dq["num_warps"], num_stages=config_dq["num_stages"], **common,
        )
    if k.numel() > 0 and "dkdv" in kernels:
        block_n = config_dkdv["BLOCK_N"]
        block_seq, block_start, grid = block_grid(cu_seqlens_k, block_n, len_k, batch, heads_kv, q)
        launch(mod_kernel(sigmoid_bwd_dkdv_kernel, program))[grid](
            q, k, v, grad_out, dk, dv, mask_arg, bias, slopes_arg, kv_lens_arg,
            cu_q_arg, cu_k_arg, block_seq, block_start,
            *head_strides(q, k, v, grad_out, dk, dv),
            *m_strides, *bias_strides(bias),
            heads_kv, len_q, len_k, scale, scale * LOG2E_HOST, *mod,
            NEWTON_STEPS=newton_steps(config_dkdv["RCP_NEWTON"], q.dtype),
            BLOCK_M=config_dkdv["BLOCK_M"], BLOCK_N=block_n,
            num_warps=config_dkdv["num_warps"], num_stages=config_dkdv["num_stages"], **common,
        )
    return dq, dk, dv, ds, dr
