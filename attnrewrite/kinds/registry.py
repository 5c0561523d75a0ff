"""The registry of attention kinds: what a certified site can be rewritten *to*.

A kind says which specs it can honour (and why not), how to emit its operator from the
canonical call, and which options it takes. Kinds are looked up by name (``to="softmax"``);
the package's own are listed in :data:`KIND_MODULES`, others come through the entry-point
group ``attnrewrite.kinds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.spec import AttentionSpec
from attnrewrite.kinds.options import Option, check_options


@dataclass(frozen=True)
class Kind:
    """One attention kind.

    Attributes:
        name: the ``to=`` name.
        emit: ``emit(call, options, state) -> out`` — calls the kind's op on the canonical
            [B, H, T, D] arguments (tensors or FX proxies) and returns [B, Hq, Tq, Dv]. ``state``
            is the site's state module as a callable (see ``make_state``), or None.
        supports: ``supports(spec, options) -> reason | None`` — None when the kind can honour
            the site exactly as specified (mask, causality, dropout, score modification).
        options: the options the kind accepts: name -> :class:`~attnrewrite.kinds.options.Option`
            (default, accepted values, check). :meth:`check_options` checks a user's values.
        description: one line for reports and errors.
        weights: how the kind supplies attention weights when a site's probabilities are used
            elsewhere (``output_attentions``): ``"original"`` keeps the site's own computation
            (the exact kind), a callable ``weights(call, options, state) -> [B, Hq, Tq, Tk]``
            computes the kind's own, None means it cannot (such sites are skipped).
        make_state: ``make_state(spec, options) -> nn.Module | None`` — the per-site module of a
            kind with parameters or fixed random draws (learned feature maps, summary queries,
            hash projections) for these options; None when the options need none. States are
            attached to the model by :func:`attnrewrite.convert` before compiling.
        score_mod: True when ``emit`` applies a site's score modification (an elementwise function of
            the scores, e.g. soft-capping) before its own normalisation: ``call.score_mod`` replayed
            from the graph (softmax), or ``call.score_program`` passed to the kind's op (sigmoid,
            sliding_window), whose ``supports`` then refuses modifications without a program
            (:func:`attnrewrite.ir.score_program.score_program` says why).  Sites with a score
            modification are skipped, with that reason, for kinds that do not.
        position_bias: True when ``emit`` computes a position bias from ``call.position_slopes`` and
            ``call.position`` (ALiBi: slope_h · (j − i), or slope_h · |j − i|) instead of reading it from
            ``attn_mask``; for such a kind the pipeline turns an additive mask term proven to be one into
            a ``position`` term (:func:`attnrewrite.patterns.masks.as_position_bias`), and the rewrite
            passes it apart.  For every other kind the term stays in ``attn_mask``.
        shift_invariant: True when the kind normalises each query's scores with a softmax over the keys it
            sees, so a constant added to all of them changes nothing: the shift of a position bias whose
            queries are counted from an offset (slope_h · (j − i − start)) is then left out instead of added
            to ``attn_mask`` as a [1, Hq, 1, 1] constant (:func:`attnrewrite.ir.canonical.attention_call`).
            False (the safe default) for any other normalisation (sigmoid).  A kind that is not shift-invariant
            is also certified on each site's scores (:func:`attnrewrite.rewriter.certify.certify`'s score
            probes): the output comparison cannot see a constant per query that the spec's bias lost or gained,
            and such a kind would not ignore it.
        relative_bias: True when ``emit`` also reads a relative position bias R[h, j − i] (T5's bucketed
            bias, a table indexed by a clamped distance) as ``call.position_slopes`` = R [Hq or 1,
            Tq + Tk − 1] with ``call.position == "relative"``, instead of a [Tq, Tk] ``attn_mask``
            (:func:`attnrewrite.patterns.relative.as_relative_bias`); needs ``position_bias``.
        sink_logits: what the kind does with a site's learned sink logits (gpt-oss's attention sinks: one more key
            per head whose score is a learned ``sink[h]`` and whose value is 0, ``call.sink_logits``): ``"exact"`` —
            ``emit`` honours them (softmax: they add exp(sink[h]) to each row's denominator); ``"dropped"`` — the
            kind runs the site without them, said in the site's notes: its rows have no softmax denominator for
            a zero-value key to add to (sigmoid: sigmoid(sink)·0 adds nothing; linear: a logit has no key for a
            feature map, and nothing a feature map computes can carry one), so a model rewritten to it is retrained
            anyway; None (the safe default) — sites with sink logits are skipped, with the reason.
        expected_skips: data for the tests generated from the registry (``tests/kinds``): the
            reference targets (:mod:`attnrewrite.testing.targets`) whose attention this kind cannot
            honour, target name -> a fragment of the skip reason.  A target not listed must be
            rewritten at every site.
        example_options: options under which the kind differs from softmax on the tests' short
            sequences (about 12 tokens); the defaults when empty.
    """

    name: str
    emit: Callable[[AttentionCall, dict[str, Any], Any], Any]
    supports: Callable[[AttentionSpec, dict[str, Any]], str | None]
    options: dict[str, Option] = field(default_factory=dict)
    description: str = ""
    weights: Callable[[AttentionCall, dict[str, Any], Any], Any] | str | None = None
    make_state: Callable[[AttentionSpec, dict[str, Any]], Any] | None = None
    score_mod: bool = False
    position_bias: bool = False
    shift_invariant: bool = False
    relative_bias: bool = False
    sink_logits: str | None = None
    expected_skips: dict[str, str] = field(default_factory=dict)
    example_options: dict[str, Any] = field(default_factory=dict)

    def check_options(self, given: Mapping[str, Any], passes: tuple[str, ...] = ()) -> dict[str, Any]:
        """The kind's full options: defaults, then ``given``, each value checked (ValueError/TypeError
        naming the option, the value and what is accepted). ``passes``: other valid names, for the error."""
        return check_options(self.name, self.options, given, passes)

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry.

    Raises:
        ValueError: another kind of the same name is registered already.
    """
    existing = _KINDS.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"an attention kind named {kind.name!r} is registered already "
                         f"({existing.description or existing.emit.__module__})")
    _KINDS[kind.name] = kind
    return kind


#: The package's kinds, one adapter module each; imported on first lookup.
KIND_MODULES = ("attnrewrite.kinds.softmax", "attnrewrite.kinds.sigmoid", "attnrewrite.kinds.linear",
                "attnrewrite.kinds.summary", "attnrewrite.kinds.hashed", "attnrewrite.kinds.dual_triangle",
                "attnrewrite.kinds.sliding_window")
#: Other packages add kinds through this entry-point group (each entry names a module to import).
ENTRY_POINT_GROUP = "attnrewrite.kinds"


_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import importlib
    from importlib.metadata import entry_points

    for module in KIND_MODULES:
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    _loaded = True


def get(name: str) -> Kind:
    """The kind called ``name``; a clear error lists the known kinds otherwise."""
    if name not in _KINDS:
        _load_all()
    if name not in _KINDS:
        raise ValueError(f"unknown attention kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    _load_all()
    return sorted(_KINDS)
