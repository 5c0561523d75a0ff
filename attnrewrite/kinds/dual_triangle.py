"""The ``dual_triangle`` kind: how the rewriter uses ``attnrewrite::dual_triangle_attention``
(:mod:`attnrewrite.kernels.dual_triangle.public`).

Dual Triangle Attention turns a bidirectional encoder's self-attention into two causal halves: the
first ``past_heads`` heads (default half of them) see j ≤ i, the others j ≥ i.  The model has to be
trained or fine-tuned afterwards.  A site can be rewritten when it is bidirectional self-attention
(queries and keys of one sequence); its masks (padding, additive biases), grouped-query heads,
dropout and a score modification with a program (soft-capping and chains of elementwise steps,
:mod:`attnrewrite.ir.score_program`; applied before the mask and each triangle's softmax) are kept.
Sites that are already causal are skipped: one triangle is all they have.
"""

from __future__ import annotations

from typing import Any

import torch

import attnrewrite.kernels.dual_triangle.public  # noqa: F401 — registers attnrewrite::dual_triangle_attention
from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.score_program import score_program
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kinds.options import integer
from attnrewrite.kinds.registry import Kind, register
from attnrewrite.patterns.layout import ref_shape


def supports(spec: AttentionSpec, options: dict[str, Any]) -> str | None:
    if spec.causal:
        return ("the site is already causal (keys j ≤ i): dual-triangle attention splits a bidirectional "
                "site's heads into past and future triangles")
    q_shape, k_shape = ref_shape(spec.q), ref_shape(spec.k)
    if q_shape[-2] != k_shape[-2]:
        return f"queries and keys differ in length ({q_shape[-2]} vs {k_shape[-2]}): cross-attention, not one sequence"
    past_heads, heads = options["past_heads"], q_shape[-3]
    if past_heads is not None and isinstance(heads, int) and past_heads > heads:
        return f"past_heads={past_heads} exceeds the site's {heads} query heads"
    return score_program(spec.score_mod)[1]


def emit(call: AttentionCall, options: dict[str, Any], state) -> Any:
    return torch.ops.attnrewrite.dual_triangle_attention(call.scaled_q(), call.k, call.v, call.attn_mask,
                                                         call.dropout_p, False, call.scale, call.enable_gqa,
                                                         past_heads=options["past_heads"], score_mod=call.score_program)


KIND = register(Kind(
    name="dual_triangle",
    emit=emit,
    supports=supports,
    options={"past_heads": integer(None, minimum=0, optional=True)},  # None: half of the query heads
    score_mod=True,  # applies call.score_program when the modification has one (supports says why not)
    description="dual-triangle attention: the first heads see j ≤ i, the others j ≥ i (softmax in each)",
    expected_skips={target: "already causal" for target in ("llama", "gpt2-eager", "gpt2-sdpa")},
))
