"""Attention written out as plain ops: the exact kind's form for sites with a score modification.

A site whose scores pass through a non-affine elementwise function before the softmax
(Gemma-2's soft-capping ``tanh(s / c) · c``) cannot be expressed through SDPA's signature.
For those sites the exact kind records the canonical computation as plain torch ops:

    s = mod(scale · q kᵀ)  →  mask (causal, bool, additive)  →  softmax  →  dropout  →  · v

This is what the certifier evaluates, on float64 probes, and what the rewrite records with FX
proxies; it is the same math as the model's own code, in canonical form, so it is exact in
every compiler mode (eager, aot_eager, inductor) and differentiable by construction.  Other
kinds that build their scores themselves can use :func:`masked_scores` with their own
normalisation.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnrewrite.ir.canonical import AttentionCall

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def masked_scores(call: AttentionCall) -> Any:
    """[B, Hq, Tq, Tk] scores the normalisation sees: mod(scale · q kᵀ), then the mask; masked keys −∞.

    Works on tensors and on FX proxies (sizes are read from q and k when the call is recorded).
    """
    q, k = call.scaled_q(), call.k
    if call.kv_groups > 1:
        k = k.repeat_interleave(call.kv_groups, dim=-3)
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    if call.score_mod is not None:
        scores = call.score_mod(scores)
    if call.is_causal:
        keep = torch.ones_like(scores, dtype=torch.bool).tril()  # (recordable with proxies: no sizes)
        scores = scores.masked_fill(~keep, -math.inf)
    mask = call.attn_mask
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if call.bool_mask else scores + mask
    return scores


def written_out(call: AttentionCall, normalise: Callable[[Any], Any] | None = None) -> Any:
    """The attention of ``call`` as plain ops: ``normalise(masked_scores) · v``, [B, Hq, Tq, Dv].  With sink logits
    a column of them joins the scores before ``normalise`` and is dropped after it (a key of value 0).

    ``normalise`` defaults to softmax over the keys, computed in float32 for half-precision inputs;
    rows in which every key is masked give zeros, as SDPA does.  Dropout is applied to the
    probabilities when ``call.dropout_p > 0``.
    """
    dtype = call.dtype if call.dtype is not None else call.q.dtype
    scores = masked_scores(call)
    if call.sink_logits is not None:  # gpt-oss's own form: the sink column joins the scores, then is dropped
        scores = torch.cat([scores, call.sink_logits.to(scores.dtype).expand_as(scores[..., :1])], dim=-1)
    if normalise is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if dtype in _LOW_PRECISION else dtype)
        probs = probs.masked_fill(scores.isneginf().all(dim=-1, keepdim=True), 0.0).to(dtype)
    else:
        probs = normalise(scores)
    if call.sink_logits is not None:
        probs = probs[..., :-1]
    if not isinstance(call.dropout_p, (int, float)) or call.dropout_p > 0.0:  # symbolic: the graph decides
        probs = F.dropout(probs, p=call.dropout_p)
    v = call.v if call.kv_groups == 1 else call.v.repeat_interleave(call.kv_groups, dim=-3)
    return probs @ v


def shift_sensitive(scores: torch.Tensor) -> torch.Tensor:
    """The score probes' normalisation, elementwise: elu(s) + 1 — exp(s) below 0, 1 + s above; 0 for a masked
    score (−∞, or ≤ MASKED_SCORE = −9000: exp underflows in float64), and a change of c in a score changes it by about c·exp(s)
    or c, never hidden by saturation, and never normalised away (``rewriter/certify.py``)."""
    return F.elu(scores) + 1.0


def shift_sensitive_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                         enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same signature, no dropout) with :func:`shift_sensitive` for its
    softmax: [.., Hq, Tq, Dv] from the very scores SDPA normalises (top-left causal, bool True = keep)."""
    if q.shape[-3] != k.shape[-3]:  # (enable_gqa: SDPA itself refuses unequal heads without it)
        k, v = (x.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for x in (k, v))
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    return shift_sensitive(scores) @ v
