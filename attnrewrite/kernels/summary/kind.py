"""The ``summary`` kind: its public operator and how the rewriter uses it.

Summary attention (after Kwai's Summary Attention, KSA) cuts the sequence into chunks of
``chunk_size`` tokens.  A token in chunk c attends exactly (softmax) to the tokens of chunks
c − ``window_chunks`` … c (causal inside c) and, for every older chunk, to that chunk's one summary
key and value only.  ``summary="mean"`` summarises a chunk by the mean of its keys and of its
values (no training); ``summary="learned"`` by attention pooling with one learned query per layer
and key/value head (:class:`~attnrewrite.kernels.summary.state.SummaryPooling`, attached by
:func:`attnrewrite.convert`, initialised to the mean).  Decoding keeps the window in full and one
summary per older chunk: :class:`attnrewrite.SummaryCache`, O(window + T / chunk_size) per layer.

How this differs from KSA's summary tokens.  In KSA the summaries are *tokens*: learned summary
embeddings are inserted into the input sequence, one per chunk, and travel through the whole
network like any token — each layer computes their queries, keys and values from their own
hidden state, they attend (to their chunk), go through every MLP and the residual stream, and the
model is trained with them, so a summary at layer l carries what layers below made of the chunk.
Here nothing is added to the sequence: a summary exists only inside one attention site, as a
pooling of that site's own keys and values over the chunk (a fixed mean, or softmax weights from
one learned query per kv head), computed at every layer independently.  There is no summary
hidden state, position, MLP or residual path, the model's token sequence and outputs keep their
shape, and an existing model can be rewritten without training (the quality of a mean summary is
what ``bench/quality_decode_kinds.py`` measures).

A site can be rewritten to ``summary`` when it is causal self-attention whose other mask parts are
key padding only (no additive bias, no mask varying across queries or heads), without dropout or a
score modification; other sites are skipped with the reason.  Returned attention weights are not
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

from .op import SUMMARIES, summary_attention_op  # noqa: F401  (registers the ops)
from .state import SummaryPooling


def summary_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, *,
                      chunk_size: int = 8, window_chunks: int = 128, summary: str = "mean",
                      summary_query: torch.Tensor | None = None) -> torch.Tensor:
    """Summary attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Query i in chunk c = i // chunk_size attends (exact softmax of scale·q·k) to the tokens of chunks
    c − window_chunks … c (j ≤ i) and to one summary key/value of each older chunk.  With
    ``is_causal=False`` it sees chunks c − window_chunks … c + window_chunks in full and the
    summaries of all other chunks.  Semantics in full: :mod:`attnrewrite.kernels.summary.reference`.

    Args:
        q: [B, Hq, T, D]; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] — one sequence (Tq == Tk); fp16, bf16,
            fp32 or fp64, one dtype and device.  Decoding goes through :class:`attnrewrite.SummaryCache`.
        attn_mask: None or a key-padding mask broadcastable from [B, 1, 1, T]: bool (True = real key)
            or float holding 0 / -inf.  Padded keys are left out of the window and of the summaries.
        dropout_p: must be 0.
        is_causal: True (default) for language models.
        scale: score scale, default 1/√D.
        enable_gqa: allow Hq to be a multiple of Hkv.
        chunk_size: tokens per chunk (C).
        window_chunks: full chunks seen before the current one (W); the window is W·C to W·C + C − 1 tokens.
        summary: ``"mean"``, or ``"learned"`` with ``summary_query`` [Hkv, D], the pooling queries
            (e.g. ``attention.attnrewrite_summary.query`` after :func:`attnrewrite.convert`).

    Returns:
        [B, Hq, T, Dv] in q's dtype.  Differentiable in q, k, v and ``summary_query``.
    """
    return torch.ops.attnrewrite.summary_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                   chunk_size=chunk_size, window_chunks=window_chunks,
                                                   summary=summary, summary_query=summary_query)


# --------------------------------------------------------------------------- the kind


def check_options(options: dict[str, Any]) -> None:
    check_int_options(options, {"chunk_size": 1, "window_chunks": 0})
    if options["summary"] not in SUMMARIES:
        raise ValueError(f"option summary must be one of {SUMMARIES}, got {options['summary']!r}")


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    check_options(options)
    reason = causal_self_attention_reason(spec, "summary")
    if reason is not None:
        return reason
    for term in spec.bias:
        if term.kind == "add":
            return "an additive bias on the scores (a chunk summary has no single score to add it to)"
        shape = term_shape(term)
        if shape[1] != 1 or shape[2] != 1:
            return "a mask that varies across queries or heads (only causal and key-padding masks are honoured)"
    return None


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    summary_query = state(call.k) if options["summary"] == "learned" else None
    return torch.ops.attnrewrite.summary_attention(
        call.scaled_q(), call.k, call.v, call.attn_mask, 0.0, True, call.scale, call.enable_gqa,
        chunk_size=options["chunk_size"], window_chunks=options["window_chunks"], summary=options["summary"],
        summary_query=summary_query)


def make_state(spec: AttentionSpec, options: dict[str, Any]):
    if options["summary"] != "learned":
        return None
    from attnrewrite.patterns.layout import ref_shape

    k_shape = ref_shape(spec.k)
    return SummaryPooling(k_shape[-3], k_shape[-1])


KIND = register(Kind(
    name="summary",
    emit=emit,
    supports=supports,
    options={"chunk_size": 8, "window_chunks": 128, "summary": "mean"},
    description="summary attention: a window of chunks in full, one summary key/value per older chunk",
    make_state=make_state,
))
