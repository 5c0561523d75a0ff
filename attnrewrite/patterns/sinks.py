"""Learned sink logits (gpt-oss's attention sinks): one extra score column per head, dropped after the softmax.

    logits = cat([scale · q kᵀ + mask, sink[h] expanded], -1)     (or the sink column first)
    probs  = softmax(logits [− its row max])[..., :-1]             (or [..., 1:])
    out    = probs @ v

This is softmax attention with one more key per head whose score is ``sink[h]`` and whose value is 0: the
sink only adds exp(sink[h]) to each row's denominator (:attr:`attnrewrite.ir.spec.AttentionSpec.sink_logits`).
The eager matcher reads it in two halves: :func:`split` finds the concatenation at the softmax's input and
tells the part from q·kᵀ (read as any scores) from the sink part; :func:`sliced_off` finds the slice after
the softmax that drops exactly the sink column.  Anything else is refused with the reason (the caller
reports it as attention this version does not rewrite): several extra columns (null keys, registers), a
column that varies along the queries or the batch (not one logit per head), scores of another rank, the
probabilities with the sink column used elsewhere, a slice that keeps the sink or drops a key.  A sink
that reads the queries, keys or values is refused by the matcher once it knows them (:func:`~attnrewrite.ir.capture.reads_any`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from attnrewrite.ir.capture import canonical_name, hinted_shape, normalize, rank, tensor_meta, unexpanded
from attnrewrite.ir.spec import NotAttention, TensorRef

_CATS = (torch.cat, torch.concat, torch.concatenate)
#: ops between the softmax and the slice that drops the sink column (each the only user of the one before)
_BEFORE_SLICE = ("cast", "identity", "dropout")


@dataclass(frozen=True)
class SinkColumn:
    """The concatenation at a softmax's input of scores from q·kᵀ and one column of sink logits.

    ``scores``: the part from q·kᵀ; ``logits``: the sink part without its expand ([.., H or 1, 1, 1], rank ≤ 4);
    ``first``: the sink column comes before the scores; ``width``: the number of columns, Tk + 1 (hinted);
    ``upcast``: a cast between the concatenation and the softmax takes half-precision logits to float32."""

    cat: fx.Node
    scores: fx.Node
    logits: fx.Node
    first: bool
    width: int
    upcast: bool = False

    def ref(self) -> TensorRef:
        """The sink logits as the spec holds them: broadcastable to [1, Hq, 1, 1]."""
        return TensorRef(self.logits, (("unsqueeze", 0),) * (4 - rank(self.logits)))


def _cat_parts(node: fx.Node) -> tuple[list, int | None] | None:
    if node.op != "call_function" or node.target not in _CATS:
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    r = rank(node)
    if not isinstance(parts, (list, tuple)) or r is None or not isinstance(dim, int) or dim % r != r - 1:
        return None
    return list(parts), r


def split(logits: object, from_scores: Callable[[fx.Node], bool]) -> SinkColumn | None:
    """The sink column concatenated to the scores at ``logits`` (a softmax's input, its stabiliser already
    seen through), or None when ``logits`` is no concatenation on the key dim of a part ``from_scores`` (a
    part computed from q·kᵀ by score ops) with something else.  NotAttention (the reason) for such a
    concatenation in a form not read as sink logits."""
    node, upcast = logits, False
    while isinstance(node, fx.Node) and canonical_name(node) in ("cast", "identity"):
        before, after = tensor_meta(node.args[0]) if isinstance(node.args[0], fx.Node) else None, tensor_meta(node)
        upcast = upcast or (before is not None and after is not None and after.dtype == torch.float32
                            and before.dtype in (torch.float16, torch.bfloat16))
        node = node.args[0]
    found = _cat_parts(node) if isinstance(node, fx.Node) else None
    if found is None:
        return None
    parts, r = found
    scored = [p for p in parts if isinstance(p, fx.Node) and from_scores(p)]
    if not scored:
        return None  # no scores concatenated: not attention read here
    if len(parts) != 2 or len(scored) != 1:
        raise NotAttention(f"{len(parts)} parts, {len(scored)} of them scores from q·kᵀ, are concatenated before the "
                           "softmax (one column of sink logits beside the scores is read)")
    scores = scored[0]
    other = parts[1] if parts[0] is scores else parts[0]
    if not isinstance(other, fx.Node) or tensor_meta(other) is None or not tensor_meta(other).dtype.is_floating_point:
        raise NotAttention(f"the column concatenated to the scores ({other!r}) is not a float tensor (sink logits)")
    width = hinted_shape(other)[-1]
    if width != 1:
        raise NotAttention(f"{width} extra score columns (null keys, registers) are concatenated to q·kᵀ before the "
                           "softmax (one column of sink logits is read)")
    if r != 4:
        raise NotAttention(f"sink logits are concatenated to rank-{r} scores (read on [B, H, Tq, Tk] scores only)")
    sink = unexpanded(other)
    shape = tuple(hinted_shape(sink))
    if len(shape) > 4:
        raise NotAttention(f"the sink logits {sink.name} {list(shape)} have more dims than the scores")
    shape = (1,) * (4 - len(shape)) + shape
    if shape[2] != 1:
        raise NotAttention(f"the column concatenated to the scores ({sink.name} {list(shape)}) varies along the "
                           "queries: not a learned sink logit, one number per head")
    if shape[0] != 1:
        raise NotAttention(f"the column concatenated to the scores ({sink.name} {list(shape)}) varies along the "
                           "batch: not a learned sink logit, one number per head")
    return SinkColumn(cat=node, scores=scores, logits=sink, first=parts[0] is other,
                      width=hinted_shape(node)[-1], upcast=upcast)


def sliced_off(softmax: fx.Node, column: SinkColumn) -> list[fx.Node]:
    """[first node after ``softmax``, ..., the slice that drops the sink column]: through casts and dropout, each
    the only user of the one before; NotAttention (the reason) when the probabilities with the sink column are
    used otherwise, or the slice does not drop exactly the sink column."""
    chain, node = [], softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise NotAttention("the probabilities with the sink column are used elsewhere too (only their slice "
                               "without it is read)" if users else "the probabilities with the sink column are unused")
        node = users[0]
        chain.append(node)
        call = normalize(node)
        if call is None or call.name not in _BEFORE_SLICE:
            break
    probs = chain[-2] if len(chain) > 1 else softmax
    if call is None or call.name != "getitem" or call.args[0] is not probs:
        raise NotAttention(f"the sink column is not sliced off the probabilities ({node.name} reads them)")
    _drops_exactly_the_sink(call.args[1], column)
    return chain


def _is_full(index: object) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _drops_exactly_the_sink(index: object, column: SinkColumn) -> None:
    """``probs[index]`` keeps every dim but the last whole and drops exactly the sink column from the last:
    ``[..., :-1]`` / ``[:, :, :, :Tk]`` for a sink column last, ``[..., 1:]`` for one first."""
    index = index if isinstance(index, tuple) else (index,)
    if index.count(Ellipsis) == 1:
        at = index.index(Ellipsis)
        whole, last = index[:at] + index[at + 1:-1], index[-1] if at < len(index) - 1 else None
        fits = len(index) - 1 <= 4
    else:
        whole, last = index[:-1], index[-1] if len(index) == 4 else None
        fits = Ellipsis not in index
    keeps = None
    if fits and isinstance(last, slice) and all(_is_full(i) for i in whole) and all(
            b is None or isinstance(b, int) and not isinstance(b, bool) for b in (last.start, last.stop, last.step)):
        keeps = last.indices(column.width)
    want = (1, column.width, 1) if column.first else (0, column.width - 1, 1)
    if keeps != want:
        where = "first" if column.first else "last"
        raise NotAttention(f"the slice {_describe(index)} of the probabilities does not drop exactly the sink column "
                           f"(the {where} of {column.width})")


def _describe(index: tuple) -> str:
    def one(i):
        if i is Ellipsis:
            return "..."
        if isinstance(i, slice):
            return ":".join("" if b is None else str(b) for b in (i.start, i.stop)) + (
                f":{i.step}" if i.step is not None else "")
        return getattr(i, "name", repr(i))

    return "[" + ", ".join(one(i) for i in index) + "]"
