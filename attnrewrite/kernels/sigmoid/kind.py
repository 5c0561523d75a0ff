"""The ``sigmoid`` kind: its public operator and how the rewriter uses it.

``attnrewrite::sigmoid_attention`` has SDPA's signature plus ``bias`` (None means "auto").  It is
``CompositeImplicitAutograd`` over :func:`attnrewrite.kernels.sigmoid.sigmoid_attention`, so it
decomposes into the kernel ops underneath — the Triton ``triton_op``s on CUDA (visible to
inductor, with their fake implementations and autograd), the chunked torch path elsewhere.

Sigmoid attention honours every mask a softmax site can have (bool, additive, causal, padding),
grouped-query attention, dropout and returned weights, so every certified site can be rewritten.
"""

from __future__ import annotations

from typing import Any

import torch

from attnrewrite.kinds import Kind, register
from attnrewrite.rewriter.canonical import AttentionCall
from attnrewrite.rewriter.spec import AttentionSpec

from .api import sigmoid_attention as _sigmoid_attention

_lib = torch.library.Library("attnrewrite", "FRAGMENT")
_lib.define(
    "sigmoid_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False, float? bias=None) -> Tensor")


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, bias=None):
    return _sigmoid_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              bias="auto" if bias is None else bias)


_lib.impl("sigmoid_attention", _impl, "CompositeImplicitAutograd")


def sigmoid_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                      bias: str | float = "auto") -> torch.Tensor:
    """Sigmoid attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    out_i = Σ_j sigmoid(scale·q_i·k_j + attn_mask_ij + b)·v_j over the keys query i may see; masked
    and padded keys contribute exactly 0, and a query that sees no key gets 0.

    Args:
        q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa: as in SDPA (``is_causal`` may be
            combined with ``attn_mask``; Tq may differ from Tk).
        bias: ``"auto"``: b = −log(n), n = the number of keys of that sequence some query may see
            under a bool mask (padding-aware; float masks and causality do not change n); a float
            sets b.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.
    """
    if not (bias == "auto" or isinstance(bias, (int, float)) and not isinstance(bias, bool)):
        raise ValueError(f"bias must be 'auto' or a number, got {bias!r}")
    return torch.ops.attnrewrite.sigmoid_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                   bias=None if bias == "auto" else float(bias))


# --------------------------------------------------------------------------- the kind


def _bias(options: dict[str, Any]) -> float | None:
    return None if options["bias"] == "auto" else float(options["bias"])


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    return torch.ops.attnrewrite.sigmoid_attention(call.scaled_q(), call.k, call.v, call.attn_mask, call.dropout_p,
                                                   call.is_causal, call.scale, call.enable_gqa, bias=_bias(options))


def weights(call: AttentionCall, options: dict[str, Any], state) -> Any:
    """sigmoid(scale·q·kᵀ + mask + b), 0 where a key is masked: [B, Hq, Tq, Tk] (returned weights only).

    Written with tensor ops and static flags only, so it records into a graph as it runs eagerly.
    """
    q, k = call.scaled_q(), call.k
    if call.enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale
    keep = torch.ones_like(scores, dtype=torch.bool)
    if call.attn_mask is not None:
        if call.bool_mask:
            keep = keep & call.attn_mask
        else:
            scores = scores + call.attn_mask
    if options["bias"] == "auto":  # n: keys some query may see under a bool mask (causality excluded)
        b = -keep.any(dim=-2).sum(dim=-1, keepdim=True).clamp(min=1).float().log().unsqueeze(-1)
    else:
        b = float(options["bias"])
    if call.is_causal:
        keep = keep & torch.ones_like(keep[0, 0]).tril()
    return torch.sigmoid(scores + b).masked_fill(~keep, 0.0).to(q.dtype)


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if options["bias"] != "auto" and not isinstance(options["bias"], (int, float)):
        raise ValueError(f"option bias must be 'auto' or a number, got {options['bias']!r}")
    if getattr(spec, "score_mod", None) is not None:
        return "a score modification (not applied by the sigmoid kernels yet)"
    return None


KIND = register(Kind(
    name="sigmoid",
    emit=emit,
    supports=supports,
    options={"bias": "auto"},
    description="sigmoid attention Σ sigmoid(s·q·kᵀ + b)·v, b = −log(n) by default",
    weights=weights,
))
