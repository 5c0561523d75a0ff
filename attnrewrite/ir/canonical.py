"""From a spec to the canonical attention call, once, for both certification and rewriting.

Every function here takes a ``lookup`` that maps graph nodes to values.  The certifier passes
real tensors (float64 probes); the rewriter passes ``torch.fx.Proxy`` objects, so the very
same code records new graph nodes.  What is certified is therefore exactly what is emitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from attnrewrite.ir.capture import tensor_meta
from attnrewrite.ir.score_program import score_program
from attnrewrite.ir.spec import MASKED_SCORE, PADDING_GUARD, AttentionSpec, MaskTerm, ScoreMod, Step, TensorRef

Lookup = Callable[[fx.Node], Any]


def _resolve(value: Any, lookup: Lookup) -> Any:
    if isinstance(value, fx.Node):
        return lookup(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_resolve(v, lookup) for v in value)
    return value


def apply_steps(x: Any, steps: tuple[Step, ...], lookup: Lookup) -> Any:
    """Apply layout steps (views) to a tensor or proxy."""
    for op, *args in steps:
        args = _resolve(args, lookup)
        if op == "transpose":
            x = x.transpose(args[0], args[1])
        elif op == "permute":
            x = x.permute(*args[0])
        elif op == "unsqueeze":
            x = x.unsqueeze(args[0])
        elif op == "squeeze":
            x = x.squeeze(args[0])
        elif op == "reshape":
            x = x.reshape(*args[0])
        elif op == "flatten":
            x = x.flatten(args[0], args[1])
        elif op == "unflatten":
            x = x.unflatten(args[0], tuple(args[1]))
        elif op == "expand":
            x = x.expand(*args[0])
        elif op == "unflatten_like":  # dim 0 into the first args[2] sizes of another operand (args[0] + steps)
            other = apply_steps(args[0], args[1], lookup)
            x = x.unflatten(0, tuple(other.size(d) for d in range(args[2])))
        elif op == "expand_like":  # broadcast dims ``args[2]`` to the sizes of another operand (args[0] + steps)
            other = apply_steps(args[0], args[1], lookup)
            x = x.expand(*[other.size(d) if d in args[2] else -1 for d in range(args[3])])
        else:
            raise ValueError(f"unknown layout step {op!r}")
    return x


def steps_shape(shape: tuple, steps: tuple[Step, ...]) -> tuple:
    """The shape that ``steps`` give a tensor of ``shape`` (sizes may be ints or placeholders)."""
    shape = list(shape)
    for op, *args in steps:
        if op == "transpose":
            a, b = (d % len(shape) for d in args[:2])
            shape[a], shape[b] = shape[b], shape[a]
        elif op == "permute":
            shape = [shape[d] for d in args[0]]
        elif op == "unsqueeze":
            d = args[0] % (len(shape) + 1)
            shape.insert(d, 1)
        elif op == "squeeze":
            del shape[args[0] % len(shape)]
        elif op == "reshape":
            shape = list(args[0])
        elif op == "flatten":
            a, b = (d % len(shape) for d in args[:2])
            merged = 1
            for size in shape[a:b + 1]:
                merged = merged * size if isinstance(size, int) and isinstance(merged, int) else None
            shape[a:b + 1] = [merged]
        elif op == "unflatten":
            d = args[0] % len(shape)
            shape[d:d + 1] = list(args[1])
        elif op == "expand":
            shape = [old if new == -1 else new for old, new in zip(shape, args[0])]
        elif op == "unflatten_like":  # (likewise)
            shape[0:1] = list(args[3][:args[2]])
        elif op == "expand_like":  # the other operand's sizes, as traced, are the step's last argument
            shape = [args[4][d] if d in args[2] else size for d, size in enumerate(shape)]
    return tuple(shape)


def ref_value(ref: TensorRef, lookup: Lookup) -> Any:
    return apply_steps(lookup(ref.node), ref.steps, lookup)


def term_value(term: MaskTerm, lookup: Lookup) -> Any:
    return apply_steps(lookup(term.node), term.steps, lookup)


def position_distance(form: str, q: Any, k: Any, dtype: torch.dtype) -> Any:
    """[Tq, Tk] of ``dtype``: d(i, j) of a ``position`` mask term — j − i (``"j-i"``) or |j − i| (``"|j-i|"``)
    for query index i and key index j, the indices counted on q and k themselves (so it records on
    proxies, on q's device)."""
    rows = torch.ones_like(q[0, 0, :, 0], dtype=dtype).cumsum(0) - 1
    cols = torch.ones_like(k[0, 0, :, 0], dtype=dtype).cumsum(0) - 1
    distance = cols.unsqueeze(0) - rows.unsqueeze(1)
    return distance.abs() if form == "|j-i|" else distance


def position_shift(term: MaskTerm, lookup: Lookup) -> Any:
    """The shift of a ``position`` term's distance: Σ c · value(node) over ``term.offset`` (0 without one), a
    number — symbolic, or an FX proxy of one while recording, when it reads the graph's sizes."""
    shift: Any = 0
    for node, c in term.offset:
        value = 1 if node is None else lookup(node)
        shift = shift + (value if c == 1 else c * value)
    return shift


def with_row_constant(attn_mask: Any, constant: Any, dtype: torch.dtype, bool_mask: bool) -> Any:
    """``attn_mask`` (None, a bool keep-mask, or additive of ``dtype``) plus ``constant`` [1, Hq, 1, 1], an
    additive mask in float32 (float64 for float64): the constant is a position bias's shift, slope_h · c · s
    for positions far from 0, which ``dtype`` (bfloat16) would round.  Masked keys stay masked: −inf, and an
    additive mask's entries at or below :data:`MASKED_SCORE` (what the kinds count as masked) become −inf.  ``bool_mask``:
    ``attn_mask`` is a keep-mask (static: a proxy has no dtype while recording)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    constant = constant.to(wide)
    if attn_mask is None:
        return constant
    if bool_mask:
        return torch.where(attn_mask, constant, float("-inf"))
    keep = attn_mask > MASKED_SCORE
    return torch.where(keep, attn_mask.to(wide) + constant, float("-inf"))


def relative_distances(q: Any, k: Any) -> Any:
    """[Tq + Tk − 1] int64: the distances d = j − i from −(Tq − 1) to Tk − 1, counted on q and k themselves
    (so it records on proxies); R[:, d + Tq − 1] is the bias of query i against key j."""
    rows = torch.ones_like(q[0, 0, :, 0], dtype=torch.int64).cumsum(0) - 1
    cols = torch.ones_like(k[0, 0, :, 0], dtype=torch.int64).cumsum(0) - 1
    return torch.cat([-rows.flip(0)[:-1], cols])


def relative_table(term: MaskTerm, lookup: Lookup, q: Any, k: Any) -> Any:
    """R, [Hq or 1, Tq + Tk − 1]: a ``relative`` mask term's values by distance (its coefficient not applied),
    the model's own nodes (``term.relative.chain``) replayed with the distance vector in place of the leaves.

    Each leaf, ±(j − i) or ±|j − i| on the [.., Tq, Tk] grid, is given ±d (or ±|d|) laid out as [.., 1, L]:
    the query axis has length 1 and the key axis holds the distances, so the elementwise ops, lookups and
    views the matcher admitted compute R[h, d] where they computed the bias at (h, i, j)."""
    distances = relative_distances(q, k)
    env: dict[fx.Node, Any] = {}
    for leaf, form, c in term.relative.leaves:
        meta = tensor_meta(leaf)
        value = distances.abs() if form == "|j-i|" else distances
        value = (-value if c < 0 else value).to(meta.dtype)
        env[leaf] = value.reshape((1,) * (meta.dim() - 1) + (-1,))
    read = lambda n: env[n] if n in env else lookup(n)  # noqa: E731
    for node in term.relative.chain:
        args, kwargs = fx.node.map_arg(node.args, read), fx.node.map_arg(node.kwargs, read)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
    table = apply_steps(env[term.node], term.steps, lookup)
    return table.reshape(-1, table.shape[-1])


def relative_dense(table: Any, q: Any, k: Any) -> Any:
    """[1, H, Tq, Tk]: R[h, j − i + Tq − 1] written out on the grid (for the certifier and the kinds that read
    a mask)."""
    rows = torch.ones_like(q[0, 0, :, 0], dtype=torch.int64).cumsum(0) - 1
    cols = torch.ones_like(k[0, 0, :, 0], dtype=torch.int64).cumsum(0) - 1
    index = cols.unsqueeze(0) - rows.unsqueeze(1) + rows[-1]
    return table[:, index].unsqueeze(0)


def materialize_mask(terms: tuple[MaskTerm, ...], lookup: Lookup, dtype: torch.dtype, q: Any = None,
                     k: Any = None) -> Any:
    """The mask terms as one ``attn_mask``: bool (True = attend) when every term is a keep-mask,
    else an additive float mask of ``dtype``; None without terms.  ``position`` terms are written out as
    ``coeff · slopes · d(i, j)`` ([.., Hq, Tq, Tk]), which needs the site's ``q`` and ``k``."""
    keep = None
    additive = None
    for term in terms:
        if term.kind == "relative":  # written out from R, never read from the original [.., Tq, Tk] node
            value = relative_dense(relative_table(term, lookup, q, k), q, k)
        else:
            value = term_value(term, lookup)
        if term.kind == "position":
            distance = position_distance(term.form, q, k, dtype)
            value = value.to(dtype) * (distance + position_shift(term, lookup) if term.offset else distance)
        if term.kind == "keep":
            keep = value if keep is None else keep & value
        elif term.kind == "drop":
            value = ~value
            keep = value if keep is None else keep & value
        elif term.kind == "padding":  # checked on every call, never assumed
            value = value * term.coeff if term.coeff != 1.0 else value
            torch._assert_async(((value == 0) | (value <= MASKED_SCORE)).all(), PADDING_GUARD)
            value = value > MASKED_SCORE
            keep = value if keep is None else keep & value
        else:
            value = value.to(dtype)
            if term.coeff != 1.0:
                value = value * term.coeff
            additive = value if additive is None else additive + value
    if additive is None:
        return keep
    if keep is not None:
        additive = additive.masked_fill(~keep, -math.inf)
    return additive.to(dtype)


@dataclass
class AttentionCall:
    """Arguments of an SDPA-signature attention op, [B, H, T, D] layout.

    The scores are ``scale · (q · q_factor) · kᵀ``.  ``scale`` is a float, or a symbolic number (a
    SymFloat; an FX proxy of one while recording) when the site's scale is a value of the graph —
    ``module.scaling`` under ``dynamic=True`` — so the op applies it exactly where it applies a
    constant one (multiplying q by it first would round q·scale, not q, to a low-precision dtype,
    and a model would compute differently captured with ``dynamic=None`` and ``True``).
    ``q_factor`` (None, or a tensor broadcastable to q; or a SymFloat when the site has no
    explicit scale) holds the rest of a non-constant scale.  Kinds that use the scale call
    :meth:`scaled_q`; kinds that ignore it (linear) read ``q``.

    ``kwargs()`` holds what every kind's op takes.  The other fields are for kinds that build
    the scores themselves: ``score_mod`` (``mod(scores) -> scores`` on [B, Hq, Tq, Tk], applied
    to scale · q kᵀ before the mask; None for most sites), ``kv_groups`` (Hq // Hkv), ``dtype``
    (the dtype attention runs in) and ``bool_mask`` (``attn_mask`` is a bool keep-mask rather than
    an additive one: known while recording, when the mask is an FX proxy without a dtype).
    """

    q: Any
    k: Any
    v: Any
    attn_mask: Any
    dropout_p: Any  # a float, or the graph value of a symbolic probability (a proxy while recording)
    is_causal: bool
    scale: Any  # float | None, or a symbolic number (see above)
    enable_gqa: bool
    q_factor: Any = None
    score_mod: Callable[[Any], Any] | None = None
    kv_groups: int = 1
    dtype: torch.dtype | None = None
    bool_mask: bool = False  # static: attn_mask is a bool keep-mask (all terms keep/drop)
    #: ``score_mod`` as a program of elementwise steps (:mod:`attnrewrite.ir.score_program`), for kinds
    #: whose ops take it as text; None without a modification or when it has no program
    score_program: str | None = None
    #: a ``position`` mask term left out of ``attn_mask`` for a kind that computes it (``positions=True``):
    #: ``position_slopes`` [Hq] or [1] float32 (its coefficient folded in) and ``position`` its form
    #: (``"j-i"`` or ``"|j-i|"``); or a ``relative`` term: ``position_slopes`` the table R [Hq or 1, Tq + Tk − 1]
    #: by distance j − i + Tq − 1 (differentiable) and ``position="relative"``; None otherwise
    position_slopes: Any = None
    position: str | None = None
    #: learned sink logits, [1, Hq or 1, 1, 1] (``AttentionSpec.sink_logits``): one more key per query head with
    #: the score ``sink_logits[h]`` (not scaled, not masked, no score modification) and the value 0; None without
    sink_logits: Any = None

    def scaled_q(self) -> Any:
        return self.q if self.q_factor is None else self.q * self.q_factor

    def kwargs(self) -> dict[str, Any]:
        return dict(attn_mask=self.attn_mask, dropout_p=self.dropout_p, is_causal=self.is_causal,
                    scale=self.scale, enable_gqa=self.enable_gqa)


_NUMBERS = (int, float, torch.SymInt, torch.SymFloat)


def is_scalar(node: fx.Node, value: Any) -> bool:
    """Whether a non-constant scale factor is a number (a SymFloat, e.g. ``module.scaling`` read under
    ``dynamic=True``) rather than a tensor.  Decided from the graph (the node's example value) when it
    says, so the answer is the same while recording (``value`` a proxy) and while evaluating."""
    example = node.meta.get("example_value", node.meta.get("val"))
    if example is not None:
        return isinstance(example, _NUMBERS)
    return isinstance(value, _NUMBERS)


def attention_call(spec: AttentionSpec, lookup: Lookup, dtype: torch.dtype, dropout: bool = True,
                   positions: bool = False, shift_invariant: bool = False) -> AttentionCall:
    """Build the canonical attention arguments for ``spec``.

    ``dtype`` is the dtype of q as it enters attention (additive masks are cast to it);
    ``dropout=False`` drops dropout (certification compares deterministic outputs).
    ``positions=True`` (a kind that computes position biases): a ``position`` mask term is passed as
    ``position_slopes`` / ``position`` instead of written out into ``attn_mask``; its shift (queries
    counted from an offset) becomes the constant slope_h · shift of each head, added to ``attn_mask``
    (:func:`with_row_constant`), or left out with ``shift_invariant=True`` (a kind whose softmax over each
    query's keys ignores a constant added to all of them).
    """
    q, k = ref_value(spec.q, lookup), ref_value(spec.k, lookup)
    terms, slopes, form, row_constant = spec.bias, None, None, None
    if positions:
        found = [t for t in spec.bias if t.kind in ("position", "relative")]
        if len(found) > 1:
            raise ValueError("attnrewrite: a kind computes at most one position bias per site")
        if found:
            term = found[0]
            terms = tuple(t for t in spec.bias if t is not term)
            if term.kind == "relative":  # R [Hq or 1, Tq + Tk - 1], differentiable in the model's table
                slopes, form = relative_table(term, lookup, q, k).to(torch.float32), "relative"
            else:
                slopes, form = term_value(term, lookup).to(torch.float32).reshape(-1), term.form
            slopes = slopes * term.coeff if term.coeff != 1.0 else slopes
            if term.kind == "position" and term.offset and not shift_invariant:
                row_constant = (slopes * position_shift(term, lookup)).view(1, -1, 1, 1)
    scale, factor = spec.scale, None
    for node, power in spec.q_factors:
        f = lookup(node)
        f = f if power == 1 else f**power
        if scale is not None and is_scalar(node, f):
            # a symbolic number: part of the op's scale, applied where the op applies a constant one
            scale = f if isinstance(scale, float) and scale == 1.0 else scale * f
        else:
            factor = f if factor is None else factor * f
    bool_mask = bool(terms) and all(t.kind not in ("add", "position", "relative") for t in terms)
    attn_mask = materialize_mask(terms, lookup, dtype, q, k)
    if row_constant is not None:
        attn_mask, bool_mask = with_row_constant(attn_mask, row_constant, dtype, bool_mask), False
    return AttentionCall(
        q=q,
        q_factor=factor,
        k=k,
        v=ref_value(spec.v, lookup),
        attn_mask=attn_mask,
        dropout_p=(spec.dropout_p if spec.dropout_node is None else lookup(spec.dropout_node)) if dropout else 0.0,
        is_causal=spec.causal,
        scale=scale,
        enable_gqa=spec.kv_groups > 1,
        score_mod=None if spec.score_mod is None else bind_score_mod(spec.score_mod, lookup),
        score_program=score_program(spec.score_mod)[0],
        kv_groups=spec.kv_groups,
        dtype=dtype,
        bool_mask=bool_mask,
        position_slopes=slopes,
        position=form,
        sink_logits=None if spec.sink_logits is None else ref_value(spec.sink_logits, lookup),
    )


def bind_score_mod(mod: ScoreMod, lookup: Lookup) -> Callable[[Any], Any]:
    """``mod`` as a function of canonical [B, Hq, Tq, Tk] scores: the graph's nodes replayed, with
    the scores in place of ``mod.source`` and every other argument read through ``lookup``."""

    def replay(scores: Any) -> Any:
        env = {mod.source: apply_steps(scores, mod.steps, lookup)}
        previous = mod.source
        for node, recompute in mod.chain:
            if not recompute:
                env[node] = env[previous]
            else:
                read = lambda n: env[n] if n in env else lookup(n)  # noqa: E731
                args, kwargs = fx.node.map_arg(node.args, read), fx.node.map_arg(node.kwargs, read)
                if node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    env[node] = node.target(*args, **kwargs)
            previous = node
        return apply_steps(env[previous], mod.back, lookup)

    return replay


def visible_rows(call: AttentionCall) -> torch.Tensor:
    """[..., Tq] bool: query rows that see at least one key (evaluated on real tensors only)."""
    q, k = call.q, call.k
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = call.attn_mask
    # a block of query rows at a time, so that no [..., Tq, Tk] value is built at long lengths
    step = max(1, (1 << 22) // max(1, math.prod(q.shape[:-2]) * t_k))
    pieces = []
    for start in range(0, max(t_q, 1), step):
        rows = min(t_q, start + step) - start
        visible = torch.ones(q.shape[:-2] + (rows, t_k), dtype=torch.bool)
        if call.is_causal:
            visible = visible & torch.ones(rows, t_k, dtype=torch.bool).tril(start)
        if mask is not None:
            part = mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask.narrow(-2, start, rows)
            visible = visible & (part if part.dtype == torch.bool else part > MASKED_SCORE)
        pieces.append(visible.any(-1))
    return torch.cat(pieces, dim=-1)
