"""Triton backward of chunked causal linear attention.

With q̃ = φ(s·q), k̃ = φ(k), den_i = q̃_i·z_i + eps, out_i = q̃_i·S_i / den_i, and for the incoming
gradient dO define g_i = dO_i / den_i and γ_i = −g_i·out_i (what the normaliser takes back).  Then

    dq̃_i = Σ_{j≤i} (g_i·v_j + γ_i) k̃_j  + g_i·S0ᵀ + γ_i z0       (forward in time: ``dq`` kernel)
    dk̃_j = Σ_{i≥j} (g_i·v_j + γ_i) q̃_i  + v_j·dSᵀ + dz            (backward in time: ``dk`` kernel)
    dv_j  = Σ_{i≥j} (q̃_i·k̃_j) g_i       + k̃_j·dS                 (backward in time: ``dv`` kernel)

where (dS, dz) is the gradient reaching the final state plus Σ q̃ᵀg and Σ γ q̃ over every later
query.  Each kernel walks its segment chunk by chunk like the forward, holding its state in fp32
registers; the dk and dv kernels run per kv head and sum over the query heads of its group, so
grouped-query attention needs no atomics and no repeated K/V.  The dk kernel also returns the
gradient of the initial state (dS, dz after the first chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels._ops import traceable
from attnrewrite.kernels.triton_scaffold import row_ptrs

from .chunk_fwd import chunk_state
from .triton_common import (SEGMENT_ALIGN, as_dot, default_num_splits, dot_mode, exclusive_cumsum, feature,
                            feature_grad, launch_config, launch_options, pow2, row_strides, segment_grid,
                            segment_program, segment_rows, state_ptrs, tuning_shape)


@triton.jit
def bwd_gamma_kernel(do, o, inv_den, gamma, sdb, sdh, sdt, sob, soh, sot, T, heads,
                     DV: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """γ_i = −(dO_i·out_i) / den_i for every row (fp32 [B, H, T])."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // heads, i_bh % heads
    rows = i_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, BV)
    ok = (rows < T)[:, None] & (cols < DV)[None, :]
    grad = tl.load(do + i_b.to(tl.int64) * sdb + i_h * sdh + rows.to(tl.int64)[:, None] * sdt + cols[None, :], mask=ok, other=0.0)
    out = tl.load(o + i_b.to(tl.int64) * sob + i_h * soh + rows.to(tl.int64)[:, None] * sot + cols[None, :], mask=ok, other=0.0)
    side = i_bh.to(tl.int64) * T + rows
    r = tl.load(inv_den + side, mask=rows < T, other=0.0)
    tl.store(gamma + side, -tl.sum(grad.to(tl.float32) * out.to(tl.float32), 1) * r, mask=rows < T)


@triton.jit
def chunk_bwd_dq_kernel(
    q, k, v, do, inv_den, gamma, dq, start_S, start_z, key_mask, cu_seqlens,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt,
    T, num_splits, heads_q, scale,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_START: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_k, i_s, i_n, i_hq = segment_program(heads_q)
    heads_kv = heads_q // GROUP
    i_hk = i_hq // GROUP
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)  # BV covers all of Dv here
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    causal = offs_t[:, None] >= offs_t[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_START:
        seg = (i_n * heads_kv + i_hk).to(tl.int64) * num_splits + i_s
        S = tl.load(state_ptrs(start_S, seg, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        z = tl.load(start_z + seg * DK + offs_k, mask=k_ok, other=0.0)

    q_base = q + batch.to(tl.int64) * sqb + i_hq * sqh
    k_base = k + batch.to(tl.int64) * skb + i_hk * skh
    v_base = v + batch.to(tl.int64) * svb + i_hk * svh
    do_base = do + batch.to(tl.int64) * sdb + i_hq * sdh
    dq_base = dq + batch.to(tl.int64) * sgb + i_hq * sgh
    side_base = (batch * heads_q + i_hq).to(tl.int64) * T + bos
    for t0 in range(t_start, t_end, BT):
        rows = t0 + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        rk = row_ok[:, None] & k_ok[None, :]
        rv = row_ok[:, None] & v_ok[None, :]
        qx = tl.load(row_ptrs(q_base, grow, sqt, offs_k), mask=rk, other=0.0).to(tl.float32) * scale
        kx = tl.load(row_ptrs(k_base, grow, skt, offs_k), mask=rk, other=0.0)
        k_feat = tl.where(keep[:, None] & k_ok[None, :], feature(kx.to(tl.float32), FEATURE), 0.0)
        vv = tl.load(row_ptrs(v_base, grow, svt, offs_v), mask=rv, other=0.0)
        r = tl.load(inv_den + side_base + rows, mask=row_ok, other=0.0)
        gm = tl.load(gamma + side_base + rows, mask=row_ok, other=0.0)
        g = tl.load(row_ptrs(do_base, grow, sdt, offs_v), mask=rv, other=0.0).to(tl.float32) * r[:, None]
        g_dot = as_dot(g, DOT_FP32, in_dtype)
        k_dot = as_dot(k_feat, DOT_FP32, in_dtype)
        v_dot = as_dot(vv, DOT_FP32, in_dtype)

        pair = tl.dot(g_dot, tl.trans(v_dot), input_precision=PREC) + gm[:, None]  # [i, j]
        pair = tl.where(causal, pair, 0.0)
        dq_feat = tl.dot(as_dot(pair, DOT_FP32, in_dtype), k_dot, input_precision=PREC)
        dq_feat = tl.dot(g_dot, tl.trans(as_dot(S, DOT_FP32, in_dtype)), dq_feat, input_precision=PREC)
        dq_feat += gm[:, None] * z[None, :]
        grad_q = dq_feat * feature_grad(qx, FEATURE) * scale
        tl.store(row_ptrs(dq_base, grow, sgt, offs_k), grad_q.to(dq.dtype.element_ty), mask=rk)

        S = tl.dot(tl.trans(k_dot), v_dot, S, input_precision=PREC)
        z += tl.sum(k_feat, 0)


@triton.jit
def chunk_bwd_dk_kernel(
    q, k, v, do, inv_den, gamma, dk, end_dS, end_dz, d_initial_S, d_initial_z, key_mask, cu_seqlens,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt,
    T, num_splits, heads_kv, scale,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_END: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_k, i_s, i_n, i_hk = segment_program(heads_kv)
    heads_q = heads_kv * GROUP
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)  # all of Dv
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    seen_by = offs_t[:, None] <= offs_t[None, :]  # [j, i]: key j is seen by query i

    head = (i_n * heads_kv + i_hk).to(tl.int64)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    dz = tl.zeros([BK], dtype=tl.float32)
    if HAS_END:  # gradient reaching the state after this segment
        seg = head * num_splits + i_s
        dS = tl.load(state_ptrs(end_dS, seg, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        dz = tl.load(end_dz + seg * DK + offs_k, mask=k_ok, other=0.0)

    k_base = k + batch.to(tl.int64) * skb + i_hk * skh
    v_base = v + batch.to(tl.int64) * svb + i_hk * svh
    dk_base = dk + batch.to(tl.int64) * sgb + i_hk * sgh
    n_chunks = tl.cdiv(t_end - t_start, BT)
    for c in range(0, n_chunks):
        rows = t_start + (n_chunks - 1 - c) * BT + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        rk = row_ok[:, None] & k_ok[None, :]
        rv = row_ok[:, None] & v_ok[None, :]
        kx = tl.load(row_ptrs(k_base, grow, skt, offs_k), mask=rk, other=0.0).to(tl.float32)
        vv = tl.load(row_ptrs(v_base, grow, svt, offs_v), mask=rv, other=0.0)
        v_dot = as_dot(vv, DOT_FP32, in_dtype)
        # later chunks' queries reach these keys only through the state
        dk_feat = tl.dot(v_dot, tl.trans(as_dot(dS, DOT_FP32, in_dtype)), input_precision=PREC) + dz[None, :]
        for g_i in range(GROUP):
            i_hq = i_hk * GROUP + g_i
            side = (batch * heads_q + i_hq).to(tl.int64) * T + bos + rows
            qx = tl.load(row_ptrs(q + batch.to(tl.int64) * sqb + i_hq * sqh, grow, sqt, offs_k), mask=rk, other=0.0)
            q_feat = tl.where(rk, feature(qx.to(tl.float32) * scale, FEATURE), 0.0)
            r = tl.load(inv_den + side, mask=row_ok, other=0.0)
            gm = tl.load(gamma + side, mask=row_ok, other=0.0)
            g = tl.load(row_ptrs(do + batch.to(tl.int64) * sdb + i_hq * sdh, grow, sdt, offs_v), mask=rv,
                        other=0.0).to(tl.float32) * r[:, None]
            g_dot = as_dot(g, DOT_FP32, in_dtype)
            q_dot = as_dot(q_feat, DOT_FP32, in_dtype)
            pair_t = tl.dot(v_dot, tl.trans(g_dot), input_precision=PREC) + gm[None, :]  # [j, i]
            pair_t = tl.where(seen_by, pair_t, 0.0)
            dk_feat = tl.dot(as_dot(pair_t, DOT_FP32, in_dtype), q_dot, dk_feat, input_precision=PREC)
            dS = tl.dot(tl.trans(q_dot), g_dot, dS, input_precision=PREC)
            dz += tl.sum(q_feat * gm[:, None], 0)
        grad_k = tl.where(keep[:, None], dk_feat * feature_grad(kx, FEATURE), 0.0)
        tl.store(row_ptrs(dk_base, grow, sgt, offs_k), grad_k.to(dk.dtype.element_ty), mask=rk)

    if i_s == 0:  # after the whole sequence: the gradient of the initial state
        tl.store(state_ptrs(d_initial_S, head, offs_k, offs_v, DK, DV), dS, mask=k_ok[:, None] & v_ok[None, :])
        tl.store(d_initial_z + head * DK + offs_k, dz, mask=k_ok)


@triton.jit
def chunk_bwd_dv_kernel(
    q, k, v, do, inv_den, dv, end_dS, key_mask, cu_seqlens,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt,
    T, num_splits, heads_kv, scale,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_END: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    i_v, i_s, i_n, i_hk = segment_program(heads_kv)
    heads_q = heads_kv * GROUP
    bos, seqlen, batch, t_start, t_end = segment_rows(cu_seqlens, i_n, i_s, T, num_splits, IS_VARLEN, ALIGN)
    in_dtype = q.dtype.element_ty

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)  # all of Dk
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    seen_by = offs_t[:, None] <= offs_t[None, :]

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_END:
        seg = (i_n * heads_kv + i_hk).to(tl.int64) * num_splits + i_s
        dS = tl.load(state_ptrs(end_dS, seg, offs_k, offs_v, DK, DV), mask=k_ok[:, None] & v_ok[None, :], other=0.0)

    k_base = k + batch.to(tl.int64) * skb + i_hk * skh
    dv_base = dv + batch.to(tl.int64) * sgb + i_hk * sgh
    n_chunks = tl.cdiv(t_end - t_start, BT)
    for c in range(0, n_chunks):
        rows = t_start + (n_chunks - 1 - c) * BT + offs_t
        row_ok = rows < seqlen
        grow = (bos + rows).to(tl.int64)
        keep = row_ok
        if HAS_KEY_MASK:
            keep = keep & (tl.load(key_mask + batch * T + rows, mask=row_ok, other=0) != 0)
        rk = row_ok[:, None] & k_ok[None, :]
        rv = row_ok[:, None] & v_ok[None, :]
        kx = tl.load(row_ptrs(k_base, grow, skt, offs_k), mask=rk, other=0.0)
        k_feat = tl.where(keep[:, None] & k_ok[None, :], feature(kx.to(tl.float32), FEATURE), 0.0)
        k_dot = as_dot(k_feat, DOT_FP32, in_dtype)
        grad_v = tl.dot(k_dot, as_dot(dS, DOT_FP32, in_dtype), input_precision=PREC)
        for g_i in range(GROUP):
            i_hq = i_hk * GROUP + g_i
            side = (batch * heads_q + i_hq).to(tl.int64) * T + bos + rows
            qx = tl.load(row_ptrs(q + batch.to(tl.int64) * sqb + i_hq * sqh, grow, sqt, offs_k), mask=rk, other=0.0)
            q_feat = tl.where(rk, feature(qx.to(tl.float32) * scale, FEATURE), 0.0)
            r = tl.load(inv_den + side, mask=row_ok, other=0.0)
            g = tl.load(row_ptrs(do + batch.to(tl.int64) * sdb + i_hq * sdh, grow, sdt, offs_v), mask=rv,
                        other=0.0).to(tl.float32) * r[:, None]
            g_dot = as_dot(g, DOT_FP32, in_dtype)
            q_dot = as_dot(q_feat, DOT_FP32, in_dtype)
            weights_t = tl.where(seen_by, tl.dot(k_dot, tl.trans(q_dot), input_precision=PREC), 0.0)  # [j, i]
            grad_v = tl.dot(as_dot(weights_t, DOT_FP32, in_dtype), g_dot, grad_v, input_precision=PREC)
            dS = tl.dot(tl.trans(q_dot), g_dot, dS, input_precision=PREC)
        tl.store(row_ptrs(dv_base, grow, sgt, offs_v), grad_v.to(dv.dtype.element_ty), mask=rv)


# --------------------------------------------------------------------------- launchers


def bwd_gamma(do: torch.Tensor, out: torch.Tensor, inv_den: torch.Tensor) -> torch.Tensor:
    """γ = −(dO·out)/den per row, fp32 [B, H, T]."""
    batch, heads, T, dv = out.shape
    gamma = torch.empty_like(inv_den)
    bt = 64
    traceable(bwd_gamma_kernel)[(triton.cdiv(T, bt), batch * heads)](
        do, out, inv_den, gamma, *row_strides(do), *row_strides(out), T, heads, DV=dv, BV=pow2(dv), BT=bt,
        num_warps=4)
    return gamma


class _Launch:
    """What the three backward kernels share: shapes, flags, strides, and the tuning lookup."""

    def __init__(self, q, k, v, do, feature_map_id, scale, key_mask, cu_seqlens, num_seqs, num_splits):
        self.q, self.k, self.v, self.do = q, k, v, do
        batch, self.heads_q, self.T, self.dk = q.shape
        self.heads_kv, self.dv = k.shape[1], v.shape[-1]
        self.group = self.heads_q // self.heads_kv
        self.num_seqs, self.num_splits, self.scale = num_seqs, num_splits, float(scale)
        self.key_mask, self.cu_seqlens = key_mask, cu_seqlens
        dot_fp32, prec, _ = dot_mode(q.dtype)
        self.common = dict(GROUP=self.group, FEATURE=feature_map_id, DK=self.dk, DV=self.dv,
                           HAS_KEY_MASK=key_mask is not None, IS_VARLEN=cu_seqlens is not None,
                           DOT_FP32=dot_fp32, PREC=prec, ALIGN=SEGMENT_ALIGN)
        self.strides = (*row_strides(q), *row_strides(k), *row_strides(v), *row_strides(do))
        self.shape = tuning_shape(num_seqs, self.heads_q, self.heads_kv, self.T, self.dk, self.dv, q.dtype)

    def run(self, kernel_name: str, launch, config):
        cfg = launch_config(kernel_name, self.shape, self.q.device, lambda c: (lambda: launch(c)),
                            (self.q, self.k, self.v, self.do), config)
        launch(cfg)


def chunk_bwd_dq(L: _Launch, inv_den, gamma, start_S, start_z, has_start: bool, config=None) -> torch.Tensor:
    """dq from the forward's per-segment start states (forward in time)."""
    dq = torch.empty(L.q.shape, dtype=L.q.dtype, device=L.q.device)

    def launch(cfg):
        bk, grid = segment_grid(cfg, "BLOCK_K", L.dk, L.num_splits, L.num_seqs * L.heads_q)
        traceable(chunk_bwd_dq_kernel)[grid](
            L.q, L.k, L.v, L.do, inv_den, gamma, dq, start_S, start_z, L.key_mask, L.cu_seqlens, *L.strides,
            *row_strides(dq), L.T, L.num_splits, L.heads_q, L.scale, BK=bk, BV=pow2(L.dv), BT=cfg["BLOCK_T"],
            HAS_START=has_start, **L.common, **launch_options(cfg))

    L.run("chunk_bwd_dq", launch, config)
    return dq


def chunk_bwd_dk(L: _Launch, inv_den, gamma, end_dS, end_dz, config=None):
    """dk and the initial state's gradient, from the gradient reaching each segment's end (backward in time)."""
    dk = torch.empty(L.k.shape, dtype=L.k.dtype, device=L.k.device)
    d_initial_S = L.q.new_empty(L.num_seqs, L.heads_kv, L.dk, L.dv, dtype=torch.float32)
    d_initial_z = L.q.new_empty(L.num_seqs, L.heads_kv, L.dk, dtype=torch.float32)

    def launch(cfg):
        bk, grid = segment_grid(cfg, "BLOCK_K", L.dk, L.num_splits, L.num_seqs * L.heads_kv)
        traceable(chunk_bwd_dk_kernel)[grid](
            L.q, L.k, L.v, L.do, inv_den, gamma, dk, end_dS, end_dz, d_initial_S, d_initial_z, L.key_mask,
            L.cu_seqlens, *L.strides, *row_strides(dk), L.T, L.num_splits, L.heads_kv, L.scale, BK=bk,
            BV=pow2(L.dv), BT=cfg["BLOCK_T"], HAS_END=end_dS is not None, **L.common, **launch_options(cfg))

    L.run("chunk_bwd_dk", launch, config)
    return dk, d_initial_S, d_initial_z


def chunk_bwd_dv(L: _Launch, inv_den, end_dS, config=None) -> torch.Tensor:
    """dv from the gradient reaching each segment's end (backward in time)."""
    dv = torch.empty(L.v.shape, dtype=L.v.dtype, device=L.v.device)

    def launch(cfg):
        bv, grid = segment_grid(cfg, "BLOCK_V", L.dv, L.num_splits, L.num_seqs * L.heads_kv)
        traceable(chunk_bwd_dv_kernel)[grid](
            L.q, L.k, L.v, L.do, inv_den, dv, end_dS, L.key_mask, L.cu_seqlens, *L.strides, *row_strides(dv),
            L.T, L.num_splits, L.heads_kv, L.scale, BK=pow2(L.dk), BV=bv, BT=cfg["BLOCK_T"],
            HAS_END=end_dS is not None, **L.common, **launch_options(cfg))

    L.run("chunk_bwd_dv", launch, config)
    return dv


def chunk_linear_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    inv_den: torch.Tensor,
    start_S: torch.Tensor,
    start_z: torch.Tensor,
    *,
    feature_map_id: int,
    scale: float,
    has_start: bool,
    d_final_S: torch.Tensor | None = None,
    d_final_z: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    reverse_splits: int | None = None,
    configs: dict | None = None,
):
    """Gradients of :func:`chunk_fwd.chunk_linear_attn_fwd`.

    ``start_S``/``start_z`` are the forward's per-segment start states (the dq kernel walks the
    forward's segments); ``has_start`` says whether they hold anything but zeros.  The dk and dv
    kernels run per kv head, so with grouped queries they have fewer programs than the forward:
    they cut the sequence into their own ``reverse_splits`` segments (default: enough to fill the
    GPU).  ``d_final_S/z`` are the gradients reaching the final state (None: zero).  Returns dq, dk,
    dv (shaped like q, k, v) and the gradients of the initial state, fp32 [N, Hkv, Dk, Dv] and [N, Hkv, Dk].
    """
    configs = configs or {}
    num_seqs, num_splits = start_S.shape[0], start_S.shape[2]
    if reverse_splits is None:
        reverse_splits = default_num_splits(q.device, num_seqs * k.shape[1] * triton.cdiv(q.shape[-1], 64))
    forward = _Launch(q, k, v, do, feature_map_id, scale, key_mask, cu_seqlens, num_seqs, num_splits)
    reverse = _Launch(q, k, v, do, feature_map_id, scale, key_mask, cu_seqlens, num_seqs, reverse_splits)
    gamma = bwd_gamma(do, out, inv_den)
    dq = chunk_bwd_dq(forward, inv_den, gamma, start_S, start_z, has_start, configs.get("chunk_bwd_dq"))
    end_dS, end_dz = segment_end_grads(reverse, inv_den, gamma, d_final_S, d_final_z, configs.get("chunk_state"))
    dk, d_initial_S, d_initial_z = chunk_bwd_dk(reverse, inv_den, gamma, end_dS, end_dz, configs.get("chunk_bwd_dk"))
    dv = chunk_bwd_dv(reverse, inv_den, end_dS, configs.get("chunk_bwd_dv"))
    return dq, dk, dv, d_initial_S, d_initial_z


def segment_end_grads(L: _Launch, inv_den, gamma, d_final_S, d_final_z, config=None):
    """Gradient reaching the state after each segment: the final state's, plus every later segment's
    queries (Σ q̃ᵀg and Σ γq̃ per segment, summed backwards).  (None, None) when it is zero everywhere."""
    has_final = d_final_S is not None or d_final_z is not None
    if L.num_splits == 1 and not has_final:
        return None, None
    end_dS = end_dz = None
    if L.num_splits > 1:
        seg_dS, seg_dz = chunk_state(L.q, L.do, num_seqs=L.num_seqs, group=L.group,
                                     feature_map_id=L.common["FEATURE"], scale=L.scale, num_splits=L.num_splits,
                                     row_scale=inv_den, row_weight=gamma, cu_seqlens=L.cu_seqlens, config=config)
        end_dS, end_dz = exclusive_cumsum(seg_dS, reverse=True), exclusive_cumsum(seg_dz, reverse=True)
    if has_final:
        def zeros(*shape):
            return L.q.new_zeros(*shape, dtype=torch.float32)

        final_S = (d_final_S.float() if d_final_S is not None else zeros(L.num_seqs, L.heads_kv, L.dk, L.dv))[:, :, None]
        final_z = (d_final_z.float() if d_final_z is not None else zeros(L.num_seqs, L.heads_kv, L.dk))[:, :, None]
        end_dS = final_S if end_dS is None else end_dS + final_S
        end_dz = final_z if end_dz is None else end_dz + final_z
    shape = (L.num_seqs, L.heads_kv, L.num_splits, L.dk, L.dv)
    return end_dS.expand(shape).contiguous(), end_dz.expand(shape[:-1]).contiguous()
