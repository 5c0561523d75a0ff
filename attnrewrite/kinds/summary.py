"""The ``summary`` kind: how the rewriter uses ``attnrewrite::summary_attention`` (:mod:`attnrewrite.kernels.summary.public`).

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
key padding only (no additive bias, no mask varying across queries or heads), without dropout; a score
modification with a program (:mod:`attnrewrite.ir.score_program`: soft-capping, chains of elementwise
steps) is applied to every score, the window's and the summaries', before the softmax (by the Triton kernels,
a chain of nonlinear steps through a generated score function, or by the torch path), and a decoding step
through ``SummaryCache`` runs the site's own code, which
applies the same modification to the same scores.  Other sites are skipped with the reason.  Returned attention weights are not
supplied (such sites are skipped).
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.summary.public  # noqa: F401 — registers attnrewrite::summary_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kernels.summary.op import SUMMARIES
from attnrewrite.kernels.summary.state import SummaryPooling
from attnrewrite.kinds.causal import applied_score_mod, causal_self_attention_reason, term_shape
from attnrewrite.kinds.options import impl_choice, integer, one_of
from attnrewrite.kinds.registry import Kind, register


# --------------------------------------------------------------------------- the kind


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    reason, spec = applied_score_mod(spec, options)  # applied by the op; the rest as for any site
    if reason is not None:
        return reason
    reason = causal_self_attention_reason(spec, "summary")
    if reason is not None:
        return reason
    for term in spec.bias:
        if term.kind == "add":
            return ("an additive bias on the scores (a chunk summary has no single score to add it to; a relative "
                    "position bias R[h, j − i] or ALiBi needs each key's position, which a summary of a chunk lacks)")
        shape = term_shape(term)
        if shape[1] != 1 or shape[2] != 1:
            return "a mask that varies across queries or heads (only causal and key-padding masks are honoured)"
    return None


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    summary_query = state(call.k) if options["summary"] == "learned" else None
    return torch.ops.attnrewrite.summary_attention(
        call.scaled_q(), call.k, call.v, call.attn_mask, 0.0, True, call.scale, call.enable_gqa,
        chunk_size=options["chunk_size"], window_chunks=options["window_chunks"], summary=options["summary"],
        summary_query=summary_query, score_mod=call.score_program, impl=options["impl"])


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
    options={
        "chunk_size": integer(8, minimum=1),
        "window_chunks": integer(128, minimum=0),
        "summary": one_of("mean", SUMMARIES),
        "impl": impl_choice("auto"),
    },
    description="summary attention: a window of chunks in full, one summary key/value per older chunk",
    make_state=make_state,
    expected_skips={target: "not causal self-attention" for target in ("bert", "vit", "singlecell")},
    example_options={"chunk_size": 2, "window_chunks": 1},
    score_mod=True,  # applies call.score_program when the modification has one (supports says why not)
))
