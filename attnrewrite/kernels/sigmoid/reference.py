"""Sigmoid attention, written to be read: the oracle every fast path is checked against.

It materialises the full [B, Hq, Tq, Tk] score matrix and repeats K/V for grouped
heads, so it is only for tests and small shapes.  Call it on float64 (or float32)
inputs to get the reference; call it on the low-precision inputs to measure what
plain torch achieves at that precision.  It never imports the fast paths.
"""

from __future__ import annotations

import math

import torch

from attnrewrite.kernels.checks import MASKED_SCORE


def naive_sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    bias: str | float = "auto",
    kv_lens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    causal_align: str = "top_left",
) -> torch.Tensor:
    """out_i = sum over the keys j that query i may see of sigmoid(scale*q_i.k_j + mask_ij + b) * v_j.

    Shapes: q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] with Hq a multiple
    of Hkv; returns [B, Hq, Tq, Dv] in q's dtype.  With ``cu_seqlens_q/k`` (int [N+1])
    the batch is packed: q [1, Hq, total_q, D], and each sequence attends only to itself.

    Semantics are those of :func:`attnrewrite.kernels.sigmoid.sigmoid_attention_dispatch`,
    computed here independently and without any cleverness.
    """
    if cu_seqlens_q is not None:
        outs = []
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            outs.append(naive_sigmoid_attention(
                q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], None, is_causal, scale,
                bias=bias, causal_align=causal_align))
        return torch.cat(outs, dim=2)

    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, Tk, D]
    v = v.repeat_interleave(group, dim=1)  # [B, Hq, Tk, Dv]

    scores = scale * (q @ k.transpose(-1, -2))  # [B, Hq, Tq, Tk]
    key_index = torch.arange(len_k, device=q.device)
    query_index = torch.arange(len_q, device=q.device)

    # Keys that exist for each sequence: padding beyond kv_lens[b] does not.
    valid_len = torch.full((batch,), len_k, device=q.device) if kv_lens is None else kv_lens.clamp(0, len_k)
    visible = (key_index < valid_len.view(batch, 1, 1, 1)).expand(batch, heads_q, len_q, len_k)
    counted = visible  # the keys bias="auto" counts: a float mask's entries <= MASKED_SCORE (-9000) are not
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
        counted = visible
    elif attn_mask is not None:
        scores = scores + attn_mask
        counted = visible & (attn_mask > MASKED_SCORE)

    # bias="auto", not causal: -log(number of keys query i sees), its own count per row.
    if bias == "auto" and not is_causal:
        b = -torch.log(counted.sum(dim=-1, keepdim=True).clamp(min=1).to(scores.dtype))  # [B, Hq, Tq, 1]
    elif bias != "auto":
        b = float(bias)

    if is_causal:
        shift = torch.zeros_like(valid_len) if causal_align == "top_left" else valid_len - len_q
        causal = key_index.view(1, 1, len_k) <= query_index.view(1, len_q, 1) + shift.view(batch, 1, 1)
        visible = visible & causal.unsqueeze(1)
        counted = counted & causal.unsqueeze(1)
        if bias == "auto":  # causal: -log(number of keys this query sees), its own count
            b = -torch.log(counted.sum(dim=-1, keepdim=True).clamp(min=1).to(scores.dtype))  # [B, Hq, Tq, 1]

    weights = torch.where(visible, torch.sigmoid(scores + b), torch.zeros((), dtype=scores.dtype, device=q.device))
    return weights @ v
