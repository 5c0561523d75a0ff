"""Forward kernel of sliding-window attention: exact softmax over each query's band of keys (plus the
sink keys), flash style — an online softmax (running row maximum and sum, fp32 accumulator) over the
key blocks the band reaches, so the work is O(Tq · (window + sinks)), not O(Tq · Tk).

One program computes BLOCK_M query rows of one head against its key/value head (grouped heads read
the same K/V; nothing is repeated).  The key blocks it visits are given by
:func:`.triton_common.key_blocks`: the sink blocks, then the band's masked edge, its inside (no masks,
no bounds checks) and its other edge.  It also stores each row's log-sum-exp (log2 units; +inf for a
row that sees no key), which the backward kernels read instead of recomputing the softmax's
statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (LOG2E_HOST, POSITION_CODES, dot_precision, empty_out_lse,
                                                 head_position, head_strides, load_rows, mask_strides, mma, mod_args, mod_kernel,
                                                 modified_scores, online_softmax_step, padded_dim, row_mask, row_ptrs)

from .triton_common import band_scores, key_blocks, program_sequence


@triton.jit
def _fwd_key_loop(acc, m_i, l_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn,
                  offs_m, shift, q_len, k_len, window, sinks, lo, hi, scale_log2,
                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr,
                  POSITION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, offs_n, stride_kn, k_len, offs_d, D, MASKED, BLOCK_D != D)
        s, _ = modified_scores(mma(q, tl.trans(k), None, DOT_PRECISION), scale_log2, None, mod_in_mul, mod_in_add,
                               mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
        s = band_scores(s, mask_base, stride_mm, stride_mn, offs_m, offs_n, shift, q_len, k_len, window, sinks,
                        CAUSAL, HAS_MASK, MASKED, pos_log2, POSITION)
        v = load_rows(v_base, offs_n, stride_vn, k_len, offs_dv, DV, MASKED, BLOCK_DV != DV)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def sliding_window_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Slopes, KvLens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_q, len_q, len_k, scale_log2, window, sinks,
    mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MOD_FN: tl.constexpr = -1, POSITION: tl.constexpr = 0,
):
    m_block, batch64, head64, head_kv64, q_len, k_len, shift = program_sequence(heads_q, len_q, len_k, KvLens, GROUP,
                                                                                HAS_KV_LENS)
    q_base = Q + batch64 * stride_qb + head64 * stride_qh
    k_base = K + batch64 * stride_kb + head_kv64 * stride_kh
    v_base = V + batch64 * stride_vb + head_kv64 * stride_vh
    o_base = Out + batch64 * stride_ob + head64 * stride_oh
    mask_base = Mask + batch64 * stride_mb + head64 * stride_mh
    pos_log2 = head_position(Slopes, head64, len_q, len_k, POSITION)  # slope (log2 units) or R's row

    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_base, offs_m, stride_qm, q_len, offs_d, D, True, BLOCK_D != D)

    sink_end, band_lo, full_lo, full_hi, hi = key_blocks(m0, shift, q_len, k_len, window, sinks, CAUSAL,
                                                         BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm,
                                  stride_mn, offs_m, shift, q_len, k_len, window, sinks, 0, sink_end, scale_log2,
                                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm,
                                  stride_mn, offs_m, shift, q_len, k_len, window, sinks, band_lo, full_lo, scale_log2,
                                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm,
                                  stride_mn, offs_m, shift, q_len, k_len, window, sinks, full_lo, full_hi, scale_log2,
                                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, False, DOT_PRECISION, MOD_FN, POSITION)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm,
                                  stride_mn, offs_m, shift, q_len, k_len, window, sinks, full_hi, hi, scale_log2,
                                  mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, pos_log2,
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, True, DOT_PRECISION, MOD_FN, POSITION)
    seen_any = l_i > 0.0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, m_i + tl.log2(tl.where(seen_any, l_i, 1.0)), float("inf"))
    row_ok = offs_m < q_len
    tl.store(row_ptrs(o_base, offs_m, stride_om, offs_dv), out.to(Out.dtype.element_ty),
             mask=row_mask(offs_m, q_len, offs_dv, DV))
    tl.store(Lse + batch64 * stride_lb + head64 * stride_lh + offs_m, lse, mask=row_ok)


def sliding_window_fwd(q, k, v, mask, kv_lens, scale: float, causal: bool, window: int, sinks: int,
                       config: dict, launch=lambda kernel: kernel, program=None, slopes=None,
                       position: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.  Returns (out [B, Hq, Tq, Dv] in q's dtype, lse float32 [B, Hq, Tq] in
    log2 units, +inf for rows that see no key).

    q/k/v with unit last stride; ``mask`` an additive float mask broadcastable to [B, Hq, Tq, Tk] (a
    bool mask turned into 0/−inf by the caller) or None; ``kv_lens`` int32 [B] or None; ``config``
    holds BLOCK_M, BLOCK_N, num_warps, num_stages; ``launch`` wraps the kernel (``wrap_triton``).
    ``program``: the score modification (:class:`~attnrewrite.kernels.score_mods.ScoreProgram`, or None),
    applied to scale·q·kᵀ before the mask and compiled in through
    :func:`~attnrewrite.kernels.triton_scaffold.mod_args` (ValueError for a program it cannot take).
    ``position`` (None, ``"j-i"`` or ``"|j-i|"``) with ``slopes`` (float32 [Hq], contiguous): the position
    bias slopes[h] · (j − i) or slopes[h] · |j − i| (query index i, key index j), computed in the kernel; or
    ``position="relative"`` with ``slopes`` the table R, float32 [Hq, Tq + Tk − 1] contiguous:
    R[h, j − i + Tq − 1] read by diagonal on the band's and the sinks' tiles.
    """
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out, lse = empty_out_lse(q, dim_v)
    if out.numel() == 0:
        return out, lse
    block_m = config["BLOCK_M"]
    mask, m_strides = mask_strides(mask, (batch, heads_q, len_q, len_k))
    mod, mod_fn = mod_args(program, scale)
    grid = (triton.cdiv(len_q, block_m), batch * heads_q)
    launch(mod_kernel(sliding_window_fwd_kernel, program))[grid](
        q, k, v, out, lse, mask if mask is not None else q, slopes if slopes is not None else q,
        kv_lens if kv_lens is not None else q,
        *head_strides(q, k, v, out),
        lse.stride(0), lse.stride(1),
        *m_strides,
        heads_q, len_q, len_k, scale * LOG2E_HOST, window, sinks, *mod,
        D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=padded_dim(dim_v), GROUP=heads_q // heads_kv,
        CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_KV_LENS=kv_lens is not None,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], MOD_FN=mod_fn,
        POSITION=POSITION_CODES[position],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out, lse
