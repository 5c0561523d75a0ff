"""The ``linear`` kind: how the rewriter uses ``attnrewrite::linear_attention``
(:mod:`attnrewrite.kernels.linear.public`).

A site can be rewritten to ``linear`` when its mask is causal and/or key padding (a linear kind
cannot honour a mask that varies across queries, an additive bias, dropout on probabilities or
a score modification): such sites are skipped with the reason.  An additive bias computed from a
[B, Tk] input whose values are 0 or <= MASKED_SCORE = -9000 (BERT's ``(1 - m)·min``; -1e4 in any dtype)
is key padding: the pass hands it over as a ``padding`` term, whose values the rewritten graph checks on every call.
Learned sink logits (gpt-oss) are dropped, said in the site's notes (``Kind.sink_logits``).
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.linear.public  # noqa: F401 — registers attnrewrite::linear_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.capture import hinted_shape
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kernels.linear.feature_maps import FEATURE_MAPS, apply_feature_map
from attnrewrite.kernels.linear.stateful_maps import make_site_state
from attnrewrite.kinds.options import flag, integer, one_of, positive_number
from attnrewrite.kinds.registry import Kind, register

STATEFUL_MAPS = ("favor", "hedgehog")


# --------------------------------------------------------------------------- the kind


def _key_padding_shape(term) -> bool:
    """True when a mask term is broadcastable from [B, 1, 1, Tk] (one value per key)."""
    from attnrewrite.ir.canonical import steps_shape

    shape = steps_shape(hinted_shape(term.node), term.steps)
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if options["feature_map"] == "hedgehog" and options["features"] is not None and options["features"] % 2:
        return f"hedgehog's features must be even (x·W and −x·W, F each); got features={options['features']}"
    if options["key_gate"] and options["feature_map"] != "hedgehog":
        return f"key_gate=True is a part of the hedgehog feature map; feature_map={options['feature_map']!r} has none"
    if options["gate_normaliser"] and not (options["key_gate"] and options["feature_map"] == "hedgehog"):
        return (f"gate_normaliser=True is a part of hedgehog's key gate; give feature_map='hedgehog' and key_gate=True "
                f"with it (got feature_map={options['feature_map']!r}, key_gate={options['key_gate']})")
    if options["feature_bias"] and options["feature_map"] != "hedgehog":
        return (f"feature_bias=True is a part of the hedgehog feature map; feature_map={options['feature_map']!r} "
                f"has none")
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
    from attnrewrite.ir.canonical import steps_shape

    q_shape, k_shape = steps_shape(q_shape, spec.q.steps), steps_shape(k_shape, spec.k.steps)
    scale = spec.scale if spec.scale is not None else q_shape[-1] ** -0.5
    return make_site_state(options["feature_map"], q_shape[-3], k_shape[-3], q_shape[-1], scale, spec.module_path,
                           options["features"], options["seed"], options["key_gate"],
                           options["gate_normaliser"], options["feature_bias"])


KIND = register(Kind(
    name="linear",
    emit=emit,
    supports=supports,
    options={
        "feature_map": one_of("elu", FEATURE_MAPS + STATEFUL_MAPS),
        "eps": positive_number(1e-6),
        "use_scale": flag(False),
        # favor: random features (None: 2·head dim); hedgehog: its 2·F outputs (even; None: 2·head dim)
        "features": integer(None, minimum=1, optional=True),
        "seed": integer(0, minimum=0),  # favor: the draw of the random features; hedgehog: its directions beyond D
        # hedgehog: the keys' features times exp(k·u), u learned per head (HedgehogFeatureMap)
        "key_gate": flag(False),
        # hedgehog with key_gate: the gate's exponent also a·log of the key's softmax normaliser, a learned per head
        "gate_normaliser": flag(False),
        # hedgehog: both maps' logits get a learned bias per head and feature (a learned weight per feature)
        "feature_bias": flag(False),
    },
    description="linear attention φ(q)·Σφ(k)ᵀv / φ(q)·Σφ(k) (elu, relu, favor, hedgehog feature maps)",
    weights=weights,
    make_state=make_state,
    # BERT's (1 - m)·min bias is taken as key padding, its values checked on every call (masks.as_key_padding)
    # learned sink logits (gpt-oss) are a score with no key: no feature map can give them a feature, so they are
    # dropped (said in the site's notes; a model rewritten to linear attention is retrained anyway)
    sink_logits="dropped",
))
