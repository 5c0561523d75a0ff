"""Triton bidirectional (non-causal) linear attention, forward and backward.

Every query sees the same state, so the forward is one reduction and one product per sequence:

    S = S0 + Σ_j k̃_jᵀ v_j,  z = z0 + Σ_j k̃_j   (``chunk_state``, split into segments and summed)
    out_i = q̃_i·S / (q̃_i·z + eps)              (``bidir_fwd_kernel``, rows in parallel)

and the backward mirrors it: dS = dS_final + Σ_i q̃_iᵀ g_i and dz = dz_final + Σ_i γ_i q̃_i (the
same reduction over the queries, summed over each kv head's query heads), then per row
dq̃_i = g_i·Sᵀ + γ_i z, dk̃_j = v_j·dSᵀ + dz, dv_j = k̃_j·dS; padded keys get zero gradients.
The initial state's gradient is (dS, dz) itself.  Queries and keys may differ in length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels._ops import traceable
from attnrewrite.kernels.triton_scaffold import row_ptrs

from .chunk_bwd import bwd_gamma
from .chunk_fwd import chunk_state
from .triton_common import (SEGMENT_ALIGN, as_dot, dot_mode, feature, feature_grad, launch_config, launch_options, pow2,
                            row_strides, segment_grid, segment_program, segment_rows, state_ptrs, tuning_shape)


@triton.jit
def bidir_fwd_kernel(
    q, o, inv_den, S, z, cu_seqlens, sqb, sqh, sqt, sob, soh, sot,
    T, num_splits, heads_q, scale, eps,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_v, i_s, i_n, i_hq = segment_program(heads_q)
    state = (i_n * (heads_q // GROUP) + i_hq // GROUP).to(tl.int64)
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    S_blk = tl.load(state_ptrs(S, state, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    S_dot = as_dot(S_blk, DOT_FP32, in_dtype)
    z_vec = tl.load(z + state * DK + offs_k, mask=k_ok, other=0.0)
    q_base = q + batch.to(tl.int64) * sqb + i_hq * sqh
    o_base = o + batch.to(tl.int64) * sob + i_hq * soh
    side_base = inv_den + (batch * heads_q + i_hq).to(tl.int64) * T + bos
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        # written out, not through row_ptrs: see linear/triton_common.py
        qx = tl.load(q_base + grow[:, None] * sqt + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q_feat = tl.where(row_ok[:, None] & k_ok[None, :], feature(qx.to(tl.float32) * scale, FEATURE), 0.0)
        den = tl.sum(q_feat * z_vec[None, :], 1) + eps
        num = tl.dot(as_dot(q_feat, DOT_FP32, in_dtype), S_dot, input_precision=PREC)
        tl.store(row_ptrs(o_base, grow, sot, offs_v), (num / den[:, None]).to(o.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        tl.store(side_base + rows, 1.0 / den, mask=tl.where(i_v == 0, row_ok, False))


@triton.jit
def bidir_bwd_dq_kernel(
    q, do, inv_den, gamma, dq, S, z, cu_seqlens, sqb, sqh, sqt, sdb, sdh, sdt, sgb, sgh, sgt,
    T, num_splits, heads_q, scale,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_k, i_s, i_n, i_hq = segment_program(heads_q)
    state = (i_n * (heads_q // GROUP) + i_hq // GROUP).to(tl.int64)
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)  # all of Dv
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    S_blk = tl.load(state_ptrs(S, state, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    S_t = tl.trans(as_dot(S_blk, DOT_FP32, in_dtype))
    z_vec = tl.load(z + state * DK + offs_k, mask=k_ok, other=0.0)
    side_base = (batch * heads_q + i_hq).to(tl.int64) * T + bos
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        rk = row_ok[:, None] & k_ok[None, :]
        r = tl.load(inv_den + side_base + rows, mask=row_ok, other=0.0)
        gm = tl.load(gamma + side_base + rows, mask=row_ok, other=0.0)
        g = tl.load(row_ptrs(do + batch.to(tl.int64) * sdb + i_hq * sdh, grow, sdt, offs_v),
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32) * r[:, None]
        dq_feat = tl.dot(as_dot(g, DOT_FP32, in_dtype), S_t, input_precision=PREC) + gm[:, None] * z_vec[None, :]
        qx = tl.load(row_ptrs(q + batch.to(tl.int64) * sqb + i_hq * sqh, grow, sqt, offs_k), mask=rk, other=0.0)
        grad_q = dq_feat * feature_grad(qx.to(tl.float32) * scale, FEATURE) * scale
        tl.store(row_ptrs(dq + batch.to(tl.int64) * sgb + i_hq * sgh, grow, sgt, offs_k), grad_q.to(dq.dtype.element_ty),
                 mask=rk)


@triton.jit
def bidir_bwd_dk_kernel(
    k, v, dk, dS, dz, key_mask, cu_seqlens, skb, skh, skt, svb, svh, svt, sgb, sgh, sgt,
    T, num_splits, heads_kv,
    FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_k, i_s, i_n, i_hk = segment_program(heads_kv)
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = k.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)  # all of Dv
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    head = (i_n * heads_kv + i_hk).to(tl.int64)
    dS_t = tl.trans(as_dot(tl.load(state_ptrs(dS, head, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :],
                                   other=0.0), DOT_FP32, in_dtype))
    dz_vec = tl.load(dz + head * DK + offs_k, mask=k_ok, other=0.0)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        rk = row_ok[:, None] & k_ok[None, :]
        vv = tl.load(row_ptrs(v + batch.to(tl.int64) * svb + i_hk * svh, grow, svt, offs_v),
                     mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        dk_feat = tl.dot(as_dot(vv, DOT_FP32, in_dtype), dS_t, input_precision=PREC) + dz_vec[None, :]
        kx = tl.load(row_ptrs(k + batch.to(tl.int64) * skb + i_hk * skh, grow, skt, offs_k), mask=rk, other=0.0)
        grad_k = tl.where(keep[:, None], dk_feat * feature_grad(kx.to(tl.float32), FEATURE), 0.0)
        tl.store(row_ptrs(dk + batch.to(tl.int64) * sgb + i_hk * sgh, grow, sgt, offs_k), grad_k.to(dk.dtype.element_ty),
                 mask=rk)


@triton.jit
def bidir_bwd_dv_kernel(
    k, dv, dS, key_mask, cu_seqlens, skb, skh, skt, sgb, sgh, sgt,
    T, num_splits, heads_kv,
    FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_v, i_s, i_n, i_hk = segment_program(heads_kv)
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = k.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)  # all of Dk
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    head = (i_n * heads_kv + i_hk).to(tl.int64)
    dS_blk = as_dot(tl.load(state_ptrs(dS, head, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :],
                            other=0.0), DOT_FP32, in_dtype)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        kx = tl.load(k + batch.to(tl.int64) * skb + i_hk * skh + grow[:, None] * skt + offs_k[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # written out: see linear/triton_common.py
        k_feat = tl.where(keep[:, None] & k_ok[None, :], feature(kx.to(tl.float32), FEATURE), 0.0)
        grad_v = tl.dot(as_dot(k_feat, DOT_FP32, in_dtype), dS_blk, input_precision=PREC)
        tl.store(row_ptrs(dv + batch.to(tl.int64) * sgb + i_hk * sgh, grow, sgt, offs_v), grad_v.to(dv.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])


# --------------------------------------------------------------------------- launchers


def _flags(x: torch.Tensor, cu_seqlens) -> dict:
    dot_fp32, prec, _ = dot_mode(x.dtype)
    return dict(IS_VARLEN=cu_seqlens is not None, DOT_FP32=dot_fp32, PREC=prec, ALIGN=SEGMENT_ALIGN)


def _run(kernel_name, launch, shape, tensors, config):
    launch(launch_config(kernel_name, shape, tensors[0].device, lambda c: (lambda: launch(c)), tensors, config))


def bidir_out(q, S, z, *, heads_kv, feature_map_id, scale, eps, num_splits, cu_seqlens=None, config=None):
    """out = q̃·S / (q̃·z + eps) for every query, and inv_den; S, z per kv head (fp32)."""
    batch, heads_q, Tq, dk = q.shape
    num_seqs, dv = S.shape[0], S.shape[-1]
    out = q.new_empty(batch, heads_q, Tq, dv)
    inv_den = q.new_empty(batch, heads_q, Tq, dtype=torch.float32)

    def launch(cfg):
        bv, grid = segment_grid(cfg, "BLOCK_V", dv, num_splits, num_seqs * heads_q)
        traceable(bidir_fwd_kernel)[grid](
            q, out, inv_den, S, z, cu_seqlens, *row_strides(q), *row_strides(out),
            Tq, num_splits, heads_q, float(scale), float(eps), GROUP=heads_q // heads_kv, FEATURE=feature_map_id,
            DK=dk, DV=dv, BK=pow2(dk), BV=bv, BT=cfg["BLOCK_T"], **_flags(q, cu_seqlens), **launch_options(cfg))

    _run("bidir_fwd", launch, tuning_shape(num_seqs, heads_q, heads_kv, Tq, dk, dv, q.dtype), (q,), config)
    return out, inv_den


def bidirectional_linear_attn_fwd(
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
    """Bidirectional forward. q: [B, Hq, Tq, Dk]; k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv] (or packed).

    Returns out [B, Hq, Tq, Dv], inv_den fp32 [B, Hq, Tq], and the state every query saw,
    S fp32 [N, Hkv, Dk, Dv] and z fp32 [N, Hkv, Dk] (initial state included).
    """
    configs = configs or {}
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    seg_S, seg_z = chunk_state(k, v, num_seqs=num_seqs, group=1, feature_map_id=feature_map_id, scale=1.0,
                               num_splits=num_splits, key_mask=key_mask, cu_seqlens=cu_seqlens,
                               config=configs.get("chunk_state"))
    S, z = seg_S.sum(2), seg_z.sum(2)
    if initial_S is not None:
        S, z = S + initial_S, z + initial_z
    out, inv_den = bidir_out(q, S, z, heads_kv=k.shape[1], feature_map_id=feature_map_id, scale=scale, eps=eps,
                             num_splits=num_splits, cu_seqlens=cu_seqlens, config=configs.get("bidir_fwd"))
    return out, inv_den, S, z


def bidir_bwd_dq(q, do, inv_den, gamma, S, z, *, feature_map_id, scale, num_splits, cu_seqlens=None, config=None):
    """dq = s·φ'(s·q)·(g·Sᵀ + γ z) per query."""
    batch, heads_q, Tq, dk = q.shape
    num_seqs, heads_kv, _, dv = S.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def launch(cfg):
        bk, grid = segment_grid(cfg, "BLOCK_K", dk, num_splits, num_seqs * heads_q)
        traceable(bidir_bwd_dq_kernel)[grid](
            q, do, inv_den, gamma, dq, S, z, cu_seqlens, *row_strides(q), *row_strides(do), *row_strides(dq),
            Tq, num_splits, heads_q, float(scale), GROUP=heads_q // heads_kv, FEATURE=feature_map_id, DK=dk, DV=dv,
            BK=bk, BV=pow2(dv), BT=cfg["BLOCK_T"], **_flags(q, cu_seqlens), **launch_options(cfg))

    _run("bidir_bwd_dq", launch, tuning_shape(num_seqs, heads_q, heads_kv, Tq, dk, dv, q.dtype), (q, do), config)
    return dq


def bidir_bwd_dk(k, v, dS, dz, *, heads_q, feature_map_id, num_splits, key_mask=None, cu_seqlens=None, config=None):
    """dk = φ'(k)·(v·dSᵀ + dz) per key (zero for padded keys)."""
    batch, heads_kv, Tk, dk = k.shape
    num_seqs, dv = dS.shape[0], v.shape[-1]
    grad = torch.empty(k.shape, dtype=k.dtype, device=k.device)

    def launch(cfg):
        bk, grid = segment_grid(cfg, "BLOCK_K", dk, num_splits, num_seqs * heads_kv)
        traceable(bidir_bwd_dk_kernel)[grid](
            k, v, grad, dS, dz, key_mask, cu_seqlens, *row_strides(k), *row_strides(v), *row_strides(grad),
            Tk, num_splits, heads_kv, FEATURE=feature_map_id, DK=dk, DV=dv, BK=bk, BV=pow2(dv), BT=cfg["BLOCK_T"],
            HAS_KEY_MASK=key_mask is not None, **_flags(k, cu_seqlens), **launch_options(cfg))

    _run("bidir_bwd_dk", launch, tuning_shape(num_seqs, heads_q, heads_kv, Tk, dk, dv, k.dtype), (k, v), config)
    return grad


def bidir_bwd_dv(k, v, dS, *, heads_q, feature_map_id, num_splits, key_mask=None, cu_seqlens=None, config=None):
    """dv = φ(k)·dS per key (zero for padded keys)."""
    batch, heads_kv, Tk, dk = k.shape
    num_seqs, dv = dS.shape[0], v.shape[-1]
    grad = torch.empty(v.shape, dtype=v.dtype, device=v.device)

    def launch(cfg):
        bv, grid = segment_grid(cfg, "BLOCK_V", dv, num_splits, num_seqs * heads_kv)
        traceable(bidir_bwd_dv_kernel)[grid](
            k, grad, dS, key_mask, cu_seqlens, *row_strides(k), *row_strides(grad),
            Tk, num_splits, heads_kv, FEATURE=feature_map_id, DK=dk, DV=dv, BK=pow2(dk), BV=bv, BT=cfg["BLOCK_T"],
            HAS_KEY_MASK=key_mask is not None, **_flags(k, cu_seqlens), **launch_options(cfg))

    _run("bidir_bwd_dv", launch, tuning_shape(num_seqs, heads_q, heads_kv, Tk, dk, dv, k.dtype), (k, v), config)
    return grad


def bidirectional_linear_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    inv_den: torch.Tensor,
    S: torch.Tensor,
    z: torch.Tensor,
    *,
    feature_map_id: int,
    scale: float,
    num_splits: int,
    d_final_S: torch.Tensor | None = None,
    d_final_z: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    configs: dict | None = None,
):
    """Gradients of :func:`bidirectional_linear_attn_fwd`: dq, dk, dv and the initial state's (dS, dz)."""
    configs = configs or {}
    heads_q = q.shape[1]
    group = heads_q // k.shape[1]
    gamma = bwd_gamma(do, out, inv_den)
    seg_dS, seg_dz = chunk_state(q, do, num_seqs=S.shape[0], group=group, feature_map_id=feature_map_id, scale=scale,
                                 num_splits=num_splits, row_scale=inv_den, row_weight=gamma, cu_seqlens=cu_seqlens,
                                 config=configs.get("chunk_state"))
    dS, dz = seg_dS.sum(2), seg_dz.sum(2)
    if d_final_S is not None:
        dS = dS + d_final_S.float()
    if d_final_z is not None:
        dz = dz + d_final_z.float()
    common = dict(feature_map_id=feature_map_id, num_splits=num_splits, cu_seqlens=cu_seqlens)
    dq = bidir_bwd_dq(q, do, inv_den, gamma, S, z, scale=scale, config=configs.get("bidir_bwd_dq"), **common)
    dk = bidir_bwd_dk(k, v, dS, dz, heads_q=heads_q, key_mask=key_mask, config=configs.get("bidir_bwd_dk"), **common)
    dv = bidir_bwd_dv(k, v, dS, heads_q=heads_q, key_mask=key_mask, config=configs.get("bidir_bwd_dv"), **common)
    return dq, dk, dv, dS, dz
