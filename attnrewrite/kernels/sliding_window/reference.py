"""Sliding-window attention written to be read: the oracle the blockwise torch path is checked against.

Builds the dense [Tq, Tk] visibility matrix from positions and runs a plain softmax over it; for tests
and small shapes only.  It never imports the fast path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def window_visible(t_q: int, t_k: int, window: int, sinks: int, is_causal: bool) -> torch.Tensor:
    """bool [Tq, Tk]: key j visible from query i.  Query i sits at position p = i + Tk − Tq (the queries
    are the last Tq positions, bottom-right).  Causal: p − window < j ≤ p, or j < sinks and j ≤ p.
    Not causal: |p − j| < window, or j < sinks."""
    p = torch.arange(t_q).view(t_q, 1) + (t_k - t_q)
    j = torch.arange(t_k).view(1, t_k)
    if is_causal:
        return ((j <= p) & (j > p - window)) | ((j < sinks) & (j <= p))
    return ((j - p).abs() < window) | (j < sinks)


def naive_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    window: int = 256,
    sinks: int = 0,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
    relative_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax over the keys of each query's window (and the sinks), further restricted by ``attn_mask``.

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] (Hq a multiple of Hkv); ``attn_mask`` bool
    (True = may attend) or additive float, broadcastable to [B, Hq, Tq, Tk].  A row that sees no key
    gives 0.  Returns [B, Hq, Tq, Dv] in q's dtype (softmax in at least float32).  ``score_mod``, an
    elementwise function, is applied to scale · q kᵀ before the mask.  ``relative_bias``: a table R
    [Hq or 1, Tq + Tk − 1] (T5's relative bias); R[h, j − i + Tq − 1] is added after the modification, with
    the mask (i the query index from the first query, j the key index).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale                       # [B, Hq, Tq, Tk]
    if score_mod is not None:
        scores = score_mod(scores)
    if relative_bias is not None:
        t_q, t_k = q.shape[2], k.shape[2]
        index = (torch.arange(t_k, device=q.device).view(1, t_k) - torch.arange(t_q, device=q.device).view(t_q, 1)
                 + (t_q - 1))
        scores = scores + relative_bias[:, index]                  # [Hq|1, Tq, Tk]
    visible = window_visible(q.shape[2], k.shape[2], window, sinks, is_causal)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return probs.nan_to_num(0.0).to(q.dtype) @ v
