"""The pass, as a list of named stages (read top to bottom: that is the order they run in).
Each stage is timed and logged (logger ``attnrewrite``, DEBUG), and lands in ``Report.stages``
with the number of sites still in play before and after it.

    functionalise  elementwise in-place writes into a private tensor (``s.masked_fill_(m, -inf)``
             before the softmax) → out-of-place ops, so that matching sees them (see ``functionalise``)
    unfuse   fused attention ops (nn.MultiheadAttention, TransformerEncoderLayer) → plain ops
    match    every softmax / SDPA anchor → a site with an AttentionSpec, or a reason it is not one
    resolve  constant masks → causal flag / dropped; masked values checked
    select   drop sites the chosen kind cannot honour (with the reason)
    certify  the spec must reproduce the original subgraph on float64 probes
    rewrite  certified sites → the kind's operator; old nodes removed once unused
    subgraphs  the bodies of higher-order ops: checkpointed regions and nested compile regions get
             this whole pass (rewritten once however often they are called); attention in any
             other body (cond, while_loop, ...) is reported as left as it was (see ``hops``)
    finish   lint and recompile the graph

A failure inside one site skips that site with the reason; a failure of the pass itself
restores the original graph.  Either way the attention stays as it was, which is never silent:
``strict=True`` raises :class:`~attnrewrite.rewriter.failures.RewriteFailed`, otherwise an
:class:`~attnrewrite.rewriter.failures.RewriteWarning` is issued once per cause.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from attnrewrite import kinds
from attnrewrite.ir.capture import example, module_path, normalize
from attnrewrite.ir.evaluate import GraphEvaluator
from attnrewrite.ir.record import find_fake_mode
from attnrewrite.ir.spec import NotAttention, Site, state_name
from attnrewrite.patterns import eager_matmul, masks, multihead, relative, sdpa
from attnrewrite.patterns.eager_matmul import NOT_READ
from attnrewrite.rewriter import hops, state
from attnrewrite.rewriter.certify import certify, fingerprint
from attnrewrite.rewriter.failures import Failure, RewriteFailed, RewriteWarning, not_rewritten
from attnrewrite.rewriter.functionalise import functionalise_writes
from attnrewrite.rewriter.names import named_from_root
from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.report import Report, SiteReport, StageReport, clean_module_path
from attnrewrite.rewriter.rewrite import rewrite_site

log = logging.getLogger("attnrewrite")

#: Pattern families, by the anchor they start from.
FAMILIES = (eager_matmul, sdpa)


@dataclass
class PassContext:
    gm: fx.GraphModule
    example_inputs: list[Any]
    options: RewriteOptions
    kind: kinds.Kind
    evaluator: GraphEvaluator
    fake_mode: Any
    sites: list[Site] = field(default_factory=list)
    origin: dict[fx.Node, str] = field(default_factory=dict)  # nodes created by unfusing → family
    states: dict[Site, Any] = field(default_factory=dict)  # per-site state modules (kinds with parameters)
    attach_state: Callable[[Site, Any], Any] | None = None  # set by convert(): attaches a new state
    # set by distill(): tap(gm, site, emit, call, kind_weights=...) records the kind's output beside the exact one
    # (kind_weights(call): the kind's attention weights, None for a kind without them)
    tap: Callable[..., Any] | None = None
    inside: str = ""  # the higher-order op body this pass works in ("" for the graph Dynamo captured)


def _guarded(ctx: PassContext, site: Site, stage: str, fn: Callable[[], None]) -> None:
    """Run one stage on one site; a failure skips the site with the reason."""
    try:
        fn()
    except NotAttention as exc:
        site.skip(str(exc))
    except Exception as exc:
        if ctx.options.strict:
            raise
        log.debug("attnrewrite: %s failed on %s (%s)", stage, site.anchor.name, site.module_path, exc_info=True)
        site.skip(f"internal error in {stage}: {type(exc).__name__}: {exc}")


def _matched(ctx: PassContext) -> list[Site]:
    return [s for s in ctx.sites if s.status == "matched"]


# --------------------------------------------------------------------------- stages


def functionalise(ctx: PassContext) -> None:
    done = functionalise_writes(ctx.gm)
    if done:
        log.debug("attnrewrite: %d in-place write(s) made out of place%s", done,
                  f" in {ctx.inside}" if ctx.inside else "")


def unfuse(ctx: PassContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        call = normalize(node)
        if call is None or not multihead.is_fused(call):
            continue
        before = set(ctx.gm.graph.nodes)
        site = Site(anchor=node, pattern="multihead", module_path=module_path(node))
        _guarded(ctx, site, "unfuse", lambda: multihead.unfuse(ctx.gm, node, ctx.evaluator, ctx.fake_mode))
        if site.status == "skipped":  # a fused attention op left as it was: said like any attention not read
            site.reason = f"{NOT_READ}: {site.reason}"
            ctx.sites.append(site)
        for new in set(ctx.gm.graph.nodes) - before:
            ctx.origin[new] = "multihead"


def match(ctx: PassContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        if hops.is_flex(node):  # FlexAttention's own op: attention, its mods read from its bodies
            site = Site(anchor=node, pattern=hops.FLEX, module_path=module_path(node))
            _guarded(ctx, site, "match", lambda site=site: hops.match_flex(ctx.gm, site, ctx.fake_mode))
            ctx.sites.append(site)
            continue
        call = normalize(node)
        family = next((f for f in FAMILIES if call is not None and f.is_anchor(call)), None)
        if family is None:
            opaque = sdpa.opaque_attention(node)
            if opaque is not None and not any(s.anchor is node for s in ctx.sites):
                ctx.sites.append(site := Site(anchor=node, pattern="opaque", module_path=module_path(node)))
                site.skip(f"{NOT_READ}: {opaque}")
            elif (unread := eager_matmul.unread_normaliser(node)) is not None:
                ctx.sites.append(site := Site(anchor=node, pattern="eager_matmul", module_path=module_path(node)))
                site.skip(unread)
            continue
        name = family.__name__.rsplit(".", 1)[-1]
        site = Site(anchor=node, pattern=ctx.origin.get(node, name), module_path=module_path(node))

        def run(site=site, family=family, node=node):
            matched = family.match(node)
            matched.pattern = site.pattern
            matched.spec = type(matched.spec)(**{**matched.spec.__dict__, "pattern": site.pattern})
            site.__dict__.update(matched.__dict__)

        _guarded(ctx, site, "match", run)
        ctx.sites.append(site)
    for site in _matched(ctx):
        reason = inside_a_transform(site)
        if reason is not None:
            site.skip(reason)
    seen: dict[str, int] = {}
    for site in ctx.sites:
        if site.spec is not None:
            site.ordinal = seen.get(site.module_path, 0)
            seen[site.module_path] = site.ordinal + 1


#: What a functorch transform's traced region is, and what to do instead, by the wrapped tensors inside it.
_TRANSFORMS = {
    "batched": ("torch.vmap", "compile the model without vmap and call it on the whole batch (attention takes a batch "
                "dimension, [B, H, T, D])"),
    "grad": ("a torch.func transform (grad, vjp, jacrev ...)", "compute gradients with torch.autograd (loss.backward(), "
             "torch.autograd.grad) on the compiled model: the rewrite happens before autograd, so the kind's own "
             "backward runs"),
    "other": ("a torch.func transform (jvp, jacfwd, functionalize ...)", "compile the model outside the transform"),
}


def inside_a_transform(site: Site) -> str | None:
    """Why a site traced inside a torch.func transform (``torch.compile(torch.vmap(f))``) is left as it was, or None.

    Dynamo inlines the transform: between its ``_vmap_increment_nesting`` and ``_vmap_decrement_nesting`` (or
    grad's) the values are functorch's wrapped tensors (per-example shapes for vmap), which the kinds' operators
    have no rule for (and which cannot be evaluated outside the transform).  ``torch.vmap(torch.compile(f))``
    does not reach the pass at all: torch.compile does not compile under vmap (torch 2.13), f runs eagerly."""
    functorch = torch._C._functorch
    values = [example(n) for n in (site.anchor, site.spec.q.node, site.spec.k.node, site.spec.v.node)]
    wrapped = [v for v in values if isinstance(v, torch.Tensor) and functorch.is_functorch_wrapped_tensor(v)]
    if not wrapped:
        return None
    which = ("batched" if any(functorch.is_batchedtensor(v) for v in wrapped) else
             "grad" if any(functorch.is_gradtrackingtensor(v) for v in wrapped) else "other")
    name, instead = _TRANSFORMS[which]
    return (f"it runs inside {name}, traced by torch.compile: its tensors are functorch's wrapped tensors, for which "
            f"the kinds' operators have no rule, so it runs as it was. To rewrite it, {instead}. (Compiling inside "
            f"the transform, torch.vmap(torch.compile(f)), does not rewrite either: torch.compile does not compile "
            f"under vmap, f runs eagerly.)")


def _keys_from_a_sequence(site: Site, evaluator: GraphEvaluator) -> None:
    """Keys and values must come from the inputs: softmax(x @ W) @ V with parameters W, V is a
    learned memory or a gate (MoE routing, a classifier), not attention over a sequence."""
    for name, ref in (("keys", site.spec.k), ("values", site.spec.v)):
        if not evaluator.depends_on_inputs(ref.node):
            site.spec = None  # a near miss, reported as such: no attention was left as it was
            raise NotAttention(f"the {name} are parameters or constants, not a sequence from the inputs")


def resolve(ctx: PassContext) -> None:
    for site in _matched(ctx):
        def run(site=site):
            _keys_from_a_sequence(site, ctx.evaluator)
            if isinstance(ctx.evaluator, hops.BodyEvaluator) and ctx.inside:  # masks built outside the body
                hops.lift_masks(site, ctx.evaluator)
            masks.resolve(site, ctx.evaluator)

        _guarded(ctx, site, "resolve", run)


def select(ctx: PassContext) -> None:
    kind, options = ctx.kind, ctx.options.kind_options
    for site in _matched(ctx):
        if site.spec.score_mod is not None and not kind.score_mod:
            site.skip(f"{kind.name} cannot honour this site: it cannot apply the score modification "
                      f"{site.spec.score_mod.describe()}")
            continue
        if site.spec.sink_logits is not None and kind.sink_logits not in ("exact", "dropped"):
            site.skip(f"{kind.name} cannot honour this site: it has no form for learned sink logits (gpt-oss's "
                      "attention sinks, an extra score column per head); rewrite it to softmax")
            continue
        if kind.position_bias:  # ALiBi computed in the kind's kernels instead of read as a [Tq, Tk] mask
            positioned, kept = masks.as_position_bias(site, ctx.evaluator)
            site.notes.extend(kept)
            if positioned is not None:
                site.spec = positioned
                site.notes.append("additive bias proven slope_h·d(i, j) (ALiBi): computed from positions")
        if kind.relative_bias:  # T5's buckets, a table by clamped distance: read as R[h, j − i], no [Tq, Tk] mask
            tabled, kept = relative.as_relative_bias(site, ctx.evaluator)
            site.notes.extend(kept)
            if tabled is not None:
                site.spec = tabled
                site.notes.append("additive bias proven R[h, j − i] (relative position bias): read by distance")
        reason = kind.supports(site.spec, options)
        padded = masks.as_key_padding(site, ctx.evaluator) if reason is not None else None
        if padded is not None and kind.supports(padded, options) is None:  # checked at run time, certified
            site.spec, reason = padded, None
            site.notes.append("additive key-padding bias taken as a padding mask (its values checked on every call)")
        if reason is None and site.spec.weights_escape and (kind.weights is None or site.probs is None):
            reason = "the attention weights are used elsewhere and it cannot supply them"
        if reason is not None:
            site.skip(f"{kind.name} cannot honour this site: {reason}")
            continue
        _guarded(ctx, site, "select", lambda site=site: _find_state(ctx, site))


def _find_state(ctx: PassContext, site: Site) -> None:
    """The site's state module for kinds with parameters, found on the model being compiled: the
    module that owns the site holds it (attached by convert(), or attached now when convert()
    itself is running the pass).  A missing or mismatched state skips the site with the reason,
    never a silent softmax; a found one is guarded so another model recompiles with its own."""
    kind, options = ctx.kind, ctx.options.kind_options
    fresh = kind.make_state(site.spec, options) if kind.make_state is not None else None
    if fresh is None:
        if kind.make_state is not None and not ctx.inside:
            _note_unused_state(ctx, site)
        return
    if ctx.inside:
        raise NotAttention(f"{kind.name} with these options has per-site parameters, which attnrewrite does not "
                           f"attach inside {ctx.inside} yet")
    owner = state.owner_of(site.anchor)
    found = state.find(owner.module, kind.name, site.ordinal, fresh)
    if found is None and ctx.attach_state is not None:
        found = ctx.attach_state(site, fresh)
    if found is None:
        raise NotAttention(
            f"{kind.name} with these options has per-site parameters: call attnrewrite.convert(model, "
            f"to={kind.name!r}, ...) before compiling")
    state.guard_site(ctx.gm, site.anchor, owner, kind.name, site.ordinal)
    ctx.states[site] = found


def _note_unused_state(ctx: PassContext, site: Site) -> None:
    """A state that ``convert`` attached for other options of this kind (hedgehog maps, learned summaries), which
    the options compiled with do not use (``elu``, mean summaries): the site runs as asked, but the state's
    parameters would train on nothing.  Said in the report and with a :class:`RewriteWarning`."""
    try:
        owner = state.owner_of(site.anchor)
    except NotAttention:
        return
    found = owner.module._modules.get(state_name(ctx.kind.name, site.ordinal))
    if found is None:
        return
    note = (f"the {ctx.kind.name} state attached to it (made for {getattr(found, state.OPTIONS_ATTR, None)}) is not "
            f"used by the options compiled with ({ctx.options.kind_options}): its parameters get no gradient; "
            "compile with the options it was converted with")
    site.notes.append(note)
    named = named_from_root(site.anchor, site.module_path)
    warnings.warn(f"attnrewrite: {clean_module_path(named)}: {note}", RewriteWarning, stacklevel=2)


def certify_sites(ctx: PassContext) -> None:
    proven: dict[tuple, tuple[bool, str | None, float]] = {}  # identical layers are proven once
    for site in _matched(ctx):
        def run(site=site):
            if site.pattern == hops.FLEX:  # proven against FlexAttention's own dense reference (scores too)
                key = ("flex", site)
                prove = lambda: hops.certify_flex(site, ctx.evaluator, scores=not ctx.kind.shift_invariant)  # noqa: E731
            else:
                # a kind that is not shift-invariant is certified on the site's scores as well (certify.py)
                key = fingerprint(site, ctx.evaluator)
                prove = lambda: certify(site, ctx.evaluator, scores=not ctx.kind.shift_invariant)  # noqa: E731
            if key not in proven:
                proven[key] = prove()
            ok, reason, err = proven[key]
            if not ok:
                raise NotAttention(reason)
            site.notes.append(f"certified (max rel. error {err:.0e})")

        _guarded(ctx, site, "certify", run)


def rewrite(ctx: PassContext) -> None:
    kind, options = ctx.kind, ctx.options.kind_options
    for index, site in enumerate(_matched(ctx)):
        def run(site=site, index=index):
            caller = state.caller(ctx.gm, site.anchor, kind.name, site.ordinal, ctx.states.get(site), index)
            weights = None
            if site.spec.weights_escape and callable(kind.weights):
                weights = lambda call: kind.weights(call, options, caller)
            emit = lambda call: kind.emit(call, options, caller)
            if ctx.tap is not None:  # distillation: the tap decides what the site returns; weights stay original
                kind_weights = (lambda call: kind.weights(call, options, caller)) if callable(kind.weights) else None
                emit, weights = functools.partial(ctx.tap, ctx.gm, site, emit, kind_weights=kind_weights), None
            # (distillation's teacher, exact attention, reads the whole mask: the position bias stays in it)
            rewrite_site(ctx.gm, site, emit, ctx.fake_mode, weights, positions=kind.position_bias and ctx.tap is None,
                         shift_invariant=kind.shift_invariant)
            site.status, site.kind = "rewritten", ctx.kind.name
            if site.spec.sink_logits is not None:
                site.notes.append("learned sink logits: " + (
                    "exact (one zero-value key per head)" if kind.sink_logits == "exact" else
                    f"dropped: {kind.name} has no softmax denominator for them to add to (Kind.sink_logits)"))
            if site.spec.weights_escape:
                site.notes.append("returned attention weights: " + (
                    "the original ones, still computed" if kind.weights == "original" else f"{kind.name}'s own"))

        _guarded(ctx, site, "rewrite", run)


def subgraphs(ctx: PassContext) -> None:
    """Bodies of higher-order ops: checkpointed and nested-compile-region bodies are entered (the
    whole pass, once per body however often it is called), any other body is reported."""
    for use in hops.body_uses(ctx.gm):
        if use.entered:
            _enter(ctx, use)
        else:
            _report_not_entered(ctx, use, hops.describe(use.hop))


def _enter(ctx: PassContext, use: hops.BodyUse) -> None:
    """The whole pass on one checkpointed / nested-compile-region body; its sites join ``ctx``'s.
    A failure of the pass on the body restores the body and skips its sites (strict raises)."""
    sub = PassContext(gm=use.body, example_inputs=[], options=ctx.options, kind=ctx.kind,
                      evaluator=hops.BodyEvaluator(use, ctx.evaluator), fake_mode=ctx.fake_mode,
                      attach_state=None, inside=f"the {use.hop} body {use.target}")
    backup = copy.deepcopy(use.body.graph)
    calls = [(node, node.args) for node in use.nodes]  # masks lifted into the body add operands
    operands = [None if ops is None else list(ops) for ops in use.operands]
    try:
        for _, stage in STAGES:
            stage(sub)
    except Exception as exc:
        if ctx.options.strict:
            raise
        log.debug("attnrewrite: the pass failed on %s", sub.inside, exc_info=True)
        use.body.graph = backup
        use.body.recompile()
        for node, args in calls:
            node.args = args
        use.operands = operands
        cause = f"the pass failed on {sub.inside} ({type(exc).__name__}: {exc}); it runs unrewritten"
        for site in sub.sites:
            if site.status != "skipped" or site.reason is None:
                site.status, site.reason = "skipped", cause
    for site in sub.sites:
        site.notes.append(f"inside {sub.inside} (called {len(use.nodes)}×)")
    ctx.sites.extend(sub.sites)


def _report_not_entered(ctx: PassContext, use: hops.BodyUse, what: str) -> None:
    """Attention inside a body the pass does not enter (and in every body below it): each site is
    reported as left as it was, with the reason.  The body itself is not changed: the sites are found
    on a copy (unfusing nn.MultiheadAttention there, so that it is found too)."""
    copied = replace(use, body=copy.deepcopy(use.body))
    sub = PassContext(gm=copied.body, example_inputs=[], options=ctx.options, kind=ctx.kind,
                      evaluator=hops.BodyEvaluator(copied, ctx.evaluator), fake_mode=ctx.fake_mode,
                      inside=what)
    unfuse(sub)
    match(sub)
    for site in _matched(sub):
        _guarded(sub, site, "resolve", lambda site=site: _keys_from_a_sequence(site, sub.evaluator))
        if site.status == "matched":
            site.skip(f"it is inside {what} ({use.target}), which attnrewrite does not enter")
    ctx.sites.extend(sub.sites)
    for nested in hops.body_uses(use.body):
        _report_not_entered(ctx, nested, f"{hops.describe(nested.hop)} within {what}")


def finish(ctx: PassContext) -> None:
    state.remove_markers(ctx.gm)  # the states' markers have served (see rewriter/state.py)
    ctx.gm.graph.lint()
    ctx.gm.recompile()


STAGES: tuple[tuple[str, Callable[[PassContext], None]], ...] = (
    ("functionalise", functionalise),
    ("unfuse", unfuse),
    ("match", match),
    ("resolve", resolve),
    ("select", select),
    ("certify", certify_sites),
    ("rewrite", rewrite),
    ("subgraphs", subgraphs),
    ("finish", finish),
)


# --------------------------------------------------------------------------- the pass


def _live(ctx: PassContext) -> int:
    return sum(s.status != "skipped" for s in ctx.sites)


def _run_stage(ctx: PassContext, name: str, stage: Callable[[PassContext], None]) -> StageReport:
    """Run one stage; its time and the sites still in play before and after it go to the report."""
    before, start = _live(ctx), time.perf_counter()
    stage(ctx)
    done = StageReport(name=name, seconds=time.perf_counter() - start, sites_in=before, sites_out=_live(ctx))
    log.debug("attnrewrite: stage %-8s %7.1f ms, sites %d -> %d", name, done.seconds * 1e3, done.sites_in,
              done.sites_out)
    return done


def run_pass(gm: fx.GraphModule, example_inputs: list[Any], options: RewriteOptions,
             attach_state: Callable[[Site, Any], Any] | None = None, tap: Callable[..., Any] | None = None) -> Report:
    """Rewrite every certified attention site of ``gm`` in place; return what was done.

    ``attach_state`` is given by :func:`attnrewrite.convert`: it attaches a kind's new
    per-site state to the user's model and returns it.  ``tap`` is given by
    :func:`attnrewrite.distill`: ``tap(gm, site, emit, call)`` records, in place of the site, what
    the site computes during attention transfer (``emit(call)`` is the kind's output); it is used
    for the graph Dynamo captured, not inside higher-order-op bodies.
    """
    start = time.perf_counter()
    report = Report(to=options.to, graphs=1)
    backups = {module: copy.deepcopy(module.graph) for module in (gm, *hops.all_bodies(gm))}
    ctx = PassContext(gm=gm, example_inputs=list(example_inputs), options=options, kind=kinds.get(options.to),
                      evaluator=hops.HopEvaluator(gm, example_inputs), fake_mode=find_fake_mode(gm, example_inputs),
                      attach_state=attach_state, tap=tap)
    try:
        for name, stage in STAGES:
            report.stages.append(_run_stage(ctx, name, stage))
    except Exception as exc:
        if options.strict:
            raise RewriteFailed(f"attnrewrite pass failed: {type(exc).__name__}: {exc}",
                                [Failure(named_from_root(s.anchor, s.module_path), f"the pass failed: {exc}")
                                 for s in ctx.sites]) from exc
        for module, backup in backups.items():
            module.graph = backup
            module.recompile()
        log.debug("attnrewrite: pass failed, running the graph unrewritten", exc_info=True)
        report.errors.append(f"{type(exc).__name__}: {exc}")
        cause = f"the pass failed ({type(exc).__name__}: {exc}); the graph runs unrewritten"
        for site in ctx.sites:
            if site.status != "skipped" or site.reason is None:
                site.status, site.reason = "skipped", cause
        if not any(s.spec is not None for s in ctx.sites):  # the failure may come before matching
            not_rewritten([Failure("", cause)], f"graph not rewritten to {options.to}", strict=False, stacklevel=5)
    report.sites = [SiteReport.from_site(s, 0, named_from_root(s.anchor, s.module_path)) for s in ctx.sites]
    report.seconds = time.perf_counter() - start
    failed = [Failure(s.module, s.reason) for s in report.sites if s.attention_left_as_it_was]
    not_rewritten(failed, f"attention not rewritten to {options.to}", options.strict, stacklevel=5)
    return report
