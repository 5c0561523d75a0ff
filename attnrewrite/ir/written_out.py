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
    """The attention of ``call`` as plain ops: ``normalise(masked_scores) · v``, [B, Hq, Tq, Dv].

    ``normalise`` defaults to softmax over the keys, computed in float32 for half-precision inputs;
    rows in which every key is masked give zeros, as SDPA does.  Dropout is applied to the
    probabilities when ``call.dropout_p > 0``.
    """
    dtype = call.dtype if call.dtype is not None else call.q.dtype
    scores = masked_scores(call)
    if normalise is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if dtype in _LOW_PRECISION else dtype)
        probs = probs.masked_fill(scores.isneginf().all(dim=-1, keepdim=True), 0.0).to(dtype)
    else:
        probs = normalise(scores)
    if not isinstance(call.dropout_p, (int, float)) or call.dropout_p > 0.0:  # symbolic: the graph decides
        probs = F.dropout(probs, p=call.dropout_p)
    v = call.v if call.kv_groups == 1 else call.v.repeat_interleave(call.kv_groups, dim=-3)
    return probs @ v
