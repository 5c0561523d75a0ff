"""``attnrewrite::softmax_attention``: the exact kind as a ``torch.library`` operator.

The operator is defined with a ``CompositeImplicitAutograd`` kernel that calls
``F.scaled_dot_product_attention``. That choice is deliberate for the exact kind:

- its fake (meta) implementation and its autograd are those of SDPA, so
  ``torch.library.opcheck`` passes and nothing can drift from SDPA's semantics;
- under ``torch.compile`` the operator decomposes to ``aten.scaled_dot_product_attention``
  *before* autograd, so inductor lowers it to its fused flash / memory-efficient kernels,
  forward and backward, exactly as if the user had written SDPA.

Kinds with loops or kernels of their own (summary, hashed, the kernels under sigmoid and linear)
are opaque operators with ``register_fake`` and ``register_autograd`` instead (:mod:`.._ops`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnrewrite.kernels._ops import composite_op, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.checks import check_dropout, check_mask_dtype, check_qkv

WHAT = "softmax attention"


def _softmax_attention_impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # checked here, behind the autocast kernel: under autocast q, k, v arrive already cast
    _check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    if is_causal and attn_mask is not None:
        # SDPA refuses both; we accept them and mean "causal AND mask".
        attn_mask, is_causal = fold_causal_into_mask(attn_mask, q.shape[-2], k.shape[-2]), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def fold_causal_into_mask(attn_mask: torch.Tensor, t_q, t_k) -> torch.Tensor:
    """``attn_mask`` restricted to the causal (top-left) triangle; bool stays bool, float gets -inf."""
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=attn_mask.device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


composite_op("softmax_attention", sdpa_schema(), _softmax_attention_impl)
sdpa_autocast("softmax_attention")

SINK_WHAT = "softmax attention with sink logits"


def _sink_softmax_attention_impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, sink_logits=None):
    # one zero key and zero value per kv head, seen by every query with the score sink_logits[h] (a mask column):
    # the sink only adds exp(sink_logits[h]) to each row's denominator.  SDPA's is_causal is top-left, which would
    # hide the appended key from every row, so causality goes into the mask.
    if sink_logits is None:
        return _softmax_attention_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    column = sink_column(sink_logits, q)
    mask = q.new_zeros(q.shape[:-1] + (k.shape[-2],))  # [.., Hq, Tq, Tk], additive in q's dtype
    if attn_mask is not None:
        mask = mask.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else mask + attn_mask
    if is_causal:
        mask = fold_causal_into_mask(mask, q.shape[-2], k.shape[-2])
    mask = torch.cat([mask, column.expand(mask.shape[:-1] + (1,))], dim=-1)
    k = torch.cat([k, k.new_zeros(k.shape[:-2] + (1, k.shape[-1]))], dim=-2)
    v = torch.cat([v, v.new_zeros(v.shape[:-2] + (1, v.shape[-1]))], dim=-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=enable_gqa)


def sink_column(sink_logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sink_logits`` checked and viewed as [1, Hq or 1, 1, 1] (its dims right-aligned with q's [.., Hq, Tq, D]),
    in q's dtype: one logit per query head, or one for all.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: a shape that is not one logit per head: [Hq], [1], or those with size-1 dims around them
            ([1, Hq, 1, 1], [Hq, 1, 1]).
    """
    if not isinstance(sink_logits, torch.Tensor) or not sink_logits.is_floating_point():
        got = sink_logits.dtype if isinstance(sink_logits, torch.Tensor) else type(sink_logits).__name__
        raise TypeError(f"{SINK_WHAT}: sink_logits must be a floating-point tensor, got {got}")
    heads, shape = q.shape[-3] if q.dim() >= 3 else 1, tuple(sink_logits.shape)
    per_head = shape[0] if len(shape) == 1 else shape[-3] if len(shape) >= 3 else None
    if (sink_logits.device != q.device or per_head not in (1, heads) or len(shape) > 1 and (
            len(shape) < 3 or shape[-2:] != (1, 1) or any(s != 1 for s in shape[:-3]))):
        raise ValueError(f"{SINK_WHAT}: sink_logits must hold one logit per query head ({heads}) or one for all, "
                         f"shaped [H], [H, 1, 1] or [1, H, 1, 1] on q's device ({q.device}); got "
                         f"{list(shape)} on {sink_logits.device}")
    return sink_logits.reshape(-1, 1, 1).to(q.dtype)


composite_op("sink_softmax_attention", sdpa_schema("Tensor? sink_logits=None"), _sink_softmax_attention_impl)
sdpa_autocast("sink_softmax_attention")


def sink_softmax_attention(
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
    """Exact softmax attention with learned sink logits (gpt-oss's attention sinks).

    Each query head h sees one more key whose score is ``sink_logits[h]`` and whose value is 0:
    out = Σ_j exp(s_ij) v_j / (exp(sink_logits[h]) + Σ_j exp(s_ij)), the written-out form
    ``softmax(cat([s, sink], -1))[..., :-1] @ v``.  A query that sees no key gets 0.  Differentiable in
    q, k, v, a float mask and ``sink_logits``.  Otherwise as :func:`softmax_attention` (``is_causal`` top-left
    and combinable with a mask); ``sink_logits=None`` is :func:`softmax_attention` itself.

    Args:
        sink_logits: [Hq], [Hq, 1, 1] or [1, Hq, 1, 1] (or one logit for all heads), floating point; cast to
            q's dtype.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.
    """
    return torch.ops.attnrewrite.sink_softmax_attention(
        q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        sink_logits=sink_logits)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Exact softmax attention; the signature and semantics of ``F.scaled_dot_product_attention``.

    Args:
        q: [B, Hq, Tq, D] (any leading batch dims); k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv].
            fp16, bf16, fp32 or fp64, all the same dtype and device (inside ``torch.autocast`` they
            are cast to the autocast dtype first, float64 excepted, as SDPA does).
        attn_mask: bool (True = may attend) or additive float, broadcastable to [B, Hq, Tq, Tk].
        dropout_p: dropout on the attention probabilities (applied whenever > 0, as in SDPA).
        is_causal: key j visible to query i iff j <= i (top-left aligned). Unlike SDPA, it may be
            combined with ``attn_mask``: a key is then visible when both allow it.
        scale: defaults to 1/sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).

    Returns:
        [B, Hq, Tq, Dv] in q's dtype (the autocast dtype inside ``torch.autocast``).
    """
    return torch.ops.attnrewrite.softmax_attention(
        q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    # SDPA's layout: any leading dims, heads compared where there are some
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa, any_leading_dims=True)
    check_dropout(dropout_p, WHAT, supported=True)
    if attn_mask is not None:
        check_mask_dtype(attn_mask, WHAT, like=q)  # SDPA adds a float mask in q's dtype
