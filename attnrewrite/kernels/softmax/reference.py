"""Plain-torch softmax attention: the oracle the rest of the package is checked against.

Readable on purpose: materialises the [B, H, Tq, Tk] score matrix, so use it on small inputs only.
"""

from __future__ import annotations

import math

import torch

from attnrewrite.kernels.checks import check_heads


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D], query head h reading kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def causal_keep_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """[Tq, Tk] bool, True where key j may be seen by query i (j <= i, top-left aligned like SDPA)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """scale · q kᵀ + mask, [B, H, Tq, Tk]; masked-out entries are -inf.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D] (Hkv == Hq unless ``enable_gqa``).
        attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Tq, Tk].
    """
    check_heads(q, k, enable_gqa, "softmax attention (reference)")
    k = expand_kv_heads(k, q.shape[-3] // k.shape[-3])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        keep = causal_keep_mask(q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale · q kᵀ + mask) · v, [B, Hq, Tq, Dv], in the inputs' dtype.

    Rows in which every key is masked give 0 (as SDPA does), not NaN.
    Dropout is applied to the probabilities with torch's RNG when ``dropout_p > 0``.
    ``sink_logits`` ([Hq], one per query head): gpt-oss's written-out form, a column of them joins the scores
    before the softmax and is dropped after it: softmax(cat([s, sink], -1))[..., :-1].
    """
    scores = attention_scores(q, k, attn_mask, is_causal, scale, enable_gqa)
    wide = torch.promote_types(scores.dtype, torch.float32)
    if sink_logits is not None:
        column = sink_logits.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1).to(wide), dim=-1)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores.to(wide), dim=-1).nan_to_num(0.0).to(q.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    v = expand_kv_heads(v, q.shape[-3] // v.shape[-3])
    return probs @ v

