"""Hand-written attention: a score product, elementwise score ops, softmax, a value product.

Anchored on the softmax. From its input the matcher walks *up* through elementwise ops to
the q·kᵀ product (``matmul``, ``@``, ``bmm``, ``baddbmm`` or ``einsum``) and interprets each
op on the way as an affine change of the scores — a constant scale (``* s``, ``/ sqrt(d)``),
an additive bias (``+ mask``, T5's position bias, baddbmm's ALiBi), a mask (``masked_fill``,
``where``) or a cast — or as part of a *score modification*: the non-affine elementwise ops
(Gemma-2's soft-capping ``tanh(s / c) · c``) that the spec carries as FlexAttention's
``score_mod`` does, replayed from the graph.  Views that regroup the leading (batch, head)
dims of the scores (BLOOM's [B·H, T, T] ↔ [B, H, T, T]) are followed, and q, k, v are brought
to the softmax's layout.  From the softmax output it walks *down* through casts, dropout and
such views to the product with the values.  Anything else between the products — a second
product, the scores reused by a non-elementwise op, a mask before a score modification,
softmax over the wrong dim — is a reason to skip.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from attnrewrite.ir.capture import (
    SCORE_MODS,
    Call,
    canonical_name,
    constant_value,
    hinted_shape,
    is_float_tensor,
    is_log_softmax,
    is_scalar,
    normalize,
    owning_module,
    rank,
    reads_any,
    same_size,
    summed_over,
    symbolic_number,
    tensor_meta,
    unexpanded,
    written_out_softmax,
)
from attnrewrite.ir.spec import (
    MASKED_SCORE,
    AttentionSpec,
    MaskTerm,
    NotAttention,
    ScoreMod,
    Site,
    TensorRef,
)
from attnrewrite.patterns import sinks
from attnrewrite.patterns.grouped_kv import see_through_repeat
from attnrewrite.patterns.layout import (
    broadcast_over_batch,
    fold_constant_scale,
    keys_from_transposed,
    normalize_dim,
    ref_shape,
    relayout,
    term_steps,
    to_four_dims,
)

PRODUCTS = {"matmul", "baddbmm", "einsum"}
_AFFINE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "cast", "identity", "maximum"}
_SCORE_OPS = _AFFINE_OPS | SCORE_MODS | {"view"}
_PROB_OPS = {"cast", "identity", "dropout", "view"}
_SEARCH_DEPTH = 16


def is_anchor(call: Call) -> bool:
    return call.name == "softmax"


# --------------------------------------------------------------------------- walking the graph


def _path_up(node: fx.Node, depth: int) -> list[fx.Node] | None:
    """[product, ..., node]: the one path of score ops from a product up to ``node``."""
    call = normalize(node)
    if call is None:
        return None
    if call.name in PRODUCTS:
        return [node]
    if call.name not in _SCORE_OPS or depth == 0:
        return None
    found = [p for p in (_path_up(a, depth - 1) for a in call.tensor_args()) if p is not None]
    if len(found) > 1:
        raise NotAttention("the scores combine two products before the softmax")
    return found[0] + [node] if found else None


#: Starts the reason of a softmax that looks like part of an attention whose other part is in another
#: graph (a graph break inside the attention): ``attnrewrite.verify`` reports such sites.
SPLIT_BY_GRAPH_BREAK = "an attention split by a graph break"


#: Starts the reason of attention the matcher recognises but cannot read into a spec (a form this
#: version does not rewrite, such as gpt-oss's sink logits): reported as attention left as it was.
NOT_READ = "attention in a form this version does not rewrite"


def _concatenated_to_scores(node: object, depth: int) -> bool:
    """True when ``node`` is computed by score ops from a concatenation, on the last dim, of scores from
    a product with something else: learned sink logits (gpt-oss: ``softmax(cat([s, sink], -1))[..., :-1]``),
    null keys or registers added as extra score columns."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate):
        parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        r = rank(node)
        if not isinstance(parts, (list, tuple)) or r is None or not isinstance(dim, int) or dim % r != r - 1:
            return False
        return any(isinstance(part, fx.Node) and _path_up(part, depth - 1) is not None for part in parts)
    call = normalize(node)
    if call is None or call.name not in _SCORE_OPS:
        return False
    return any(_concatenated_to_scores(a, depth - 1) for a in call.tensor_args())


#: How far (in ops) :func:`unread_attention` looks from a softmax for the two products of an attention.
_UNREAD_DEPTH = 24
_PROJECTION_NAMES = {"linear", "addmm", "conv1d", "conv2d", "conv3d", "embedding"}
_IN_PLACE_WRITES = {"copy_", "masked_fill_", "fill_", "add_", "mul_", "sub_", "div_", "index_put_",
                    "masked_scatter_", "scatter_"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_projection(node: fx.Node) -> bool:
    """A layer with weights (``linear``, ``conv``, an embedding lookup, a module call): attention's
    scores and probabilities never pass through one between the two products."""
    return node.op == "call_module" or node.op in ("call_function", "call_method") and _op_name(node) in _PROJECTION_NAMES


def _is_weight(node: object) -> bool:
    """A parameter or buffer (a ``get_attr``, or a graph input Dynamo named after a module's parameter),
    possibly viewed or transposed: the operand of a projection, not an activation."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return True  # a Python constant
        if node.op == "get_attr" or node.op == "placeholder" and ("_parameters_" in node.name
                                                                  or "_buffers_" in node.name):
            return True
        if node.op == "placeholder" or canonical_name(node) not in ("transpose", "view") and _op_name(node) not in (
                "t", "permute", "contiguous", "reshape", "view", "transpose", "expand"):
            return False
        node = node.args[0]
    return False


def _activation_product(node: fx.Node) -> bool:
    """A product of two activations (no weight operand): q·kᵀ, or probabilities times values."""
    call = normalize(node)
    if call is None or call.name not in PRODUCTS:
        return False
    operands = [a for a in call.args if isinstance(a, fx.Node)]
    return len(operands) >= 2 and not any(_is_weight(a) for a in operands)


def _written_into(node: fx.Node) -> list[fx.Node]:
    """What is written into ``node`` in place (``buf[...] = x``, ``buf.copy_(x)``): data reaching it
    other than through its arguments."""
    written = []
    for user in node.users:
        if user.op == "call_function" and _op_name(user) == "setitem" and user.args[0] is node:
            written.extend(a for a in user.args[2:] if isinstance(a, fx.Node))
        elif user.op == "call_method" and user.target in _IN_PLACE_WRITES and user.args[0] is node:
            written.extend(a for a in (*user.args[1:], *user.kwargs.values()) if isinstance(a, fx.Node))
    return written


def _feeds(node: fx.Node) -> list[fx.Node]:
    """What ``node``'s value comes from: its arguments, and what is written into it in place."""
    return [*node.all_input_nodes, *_written_into(node)]


def _fed(node: fx.Node) -> list[fx.Node]:
    """Where ``node``'s value goes: its users, or for a write into a buffer the buffer's other users."""
    if _op_name(node) == "setitem" and isinstance(node.args[0], fx.Node):
        return [u for u in node.args[0].users if u is not node]
    return list(node.users)


def _nearest_product(starts, step, unread: set[str], passed: set[str] | None = None) -> fx.Node | None:
    """The nearest product of two activations from ``starts`` (breadth first, ``step`` giving a node's next
    nodes, at most :data:`_UNREAD_DEPTH` ops, never through a projection), or None; the names of the ops on the
    way the matcher does not read are added to ``unread``, those of every op visited to ``passed``."""
    frontier, seen = [(n, 1) for n in starts], set()
    while frontier:
        node, depth = frontier.pop(0)
        if node in seen or depth > _UNREAD_DEPTH or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        if _is_projection(node):
            continue
        if _activation_product(node):
            return node
        if canonical_name(node) is None and _op_name(node) != "setitem":
            unread.add(_op_name(node))
        if passed is not None:
            passed.add(canonical_name(node) or _op_name(node))
        frontier.extend((n, depth + 1) for n in step(node))
    return None


def unread_attention(softmax: fx.Node) -> str | None:
    """Why ``softmax`` is attention in a form the matcher does not read, or None when it does not look like
    attention: its input comes from a product of two activations and its output meets another product,
    each within a few ops that include no projection (so a router's ``softmax(linear(h))`` or a
    classifier's logits are not attention), following in-place writes into buffers (Longformer's chunked
    scores are written into ``new_zeros`` buffers, then viewed).  The ops between are named in the reason."""
    unread: set[str] = set()
    changed: set[str] = set()  # the ops between the two products
    score_product = _nearest_product(softmax.all_input_nodes, _feeds, unread, changed)
    if score_product is None:
        return None
    value_product = _nearest_product(softmax.users, _fed, unread, changed)
    if value_product is None:
        return None
    through = (f"through ops not read here ({', '.join(sorted(unread))})" if unread else
               f"through ops that change the scores or probabilities ({', '.join(sorted(changed - {'softmax'}))})")
    return (f"the scores come from a product of two activations ({score_product.name}) and the probabilities "
            f"meet a product ({value_product.name}), {through}")


def unread_normaliser(node: fx.Node) -> str | None:
    """Why ``node``, which no family anchors on, normalises attention scores in a form the matcher does not read,
    or None: a ``log_softmax`` whose result is changed before it is exponentiated (a mask added to the
    log-probabilities, with no renormalisation), or ``e / (Σ e + c)`` with ``e = exp(…)`` (softmax₁, an attention
    sink of fixed logit) — in either case with the two products of an attention around it
    (:func:`unread_attention`).  ``exp(log_softmax(x))`` and ``e / Σ e`` are softmaxes, read at their own nodes."""
    if is_log_softmax(node):
        if all(canonical_name(user) == "exp" and written_out_softmax(user) is not None for user in node.users):
            return None
        what = "a log_softmax changed before it is exponentiated (not renormalised)"
    elif canonical_name(node) == "div" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        e, den = node.args[0], node.args[1]
        if (not isinstance(e, fx.Node) or canonical_name(e) != "exp" or canonical_name(den) != "add"
                or written_out_softmax(node) is not None):
            return None
        sums = [summed_over(a) for a in den.args[:2]]
        if not any(reduced is not None and reduced[0] is e for reduced in sums):
            return None
        what = "exponentiated scores divided by their sum plus an extra term in its denominator (softmax₁, a sink)"
    else:
        return None
    unread = unread_attention(node)
    return None if unread is None else f"{NOT_READ}: {what}; {unread}"


def _raise_if_unread_attention(softmax: fx.Node) -> None:
    """NotAttention(:data:`NOT_READ` …) when ``softmax`` is attention by :func:`unread_attention`: reported as
    attention left as it was, never as a near miss."""
    unread = unread_attention(softmax)
    if unread is not None:
        raise NotAttention(f"{NOT_READ}: {unread}")


def _from_graph_input(node: fx.Node, depth: int) -> bool:
    """True when ``node`` is a graph input, or computed from one by score ops (scale, mask, cast)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    call = normalize(node)
    if call is None or call.name not in _SCORE_OPS or depth == 0:
        return False
    return any(_from_graph_input(a, depth - 1) for a in call.tensor_args())


def _reaches_output(node: fx.Node, depth: int) -> bool:
    """True when ``node`` (or a cast, view or dropout of it) is an output of the graph."""
    for user in node.users:
        if user.op == "output":
            return True
        call = normalize(user)
        if call is not None and call.name in _PROB_OPS and depth > 0 and _reaches_output(user, depth - 1):
            return True
    return False


def _ends_at_a_graph_break(node: fx.Node) -> bool:
    """False only when ``node``'s graph is Dynamo's graph of a frame that returned (not one cut at a graph break):
    what leaves such a graph goes back to the caller of the compiled code, not on to the rest of the frame.  True
    for any other graph (a higher-order op's body, a graph not from Dynamo)."""
    reason = getattr(node.graph.owning_module, "compile_subgraph_reason", None)
    return bool(getattr(reason, "graph_break", True))


def _meets_values(probs: fx.Node) -> bool:
    try:
        return _path_down(probs, _SEARCH_DEPTH) is not None
    except NotAttention:
        return False


def _path_down(node: fx.Node, depth: int, transposed: bool = False) -> list[fx.Node] | None:
    """[node, ..., product]: from the probabilities down through casts/dropout/views to a product.

    The probabilities are the left operand of the value product — or, once transposed
    ([.., Tk, Tq]), its right operand: ``v @ p.transpose(-2, -1)`` with channels-first values
    [.., Dv, Tk] is (p @ vᵀ)ᵀ, attention written for NCHW feature maps."""
    paths = []
    for user in node.users:
        call = normalize(user)
        if call is not None and call.name == "matmul" and call.args[1] is node and call.args[0] is not node:
            if not transposed:
                raise NotAttention("the probabilities are the right operand of the value product")
            paths.append([node, user])
            continue
        if call is None or not call.args or call.args[0] is not node and call.name != "einsum":
            continue
        if call.name in ("matmul", "einsum"):
            if transposed:
                raise NotAttention("the transposed probabilities are the left operand of a product")
            paths.append([node, user])
        elif call.name in _PROB_OPS and depth > 0:
            rest = _path_down(user, depth - 1, transposed)
            if rest is not None:
                paths.append([node] + rest)
        elif call.name in ("transpose", "permute") and not transposed and depth > 0 and _swaps_last_two(call):
            rest = _path_down(user, depth - 1, transposed=True)
            if rest is not None:
                paths.append([node] + rest)
    if len(paths) > 1:
        raise NotAttention("the probabilities feed more than one product")
    return paths[0] if paths else None


def _swaps_last_two(call: Call) -> bool:
    """A transpose or permute that swaps the last two dims and nothing else."""
    r = rank(call.node)
    if r is None or r < 2:
        return False
    if call.name == "permute":
        dims = call.args[1]
        return all(isinstance(d, int) for d in dims) and [normalize_dim(d, r) for d in dims] == list(
            range(r - 2)) + [r - 1, r - 2]
    dims = call.args[1:3]
    return all(isinstance(d, int) for d in dims) and {normalize_dim(d, r) for d in dims} == {r - 2, r - 1}


def _lead_view(node: fx.Node, before: fx.Node, what: str) -> tuple[tuple[int, ...], tuple | None]:
    """``node`` is a view of ``before`` ([*A, Tq, Tk] → [*B, Tq, Tk]) that regroups only the leading
    (batch, head) dims: returns B's hinted sizes and, when the view spells them out, its arguments
    for them (ints, -1 or size nodes); NotAttention for any other view."""
    src, dst = tensor_meta(before), tensor_meta(node)
    if src is None or dst is None or src.dim() < 3 or dst.dim() < 3:
        raise NotAttention(f"a view of the {what} to or from fewer than 3 dims")
    if not (same_size(src.shape[-1], dst.shape[-1]) and same_size(src.shape[-2], dst.shape[-2])):
        raise NotAttention(f"a view of the {what} that moves the query or key dim")
    sizes = normalize(node).args[1]
    spelled = tuple(sizes[:-2]) if isinstance(sizes, tuple) and len(sizes) == dst.dim() else None
    return hinted_shape(node)[:-2], spelled


# --------------------------------------------------------------------------- the score chain


class _Scores:
    """The scores seen so far as mod(scale · (q kᵀ) · Π factors) + Σ terms, in a leading layout.

    ``terms`` pairs each mask term with the leading sizes of the scores when it was added (a
    view of the scores may regroup batch and heads afterwards).  Once a non-affine elementwise
    op is met, it and every later op that is not a cast or a mask term form the score
    modification (``mod_chain``), replayed by the rewrite.
    """

    def __init__(self, lead: tuple[int, ...]):
        self.scale = 1.0
        self.factors: list[tuple[fx.Node, int]] = []
        self.terms: list[tuple[MaskTerm, tuple[int, ...]]] = []
        self.term_sizes: list[tuple | None] = []  # per term: the view's arguments for its leading sizes
        self.value_checks: list[fx.Node] = []
        self.softmax_dtype: torch.dtype | None = None
        self.lead = lead
        self.view_sizes: tuple | None = None  # the last view's arguments for the leading sizes
        self.mod_source: fx.Node | None = None
        self.mod_chain: list[tuple[fx.Node, bool]] = []

    @property
    def modified(self) -> bool:
        return self.mod_source is not None

    def term_nodes(self) -> list[fx.Node]:
        return [t.node for t, _ in self.terms]

    def scale_terms(self, c: float) -> None:
        self.terms = [(t.scaled(c), lead) for t, lead in self.terms]

    def modify(self, node: fx.Node, prev: fx.Node, what: str) -> None:
        """``node`` (reading the scores ``prev``) is part of the score modification."""
        if not self.modified:
            if self.terms:
                raise NotAttention(f"a mask or bias is applied before a score modification ({what})")
            self.mod_source = prev
        self.mod_chain.append((node, True))

    def pass_through(self, node: fx.Node) -> None:
        if self.modified:
            self.mod_chain.append((node, False))

    def multiply(self, node: fx.Node, prev: fx.Node, other, power: int, what: str) -> None:
        c = constant_value(other)
        if c is not None:
            if c > 0 and not self.modified:
                self.scale *= c if power == 1 else 1.0 / c
                self.scale_terms(c if power == 1 else 1.0 / c)
            elif c > 0:  # after the modification: part of it; later terms are not scaled
                self.scale_terms(c if power == 1 else 1.0 / c)
                self.modify(node, prev, what)
            elif self.terms:
                raise NotAttention(f"scores {what} a non-positive number ({c}) after a mask or bias")
            else:
                self.modify(node, prev, f"{what} {c}")
            return
        if not isinstance(other, fx.Node):
            raise NotAttention(f"scores {what} {other!r}")
        t = tensor_meta(other)
        if not self.modified and (is_scalar(other) or (t is not None and (t.dim() == 0 or t.shape[-1] == 1))):
            # constant along the keys (a SymFloat scale, a per-query/head temperature): folded into q
            if any(term.kind == "add" for term, _ in self.terms):
                raise NotAttention(f"scores {what} a tensor after a bias was added")
            self.factors.append((other, power))
        elif is_scalar(other) or (t is not None and t.dtype.is_floating_point):
            self.modify(node, prev, f"{what} {other.name}")  # (refused after a mask or bias)
        else:
            raise NotAttention(f"scores {what} {other.name}, not a float tensor")

    def add_term(self, kind: str, node, coeff: float = 1.0) -> None:
        if not isinstance(node, fx.Node):
            raise NotAttention(f"a constant ({node!r}) is added to the scores")
        if kind == "add" and not is_float_tensor(node) and not _is_bool_or_int_tensor(node):
            raise NotAttention(f"{node.name}, not a tensor, is added to the scores")
        # a bool or integer tensor added to the scores adds its values: s + m is s + m.to(s.dtype), an
        # additive bias like any other (the canonical form casts it)
        self.terms.append((MaskTerm(kind, unexpanded(node), coeff=coeff), self.lead))
        self.term_sizes.append(self.view_sizes)

    def masked_value(self, value) -> None:
        """A value written into masked positions: must be -inf or a large negative constant."""
        c = constant_value(value)
        if c is not None:
            if c > MASKED_SCORE:
                raise NotAttention(f"scores are set to {c}, which is not a mask value (<= {MASKED_SCORE:g})")
        elif isinstance(value, fx.Node):
            self.value_checks.append(value)
        else:
            raise NotAttention(f"scores are set to {value!r}")


def _is_bool_or_int_tensor(node) -> bool:
    t = tensor_meta(node)
    return t is not None and (t.dtype == torch.bool or not (t.dtype.is_floating_point or t.dtype.is_complex))


def _interpret(chain: list[fx.Node]) -> _Scores:
    """Read the ops between the score product (chain[0]) and the softmax input (chain[-1])."""
    state = _Scores(hinted_shape(chain[0])[:-2])
    first = normalize(chain[0])
    if first.name == "baddbmm":
        bias, beta, alpha = first.args[0], first.kwargs["beta"], first.kwargs["alpha"]
        if constant_value(alpha) is not None and constant_value(alpha) > 0:
            state.scale *= constant_value(alpha)
        elif isinstance(alpha, fx.Node) and is_scalar(alpha):
            state.factors.append((alpha, 1))  # a SymFloat under dynamic=True
        else:
            raise NotAttention(f"baddbmm with alpha {alpha!r}")
        if constant_value(beta) is None:
            raise NotAttention(f"baddbmm with a beta that is not a compile-time constant ({beta})")
        if constant_value(beta) != 0.0:
            state.add_term("add", bias, coeff=constant_value(beta))
    for prev, node in zip(chain, chain[1:]):
        call = normalize(node)
        name, args = call.name, call.args
        if name != "view" and hinted_shape(node) != hinted_shape(prev):
            raise NotAttention(f"{node.name} broadcasts the scores to a larger shape")
        if name == "view":
            if state.modified:
                raise NotAttention("a view of the scores after a score modification")
            state.lead, state.view_sizes = _lead_view(node, prev, "scores")
        elif name == "cast":
            meta = tensor_meta(node)
            if meta is None or not meta.dtype.is_floating_point:
                raise NotAttention("the scores are cast to a non-float dtype")
            if meta.dtype == torch.float32 and tensor_meta(prev).dtype in (torch.float16, torch.bfloat16):
                state.softmax_dtype = torch.float32
            state.pass_through(node)
        elif name == "identity":
            state.pass_through(node)
        elif name == "mul":
            state.multiply(node, prev, args[1] if args[0] is prev else args[0], 1, "multiplied by")
        elif name == "div":
            if args[0] is prev:
                state.multiply(node, prev, args[1], -1, "divided by")
            else:
                state.modify(node, prev, "the scores are a divisor")
        elif name in ("add", "sub"):
            alpha = constant_value(call.kwargs.get("alpha", 1))
            other = args[1] if args[0] is prev else args[0]
            if alpha is None:
                raise NotAttention(f"{name} with a non-constant alpha")
            if constant_value(other) is not None or (name == "sub" and args[1] is prev):
                state.modify(node, prev, f"{name} of a constant" if constant_value(other) is not None
                             else "the scores are negated")
            elif args[0] is prev:
                state.add_term("add", other, coeff=(-1.0 if name == "sub" else 1.0) * alpha)
                state.pass_through(node)
            else:
                if alpha != 1:
                    raise NotAttention("scores scaled by add's alpha")
                state.add_term("add", other)
                state.pass_through(node)
        elif name == "masked_fill":
            if args[0] is not prev:
                raise NotAttention("the scores are used as a mask")
            state.masked_value(args[2])
            state.add_term("drop", args[1])
            state.pass_through(node)
        elif name == "where":
            cond, a, b = args
            if cond is prev:
                raise NotAttention("the scores are used as a condition")
            state.masked_value(b if a is prev else a)
            state.add_term("keep" if a is prev else "drop", cond)
            state.pass_through(node)
        elif name == "maximum" or name == "clamp" and _floor_of_clamp(call) is not None:
            # max(s, c) with c at or below the masked value: it changes no score that is not masked, and a
            # masked one stays masked (HF's XGLM, older OPT: torch.max(s, finfo.min) after the mask)
            floor = (args[1] if args[0] is prev else args[0]) if name == "maximum" else _floor_of_clamp(call)
            state.masked_value(floor)
            state.pass_through(node)
        elif name in SCORE_MODS:
            state.modify(node, prev, name)
        else:
            raise NotAttention(f"{name} applied to the scores")
    return state


def _floor_of_clamp(call: Call):
    """The lower bound of ``clamp(s, min=c)`` without an upper bound when c is a tensor or a constant at
    or below the masked value (a floor that only touches masked scores), else None (a score modification)."""
    lower = call.args[1] if len(call.args) > 1 else call.kwargs.get("min")
    upper = call.args[2] if len(call.args) > 2 else call.kwargs.get("max")
    if upper is not None or lower is None:
        return None
    c = constant_value(lower)
    if c is not None:
        return lower if c <= MASKED_SCORE else None
    return lower if isinstance(lower, fx.Node) else None


def _check_scores_not_reused(state: _Scores, up: list[fx.Node], down: list[fx.Node], v: fx.Node) -> None:
    """Biases, masks, factors, the modification's other inputs and the values must not read the
    scores or probabilities: ``softmax(s + s.mean(-2))`` or ``p @ (p @ v)`` are not elementwise."""
    forbidden = set(up) | set(down[:-1])
    mod_inputs = [a for n, recompute in state.mod_chain if recompute for a in n.all_input_nodes]
    candidates = state.term_nodes() + [n for n, _ in state.factors] + state.value_checks + mod_inputs + [v]
    chain = set(up) | {n for n, _ in state.mod_chain}
    for node in candidates:
        if node not in chain and reads_any(node, forbidden, up[0]):
            raise NotAttention(f"the scores are reused in {node.name}, which is not elementwise")


# --------------------------------------------------------------------------- products


def _qk_operands(product: fx.Node) -> tuple[TensorRef, TensorRef]:
    call = normalize(product)
    if call.name == "baddbmm":
        return TensorRef(call.args[1]), keys_from_transposed(call.args[2])
    if call.name == "matmul":
        a, b = call.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise NotAttention("the score product has a non-tensor operand")
        return TensorRef(a), keys_from_transposed(b)
    return _einsum_qk(call)


def _parse_einsum(call: Call) -> tuple[list[str], str]:
    equation = call.args[0]
    if not isinstance(equation, str) or "->" not in equation or len(call.args) != 3:
        raise NotAttention("einsum without an explicit output or with more than two operands")
    lhs, out = equation.replace(" ", "").split("->")
    ins = lhs.split(",")
    if any("..." in s for s in ins + [out]):
        ins, out = [s.replace("...", "") for s in ins], out.replace("...", "")
        if len({len(s) for s in ins}) != 1:
            raise NotAttention("einsum with ellipses of different ranks")
    return ins, out


def _permutation(src: str, dst: str) -> tuple[int, ...] | None:
    if sorted(src) != sorted(dst):
        return None
    return tuple(src.index(c) for c in dst)


def _einsum_ref(node: fx.Node, letters: str, target: str) -> TensorRef:
    extra = rank(node) - len(letters)  # leading ellipsis dims stay first
    perm = _permutation(letters, target)
    if perm is None:
        raise NotAttention(f"einsum operand {letters} cannot be laid out as {target}")
    if perm == tuple(range(len(perm))):
        return TensorRef(node)
    return TensorRef(node).then("permute", tuple(range(extra)) + tuple(extra + p for p in perm))


def _einsum_qk(call: Call) -> tuple[TensorRef, TensorRef]:
    (a, b), out = _parse_einsum(call)
    batch, i, j = out[:-2], out[-2], out[-1]
    (d,) = set(a) & set(b) - set(out) or {None}
    if d is None or set(a) != set(batch) | {i, d} or set(b) != set(batch) | {j, d}:
        raise NotAttention(f"einsum {call.args[0]!r} is not a q·kᵀ product")
    return _einsum_ref(call.args[1], a, batch + i + d), _einsum_ref(call.args[2], b, batch + j + d)


def _is_transpose_of_probs(node: fx.Node) -> bool:
    call = normalize(node)
    return call is not None and call.name in ("transpose", "permute") and _swaps_last_two(call)


def _pv_operand(product: fx.Node, probs: fx.Node) -> tuple[TensorRef, tuple]:
    """The values ref, and the steps from [batch, Tq, Dv] to the product's output layout."""
    call = normalize(product)
    if call.name == "matmul":
        if call.args[1] is probs and _is_transpose_of_probs(probs):  # v @ pᵀ = (p @ vᵀ)ᵀ: values on the left
            return keys_from_transposed(call.args[0]), (("transpose", -2, -1),)  # (vᵀ's own transpose undone)
        if call.args[0] is not probs:
            raise NotAttention("the probabilities are the right operand of the value product")
        return TensorRef(call.args[1]), ()
    (p, v), out = _parse_einsum(call)
    if call.args[1] is not probs:
        raise NotAttention("the probabilities are the second operand of the value einsum")
    j = (set(p) & set(v) - set(out)) or {None}
    (j,) = j
    batch = "".join(c for c in out if c in p and c in v)
    i = "".join(c for c in p if c not in v)
    e = "".join(c for c in v if c not in p)
    if j is None or len(i) != 1 or len(e) != 1 or set(out) != set(batch) | {i, e} or p != batch + i + j:
        raise NotAttention(f"einsum {call.args[0]!r} is not a probabilities·v product")
    perm = _permutation(batch + i + e, out)
    extra = rank(product) - len(out)  # leading ellipsis dims stay first
    steps = () if perm == tuple(range(len(perm))) else (
        ("permute", tuple(range(extra)) + tuple(extra + q for q in perm)),)
    return _einsum_ref(call.args[2], v, batch + j + e), steps


# --------------------------------------------------------------------------- the family


def region_between(sources: set[fx.Node], output: fx.Node) -> list[fx.Node]:
    """Nodes on a path from ``sources`` (excluded) to ``output`` (included), in graph order."""
    above: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in above or node in sources:
            continue
        above.add(node)
        stack.extend(node.all_input_nodes)
    reach: dict[fx.Node, bool] = {}
    order = [n for n in output.graph.nodes if n in above]
    for node in order:
        reach[node] = any(n in sources or reach.get(n, False) for n in node.all_input_nodes)
    return [n for n in order if reach[n]]


def _term_steps(term: MaskTerm, lead: tuple[int, ...], score_lead: tuple[int, ...], score_sizes: tuple,
                lead_sizes: tuple, donor: TensorRef | None = None) -> tuple:
    """Steps that make ``term`` (added when the scores had leading sizes ``lead``, spelled ``lead_sizes``)
    broadcast against the canonical 4-D scores, whose leading sizes at the softmax are ``score_lead``
    (as traced: ``score_sizes``).  ``donor`` (an operand in the score product's layout, e.g. q) lends the
    sizes of the viewed scores the view leaves to -1."""
    shape = ref_shape(TensorRef(term.node, term.steps))
    steps: tuple = ()
    if len(shape) > 2 and tuple(lead) != tuple(score_lead):
        if all(s == 1 for s in shape[:-2]):
            steps = (("squeeze", 0),) * (len(shape) - 2)  # broadcasts over any batch/head layout
            shape = shape[-2:]
        elif tuple(shape[:-2]) == tuple(lead):
            steps = relayout(len(lead), score_sizes)
            shape = tuple(score_lead) + tuple(shape[-2:])
        elif _broadcasts(shape[:-2], lead):  # Swin: [1, nW, 1, N, N] against scores viewed [B, nW, H, N, N]
            steps = _expanded(shape, lead, lead_sizes, term, donor) + relayout(len(lead), score_sizes)
            shape = tuple(score_lead) + tuple(shape[-2:])
        else:
            raise NotAttention(f"the bias or mask {term.node.name} cannot follow the view of the scores")
    if len(score_lead) > 2:
        steps += _merged_lead_steps(term, shape, score_lead)
    return term.steps + steps + term_steps(len(shape), len(score_lead) + 2)


def _broadcasts(term_lead: tuple, lead: tuple) -> bool:
    """The term's leading dims broadcast against ``lead`` (right-aligned, each 1 or equal)."""
    return len(term_lead) <= len(lead) and all(t in (1, s) for t, s in zip(reversed(term_lead), reversed(lead)))


def _expanded(shape: tuple, lead: tuple, lead_sizes: tuple, term: MaskTerm, donor: TensorRef | None) -> tuple:
    """Steps that expand a term broadcasting against the viewed scores' leading dims to their full sizes
    (so that regrouping them regroups the term alike).  The sizes it broadcasts over are the view's (ints,
    or size nodes under dynamic shapes); where the view leaves one to -1 (Swin's ``attn.view(-1, nW, H, N,
    N)``), all are read when the steps run from ``donor`` regrouped as the view regroups the scores, so a
    dynamic batch stays dynamic."""
    full = len(lead) + 2
    padded = (1,) * (full - len(shape)) + tuple(shape)
    spelled = lead_sizes if lead_sizes is not None and len(lead_sizes) == len(lead) else (None,) * len(lead)
    broadcast = tuple(d for d, (t, s) in enumerate(zip(padded[:-2], lead)) if t != s)
    unsqueeze = (("unsqueeze", 0),) * (full - len(shape))
    if all(isinstance(spelled[d], (int, fx.Node)) and spelled[d] != -1 for d in broadcast):
        sizes = tuple(spelled[d] if d in broadcast else -1 for d in range(len(lead)))
        return unsqueeze + (("expand", sizes + (-1, -1)),)
    viewed = _viewed_like(donor, lead, lead_sizes)
    if viewed is None:
        raise NotAttention(f"the bias or mask {term.node.name} broadcasts over a dim of the viewed scores whose "
                           "size the view does not spell out")
    return unsqueeze + (("expand_like", viewed.node, viewed.steps, broadcast, full, tuple(ref_shape(viewed))),)


def _viewed_like(donor: TensorRef | None, lead: tuple, lead_sizes: tuple | None) -> TensorRef | None:
    """``donor`` (in the score product's layout) regrouped into the viewed scores' leading dims ``lead``
    (spelled ``lead_sizes``), or None when it cannot be (then the sizes are not known)."""
    if donor is None or lead_sizes is None or len(lead_sizes) != len(lead):
        return None
    donor_shape = ref_shape(donor)
    product_rank = len(donor_shape) - 2
    try:
        steps = relayout(product_rank, lead_sizes)
    except NotAttention:
        return None
    viewed = TensorRef(donor.node, donor.steps + steps)
    try:
        shape = ref_shape(viewed)
    except (RuntimeError, NotAttention):
        return None
    return viewed if tuple(shape[:len(lead)]) == tuple(lead) else None


def _merged_lead_steps(term: MaskTerm, shape: tuple, score_lead: tuple[int, ...]) -> tuple:
    """Steps that keep ``term`` aligned with scores of rank > 4, whose leading dims but the last are
    merged into one (:func:`to_four_dims`): the term's own share of the merged dims must be all ones
    (squeezed away), or the scores' sizes there with ones in the scores wherever the term has no dim
    (merged alike)."""
    merged = len(score_lead) - 1
    own = len(shape) - 3  # how many of the merged dims the term spells out (its leading ones)
    if own <= 0:
        return ()
    if all(s == 1 for s in shape[:own]):
        return (("squeeze", 0),) * own
    if own <= merged and all(s == 1 for s in score_lead[:merged - own]) and tuple(shape[:own]) == tuple(
            score_lead[merged - own:merged]):  # the merged dims the term leaves out are ones in the scores too
        return (("flatten", 0, own - 1),) if own > 1 else ()
    raise NotAttention(f"the bias or mask {term.node.name} {tuple(shape)} cannot follow the merged batch dims "
                       f"of rank-{len(score_lead) + 2} scores")


def _sink_column(logits: object) -> sinks.SinkColumn | None:
    """The column of sink logits concatenated to the scores at the softmax's input (:mod:`.sinks`), or None."""
    try:
        return sinks.split(logits, lambda part: _path_up(part, _SEARCH_DEPTH) is not None)
    except NotAttention as exc:
        raise NotAttention(f"{NOT_READ}: {exc}") from None


def _down_past_the_sink(anchor: fx.Node, column: sinks.SinkColumn) -> tuple[list[fx.Node], fx.Node]:
    """:func:`_path_down` for a softmax with a sink column: through the slice that drops it (the second value)
    to the value product."""
    try:
        chain = sinks.sliced_off(anchor, column)
        rest = _path_down(chain[-1], _SEARCH_DEPTH)
    except NotAttention as exc:
        raise NotAttention(f"{NOT_READ}: {exc}") from None
    if rest is None:
        raise NotAttention(f"{NOT_READ}: the probabilities without the sink column never meet the values in a product")
    return [anchor] + chain + rest[1:], chain[-1]


def _checked_lead(ref: TensorRef, lead: tuple[int, ...], what: str) -> None:
    if tuple(ref_shape(ref)[:-2]) != tuple(lead):
        raise NotAttention(f"the {what} broadcast over the batch or heads of viewed scores")


def match(anchor: fx.Node) -> Site:
    """Match the softmax ``anchor``; raises :class:`NotAttention` with the reason otherwise."""
    softmax = normalize(anchor)
    r = rank(anchor)
    if r is None or r < 2:
        raise NotAttention("softmax of a non-tensor or a vector")
    dim = softmax.kwargs["dim"]
    if not isinstance(dim, int):
        raise NotAttention("softmax without a constant dim")
    if normalize_dim(dim, r) != r - 1:
        raise NotAttention(f"softmax over dim {dim} of a rank-{r} tensor, not the key dim")

    column = _sink_column(softmax.args[0])
    up = _path_up(column.scores if column is not None else softmax.args[0], _SEARCH_DEPTH)
    if up is None:
        if _from_graph_input(softmax.args[0], _SEARCH_DEPTH) and _meets_values(anchor):
            raise NotAttention(f"{SPLIT_BY_GRAPH_BREAK}: the scores are a graph input and the probabilities meet a "
                               "value product (q·kᵀ is in another graph)")
        if _concatenated_to_scores(softmax.args[0], _SEARCH_DEPTH):
            raise NotAttention(f"{NOT_READ}: extra score columns (sink logits, null keys) are concatenated to "
                               "q·kᵀ before the softmax")
        unread = unread_attention(anchor)
        if unread is not None:
            raise NotAttention(f"{NOT_READ}: {unread}")
        raise NotAttention("no score product (q·kᵀ) before the softmax")
    try:
        state = _interpret(up)
    except NotAttention as exc:
        # scores from a product whose probabilities meet the values: attention, in a form not read here
        # (a sink column, sliced off after the softmax, is attention's by itself)
        if not str(exc).startswith(NOT_READ) and (column is not None or _path_down(anchor, _SEARCH_DEPTH) is not None):
            raise NotAttention(f"{NOT_READ}: {exc}") from None
        raise
    if softmax.kwargs.get("dtype") == torch.float32 or column is not None and column.upcast:
        state.softmax_dtype = torch.float32

    probs_sliced = None  # with sink logits: the probabilities without the sink column, what the values meet
    if column is None:
        down = _path_down(anchor, _SEARCH_DEPTH)
    else:
        down, probs_sliced = _down_past_the_sink(anchor, column)
    if down is None:
        if _reaches_output(anchor, _SEARCH_DEPTH) and _ends_at_a_graph_break(anchor):
            raise NotAttention(f"{SPLIT_BY_GRAPH_BREAK}: the scores are a product and the probabilities leave the "
                               "graph (their value product is in another graph)")
        if _reaches_output(anchor, _SEARCH_DEPTH):
            raise NotAttention("the probabilities are returned by the compiled code, which multiplies no values with "
                               "them (a pointer network's or a similarity's probabilities)")
        # probabilities changed before they meet the values (a per-head gate, a mask applied after the softmax and
        # renormalised, Differential attention's difference of two softmaxes): attention all the same, left as it
        # was, which must be said
        _raise_if_unread_attention(anchor)
        raise NotAttention("the probabilities never meet the values in a product")
    pv, probs_last = down[-1], down[-2]
    try:
        v_ref, out_layout = _pv_operand(pv, probs_last)
    except NotAttention:  # a product with weights first (talking heads mix the probabilities of the heads)
        _raise_if_unread_attention(anchor)
        raise
    dropout_p, dropout_node = 0.0, None
    pv_view_sizes = None
    for prev, node in zip(down, down[1:-1]):
        call = normalize(node)
        if call.name == "view":
            pv_view_sizes = _lead_view(node, prev, "probabilities")[1]
        if call.name == "dropout":
            p, training = call.kwargs["p"], call.kwargs["training"]
            if training is False:
                continue  # eval mode: p does not matter (and may be symbolic under dynamic=True)
            symbolic = symbolic_number(p)
            if training is not True or not (isinstance(p, (int, float)) or symbolic):
                raise NotAttention("dropout with a probability or mode that is not a constant")
            dropout_p, dropout_node = symbolic if symbolic else (float(p), None)
    escape = any(u not in down for n in down[:-1] for u in n.users)
    _check_scores_not_reused(state, up, down, v_ref.node)

    try:
        q_ref, k_ref = _qk_operands(up[0])
    except NotAttention:  # a product with weights last (talking heads mix the scores of the heads)
        _raise_if_unread_attention(anchor)
        raise
    k_ref, k_groups = see_through_repeat(k_ref)
    v_ref, v_groups = see_through_repeat(v_ref)
    if k_groups != v_groups:  # only one side repeated: keep both repeated
        k_ref, v_ref, k_groups = _qk_operands(up[0])[1], _pv_operand(pv, probs_last)[0], 1
    q_ref, q_scale = fold_constant_scale(q_ref)
    k_ref, k_scale = fold_constant_scale(k_ref)

    # Layouts: the product sees [*P, T, D]; the softmax [*S, Tq, Tk]; the value product [*P2, ...].
    # Views between them regroup only the leading dims; q, k, v are brought to S, then to 4-D.
    product_lead, score_lead, pv_lead = (hinted_shape(n)[:-2] for n in (up[0], anchor, probs_last))
    # the sizes to regroup into: as the views spell them (size nodes under dynamic=True), else as traced
    score_sizes = state.view_sizes or tuple(tensor_meta(anchor).shape[:-2])
    pv_sizes = pv_view_sizes or tuple(tensor_meta(probs_last).shape[:-2])
    score_rank = len(score_lead) + 2
    q_ref = broadcast_over_batch(q_ref, product_lead, (k_ref,))
    k_ref = broadcast_over_batch(k_ref, product_lead, (q_ref,))
    v_ref = broadcast_over_batch(v_ref, pv_lead, (q_ref, k_ref) if pv_lead == product_lead else ())
    if len(ref_shape(q_ref)) != len(product_lead) + 2 or len(ref_shape(k_ref)) != len(product_lead) + 2:
        raise NotAttention(f"q {ref_shape(q_ref)}, k {ref_shape(k_ref)} and the scores have different ranks")
    if len(ref_shape(v_ref)) != len(pv_lead) + 2:
        raise NotAttention(f"v {ref_shape(v_ref)} and the probabilities have different ranks")
    q_product = q_ref  # q in the score product's layout: lends sizes a view of the scores leaves to -1
    qk_steps, v_steps, back_steps = (), (), ()
    if product_lead != score_lead:
        for ref, what in ((q_ref, "queries"), (k_ref, "keys")):
            _checked_lead(ref, product_lead, what)
        qk_steps = relayout(len(product_lead), score_sizes)
    if pv_lead != score_lead:
        _checked_lead(v_ref, pv_lead, "values")
        v_steps, back_steps = relayout(len(pv_lead), score_sizes), relayout(score_rank - 2, pv_sizes)
    in_steps, out_steps = to_four_dims(score_rank, score_sizes, like=TensorRef(q_ref.node, q_ref.steps + qk_steps))
    q_ref, k_ref = (TensorRef(x.node, x.steps + qk_steps + in_steps) for x in (q_ref, k_ref))
    v_ref = TensorRef(v_ref.node, v_ref.steps + v_steps + in_steps)
    product_sizes = tuple(tensor_meta(up[0]).shape[:-2])  # (a term added before any view of the scores)
    terms = tuple(replace(t, steps=_term_steps(t, lead, score_lead, score_sizes, sizes or product_sizes, q_product))
                  for (t, lead), sizes in zip(state.terms, state.term_sizes))
    q_shape, k_shape, v_shape = ref_shape(q_ref), ref_shape(k_ref), ref_shape(v_ref)
    if k_groups == 1 and k_shape[-3] == v_shape[-3] == 1 < q_shape[-3]:
        k_groups = q_shape[-3]  # one kv head broadcast over all query heads (multi-query attention)
    if v_shape[-3] != k_shape[-3]:  # (values of one head, or one batch and head, shared by all: not attention)
        raise NotAttention(f"v {v_shape} and k {k_shape} do not pair up as attention heads")
    if q_shape[-1] != k_shape[-1] or q_shape[-3] != k_shape[-3] * k_groups:
        raise NotAttention(f"q {q_shape} and k {k_shape} do not pair up as attention heads")
    if column is not None and reads_any(column.logits, {q_ref.node, k_ref.node, v_ref.node, *up, *down[:-1]}):
        raise NotAttention(f"{NOT_READ}: the column concatenated to the scores ({column.logits.name}) reads the "
                           "queries, keys, values or scores: not a learned sink logit")
    mod = None
    if state.modified:
        mod = ScoreMod(source=state.mod_source, chain=tuple(state.mod_chain), steps=out_steps, back=in_steps)

    spec = AttentionSpec(
        q=q_ref, k=k_ref, v=v_ref,
        scale=state.scale * q_scale * k_scale,
        q_factors=tuple(state.factors),
        bias=terms,
        causal=False,
        kv_groups=k_groups,
        dropout_p=dropout_p,
        dropout_node=dropout_node,
        score_mod=mod,
        weights_escape=escape,
        softmax_dtype=state.softmax_dtype,
        sink_logits=column.ref() if column is not None else None,
        module_path=owning_module([anchor, pv]),
        pattern="eager_matmul",
    )
    region = region_between({q_ref.node, k_ref.node, v_ref.node}, pv)
    return Site(anchor=anchor, pattern="eager_matmul", module_path=spec.module_path, spec=spec, output=pv,
                out_steps=out_steps + back_steps + out_layout, region=region, value_checks=state.value_checks,
                score_rank=score_rank, probs=anchor if column is None else probs_sliced, probs_steps=out_steps)
