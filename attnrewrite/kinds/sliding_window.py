"""The ``sliding_window`` kind: how the rewriter uses ``attnrewrite::sliding_window_attention``
(:mod:`attnrewrite.kernels.sliding_window.public`).

Exact softmax over each query's last ``window`` keys (itself included) plus the first ``sinks`` keys;
a bidirectional site gets the symmetric window |i − j| < window (``bidirectional="symmetric"``) or is
skipped (``"skip"``).  The site's own mask is kept and restricts the window further: the rewritten op
sees a key only when the site's mask *and* the window allow it, so a site that already has a sliding
window (Mistral, Gemma-2's local layers) keeps the smaller of the two — exactly, by construction, for
any mask the resolver proved, with nothing to recognise about that mask.  Grouped-query heads and
dropout are kept, and a score modification with a program (:mod:`attnrewrite.ir.score_program`:
soft-capping and chains of elementwise steps) is applied before the mask, by the Triton kernels (a chain
of nonlinear steps through a generated score function, as sigmoid's) or the blockwise torch path
(``impl="auto"`` picks as for an unmodified call).  A bias proven to be ALiBi (slope_h · (j − i) or slope_h · |j − i|) is computed
over the band from the slopes, and a relative bias proven to be R[h, j − i] (T5) is read from the table R by
distance on the band and the sinks (torch paths and Triton kernels), never read as a [B, H, T, T] mask.  Sites whose queries and keys differ in length (cross-attention, attention over a
cache) are skipped: the window is over positions of one sequence.  Returned attention weights are
not supplied (such sites are skipped).
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.sliding_window.public  # noqa: F401 — registers attnrewrite::sliding_window_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.score_program import score_program
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kinds.options import integer, one_of
from attnrewrite.kinds.registry import Kind, register
from attnrewrite.patterns.layout import ref_shape


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    t_q, t_k = ref_shape(spec.q)[-2], ref_shape(spec.k)[-2]
    if t_q != t_k:
        return (f"queries and keys differ in length ({t_q} vs {t_k}): a window over the positions of one sequence "
                "cannot be placed")
    if not spec.causal and options["bidirectional"] == "skip":
        return "bidirectional attention, and bidirectional='skip' was asked (use 'symmetric' for |i − j| < window)"
    return score_program(spec.score_mod)[1]


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    return torch.ops.attnrewrite.sliding_window_attention(call.scaled_q(), call.k, call.v, call.attn_mask,
                                                          call.dropout_p, call.is_causal, call.scale,
                                                          call.enable_gqa, window=options["window"],
                                                          sinks=options["sinks"], score_mod=call.score_program,
                                                          position_slopes=call.position_slopes, position=call.position)


KIND = register(Kind(
    name="sliding_window",
    emit=emit,
    supports=supports,
    options={
        "window": integer(256, minimum=1),
        "sinks": integer(0, minimum=0),
        "bidirectional": one_of("symmetric", ("symmetric", "skip")),
    },
    description="sliding-window attention: exact softmax over the last `window` keys (+ `sinks` first keys)",
    example_options={"window": 4, "sinks": 1},
    score_mod=True,  # applies call.score_program when the modification has one (supports says why not)
    position_bias=True,  # computes ALiBi (call.position_slopes) over the band instead of reading a [T, T] mask
    shift_invariant=True,  # a softmax over each query's keys: an ALiBi offset's row constant cancels
    relative_bias=True,  # reads a relative bias R[h, j − i] (T5) on the band (torch and Triton; position="relative")
))
