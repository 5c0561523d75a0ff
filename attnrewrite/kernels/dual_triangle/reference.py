"""Dual-triangle attention written to be read: the oracle the op is checked against.

Materialises the [B, Hq, T, T] scores and repeats K/V for grouped heads; for tests and small
shapes only.  It never imports the op.
"""

from __future__ import annotations

import math

import torch


def naive_dual_triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    past_heads: int | None = None,
    score_mod=None,
) -> torch.Tensor:
    """out[h, i] = Σ_j softmax_j(scale·q_i·k_j + mask_ij)·v_j over j ≤ i for heads h < past_heads and
    over j ≥ i for the others (past_heads defaults to Hq // 2).

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Hq a multiple of Hkv); ``attn_mask`` bool
    (True = may attend) or additive float, broadcastable to [B, Hq, T, T].  A row that sees no key
    gives 0.  ``score_mod``: a function of the scores, elementwise (soft-capping ``lambda s: 30 * tanh(s / 30)``),
    applied to scale·q_i·k_j before the mask.  Returns [B, Hq, T, Dv] in q's dtype (softmax in at least float32).
    """
    batch, heads, length, dim = q.shape
    past_heads = heads // 2 if past_heads is None else past_heads
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    scores = (q @ k.transpose(-1, -2)) * scale                     # [B, Hq, T, T]
    if score_mod is not None:
        scores = score_mod(scores)
    i = torch.arange(length).view(length, 1)
    j = torch.arange(length).view(1, length)
    sees_past = j <= i
    sees_future = j >= i
    visible = torch.stack([sees_past if h < past_heads else sees_future for h in range(heads)])  # [Hq, T, T]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return (probs.nan_to_num(0.0).to(q.dtype)) @ v
