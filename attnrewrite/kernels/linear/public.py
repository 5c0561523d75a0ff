"""``attnrewrite::linear_attention``, the public linear op: SDPA's signature plus ``feature_map`` and ``eps``.

Like the exact kind's op it is ``CompositeImplicitAutograd`` over
:func:`attnrewrite.kernels.linear.api.linear_attention_dispatch`: on CUDA that calls the Triton ``triton_op``s
(with their fake implementations and autograd, visible to inductor); elsewhere the chunked torch
path (plain differentiable ops, memory linear in T).
"""

from __future__ import annotations

from typing import Callable

import torch

from attnrewrite.kernels._ops import composite_op, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.linear.api import linear_attention_dispatch


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          feature_map="elu", eps=1e-6):
    return linear_attention_dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                     feature_map=feature_map, eps=eps)


# the op takes a feature map by name; callables are applied by the Python wrapper below
composite_op("linear_attention", sdpa_schema('str feature_map="elu", float eps=1e-6'), _impl)
sdpa_autocast("linear_attention")  # q/k in fp32 beside a bf16 v run in bf16, as SDPA does

FeatureMap = str | Callable[[torch.Tensor], torch.Tensor] | tuple


def linear_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     feature_map: FeatureMap = "elu", eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    out_i = φ(q_i)·Σ_j φ(k_j)ᵀ v_j / (φ(q_i)·Σ_j φ(k_j) + eps), over keys j ≤ i when causal and over
    the valid keys of a key-padding mask.

    Args:
        q, k, v, attn_mask, dropout_p, is_causal, enable_gqa: as in SDPA, with the linear kind's
            limits: ``attn_mask`` must be a key-padding mask (bool or 0/−inf, broadcastable from
            [B, 1, 1, Tk]), ``dropout_p`` must be 0, causal needs Tq ≤ Tk (with Tq < Tk
            the queries are the last Tq positions, bottom-right as for a decoding step).
        scale: multiplies q before φ; None means 1 (no 1/√D: it would flatten elu+1 features).
        feature_map: ``"elu"`` (elu+1), ``"relu"`` or ``"identity"`` — fused into the kernels — or a
            callable φ applied to q and k in torch, or a pair (φ_q, φ_k) (e.g. a
            :class:`~attnrewrite.kernels.linear.stateful_maps.LinearSiteState`'s maps).
        eps: added to the normaliser.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.  Inside ``torch.autocast`` the floating-point inputs (float64
        excepted) are cast to the autocast dtype first and the output has it, as with SDPA.
    """
    if not isinstance(feature_map, str):
        phi_q, phi_k = feature_map if isinstance(feature_map, tuple) else (feature_map, feature_map)
        q = q if scale is None else q * scale
        q, k, feature_map, scale = phi_q(q), phi_k(k), "identity", None
    return torch.ops.attnrewrite.linear_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                  feature_map=feature_map, eps=eps)
