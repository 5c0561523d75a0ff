"""Hand-written attention: a score product, elementwise score ops, softmax, a value product.

Anchored on the softmax. From its input the matcher walks *up* through elementwise ops to
the q·kᵀ product (``matmul``, ``@``, ``bmm``, ``baddbmm`` or ``einsum``) and interprets each
op on the way as an affine change of the scores — a constant scale (``* s``, ``/ sqrt(d)``),
an additive bias (``+ mask``, T5's position bias, baddbmm's ALiBi), a mask (``masked_fill``,
``where``) or a cast.  From the softmax output it walks *down* through casts and dropout to
the product with the values.  Anything else between the products — a second product, a
non-affine function of the scores, softmax over the wrong dim — is a reason to skip.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from attnrewrite.patterns.grouped_kv import see_through_repeat
from attnrewrite.patterns.layout import (
    fold_constant_scale,
    keys_from_transposed,
    normalize_dim,
    ref_shape,
    term_steps,
    to_four_dims,
)
from attnrewrite.rewriter.capture import (
    Call,
    constant_value,
    is_float_tensor,
    is_scalar,
    normalize,
    owning_module,
    rank,
    tensor_meta,
)
from attnrewrite.rewriter.spec import MASKED_SCORE, AttentionSpec, MaskTerm, NotAttention, Site, TensorRef

PRODUCTS = {"matmul", "baddbmm", "einsum"}
_SCORE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "cast", "identity", "neg", "tanh"}
_PROB_OPS = {"cast", "identity", "dropout"}
_SEARCH_DEPTH = 12


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


def _path_down(node: fx.Node, depth: int) -> list[fx.Node] | None:
    """[node, ..., product]: from the probabilities down through casts/dropout to a product."""
    paths = []
    for user in node.users:
        call = normalize(user)
        if call is not None and call.name == "matmul" and call.args[1] is node and call.args[0] is not node:
            raise NotAttention("the probabilities are the right operand of the value product")
        if call is None or not call.args or call.args[0] is not node and call.name != "einsum":
            continue
        if call.name in ("matmul", "einsum"):
            paths.append([node, user])
        elif call.name in _PROB_OPS and depth > 0:
            rest = _path_down(user, depth - 1)
            if rest is not None:
                paths.append([node] + rest)
    if len(paths) > 1:
        raise NotAttention("the probabilities feed more than one product")
    return paths[0] if paths else None


# --------------------------------------------------------------------------- the score chain


class _Affine:
    """The scores seen so far as scale · (q kᵀ) · Π factors + Σ terms."""

    def __init__(self):
        self.scale = 1.0
        self.factors: list[tuple[fx.Node, int]] = []
        self.terms: list[MaskTerm] = []
        self.value_checks: list[fx.Node] = []
        self.softmax_dtype: torch.dtype | None = None

    def multiply(self, other, power: int, what: str) -> None:
        c = constant_value(other)
        if c is not None:
            if c <= 0:
                raise NotAttention(f"scores {what} a non-positive number ({c})")
            c = c if power == 1 else 1.0 / c
            self.scale *= c
            self.terms = [t.scaled(c) for t in self.terms]
            return
        if not isinstance(other, fx.Node):
            raise NotAttention(f"scores {what} {other!r}")
        t = tensor_meta(other)
        if not is_scalar(other) and (t is None or (t.dim() > 0 and t.shape[-1] != 1)):
            raise NotAttention(f"scores {what} a tensor that varies along the keys ({other.name})")
        if any(term.kind == "add" for term in self.terms):
            raise NotAttention(f"scores {what} a tensor after a bias was added")
        self.factors.append((other, power))

    def add_term(self, kind: str, node, coeff: float = 1.0) -> None:
        if not isinstance(node, fx.Node):
            raise NotAttention(f"a constant ({node!r}) is added to the scores")
        if kind == "add" and not is_float_tensor(node):
            raise NotAttention(f"a non-float tensor ({node.name}) is added to the scores")
        self.terms.append(MaskTerm(kind, node, coeff=coeff))

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


def _interpret(chain: list[fx.Node]) -> _Affine:
    """Read the ops between the score product (chain[0]) and the softmax input (chain[-1])."""
    state = _Affine()
    first = normalize(chain[0])
    if first.name == "baddbmm":
        bias, beta, alpha = first.args[0], first.kwargs["beta"], first.kwargs["alpha"]
        state.multiply(alpha, 1, "multiplied by")
        if constant_value(beta) != 0.0:
            state.add_term("add", bias, coeff=float(beta))
    for prev, node in zip(chain, chain[1:]):
        call = normalize(node)
        name, args = call.name, call.args
        if name == "cast":
            meta = tensor_meta(node)
            if meta is None or not meta.dtype.is_floating_point:
                raise NotAttention("the scores are cast to a non-float dtype")
            if meta.dtype == torch.float32 and tensor_meta(prev).dtype in (torch.float16, torch.bfloat16):
                state.softmax_dtype = torch.float32
        elif name == "identity":
            pass
        elif name == "mul":
            state.multiply(args[1] if args[0] is prev else args[0], 1, "multiplied by")
        elif name == "div":
            if args[0] is not prev:
                raise NotAttention("the scores are a divisor")
            state.multiply(args[1], -1, "divided by")
        elif name in ("add", "sub"):
            alpha = call.kwargs.get("alpha", 1)
            sign = -1.0 if name == "sub" else 1.0
            if args[0] is prev:
                state.add_term("add", args[1], coeff=sign * float(alpha))
            else:
                if name == "sub":
                    raise NotAttention("the scores are negated (x - scores)")
                state.multiply(alpha, 1, "multiplied by")
                state.add_term("add", args[0])
        elif name == "masked_fill":
            if args[0] is not prev:
                raise NotAttention("the scores are used as a mask")
            state.masked_value(args[2])
            state.add_term("drop", args[1])
        elif name == "where":
            cond, a, b = args
            if cond is prev:
                raise NotAttention("the scores are used as a condition")
            state.masked_value(b if a is prev else a)
            state.add_term("keep" if a is prev else "drop", cond)
        else:
            raise NotAttention(f"{name} applied to the scores (a score modification, not supported yet)")
    return state


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


def _pv_operand(product: fx.Node, probs: fx.Node) -> tuple[TensorRef, tuple]:
    """The values ref, and the steps from [batch, Tq, Dv] to the product's output layout."""
    call = normalize(product)
    if call.name == "matmul":
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

    up = _path_up(softmax.args[0], _SEARCH_DEPTH)
    if up is None:
        raise NotAttention("no score product (q·kᵀ) before the softmax")
    state = _interpret(up)
    if softmax.kwargs.get("dtype") == torch.float32:
        state.softmax_dtype = torch.float32

    down = _path_down(anchor, _SEARCH_DEPTH)
    if down is None:
        raise NotAttention("the probabilities never meet the values in a product")
    pv, probs_last = down[-1], down[-2]
    v_ref, out_layout = _pv_operand(pv, probs_last)
    dropout_p = 0.0
    for node in down[1:-1]:
        call = normalize(node)
        if call.name == "dropout":
            p, training = call.kwargs["p"], call.kwargs["training"]
            if training is False:
                continue  # eval mode: p does not matter (and may be symbolic under dynamic=True)
            if not isinstance(p, (int, float)) or training is not True:
                raise NotAttention("dropout with a probability or mode that is not a constant")
            dropout_p = float(p)
    escape = any(u not in down for n in down[:-1] for u in n.users)

    q_ref, k_ref = _qk_operands(up[0])
    k_ref, k_groups = see_through_repeat(k_ref)
    v_ref, v_groups = see_through_repeat(v_ref)
    if k_groups != v_groups:  # only one side repeated: keep both repeated
        k_ref, v_ref, k_groups = _qk_operands(up[0])[1], _pv_operand(pv, probs_last)[0], 1
    q_ref, q_scale = fold_constant_scale(q_ref)
    k_ref, k_scale = fold_constant_scale(k_ref)

    ranks = {len(ref_shape(q_ref)), len(ref_shape(k_ref)), len(ref_shape(v_ref))}
    score_rank = rank(up[0])
    if len(ranks) != 1 or ranks != {score_rank}:
        raise NotAttention(f"q, k, v and the scores have different ranks ({sorted(ranks)}, {score_rank})")
    in_steps, out_steps = to_four_dims(score_rank)
    q_ref, k_ref, v_ref = (TensorRef(r.node, r.steps + in_steps) for r in (q_ref, k_ref, v_ref))
    terms = tuple(
        MaskTerm(t.kind, t.node, term_steps(rank(t.node), score_rank), t.coeff) for t in state.terms
    )
    q_shape, k_shape, v_shape = ref_shape(q_ref), ref_shape(k_ref), ref_shape(v_ref)
    if k_groups == 1 and k_shape[-3] == v_shape[-3] == 1 < q_shape[-3]:
        k_groups = q_shape[-3]  # one kv head broadcast over all query heads (multi-query attention)
    if q_shape[-1] != k_shape[-1] or q_shape[-3] != k_shape[-3] * k_groups:
        raise NotAttention(f"q {q_shape} and k {k_shape} do not pair up as attention heads")

    spec = AttentionSpec(
        q=q_ref, k=k_ref, v=v_ref,
        scale=state.scale * q_scale * k_scale,
        q_factors=tuple(state.factors),
        bias=terms,
        causal=False,
        kv_groups=k_groups,
        dropout_p=dropout_p,
        weights_escape=escape,
        softmax_dtype=state.softmax_dtype,
        module_path=owning_module([anchor, pv]),
        pattern="eager_matmul",
    )
    region = region_between({q_ref.node, k_ref.node, v_ref.node}, pv)
    return Site(anchor=anchor, pattern="eager_matmul", module_path=spec.module_path, spec=spec, output=pv,
                out_steps=out_steps + out_layout, region=region, value_checks=state.value_checks,
                score_rank=score_rank, probs=anchor, probs_steps=out_steps)
