"""Relative position biases: an additive bias proven to be R[h, j − i], a per-head function of the distance.

T5 computes its bias from two ``arange`` s: ``relative_position = memory_position - context_position``
([Tq, Tk]), buckets it elementwise (abs, comparisons, log, min, where), looks the buckets up in an
``nn.Embedding(num_buckets, H)`` and permutes the result to [1, H, Tq, Tk].  Other models index a learned
table by a clamped distance.  Either way the value at (h, i, j) depends on i and j only through j − i,
so a kind can read the H · (Tq + Tk − 1) values R[h, d] instead of a [H, Tq, Tk] mask.

The proof (:func:`relative_term`) is structural, then numeric:

- walking back from the term, every node is elementwise in the positions (its other tensor operands
  hold one number: no [Tq, Tk] parameter added on the way), a table lookup by a position-derived index
  (``F.embedding``, ``table[index]``) or a view that moves no position into another (permute,
  transpose, unsqueeze, a plain ``x[None, :]``); no op mixes rows (cumsum, matmul, softmax, reshape);
- the walk ends at *leaves* built from ``arange`` by index arithmetic alone
  (:func:`attnrewrite.patterns.masks._index_expression`) whose values on the site's shapes are exactly
  c · (j − i) or c · |j − i| ([Tq, Tk]): a position offset that is a tensor or a size never is one;
- nothing depends on the model's inputs (batch data) and nothing outside the chain writes into it;
- the nodes replayed on the 1-D distance vector give R, and R written out on the [Tq, Tk] grid equals
  the term's value on the site's shapes.

The certifier then compares the site, with the term written out from R, with the original on its probes.
"""

from __future__ import annotations


import torch
import torch.fx as fx

from attnrewrite.ir import canonical
from attnrewrite.ir.capture import example, hinted_shape, tensor_meta
from attnrewrite.ir.evaluate import ClosureTooLarge, GraphEvaluator, UnreadableWrite
from attnrewrite.ir.spec import AttentionSpec, MaskTerm, RelativeBias, Site
from attnrewrite.patterns.layout import ref_shape
from attnrewrite.patterns.masks import _index_expression, _plain_index, take_one_term

_ELEMENTWISE_NAMES = {
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "floordiv", "truediv", "mod", "remainder", "fmod",
    "neg", "abs", "log", "log2", "log10", "log1p", "exp", "sqrt", "rsqrt", "floor", "ceil", "round", "trunc",
    "sign", "sgn", "clamp", "clip", "clamp_min", "clamp_max", "minimum", "maximum", "where", "lt", "le", "gt",
    "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "and_", "or_", "invert", "bitwise_and",
    "bitwise_or", "bitwise_not", "pow", "tanh", "sigmoid", "iadd", "isub", "imul", "itruediv", "ifloordiv",
    "to", "float", "long", "int", "double", "half", "bfloat16", "type", "contiguous", "clone", "detach",
}
_LIKE = {"zeros_like", "ones_like", "full_like", "empty_like"}  # a position tensor's shape, not its values
_VIEWS = {"permute", "transpose", "unsqueeze"}
_MIN_MAX = {"min", "max"}  # elementwise only with two tensors: torch.min(a, b)


def _name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


class _Walk:
    """The structural half of the proof, for one term (see the module docstring)."""

    def __init__(self, site: Site, evaluator: GraphEvaluator):
        self.site, self.evaluator = site, evaluator
        self.t_q, self.t_k = ref_shape(site.spec.q)[-2], ref_shape(site.spec.k)[-2]
        self.leaves: dict[fx.Node, tuple[str, float]] = {}
        self.chain: set[fx.Node] = set()
        self._positional: dict[fx.Node, bool] = {}

    def positional(self, node) -> bool:
        """Whether ``node`` is computed from an ``arange`` (through anything)."""
        if not isinstance(node, fx.Node):
            return False
        if node not in self._positional:
            stack, seen, found = [node], set(), False
            while stack and not found:
                n = stack.pop()
                if n in seen:
                    continue
                seen.add(n)
                found = n.op == "call_function" and n.target is torch.arange
                stack.extend(n.all_input_nodes)
            self._positional[node] = found
        return self._positional[node]

    def visit(self, node: fx.Node) -> str | None:
        """Why ``node`` is not a function of (h, j − i) as this recogniser proves one, or None when it is.
        A node of index arithmetic that holds ±(j − i) or ±|j − i| is a leaf; any other is walked through."""
        if node in self.chain or node in self.leaves:
            return None
        leaf_why = None
        if _index_expression(node) is None and not self.evaluator.depends_on_data(node):
            leaf_why = self.leaf(node)
            if leaf_why is None:
                return None
            # (c · (j − i) with c ≠ ±1, e.g. a distance divided by 3: its own ops are replayed, so that the
            # replay rounds as the model does)
        name = _name(node)
        known = name in _LIKE or name in _VIEWS or name in _MIN_MAX or name in _ELEMENTWISE_NAMES or name in (
            "embedding", "getitem")
        if not known:
            return leaf_why or f"{node.name} ({name or node.target}) is not elementwise in the positions (it may mix rows)"
        args = list(node.args) + list(node.kwargs.values())
        if name in _LIKE:
            position_args = [args[0]] if self.positional(args[0]) else []
            return self.operands(node, position_args, [a for a in args[1:] if isinstance(a, fx.Node)])
        if name == "embedding":
            index, table = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
            if max_norm is not None:
                return f"{node.name} is an embedding with max_norm (it rewrites its table)"
            return self.lookup(node, index, table)
        if name == "getitem" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
            table, index = node.args
            if self.positional(table):
                if not _plain_index(index):
                    return f"{node.name} selects positions ({index})"
                return self.operands(node, [table], [])
            entries = index if isinstance(index, tuple) else (index,)
            nodes = [e for e in entries if isinstance(e, fx.Node)]
            if len(nodes) != 1 or not all(e is nodes[0] or e == slice(None) for e in entries):
                return f"{node.name} indexes its table by something other than one position tensor"
            return self.lookup(node, nodes[0], table)
        if name in _VIEWS or name in _MIN_MAX or name in _ELEMENTWISE_NAMES:
            if name == "transpose" and len(node.args) < 3:
                return f"{node.name} is a transpose without dims"
            if name in _MIN_MAX and not (len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)):
                return f"{node.name} ({name}) reduces over positions"
            tensors = [a for a in _flatten(args) if isinstance(a, fx.Node)]
            return self.operands(node, [a for a in tensors if self.positional(a)],
                                 [a for a in tensors if not self.positional(a)])
        return f"{node.name} ({name}) is not elementwise in the positions (it may mix rows)"

    def operands(self, node: fx.Node, position_args: list, other_args: list) -> str | None:
        for other in other_args:
            value = example(other)
            if isinstance(value, (torch.SymInt, torch.SymFloat)):
                return f"{node.name} reads {other.name}, a size (it may change between calls)"
            shape = hinted_shape(other)
            if isinstance(value, torch.Tensor) and (shape is None or any(s != 1 for s in shape)):
                return f"{node.name} reads {other.name} of shape {shape}, which is not a function of the distance"
        if not position_args:
            return f"{node.name} reads no positions"
        for arg in position_args:
            why = self.visit(arg)
            if why is not None:
                return why
        self.chain.add(node)
        return None

    def lookup(self, node: fx.Node, index, table) -> str | None:
        if not isinstance(index, fx.Node) or not self.positional(index):
            return f"{node.name} looks up a table by something other than positions"
        if not isinstance(table, fx.Node) or self.positional(table) or tensor_meta(table) is None:
            return f"{node.name}'s table is computed from positions"
        return self.operands(node, [index], [])

    def leaf(self, node: fx.Node) -> str | None:
        try:
            value = self.evaluator.value(node, at=self.site.output)
        except (UnreadableWrite, ClosureTooLarge) as exc:
            return f"could not read {node.name}: {exc}"
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and all(s == 1 for s in value.shape[:-2]):
            found = _distance_form(value.reshape(value.shape[-2:]), self.t_q, self.t_k)
            if found is not None:
                self.leaves[node] = found
                return None
        return (f"{node.name} is built from positions but is not c·(j − i) nor c·|j − i| on the [Tq, Tk] grid "
                f"(positions offset by a tensor, or used apart)")


def _flatten(values) -> list:
    out = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, (tuple, list)) else [v])
    return out


def _distance_form(value: torch.Tensor, t_q: int, t_k: int) -> tuple[str, float] | None:
    """(form, c) with ``value`` = c · (j − i) or c · |j − i| exactly on [Tq, Tk], c = ±1 (so the replay's
    distances are exact in any dtype; a 1×1 grid has no distances to tell the forms apart), else None."""
    if tuple(value.shape) != (t_q, t_k) or t_q + t_k < 3:
        return None
    value = value.to(torch.float64)
    distance = (torch.arange(t_k, dtype=torch.float64).view(1, -1) - torch.arange(t_q, dtype=torch.float64).view(-1, 1))
    for form, base in (("j-i", distance), ("|j-i|", distance.abs())):
        nonzero = base != 0
        c = float((value[nonzero] / base[nonzero]).flatten()[0])
        if c in (1.0, -1.0) and torch.equal(value, c * base):
            return form, c
    return None


def relative_term(term: MaskTerm, site: Site, evaluator: GraphEvaluator) -> tuple[MaskTerm | None, str]:
    """(the ``relative`` term, "") for an additive term proven to be R[h, j − i], else (None, why not)."""
    node = term.node
    if term.kind != "add" or site.score_rank != 4 or any(step[0] != "unsqueeze" for step in term.steps):
        return None, "not an additive term of 4-d scores"
    walk = _Walk(site, evaluator)
    if not walk.positional(node):
        return None, "not computed from positions"
    if evaluator.depends_on_inputs(node):
        return None, "it reads the model's inputs (batch data)"
    why = walk.visit(node)
    if why is not None:
        return None, why
    if not walk.leaves:
        return None, "no distance j − i found"
    chain = tuple(sorted(walk.chain, key=evaluator.position))
    inside = set(chain) | set(walk.leaves)
    for n in chain:
        outside = [w for w in evaluator.writes.writes_into(n, before=site.output) if w not in inside]
        if outside:
            return None, f"{n.name} is written in place by {outside[0].name}"
    leaves = tuple((n, form, c) for n, (form, c) in sorted(walk.leaves.items(), key=lambda item: evaluator.position(item[0])))
    relative = MaskTerm("relative", node, term.steps, term.coeff, relative=RelativeBias(leaves, chain))
    return _checked(relative, term, site, evaluator)


def _checked(relative: MaskTerm, term: MaskTerm, site: Site, evaluator: GraphEvaluator) -> tuple[MaskTerm | None, str]:
    """The numeric half: R from the replay, written out, equals the term on the site's shapes."""
    heads = ref_shape(site.spec.q)[-3]
    t_q, t_k = ref_shape(site.spec.q)[-2], ref_shape(site.spec.k)[-2]
    shape = hinted_shape(term.node)
    shape = (1,) * (4 - len(shape)) + tuple(shape) if shape is not None and len(shape) <= 4 else None
    if shape is None or shape[0] != 1 or shape[1] not in (1, heads) or shape[2:] != (t_q, t_k):
        return None, f"{term.node.name} of shape {hinted_shape(term.node)} is not [1, H, Tq, Tk]"
    lookup = lambda n: evaluator.value(n, at=site.output)  # noqa: E731
    q = torch.empty(1, 1, t_q, 1)
    k = torch.empty(1, 1, t_k, 1)
    try:
        with torch.no_grad():
            table = canonical.relative_table(relative, lookup, q, k)
            dense = canonical.relative_dense(table, q, k)
            want = canonical.term_value(term, lookup)
    except (UnreadableWrite, ClosureTooLarge) as exc:
        return None, f"could not read the bias: {exc}"
    except Exception as exc:  # noqa: BLE001 — a chain that does not replay on a distance vector stays a mask
        return None, f"its nodes do not replay on a distance vector ({type(exc).__name__}: {exc})"
    if table.dim() != 2 or table.shape[-1] != t_q + t_k - 1 or table.shape[0] not in (1, heads):
        return None, f"the replay gives a table of shape {tuple(table.shape)}, not [H, Tq + Tk − 1]"
    want = want.reshape((1,) * (4 - want.dim()) + tuple(want.shape))
    if tuple(dense.shape[-2:]) != tuple(want.shape[-2:]) or not torch.equal(dense.to(want.dtype).expand_as(want), want):
        return None, "R[h, j − i] written out differs from the bias on the site's shapes"
    return relative, ""


def _spans_the_grid(term: MaskTerm, site: Site) -> bool:
    """A float term with a value per (query, key): a bias that could have been relative (an [H, Tq, Tk] parameter)."""
    shape, meta = hinted_shape(term.node), tensor_meta(term.node)
    grid = (ref_shape(site.spec.q)[-2], ref_shape(site.spec.k)[-2])
    return meta is not None and meta.is_floating_point() and shape is not None and tuple(shape[-2:]) == grid


def as_relative_bias(site: Site, evaluator: GraphEvaluator) -> tuple[AttentionSpec | None, list[str]]:
    """(``site.spec`` with its one additive term proven to be R[h, j − i] taken as a ``relative`` term, or
    None when there is none or more than one, or the spec already carries a ``position`` term; why each other
    additive term computed from positions stays a mask, for the report)."""
    spec = site.spec
    if any(t.kind in ("position", "relative") for t in spec.bias):
        return None, []
    return take_one_term(
        spec, lambda term: relative_term(term, site, evaluator),
        lambda term, why: f"additive bias {term.node.name} stays a mask (not a relative bias R[h, j − i]): {why}"
        if why != "not computed from positions" or _spans_the_grid(term, site) else None,
        "relative biases: each stays a mask (a kind reads one)")

