"""Item assignment into a private tensor, read as one write with an out-of-place form.

Hand-written attention often masks its scores by index::

    s[..., 6:] = float("-inf")                  # setitem(s, (..., slice(6, None)), -inf)
    s[:, :, keep_out] = float("-inf")           # a bool index over the last two dims
    s[mask.expand_as(s)] = -1e9                 # a full bool mask (== masked_fill)
    s[..., :, :T] += bias                       # getitem → iadd on the view → setitem back
    s[..., 6:].fill_(-inf); s.index_put_((mask,), v)

Dynamo records these as ``operator.setitem``, an in-place method on a ``getitem`` view, or
``index_put_``.  :func:`item_write` recognises the nodes that make up one such write, and
:func:`emit_out_of_place` builds the out-of-place form the matcher reads:

* an assignment of one number (or a 0-d tensor) ``t[i] = c`` → ``t.masked_fill(R, c)``;
* an addition ``t[i] += b`` (or ``-=``) → ``t + P`` (``t - P``), ``P`` zero outside the region:
  ``where(R, b, 0)`` for a number, ``b`` expanded to the view and zero-padded for a tensor;

where ``R`` is the region the index selects, built in the graph from ``arange`` comparisons per
indexed dim and the bool index itself, and-ed together.  Why that is the same write:

* the index is a product of per-dim sets: ints, slices with constant bounds (steps > 0), ``...``,
  ``None`` (no dim) and at most one bool tensor whose shape is exactly the dims it covers (torch
  checked that when the graph was traced).  Integer tensor indices (which pair up, not multiply),
  symbolic bounds or sizes are not taken.  ``R`` holds exactly the selected positions;
* an assignment of one value writes that value, cast to ``t``'s dtype, at every selected position
  and nothing elsewhere: ``masked_fill`` does the same (the caller checks the dtype and shape kept);
* an addition adds the same number at each selected position.  Outside the region ``t + 0 == t``
  (a -0.0 becomes +0.0, which no attention tells apart).  Added numbers are taken for float32 and
  float64 only, whose in-place add computes in the tensor's own dtype; a tensor ``b`` only under a
  basic index (no bool tensor, no ``None``, steps of 1), where padding places it exactly;
* every other node of the write (the view, the in-place op on it) is used by the write alone.

The caller (``functionalise``) decides whether the target may be written out of place at all.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from attnrewrite.ir.capture import example

_FILL = {"fill_"}
_ADD = {"add_": "add", "sub_": "sub", operator.iadd: "add", operator.isub: "sub"}


@dataclass
class ItemWrite:
    """One write into a region of ``base`` (a whole tensor): ``nodes`` in graph order, the last one
    completing it; ``kind`` is ``"fill"`` (assign ``value``), ``"add"`` or ``"sub"``."""

    base: fx.Node
    index: tuple
    kind: str
    value: Any
    nodes: list[fx.Node]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _index_tuple(index: Any) -> tuple:
    return tuple(index) if isinstance(index, tuple) else (index,)


def _number(value: Any) -> bool:
    return isinstance(value, (bool, int, float))  # (keep[:, 6:] = False builds a bool mask)


def _zero_dim(value: Any) -> bool:
    v = example(value) if isinstance(value, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 0


def _one_value(value: Any) -> bool:
    """One value for every selected position: a number or a 0-d tensor."""
    return _number(value) or _zero_dim(value)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return set(node.users) == {user}


def _add_kind(node: fx.Node) -> str | None:
    key = node.target if node.op == "call_function" else str(node.target) if node.op == "call_method" else None
    try:
        kind = _ADD.get(key)
    except TypeError:  # unhashable target
        return None
    if kind is None or node.kwargs or len(node.args) != 2:
        return None  # (an alpha= changes the value added)
    return kind


def _view_of(node: Any) -> tuple[fx.Node, tuple] | None:
    """``(base, index)`` when ``node`` is ``base[index]``."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and isinstance(node.args[0], fx.Node) and len(node.args) == 2:
        return node.args[0], _index_tuple(node.args[1])
    return None


def item_write(write: fx.Node) -> ItemWrite | None:
    """The item write that ``write`` (a node that writes) completes, or None when it is not one of
    the spellings in the module docstring."""
    if write.op == "call_function" and write.target is operator.setitem and len(write.args) == 3 \
            and isinstance(write.args[0], fx.Node) and not write.users:
        base, index, value = write.args[0], _index_tuple(write.args[1]), write.args[2]
        view = _view_of(value.args[0]) if isinstance(value, fx.Node) and value.args else None
        if isinstance(value, fx.Node) and _add_kind(value) and view is not None and view[0] is base \
                and view[1] == index and _only_user(value.args[0], value) and _only_user(value, write):
            return ItemWrite(base, index, _add_kind(value), value.args[1], [value.args[0], value, write])
        if _one_value(value):
            return ItemWrite(base, index, "fill", value, [write])
        return None
    if write.op == "call_method" and write.target == "index_put_" and isinstance(write.args[0], fx.Node) \
            and len(write.args) == 3 and not write.kwargs and isinstance(write.args[1], (tuple, list)) \
            and _one_value(write.args[2]):
        if not all(_is_tensor(i) for i in write.args[1]):
            return None
        return ItemWrite(write.args[0], tuple(write.args[1]), "fill", write.args[2], [write])
    view = _view_of(write.args[0]) if write.args else None
    if view is None or not _only_user(write.args[0], write):
        return None
    base, index = view
    if write.op == "call_method" and write.target in _FILL and len(write.args) == 2 and not write.kwargs \
            and not write.users and _one_value(write.args[1]):
        return ItemWrite(base, index, "fill", write.args[1], [write.args[0], write])
    kind = _add_kind(write)
    if kind is not None and not write.users:
        return ItemWrite(base, index, kind, write.args[1], [write.args[0], write])
    if kind is not None and len(write.users) == 1:  # s[i] += b: the sum is set back into s[i]
        unit = item_write(next(iter(write.users)))
        return unit if unit is not None and write in unit.nodes else None
    return None


class Emitter:
    """Runs ops on fake tensors (``graph=None``: a dry run) or adds them to ``graph`` with their fake
    example values; every node added is listed in ``created``."""

    def __init__(self, fake_mode, graph: fx.Graph | None = None, meta: dict | None = None):
        self.fake_mode, self.graph, self.meta, self.created = fake_mode, graph, meta or {}, []

    def fake(self, value: Any) -> Any:
        return value.value if isinstance(value, DryValue) else example(value) if isinstance(value, fx.Node) else value

    def __call__(self, target: Any, *args: Any, method: bool = False, **kwargs: Any) -> Any:
        fake_args = fx.node.map_aggregate(args, self.fake)
        fake_kwargs = fx.node.map_aggregate(kwargs, self.fake)
        shape_env = getattr(self.fake_mode, "shape_env", None)
        with self.fake_mode, shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
            value = getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs) if method \
                else target(*fake_args, **fake_kwargs)
        if self.graph is None:
            return DryValue(value)
        node = self.graph.create_node("call_method" if method else "call_function", target, args, kwargs)
        node.meta = dict(self.meta)
        node.meta["example_value"] = value
        self.created.append(node)
        return node


class DryValue:
    """A dry run's fake value, standing where a node would be (:meth:`Emitter.fake` reads it)."""

    def __init__(self, value):
        self.value = value


def _region(emit: Emitter, index: tuple, shape: tuple, device) -> tuple[Any, list] | None:
    """``(R, dims)``: the bool region ``index`` selects in a tensor of ``shape`` (None: all of it),
    and per indexed dim ``(dim, start, stop, step, dropped)`` for the basic items — or None."""
    ndim = len(shape)
    consumed = sum(1 for i in index if i is not Ellipsis and i is not None and not _is_tensor(i)) + sum(
        example(i).dim() for i in index if _is_tensor(i))
    if sum(1 for i in index if i is Ellipsis) > 1 or consumed > ndim:
        return None
    items: list = []
    for item in index:
        items.extend([slice(None)] * (ndim - consumed) if item is Ellipsis else [item])
    conds, dims, d, tensors = [], [], 0, 0
    for item in items:
        if item is None:
            continue
        if _is_tensor(item):
            mask = example(item)
            if mask.dtype != torch.bool or tensors or not all(
                    isinstance(a, int) and isinstance(b, int) and a == b for a, b in zip(mask.shape, shape[d:d + mask.dim()])):
                return None  # integer indices pair up (not a product); a shape torch would have refused
            tensors += 1
            trailing = ndim - d - mask.dim()
            conds.append(emit("reshape", item, *mask.shape, *[1] * trailing, method=True) if trailing else item)
            d += mask.dim()
            continue
        size = shape[d]
        if not isinstance(size, int):
            return None  # a symbolic size
        if isinstance(item, int) and not isinstance(item, bool):
            if not -size <= item < size:
                return None
            start, stop, step, dropped = item % size, item % size + 1, 1, True
        elif isinstance(item, slice) and all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                                             for b in (item.start, item.stop, item.step)):
            if item.step is not None and item.step <= 0:
                return None
            (start, stop, step), dropped = item.indices(size), False
        else:
            return None  # a symbolic bound, a list, a bool ...
        dims.append((d, start, stop, step, dropped))
        if (start, stop, step) != (0, size, 1):
            positions = emit(torch.arange, size, device=device)
            cond = emit(operator.and_, emit(operator.ge, positions, start), emit(operator.lt, positions, stop))
            if step > 1:
                cond = emit(operator.and_, cond, emit(operator.eq, emit(operator.mod, emit(
                    operator.sub, positions, start), step), 0))
            trailing = ndim - d - 1
            conds.append(emit("view", cond, size, *[1] * trailing, method=True) if trailing else cond)
        d += 1
    dims.extend((e, 0, shape[e], 1, False) for e in range(d, ndim))  # (dims left out of the index: whole)
    if tensors or any(i is None for i in items) or not all(isinstance(n, int) for n in shape):
        dims = None  # (a tensor value is placed under a basic index only)
    region = None
    for cond in conds:
        region = cond if region is None else emit(operator.and_, region, cond)
    return region, dims


def _is_tensor(item: Any) -> bool:
    return isinstance(item, fx.Node) and isinstance(example(item), torch.Tensor)


def emit_out_of_place(unit: ItemWrite, current: Any, emit: Emitter) -> Any:
    """The out-of-place form of ``unit`` applied to ``current`` (a node, or a dry run's value), or
    None when it has none here (module docstring)."""
    before = emit.fake(current)
    if not isinstance(before, torch.Tensor) or (unit.kind != "fill" and before.dtype not in (torch.float32,
                                                                                                torch.float64)):
        return None
    found = _region(emit, unit.index, tuple(before.shape), before.device)
    if found is None:
        return None
    region, dims = found
    if unit.kind == "fill":
        if region is None:
            region = emit(torch.ones, (), dtype=torch.bool, device=before.device)
        return emit("masked_fill", current, region, unit.value, method=True)
    value = unit.value
    if _one_value(value):
        if region is None:
            placed = value if _zero_dim(value) else emit(torch.scalar_tensor, value, dtype=before.dtype,
                                                         device=before.device)
        else:
            zero = emit(torch.scalar_tensor, 0.0, dtype=before.dtype, device=before.device)
            if _number(value):
                value = emit(torch.scalar_tensor, value, dtype=before.dtype, device=before.device)
            placed = emit(torch.where, region, value, zero)
    else:
        if dims is None or any(step != 1 for _, _, _, step, _ in dims) or not _is_tensor(value):
            return None
        view_shape = [max(0, stop - start) for _, start, stop, _, dropped in dims if not dropped]
        value_shape = tuple(example(value).shape)
        try:
            if len(value_shape) > len(view_shape) or torch.broadcast_shapes(value_shape, view_shape) != tuple(
                    view_shape):
                return None  # (torch would have refused it)
        except RuntimeError:
            return None
        placed = emit("expand", value, *view_shape, method=True)
        for d, *_ in (e for e in dims if e[4]):  # an int index dropped its dim: put it back, size 1
            placed = emit("unsqueeze", placed, d, method=True)
        pads: list[int] = [0, 0] * len(before.shape)
        for d, start, stop, _, _ in dims:
            back = len(before.shape) - 1 - d
            pads[2 * back], pads[2 * back + 1] = start, before.shape[d] - max(stop, start)
        placed = emit(F.pad, placed, pads) if any(pads) else placed
    return emit(operator.add if unit.kind == "add" else operator.sub, current, placed)
