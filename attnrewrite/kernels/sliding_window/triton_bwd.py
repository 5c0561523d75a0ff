"""Backward kernels of sliding-window attention, from the forward's log-sum-exp.

With P = exp2(S2 − lse) recomputed block by block (S2 the scores in log2 units) and
delta_i = Σ_d dO_id · O_id (one row sum, computed before the kernels):

    dV = Pᵀ dO        dP = dO Vᵀ        dS = P ∘ (dP − delta) ∘ mod′(S)
    dQ = scale · dS K        dK = scale · dSᵀ Q

(mod′ the derivative of the score modification, when the call has one; S = scale · q·kᵀ.)

Two kernels, both visiting only the blocks of the band and the sinks, deterministic (no atomics) except for
the gradient of a relative bias table R (POSITION = 3): the dQ kernel adds each tile's dS (before mod′) into
dR[h, j − i + Tq − 1] with atomics (a diagonal's entries come from many tiles, programs and batch rows;
:func:`attnrewrite.kernels.triton_scaffold.relative_bias_grad`, the sigmoid kernels' helper too):

- ``sliding_window_bwd_dq_kernel``: one program per query block of one query head, over the key blocks of
  :func:`.triton_common.key_blocks` (as the forward).
- ``sliding_window_bwd_dkdv_kernel``: one program per key block of one key/value head; it loops over the
  query heads of its group and the query blocks of :func:`.triton_common.query_blocks`, accumulating dK
  and dV in registers, on transposed tiles (Sᵀ = K Qᵀ), so no tile is transposed in the loop and K/V are
  never repeated for grouped heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (LOG2E, LOG2E_HOST, POSITION_CODES, dot_precision, head_position,
                                                 head_strides, load_row_pair, mask_strides, mma, mod_args, mod_kernel,
                                                 modified_scores, padded_dim, position_scores, relative_bias_grad,
                                                 row_mask, row_ptrs, softmax_dkdv_step, softmax_dq_step,
                                                 softmax_score_grad)

from .triton_common import band_scores, band_visible, key_blocks, program_sequence, query_blocks


@triton.jit
def _dq_key_loop(dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                 offs_m, shift, q_len, k_len, window, sinks, lo, hi, scale_log2,
                 mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_row,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr, POSITION: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_row_pair(k_base, stride_kn, v_base, stride_vn, offs_n, k_len, D, DV, BLOCK_D, BLOCK_DV, MASKED)
        s, d_mod = modified_scores(mma(q, tl.trans(k), None, DOT_PRECISION), scale_log2, None, mod_in_mul,
                                   mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
        s = band_scores(s, mask_base, stride_mm, stride_mn, offs_m, offs_n, shift, q_len, k_len, window, sinks,
                        CAUSAL, HAS_MASK, MASKED, pos_log2, POSITION)
        p = tl.exp2(s - lse[:, None])
        if POSITION == 3:  # R is added after the modification: dR[h, j − i + Tq − 1] += dS before mod'
            ds = softmax_score_grad(p, do, v, delta, DOT_PRECISION)
            relative_bias_grad(dr_row, ds, offs_m, offs_n, q_len, k_len)
            if MOD_FN >= 0:
                ds = ds * d_mod
            dq = mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
        else:
            dq = softmax_dq_step(dq, p, do, k, v, delta, d_mod, DOT_PRECISION, MOD_FN)
    return dq


@triton.jit
def sliding_window_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Mask, Slopes, DR, KvLens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_q, len_q, len_k, scale, scale_log2, window, sinks,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, POSITION: tl.constexpr = 0,
):
    m_block, batch64, head64, head_kv64, q_len, k_len, shift = program_sequence(heads_q, len_q, len_k, KvLens, GROUP,
                                                                                HAS_KV_LENS)
    q_base = Q + batch64 * stride_qb + head64 * stride_qh
    do_base = DO + batch64 * stride_dob + head64 * stride_doh
    dq_base = DQ + batch64 * stride_dqb + head64 * stride_dqh
    k_base = K + batch64 * stride_kb + head_kv64 * stride_kh
    v_base = V + batch64 * stride_vb + head_kv64 * stride_vh
    mask_base = Mask + batch64 * stride_mb + head64 * stride_mh
    pos_log2 = head_position(Slopes, head64, len_q, len_k, POSITION)  # slope (log2 units) or R's row
    dr_row = DR
    if POSITION == 3:  # the head's row of the gradient of R, [Hq, Tq + Tk - 1]
        dr_row = head_position(DR, head64, len_q, len_k, POSITION)
    stat_base = batch64 * stride_lb + head64 * stride_lh

    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q, do = load_row_pair(q_base, stride_qm, do_base, stride_dom, offs_m, q_len, D, DV, BLOCK_D, BLOCK_DV, True)
    lse = tl.load(Lse + stat_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)

    sink_end, band_lo, full_lo, full_hi, hi = key_blocks(m0, shift, q_len, k_len, window, sinks, CAUSAL,
                                                         BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_loop(dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      offs_m, shift, q_len, k_len, window, sinks, 0, sink_end, scale_log2,
                      mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_row,
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    dq = _dq_key_loop(dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      offs_m, shift, q_len, k_len, window, sinks, band_lo, full_lo, scale_log2,
                      mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_row,
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    dq = _dq_key_loop(dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      offs_m, shift, q_len, k_len, window, sinks, full_lo, full_hi, scale_log2,
                      mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_row,
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, False, DOT_PRECISION, MOD_FN, POSITION)
    dq = _dq_key_loop(dq, q, do, lse, delta, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                      offs_m, shift, q_len, k_len, window, sinks, full_hi, hi, scale_log2,
                      mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2, dr_row,
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    tl.store(row_ptrs(dq_base, offs_m, stride_dqm, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask(offs_m, q_len, offs_d, D))


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, stride_qm, stride_dom,
                     stride_mm, stride_mn, offs_n, shift, q_len, k_len, window, sinks, lo, hi, scale_log2,
                     mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr, POSITION: tl.constexpr):
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do = load_row_pair(q_base, stride_qm, do_base, stride_dom, offs_m, q_len, D, DV, BLOCK_D, BLOCK_DV, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        st, d_mod = modified_scores(mma(k, tl.trans(q), None, DOT_PRECISION), scale_log2, None, mod_in_mul,
                                    mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)  # [BLOCK_N, BLOCK_M]
        if HAS_MASK:
            extra = tl.load(mask_base + offs_n[:, None] * stride_mn + offs_m[None, :] * stride_mm,
                            mask=(offs_n < k_len)[:, None] & (offs_m < q_len)[None, :], other=0.0)
            st += extra.to(tl.float32) * LOG2E
        st = position_scores(st, offs_m[None, :], offs_n[:, None], q_len, k_len, pos_log2, POSITION)
        if MASKED:
            seen = band_visible((offs_m + shift)[None, :], offs_n[:, None], k_len, window, sinks, CAUSAL)
            st = tl.where(seen & (offs_m < q_len)[None, :], st, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dk, dv = softmax_dkdv_step(dk, dv, pt, q, do, v, delta, d_mod, DOT_PRECISION, MOD_FN)
    return dk, dv


@triton.jit
def sliding_window_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, Lse, Delta, Mask, Slopes, KvLens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_kv, len_q, len_k, scale, scale_log2, window, sinks,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, POSITION: tl.constexpr = 0,
):
    n_block, batch64, head_kv64, _, q_len, k_len, shift = program_sequence(heads_kv, len_q, len_k, KvLens, 1,
                                                                           HAS_KV_LENS)
    k_base = K + batch64 * stride_kb + head_kv64 * stride_kh
    v_base = V + batch64 * stride_vb + head_kv64 * stride_vh
    dk_base = DK + batch64 * stride_dkb + head_kv64 * stride_dkh
    dv_base = DV_ + batch64 * stride_dvb + head_kv64 * stride_dvh

    n0 = n_block * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = load_row_pair(k_base, stride_kn, v_base, stride_vn, offs_n, k_len, D, DV, BLOCK_D, BLOCK_DV, True)
    m_lo, full_lo, full_hi, m_hi = query_blocks(n0, shift, q_len, k_len, window, sinks, CAUSAL, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        head64 = head_kv64 * GROUP + g
        q_base = Q + batch64 * stride_qb + head64 * stride_qh
        do_base = DO + batch64 * stride_dob + head64 * stride_doh
        mask_base = Mask + batch64 * stride_mb + head64 * stride_mh
        pos_log2 = head_position(Slopes, head64, len_q, len_k, POSITION)  # slope (log2 units) or R's row
        lse_base = Lse + batch64 * stride_lb + head64 * stride_lh
        delta_base = Delta + batch64 * stride_lb + head64 * stride_lh
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, stride_qm,
                                  stride_dom, stride_mm, stride_mn, offs_n, shift, q_len, k_len, window, sinks,
                                  m_lo, full_lo, scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, stride_qm,
                                  stride_dom, stride_mm, stride_mn, offs_n, shift, q_len, k_len, window, sinks,
                                  full_lo, full_hi, scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, False, DOT_PRECISION, MOD_FN, POSITION)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, mask_base, lse_base, delta_base, stride_qm,
                                  stride_dom, stride_mm, stride_mn, offs_n, shift, q_len, k_len, window, sinks,
                                  full_hi, m_hi, scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    # every key row up to Tk is stored: padding keys and keys no query sees get zeros
    tl.store(row_ptrs(dk_base, offs_n, stride_dkn, offs_d), (dk * scale).to(DK.dtype.element_ty),
             mask=row_mask(offs_n, len_k, offs_d, D))
    tl.store(row_ptrs(dv_base, offs_n, stride_dvn, offs_dv), dv.to(DV_.dtype.element_ty),
             mask=row_mask(offs_n, len_k, offs_dv, DV))


def sliding_window_bwd(q, k, v, out, lse, grad_out, mask, kv_lens, scale: float, causal: bool, window: int,
                       sinks: int, config_dq: dict, config_dkdv: dict, launch=lambda kernel: kernel,
                       kernels=("dq", "dkdv"), program=None, slopes=None,
                       position: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch both backward kernels.  Returns (dq, dk, dv, dr): dr the float32 [Hq, Tq + Tk − 1] gradient of a
    relative bias table (``position="relative"``; summed by the dQ kernel, so zeros when only "dkdv" is
    launched), an empty tensor otherwise.

    Arguments as for :func:`.triton_fwd.sliding_window_fwd`, plus the forward's ``out`` and ``lse``,
    ``grad_out`` [B, Hq, Tq, Dv] (unit last stride) and one config per kernel; ``kernels`` names the
    kernels to launch (tuning times one at a time); ``program`` the score modification and ``slopes`` /
    ``position`` the position bias, as for the forward.
    """
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    relative = position == "relative"
    dr = (torch.zeros(heads_q, len_q + len_k - 1, dtype=torch.float32, device=q.device) if relative
          else torch.empty(0, dtype=torch.float32, device=q.device))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dr
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()         # [B, Hq, Tq]
    lse = lse.contiguous()
    mask, m_strides = mask_strides(mask, (batch, heads_q, len_q, len_k))
    common = dict(D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
                  CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_KV_LENS=kv_lens is not None,
                  DOT_PRECISION=dot_precision(q.dtype), POSITION=POSITION_CODES[position])
    slopes_arg = slopes if slopes is not None else q
    mod, common["MOD_FN"] = mod_args(program, scale)
    mask_arg = mask if mask is not None else q
    kv_lens_arg = kv_lens if kv_lens is not None else q
    if "dq" in kernels:
        block_m = config_dq["BLOCK_M"]
        launch(mod_kernel(sliding_window_bwd_dq_kernel, program))[(triton.cdiv(len_q, block_m), batch * heads_q)](
            q, k, v, grad_out, dq, lse, delta, mask_arg, slopes_arg, dr if relative else q, kv_lens_arg,
            *head_strides(q, k, v, grad_out, dq),
            lse.stride(0), lse.stride(1),
            *m_strides,
            heads_q, len_q, len_k, scale, scale * LOG2E_HOST, window, sinks, *mod,
            BLOCK_M=block_m, BLOCK_N=config_dq["BLOCK_N"],
            num_warps=config_dq["num_warps"], num_stages=config_dq["num_stages"], **common,
        )
    if "dkdv" in kernels:
        block_n = config_dkdv["BLOCK_N"]
        launch(mod_kernel(sliding_window_bwd_dkdv_kernel, program))[(triton.cdiv(len_k, block_n), batch * heads_kv)](
            q, k, v, grad_out, dk, dv, lse, delta, mask_arg, slopes_arg, kv_lens_arg,
            *head_strides(q, k, v, grad_out, dk, dv),
            lse.stride(0), lse.stride(1),
            *m_strides,
            heads_kv, len_q, len_k, scale, scale * LOG2E_HOST, window, sinks, *mod,
            BLOCK_M=config_dkdv["BLOCK_M"], BLOCK_N=block_n,
            num_warps=config_dkdv["num_warps"], num_stages=config_dkdv["num_stages"], **common,
        )
    return dq, dk, dv, dr
