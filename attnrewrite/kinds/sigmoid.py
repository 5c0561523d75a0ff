"""The ``sigmoid`` kind: how the rewriter uses ``attnrewrite::sigmoid_attention``
(:mod:`attnrewrite.kernels.sigmoid.public`).

Sigmoid attention honours every mask a softmax site can have (bool, additive, causal, padding),
grouped-query attention, dropout and returned weights, and applies a score modification (Gemma-2's
soft-capping and any chain of the elementwise steps of :mod:`attnrewrite.kernels.score_mods`) before
the mask and its bias: sigmoid(mod(s·q·kᵀ) + mask + b).  It skips only sites whose modification reads
a tensor or a symbolic number (no program, :mod:`attnrewrite.ir.score_program`), and modified sites
under ``learned=True`` (the learned temperature would scale the scores before the modification).
A bias proven to be a per-head linear function of the positions (ALiBi, slope_h · (j − i) or
slope_h · |j − i|) is computed inside the op from the slopes (``position_slopes``), not passed as a
[B, H, Tq, Tk] mask; a bias proven to be R[h, j − i] (T5's bucketed relative bias, a table by clamped
distance) reaches it as the table R [Hq, Tq + Tk − 1] (``position="relative"``), recomputed from the
model's own nodes, so the model's embedding still gets its gradient.  Learned sink logits (gpt-oss) are
dropped, said in the site's notes: a sink is a key of value 0, which adds nothing to a sigmoid row.
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.sigmoid.public  # noqa: F401 — registers attnrewrite::sigmoid_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.score_program import score_program
from attnrewrite.ir.spec import MASKED_SCORE, AttentionSpec
from attnrewrite.kernels.sigmoid.state import SigmoidHeadState
from attnrewrite.kinds.options import auto_or_number, flag, impl_choice
from attnrewrite.kinds.registry import Kind, register

# --------------------------------------------------------------------------- the kind


def _bias(options: dict[str, Any]) -> float | None:
    return None if options["bias"] == "auto" else float(options["bias"])


def _scores_operands(call: AttentionCall, state) -> tuple[Any, Any, Any]:
    """(q, k, scale) of the scores.  With a learned state, q is scaled by each head's temperature and
    the head's bias β_h rides in one more channel (q gets β_h / scale, k gets 1), so that
    scale·q'·k'ᵀ = t_h·scale·q·kᵀ + β_h goes through the op unchanged (masks, padding, causality, GQA)."""
    q, k, scale = call.scaled_q(), call.k, call.scale
    if state is None:
        return q, k, scale
    if scale is None:
        scale = q.shape[-1] ** -0.5  # the default of the original head dim, fixed before the channel is added
    q, head_bias = state(q)
    q = torch.cat([q, head_bias / scale], dim=-1)
    k = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)
    return q, k, scale


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    q, k, scale = _scores_operands(call, state)
    return torch.ops.attnrewrite.sigmoid_attention(q, k, call.v, call.attn_mask, call.dropout_p,
                                                   call.is_causal, scale, call.enable_gqa, bias=_bias(options),
                                                   score_mod=call.score_program, impl=options["impl"],
                                                   position_slopes=call.position_slopes, position=call.position)


def weights(call: AttentionCall, options: dict[str, Any], state) -> Any:
    """sigmoid(mod(scale·q·kᵀ) + mask + b), 0 where a key is masked: [B, Hq, Tq, Tk] (returned weights only).

    Written with tensor ops and static flags only, so it records into a graph as it runs eagerly.
    """
    q, k, scale = _scores_operands(call, state)
    if call.enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if call.score_mod is not None:  # the graph's own modification, replayed (supports() saw it has a program)
        scores = call.score_mod(scores)
    keep = torch.ones_like(scores, dtype=torch.bool)
    # the keys bias="auto" counts: the op's rule (attnrewrite.kernels.sigmoid.api.mask_keeps), the matcher's
    # for a masked score (MASKED_SCORE), so the mask goes to the op as it is, without a copy
    counted = keep
    attn_mask = call.attn_mask
    if attn_mask is not None:
        if call.bool_mask:
            keep = keep & attn_mask
            counted = keep
        else:
            scores = scores + attn_mask
            counted = keep & (attn_mask > MASKED_SCORE)
    if call.is_causal:
        keep = keep & torch.ones_like(keep[0, 0]).tril()
        counted = counted & keep
    if options["bias"] == "auto":  # n_i: the keys query i sees (the op's rule)
        b = -counted.sum(dim=-1, keepdim=True).clamp(min=1).float().log()
    else:
        b = float(options["bias"])
    return torch.sigmoid(scores + b).masked_fill(~keep, 0.0).to(q.dtype)


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if spec.score_mod is None:
        return None
    if options["learned"]:
        return "a score modification with learned=True (the head temperature would scale the scores it reads)"
    _, reason = score_program(spec.score_mod)
    return reason


def make_state(spec: AttentionSpec, options: dict[str, Any]):
    if not options["learned"]:
        return None
    from attnrewrite.patterns.layout import ref_shape

    return SigmoidHeadState(ref_shape(spec.q)[-3])


KIND = register(Kind(
    name="sigmoid",
    emit=emit,
    supports=supports,
    # learned: a temperature and a bias per head (a state, attached by convert, fitted by distill)
    # impl: the op's path, as for summary and hashed ("triton" runs the kernels, every score modification included)
    options={"bias": auto_or_number("auto"), "learned": flag(False), "impl": impl_choice("auto")},
    description="sigmoid attention Σ sigmoid(s·q·kᵀ + b)·v, b = −log(n) by default",
    weights=weights,
    make_state=make_state,
    score_mod=True,  # applies call.score_program when the modification has one (supports says why not)
    position_bias=True,  # computes ALiBi (call.position_slopes) in its kernels instead of reading a mask
    relative_bias=True,  # reads a relative bias R[h, j − i] (T5) by distance (position="relative")
    sink_logits="dropped",  # a zero-value key adds sigmoid(sink)·0 = 0 to a row: there is no denominator to share
))
