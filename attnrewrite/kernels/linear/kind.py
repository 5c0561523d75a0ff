"""The ``linear`` kind: its public operator and how the rewriter uses it.

``attnrewrite::linear_attention`` has SDPA's signature plus ``feature_map`` and ``eps``. Like the
exact kind's op it is ``CompositeImplicitAutograd`` over :func:`attnrewrite.kernels.linear.linear_attention`:
on CUDA that calls the Triton ``triton_op``s (with their fake implementations and autograd, visible
to inductor); elsewhere the chunked torch path (plain differentiable ops, memory linear in T).

A site can be rewritten to ``linear`` when its mask is causal and/or key padding (a linear kind
cannot honour a mask that varies across queries, an additive bias, dropout on probabilities or
a score modification): such sites are skipped with the reason.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from attnrewrite.kinds import Kind, register
from attnrewrite.rewriter.canonical import AttentionCall
from attnrewrite.rewriter.capture import hinted_shape
from attnrewrite.rewriter.spec import AttentionSpec

from .api import linear_attention as _linear_attention
from .feature_maps import FEATURE_MAPS, apply_feature_map
from .stateful_maps import make_site_state

STATEFUL_MAPS = ("favor", "hedgehog")

_lib = torch.library.Library("attnrewrite", "FRAGMENT")
_lib.define(
    "linear_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False, str feature_map=\"elu\", float eps=1e-6) "
    "-> Tensor")


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          feature_map="elu", eps=1e-6):
    return _linear_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             feature_map=feature_map, eps=eps)


_lib.impl("linear_attention", _impl, "CompositeImplicitAutograd")

FeatureMap = str | Callable[[torch.Tensor], torch.Tensor] | tuple


def linear_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     feature_map: FeatureMap = "elu", eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    out_i = φ(q_i)·Σ_j φ(k_j)ᵀ v_j / (φ(q_i)·Σ_j φ(k_j) + eps), over keys j ≤ i when causal and over
    the valid keys of a key-padding mask.

    Args:
        q, k, v, attn_mask, dropout_p, is_causal, enable_gqa: as in SDPA, with the linear kind's
            limits: ``attn_mask`` must be a key-padding mask (bool or 0/−inf, broadcastable from
            [B, 1, 1, Tk]), ``dropout_p`` must be 0, causal needs Tq == Tk.
        scale: multiplies q before φ; None means 1 (no 1/√D: it would flatten elu+1 features).
        feature_map: ``"elu"`` (elu+1), ``"relu"`` or ``"identity"`` — fused into the kernels — or a
            callable φ applied to q and k in torch, or a pair (φ_q, φ_k) (e.g. a
            :class:`~attnrewrite.kernels.linear.stateful_maps.LinearSiteState`'s maps).
        eps: added to the normaliser.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.
    """
    if not isinstance(feature_map, str):
        phi_q, phi_k = feature_map if isinstance(feature_map, tuple) else (feature_map, feature_map)
        q = q if scale is None else q * scale
        q, k, feature_map, scale = phi_q(q), phi_k(k), "identity", None
    return torch.ops.attnrewrite.linear_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                  feature_map=feature_map, eps=eps)


# --------------------------------------------------------------------------- the kind


def _key_padding_shape(term) -> bool:
    """True when a mask term is broadcastable from [B, 1, 1, Tk] (one value per key)."""
    from attnrewrite.rewriter.canonical import steps_shape

    shape = steps_shape(hinted_shape(term.node), term.steps)
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if getattr(spec, "score_mod", None) is not None:
        return "a score modification cannot be applied to linear attention"
    if spec.dropout_p > 0:
        return f"dropout on the attention probabilities (p={spec.dropout_p:g}): linear attention has none"
    for term in spec.bias:
        if term.kind == "add":
            return "an additive bias on the scores (a linear kind has no scores to add it to)"
        if not _key_padding_shape(term):
            return "a mask that varies across queries or heads (only causal and key-padding masks are honoured)"
    if spec.causal and hinted_shape(spec.q.node)[-2:-1] != hinted_shape(spec.k.node)[-2:-1]:
        q_len = hinted_shape(spec.q.node)
        k_len = hinted_shape(spec.k.node)
        if q_len is not None and k_len is not None:
            return "causal attention with more keys than queries (decode against a cache needs the state)"
    return None


def _site_scale(call: AttentionCall, options: dict[str, Any]):
    """q's scale before φ: none by default (see :func:`linear_attention`), the site's with use_scale."""
    if not options["use_scale"]:
        return call.q, None
    scale = call.scale if call.scale is not None else 1.0 / (call.q.shape[-1] ** 0.5)
    return call.scaled_q(), scale


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    q, scale = _site_scale(call, options)
    feature_map, k = options["feature_map"], call.k
    if feature_map in STATEFUL_MAPS:
        features = state(q if scale is None else q * scale, k)
        q, k, feature_map, scale = features[0], features[1], "identity", None
    return torch.ops.attnrewrite.linear_attention(q, k, call.v, call.attn_mask, 0.0, call.is_causal, scale,
                                                  call.enable_gqa, feature_map=feature_map, eps=options["eps"])


def weights(call: AttentionCall, options: dict[str, Any], state) -> Any:
    """The linear kind's attention weights φ(q_i)·φ(k_j) / Σ_j (materialised: for returned weights only)."""
    q, scale = _site_scale(call, options)
    feature_map, k = options["feature_map"], call.k
    if feature_map in STATEFUL_MAPS:
        fq, fk = state(q if scale is None else q * scale, k)
    else:
        fq = apply_feature_map(q if scale is None else q * scale, feature_map)
        fk = apply_feature_map(k, feature_map)
    groups = fq.shape[1] // fk.shape[1] if call.enable_gqa else 1
    fk = fk.repeat_interleave(groups, dim=1) if call.enable_gqa else fk
    w = fq @ fk.transpose(-2, -1)
    if call.is_causal:
        w = w.tril()
    if call.attn_mask is not None:
        w = w * call.attn_mask
    return w / (w.sum(-1, keepdim=True) + options["eps"])


def make_state(spec: AttentionSpec, options: dict[str, Any]):
    if options["feature_map"] not in STATEFUL_MAPS:
        return None
    q_shape, k_shape = hinted_shape(spec.q.node), hinted_shape(spec.k.node)
    from attnrewrite.rewriter.canonical import steps_shape

    q_shape, k_shape = steps_shape(q_shape, spec.q.steps), steps_shape(k_shape, spec.k.steps)
    scale = spec.scale if spec.scale is not None else q_shape[-1] ** -0.5
    return make_site_state(options["feature_map"], q_shape[-3], k_shape[-3], q_shape[-1], scale, spec.module_path,
                           options["features"], options["seed"])


def _check_options(options: dict[str, Any]) -> None:
    if options["feature_map"] not in FEATURE_MAPS + STATEFUL_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS + STATEFUL_MAPS}, got {options['feature_map']!r}")


KIND = register(Kind(
    name="linear",
    emit=emit,
    supports=lambda spec, options: (_check_options(options), supports(spec, options))[1],
    options={"feature_map": "elu", "eps": 1e-6, "use_scale": False, "features": None, "seed": 0},
    description="linear attention φ(q)·Σφ(k)ᵀv / φ(q)·Σφ(k) (elu, relu, favor, hedgehog feature maps)",
    weights=weights,
    make_state=make_state,
))
