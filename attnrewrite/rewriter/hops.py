"""Higher-order operators: attention inside the subgraphs Dynamo hands the backend.

Dynamo keeps some regions of a model as *bodies* — GraphModules held by the graph and called
through a higher-order operator (HOP) node — instead of inlining them:

- ``tag_activation_checkpoint(body, *operands, **kw)``: ``torch.utils.checkpoint(fn, ...)`` (either
  ``use_reentrant``; HF's ``gradient_checkpointing_enable()``).  The body runs in the forward and
  again in the backward (recomputation): rewriting the body itself makes the kind's op what runs
  both times.
- ``invoke_subgraph(body, identifier, *operands)``: ``torch.compiler.nested_compile_region``.
  One body may be invoked several times; it is rewritten once, for every invocation.

Those two are *entered*: the whole pass runs on the body (``pipeline.subgraphs``), with a
:class:`BodyEvaluator` that treats the body as a function of the outer graph: a placeholder takes
the value of the operand the calls pass it, on the real example inputs and, on certification
probes, on random inputs drawn at the *outer* graph's inputs (so two placeholders computed from
one padding mask stay consistent).  A placeholder is a constant only when every call passes it the
same constant, so a mask read as causal in one invocation is never assumed for another.  A mask
built outside the body is split there (:func:`lift_masks`), its parts passed into the body as
operands of their own: the causal part is proven, the key padding reaches the kind on its own.

Every other HOP whose body holds attention (``cond``, ``while_loop``, ``map``, a custom
``autograd.Function``'s ``autograd_function_apply`` ...) is not entered; its attention sites are
found (on a copy of the body) and reported as left as they were, with the reason.

``flex_attention`` is itself attention: :func:`match_flex` reads it as a site, evaluating its
``score_mod`` and ``mask_mod`` bodies at every position of the site's shapes, and
:func:`certify_flex` proves the spec against FlexAttention's own dense float64 reference.  That
reference (like FlexAttention's eager path) applies ``mask_mod`` at every position; the block
sparsity of a ``BlockMask`` is taken to be what ``create_block_mask`` builds from that
``mask_mod`` — a hand-made BlockMask whose blocks disagree with its ``mask_mod`` is not detected.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree

from attnrewrite.ir import canonical
from attnrewrite.ir.capture import example, hinted_shape, mutated_placeholders, owning_module, rank, tensor_meta
from attnrewrite.ir.evaluate import GraphEvaluator, float64_default
from attnrewrite.ir.spec import AttentionSpec, MaskTerm, NotAttention, Site, TensorRef
from attnrewrite.kinds.softmax import exact_attention
from attnrewrite.rewriter.certify import CERTIFY_RTOL, canonical_shift_sensitive, shift_sensitive

#: HOPs whose body the pass enters, and the index of their first operand (the body is argument 0).
ENTERED = {"tag_activation_checkpoint": 1, "invoke_subgraph": 2}

#: What a HOP is, for reasons in reports.
_WHAT = {
    "cond": "a torch.cond branch",
    "while_loop": "a torch.while_loop body",
    "map_impl": "a torch.map body",
    "scan": "a scan body",
    "associative_scan": "an associative_scan body",
    "autograd_function_apply": "a custom autograd.Function's forward (its backward is the user's own)",
}

FLEX = "flex_attention"


def hop_name(node: fx.Node) -> str | None:
    """The name of the higher-order operator ``node`` calls (``"cond"`` ...), or None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def describe(hop: str) -> str:
    """A HOP's body in words (``"a torch.cond branch"``)."""
    return _WHAT.get(hop, f"the body of the higher-order op {hop}")


@dataclass
class BodyUse:
    """One body of ``parent`` (its attribute ``target``) and the HOP nodes that call it.

    ``operands`` holds, per calling node, the values it passes to the body's placeholders in order
    (graph nodes or constants), or None when the HOP's argument layout is not known here.
    """

    parent: fx.GraphModule
    target: str
    body: fx.GraphModule
    hop: str
    nodes: list[fx.Node] = field(default_factory=list)
    operands: list[list[Any] | None] = field(default_factory=list)

    @property
    def entered(self) -> bool:
        return self.hop in ENTERED


def _operands(node: fx.Node, hop: str, body_position: int) -> list[Any] | None:
    """What ``node`` passes to the placeholders of its body at argument ``body_position``."""
    args = node.args
    if hop in ENTERED:
        return list(args[ENTERED[hop]:])
    if hop == "cond" and body_position in (1, 2) and len(args) > 3:
        return _pytree.tree_leaves(args[3])
    if hop == "while_loop" and body_position in (0, 1) and len(args) > 3:
        return _pytree.tree_leaves(args[2]) + _pytree.tree_leaves(args[3])
    return None


def body_uses(gm: fx.GraphModule) -> list[BodyUse]:
    """The bodies called by HOP nodes of ``gm`` (not flex_attention's score/mask mods), in graph
    order, one entry per body however many nodes call it."""
    uses: dict[str, BodyUse] = {}
    for node in gm.graph.nodes:
        hop = hop_name(node)
        if hop is None or hop == FLEX:
            continue
        for position, arg in enumerate(node.args):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            body = getattr(gm, arg.target, None)
            if not isinstance(body, fx.GraphModule):
                continue
            use = uses.setdefault(arg.target, BodyUse(gm, arg.target, body, hop))
            if use.hop != hop:  # one body under two different HOPs: treat it as not entered
                use.hop = hop if hop not in ENTERED else use.hop
            use.nodes.append(node)
            use.operands.append(_operands(node, hop, position))
    return list(uses.values())


def all_bodies(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Every body under ``gm``, nested ones included (flex_attention's mods too)."""
    for _, module in gm.named_modules():
        if module is not gm and isinstance(module, fx.GraphModule):
            yield module


# --------------------------------------------------------------------------- evaluation


class HopEvaluator(GraphEvaluator):
    """The pass's float64 evaluator, able to evaluate entered HOP nodes: their body runs through
    the evaluator too (casts in float64, dropout off), on a copy taken before any rewrite — so
    values are those of the original model, whatever the pass has done to the bodies since."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Any, seed: int = 0):
        super().__init__(gm, example_inputs, seed)
        self._pristine: dict[str, fx.GraphModule] = {}
        for use in body_uses(gm):
            if use.entered:
                self._pristine[use.target] = copy.deepcopy(use.body)

    def compute(self, node: fx.Node, env: dict, randomize: bool = False) -> Any:
        hop = hop_name(node)
        body_node = node.args[0] if hop in ENTERED and node.args else None
        if not (isinstance(body_node, fx.Node) and body_node.target in self._pristine):
            return super().compute(node, env, randomize)
        body = self._pristine[body_node.target]
        values = [env[a] if isinstance(a, fx.Node) else a for a in node.args[ENTERED[hop]:]]
        inner = HopEvaluator(body, values)
        inner.roles = {n: "buffer" for n in inner.roles}  # values are given: nothing is drawn again
        output = next(n for n in body.graph.nodes if n.op == "output")
        leaves = [a for a in _pytree.tree_leaves(output.args[0]) if isinstance(a, fx.Node)]
        computed = inner.evaluate(leaves)
        return _pytree.tree_map(lambda a: computed[a] if isinstance(a, fx.Node) else a, output.args[0])


def _role(node: Any, evaluator: GraphEvaluator) -> str:
    """The role an operand of a HOP would have as a placeholder of the outer graph."""
    if not isinstance(node, fx.Node):
        return "size" if isinstance(node, (int, float, bool, torch.SymInt, torch.SymFloat)) else "buffer"
    if node.op == "placeholder":
        return evaluator.roles.get(node, "input")
    if isinstance(example(node), (int, float, torch.SymInt, torch.SymFloat)):
        return "size"
    if evaluator.depends_on_inputs(node):
        return "input"
    return "param" if evaluator.depends_on_data(node) else "buffer"


class BodyEvaluator(HopEvaluator):
    """The evaluator of an entered (or only read) body: a function of the outer graph.

    A placeholder fed the same operand by every call takes that operand's value from the outer
    evaluator — on the real example inputs, and on a probe's random inputs drawn *at the outer
    graph's inputs*, so that two placeholders computed from one padding mask stay consistent.  A
    placeholder fed different operands by different calls (an invoke_subgraph region called twice)
    takes the first call's value and is a user input (drawn at random on probes) unless all of them
    are parameters: its value may differ from call to call, so no call's constant may be assumed.
    Roles (input, parameter, constant, size) are those of the operands.
    """

    def __init__(self, use: BodyUse, outer: GraphEvaluator):
        placeholders = [n for n in use.body.graph.nodes if n.op == "placeholder"]
        super().__init__(use.body, [example(ph) for ph in placeholders])
        self.use, self.outer = use, outer
        self._probe: dict[fx.Node, Any] = {}
        self._probe_owner: Any = None
        mutated = mutated_placeholders(use.body.graph)
        for ph in placeholders:
            self.roles[ph] = "input" if ph in mutated else self._agreed_role(ph)

    def fed(self, placeholder: fx.Node) -> list[Any] | None:
        """What each call passes to ``placeholder`` (None when some call's layout is unknown)."""
        index = [n for n in self.use.body.graph.nodes if n.op == "placeholder"].index(placeholder)
        fed = [ops[index] for ops in self.use.operands if ops is not None and index < len(ops)]
        return fed if fed and len(fed) == len(self.use.operands) else None

    def same_operand(self, placeholder: fx.Node) -> Any | None:
        """The outer node every call passes to ``placeholder``, or None."""
        fed = self.fed(placeholder)
        if fed is None or not isinstance(fed[0], fx.Node) or any(f is not fed[0] for f in fed):
            return None
        return fed[0]

    def _agreed_role(self, placeholder: fx.Node) -> str:
        fed = self.fed(placeholder)
        if fed is None:
            return "input"
        roles = {_role(f, self.outer) for f in fed}
        if len(roles) == 1 and (all(f is fed[0] for f in fed) or roles <= {"param", "size"}):
            return roles.pop()
        return "param" if roles == {"param"} else "input"

    def _new_probe(self, env: Any, randomize: bool | str) -> None:
        if randomize and env is not self._probe_owner:  # a new probe: new draws at the outer inputs
            self._probe, self._probe_owner = {}, env

    def evaluate(self, targets, env=None, randomize=False, at=None, release=False):
        self._new_probe(env, randomize)
        return super().evaluate(targets, env, randomize, at=at, release=release)

    def compute(self, node: fx.Node, env: dict, randomize: bool | str = False) -> Any:
        self._new_probe(env, randomize)  # (certification computes node by node, one env per probe)
        return super().compute(node, env, randomize)

    def placeholder_value(self, node: fx.Node, randomize: bool | str) -> Any:
        operand = self.same_operand(node)
        fed = self.fed(node)
        try:
            if operand is not None and randomize:  # drawn at the outer inputs, of the probe's kind
                return self.outer.evaluate([operand], self._probe, randomize=randomize)[operand]
            if fed is not None and isinstance(fed[0], fx.Node):
                self.inputs[node] = self.outer.value(fed[0])
            elif fed is not None:
                self.inputs[node] = fed[0]
        except Exception:  # noqa: BLE001 — then synthesised from the placeholder's metadata
            self.inputs[node] = example(node)
        return super().placeholder_value(node, randomize)


def add_operand(evaluator: BodyEvaluator, operand: fx.Node) -> fx.Node:
    """A new placeholder of the body, fed ``operand`` (an outer node) by every call; reused when
    one exists already."""
    use = evaluator.use
    placeholders = [n for n in use.body.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        if evaluator.same_operand(ph) is operand:
            return ph
    with use.body.graph.inserting_after(placeholders[-1]):
        ph = use.body.graph.placeholder(f"attnrewrite_{operand.name}")
    ph.meta["example_value"] = example(operand)
    for node, ops in zip(use.nodes, use.operands):
        node.args = node.args + (operand,)
        ops.append(operand)
    evaluator.roles[ph] = _role(operand, evaluator.outer)
    evaluator.inputs[ph] = example(operand)
    return ph


def lift_masks(site: Site, evaluator: BodyEvaluator) -> None:
    """See through mask terms that are placeholders of an entered body: split the outer node that
    feeds them (the same one in every call) in the outer graph, as the resolver would have, and
    pass each part into the body as an operand of its own — so a causal part can be proven and a
    padding part given to the kind separately, as for attention outside any body."""
    from dataclasses import replace

    from attnrewrite.patterns.masks import split_term

    terms: list = []
    inner = [part for term in site.spec.bias for part in split_term(term, evaluator, site.score_rank)]
    for term in inner:
        operand = evaluator.same_operand(term.node) if term.node.op == "placeholder" else None
        if operand is None or None in evaluator.use.operands:
            terms.append(term)
            continue
        parts = split_term(replace(term, node=operand), evaluator.outer, site.score_rank)
        if len(parts) == 1 and parts[0].node is operand:
            terms.append(term)
            continue
        terms.extend(replace(part, node=add_operand(evaluator, part.node)) for part in parts)
    if terms != list(site.spec.bias):
        site.spec = replace(site.spec, bias=tuple(terms))


# --------------------------------------------------------------------------- flex_attention

#: flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options, score_mod_buffers,
#: mask_mod_buffers) -> (out, logsumexp, max_scores)
_FLEX_SCORE_MOD, _FLEX_BLOCK_MASK, _FLEX_SCALE = 3, 4, 5
_FLEX_SCORE_BUFFERS, _FLEX_MASK_BUFFERS = 7, 8


def is_flex(node: fx.Node) -> bool:
    """True for a ``flex_attention`` HOP node (``torch.nn.attention.flex_attention``)."""
    return hop_name(node) == FLEX


def _body(gm: fx.GraphModule, node: Any) -> fx.GraphModule | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        body = getattr(gm, node.target, None)
        return body if isinstance(body, fx.GraphModule) else None
    return None


def _returns_first_input(body: fx.GraphModule) -> bool:
    """The body returns its first placeholder unchanged (FlexAttention's identity score_mod)."""
    nodes = list(body.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    return bool(placeholders) and result is placeholders[0]


def _dense_mask(mask_mod: fx.GraphModule, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``mask_mod`` evaluated at every (b, h, q, kv) of ``shape``, as FlexAttention's dense reference does."""
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    b, h, m, n = (torch.arange(s) for s in shape)
    with torch.no_grad():
        return _vmap_for_bhqkv(mask_mod, prefix=())(b, h, m, n).expand(shape).bool()


def _additive_bias(score_mod: fx.GraphModule, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The bias ``score_mod`` adds to the scores, [B, H, Tq, Tk] float64, when it is ``score + bias(b, h, q,
    kv)`` — checked on two draws of random scores — else NotAttention (soft-capping, a scaling ...)."""
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    b, h, m, n = (torch.arange(s) for s in shape)
    mod = _vmap_for_bhqkv(score_mod, prefix=(0,))
    generator = torch.Generator().manual_seed(0)
    biases = []
    with torch.no_grad():
        for _ in range(2):
            scores = torch.randn(shape, generator=generator, dtype=torch.float64) * 4
            biases.append((mod(scores, b, h, m, n) - scores).expand(shape))
    # −∞ (a score_mod that masks) is a bias too: the resolver reads 0/−∞ constants as masks
    same = torch.allclose(biases[0], biases[1], rtol=1e-9, atol=1e-9)
    if not same or bool(biases[0].isnan().any()) or bool((biases[0] == float("inf")).any()):
        raise NotAttention("flex_attention: its score_mod is not the scores plus a bias of positions and heads "
                           "(soft-capping, a scaling ...); attnrewrite reads only such score_mods")
    return biases[0]


def _smallest(value: torch.Tensor) -> torch.Tensor:
    """``value`` with the batch and head dims reduced to 1 where it does not vary along them."""
    for dim in (0, 1):
        if value.shape[dim] > 1 and bool((value == value.narrow(dim, 0, 1)).all()):
            value = value.narrow(dim, 0, 1)
    return value.contiguous()


def _constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor, fake_mode: Any) -> fx.Node:
    """``value`` as a buffer of ``gm``, read by a new get_attr node before ``before``."""
    target = f"attnrewrite_{before.name}_{name}"
    gm.register_buffer(target, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["example_value"] = fake_mode.from_tensor(value) if fake_mode is not None else value
    return node


def match_flex(gm: fx.GraphModule, site: Site, fake_mode: Any = None) -> None:
    """Read a flex_attention node as an attention site (filling ``site``), or raise NotAttention.

    The mods are evaluated at every position of the site's (static) shapes, as FlexAttention's dense
    reference applies them: a ``score_mod`` that is the identity or adds a bias of (b, h, q, kv) (ALiBi,
    relative positions) becomes an additive mask term; a ``mask_mod`` that masks nothing is dropped, the
    causal triangle becomes ``causal=True``, any other (sliding windows, prefixes) a constant keep-mask.
    The constants are buffers of ``gm`` (Dynamo guards the static shapes they were computed at).  Mods
    that read tensors (document ids, lengths, learned tables) and soft-capping are left as they were;
    the spec is filled first, so the report counts them as attention.
    """
    node = site.anchor
    q, k, v = node.args[:3]
    if not all(isinstance(x, fx.Node) and rank(x) == 4 for x in (q, k, v)):
        raise NotAttention("flex_attention with q, k, v that are not 4-D graph tensors")
    q_shape, k_shape = hinted_shape(q), hinted_shape(k)
    scale = node.args[_FLEX_SCALE] if len(node.args) > _FLEX_SCALE else None
    outputs = {u.args[1]: u for u in node.users if u.op == "call_function" and len(u.args) == 2}
    spec = AttentionSpec(
        q=TensorRef(q), k=TensorRef(k), v=TensorRef(v),
        scale=float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None,
        kv_groups=max(1, q_shape[1] // k_shape[1]),
        module_path=owning_module([node]), pattern=FLEX)
    site.spec, site.module_path = spec, spec.module_path or site.module_path
    site.output = outputs.get(0)
    site.region = [node] + ([site.output] if site.output is not None else [])
    if site.output is None or set(outputs) != {0} or len(node.users) != 1:
        raise NotAttention("flex_attention: its log-sum-exp or max scores are used, which no kind supplies")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise NotAttention(f"flex_attention: the scale is not a compile-time constant ({scale!r})")
    if q_shape[1] % k_shape[1]:
        raise NotAttention(f"flex_attention: {q_shape[1]} query heads cannot share {k_shape[1]} kv heads")
    score_mod = _body(gm, node.args[_FLEX_SCORE_MOD])
    block_mask = node.args[_FLEX_BLOCK_MASK]
    mask_mod = _body(gm, block_mask[-1]) if isinstance(block_mask, (tuple, list)) and block_mask else None
    if score_mod is None or mask_mod is None:
        raise NotAttention("flex_attention: its score_mod or mask_mod is not a graph attnrewrite can read")
    if node.args[_FLEX_SCORE_BUFFERS] or node.args[_FLEX_MASK_BUFFERS]:
        raise NotAttention("flex_attention: its score_mod or mask_mod reads tensors (document ids, lengths, learned "
                           "tables ...); attnrewrite reads only mods of positions and heads")
    shape = (q_shape[0], q_shape[1], q_shape[2], k_shape[2])
    static = all(isinstance(s, int) for x in (q, k) for s in tensor_meta(x).shape)
    bias = None if _returns_first_input(score_mod) else _additive_bias(score_mod, shape)
    try:
        keep = _dense_mask(mask_mod, shape)
    except Exception as exc:  # noqa: BLE001 — an unreadable mask_mod is a reason, not a crash
        raise NotAttention(f"flex_attention: its mask_mod could not be evaluated ({type(exc).__name__}: {exc})") \
            from exc
    causal = bool(torch.equal(keep, torch.ones(shape[-2:], dtype=torch.bool).tril().expand(shape)))
    keep = None if causal or bool(keep.all()) else keep
    if (bias is not None or keep is not None) and not static:
        raise NotAttention("flex_attention under dynamic shapes with a score_mod or a mask_mod other than a "
                           "causal one: attnrewrite reads them at static shapes only")
    terms = []
    if bias is not None:
        terms.append(MaskTerm("add", _constant(gm, node, "bias", _smallest(bias).float(), fake_mode)))
    if keep is not None:
        terms.append(MaskTerm("keep", _constant(gm, node, "keep", _smallest(keep), fake_mode)))
    site.spec = spec = AttentionSpec(**{**spec.__dict__, "causal": causal, "bias": tuple(terms)})
    site.notes.append("flex_attention: " + ", ".join(
        ["score_mod " + ("adds a bias" if bias is not None else "identity"),
         "mask_mod " + ("causal" if causal else "a constant mask" if keep is not None else "full")]))


def _flex_shift_sensitive(q, k, v, score_mod, block_mask, scale) -> torch.Tensor:
    """FlexAttention's dense reference with :func:`~attnrewrite.rewriter.certify.shift_sensitive` for its softmax:
    the scores it normalises are FlexAttention's own (``_math_attention_inner``: ``score_mod`` applied to
    q·kᵀ·scale, −∞ where ``mask_mod`` is False), not a transcription of them."""
    from torch._higher_order_ops.flex_attention import _math_attention_inner

    groups = q.size(1) // k.size(1)  # (as math_attention broadcasts kv heads and batch)
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    k, v = (x.expand((q.size(0), *x.shape[1:])) for x in (k, v))
    _, scores = _math_attention_inner(q, k, v, score_mod, block_mask, scale, {})
    return shift_sensitive(scores) @ v


def certify_flex(site: Site, evaluator: GraphEvaluator, probes: int = 2,
                 scores: bool = False) -> tuple[bool, str | None, float]:
    """Check a flex_attention site's spec against FlexAttention's dense float64 reference
    (``mask_mod`` and ``score_mod`` applied at every position), on random q, k, v.

    ``scores=True`` (a kind that is not shift-invariant, see :mod:`attnrewrite.rewriter.certify`): as many score
    probes as well, FlexAttention's post-mod scores and the canonical form's masked scores both normalised by
    elu + 1, so a spec whose bias is off by a term softmax ignores (a constant per query) is refused."""
    try:
        from torch._higher_order_ops.flex_attention import math_attention
    except ImportError:
        return False, "could not certify: this torch has no FlexAttention reference", 0.0
    node, spec = site.anchor, site.spec
    gm = evaluator.gm
    score_mod = _body(gm, node.args[_FLEX_SCORE_MOD])
    mask_mod = _body(gm, node.args[_FLEX_BLOCK_MASK][-1])
    block_mask = (None,) * (len(node.args[_FLEX_BLOCK_MASK]) - 1) + (mask_mod,)
    scale = node.args[_FLEX_SCALE]
    worst = 0.0
    for probe in range(2 * probes if scores else probes):
        score_probe = probe >= probes
        env = {n: evaluator.random_like_meta(n) for n in (spec.q.node, spec.k.node, spec.v.node)}
        evaluator.evaluate({t.node for t in spec.bias}, env)  # the constant bias and keep-mask
        q, k, v = env[spec.q.node], env[spec.k.node], env[spec.v.node]
        with torch.no_grad(), float64_default():
            call = canonical.attention_call(spec, env.__getitem__, torch.float64, dropout=False)
            if score_probe:
                try:
                    got = _flex_shift_sensitive(q, k, v, score_mod, block_mask, scale)
                except ImportError:
                    return False, ("could not certify the scores: this torch's FlexAttention has no dense "
                                   "reference for them (_math_attention_inner)"), worst
                want = canonical_shift_sensitive(call)
            else:
                got = math_attention(q, k, v, score_mod, block_mask, scale, {})[0]
                want = exact_attention(call)
        rows = canonical.visible_rows(call).unsqueeze(-1).expand(want.shape)
        if got.shape != want.shape:
            return False, f"canonical form has shape {tuple(want.shape)}, site output {tuple(got.shape)}", worst
        err = float((got[rows] - want[rows]).abs().max() / (1.0 + want[rows].abs().max()))
        worst = max(worst, err)
        if not err <= CERTIFY_RTOL and score_probe:
            return False, (f"spec reproduces the site's softmax but not its scores (relative error {err:.2e} on "
                           f"random q, k, v, both normalised by elu + 1): they differ by a term the softmax "
                           f"ignores, such as a constant per query, which a kind that is not shift-invariant "
                           f"would not ignore"), worst
        if not err <= CERTIFY_RTOL:
            return False, f"spec does not reproduce the site (relative error {err:.2e} on random q, k, v)", worst
    return True, None, worst
