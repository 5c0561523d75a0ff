"""Decode kernel of summary attention: one new token's queries over :class:`attnrewrite.SummaryCache`'s store.

A decoding step of the summary cache returns one contiguous slice of its store,
``[k̄_0 … k̄_{n−1} | window tokens … new token]`` ([B, Hkv, n, D], a view with the store's capacity as
its stride), and, once some token was padding, a flag per entry (the summary exists / the token is
not padding).  The newest query sees every flagged entry, so the step is one softmax over the slice.

The kernel reads the slice in place (no copy, no repeat of K/V for grouped heads): one program per
(batch, key/value head, split of the slice) holds the GROUP query heads of that key/value head as
the rows of its tile, runs an online softmax over its split and writes the unnormalised partial
output with its running max and sum; :func:`summary_decode` combines the splits (flash-decoding),
so a long cache is read by many programs at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (LOG2E_HOST, dot_precision, head_strides, load_rows, load_tile, mma,
                                                 online_softmax_step, padded_dim)

from .triton_common import key_ok


@triton.jit
def summary_decode_kernel(
    Q, K, V, Valid, PartO, PartM, PartL,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_valid_b,
    heads_kv, n_keys, keys_per_split, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_zh = tl.program_id(1)
    batch = (pid_zh // heads_kv).to(tl.int64)
    head_kv = (pid_zh % heads_kv).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q + batch * stride_qb + (head_kv * GROUP + offs_g[:, None]) * stride_qh + offs_d[None, :],
                  offs_g, GROUP, offs_d, D, True, BLOCK_D != D)
    k_base = K + batch * stride_kb + head_kv * stride_kh
    v_base = V + batch * stride_vb + head_kv * stride_vh
    valid_base = Valid + batch * stride_valid_b

    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    lo = pid_split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, offs_n, stride_kn, hi, offs_d, D, True, BLOCK_D != D)
        v = load_rows(v_base, offs_n, stride_vn, hi, offs_dv, DV, True, BLOCK_DV != DV)
        vis = key_ok(valid_base, offs_n, hi, HAS_VALID)[None, :] & (offs_g < GROUP)[:, None]
        z2 = tl.where(vis, mma(q, tl.trans(k), None, DOT_PRECISION) * scale_log2, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, z2, v, DOT_PRECISION)
    part = (pid_zh.to(tl.int64) * tl.num_programs(0) + pid_split) * BLOCK_G + offs_g
    tl.store(PartO + part[:, None] * BLOCK_DV + offs_dv[None, :], acc)
    tl.store(PartM + part, m_i)
    tl.store(PartL + part, l_i)


def summary_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None,
                   scale: float | None = None, *, block_n: int = 64, splits: int | None = None,
                   num_warps: int = 4, launch=lambda kernel: kernel) -> torch.Tensor:
    """Attention of one token's queries over a summary cache's slice.

    Args:
        q: [B, Hq, 1, D] (Hq a multiple of Hkv).
        keys, values: [B, Hkv, n, D|Dv], what ``SummaryLayer.step`` returns for a one-token step (views
            of the store are read in place; the last dim must have unit stride).
        valid: None (every entry is seen) or bool [B, n] / the step's ``visible`` [B, 1, 1, n].
        scale: default 1/√D.
        block_n: entries per tile; splits: slices read by separate programs (default: enough for
            about 64 programs per (batch, key/value head) on long caches, at least 256 entries each).
    Returns:
        [B, Hq, 1, Dv] in q's dtype; a query that sees no entry gets 0.
    """
    batch, heads_q, steps, dim = q.shape
    heads_kv, n_keys, dim_v = keys.shape[1], keys.shape[2], values.shape[3]
    if steps != 1:
        raise ValueError(f"summary_decode takes one token per step (q [B, Hq, 1, D]), got {steps} tokens")
    if heads_q % heads_kv:
        raise ValueError(f"summary_decode: Hq={heads_q} is not a multiple of Hkv={heads_kv}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("summary_decode: keys and values need a unit stride in their last dim")
    scale = dim ** -0.5 if scale is None else float(scale)
    group = heads_q // heads_kv
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    if splits is None:
        splits = max(1, min(64, triton.cdiv(n_keys, 256)))
    keys_per_split = triton.cdiv(max(n_keys, 1), splits * block_n) * block_n
    splits = max(1, triton.cdiv(n_keys, keys_per_split))
    q = q if q.stride(-1) == 1 else q.contiguous()
    flags = None
    if valid is not None:
        flags = valid.reshape(batch, n_keys).to(torch.uint8).contiguous()
    block_dv = padded_dim(dim_v)
    f32 = dict(dtype=torch.float32, device=q.device)
    part_o = torch.empty(batch * heads_kv, splits, block_g, block_dv, **f32)
    part_m = torch.empty(batch * heads_kv, splits, block_g, **f32)
    part_l = torch.empty(batch * heads_kv, splits, block_g, **f32)
    launch(summary_decode_kernel)[(splits, batch * heads_kv)](
        q, keys, values, flags if flags is not None else q, part_o, part_m, part_l,
        q.stride(0), q.stride(1),
        *head_strides(keys, values),
        flags.stride(0) if flags is not None else 0,
        heads_kv, n_keys, keys_per_split, scale * LOG2E_HOST,
        D=dim, DV=dim_v, BLOCK_D=padded_dim(dim), BLOCK_DV=block_dv, GROUP=group, BLOCK_G=block_g,
        HAS_VALID=flags is not None, DOT_PRECISION=dot_precision(q.dtype), BLOCK_N=block_n, num_warps=num_warps,
    )
    # combine the splits: out = Σ_s 2^(m_s − M) acc_s / Σ_s 2^(m_s − M) l_s
    top = part_m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp2(part_m - top)                                                  # 0 for empty splits
    total = (weight * part_l).sum(1)                                                   # [B·Hkv, G]
    out = (weight.unsqueeze(-1) * part_o).sum(1) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    out = out[:, :group, :dim_v].reshape(batch, heads_kv * group, 1, dim_v)
    return out.to(q.dtype)
