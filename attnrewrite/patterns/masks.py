"""Mask resolution: split a site's mask into what kernels want to know.

Models build masks in many ways: a causal ``tril`` buffer sliced to the sequence length, an
``arange`` comparison, HF's ``where(causal & padding, 0, finfo.min)``, BERT's ``(1 - m) * min``.
The resolver first splits each mask term structurally — conjunctions of bool masks, sums of
additive masks, ``where(c, 0, -big)`` into a keep-mask ``c`` — and then looks at the terms
that depend only on shapes, constants and buffers (never on user inputs or parameters):
it evaluates them on the site's shapes and

- drops a term that masks nothing,
- replaces a term that is exactly the causal triangle by ``causal=True`` (kernels then
  skip the masked blocks instead of reading a mask),
- keeps any other term (sliding windows, ALiBi, relative position biases) as it is.

Data-dependent terms (padding masks, learned biases) are kept; the certifier then checks the
result against the original on random padding masks.

Terms are evaluated as the rewrite will read them, just before the site's output, with the
graph's in-place writes executed (a mask built by ``m = zeros(T, T)``, ``m[:, 5:] = -inf``
is the mask it holds after the write, not zeros); a term written in place with a value that
depends on user data counts as data-dependent.  A term written in place is never split into the
operands it was computed from (``keep = causal.clone(); keep[5:, :2] = False`` is not the causal
``tril`` behind the clone): it is evaluated whole.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
import torch.fx as fx

from attnrewrite.ir.canonical import materialize_mask, steps_shape
from attnrewrite.ir.capture import (constant_value, example, hinted_shape, is_float_tensor, normalize, rank, tensor_meta,
                                    written_by)
from attnrewrite.ir.evaluate import ClosureTooLarge, GraphEvaluator, UnreadableWrite
from attnrewrite.ir.spec import MASKED_SCORE, AttentionSpec, MaskTerm, NotAttention, Site
from attnrewrite.patterns.layout import ref_shape, term_steps

_TRANSPARENT = {"identity", "expand"}  # broadcasting and copies: the term broadcasts anyway
_MAX_DEPTH = 8


def _is_device_move(call) -> bool:
    """``x.to(device)`` — a cast that keeps the dtype."""
    if call.name != "cast":
        return False
    src, dst = tensor_meta(call.args[0]), tensor_meta(call.node)
    return src is not None and dst is not None and src.dtype == dst.dtype


def _scalar(value, evaluator: GraphEvaluator, at: fx.Node | None) -> float | None:
    """A number, or a shape-only node evaluating to a single number (``torch.zeros(())``) as read
    just before ``at``."""
    c = constant_value(value)
    if c is not None or not isinstance(value, fx.Node):
        return c
    meta = tensor_meta(value)
    if meta is None or meta.numel() != 1 or evaluator.depends_on_data(value):
        return None
    return float(evaluator.value(value, at=at).reshape(()))


def split_term(term: MaskTerm, evaluator: GraphEvaluator, score_rank: int, depth: int = 0,
               at: fx.Node | None = None) -> list[MaskTerm]:
    """Split ``term`` into simpler terms whose sum (or conjunction) is the same mask (values read
    just before ``at``, the site's output)."""
    call = normalize(term.node)
    if call is None or depth >= _MAX_DEPTH or term.steps != term_steps(rank(term.node), score_rank):
        return [term]  # (a term that follows a view of the scores keeps its layout steps whole)
    if written_by(term.node) or evaluator.writes.writes_into(term.node, before=at):
        # m.add_(b) is one value: its operand m, read later, already holds the sum; and a term written in
        # place after it was computed (keep = causal.clone(); keep[5:, :2] = False) is not its operands:
        # it is read whole, with its writes
        return [term]

    def sub(kind: str, node, coeff: float = term.coeff) -> list[MaskTerm]:
        # an operand written in place after the term read it is read later with the write: not the term's part
        if not isinstance(node, fx.Node) or evaluator.writes.writes_into(node, after=term.node, before=at):
            return [term]
        child = MaskTerm(kind, node, term_steps(rank(node), score_rank), coeff)
        return split_term(child, evaluator, score_rank, depth + 1, at)

    if call.name in _TRANSPARENT or _is_device_move(call):
        return sub(term.kind, call.args[0])
    if term.kind == "keep":
        if call.name == "and" and all(isinstance(a, fx.Node) for a in call.args):
            return sub("keep", call.args[0]) + sub("keep", call.args[1])
        if call.name == "not":
            return sub("drop", call.args[0])
    elif term.kind == "drop":
        if call.name == "not":
            return sub("keep", call.args[0])
    elif term.kind == "add" and term.coeff > 0 and is_float_tensor(term.node):  # (a bool or int tensor
        # added to the scores adds its 0/1 or integer values: -inf written into a bool tensor is True)
        if call.name == "add" and all(isinstance(a, fx.Node) for a in call.args[:2]):
            alpha = constant_value(call.kwargs.get("alpha", 1))
            if alpha is not None:
                return sub("add", call.args[0]) + sub("add", call.args[1], term.coeff * alpha)
        if call.name == "where":
            cond, a, b = call.args
            a_val, b_val = _scalar(a, evaluator, at), _scalar(b, evaluator, at)
            if a_val == 0.0 and b_val is not None and b_val * term.coeff <= MASKED_SCORE:
                return sub("keep", cond)
            if b_val == 0.0 and a_val is not None and a_val * term.coeff <= MASKED_SCORE:
                return sub("drop", cond)
            # where(c, bias, -big) (HF's SDPA path merges T5's bias with the mask so): the bias where c holds,
            # masked elsewhere — the bias plus the keep-mask c (a masked score is masked whatever is added to it)
            if a_val is None and is_float_tensor(a) and b_val is not None and b_val * term.coeff <= MASKED_SCORE:
                return sub("add", a) + sub("keep", cond)
            if b_val is None and is_float_tensor(b) and a_val is not None and a_val * term.coeff <= MASKED_SCORE:
                return sub("add", b) + sub("drop", cond)
        if call.name == "masked_fill":
            base, mask, value = call.args
            v = _scalar(value, evaluator, at)
            if v is not None and v * term.coeff <= MASKED_SCORE:
                return sub("add", base) + sub("drop", mask)
    return [term]


def _keep_pattern(term: MaskTerm, value: torch.Tensor) -> torch.Tensor | None:
    """The bool keep-mask a constant term stands for, or None when it is a real bias."""
    if term.kind == "keep":
        return value.bool()
    if term.kind == "drop":
        return ~value.bool()
    value = value * term.coeff
    masked = value <= MASKED_SCORE
    if bool(((value == 0) | masked).all()):
        return ~masked
    return None


def classify_keep(keep: torch.Tensor, t_q: int, t_k: int) -> str:
    """``"all"`` (masks nothing), ``"causal"`` (exactly the top-left causal triangle) or ``"other"``."""
    if keep.dim() < 2:
        keep = keep.reshape((1,) * (2 - keep.dim()) + tuple(keep.shape))
    try:
        full = keep.expand(keep.shape[:-2] + (t_q, t_k)).reshape(-1, t_q, t_k)
    except RuntimeError:
        return "other"
    first = full[0]
    if not bool((full == first).all()):
        return "other"  # differs across batch or heads
    if bool(first.all()):
        return "all"
    if torch.equal(first, torch.ones(t_q, t_k, dtype=torch.bool).tril()):
        return "causal"
    return "other"


def resolve(site: Site, evaluator: GraphEvaluator) -> None:
    """Simplify ``site.spec``'s mask terms in place (see the module docstring)."""
    try:
        _resolve(site, evaluator)
    except (UnreadableWrite, ClosureTooLarge) as exc:
        raise NotAttention(f"could not read the mask: {exc}") from exc


def _resolve(site: Site, evaluator: GraphEvaluator) -> None:
    spec = site.spec
    for node in site.value_checks:
        v = _scalar(node, evaluator, site.output)
        if v is None or v > MASKED_SCORE:
            raise NotAttention(f"masked scores are set to {node.name}, not a constant mask value")
    terms: list[MaskTerm] = []
    for term in spec.bias:
        terms.extend(split_term(term, evaluator, site.score_rank, at=site.output))
    t_q, t_k = ref_shape(spec.q)[-2], ref_shape(spec.k)[-2]
    kept, causal = [], spec.causal
    for term in terms:
        if evaluator.depends_on_data(term.node):
            kept.append(term)
            continue
        value = evaluator.value(term.node, at=site.output)
        keep = _keep_pattern(term, value) if isinstance(value, torch.Tensor) else None
        verdict = "other" if keep is None else classify_keep(keep, t_q, t_k)
        if verdict == "all":
            continue  # masks nothing
        if verdict == "causal":
            causal = True
            site.notes.append(f"mask {term.node.name} proven causal")
        else:
            kept.append(term)
    site.spec = replace(spec, bias=tuple(_at_least_2d(t) for t in kept), causal=causal)


def _at_least_2d(term: MaskTerm) -> MaskTerm:
    """A bias over keys alone (``s + b`` with ``b`` of shape [Tk], or a 0-d one) broadcasts against the
    scores from the right as [1, Tk]; attention ops want masks of at least two dims."""
    shape = hinted_shape(term.node)
    if shape is None:
        return term
    missing = 2 - len(steps_shape(shape, term.steps))
    return replace(term, steps=term.steps + (("unsqueeze", 0),) * missing) if missing > 0 else term


def _broadcasts_from_key_padding(term: MaskTerm) -> bool:
    """True when the term is one value per (batch, key): broadcastable from [B, 1, 1, Tk]."""
    shape = hinted_shape(term.node)
    if shape is None:
        return False
    shape = tuple(steps_shape(shape, term.steps))
    shape = (1,) * (4 - len(shape)) + shape
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def as_key_padding(site: Site, evaluator: GraphEvaluator) -> AttentionSpec | None:
    """``site.spec`` with its additive key-padding biases taken as padding masks, or None when it has none.

    BERT's ``(1 - mask[:, None, None, :]) * -10000.0`` is an additive bias computed from a [B, Tk]
    input, constant over queries and heads; it is key padding when its values are 0 or <= MASKED_SCORE (−9000: −10⁴ in any float dtype).
    Such a term (an input-dependent additive bias of that shape whose example values are in that
    set) becomes a ``padding`` term: kinds without scores read it as a keep-mask, and the canonical
    form checks its values on every call — certification's probes included — raising if one ever
    leaves the set.  Nothing about the values is assumed.
    """
    spec, changed, terms = site.spec, False, []
    for term in spec.bias:
        if term.kind == "add" and evaluator.depends_on_inputs(term.node) and _broadcasts_from_key_padding(term):
            try:
                value = evaluator.value(term.node, at=site.output)
            except (UnreadableWrite, ClosureTooLarge):
                value = None
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                value = value * term.coeff
                if bool(((value == 0) | (value <= MASKED_SCORE)).all()):
                    term, changed = replace(term, kind="padding"), True
        terms.append(term)
    return replace(spec, bias=tuple(terms)) if changed else None


# --------------------------------------------------------------------------- position biases (ALiBi)

#: Ops an index expression may use: views, casts and the arithmetic of j − i (a product or quotient
#: only with a constant).  Anything else (a table lookup, a clamp, a product of two indices) is not
#: a position bias this recogniser proves.
_INDEX_VIEWS = {"view", "unsqueeze", "expand", "identity", "cast", "transpose"}
_INDEX_ARITHMETIC = {"sub", "add", "neg", "abs", "mul", "div"}
_EXACT_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)

#: The constant part of an index expression: {size node or None (the number 1): coefficient}, i.e.
#: Σ coefficient · value(node) — the queries' start in ``arange(start, start + Tq)``, a cache length
#: added to the positions, ``Tk − Tq``.  Sizes are read at run time, so the offset follows them.
Offset = dict


def _is_size(node) -> bool:
    """A node holding an integer (a sequence length, symbolic or not), not a tensor."""
    return isinstance(node, fx.Node) and isinstance(example(node), (int, torch.SymInt))


def _plain_index(index) -> bool:
    """``x[None, :]``-style indexing: only None, full slices and Ellipsis (a view, no selection)."""
    entries = index if isinstance(index, tuple) else (index,)
    return all(e is None or e is Ellipsis or (isinstance(e, slice) and e == slice(None)) for e in entries)


def _scalar_offset(value) -> Offset | None:
    """A constant number or a size as an :data:`Offset`; None for anything else (a tensor, a float node)."""
    c = constant_value(value)
    if c is not None:
        return {None: c} if c else {}
    if _is_size(value):
        return {value: 1.0}
    return None


def _combine(*parts: tuple[float, Offset]) -> Offset:
    total: Offset = {}
    for factor, offset in parts:
        for key, coef in offset.items():
            total[key] = total.get(key, 0.0) + factor * coef
    return {key: coef for key, coef in total.items() if coef != 0.0}


def _affine_index(node: fx.Node, depth: int = 0) -> tuple[str | None, Offset]:
    """(why not, {}) or (None, offset): whether ``node`` is built from ``arange`` (step 1, from a constant
    or a size) by views, casts, sums, differences, negation, abs, and products with constants alone, and
    sums with constants and sizes; ``offset`` its constant part, the starts and sizes it adds, so that
    its values minus the offset on the site's shapes determine it at every shape.  ``abs`` only of a
    part without an offset (|j − i − s| is not a distance plus a constant)."""
    if depth > 24:
        return "the index expression is too deep", {}
    meta = tensor_meta(node)
    if meta is None or meta.dtype not in _EXACT_DTYPES:
        return f"{node.name} is not an int or float32/float64 tensor", {}
    if node.op == "call_function" and node.target is torch.arange:
        args, kw = list(node.args), node.kwargs
        if len(args) >= 2:                      # arange(start, end[, step])
            start, end = args[0], args[1]
        elif len(args) == 1:                    # arange(end) or arange(start, end=...)
            start, end = (args[0], kw["end"]) if "end" in kw else (0, args[0])
        else:                                   # arange(start=..., end=...)
            start, end = kw.get("start", 0), kw.get("end")
        step = args[2] if len(args) > 2 else kw.get("step", 1)
        offset = _scalar_offset(start)
        if offset is None or constant_value(step) != 1:
            return f"{node.name} is an arange that does not start at a number or a size with step 1", {}
        if not (isinstance(end, int) or _is_size(end)):
            return f"{node.name} is an arange of {end}, not of a size", {}
        return None, offset
    call = normalize(node)
    if call is None:
        return f"{node.name} ({node.target}) is not an index operation", {}
    if call.name == "getitem":
        if not _plain_index(call.args[1] if len(call.args) > 1 else None):
            return f"{node.name} selects elements", {}
        return _affine_index(call.args[0], depth + 1) if isinstance(call.args[0], fx.Node) else (
            f"{node.name} reads no tensor", {})
    if call.name in _INDEX_VIEWS:
        if call.name == "cast":
            source, target = tensor_meta(call.args[0]), tensor_meta(call.node)
            if target is None or target.dtype not in _EXACT_DTYPES:
                return f"{node.name} casts to {getattr(target, 'dtype', None)}, which rounds positions", {}
            if source is not None and source.dtype.is_floating_point and not target.dtype.is_floating_point:
                return f"{node.name} casts a float index to {target.dtype}, which rounds positions", {}
        return _affine_index(call.args[0], depth + 1) if isinstance(call.args[0], fx.Node) else (
            f"{node.name} reads no tensor", {})
    if call.name not in _INDEX_ARITHMETIC:
        return f"{node.name} ({call.name}) is not an index operation", {}
    # every operand is an index tensor, a constant number or a size (an offset: read at run time)
    read = call.args[:1] if call.name in ("neg", "abs") else call.args[:2]
    parts: list[tuple[float, Offset]] = []
    tensors = 0
    sign = {"neg": (-1.0,), "abs": (1.0,), "sub": (1.0, -1.0)}.get(call.name, (1.0, 1.0))
    if call.name in ("add", "sub"):
        alpha = constant_value(call.kwargs.get("alpha", 1))
        if alpha is None:
            return f"{node.name} has a non-constant alpha", {}
        sign = (1.0, sign[1] * alpha)
    for position, operand in enumerate(read):
        if isinstance(operand, fx.Node) and tensor_meta(operand) is not None:
            why, offset = _affine_index(operand, depth + 1)
            if why is not None:
                return why, {}
            tensors += 1
        else:
            offset = _scalar_offset(operand)
            if offset is None:
                return f"{node.name} reads a value that is neither an index tensor nor a constant or a size", {}
            if call.name in ("mul", "div") and offset.keys() - {None}:
                return f"{node.name} multiplies by a size", {}
        parts.append((sign[position] if position < len(sign) else 1.0, offset))
    if call.name in ("mul", "div"):
        if tensors != 1:
            return f"{node.name} multiplies two index tensors", {}
        index_at = 0 if isinstance(read[0], fx.Node) and tensor_meta(read[0]) is not None else 1
        if call.name == "div" and index_at != 0:
            return f"{node.name} divides by an index tensor", {}
        factor = parts[1 - index_at][1].get(None, 0.0)
        factor = 1.0 / factor if call.name == "div" and factor else factor
        return None, _combine((factor, parts[index_at][1]))
    if call.name == "abs" and parts[0][1]:
        return f"{node.name} takes abs of a distance with an offset", {}
    if call.name == "abs":
        return None, {}
    return None, _combine(*parts)


def _index_expression(node: fx.Node) -> str | None:
    """Why ``node`` is not built from ``arange`` (from 0, step 1) by views, casts, sums, differences,
    negation, abs, and products with constants alone — or None when it is, so its values at the site's
    shapes determine it at every shape."""
    why, offset = _affine_index(node)
    if why is None and offset:
        return f"{node.name} is offset by {_describe_offset(offset)}"
    return why


def _describe_offset(offset: Offset) -> str:
    return " + ".join(f"{coef:g}" if key is None else f"{coef:g}·{key.name}" for key, coef in offset.items())


def _position_form(value: torch.Tensor, t_q: int, t_k: int) -> tuple[str, float] | None:
    """(form, c) with ``value`` = c · d(i, j) exactly on [Tq, Tk] (d of :data:`POSITION_FORMS`), else None."""
    if tuple(value.shape) != (t_q, t_k) or t_k < 2:
        return None
    value = value.to(torch.float64)
    distance = (torch.arange(t_k, dtype=torch.float64).view(1, -1)
                - torch.arange(t_q, dtype=torch.float64).view(-1, 1))
    for form, base in (("j-i", distance), ("|j-i|", distance.abs())):
        c = float(value[0, 1] - value[0, 0]) if form == "j-i" else float(value[0, 1])
        if c != 0.0 and math.isfinite(c) and torch.equal(value, c * base):
            return form, c
    return None


def _position_term(term: MaskTerm, site: Site, evaluator: GraphEvaluator) -> tuple[MaskTerm | None, str]:
    """(the ``position`` term, "") for an additive term proven to be slope_h · c · d(i, j), else (None, why not)."""
    node = term.node
    call = normalize(node)
    if term.kind != "add" or term.steps or site.score_rank != 4 or call is None or call.name != "mul":
        return None, "not a product added to 4-d scores"
    a, b = call.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None, "not a product of two tensors"
    t_q, t_k = ref_shape(site.spec.q)[-2], ref_shape(site.spec.k)[-2]
    heads = ref_shape(site.spec.q)[-3]
    reasons = []
    for slopes, index in ((a, b), (b, a)):
        why, offset = _affine_index(index)
        if why is None and evaluator.depends_on_data(index):
            why = f"{index.name} depends on data"
        if why is not None:
            reasons.append(why)
            continue
        meta = tensor_meta(slopes)
        shape = hinted_shape(slopes)
        if meta is None or not meta.is_floating_point() or shape is None or len(shape) > 4:
            reasons.append(f"{slopes.name} is not a float tensor of at most 4 dims")
            continue
        if meta.requires_grad:
            reasons.append(f"{slopes.name} requires grad (trainable slopes keep the mask path)")
            continue
        shape = (1,) * (4 - len(shape)) + tuple(shape)
        if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, heads):
            reasons.append(f"{slopes.name} of shape {tuple(hinted_shape(slopes))} is not one slope per head")
            continue
        try:
            value = evaluator.value(index, at=site.output)
        except (UnreadableWrite, ClosureTooLarge) as exc:
            reasons.append(f"could not read {index.name}: {exc}")
            continue
        if not isinstance(value, torch.Tensor) or value.dim() > 4 or any(s != 1 for s in value.shape[:-2]):
            reasons.append(f"{index.name} is not a [Tq, Tk] index tensor")
            continue
        try:  # the offset on the example (its sizes as the graph holds them there)
            at_example = sum(coef * (1 if key is None else evaluator.value(key, at=site.output))
                             for key, coef in offset.items())
        except (UnreadableWrite, ClosureTooLarge) as exc:
            reasons.append(f"could not read the offset of {index.name}: {exc}")
            continue
        found = _position_form((value.reshape(value.shape[-2:]) if value.dim() >= 2 else value).double() - at_example,
                               t_q, t_k)
        if found is None:
            offset_text = f" (less its offset {_describe_offset(offset)})" if offset else ""
            reasons.append(f"{index.name}{offset_text} is not c·(j − i) nor c·|j − i| on the site's shapes")
            continue
        form, c = found
        to_4d = (("unsqueeze", 0),) * (4 - len(hinted_shape(slopes)))  # [.., H, 1, 1] -> [1, H, 1, 1]
        # index = c·(d + shift): the shift in units of d, with integral coefficients kept as ints (no SymFloat)
        shift = tuple((key, int(q) if float(q).is_integer() else q) for key, coef in offset.items() for q in [coef / c])
        taken = MaskTerm("position", slopes, to_4d, term.coeff * c, form, offset=shift)
        why = _differs_as_a_bias(taken, term, site, evaluator)
        if why is not None:
            reasons.append(why)
            continue
        return taken, ""
    return None, "; ".join(reasons)


def _differs_as_a_bias(taken: MaskTerm, term: MaskTerm, site: Site, evaluator: GraphEvaluator) -> str | None:
    """Why the ``position`` term ``taken``, written out by the code the rewrite runs
    (:func:`attnrewrite.ir.canonical.materialize_mask`), is not the additive ``term`` it replaces on the example,
    or None.  The certifier compares softmax outputs, which cannot see a constant added to a query's scores
    (a dropped or wrong shift); sigmoid's can, so the term is compared here as a bias, constants included."""
    t_q, t_k = ref_shape(site.spec.q)[-2], ref_shape(site.spec.k)[-2]
    read = lambda node: evaluator.value(node, at=site.output)  # noqa: E731
    want = read(term.node).to(torch.float64) * term.coeff
    got = materialize_mask((taken,), read, torch.float64, torch.zeros(1, 1, t_q, 1), torch.zeros(1, 1, t_k, 1))
    try:
        got, want = torch.broadcast_tensors(got, want.reshape((1,) * (4 - want.dim()) + tuple(want.shape)))
    except RuntimeError:
        return f"{term.node.name} written out from its slopes has shape {tuple(got.shape)}, not {tuple(want.shape)}"
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    if not err <= 1e-5:  # (the model rounds slope · distance in float32)
        return f"{term.node.name} written out from its slopes differs from it by {err:.1e} (relative)"
    return None


def _product_of_tensors(node: fx.Node) -> bool:
    call = normalize(node)
    return (call is not None and call.name == "mul"
            and all(isinstance(a, fx.Node) and tensor_meta(a) is not None for a in call.args[:2]))


def as_position_bias(site: Site, evaluator: GraphEvaluator) -> tuple[AttentionSpec | None, list[str]]:
    """(``site.spec`` with one additive term proven to be a position bias — slope_h · c · (j − i) or
    slope_h · c · |j − i| (ALiBi), the slopes a float tensor of one value per head (or one), not
    requiring grad — taken as a ``position`` term, or None when there is no such term or more than one;
    why each other product added to the scores stays a mask, for the report).

    The proof is structural and numeric: the index factor is built from ``arange`` (step 1, from a number or
    a size) by views, casts, sums, differences, negation, abs and constant factors alone, plus constants and
    sizes (so its values on the site's shapes, less that offset, fix it at every shape), and those values
    equal c · (d(i, j) + shift) exactly, the shift an offset of the queries against the keys read from the
    graph's sizes at run time (``arange(start, start + Tq)`` for queries counted from ``start``, ``Tk − Tq``
    for a decoding step or a chunk of a prefill; the term's ``offset``).  The certifier
    then compares the written-out term with the original on its probes.  Everything else (a table
    lookup by distance, T5's buckets, clamped distances, slopes per query or batch, trainable slopes)
    stays an additive mask term here; :func:`attnrewrite.patterns.relative.as_relative_bias` then takes
    the tables by distance (T5) for the kinds that read them.
    """
    return take_one_term(
        site.spec, lambda term: _position_term(term, site, evaluator),
        # (a scaled mask is no candidate: no note)
        lambda term, why: f"additive bias {term.node.name} stays a mask: {why}" if _product_of_tensors(term.node)
        else None,
        "position biases: each stays a mask (a kind computes one)")


def take_one_term(spec: AttentionSpec, read: Callable[[MaskTerm], tuple[MaskTerm | None, str]],
                  note: Callable[[MaskTerm, str], str | None], several: str) -> tuple[AttentionSpec | None, list[str]]:
    """``spec`` with the one additive term that ``read`` turns into another term (``read(term)`` gives the new
    term or None, and why not) put in its place, or None when no term or more than one reads; and the notes
    for the report: ``note(term, why)`` for each additive term that stays a mask (None: no note), and
    ``several`` (after the count) when more than one reads.  A term ``read`` fails on stays the mask it was."""
    found, terms, kept = [], [], []
    for term in spec.bias:
        taken, why = None, ""
        if term.kind == "add":
            try:
                taken, why = read(term)
            except Exception as exc:  # noqa: BLE001 — a term the recogniser cannot read stays the mask it was
                taken, why = None, f"could not be read ({type(exc).__name__})"
        if taken is not None:
            found.append(taken)
        elif term.kind == "add" and (line := note(term, why)) is not None:
            kept.append(line)
        terms.append(taken or term)
    if len(found) > 1:
        kept.append(f"{len(found)} {several}")
    if len(found) != 1:
        return None, kept
    return replace(spec, bias=tuple(terms)), kept
