"""What the decode kinds (``summary``, ``hashed``) ask of a site before they rewrite it.

Both exist for causal language models: they rewrite causal self-attention (one sequence, queries
and keys of the same length, the causal triangle proven by the resolver) and skip everything
else with the reason.  A score modification, dropout on the probabilities, or a mask the kind
cannot honour is also a reason.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from attnrewrite.ir.canonical import steps_shape
from attnrewrite.ir.capture import hinted_shape
from attnrewrite.ir.score_program import score_program
from attnrewrite.ir.spec import AttentionSpec, MaskTerm
from attnrewrite.patterns.layout import ref_shape


def term_shape(term: MaskTerm) -> tuple[int, ...]:
    """The 4-d shape a mask term broadcasts from ([B, H, Tq, Tk], leading ones added)."""
    shape = steps_shape(hinted_shape(term.node), term.steps)
    return (1,) * (4 - len(shape)) + tuple(shape)


def applied_score_mod(spec: AttentionSpec, options: dict[str, Any]) -> tuple[str | None, AttentionSpec]:
    """For a kind whose op applies a site's score modification (summary, hashed): ``(why not, spec)`` when it
    cannot — no program for it (one that reads a tensor) — else ``(None, the spec with the modification taken
    as applied)``, to be checked as any other site.  Every program compiles into the Triton kernels (a fixed
    function or a generated one), so ``impl='triton'`` is no reason."""
    if spec.score_mod is None:
        return None, spec
    _, reason = score_program(spec.score_mod)
    if reason is not None:
        return reason, spec
    return None, replace(spec, score_mod=None)


def causal_self_attention_reason(spec: AttentionSpec, kind: str) -> str | None:
    """None for causal self-attention without score modification or dropout; else why not."""
    if getattr(spec, "score_mod", None) is not None:
        return f"a score modification cannot be applied to {kind} attention"
    if not spec.causal:
        return (f"not causal self-attention (bidirectional or cross-attention): {kind} attention is for causal "
                "language models")
    t_q, t_k = ref_shape(spec.q)[-2], ref_shape(spec.k)[-2]
    if t_q != t_k:
        return f"queries and keys differ in length ({t_q} vs {t_k}): attention over a cache, not one sequence"
    if spec.dropout_p > 0:
        return f"dropout on the attention probabilities (p={spec.dropout_p:g}): {kind} attention has none"
    return None
