"""Evaluating a site's region a block of query rows at a time, where its ops provably allow it.

Certification evaluates the original region in float64 at its real size; at long sequence lengths
its [B, H, T, T] intermediates dominate the memory of compiling a model (4 GiB each at T = 8192 with
8 heads).  Attention computes each query row's output from that row of q alone (and all of k, v and
the masks), but the region is the user's graph, so that has to be *shown* for the ops at hand, not
assumed.  :func:`plan_rows` does it by following one axis of q (the "row axis") through the region,
op by op, with a rule per op that says where the axis goes and that the op computes each index along
it from the same index of its inputs:

- elementwise ops (with broadcasting): an input that carries the axis must carry it at the output's
  axis; an input that does not carry it but has the full size there is sliced alongside, one of size
  1 (or without that dimension) broadcasts the same way for every block;
- ``matmul`` with the axis as the rows of its left operand (dim -2) and a right operand free of it;
- ``softmax`` over another dimension; casts, copies and dropout (evaluated as the identity);
- ``transpose``, ``permute``, ``unsqueeze``, ``expand`` (not of the axis itself) and reshapes that
  keep the axis as one whole dimension, with the same number of elements before it (row-major order,
  so every block reshapes exactly as the rows of the whole do), and ``repeat_interleave`` along
  another dimension.

Region nodes that do not read q (directly or through other nodes) are evaluated once, whole.  Any
other op that reads the axis, an in-place write anywhere in what is evaluated, a node outside the
region computed from q, or an output that does not carry the axis: no plan, and the caller evaluates
the region whole as before.  With a plan, the output evaluated block by block and concatenated along
its axis is the output evaluated whole (each block computes its rows with the same float64 ops; only
the rounding of a blocked product may differ, ~1e-16), so the certificate proves the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from attnrewrite.ir.capture import ELEMENTWISE, example, hinted_shape, normalize

#: Row blocks are sized so that the largest value of the region holds about this many bytes per block.
BLOCK_BYTES = 64 << 20

#: Regions whose largest value is smaller than this are evaluated whole (no plan is made).
MIN_BYTES = 64 << 20

_ELEMENTWISE = ELEMENTWISE | {"not", "and", "eq", "ne"}
_RESHAPES = ("view", "flatten", "unflatten")


@dataclass
class RowPlan:
    """How to evaluate a region in blocks of query rows: the axis each q-dependent node carries."""

    length: int                                   # rows along the axis
    axis: dict[fx.Node, int]                      # q-dependent nodes → their row axis (non-negative)
    slices: dict[fx.Node, dict[fx.Node, int]] = field(default_factory=dict)  # node → {input: dim to slice}
    rows_per_block: int = 1

    def blocks(self):
        for start in range(0, self.length, self.rows_per_block):
            yield start, min(self.length, start + self.rows_per_block)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if hinted_shape(a) is not None]


def _aligned(out_rank: int, out_axis: int, shape: tuple[int, ...]) -> int | None:
    """The dimension of a broadcast input of ``shape`` that lines up with ``out_axis`` (None: absent)."""
    dim = out_axis - (out_rank - len(shape))
    return dim if dim >= 0 else None


def _rule(node: fx.Node, axis: dict[fx.Node, int], length: int) -> tuple[int, dict[fx.Node, int]] | str:
    """(output axis, {non-carrying input: dim to slice}) of ``node`` whose inputs carry ``axis``, or why not."""
    call = normalize(node)
    name = call.name if call is not None else None
    out = hinted_shape(node)
    if out is None:
        return f"{node.name} does not give a tensor"
    carrying = [a for a in node.all_input_nodes if a in axis]
    if name in _ELEMENTWISE:
        positions = {axis[a] + len(out) - len(hinted_shape(a)) for a in carrying}
        if name == "cast" or name == "identity":
            if carrying != [node.args[0]]:
                return f"{node.name} casts with a q-dependent argument"
        if len(positions) != 1:
            return f"{node.name} combines q's rows along different dimensions"
        (at,) = positions
        if not 0 <= at < len(out) or out[at] != length:
            return f"{node.name} does not keep the rows along one dimension"
        slices = {}
        for a in _tensor_inputs(node):
            if a in axis or name in ("cast", "identity"):
                continue
            dim = _aligned(len(out), at, hinted_shape(a))
            if dim is not None and hinted_shape(a)[dim] != 1:
                slices[a] = dim
        return at, slices
    if name == "dropout" and carrying == [node.args[0]]:
        return axis[node.args[0]], {}
    if len(carrying) != 1 or call is None or call.args[0] is not carrying[0]:
        return f"{node.name} ({name or node.target}) reads q's rows in a way not followed"
    x = carrying[0]
    a, rank = axis[x], len(hinted_shape(x))
    if name == "matmul":
        other = hinted_shape(call.args[1])
        if rank < 2 or a != rank - 2 or other is None or len(other) < 2:
            return f"{node.name} multiplies along q's rows"
        return len(out) - 2, {}
    if name == "softmax":
        dim = call.kwargs["dim"]
        if not isinstance(dim, int) or dim % rank == a:
            return f"{node.name} normalises along q's rows"
        return a, {}
    if name == "transpose":
        d0, d1 = (d % rank for d in call.args[1:3])
        return (d1 if a == d0 else d0 if a == d1 else a), {}
    if name == "permute":
        dims = [d % rank for d in call.args[1]]
        return dims.index(a), {}
    if name == "unsqueeze":
        dim = call.args[1] % (rank + 1)
        return a + (1 if dim <= a else 0), {}
    if name == "repeat_interleave":
        dim = call.kwargs.get("dim")
        if not isinstance(dim, int) or dim % rank == a or not isinstance(call.args[1], int):
            return f"{node.name} repeats along q's rows"
        return a, {}
    if name == "expand":
        at = a + len(out) - rank
        return (at, {}) if out[at] == length else f"{node.name} expands q's rows"
    if name in _RESHAPES:
        shape = hinted_shape(x)
        before = math.prod(shape[:a])
        for b, size in enumerate(out):
            if size == length and math.prod(out[:b]) == before:
                return b, {}
        return f"{node.name} reshapes q's rows"
    return f"{node.name} ({name or node.target}) is not an op followed along q's rows"


def plan_rows(region: list[fx.Node], order: list[fx.Node], q: fx.Node, output: fx.Node,
              written: Callable[[fx.Node], bool]) -> RowPlan | str:
    """A :class:`RowPlan` for ``region`` with q's rows along one of its dimensions, or the reason there is none.

    ``order``: every node evaluated with the region, in graph order (q itself not among them);
    ``written(node)``: whether anything writes into the node's storage in place.  Each dimension of q
    (the longest first) is tried as the row axis; any one the rules follow to the output will do.
    """
    shape = hinted_shape(q)
    if shape is None:
        return "q is not a tensor"
    if any(written(n) for n in order) or written(q):
        return "in-place writes"
    members = set(region)
    candidates = sorted((d for d, size in enumerate(shape) if size > 1), key=lambda d: -shape[d])
    reasons = []
    for first in candidates:
        length = shape[first]
        axis: dict[fx.Node, int] = {q: first}
        slices: dict[fx.Node, dict[fx.Node, int]] = {}
        reason = None
        for node in order:
            if not any(a in axis for a in node.all_input_nodes) or _number(node):
                continue  # (sizes are read from their hints, never from the values)
            if node not in members:
                reason = f"{node.name}, outside the site, is computed from q"
                break
            got = _rule(node, axis, length)
            if isinstance(got, str):
                reason = got
                break
            axis[node], slices[node] = got
        if reason is None and output not in axis:
            reason = "the site's output does not carry q's rows"
        if reason is None:
            per_row = max(math.prod(hinted_shape(n)) // length for n in axis)
            rows = max(1, BLOCK_BYTES // max(1, 8 * per_row))
            return RowPlan(length, axis, slices, rows)
        reasons.append(reason)
    return reasons[0] if reasons else "q has no dimension to split"  # (the longest dimension's reason)


def _number(node: fx.Node) -> bool:
    return isinstance(example(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size))


def largest_bytes(nodes: list[fx.Node]) -> int:
    """Bytes of the largest tensor among ``nodes`` in float64."""
    return max((8 * math.prod(s) for s in map(hinted_shape, nodes) if s is not None), default=0)


def evaluate_in_blocks(plan: RowPlan, order: list[fx.Node], env: dict, compute: Callable[[fx.Node, dict], Any],
                       output: fx.Node) -> torch.Tensor:
    """The region's ``output`` evaluated block by block along ``plan``; ``env`` holds every node of ``order``
    that does not carry the axis (q whole among them).  Values of a block are dropped after their last reader."""
    carried = [n for n in order if n in plan.axis]
    q = next(n for n in plan.axis if n not in carried)
    last: dict[fx.Node, fx.Node] = {}
    for node in carried:
        for a in node.all_input_nodes:
            if a in plan.axis:
                last[a] = node
    pieces = []
    for start, stop in plan.blocks():
        block = {q: env[q].narrow(plan.axis[q], start, stop - start)}
        for node in carried:
            local = _Local(block, env, plan.slices.get(node, {}), start, stop)
            block[node] = _compute(node, local, compute, plan, stop - start)
            for a in node.all_input_nodes:
                if last.get(a) is node and a is not output:
                    block.pop(a, None)
        pieces.append(block[output])
    return torch.cat(pieces, dim=plan.axis[output])


class _Local(dict):
    """The environment of one node of one block: carrying inputs from the block, the others whole or sliced."""

    def __init__(self, block: dict, env: dict, slices: dict[fx.Node, int], start: int, stop: int):
        super().__init__()
        self.block, self.env, self.slices, self.start, self.stop = block, env, slices, start, stop

    def __getitem__(self, node: fx.Node) -> Any:
        if node in self.block:
            return self.block[node]
        value = self.env[node]
        if node in self.slices:
            return value.narrow(self.slices[node], self.start, self.stop - self.start)
        return value

    def __contains__(self, node: object) -> bool:
        return node in self.block or node in self.env

    def get(self, node, default=None):
        return self[node] if node in self else default


def _compute(node: fx.Node, local: _Local, compute: Callable[[fx.Node, dict], Any], plan: RowPlan, rows: int):
    call = normalize(node)
    if call is not None and call.name in _RESHAPES + ("expand",):
        shape = list(hinted_shape(node))
        shape[plan.axis[node]] = rows
        x = local[call.args[0]]
        return x.expand(shape) if call.name == "expand" else x.reshape(shape)
    return compute(node, local)
