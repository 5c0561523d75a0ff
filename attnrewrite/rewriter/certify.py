"""Certification: a site is rewritten only once its spec has been shown to compute what it replaces.

For each matched site the certifier evaluates, in float64,

- the original subgraph (the site's region, from q, k, v to its output), and
- the spec's canonical form (:mod:`attnrewrite.ir.canonical`, the code the rewrite emits),

on two probes: fresh random q, k, v with the real example inputs everywhere else (the masks
the model really builds), then random q, k, v *and* random user inputs (padding masks,
learned biases) so that a spec that only holds for the example mask is caught.  Casts to
lower precision are evaluated in float64, and dropout is off, so the two sides agree to
rounding and any real difference — a wrong scale, a lost mask, a wrong causal claim —
stands out by many orders of magnitude.  Rows in which every key is masked are not
compared: their output is undefined (NaN or a uniform average, depending on spelling).

The scores, not only the softmax.  Softmax ignores a constant added to a query's scores, so an
output comparison cannot tell a bias b(i, j) from b(i, j) + c(i): a spec that lost (or gained)
such a per-query term would be certified, and a kind that is not shift-invariant (sigmoid: each
score is normalised on its own; ``Kind.shift_invariant`` False) would then compute something else
than the site's scores say.  For such kinds :func:`certify` also runs *score probes*: the site's
normalisation (its softmax node, or SDPA) is replaced by a shift-sensitive one, elu(s) + 1
(:func:`shift_sensitive`: 0 at −∞, exp(−10⁴) = 0 for scores masked with −10⁴ or finfo.min, and
no saturation above), on both sides, so the spec's masked scores must reproduce the very scores
the site normalises.  What the kinds' math is defined on are the scores the softmax normalises:
for a softmax written out as exp(x − m) / Σ exp(x − m) that is x (m, any per-row value, is the
spelling's own stabiliser, :func:`attnrewrite.ir.capture.written_out_softmax`), and for
softmax(x − amax(x)) it is x as well (:func:`attnrewrite.ir.capture.without_stabiliser`).  FlexAttention sites get the same
probes against FlexAttention's own post-``score_mod`` scores (:func:`attnrewrite.rewriter.hops.certify_flex`);
nn.MultiheadAttention and TransformerEncoderLayer are unfused into SDPA or a softmax, so their sites are probed
here like any other, and the unfusing itself is checked on the fused op's scores
(:func:`attnrewrite.patterns.multihead.unfuse`).

The evaluator itself (:class:`~attnrewrite.ir.evaluate.GraphEvaluator`) lives in ``ir``: the
mask resolver reads constant masks with it too.

In-place writes are part of what is certified.  The site's region and everything its masks
need run in graph order with their writes executed (``m = zeros(T, T)`` then
``m[:, 5:] = -inf`` is a mask), and the canonical form reads its inputs as they are just
before the site's output, which is where the rewrite reads them.  A site whose inputs are
written between the site's first node and its output (the original read them before the
write, the rewrite would read them after), or whose scores or probabilities are written in
place by a node the site does not consist of, is refused with that reason.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

import math
from dataclasses import replace

from attnrewrite.ir import canonical
from attnrewrite.ir.capture import constant_value, hinted_shape, normalize, symbolic_number
from attnrewrite.ir import row_blocks
from attnrewrite.ir.evaluate import ClosureTooLarge, GraphEvaluator, UnreadableWrite, float64_default
from attnrewrite.ir.row_blocks import RowPlan, largest_bytes
from attnrewrite.ir.spec import MASKED_SCORE, PADDING_GUARD, Site
from attnrewrite.ir.written_out import shift_sensitive, shift_sensitive_sdpa, written_out
from attnrewrite.kinds.softmax import exact_attention

#: Relative error (to the output's scale) above which a site is not certified.
CERTIFY_RTOL = 1e-6


# --------------------------------------------------------------------------- certification


def _spec_nodes(site: Site) -> set[fx.Node]:
    """Graph nodes the canonical form reads besides q, k, v: mask terms, factors, sizes in steps."""
    spec = site.spec
    nodes = {t.node for t in spec.bias} | {n for n, _ in spec.q_factors}
    for term in spec.bias:  # what a relative bias's replay reads (its table), a position term's sizes
        nodes |= term.relative.inputs() if term.relative is not None else set()
        nodes |= {node for node, _ in term.offset if node is not None}
    mod_steps = []
    if spec.score_mod is not None:  # what the replayed ops read besides the scores
        chain = {spec.score_mod.source} | {n for n, _ in spec.score_mod.chain}
        nodes |= {a for n in spec.score_mod.ops() for a in n.all_input_nodes if a not in chain}
        mod_steps = [spec.score_mod.steps, spec.score_mod.back]
    layouts = [spec.q.steps, spec.k.steps, spec.v.steps, site.out_steps] + [t.steps for t in spec.bias]
    if spec.sink_logits is not None:  # gpt-oss's learned sinks, and the sizes in their steps
        nodes.add(spec.sink_logits.node)
        layouts.append(spec.sink_logits.steps)
    for steps in layouts + mod_steps:
        for step in steps:
            fx.node.map_arg(step, nodes.add)
    return nodes


def _describe(value: Any, local: dict[fx.Node, int], external: Callable[[fx.Node], Any]) -> Any:
    if isinstance(value, fx.Node):
        return ("local", local[value]) if value in local else external(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_describe(v, local, external) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _describe(v, local, external)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice",) + tuple(_describe(x, local, external) for x in (value.start, value.stop, value.step))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return repr(value)


def fingerprint(site: Site, evaluator: GraphEvaluator) -> tuple:
    """A key equal for two sites only when they compute the same function of the same inputs.

    q, k and v are named by role (certification draws them at random anyway); inputs that do
    not depend on user data (causal masks built from shapes or buffers, sizes) by their value;
    any other input (padding masks, learned biases) by identity.  So layers that build the same
    causal mask, or read the same padding mask, share a key.  Ops, constants, q/k/v shapes and
    the whole spec are part of it.
    """
    spec = site.spec
    roles = {spec.q.node: "q", spec.k.node: "k", spec.v.node: "v"}

    def external(node: fx.Node) -> Any:
        if node in roles:
            return ("role", roles[node])
        if not evaluator.depends_on_data(node):
            try:
                value = evaluator.value(node, at=site.output)
            except (ClosureTooLarge, UnreadableWrite):
                return ("ext", id(node))
            if isinstance(value, torch.Tensor):
                return ("const", tuple(value.shape), str(value.dtype), hash(value.cpu().numpy().tobytes()))
            return ("const", repr(value))
        return ("ext", id(node))

    local: dict[fx.Node, int] = {}
    body = []
    for i, node in enumerate(site.region):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
        body.append((node.op, target, _describe(node.args, local, external), _describe(node.kwargs, local, external)))
        local[node] = i
    shapes = tuple(hinted_shape(n) for n in (spec.q.node, spec.k.node, spec.v.node))
    body.append(("writes", tuple(w.name for w in _writes_seen(site, evaluator))))
    spec_key = _describe((spec.q.steps, spec.k.steps, spec.v.steps, site.out_steps, spec.scale, spec.q_factors,
                          tuple((t.kind, t.node, t.steps, t.coeff, t.form, t.offset) for t in spec.bias), spec.causal,
                          spec.kv_groups, _mod_key(spec), _sinks_key(spec)), local, external)
    return tuple(body), shapes, spec_key, local.get(site.output)


def _sinks_key(spec) -> tuple:
    sinks = spec.sink_logits
    return () if sinks is None else (sinks.node, sinks.steps)


def _mod_key(spec) -> tuple:
    mod = spec.score_mod
    return () if mod is None else (mod.source, mod.chain, mod.steps, mod.back)


def _site_dropout(site: Site) -> float | str:
    """The dropout probability the site's own nodes apply in training, read from the graph (a
    description of the problem instead when it cannot be read as one number)."""
    found = []
    for node in site.region:
        call = normalize(node)
        if call is None or call.name not in ("dropout", "sdpa"):
            continue
        p, training = (call.kwargs["p"], call.kwargs["training"]) if call.name == "dropout" else (
            call.kwargs["dropout_p"], True)
        if training is False:
            continue
        value = constant_value(p)
        if value is None and symbolic_number(p) is not None:
            value = symbolic_number(p)[0]
        if value is None or training is not True:
            return f"{node.name} drops with a probability or mode that is not a number"
        if value:
            found.append(value)
    if len(found) > 1:
        return f"{len(found)} dropouts in one site"
    return found[0] if found else 0.0


def check_dropout(site: Site) -> str | None:
    """Certification evaluates without dropout, so the spec's dropout probability is compared
    with the one the graph applies; returns the reason for refusing, or None."""
    got = _site_dropout(site)
    if isinstance(got, str):
        return f"could not certify the dropout: {got}"
    if got != site.spec.dropout_p:
        return f"spec's dropout probability {site.spec.dropout_p:g} differs from the site's {got:g}"
    return None


def _span(site: Site, evaluator: GraphEvaluator) -> tuple[int, int]:
    """Graph positions of the site's first node and of its output."""
    first = min((evaluator.position(n) for n in site.region), default=evaluator.position(site.output))
    return first, evaluator.position(site.output)


def _writes_seen(site: Site, evaluator: GraphEvaluator) -> list[fx.Node]:
    """Nodes outside the site that write, before its output, into a value the site or its canonical
    form reads (for q, k and v, which certification draws at random, only writes inside the site)."""
    writes, region = evaluator.writes, set(site.region)
    first, _ = _span(site, evaluator)
    qkv = {site.spec.q.node, site.spec.k.node, site.spec.v.node}
    try:
        reads = evaluator.closure(_spec_nodes(site) | _region_inputs(site) | region, dict.fromkeys(qkv),
                                  at=site.output)
    except (ClosureTooLarge, UnreadableWrite):
        reads = list(_spec_nodes(site) | region)
    seen = [w for node in reads for w in writes.writes_into(node, before=site.output) if w not in region]
    seen += [w for node in qkv for w in writes.writes_into(node, before=site.output)
             if evaluator.position(w) >= first]  # (writes before the site: q, k, v are drawn at random)
    return sorted(set(seen), key=evaluator.position)


def _region_inputs(site: Site) -> set[fx.Node]:
    return {n for r in site.region for n in r.all_input_nodes} - set(site.region)


def written_in_the_way(site: Site, evaluator: GraphEvaluator) -> str | None:
    """Why in-place writes make the site's canonical form differ from what it replaces, or None.

    The rewrite reads q, k, v and the masks just before the site's output; the original read
    them at its own nodes: a write after the site's first read of a value and before its output
    changes one and not the other.  And a write into the scores or probabilities by a node
    outside the site is a change the spec does not hold.
    """
    writes, region = evaluator.writes, set(site.region)
    spec = site.spec
    for node in [spec.q.node, spec.k.node, spec.v.node, *sorted(_spec_nodes(site), key=evaluator.position)]:
        late = writes.writes_into(node, before=site.output)
        first = writes.first_use(node, region, site.output) if late else None
        for w in late:
            if first is not None and evaluator.position(w) > evaluator.position(first):
                return (f"{node.name}, an input of the site, is written in place by {w.name} after the site "
                        f"reads it ({first.name}) and before its output")
    for node in site.region:  # (writes before a region node that views q, k or v are part of their value)
        for w in writes.writes_into(node, before=site.output, after=node):
            if w not in region:
                return (f"the site's {node.name} is written in place by {w.name}, which is not part of the "
                        f"attention it matched")
    return None


#: The probes, in order: the example's user inputs, then random ones of the same kind, then the
#: example's a little changed (for masks that random inputs close entirely).  Certification needs
#: two informative probes (some query row sees a key), one of them with user inputs changed.
PROBES = ("real", "random", "random", "perturbed", "perturbed", "perturbed")

_DESCRIBE = {"real": "random q, k, v", "random": "random q, k, v and random user inputs",
             "perturbed": "random q, k, v and perturbed user inputs"}


def normaliser(site: Site) -> fx.Node | None:
    """The node of the site's region that normalises its scores (a softmax, written out or not, or SDPA), or
    None (FlexAttention is probed by ``hops.certify_flex``)."""
    for node in [site.anchor] + [n for n in site.region if n is not site.anchor]:
        call = normalize(node) if node in site.region else None
        if call is not None and call.name in ("softmax", "sdpa"):
            return node
    return None


def _shift_sensitive_at(node: fx.Node, env) -> torch.Tensor:
    """What ``node`` (the site's :func:`normaliser`) computes with :func:`shift_sensitive` for its softmax."""
    call = normalize(node)
    if call.name == "softmax":
        return shift_sensitive(env[call.args[0]].to(torch.float64))
    get = lambda x: env[x] if isinstance(x, fx.Node) else x  # noqa: E731
    return shift_sensitive_sdpa(*(get(a) for a in call.args), attn_mask=get(call.kwargs["attn_mask"]),
                                is_causal=get(call.kwargs["is_causal"]), scale=get(call.kwargs["scale"]))


def _rows(x: Any, start: int, stop: int, t_q: int) -> Any:
    """Rows start … stop − 1 of an operand broadcast to [.., Tq, ..] (its dim −2: Tq, or 1 and kept)."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == t_q and t_q > 1:
        return x[..., start:stop, :]
    return x


def canonical_shift_sensitive(call: canonical.AttentionCall) -> torch.Tensor:
    """The canonical form with :func:`shift_sensitive` for its softmax, a block of query rows at a time (no
    [B, H, Tq, Tk] value larger than about 32 MiB)."""
    t_q, t_k = call.q.shape[-2], call.k.shape[-2]
    step = max(1, (4 << 20) // max(1, math.prod(call.q.shape[:-2]) * t_k))
    pieces = []
    for start in range(0, t_q, step):
        stop = min(t_q, start + step)
        mask, bool_mask = _rows(call.attn_mask, start, stop, t_q), call.bool_mask
        if call.is_causal:  # canonical causality is top-left (masked_scores' tril): key j ≤ query i
            keep = torch.arange(start, stop).view(-1, 1) >= torch.arange(t_k).view(1, -1)
            if mask is None:
                mask, bool_mask = keep, True
            elif bool_mask:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, -math.inf)
        block = replace(call, q=call.q[..., start:stop, :], q_factor=_rows(call.q_factor, start, stop, t_q),
                        attn_mask=mask, bool_mask=bool_mask, is_causal=False)
        pieces.append(written_out(block, normalise=shift_sensitive))
    return torch.cat(pieces, dim=-2)


def _probe(site: Site, evaluator: GraphEvaluator, targets: set[fx.Node], randomize: bool | str,
           scores: fx.Node | None = None):
    """One probe: (original output, canonical output, rows compared) on fresh q, k, v.  ``scores``: a score
    probe, with this node (the site's :func:`normaliser`) and the canonical form's softmax computing
    :func:`shift_sensitive` instead."""
    spec = site.spec
    qkv = {spec.q.node, spec.k.node, spec.v.node}
    env: dict[fx.Node, Any] = {node: evaluator.random_like_meta(node) for node in qkv}
    order = evaluator.closure(targets, env, at=site.output)
    output_at = evaluator.position(site.output)

    def compute(node: fx.Node, values) -> Any:
        return _shift_sensitive_at(node, values) if node is scores else evaluator.compute(node, values, randomize)

    # a softmax written out as exp(x − m) / Σ: its node does not read x, which the score probe gives elu + 1
    reads = set() if scores is None else set(normalize(scores).tensor_args()) - set(scores.all_input_nodes)
    rows_plan = _rows_plan(site, evaluator, order)
    if rows_plan is not None and not reads:  # (blocks drop x after its last reader in the graph)
        blocked = _probe_in_blocks(site, evaluator, order, dict(env), rows_plan, randomize, scores, compute)
        if blocked is not None:
            return blocked
    # values are dropped after their last reader, except those the canonical form reads
    plan = evaluator.release_plan(order, _spec_nodes(site) | {site.output} | reads)

    def run(node: fx.Node) -> None:
        env[node] = compute(node, env)
        for done in plan.get(node, ()):
            del env[done]

    with torch.no_grad(), float64_default():
        for node in order:
            if evaluator.position(node) < output_at:
                run(node)
        call = canonical.attention_call(spec, env.__getitem__, torch.float64, dropout=False)
        out = exact_attention(call) if scores is None else canonical_shift_sensitive(call)
        rows = canonical.visible_rows(call).unsqueeze(-1).expand(out.shape)
        want = canonical.apply_steps(out, site.out_steps, env.__getitem__)
        rows = canonical.apply_steps(rows, site.out_steps, env.__getitem__)
        for node in order:  # after the canonical form: the region may work in place
            if evaluator.position(node) >= output_at:
                run(node)
        return env[site.output], want, rows


def _rows_plan(site: Site, evaluator: GraphEvaluator, order: list[fx.Node]) -> RowPlan | None:
    """How to evaluate the site's region a block of query rows at a time (:mod:`attnrewrite.ir.row_blocks`),
    or None to evaluate it whole: when its values are small, when its ops do not provably allow it, or
    when anything but its output runs at or after the output's position."""
    if largest_bytes(site.region) < row_blocks.MIN_BYTES:
        return None
    output_at = evaluator.position(site.output)
    if any(evaluator.position(n) >= output_at for n in order if n is not site.output):
        return None
    plan = row_blocks.plan_rows(site.region, order, site.spec.q.node, site.output, evaluator.writes.written)
    if not isinstance(plan, RowPlan) or any(n in plan.axis for n in _spec_nodes(site)):
        return None
    return plan


def _probe_in_blocks(site: Site, evaluator: GraphEvaluator, order: list[fx.Node], env: dict, rows_plan: RowPlan,
                     randomize: bool | str, scores: fx.Node | None, compute: Callable[[fx.Node, Any], Any]):
    """:func:`_probe` with the region's q-dependent nodes evaluated a block of query rows at a time (None when a
    block does not evaluate: the caller then evaluates the region whole, as without a plan)."""
    spec = site.spec
    whole = [n for n in order if n not in rows_plan.axis]
    readers = {a for n in order if n in rows_plan.axis for a in n.all_input_nodes}
    plan = evaluator.release_plan(whole, _spec_nodes(site) | readers)
    with torch.no_grad(), float64_default():
        for node in whole:
            env[node] = compute(node, env)
            for done in plan.get(node, ()):
                del env[done]
        call = canonical.attention_call(spec, env.__getitem__, torch.float64, dropout=False)
        out = exact_attention(call) if scores is None else canonical_shift_sensitive(call)
        rows = canonical.visible_rows(call).unsqueeze(-1).expand(out.shape)
        want = canonical.apply_steps(out, site.out_steps, env.__getitem__)
        rows = canonical.apply_steps(rows, site.out_steps, env.__getitem__)
        del call, out
        try:
            got = row_blocks.evaluate_in_blocks(rows_plan, order, env, compute, site.output)
        except RuntimeError:  # an op the rules followed that will not run on a block: evaluate it whole
            return None
        return got, want, rows


def certify(site: Site, evaluator: GraphEvaluator, probes: int = 2,
            scores: bool = False) -> tuple[bool, str | None, float]:
    """Check ``site.spec`` against the original subgraph. Returns (ok, reason, worst relative error).

    Each probe evaluates, in one pass in graph order, the site's region and everything its masks
    need (in-place writes executed); the canonical form is computed from the values as they are
    just before the site's output, where the rewrite reads them.  Probes that leave every query
    row fully masked prove nothing and are replaced by the next kind of probe (:data:`PROBES`);
    ``probes`` informative ones are needed.  ``scores=True`` (the kind is not shift-invariant):
    as many score probes as well, the site's normalisation and the canonical form's softmax both
    replaced by :func:`shift_sensitive` (see the module docstring).
    """
    spec = site.spec
    worst = 0.0
    dropout = check_dropout(site)
    if dropout is not None:
        return False, dropout, worst
    reason = written_in_the_way(site, evaluator)
    if reason is not None:
        return False, reason, worst
    qkv = {spec.q.node, spec.k.node, spec.v.node}
    targets = (_region_inputs(site) | _spec_nodes(site) | set(site.region)) - qkv
    ok, reason, worst = _compare(site, evaluator, targets, probes, None, worst)
    anchor = normaliser(site) if ok and scores else None
    if anchor is not None:
        ok, reason, worst = _compare(site, evaluator, targets, probes, anchor, worst)
    return ok, reason, worst


def _compare(site: Site, evaluator: GraphEvaluator, targets: set[fx.Node], probes: int, scores: fx.Node | None,
             worst: float) -> tuple[bool, str | None, float]:
    """:func:`certify`'s probes, of outputs (``scores`` None) or of scores (``scores`` the site's normaliser)."""
    informative, changed = 0, False
    for kind in PROBES:
        if informative >= probes and (changed or probes < 2):
            break
        try:
            got, want, rows = _probe(site, evaluator, targets, False if kind == "real" else kind, scores)
        except ClosureTooLarge as exc:
            return False, f"could not certify: the site's masks depend on too much of the graph ({exc})", worst
        except UnreadableWrite as exc:
            return False, f"could not certify: {exc}", worst
        except RuntimeError as exc:
            if PADDING_GUARD not in str(exc):
                raise
            return False, (f"an additive mask taken as key padding holds values other than 0 and "
                           f"<= {MASKED_SCORE:g} on {_DESCRIBE[kind].split(' and ')[-1]}"), worst
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False, f"canonical form has shape {tuple(want.shape)}, site output {getattr(got, 'shape', got)}", worst
        if not bool(rows.any()):
            continue  # every query row fully masked: nothing compared, try the next probe
        got, want = got[rows], want[rows]
        if not bool(torch.isfinite(got).all()):
            return False, "original output is not finite on probe inputs", worst
        err = float((got - want).abs().max() / (1.0 + want.abs().max()))
        worst = max(worst, err)
        if err > CERTIFY_RTOL and scores is not None:
            return False, (f"spec reproduces the site's softmax but not its scores (relative error {err:.2e} on "
                           f"{_DESCRIBE[kind]}, both normalised by elu + 1): they differ by a term the softmax "
                           f"ignores, such as a constant per query, which a kind that is not shift-invariant "
                           f"would not ignore"), worst
        if err > CERTIFY_RTOL:
            return False, f"spec does not reproduce the site (relative error {err:.2e} on {_DESCRIBE[kind]})", worst
        informative += 1
        changed = changed or kind != "real"
    if informative < probes or not (changed or probes < 2):
        return False, (f"could not certify: every probed query row is fully masked ({informative} informative "
                       f"probe(s) of {len(PROBES)}: the example, random and perturbed user inputs)"), worst
    return True, None, worst
