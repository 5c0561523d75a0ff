"""Sliding-window attention, context-parallel: each rank fetches its window's raw rows and the sink
rows from their owners; no rank holds the whole sequence's keys and values.

Query p sees the keys p − window < j ≤ p (causal; |p − j| < window bidirectional) and the first
``sinks`` keys (semantics: :mod:`attnrewrite.kernels.sliding_window.reference`).  For each of its two
pieces [s0, s1) a rank needs the rows [s0 − window + 1, s1) (… s1 + window − 1 bidirectional) and
[0, sinks): :func:`attnrewrite.distributed.exchange.fetch` brings the ones other ranks hold (and sends
their gradients back).  The queries then attend block by block with the summary path's block
functions (:func:`attnrewrite.kernels.summary.chunked.block_attention`, exact softmax, a row that sees
nothing gives 0).

Not distributed here (the manager all-gathers K/V for them, exact, without the saving): dropout, and a
float key mask holding other values than 0 and −inf (a key bias).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.distributed.exchange import fetch, plan_fetch
from attnrewrite.distributed.layout import segments
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.sliding_window import public as window_op
from attnrewrite.kernels.summary import chunked

#: query rows per block
ROWS = 256


def applies(args: dict, mask: Tensor | None) -> bool:
    """Whether this form computes the call (else the manager all-gathers K/V for it)."""
    if args["dropout_p"] != 0.0 or args["q"].dim() != 4:
        return False
    if mask is None or mask.dtype == torch.bool:
        return True
    return bool(((mask == 0) | (mask == float("-inf"))).all())


def needed(start: int, stop: int, length: int, window: int, sinks: int, causal: bool) -> Tensor:
    """The sorted global positions the queries [start, stop) can see (their window and the sinks)."""
    first = max(0, start - window + 1)
    last = stop if causal else min(length, stop + window - 1)
    return torch.unique(torch.cat([torch.arange(min(sinks, length)), torch.arange(first, last)]))


def _visible(rows: Tensor, keys: Tensor, window: int, sinks: int, causal: bool) -> Tensor:
    """bool [n, K] from global positions (the reference's rule)."""
    p, j = rows[:, None], keys[None, :]
    if causal:
        return ((j <= p) & (j > p - window)) | ((j < sinks) & (j <= p))
    return ((j - p).abs() < window) | (j < sinks)


class _PieceWindow(torch.autograd.Function):
    """A piece's queries (global rows ``start`` …) over its fetched keys (global ``positions``)."""

    @staticmethod
    def forward(ctx, q, k_f, v_f, keep, geometry):
        out = q.new_empty(*q.shape[:-1], v_f.shape[-1])
        for rows, cols, visible in _blocks(q, keep, geometry):
            out[:, :, rows] = chunked.block_attention(q[:, :, rows], k_f[:, :, cols], v_f[:, :, cols], visible,
                                                      geometry[-1], geometry[-2])
        ctx.save_for_backward(q, k_f, v_f, keep)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_f, v_f, keep = ctx.saved_tensors
        geometry = ctx.geometry
        dtype = chunked.work_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dk = torch.zeros(k_f.shape, dtype=dtype, device=q.device)
        dv = torch.zeros(v_f.shape, dtype=dtype, device=q.device)
        grad = grad.contiguous()
        for rows, cols, visible in _blocks(q, keep, geometry):
            dq_b, dk_b, dv_b = chunked.block_attention_backward(grad[:, :, rows], q[:, :, rows], k_f[:, :, cols],
                                                                v_f[:, :, cols], visible, geometry[-1], geometry[-2])
            dq[:, :, rows] = dq_b
            dk[:, :, cols] += dk_b
            dv[:, :, cols] += dv_b
        return dq.to(q.dtype), dk.to(k_f.dtype), dv.to(v_f.dtype), None, None


def _blocks(q, keep, geometry):
    """(local rows, fetched columns, visible [B|1, n, K']) per block of query rows."""
    start, positions, window, sinks, causal, _, _ = geometry
    n_rows = q.shape[-2]
    for i0 in range(0, n_rows, ROWS):
        i1 = min(n_rows, i0 + ROWS)
        rows = torch.arange(start + i0, start + i1)
        lo = max(0, start + i0 - window + 1)
        hi = start + i1 if causal else start + i1 + window - 1
        cols = ((positions < sinks) | ((positions >= lo) & (positions < hi))).nonzero().flatten()
        visible = _visible(rows, positions[cols], window, sinks, causal).to(q.device)[None]
        if keep is not None:
            visible = visible & keep[:, None, cols.to(keep.device)]
        yield slice(i0, i1), cols.to(q.device), visible


def attend(args: dict, mask: Tensor | None, rank: int, world: int, comm) -> Tensor:
    """This rank's rows of ``attnrewrite::sliding_window_attention`` [B, Hq, T_local, Dv], in local order.

    ``mask``: None or this rank's key mask [B|1, H|1, 1, T_local|1], bool or 0/−inf (:func:`applies`).
    """
    q, k, v = args["q"], args["k"], args["v"]
    window, sinks, causal = args["window"], args["sinks"], bool(args["is_causal"])
    window_op._check(q, k, v, mask, args["dropout_p"], bool(args["enable_gqa"]), window, sinks)
    local = q.shape[-2]
    length, piece = local * world, local // 2
    scale = q.shape[-1] ** -0.5 if args["scale"] is None else args["scale"]
    score_mod = parse_score_mod(args.get("score_mod"))
    keep = None
    if mask is not None:  # [B|1, T_local] bool, the same for every head
        if mask.shape[1] != 1:
            raise ValueError("context_parallel: sliding-window attention takes a key mask that is the same for every "
                             f"head ([B, 1, 1, T]), got {tuple(mask.shape)}")
        keep = mask.reshape(mask.shape[0], mask.shape[-1])
        keep = keep if keep.dtype == torch.bool else keep == 0
        keep = keep.expand(keep.shape[0], local)
    pieces = segments(rank, world, length)
    wanted = [torch.cat([needed(a, b, length, window, sinks, causal) for a, b in segments(r, world, length)])
              for r in range(world)]
    plan = plan_fetch(wanted, rank, world, local)
    if k.shape[:-1] == v.shape[:-1] and k.dtype == v.dtype:
        k_f, v_f = fetch(torch.cat([k, v], dim=-1), plan, comm).split([k.shape[-1], v.shape[-1]], dim=-1)
    else:
        k_f, v_f = fetch(k, plan, comm), fetch(v, plan, comm)
    keep_f = None if keep is None else fetch(keep.to(torch.uint8)[:, :, None], plan, comm)[:, :, 0].bool()
    outs, offset = [], 0
    for (start, stop), rows in zip(pieces, (slice(0, piece), slice(piece, local))):
        positions = needed(start, stop, length, window, sinks, causal)
        cols = slice(offset, offset + positions.numel())
        offset += positions.numel()
        geometry = (start, positions, window, sinks, causal, score_mod, scale)
        outs.append(_PieceWindow.apply(q[:, :, rows], k_f[:, :, cols], v_f[:, :, cols],
                                       None if keep_f is None else keep_f[:, cols], geometry))
    return torch.cat(outs, dim=2)
