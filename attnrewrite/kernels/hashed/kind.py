"""The ``hashed`` kind: its public operator and how the rewriter uses it.

Hashed attention (after DASH-KV) gives queries and keys binary codes from two projections
(asymmetric), and lets each query attend — exact softmax — only to the first ``sinks`` keys, the
last ``window`` keys and the ``top_k`` other keys whose codes agree best with its own.  Decoding
stores the keys' codes bit-packed next to the keys and values (:class:`attnrewrite.HashedCache`):
a step scores all T keys with XOR/popcount on T·bits/8 bytes per head and then reads only the
selected keys and values.

A site can be rewritten to ``hashed`` when it is causal self-attention whose other mask parts are
the same for every head (bool masks and additive biases are honoured: the selection never picks a
masked key, and a bias is added to the selected keys' scores), without dropout or a score
modification; other sites are skipped with the reason.  Returned attention weights are not
supplied (such sites are skipped).
"""

from __future__ import annotations

from typing import Any

import torch

from attnrewrite.kernels.causal_site import causal_self_attention_reason, term_shape
from attnrewrite.kernels.checks import check_int_options
from attnrewrite.kinds import Kind, register
from attnrewrite.rewriter.canonical import AttentionCall
from attnrewrite.rewriter.spec import AttentionSpec

from .op import HASHES, hashed_attention_op  # noqa: F401  (registers the ops)
from .state import HashProjections


def hashed_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
                     projections: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
    """Hashed attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Each query attends (exact softmax of scale·q·k + bias) to its first ``sinks`` and last ``window``
    visible keys and to the ``top_k`` other visible keys whose binary codes agree best with its own;
    the query heads of a grouped-query group share one selection (agreement summed over the group).
    Semantics in full: :mod:`attnrewrite.kernels.hashed.reference`.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; fp16, bf16, fp32 or fp64.
        attn_mask: bool (True = may attend) or float (added to the scores; entries ≤ −10⁴ exclude a
            key), broadcastable to [B, 1, Tq, Tk]: one mask for every head.
        dropout_p: must be 0.
        is_causal: key j ≤ query i (needs Tq == Tk).  A decoding query comes after every key: False.
        scale: score scale, default 1/√D.
        enable_gqa: allow Hq to be a multiple of Hkv.
        bits: code length, a multiple of 8.
        top_k, window, sinks: how many keys are chosen by their codes, how many recent ones and how
            many first ones are always kept.
        hash: ``"random"`` — Gaussian hyperplanes drawn from ``seed``, the same for queries and keys
            (no training) — or ``"learned"`` with ``projections=(P_q [Hq, D, bits], P_k [Hkv, D, bits])``.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.  Gradients reach q, the selected keys and their values (and the
        projections, by a straight-through estimate, when learned).
    """
    q_projection, k_projection = projections if projections is not None else (None, None)
    return torch.ops.attnrewrite.hashed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                  bits=bits, top_k=top_k, window=window, sinks=sinks, hash=hash,
                                                  q_projection=q_projection, k_projection=k_projection, seed=seed)


# --------------------------------------------------------------------------- the kind


def check_options(options: dict[str, Any]) -> None:
    check_int_options(options, {"bits": 8, "top_k": 0, "window": 0, "sinks": 0, "seed": 0})
    if options["bits"] % 8:
        raise ValueError(f"option bits must be a multiple of 8, got {options['bits']}")
    if options["hash"] not in HASHES:
        raise ValueError(f"option hash must be one of {HASHES}, got {options['hash']!r}")


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    check_options(options)
    reason = causal_self_attention_reason(spec, "hashed")
    if reason is not None:
        return reason
    for term in spec.bias:
        if term_shape(term)[1] != 1:
            return "a mask that differs across heads (the heads of a group share one selection of keys)"
    return None


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    q_projection = k_projection = None
    if options["hash"] == "learned":
        projections = state(call.q)
        q_projection, k_projection = projections[0], projections[1]
    return torch.ops.attnrewrite.hashed_attention(
        call.scaled_q(), call.k, call.v, call.attn_mask, 0.0, True, call.scale, call.enable_gqa,
        bits=options["bits"], top_k=options["top_k"], window=options["window"], sinks=options["sinks"],
        hash=options["hash"], q_projection=q_projection, k_projection=k_projection, seed=options["seed"])


def make_state(spec: AttentionSpec, options: dict[str, Any]):
    if options["hash"] != "learned":
        return None
    from attnrewrite.patterns.layout import ref_shape

    q_shape, k_shape = ref_shape(spec.q), ref_shape(spec.k)
    return HashProjections(q_shape[-3], k_shape[-3], q_shape[-1], options["bits"], options["seed"])


KIND = register(Kind(
    name="hashed",
    emit=emit,
    supports=supports,
    options={"bits": 64, "top_k": 256, "window": 64, "sinks": 4, "hash": "random", "seed": 0},
    description="hashed attention: exact softmax over sinks, a recent window and the top-k keys by code agreement",
    make_state=make_state,
))
