"""Triton recurrent decode: new tokens against a carried state (S, z), O(Dk·Dv) per token.

One program per (value block, batch × kv head) loads its [Dk, BV] slice of S once, then for each
new token adds k̃ᵀv to it and answers every query head of the group from it; the updated state
is written once at the end.  No matmul units: a token is a rank-1 update and a vector-matrix
product, which fp32 FMAs do at memory speed (the state read and write is all the traffic there is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels._ops import traceable

from .triton_common import feature, launch_config, launch_options, pow2, row_strides, state_ptrs, tuning_shape


@triton.jit
def recurrent_fwd_kernel(
    q, k, v, o, S_in, z_in, S_out, z_out,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, heads_kv, scale, eps,
    GROUP: tl.constexpr, FEATURE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // heads_kv, i_bh % heads_kv
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    kv_ok = k_ok[:, None] & v_ok[None, :]
    state = i_bh.to(tl.int64)
    S = tl.load(state_ptrs(S_in, state, offs_k, offs_v, DK, DV), mask=kv_ok, other=0.0)
    z = tl.load(z_in + state * DK + offs_k, mask=k_ok, other=0.0)
    for t in range(0, T):
        kx = tl.load(k + i_b.to(tl.int64) * skb + i_hk * skh + t * skt + offs_k, mask=k_ok, other=0.0)
        k_feat = tl.where(k_ok, feature(kx.to(tl.float32), FEATURE), 0.0)
        vv = tl.load(v + i_b.to(tl.int64) * svb + i_hk * svh + t * svt + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        S += k_feat[:, None] * vv[None, :]
        z += k_feat
        for g in range(GROUP):
            i_hq = i_hk * GROUP + g
            qx = tl.load(q + i_b.to(tl.int64) * sqb + i_hq * sqh + t * sqt + offs_k, mask=k_ok, other=0.0)
            q_feat = tl.where(k_ok, feature(qx.to(tl.float32) * scale, FEATURE), 0.0)
            num = tl.sum(q_feat[:, None] * S, 0)
            den = tl.sum(q_feat * z, 0) + eps
            tl.store(o + i_b.to(tl.int64) * sob + i_hq * soh + t * sot + offs_v, (num / den).to(o.dtype.element_ty),
                     mask=v_ok)
    tl.store(state_ptrs(S_out, state, offs_k, offs_v, DK, DV), S, mask=kv_ok)
    tl.store(z_out + state * DK + offs_k, z, mask=tl.where(i_v == 0, k_ok, False))


def fused_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    S: torch.Tensor,
    z: torch.Tensor,
    *,
    feature_map_id: int,
    scale: float,
    eps: float,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode T (usually 1) new tokens causally from state (S, z).

    q: [B, Hq, T, Dk]; k: [B, Hkv, T, Dk]; v: [B, Hkv, T, Dv]; S fp32 [B, Hkv, Dk, Dv] and
    z fp32 [B, Hkv, Dk], contiguous.  Returns out [B, Hq, T, Dv] (q's dtype) and the new S, z
    (fresh tensors: the inputs are not modified).
    """
    batch, heads_q, T, dk = q.shape
    heads_kv, dv = k.shape[1], v.shape[-1]
    out = q.new_empty(batch, heads_q, T, dv)
    S_out, z_out = torch.empty_like(S), torch.empty_like(z)

    def launch(cfg):
        bv = min(cfg["BLOCK_V"], pow2(dv))
        traceable(recurrent_fwd_kernel)[(triton.cdiv(dv, bv), batch * heads_kv)](
            q, k, v, out, S, z, S_out, z_out,
            *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(out),
            T, heads_kv, float(scale), float(eps), GROUP=heads_q // heads_kv, FEATURE=feature_map_id,
            DK=dk, DV=dv, BK=pow2(dk), BV=bv, **launch_options(cfg))

    shape = tuning_shape(batch, heads_q, heads_kv, T, dk, dv, q.dtype)
    launch(launch_config("recurrent_fwd", shape, q.device, lambda c: (lambda: launch(c)), (q, k, v), config))
    return out, S_out, z_out
