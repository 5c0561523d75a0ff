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
