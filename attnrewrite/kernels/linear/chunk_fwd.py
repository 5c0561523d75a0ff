"""Triton forward of chunked causal linear attention, and the per-segment state reduction.

``chunk_fwd_kernel`` — one program per (value block, segment, sequence × query head) walks its
segment chunk by chunk (C tokens): inside the chunk the masked quadratic form q̃·k̃ᵀ, across
chunks the running state (S [Dk, BV], z [Dk]) kept in fp32 registers.  Feature map, scale,
key padding and the normalisation are fused, so q, k, v are read once and o once written.

``chunk_state_kernel`` — Σ x̃ᵀ·y and Σ w·x̃ over each segment, summed over a group of heads: with
(x, y) = (k, v) it gives each segment's contribution to the state (for splitting a sequence, and
for bidirectional attention); with (x, y) = (q, dO/den) and w = γ it gives the backward's dS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels._ops import traceable
from attnrewrite.kernels.triton_scaffold import row_ptrs

from .triton_common import (SEGMENT_ALIGN, as_dot, dot_mode, exclusive_cumsum, feature, launch_config, launch_options,
                            pow2, row_strides, segment_grid, segment_program, segment_rows, state_ptrs, tuning_shape)


@triton.jit
def chunk_state_kernel(
    x, y, row_scale, row_weight, key_mask, out_S, out_z, cu_seqlens,
    sxb, sxh, sxt, syb, syh, syt,
    T, num_splits, heads_out, scale,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_v, i_s, i_n, i_ho = segment_program(heads_out)
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    heads_in = heads_out * GROUP
    in_dtype = x.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    acc_S = tl.zeros([BK, BV], dtype=tl.float32)
    acc_z = tl.zeros([BK], dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        for g in range(GROUP):
            i_h = i_ho * GROUP + g
            x_rows = x + batch.to(tl.int64) * sxb + i_h * sxh + (bos + rows).to(tl.int64) * sxt
            xx = tl.load(x_rows[:, None] + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x_feat = tl.where(keep[:, None] & k_ok[None, :], feature(xx.to(tl.float32) * scale, FEATURE), 0.0)
            y_rows = y + batch.to(tl.int64) * syb + i_h * syh + (bos + rows).to(tl.int64) * syt
            yy = tl.load(y_rows[:, None] + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
            side = (batch * heads_in + i_h).to(tl.int64) * T + bos + rows
            if HAS_ROW_SCALE:
                yy = yy.to(tl.float32) * tl.load(row_scale + side, mask=row_ok, other=0.0)[:, None]
            acc_S = tl.dot(tl.trans(as_dot(x_feat, DOT_FP32, in_dtype)), as_dot(yy, DOT_FP32, in_dtype), acc_S,
                           input_precision=PREC)
            if HAS_ROW_WEIGHT:
                acc_z += tl.sum(x_feat * tl.load(row_weight + side, mask=row_ok, other=0.0)[:, None], 0)
            else:
                acc_z += tl.sum(x_feat, 0)

    state = ((i_n * heads_out + i_ho) * num_splits + i_s).to(tl.int64)
    tl.store(state_ptrs(out_S, state, offs_k, offs_v, DK, DV), acc_S, mask=k_ok[:, None] & v_ok[None, :])
    tl.store(out_z + state * DK + offs_k, acc_z, mask=tl.where(i_v == 0, k_ok, False))


@triton.jit
def chunk_fwd_kernel(
    q, k, v, o, inv_den, key_mask, start_S, start_z, final_S, final_z, cu_seqlens,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, num_splits, heads_q, scale, eps,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_START: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_v, i_s, i_n, i_hq = segment_program(heads_q)
    heads_kv = heads_q // GROUP
    i_hk = i_hq // GROUP
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    kv_ok = k_ok[:, None] & v_ok[None, :]

    state = (i_n * heads_kv + i_hk).to(tl.int64)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_START:  # the state before this segment: the initial state, plus earlier segments when split
        seg = state * num_splits + i_s
        S = tl.load(state_ptrs(start_S, seg, offs_k, offs_v, DK, DV), mask=kv_ok, other=0.0)
        z = tl.load(start_z + seg * DK + offs_k, mask=k_ok, other=0.0)

    q_base = q + batch.to(tl.int64) * sqb + i_hq * sqh
    k_base = k + batch.to(tl.int64) * skb + i_hk * skh
    v_base = v + batch.to(tl.int64) * svb + i_hk * svh
    o_base = o + batch.to(tl.int64) * sob + i_hq * soh
    side_base = inv_den + (batch * heads_q + i_hq).to(tl.int64) * T + bos
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        # fp32 tiles die as soon as their row/column sums are taken: the loop is register-bound
        qx = tl.load(row_ptrs(q_base, grow, sqt, offs_k), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q_feat = tl.where(row_ok[:, None] & k_ok[None, :], feature(qx.to(tl.float32) * scale, FEATURE), 0.0)
        den = tl.sum(q_feat * z[None, :], 1) + eps
        q_dot = as_dot(q_feat, DOT_FP32, in_dtype)
        kx = tl.load(row_ptrs(k_base, grow, skt, offs_k), mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        k_feat = tl.where(keep[:, None] & k_ok[None, :], feature(kx.to(tl.float32), FEATURE), 0.0)
        z += tl.sum(k_feat, 0)
        k_dot = as_dot(k_feat, DOT_FP32, in_dtype)
        vv = tl.load(row_ptrs(v_base, grow, svt, offs_v), mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        v_dot = as_dot(vv, DOT_FP32, in_dtype)

        weights = tl.dot(q_dot, tl.trans(k_dot), input_precision=PREC)  # [BT, BT]
        weights = tl.where(rows[:, None] >= rows[None, :], weights, 0.0)  # per chunk: a hoisted mask would hold registers
        den += tl.sum(weights, 1)
        num = tl.dot(q_dot, as_dot(S, DOT_FP32, in_dtype), input_precision=PREC)
        num = tl.dot(as_dot(weights, DOT_FP32, in_dtype), v_dot, num, input_precision=PREC)
        S = tl.dot(tl.trans(k_dot), v_dot, S, input_precision=PREC)
        out = num / den[:, None]
        tl.store(row_ptrs(o_base, grow, sot, offs_v), out.to(o.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
        tl.store(side_base + rows, 1.0 / den, mask=tl.where(i_v == 0, row_ok, False))

    if (i_s == num_splits - 1) & (i_hq % GROUP == 0):  # the last segment ends with the final state
        tl.store(state_ptrs(final_S, state, offs_k, offs_v, DK, DV), S, mask=kv_ok)
        tl.store(final_z + state * DK + offs_k, z, mask=tl.where(i_v == 0, k_ok, False))


# --------------------------------------------------------------------------- launchers


def chunk_state(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_seqs: int,
    group: int,
    feature_map_id: int,
    scale: float,
    num_splits: int,
    key_mask: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment sums of φ(scale·x)ᵀ·(row_scale·y) and of row_weight·φ(scale·x), over a group of heads.

    x: [B, G·H, T, Dk]; y: [B, G·H, T, Dv]; row_scale, row_weight: fp32 [B, G·H, T] or None
    (1); key_mask: int8 [B, T] (rows of x that count) or None.  Returns fp32
    S [N, H, num_splits, Dk, Dv] and z [N, H, num_splits, Dk].
    """
    heads_out = x.shape[1] // group
    dk, dv, T = x.shape[-1], y.shape[-1], x.shape[2]
    out_S = x.new_empty(num_seqs, heads_out, num_splits, dk, dv, dtype=torch.float32)
    out_z = x.new_empty(num_seqs, heads_out, num_splits, dk, dtype=torch.float32)
    dot_fp32, prec, _ = dot_mode(x.dtype)
    shape = tuning_shape(num_seqs, x.shape[1], heads_out, T, dk, dv, x.dtype)

    def launch(cfg):
        bv, grid = segment_grid(cfg, "BLOCK_V", dv, num_splits, num_seqs * heads_out)
        traceable(chunk_state_kernel)[grid](
            x, y, row_scale, row_weight, key_mask, out_S, out_z, cu_seqlens,
            *row_strides(x), *row_strides(y), T, num_splits, heads_out, float(scale),
            GROUP=group, FEATURE=feature_map_id, DK=dk, DV=dv, BK=pow2(dk), BV=bv, BT=cfg["BLOCK_T"],
            HAS_KEY_MASK=key_mask is not None, HAS_ROW_SCALE=row_scale is not None,
            HAS_ROW_WEIGHT=row_weight is not None, IS_VARLEN=cu_seqlens is not None,
            DOT_FP32=dot_fp32, PREC=prec, ALIGN=SEGMENT_ALIGN, **launch_options(cfg))

    cfg = launch_config("chunk_state", shape, x.device, lambda c: (lambda: launch(c)), (x, y), config)
    launch(cfg)
    return out_S, out_z


def chunk_linear_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map_id: int,
    scale: float,
    eps: float,
    num_splits: int,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_S: torch.Tensor | None = None,
    initial_z: torch.Tensor | None = None,
    configs: dict | None = None,
):
    """Causal chunked forward.

    q: [B, Hq, T, Dk]; k: [B, Hkv, T, Dk]; v: [B, Hkv, T, Dv] (or packed with ``cu_seqlens``);
    key_mask: int8 [B, T] or None; initial_S/z: fp32 [N, Hkv, Dk, Dv] / [N, Hkv, Dk] or None.

    Returns out [B, Hq, T, Dv] (q's dtype), inv_den fp32 [B, Hq, T] (1 / the normaliser, for the
    backward), final S [N, Hkv, Dk, Dv], final z [N, Hkv, Dk], and the state each segment starts
    from, S [N, Hkv, num_splits, Dk, Dv] and z [N, Hkv, num_splits, Dk] (the backward's dq reads them).
    """
    configs = configs or {}
    batch, heads_q, T, dk = q.shape
    heads_kv, dv = k.shape[1], v.shape[-1]
    group = heads_q // heads_kv
    num_seqs = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = q.new_empty(batch, heads_q, T, dv)
    inv_den = q.new_empty(batch, heads_q, T, dtype=torch.float32)
    final_S = q.new_empty(num_seqs, heads_kv, dk, dv, dtype=torch.float32)
    final_z = q.new_empty(num_seqs, heads_kv, dk, dtype=torch.float32)

    if num_splits > 1:
        seg_S, seg_z = chunk_state(k, v, num_seqs=num_seqs, group=1, feature_map_id=feature_map_id, scale=1.0,
                                   num_splits=num_splits, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                   config=configs.get("chunk_state"))
        # state before segment s = initial state + segments 0 .. s-1
        start_S, start_z = exclusive_cumsum(seg_S), exclusive_cumsum(seg_z)
        if initial_S is not None:
            start_S = start_S + initial_S[:, :, None]
            start_z = start_z + initial_z[:, :, None]
    elif initial_S is not None:
        start_S, start_z = initial_S[:, :, None].clone(), initial_z[:, :, None].clone()  # an op output must not alias an input
    else:
        start_S = q.new_zeros(num_seqs, heads_kv, 1, dk, dv, dtype=torch.float32)
        start_z = q.new_zeros(num_seqs, heads_kv, 1, dk, dtype=torch.float32)
    has_start = num_splits > 1 or initial_S is not None
    dot_fp32, prec, _ = dot_mode(q.dtype)
    shape = tuning_shape(num_seqs, heads_q, heads_kv, T, dk, dv, q.dtype)

    def launch(cfg):
        bv, grid = segment_grid(cfg, "BLOCK_V", dv, num_splits, num_seqs * heads_q)
        traceable(chunk_fwd_kernel)[grid](
            q, k, v, out, inv_den, key_mask, start_S, start_z, final_S, final_z, cu_seqlens,
            *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(out),
            T, num_splits, heads_q, float(scale), float(eps),
            GROUP=group, FEATURE=feature_map_id, DK=dk, DV=dv, BK=pow2(dk), BV=bv, BT=cfg["BLOCK_T"],
            HAS_KEY_MASK=key_mask is not None, HAS_START=has_start,
            IS_VARLEN=cu_seqlens is not None, DOT_FP32=dot_fp32, PREC=prec, ALIGN=SEGMENT_ALIGN,
            **launch_options(cfg))

    cfg = launch_config("chunk_fwd", shape, q.device, lambda c: (lambda: launch(c)), (q, k, v),
                        configs.get("chunk_fwd"))
    launch(cfg)
    return out, inv_den, final_S, final_z, start_S, start_z
