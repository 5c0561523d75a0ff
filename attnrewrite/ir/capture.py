"""Reading the graphs Dynamo captures.

Dynamo hands the backend torch-level FX graphs: ``call_function`` nodes whose targets are
``torch.matmul``, ``operator.mul``, ``F.softmax`` ..., and ``call_method`` nodes such as
``x.transpose(1, 2)``.  The same operation has several spellings (``q @ k``,
``torch.matmul(q, k)``, ``q.matmul(k)``); :func:`normalize` maps each to one :class:`Call`
with a canonical name and normalised arguments, so the pattern families never look at
spellings.

Also here: example values (fake tensors Dynamo records in ``node.meta``), hints for
symbolic sizes (read without adding guards), the owning module's qualified name, and the
role of each placeholder (parameter, buffer, symbolic size, user input).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

# --------------------------------------------------------------------------- canonical names

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.baddbmm: "baddbmm", torch.einsum: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax", torch.special.softmax: "softmax",
    F.scaled_dot_product_attention: "sdpa",
    F.multi_head_attention_forward: "mha_forward",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", operator.itruediv: "div",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
    torch.masked_fill: "masked_fill", torch.where: "where",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.permute: "permute",
    torch.reshape: "view", torch.unsqueeze: "unsqueeze", torch.clone: "identity",
    torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and", operator.iand: "and",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    operator.neg: "neg", torch.neg: "neg",
    torch.tanh: "tanh", F.tanh: "tanh",
    # elementwise functions that may modify attention scores (soft-capping ...): see SCORE_MODS
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.clamp: "clamp", torch.clip: "clamp",
    torch.clamp_min: "clamp", torch.clamp_max: "clamp", torch.abs: "abs", torch.exp: "exp",
    torch.pow: "pow", operator.pow: "pow", torch.square: "square", torch.relu: "relu", F.relu: "relu",
    torch.erf: "erf", torch.maximum: "maximum",
}
for _name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
    if hasattr(torch, _name):
        _FUNCTIONS[getattr(torch, _name)] = _name.strip("_")
_SDPA_C = getattr(torch._C._nn, "scaled_dot_product_attention", None)
if _SDPA_C is not None:
    _FUNCTIONS[_SDPA_C] = "sdpa"

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "baddbmm": "baddbmm", "softmax": "softmax",
    "mul": "mul", "mul_": "mul", "multiply": "mul", "div": "div", "div_": "div", "true_divide": "div",
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    "to": "cast", "type": "cast", "type_as": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast",
    "contiguous": "identity", "clone": "identity",
    "transpose": "transpose", "swapaxes": "transpose", "permute": "permute",
    "view": "view", "reshape": "view", "unsqueeze": "unsqueeze", "expand": "expand",
    "unflatten": "unflatten", "flatten": "flatten",
    "repeat_interleave": "repeat_interleave",
    "logical_and": "and", "bitwise_and": "and", "__and__": "and",
    "logical_not": "not", "bitwise_not": "not", "eq": "eq", "ne": "ne", "neg": "neg", "tanh": "tanh",
    "size": "size",
    "sigmoid": "sigmoid", "clamp": "clamp", "clip": "clamp", "clamp_min": "clamp", "clamp_max": "clamp",
    "abs": "abs", "exp": "exp", "pow": "pow", "square": "square", "relu": "relu", "erf": "erf",
    "tanh_": "tanh", "sigmoid_": "sigmoid", "clamp_": "clamp", "maximum": "maximum",
}

#: Elementwise functions that are not affine in the scores: between the score product and the
#: normalisation they form a score modification (FlexAttention's ``score_mod``).
SCORE_MODS = frozenset({"neg", "tanh", "sigmoid", "clamp", "abs", "exp", "pow", "square", "relu", "erf"})

#: Ops that act elementwise on the score tensor (each score position on its own).
ELEMENTWISE = frozenset({"mul", "div", "add", "sub", "masked_fill", "where", "cast", "identity", "maximum"}) | SCORE_MODS


def canonical_name(node: fx.Node) -> str | None:
    """The canonical name of what ``node`` computes, or None for anything the matcher ignores."""
    if node.op == "call_function" and node.target is getattr:
        return "transpose" if len(node.args) == 2 and node.args[1] == "mT" else None  # x.mT
    if _is_binary_max(node):
        return "maximum"
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def _is_binary_max(node: fx.Node) -> bool:
    """``torch.max(a, b)`` / ``a.max(b)`` with a tensor b: the elementwise maximum (not a reduction over a dim)."""
    if not (node.op == "call_function" and node.target is torch.max or node.op == "call_method" and node.target == "max"):
        return False
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return isinstance(other, fx.Node) and isinstance(other.meta.get("example_value"), torch.Tensor)


@dataclass
class Call:
    """A node's operation in canonical form: ``name`` plus positional ``args`` and ``kwargs``."""

    name: str
    node: fx.Node
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def tensor_args(self) -> list[fx.Node]:
        return [a for a in self.args if isinstance(a, fx.Node)]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def normalize(node: fx.Node) -> Call | None:
    """Canonical form of ``node``'s operation, or None when it is not one the matcher reads."""
    name = canonical_name(node)
    if name is None:
        return None
    a, kw = node.args, node.kwargs
    if name in ("div", "mul", "exp"):
        written_out = written_out_softmax(node)
        if written_out is not None:
            return without_stabiliser(written_out)
    if name in ("mul", "div", "and", "maximum"):
        return Call(name, node, (a[0], _arg(node, 1, "other")))
    if name in ("add", "sub"):
        return Call(name, node, (a[0], _arg(node, 1, "other")), {"alpha": kw.get("alpha", 1)})
    if name == "matmul":
        return Call(name, node, (a[0], _arg(node, 1, "other", _arg(node, 1, "mat2"))))
    if name == "baddbmm":  # torch.baddbmm(input, batch1, batch2) or input.baddbmm(batch1=..., batch2=...)
        return Call(name, node, (_arg(node, 0, "input"), _arg(node, 1, "batch1"), _arg(node, 2, "batch2")),
                    {"beta": kw.get("beta", 1), "alpha": kw.get("alpha", 1)})
    if name == "einsum":
        operands = a[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        return Call(name, node, (a[0], *operands))
    if name == "softmax":
        return without_stabiliser(Call(name, node, (a[0],), {"dim": _arg(node, 1, "dim"),
                                                             "dtype": _arg(node, 2, "dtype")}))
    if name == "masked_fill":
        return Call(name, node, (a[0], _arg(node, 1, "mask"), _arg(node, 2, "value")))
    if name == "where":
        if len(a) + len(kw) < 3:
            return None  # the one-argument form is nonzero(), not a select
        return Call(name, node, (a[0], _arg(node, 1, "input"), _arg(node, 2, "other")))
    if name == "dropout":
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "train" if node.target is torch.dropout else "training", True)
        return Call(name, node, (a[0],), {"p": p, "training": training})
    if name == "transpose":
        if node.target is getattr:  # x.mT
            return Call(name, node, (a[0], -2, -1))
        return Call(name, node, (a[0], _arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    if name == "unflatten":
        sizes = _arg(node, 2, "sizes")
        sizes = tuple(sizes) if isinstance(sizes, (list, tuple)) else sizes
        return Call(name, node, (a[0], _arg(node, 1, "dim"), sizes))
    if name == "flatten":
        return Call(name, node, (a[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)))
    if name == "permute":
        dims = a[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        return Call(name, node, (a[0], tuple(dims)))
    if name in ("view", "expand"):
        sizes = a[1:] if node.op == "call_method" else (_arg(node, 1, "shape"),)
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
            sizes = tuple(sizes[0])
        return Call(name, node, (a[0], tuple(sizes)))
    if name == "unsqueeze":
        return Call(name, node, (a[0], _arg(node, 1, "dim")))
    if name == "repeat_interleave":
        return Call(name, node, (a[0], _arg(node, 1, "repeats")), {"dim": _arg(node, 2, "dim")})
    if name == "getitem":
        return Call(name, node, (a[0], a[1]))
    if name == "sdpa":
        return Call(name, node, (a[0], a[1], a[2]), {
            "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
            "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale"),
            "enable_gqa": kw.get("enable_gqa", False)})
    return Call(name, node, tuple(a), dict(kw))


# --------------------------------------------------------------------------- softmax written out

_RECIPROCALS = (torch.reciprocal,)
_LOG_SOFTMAX = (F.log_softmax, torch.log_softmax)
_LOGSUMEXP = (torch.logsumexp,)


def _calls(node: Any, functions: tuple, method: str) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_function" and node.target in functions
                                          or node.op == "call_method" and node.target == method)


def _single_dim(dim: Any) -> int | None:
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _reduced_over(node: Any, functions: tuple, method: str) -> tuple[fx.Node, int] | None:
    """(x, d) for ``node`` = reduce(x, dim=d, keepdim=True) (``torch.sum``, ``x.sum(...)``, logsumexp ...), also
    written ``reduce(x, d).unsqueeze(d)`` for the last dim d = -1; None otherwise."""
    if (isinstance(node, fx.Node) and canonical_name(node) == "unsqueeze"
            and _arg(node, 1, "dim") == -1 and _calls(node.args[0], functions, method)):
        inner, keepdim_needed = node.args[0], False
    elif _calls(node, functions, method):
        inner, keepdim_needed = node, True
    else:
        return None
    if len(inner.args) < 1 or not isinstance(inner.args[0], fx.Node):
        return None
    dim = _single_dim(_arg(inner, 1, "dim"))
    keepdim = _arg(inner, 2, "keepdim", False)
    if dim is None or keepdim is not keepdim_needed or (not keepdim_needed and dim != -1):
        return None
    if any(key not in ("dim", "keepdim") for key in inner.kwargs):  # a dtype= or out= changes what is summed
        return None
    return inner.args[0], dim


def is_log_softmax(node: Any) -> bool:
    """``node`` calls ``log_softmax`` (``F.log_softmax``, ``torch.log_softmax``, ``x.log_softmax``)."""
    return _calls(node, _LOG_SOFTMAX, "log_softmax")


def unexpanded(node: Any) -> Any:
    """``node`` without its ``expand``/``expand_as`` calls, which only broadcast: what a mask term or a
    per-head sink column is before it was broadcast to the scores (``m.expand_as(scores)`` would
    otherwise keep the scores alive)."""
    while isinstance(node, fx.Node):
        call = normalize(node)
        if call is not None and call.name == "expand" and isinstance(call.args[0], fx.Node):
            node = call.args[0]
        elif node.op == "call_method" and node.target == "expand_as" and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
    return node


def reads_any(node: fx.Node, forbidden: set[fx.Node], earliest: fx.Node | None = None) -> bool:
    """True when ``node`` depends on a node of ``forbidden``, none of which precedes ``earliest`` (default: the
    first of them in graph order).  Shape-only reads (``expand_as(scores)``, ``scores.size()``) are not
    dependencies."""
    earliest = min(forbidden) if earliest is None else earliest
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in forbidden:
            return True
        if current in seen or current < earliest:
            continue
        seen.add(current)
        stack.extend(value_inputs(current))
    return False


def summed_over(node: Any) -> tuple[fx.Node, int] | None:
    """(x, d) for ``node`` = ``x.sum(d, keepdim=True)`` (or ``x.sum(-1).unsqueeze(-1)``), else None."""
    return _reduced_over(node, (torch.sum,), "sum")


def _constant_along(m: Any, x: fx.Node, dim: int) -> bool:
    """``m`` broadcasts against ``x`` without enlarging it and holds one value along ``dim``."""
    mv, xv = example(m), example(x)
    if not isinstance(mv, torch.Tensor):
        return isinstance(m, (int, float)) and not isinstance(m, bool)
    if not isinstance(xv, torch.Tensor) or mv.dim() > xv.dim():
        return False
    shape = (1,) * (xv.dim() - mv.dim()) + tuple(mv.shape)
    d = dim % xv.dim()
    return shape[d] == 1 and all(a == 1 or a == b for a, b in zip(shape, xv.shape))


def written_out_softmax(node: fx.Node) -> Call | None:
    """``node`` as ``Call("softmax", node, (x,), {"dim": d, "dtype": None})`` when it computes softmax_d(x)
    written out, else None.  The spellings, each a definition of softmax whatever the values:

    - ``e / e.sum(d, keepdim=True)`` (also ``e * e.sum(...).reciprocal()``, ``e * (1 / e.sum(...))``) with
      ``e = exp(x − m)``, m constant along d (the row max ``amax(x, d, keepdim=True)``, ``max(...).values``,
      or any per-row value: exp(x − m)/Σ exp(x − m) = softmax(x) for every such m), or ``e = exp(x)``;
    - ``exp(x − logsumexp(x, d, keepdim=True))`` and ``exp(log_softmax(x, d))``.

    The matcher then reads the site as it reads ``softmax(x, d)``, and certification compares that
    canonical form with these very nodes on its probes, as for every site.
    """
    name = canonical_name(node)
    if name == "exp":
        arg = node.args[0] if node.args else None
        if _calls(arg, _LOG_SOFTMAX, "log_softmax") and isinstance(arg.args[0], fx.Node):
            dim = _single_dim(_arg(arg, 1, "dim"))
            if dim is not None and _arg(arg, 2, "dtype") is None and "dtype" not in arg.kwargs:
                return Call("softmax", node, (arg.args[0],), {"dim": dim, "dtype": None})
            return None
        if isinstance(arg, fx.Node) and canonical_name(arg) == "sub" and arg.kwargs.get("alpha", 1) == 1:
            x, lse = arg.args[0], _arg(arg, 1, "other")
            reduced = _reduced_over(lse, _LOGSUMEXP, "logsumexp")
            if reduced is not None and reduced[0] is x:
                return Call("softmax", node, (x,), {"dim": reduced[1], "dtype": None})
        return None
    a, b = node.args[0] if node.args else None, _arg(node, 1, "other")
    if name == "div":
        e, den = a, b
    else:  # mul: e * reciprocal(Σ e) or e * (1 / Σ e), either order
        e, den = None, None
        for x, y in ((a, b), (b, a)):
            if _calls(y, _RECIPROCALS, "reciprocal") and y.args:
                e, den = x, y.args[0]
            elif (isinstance(y, fx.Node) and canonical_name(y) == "div" and constant_value(y.args[0]) == 1.0
                    and len(y.args) > 1):
                e, den = x, y.args[1]
            if e is not None:
                break
    reduced = _reduced_over(den, (torch.sum,), "sum")
    if (reduced is None or reduced[0] is not e or canonical_name(e) != "exp" or not e.args
            or not isinstance(e.args[0], fx.Node)):
        return None
    x, dim = e.args[0], reduced[1]
    if canonical_name(x) == "sub" and x.kwargs.get("alpha", 1) == 1 and isinstance(x.args[0], fx.Node):
        m = _arg(x, 1, "other")
        if _constant_along(m, x.args[0], dim):
            x = x.args[0]  # the shift cancels; x − m with m varying along d is read as it is (softmax of it)
    return Call("softmax", node, (x,), {"dim": dim, "dtype": None})


# --------------------------------------------------------------------------- a row max subtracted by hand

#: Ops that pass a value on unchanged, on the stabiliser's side only: detaching the row max changes no
#: gradient (softmax(x − m) does not depend on m), whereas a detached softmax input would.
_SAME_VALUE_METHODS = frozenset({"detach", "contiguous", "clone"})
_SAME_VALUE_FUNCTIONS = (torch.detach, torch.clone)


def _same_value_source(node: Any) -> Any:
    """``node`` without the detach / clone / contiguous calls around it."""
    while isinstance(node, fx.Node) and node.args and (
            node.op == "call_method" and node.target in _SAME_VALUE_METHODS
            or node.op == "call_function" and node.target in _SAME_VALUE_FUNCTIONS):
        node = node.args[0]
    return node


def _same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` provably hold the same tensor: one node, or the same casts of one node."""
    a, b = _same_value_source(a), _same_value_source(b)
    if a is b:
        return isinstance(a, fx.Node)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if canonical_name(a) != "cast" or canonical_name(b) != "cast" or len(a.args) != 1 or len(b.args) != 1:
        return False  # (a cast with arguments, .to(dtype) / type_as(t), is compared by dtype below)
    ta, tb = example(a), example(b)
    return (isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor) and ta.dtype == tb.dtype
            and _same_value(a.args[0], b.args[0]))


def _row_max_of(m: Any) -> tuple[fx.Node, int] | None:
    """(x, d) when ``m`` is x's maximum over dim d kept as a dim of size 1: ``x.amax(d, keepdim=True)``,
    ``torch.max(x, d, keepdim=True)[0]`` (or ``.values``), ``x.max(-1)[0].unsqueeze(-1)``, each possibly
    detached, of x possibly detached; None for anything else (a min, a scaled max, a max over several dims)."""
    m = _same_value_source(m)
    unsqueezed = None
    if isinstance(m, fx.Node) and canonical_name(m) == "unsqueeze":
        unsqueezed, m = _arg(m, 1, "dim"), _same_value_source(m.args[0])
    if isinstance(m, fx.Node) and canonical_name(m) == "getitem" and m.args[1] == 0:
        m = m.args[0]  # (values, indices)[0]
        if not _calls(m, (torch.max,), "max"):
            return None
    elif not _calls(m, (torch.amax,), "amax"):
        return None
    if not m.args or not isinstance(m.args[0], fx.Node) or any(k not in ("dim", "keepdim") for k in m.kwargs):
        return None
    x, dim = m.args[0], _single_dim(_arg(m, 1, "dim"))
    keepdim = _arg(m, 2, "keepdim", False)
    r = rank(x)
    if dim is None or r is None or r == 0 or keepdim is not (unsqueezed is None):
        return None
    if unsqueezed is not None and (not isinstance(unsqueezed, int) or unsqueezed % r != dim % r
                                   or dim % r != r - 1):
        return None  # (dropping a middle dim and putting it back elsewhere would misalign the rows)
    return _same_value_source(x), dim % r


def without_stabiliser(call: Call) -> Call:
    """``call`` (a softmax) with a row max subtracted from its input by hand read as the stabiliser it is:
    softmax_d(x − max_d(x)) is softmax_d(x) whatever x, so the input is x (as for a softmax written out
    as exp(x − m) / Σ, :func:`written_out_softmax`).  Seen: casts and copies between the subtraction and
    the softmax (an upcast of half scores to float32 becomes ``dtype=float32``), the max detached, spelled
    ``amax`` or ``max(...)[0]`` / ``.values``.  Anything else — a max over another dim, of another tensor,
    scaled, a min, a max added — is left in the input, where the matcher reads it as the scores reused."""
    dim = call.kwargs["dim"]
    top = call.args[0] if call.args else None
    x = top
    while isinstance(x, fx.Node) and canonical_name(x) in ("cast", "identity"):
        x = x.args[0]
    if not isinstance(x, fx.Node) or canonical_name(x) != "sub" or len(x.args) != 2 or x.kwargs.get("alpha", 1) != 1:
        return call
    scores, row_max = x.args
    found = _row_max_of(row_max)
    r = rank(scores)
    if (found is None or r is None or not isinstance(dim, int) or isinstance(dim, bool)
            or found[1] != dim % r or not _same_value(found[0], scores)):
        return call
    dtype = call.kwargs.get("dtype")
    inner, outer = tensor_meta(scores), tensor_meta(top)
    if inner is None or outer is None:
        return call
    if outer.dtype != inner.dtype:  # a cast between: only an upcast to float32, which softmax's dtype= says
        if dtype is not None or outer.dtype != torch.float32 or inner.dtype not in (torch.float16, torch.bfloat16):
            return call
        dtype = torch.float32
    return Call("softmax", call.node, (scores,), {**call.kwargs, "dim": dim, "dtype": dtype})


# --------------------------------------------------------------------------- shape-only reads

#: Methods whose result depends only on the shape (or dtype, device) of their first argument.
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "new_ones", "new_zeros", "new_empty",
                            "new_full", "get_device"})
#: Methods that read only the shape of their *second* argument (``m.expand_as(scores)``).
_SHAPE_OF_SECOND = frozenset({"expand_as"})
_LIKE_FUNCTIONS = frozenset({torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def _shape_only_position(node: fx.Node) -> int | None:
    """The position of the argument of ``node`` whose value it never reads, only its shape, dtype or
    device; None when there is none."""
    a = node.args
    if not a or not isinstance(a[0], fx.Node):
        return None
    if node.op == "call_method":
        if node.target in _SHAPE_METHODS:
            return 0
        if node.target in _SHAPE_OF_SECOND and len(a) > 1 and isinstance(a[1], fx.Node):
            return 1
    elif node.op == "call_function":
        if node.target is getattr and len(a) == 2 and a[1] in _SHAPE_ATTRIBUTES:
            return 0
        try:
            if node.target in _LIKE_FUNCTIONS:
                return 0
        except TypeError:  # unhashable target
            return None
        if getattr(node.target, "__name__", "").startswith("sym_"):  # aten.sym_size / sym_numel / sym_stride
            return 0
    return None


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """``node``'s inputs whose values it reads: ``all_input_nodes`` without an operand it uses only for
    its shape (``m.expand_as(scores)``, ``scores.size()``, ``scores.shape``, ``ones_like(scores)``).
    A shape-only use of the attention scores is not a reuse of their values."""
    position = _shape_only_position(node)
    if position is None:
        return node.all_input_nodes
    read: set[fx.Node] = set()
    args = tuple(a for i, a in enumerate(node.args) if i != position)
    fx.node.map_arg((args, node.kwargs), read.add)  # an operand also passed elsewhere stays a value input
    return [n for n in node.all_input_nodes if n in read]


# --------------------------------------------------------------------------- example values and hints


def example(node: Any) -> Any:
    """The example value Dynamo recorded for ``node`` (a fake tensor, SymInt, ...), or None."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    return meta["example_value"] if "example_value" in meta else meta.get("val")


def tensor_meta(node: Any) -> torch.Tensor | None:
    value = example(node)
    return value if isinstance(value, torch.Tensor) else None


def rank(node: Any) -> int | None:
    t = tensor_meta(node)
    return None if t is None else t.dim()


def is_float_tensor(node: Any) -> bool:
    t = tensor_meta(node)
    return t is not None and t.dtype.is_floating_point


def hint(value: Any, default: int = 8) -> Any:
    """A concrete Python value for ``value``: SymInts/SymFloats become their hint, without guards.

    Tuples, lists and sizes are converted element by element.
    """
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = value.node
        if node.has_hint():
            return node.hint
        return default
    if isinstance(value, (tuple, list, torch.Size)):
        return type(value)(hint(v, default) for v in value) if not isinstance(value, torch.Size) else tuple(
            hint(v, default) for v in value
        )
    return value


def symbolic_number(value: Any) -> tuple[float, fx.Node] | None:
    """``(hint, node)`` when ``value`` is a graph node holding a hinted SymFloat/SymInt (a number that is
    a graph input under dynamic shapes, e.g. an ``nn.Dropout``'s p), else None."""
    if not isinstance(value, fx.Node):
        return None
    meta = example(value)
    if isinstance(meta, (torch.SymFloat, torch.SymInt)) and meta.node.has_hint():
        return float(meta.node.hint), value
    return None


def hinted_shape(node: Any) -> tuple[int, ...] | None:
    """The concrete shape of ``node``'s example value (symbolic sizes replaced by their hints)."""
    t = tensor_meta(node)
    return None if t is None else tuple(hint(s) for s in t.shape)


def same_size(a: Any, b: Any) -> bool:
    """True only when sizes ``a`` and ``b`` are provably equal; never adds a guard."""
    if a is b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 — unbacked or foreign symbols: not provably equal
        return False


def is_scalar(value: Any) -> bool:
    """A Python number, a SymInt/SymFloat node, or a node whose example value is one of those."""
    v = example(value) if isinstance(value, fx.Node) else value
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)


def constant_value(value: Any) -> float | None:
    """``value`` as a Python float when it is a compile-time constant number, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


# --------------------------------------------------------------------------- placeholders and modules

_BUFFER = re.compile(r"_buffers_")


def placeholder_role(node: fx.Node, example_input: Any, mutated: set[fx.Node] = frozenset()) -> str:
    """``"param"``, ``"buffer"``, ``"size"`` (a symbolic int) or ``"input"`` (user data, and
    any buffer the graph writes in place)."""
    if node in mutated:
        return "input"
    if isinstance(example_input, torch.nn.Parameter):
        return "param"
    if isinstance(example_input, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return "size"
    if _BUFFER.search(str(node.target)):
        return "buffer"
    return "input"


_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select", "expand",
                 "contiguous", "flatten", "unflatten", "as_strided", "detach"}
_NOT_MUTATING = {"requires_grad_", "retain_grad_", "share_memory_"}
#: Methods that may return an alias of their input without writing into it.
_ALIASING_READS = _VIEW_METHODS | {
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "view_as", "expand_as", "reshape_as", "t", "unbind", "split", "chunk", "diagonal", "movedim", "moveaxis",
    "swapaxes", "swapdims", "unfold", "split_with_sizes", "tensor_split", "__getitem__", operator.getitem,
    torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten, torch.t,
    torch.narrow, torch.select, torch.movedim, torch.diagonal, torch.split, torch.chunk, torch.unbind,
    torch.swapaxes, torch.detach, torch.as_strided, torch.view_as_real, torch.view_as_complex}
_ALIASING_NAMES = {"cast", "identity", "view", "transpose", "permute", "unsqueeze", "expand", "flatten", "unflatten",
                   "getitem", "size"}
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _is_tensor_node(value: Any) -> bool:
    return isinstance(value, fx.Node) and (example(value) is None or isinstance(example(value), torch.Tensor))


def written_by(node: fx.Node) -> list[fx.Node]:
    """The tensors ``node`` writes in place, by its spelling: ``m[i] = x`` (``operator.setitem``),
    ``m.masked_fill_(...)`` and every other trailing-underscore method or function, ``m += x``,
    ``torch.add(a, b, out=m)`` and ``F.relu(m, inplace=True)``."""
    targets: list[Any] = []
    first = node.args[0] if node.args else None
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            targets.append(first)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "") or ""
        try:
            inplace_operator = node.target in _INPLACE_OPERATORS
        except TypeError:  # unhashable target
            inplace_operator = False
        operator_module = getattr(node.target, "__module__", None) in ("_operator", "operator")  # and_, or_, not_
        if inplace_operator or (name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING
                                and not operator_module):
            targets.append(first)
    if node.op in ("call_function", "call_method"):
        if node.kwargs.get("inplace") is True:
            targets.append(first)
        out = node.kwargs.get("out")
        targets.extend(out if isinstance(out, (tuple, list)) else [out])
    return [t for t in dict.fromkeys(targets) if _is_tensor_node(t)]


def _storage_key(value: Any) -> Any:
    """Identity of the (fake) storage behind an example tensor, or None."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return None
    try:
        return ("storage", value.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001 — tensor subclasses without a plain storage
        return None


class Writes:
    """The in-place writes of a graph, and which nodes they reach.

    Dynamo keeps in-place ops as they were written (``m[a:b] = -inf``, ``m.masked_fill_(...)``):
    no dataflow edge leads from such a write to the later reads of ``m`` or of any view of it.
    Nodes are grouped by the storage of their example values (fake tensors share a storage
    exactly where the real tensors do: views, in-place results), and each group lists the nodes
    that may write into it, in graph order.  A writer is a node whose spelling writes
    (:func:`written_by`), any call that returns an alias of one of its tensor arguments without
    being a known view, and any call made only for its effect (no value) on a tensor argument.
    A storage whose example's version counter counts more writes than the writers found (an
    in-place op of a spelling not recognised) is listed in :attr:`unknown`.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.position: dict[fx.Node, int] = {}
        self.group: dict[fx.Node, Any] = {}
        self.members: dict[Any, list[fx.Node]] = {}
        self.writers: dict[Any, list[fx.Node]] = {}
        self.targets: dict[fx.Node, list[fx.Node]] = {}
        self.unknown: set[Any] = set()
        versions: dict[Any, int] = {}
        placeholder_groups: set[Any] = set()
        for i, node in enumerate(graph.nodes):
            self.position[node] = i
            value = example(node)
            key = _storage_key(value)
            if key is None and value is None and node.op in ("call_method", "call_function") and (
                    node.target in _VIEW_METHODS or node.target is operator.getitem) and _is_tensor_node(
                        node.args[0] if node.args else None):
                key = self.group.get(node.args[0])  # no example value: structural views
            self.group[node] = key if key is not None else ("node", node)
            self.members.setdefault(self.group[node], []).append(node)
            if key is not None and isinstance(value, torch.Tensor):
                versions[key] = max(versions.get(key, 0), int(getattr(value, "_version", 0)))
            if node.op == "placeholder":
                placeholder_groups.add(self.group[node])
            targets = written_by(node) or self._aliasing_calls(node, value)
            targets = list(dict.fromkeys(t for t in targets if t in self.group))
            if targets:
                self.targets[node] = targets
                for group in dict.fromkeys(self.group[t] for t in targets):
                    self.writers.setdefault(group, []).append(node)
        for group, version in versions.items():
            if group not in placeholder_groups and version > len(self.writers.get(group, ())):
                self.unknown.add(group)

    def _aliasing_calls(self, node: fx.Node, value: Any) -> list[fx.Node]:
        if node.op not in ("call_function", "call_method"):
            return []
        if node.target in _ALIASING_READS or node.target is getattr or canonical_name(node) in _ALIASING_NAMES:
            return []  # views and no-op casts return an alias without writing
        args = [a for a in node.all_input_nodes if _is_tensor_node(a)]
        if value is None:
            return args  # called for its effect alone
        key = _storage_key(value)
        return [a for a in args if key is not None and self.group.get(a) == key]

    def covers(self, node: fx.Node) -> bool:
        """True once ``node`` has been seen (the graph may have gained nodes since)."""
        return node in self.group

    def writes_into(self, node: fx.Node, before: fx.Node | None = None, after: fx.Node | None = None) -> list[fx.Node]:
        """Nodes that may write into ``node``'s storage, in graph order, strictly between ``after``
        and ``before`` (either may be None: no bound)."""
        found = self.writers.get(self.group.get(node), [])
        low = -1 if after is None else self.position[after]
        high = len(self.position) if before is None else self.position[before]
        return [w for w in found if low < self.position[w] < high and w is not node]

    def first_use(self, node: fx.Node, among: set[fx.Node], before: fx.Node) -> fx.Node | None:
        """The earliest node of ``among`` that reads ``node``'s storage, directly or through values
        computed from it, looking no further than ``before``."""
        limit = self.position[before]
        stack = list(self.members.get(self.group.get(node), [node]))
        seen: set[fx.Node] = set()
        first = None
        while stack:
            current = stack.pop()
            if current in seen or self.position.get(current, limit + 1) > limit:
                continue
            seen.add(current)
            for user in current.users:
                if user in among and (first is None or self.position[user] < self.position[first]):
                    first = user
                stack.append(user)
        return first

    def written(self, node: fx.Node) -> bool:
        """True when anything in the graph may write into ``node``'s storage."""
        return bool(self.writers.get(self.group.get(node)))

    def unknown_write(self, node: fx.Node) -> bool:
        """True when ``node``'s storage is written by an operation :func:`written_by` does not read."""
        return self.group.get(node) in self.unknown


def mutated_placeholders(graph: fx.Graph) -> set[fx.Node]:
    """Placeholders that the graph writes in place (KV caches, running statistics ...).

    A write such as ``cache[:, :, pos] = k`` or ``cache.index_copy_(2, pos, k)`` leaves no
    dataflow edge from ``k`` to later reads of ``cache``: such buffers hold state that
    depends on the inputs, whatever their name says.
    """
    writes = Writes(graph)
    return {n for n in graph.nodes if n.op == "placeholder" and writes.writes_into(n)}


# the frame's local or global the path starts from: L['self'], L['args'][0], G['model'] (a function
# compiled around a model held in a global, as training steps often are)
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\](\[\d+\])?")


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost nn.Module that ran ``node`` (``""`` for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    path = _ROOT.sub("", raw)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.lstrip(".")


def owning_module(nodes: list[fx.Node]) -> str:
    """The deepest module path shared by ``nodes`` (the module that owns an attention site)."""
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common)
