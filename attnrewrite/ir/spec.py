"""The one interface between matching and rewriting.

A pattern family turns a match into an :class:`AttentionSpec`: what the site computes, in
terms of existing graph nodes.  Nothing is copied or inserted while matching: tensors are
:class:`TensorRef`s (a node plus the view steps that bring it to [B, H, T, D]) and masks are
:class:`MaskTerm`s.  The rewriter and the certifier both build from the same spec with
:mod:`attnrewrite.ir.canonical`.

One deliberate difference from DESIGN.md's sketch: ``bias`` is a tuple of mask terms rather
than one node.  Keeping the terms apart lets the resolver split a combined mask into its
causal part and its padding part, and lets each kind take the mask in the form it wants
(a bool keep-mask for padding, an additive bias otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.fx as fx

#: A layout step: ("transpose", d0, d1) | ("permute", dims) | ("unsqueeze", d) | ("squeeze", d)
#: | ("reshape", sizes) — sizes may hold graph nodes (symbolic sizes).
Step = tuple


@dataclass(frozen=True)
class TensorRef:
    """``node`` seen through ``steps`` (views only, never copies)."""

    node: fx.Node
    steps: tuple[Step, ...] = ()

    def then(self, *step: Any) -> TensorRef:
        return replace(self, steps=self.steps + (tuple(step),))


@dataclass(frozen=True)
class MaskTerm:
    """One addition to the scores before normalisation, broadcastable to [B, H, Tq, Tk].

    - ``add``: ``+ coeff · node`` (a float bias: padding masks, relative position, ALiBi);
    - ``keep``: keys where the bool ``node`` is False are masked out (True = may attend);
    - ``drop``: keys where the bool ``node`` is True are masked out;
    - ``padding``: an additive ``coeff · node`` whose values are 0 (key kept) or <= :data:`MASKED_SCORE`
      (key masked), taken as the keep-mask ``coeff · node > MASKED_SCORE`` by kinds that have no scores to add
      a bias to.  The values are not assumed: the canonical form checks them on every call
      (:data:`PADDING_GUARD`) and raises if one ever leaves that set;
    - ``position``: a bias computed from positions, ``coeff · slope_h · d(i, j)`` with ``node`` the
      slopes (after ``steps``, broadcastable to [1, Hq, 1, 1]: one per head, or one for all) and
      ``form`` naming d: ``"j-i"`` (ALiBi) or ``"|j-i|"``, i and j the query and key indices; with an
      ``offset``, ``coeff · slope_h · (d(i, j) + shift)``, shift = Σ c · value(node) over the pairs
      (node, c) (node None: the number 1; nodes are sizes, read at run time): queries counted from a
      start (``arange(start, start + Tq)``, ``Tk − Tq`` when decoding).  The shift adds a constant to
      each head's scores, which a kind computes as a [1, Hq, 1, 1] mask, or leaves out when its rows
      are normalised by a softmax (``Kind.shift_invariant``).  Only
      a kind that computes it in its kernels asks for it (``Kind.position_bias``); the matcher proves
      it from the term's graph (:func:`attnrewrite.patterns.masks.as_position_bias`) and the
      certifier compares it, materialised, with the original term;
    - ``relative``: a bias ``coeff · R[h, j − i]``, R a per-head table over the distances (T5's
      relative position bias): ``node`` is the original term and ``relative`` says how R is recomputed
      from the model's own nodes on a 1-D distance vector (:class:`RelativeBias`).  Only a kind that
      reads R (``Kind.relative_bias``) asks for it (:func:`attnrewrite.patterns.relative.as_relative_bias`);
      every other use writes it out as an ``add`` term from R, and the certifier compares that.

    A score set to −∞ or to any constant ≤ :data:`MASKED_SCORE` (−9000; ``masked_fill(m, finfo.min)``,
    ``where(m, s, -1e9)``) counts as masked: the two differ only in rows where every key is
    masked, whose output is meaningless either way (NaN or a uniform average of values).
    """

    kind: Literal["add", "keep", "drop", "padding", "position", "relative"]
    node: fx.Node
    steps: tuple[Step, ...] = ()
    coeff: float = 1.0
    form: str = ""  # ``position`` terms only: "j-i" or "|j-i|"
    offset: tuple[tuple[fx.Node | None, float], ...] = ()  # ``position`` terms only: the shift of d (see above)
    relative: RelativeBias | None = None  # ``relative`` terms only

    def scaled(self, factor: float) -> MaskTerm:
        return (replace(self, coeff=self.coeff * factor) if self.kind in ("add", "padding", "position", "relative")
                else self)


@dataclass(frozen=True)
class RelativeBias:
    """How a ``relative`` mask term — an additive bias proven to be R[h, j − i], a per-head function of the
    distance between key j and query i (T5's bucketed bias, a table indexed by a clamped distance) — is
    recomputed on a 1-D distance vector instead of on the [Tq, Tk] grid.

    - ``leaves``: (node, form, c): graph nodes holding c · (j − i) (``form`` "j-i") or c · |j − i|
      ("|j-i|") on the [.., Tq, Tk] grid, built from ``arange`` alone; the replay gives them c · d (or
      c · |d|) for d = −(Tq − 1) … Tk − 1 laid out as [.., 1, L] (L = Tq + Tk − 1);
    - ``chain``: the nodes from the leaves to the term (the term's ``node`` last), in graph order: each
      elementwise in the positions, a table lookup (``embedding``, ``table[index]``) or a view; they are
      the model's own nodes, replayed (:func:`attnrewrite.ir.canonical.relative_table`), so the table
      (``nn.Embedding`` weights) receives its gradient through R.
    """

    leaves: tuple[tuple[fx.Node, str, float], ...]
    chain: tuple[fx.Node, ...]

    def inputs(self) -> set[fx.Node]:
        """The nodes the replay reads from the graph (the table, scalar operands): the chain's operands that
        are neither chain nodes nor leaves."""
        inside = set(self.chain) | {leaf for leaf, _, _ in self.leaves}
        return {a for n in self.chain for a in n.all_input_nodes if a not in inside}


#: The forms of ``position`` mask terms: d(i, j) for query index i and key index j.
POSITION_FORMS = ("j-i", "|j-i|")


#: Scores at or below this constant are masked keys: BERT's ``(1 − m) · −10000``, ``finfo.min`` and −inf.
#: −9000, not −1e4, because a mask is held in the model's dtype and −1e4 rounds to −9984 in bfloat16 (8
#: significant bits; the spacing there is 64), so a bfloat16 BERT mask would sit above −1e4 and read as a
#: bias.  No real bias is caught by the margin: a score at or below −9000 has weight exactly 0 under
#: softmax and sigmoid in float64, float32, float16 and bfloat16 alike (exp underflows below about −745
#: in float64), so reading it as masked changes only what depends on *which* keys are masked (sigmoid's
#: count, linear's keep-mask, summary's padding, hashed's top-k), never a weight; and −5000 (a mask
#: value of 0.5 in BERT's formula) stays a bias, which the padding guard refuses.
MASKED_SCORE = -9e3

#: The message of the run-time check on ``padding`` mask terms.
PADDING_GUARD = ("attnrewrite: an additive mask taken as key padding by the rewrite holds a value that is "
                 f"neither 0 nor <= {MASKED_SCORE:g} (a masked key: BERT's -1e4 in any float dtype, finfo.min, "
                 "-inf); this attention kind cannot honour it (rewrite to softmax or sigmoid)")


@dataclass(frozen=True)
class ScoreMod:
    """An elementwise, non-affine function of the scores — FlexAttention's ``score_mod``.

    It maps s = scale · q kᵀ ([B, Hq, Tq, Tk]) to the scores the mask terms are added to, before
    the normalisation: Gemma-2's soft-capping ``tanh(s / c) · c`` is the typical one.  It is the
    graph's own code, replayed (see :mod:`attnrewrite.ir.written_out`):

    - ``source``: the score node the first op reads; the replay substitutes the scores for it;
    - ``chain``: the score path from there to the normalisation, as (node, recompute) pairs —
      ``recompute=True`` nodes are evaluated again with their score argument replaced (their other
      arguments are constants or tensors that do not depend on the scores); ``False`` nodes (casts,
      and additions that the spec carries as mask terms) pass the scores through unchanged;
    - ``steps`` / ``back``: layout steps from the canonical 4-D scores to the rank the nodes ran
      at, and back.
    """

    source: fx.Node
    chain: tuple[tuple[fx.Node, bool], ...]
    steps: tuple[Step, ...] = ()
    back: tuple[Step, ...] = ()

    def ops(self) -> list[fx.Node]:
        return [node for node, recompute in self.chain if recompute]

    def describe(self) -> str:
        """The recomputed ops by name, e.g. ``"div·tanh·mul"`` (for reports)."""
        from attnrewrite.ir.capture import canonical_name

        return "·".join(canonical_name(n) or str(n.target) for n in self.ops())


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention site computes: out = softmax(mod(scale · q kᵀ) + bias [+ causal] [, sinks]) · v.

    Fields:
        q, k, v: [B, Hq, Tq, D], [B, Hkv, Tk, D], [B, Hkv, Tk, Dv] after their view steps.
        scale: the constant that multiplies q·kᵀ; None means 1/sqrt(D), as in SDPA.
        q_factors: non-constant factors of the scale — (node, ±1) pairs holding a SymFloat or a
            tensor broadcastable to q (a per-head temperature) — folded into q.
        bias: mask terms added to the scores (empty: none).
        causal: the mask includes the causal (top-left) triangle, proven on the site's shapes.
        kv_groups: Hq // Hkv (grouped-query attention seen through repeat_kv / expand+reshape).
        dropout_p: dropout on the probabilities (0 in eval mode); when the probability is a graph
            value (a SymFloat under ``dynamic=True``), its hint, for decisions and reports.
        dropout_node: that graph value, passed on to the rewritten op (None: ``dropout_p`` is constant).
        score_mod: an elementwise, non-affine function applied to scale · q kᵀ before the mask
            terms and the normalisation (soft-capping), or None.
        weights_escape: the probabilities are also used outside the site (returned weights).
        softmax_dtype: dtype the normalisation ran in (float32 for upcasting models), or None.
        sink_logits: learned sink logits (gpt-oss's attention sinks), or None: one extra key per head whose
            score is ``sink_logits[h]`` and whose value is 0, so it only adds exp(sink_logits[h]) to each row's
            softmax denominator.  After its steps it is broadcastable to [1, Hq, 1, 1] (one logit per head, or
            one for all); the matcher proves it from the graph (``cat([scores, sink], -1)``, softmax, the sink
            column sliced off: :mod:`attnrewrite.patterns.sinks`) and the certifier compares the site with it.
        module_path: qualified name of the module that owns the site.
        pattern: the family that matched (``eager_matmul``, ``sdpa``, ``multihead`` ...).
    """

    q: TensorRef
    k: TensorRef
    v: TensorRef
    scale: float | None = 1.0
    q_factors: tuple[tuple[fx.Node, int], ...] = ()
    bias: tuple[MaskTerm, ...] = ()
    causal: bool = False
    kv_groups: int = 1
    dropout_p: float = 0.0
    dropout_node: fx.Node | None = None
    score_mod: ScoreMod | None = None
    weights_escape: bool = False
    softmax_dtype: torch.dtype | None = None
    sink_logits: TensorRef | None = None
    module_path: str = ""
    pattern: str = ""

    @property
    def has_bias(self) -> bool:
        return bool(self.bias)

    def scale_value(self) -> float | str | None:
        """The scale as a number when it is one, else a description (for reports)."""
        if not self.q_factors:
            return self.scale
        factors = "·".join(f"{n.name}" + ("" if p == 1 else f"^{p}") for n, p in self.q_factors)
        return f"{self.scale if self.scale is not None else '1/sqrt(D)'}·{factors}"

    def summary(self) -> dict[str, Any]:
        """Plain-data view for reports: causal, kv_groups, scale, has_bias, dropout_p ..."""
        return {
            "causal": self.causal,
            "kv_groups": self.kv_groups,
            "scale": self.scale_value(),
            "has_bias": self.has_bias,
            "bias": [t.kind for t in self.bias],
            "dropout_p": self.dropout_p,
            "score_mod": self.score_mod.describe() if self.score_mod is not None else None,
            "weights_escape": self.weights_escape,
            "softmax_dtype": str(self.softmax_dtype).replace("torch.", "") if self.softmax_dtype else None,
            "sink_logits": self.sink_logits is not None,
        }


@dataclass(eq=False)  # compared and hashed by identity: one object per site
class Site:
    """One attention site (or near miss) in a graph, as it moves through the pipeline.

    ``output`` is the node whose uses receive the rewritten result; ``out_steps`` bring the
    canonical [B, Hq, Tq, Dv] result to that node's layout. ``region`` lists the nodes the
    site consists of (q/k/v excluded), in graph order: the certifier evaluates them and the
    rewriter removes those left without users.
    """

    anchor: fx.Node
    pattern: str
    module_path: str = ""
    spec: AttentionSpec | None = None
    output: fx.Node | None = None
    out_steps: tuple[Step, ...] = ()
    region: list[fx.Node] = field(default_factory=list)
    status: Literal["matched", "rewritten", "skipped"] = "matched"
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    kind: str | None = None
    #: rank of the score tensor in the original graph (mask terms broadcast against it)
    score_rank: int = 4
    #: the probabilities node (softmax output) and the steps from [B, Hq, Tq, Tk] to its layout
    probs: fx.Node | None = None
    probs_steps: tuple[Step, ...] = ()
    #: index of this site among the attention sites of its owning module (in graph order)
    ordinal: int = 0
    #: nodes written into masked score positions; each must prove to be <= MASKED_SCORE
    value_checks: list[fx.Node] = field(default_factory=list)

    def skip(self, reason: str) -> Site:
        self.status, self.reason = "skipped", reason
        return self


class NotAttention(Exception):
    """Raised inside a pattern family: this anchor is not an attention site, and why."""


#: Per-site states of kinds with parameters are attached to the site's owner under this prefix.
STATE_PREFIX = "attnrewrite_"


def state_name(kind: str, ordinal: int) -> str:
    """Attribute name of a site's state on its owner: ``attnrewrite_linear``, ``attnrewrite_linear_1`` ..."""
    return f"{STATE_PREFIX}{kind}" + (f"_{ordinal}" if ordinal else "")
