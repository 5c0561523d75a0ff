"""The ``softmax`` kind: exact attention, the kind that proves matching is right.

It honours every certified site: the ``attnrewrite::softmax_attention`` op (SDPA semantics),
or the written-out canonical form when the site has a score modification SDPA cannot carry.
Returned attention weights keep the site's own computation.
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.softmax  # noqa: F401 — registers attnrewrite::softmax_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.written_out import written_out
from attnrewrite.kinds.registry import Kind, register


def exact_attention(call: AttentionCall) -> Any:
    """The exact (softmax) attention of ``call``: the ``attnrewrite::softmax_attention`` op (``sink_softmax_attention``
    for a site with sink logits), or the written-out form when the site has a score modification the op's
    signature cannot carry."""
    if call.score_mod is not None:
        return written_out(call)
    if call.sink_logits is not None:  # gpt-oss's learned sinks: one zero-value key per head, exact
        return torch.ops.attnrewrite.sink_softmax_attention(call.scaled_q(), call.k, call.v, **call.kwargs(),
                                                            sink_logits=call.sink_logits)
    return torch.ops.attnrewrite.softmax_attention(call.scaled_q(), call.k, call.v, **call.kwargs())


def _emit_softmax(call: AttentionCall, options: dict[str, Any], state: Any = None):
    return exact_attention(call)


register(Kind(
    name="softmax",
    emit=_emit_softmax,
    supports=lambda spec, options: None,  # the exact kind honours every certified site
    description="exact softmax attention (F.scaled_dot_product_attention semantics)",
    weights="original",
    score_mod=True,
    shift_invariant=True,  # softmax itself: certified on its output, which a per-query constant does not change
    sink_logits="exact",  # gpt-oss's learned sinks: one zero-value key per head (sink_softmax_attention)
))
