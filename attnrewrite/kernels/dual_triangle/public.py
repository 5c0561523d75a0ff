"""``attnrewrite::dual_triangle_attention``, the public dual-triangle op: SDPA's signature plus ``past_heads``.

Dual Triangle Attention splits the heads of a bidirectional self-attention: the first ``past_heads``
heads see the past and the present (keys j ≤ i), the others the present and the future (j ≥ i);
each head normalises with an exact softmax over its own triangle.  A model rewritten to it must be
trained (or fine-tuned) to use the two halves.

The op is ``CompositeImplicitAutograd``: its torch path is ``F.scaled_dot_product_attention`` with a
bool mask holding one triangle per head (combined with the caller's mask), so its fake
implementation, autograd and inductor lowering are SDPA's.  A score modification (a program of
:mod:`attnrewrite.kernels.score_mods`: soft-capping ...) is applied to the scores written out instead,
before the mask and each triangle's softmax; there are no Triton kernels for this kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnrewrite.kernels._ops import composite_op, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.checks import check_dropout, check_mask_dtype, check_qkv
from attnrewrite.kernels.score_mods import parse as parse_score_mod

WHAT = "dual-triangle attention"


def resolve_past_heads(past_heads: int | None, heads: int) -> int:
    """The number of past-looking heads: ``past_heads``, or heads // 2 when None.

    Raises:
        TypeError: not an int (or None).
        ValueError: outside 0 … heads.
    """
    if past_heads is None:
        return heads // 2
    if not isinstance(past_heads, int) or isinstance(past_heads, bool):
        raise TypeError(f"{WHAT}: past_heads must be an int or None, got {type(past_heads).__name__}")
    if not 0 <= past_heads <= heads:
        raise ValueError(f"{WHAT}: past_heads must lie in 0 … {heads} (the query heads), got {past_heads}")
    return past_heads


def triangle_per_head(heads: int, past_heads: int, length, device) -> torch.Tensor:
    """bool [Hq, T, T]: key j visible from query i — j ≤ i for heads below ``past_heads``, j ≥ i above."""
    past = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    is_past_head = (torch.arange(heads, device=device) < past_heads).view(heads, 1, 1)
    return torch.where(is_past_head, past, past.transpose(0, 1))


def _check(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa)
    check_dropout(dropout_p, WHAT, supported=True)
    if is_causal:
        raise ValueError(f"{WHAT}: is_causal=True would leave the future-looking heads only their own token; "
                         "dual-triangle attention takes bidirectional self-attention (is_causal=False)")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"{WHAT}: queries and keys must be one sequence (Tq == Tk), got Tq={q.shape[-2]} and "
                         f"Tk={k.shape[-2]}")
    if attn_mask is not None:
        check_mask_dtype(attn_mask, WHAT, like=q)  # SDPA adds a float mask in q's dtype
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(padded, target)):
            raise ValueError(f"{WHAT}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, Hq, T, T] = {list(target)}")


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, past_heads=None,
          score_mod=None):
    _check(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    program = parse_score_mod(score_mod)  # (ValueError naming a bad step)
    heads = q.shape[1]
    visible = triangle_per_head(heads, resolve_past_heads(past_heads, heads), q.shape[2], q.device)  # [Hq, T, T]
    if program is not None:
        return _with_score_mod(q, k, v, attn_mask, dropout_p, scale, visible, program)
    if attn_mask is None:
        mask = visible
    elif attn_mask.dtype == torch.bool:
        mask = attn_mask & visible
    else:
        mask = torch.where(visible, attn_mask, torch.full((), float("-inf"), dtype=attn_mask.dtype,
                                                          device=attn_mask.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=enable_gqa)


def _with_score_mod(q, k, v, attn_mask, dropout_p, scale, visible, program):
    """The op with a score modification, which SDPA cannot apply: the scores written out, [B, Hq, T, T] —
    softmax over each head's triangle (and the caller's mask) of mod(scale · q kᵀ) + mask, as the canonical form
    orders them (``ir.written_out.masked_scores``); differentiated by autograd (the op is composite)."""
    if k.shape[1] != q.shape[1]:  # grouped kv heads (enable_gqa, checked)
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    work = torch.promote_types(q.dtype, torch.float32)  # (softmax in at least float32, as SDPA on CPU)
    scores = program((q.to(work) @ k.to(work).transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(work)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)  # (no key: 0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v.to(work)).to(q.dtype)


composite_op("dual_triangle_attention", sdpa_schema("int? past_heads=None, str? score_mod=None"), _impl)
sdpa_autocast("dual_triangle_attention")


def dual_triangle_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                            *, past_heads: int | None = None, score_mod: str | None = None) -> torch.Tensor:
    """Dual-triangle attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Query head h < ``past_heads`` attends (softmax) to keys j ≤ i, every other head to keys j ≥ i.

    Args:
        q: [B, Hq, T, D]; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] — one sequence (Tq == Tk); fp16, bf16,
            fp32 or fp64, one dtype and device.
        attn_mask: bool (True = may attend) or additive float (q's dtype), broadcastable to
            [B, Hq, T, T]; combined with each head's triangle (a padding mask hides padded keys
            from both halves).
        dropout_p: dropout on the probabilities, as SDPA (applied whenever > 0).
        is_causal: must be False (a causal site is already one triangle).
        scale: defaults to 1/√D.
        enable_gqa: Hq may be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)); the
            split into past and future counts query heads.
        past_heads: how many of the first query heads look at the past; None: Hq // 2.
        score_mod: a score modification program (:mod:`attnrewrite.kernels.score_mods`, e.g. soft-capping
            ``"div 30.0; tanh; mul 30.0"``) applied to scale · q kᵀ before the mask and the softmax; None or ""
            for none.  With one the scores are written out (no SDPA), [B, Hq, T, T] at once.

    Returns:
        [B, Hq, T, Dv] in q's dtype (a row that sees no key gives 0).  Inside ``torch.autocast`` the
        floating-point inputs (float64 excepted) are cast to the autocast dtype first, as with SDPA.

    Raises:
        ValueError: is_causal=True, Tq != Tk, past_heads outside 0 … Hq, shapes that do not pair up, a
            score_mod that is not a program.
        TypeError: inputs of the wrong type.
    """
    return torch.ops.attnrewrite.dual_triangle_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                         past_heads=past_heads, score_mod=score_mod)
