"""Backward kernels of summary attention, from the forward's per-row log-sum-exp.

With P = exp2(Z2 − lse) recomputed from q and the keys, and δ_i = Σ_d dO_id · O_id (computed in torch):

    dV = Pᵀ dO        dP = dO Vᵀ        dS = P ⊙ (dP − δ) ⊙ mod′        dQ = scale · dS K        dK = scale · dSᵀ Q

where "keys" are the summaries and the raw tokens alike.  Two kernels, deterministic (no atomics):

- ``summary_bwd_dq_kernel``: one program per query block of one query head; it visits the same
  summary and raw-key ranges as the forward.
- ``summary_bwd_dkdv_kernel``: one program per block of keys of one key/value head — raw tokens, or
  summaries when SUMMARY — looping over the query heads of its group and over the query blocks that
  may see those keys (raw: the chunks up to W after them; summaries: every chunk more than W after
  them).  It writes float32 dK, dV (raw) or dK̄, dV̄ (summaries); the gradients of the summaries go
  on through the torch pooling code (:func:`~attnrewrite.kernels.summary.chunked.chunk_summaries_backward`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (LOG2E_HOST, dot_precision, head_strides, load_row_pair, load_rows, mma,
                                                 mod_args, mod_kernel, modified_scores, padded_dim, program_heads, row_mask,
                                                 row_ptrs, softmax_dkdv_step, softmax_dq_step)

from .chunked import hide_padding
from .triton_common import (key_block, key_ok, raw_key_range, raw_query_range, sequence_block, summary_query_range,
                            summary_range, visible)
from .triton_fwd import flag_args, varlen_args


@triton.jit
def _dq_pass(dq, q, do, lse, delta, k_base, v_base, flags_base, stride_kn, stride_vn, offs_m, len_q, n_keys, lo, hi,
             chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SUMMARY: tl.constexpr,
             HAS_FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, vis, z2, d_mod = key_block(q, k_base, v_base, flags_base, stride_kn, stride_vn, offs_m, offs_n, len_q,
                                         n_keys, chunk, window, scale_log2, mod_in_mul, mod_in_add, mod_out_mul,
                                         mod_out_add, mod_grad_mul, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, SUMMARY,
                                         HAS_FLAGS, DOT_PRECISION, MOD_FN)
        p = tl.where(vis, tl.exp2(z2 - lse[:, None]), 0.0)
        dq = softmax_dq_step(dq, p, do, k, v, delta, d_mod, DOT_PRECISION, MOD_FN)
    return dq


@triton.jit
def summary_bwd_dq_kernel(
    Q, K, V, KSum, VSum, Valid, Exists, DO, Lse, Delta, DQ, CuSeqlens, CuChunks, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_sb, stride_sh, stride_sn,
    stride_tb, stride_th, stride_tn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_valid_b, stride_exists_b,
    heads_q, len_q, n_chunks, chunk, window, scale, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, VARLEN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL and not VARLEN:
        pid_m = tl.cdiv(len_q, BLOCK_M) - 1 - pid_m
    pid_zh = tl.program_id(1)
    batch, head, head_kv = program_heads(pid_zh, heads_q, GROUP)
    m0, tok0, length, chunk0, chunks = sequence_block(pid_m, BLOCK_M, len_q, n_chunks, CuSeqlens, CuChunks,
                                                      BlockSeq, BlockStart, VARLEN)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q + batch * stride_qb + head * stride_qh + tok0 * stride_qm, offs_m, stride_qm, length, offs_d, D,
                  True, BLOCK_D != D)
    do = load_rows(DO + batch * stride_dob + head * stride_doh + tok0 * stride_dom, offs_m, stride_dom, length,
                   offs_dv, DV, True, BLOCK_DV != DV)
    row = pid_zh.to(tl.int64) * len_q + tok0 + offs_m
    lse = tl.load(Lse + row, mask=offs_m < length, other=0.0)
    delta = tl.load(Delta + row, mask=offs_m < length, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_sum = summary_range(m0, BLOCK_M, length, chunks, chunk, window, CAUSAL)
    dq = _dq_pass(dq, q, do, lse, delta, KSum + batch * stride_sb + head_kv * stride_sh + chunk0 * stride_sn,
                  VSum + batch * stride_tb + head_kv * stride_th + chunk0 * stride_tn,
                  Exists + batch * stride_exists_b + chunk0,
                  stride_sn, stride_tn, offs_m, length, chunks, 0, n_sum, chunk, window, scale_log2,
                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, True, True, DOT_PRECISION, MOD_FN)
    lo, hi = raw_key_range(m0, BLOCK_M, length, chunk, window, CAUSAL)
    dq = _dq_pass(dq, q, do, lse, delta, K + batch * stride_kb + head_kv * stride_kh + tok0 * stride_kn,
                  V + batch * stride_vb + head_kv * stride_vh + tok0 * stride_vn, Valid + batch * stride_valid_b + tok0,
                  stride_kn, stride_vn, offs_m, length, length, lo, hi, chunk, window, scale_log2,
                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, False, HAS_VALID, DOT_PRECISION, MOD_FN)
    dq_base = DQ + batch * stride_dqb + head * stride_dqh + tok0 * stride_dqm
    tl.store(row_ptrs(dq_base, offs_m, stride_dqm, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask(offs_m, length, offs_d, D))


@triton.jit
def summary_bwd_dkdv_kernel(
    Q, K, V, Flags, DO, Lse, Delta, DK, DV_, CuSeqlens, CuChunks, BlockSeq, BlockStart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_flags_b,
    heads_kv, len_q, n_keys, chunk, window, scale, scale_log2,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, SUMMARY: tl.constexpr, HAS_FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, VARLEN: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_zh = tl.program_id(1)
    batch = (pid_zh // heads_kv).to(tl.int64)
    head_kv = (pid_zh % heads_kv).to(tl.int64)
    # packed sequences: the keys (raw tokens, or summaries) and the queries of this program's sequence
    n0, tok0, length, chunk0, chunks = sequence_block(pid_n, BLOCK_N, len_q, n_keys, CuSeqlens, CuChunks,
                                                      BlockSeq, BlockStart, VARLEN)
    if SUMMARY:
        key0 = chunk0
        n_here = chunks
    else:
        key0 = tok0
        n_here = length
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(K + batch * stride_kb + head_kv * stride_kh + key0 * stride_kn, offs_n, stride_kn, n_here, offs_d,
                  D, True, BLOCK_D != D)
    v = load_rows(V + batch * stride_vb + head_kv * stride_vh + key0 * stride_vn, offs_n, stride_vn, n_here, offs_dv,
                  DV, True, BLOCK_DV != DV)
    ok_n = key_ok(Flags + batch * stride_flags_b + key0, offs_n, n_here, HAS_FLAGS)
    if SUMMARY:
        lo = summary_query_range(n0, length, chunk, window, CAUSAL)
        hi = length + n0 * 0
    else:
        lo, hi = raw_query_range(n0, BLOCK_N, length, chunk, window, CAUSAL)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        head = head_kv * GROUP + g
        q_base = Q + batch * stride_qb + head * stride_qh + tok0 * stride_qm
        do_base = DO + batch * stride_dob + head * stride_doh + tok0 * stride_dom
        row_base = (batch * heads_kv * GROUP + head) * len_q + tok0
        for start_m in tl.range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do = load_row_pair(q_base, stride_qm, do_base, stride_dom, offs_m, length, D, DV, BLOCK_D, BLOCK_DV,
                                  True)
            lse = tl.load(Lse + row_base + offs_m, mask=offs_m < length, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=offs_m < length, other=0.0)
            ok = ok_n[:, None] & (offs_m < length)[None, :]
            # key-major tiles [BLOCK_N, BLOCK_M]: no transposes of the accumulated operands
            vis = visible(offs_m[None, :], offs_n[:, None], ok, chunk, window, CAUSAL, SUMMARY)
            z2t, d_mod = modified_scores(mma(k, tl.trans(q), None, DOT_PRECISION), scale_log2, None, mod_in_mul,
                                         mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
            pt = tl.where(vis, tl.exp2(z2t - lse[None, :]), 0.0)
            dk, dv = softmax_dkdv_step(dk, dv, pt, q, do, v, delta, d_mod, DOT_PRECISION, MOD_FN)
    dk_base = DK + batch * stride_dkb + head_kv * stride_dkh + key0 * stride_dkn
    dv_base = DV_ + batch * stride_dvb + head_kv * stride_dvh + key0 * stride_dvn
    tl.store(row_ptrs(dk_base, offs_n, stride_dkn, offs_d), dk * scale,
             mask=row_mask(offs_n, n_here, offs_d, D))
    tl.store(row_ptrs(dv_base, offs_n, stride_dvn, offs_dv), dv,
             mask=row_mask(offs_n, n_here, offs_dv, DV))


def summary_bwd(q, k, v, k_sum, v_sum, exists, key_valid, grad_out, lse, delta, scale: float, causal: bool,
                chunk_size: int, window_chunks: int, config_dq: dict, config_dkdv: dict, launch=lambda kernel: kernel,
                kernels=("dq", "dkdv", "dkdv_summary"), program=None, pack=None):
    """Launch the backward kernels. Returns (dq in q's dtype, then float32 dk, dv [B, Hkv, T, D|Dv] and
    dk̄, dv̄ [B, Hkv, N, D|Dv]) — the raw keys' gradients without the part that flows through the summaries.

    Arguments as for :func:`attnrewrite.kernels.summary.triton_fwd.summary_fwd`, plus ``grad_out``
    [B, Hq, T, Dv] (unit last stride), the forward's ``lse`` and ``delta`` = Σ dO ⊙ O (float32 [B, Hq, T],
    contiguous); ``kernels`` names the kernels to launch (tuning times one at a time); ``program`` the score
    modification, as for the forward (its derivative enters dS of the summaries and the raw keys alike);
    ``pack`` the packed sequences, as for the forward.
    """
    batch, heads_q, length, dim = q.shape
    heads_kv, dim_v, n_chunks = k.shape[1], v.shape[3], k_sum.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk, dv = torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    dk_sum, dv_sum = torch.zeros(k_sum.shape, **f32), torch.zeros(v_sum.shape, **f32)
    if q.numel() == 0:
        return dq, dk, dv, dk_sum, dv_sum
    valid, exists8 = flag_args(q, key_valid, exists)
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)  # dq = ds·k: a zero ds does not stop 0·nan
    common = dict(D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
                  CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype))
    mod, common["MOD_FN"] = mod_args(program, scale)
    if "dq" in kernels:
        tables, grid, varlen = varlen_args(q, pack, "lengths", config_dq["BLOCK_M"], heads_q)
        launch(mod_kernel(summary_bwd_dq_kernel, program))[grid or (triton.cdiv(length, config_dq["BLOCK_M"]), batch * heads_q)](
            q, k, v, k_sum, v_sum, valid, exists8, grad_out, lse, delta, dq, *tables,
            *head_strides(q, k, v, k_sum, v_sum, grad_out, dq),
            valid.stride(0) if key_valid is not None else 0, exists8.stride(0),
            heads_q, length, n_chunks, chunk_size, window_chunks, scale, scale * LOG2E_HOST, *mod,
            HAS_VALID=key_valid is not None, BLOCK_M=config_dq["BLOCK_M"], BLOCK_N=config_dq["BLOCK_N"],
            num_warps=config_dq["num_warps"], num_stages=config_dq["num_stages"], **common, **varlen,
        )
    parts = []
    if "dkdv" in kernels:
        parts.append((k, v, valid, key_valid is not None, dk, dv, length, False))
    if "dkdv_summary" in kernels and n_chunks > 0:
        parts.append((k_sum, v_sum, exists8, True, dk_sum, dv_sum, n_chunks, True))
    for keys, values, flags, has_flags, d_keys, d_values, n_keys, is_summary in parts:
        tables, grid, varlen = varlen_args(q, pack, "chunks" if is_summary else "lengths", config_dkdv["BLOCK_N"],
                                           heads_kv)
        launch(mod_kernel(summary_bwd_dkdv_kernel, program))[grid or (triton.cdiv(n_keys, config_dkdv["BLOCK_N"]), batch * heads_kv)](
            q, keys, values, flags, grad_out, lse, delta, d_keys, d_values, *tables,
            *head_strides(q, keys, values, grad_out, d_keys, d_values),
            flags.stride(0) if has_flags else 0,
            heads_kv, length, n_keys, chunk_size, window_chunks, scale, scale * LOG2E_HOST, *mod,
            SUMMARY=is_summary, HAS_FLAGS=has_flags, BLOCK_M=config_dkdv["BLOCK_M"], BLOCK_N=config_dkdv["BLOCK_N"],
            num_warps=config_dkdv["num_warps"], num_stages=config_dkdv["num_stages"], **common, **varlen,
        )
    return dq, dk, dv, dk_sum, dv_sum
