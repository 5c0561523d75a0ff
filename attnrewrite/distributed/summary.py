"""Summary attention, context-parallel: a neighbour fetch of the window's raw rows and an all-gather of
the chunk summaries; no rank holds the whole sequence's keys and values.

Query i in chunk c sees the raw tokens of chunks c − W … c (causal; c − W … c + W bidirectional) and
one summary key/value per other chunk (semantics: :mod:`attnrewrite.kernels.summary.reference`).  With
the load-balanced layout rank r holds two pieces of S = T / (2·world) tokens; when S is a multiple of
``chunk_size`` every chunk lies inside one piece, so:

1. each rank pools the summaries of its own chunks (mean or learned, from its own keys and values);
2. the summaries (T / C rows) and their "chunk has a valid token" flags are all-gathered;
3. each rank fetches, for each of its pieces, the raw key/value rows (and key flags) of the W·C tokens
   before the piece (and after it, bidirectional) from the ranks that hold them (:mod:`.exchange`);
4. each piece's queries attend to those raw rows and the summaries, block by block, with the same
   block functions as the single-process torch path (:mod:`attnrewrite.kernels.summary.chunked`).

Backward: the window rows' gradients go back to their owners, each summary's gradient goes to the rank
that pooled it and from there through its pooling (so a learned pooling query gets this rank's share of
its gradient, as any parameter does under context parallelism: reduce it over the mesh).

A piece that is not a multiple of ``chunk_size`` would split a chunk between two ranks: refused with a
ValueError naming the lengths to pad to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnrewrite.distributed.exchange import fetch, gather_small, plan_fetch
from attnrewrite.distributed.layout import restore_indices, segments
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.summary import chunked
from attnrewrite.kernels.summary import op as summary_op


def check_chunks(local_length: int, world: int, chunk_size: int) -> None:
    """Raise ValueError when a piece of the layout (T / (2·world) tokens) does not hold whole chunks."""
    piece = local_length // 2
    if piece % chunk_size:
        length = local_length * world
        step = 2 * world * chunk_size
        raise ValueError(
            f"context_parallel: summary attention with chunk_size={chunk_size} needs each of the 2 × {world} "
            f"pieces of the sequence (T / (2·world) = {length} / {2 * world} = {piece} tokens) to hold whole "
            f"chunks, so that no chunk's summary is split between two ranks; pad the sequence to a multiple of "
            f"2 × world × chunk_size = {step} (e.g. {math.ceil(length / step) * step}) and mask the padding")


def window_positions(start: int, stop: int, length: int, span: int, causal: bool) -> tuple[int, int]:
    """(w0, w1): the raw rows the queries [start, stop) can see, ``span`` = window_chunks·chunk_size."""
    return max(0, start - span), (stop if causal else min(length, stop + span))


def _row_blocks(start: int, stop: int, chunk_size: int, window_chunks: int, causal: bool, length: int,
                rows_per_block: int):
    """(i0, i1, r0, r1, n_sum) for the query rows [start, stop) (whole chunks), as chunked.blocks does for
    the whole sequence: raw keys [r0, r1), summaries [0, n_sum)."""
    chunks = length // chunk_size
    per_block = max(1, rows_per_block // chunk_size)
    for c0 in range(start // chunk_size, stop // chunk_size, per_block):
        c1 = min(stop // chunk_size, c0 + per_block)
        r0 = max(0, c0 - window_chunks) * chunk_size
        if causal:
            r1, n_sum = c1 * chunk_size, max(0, c1 - 1 - window_chunks)
        else:
            r1, n_sum = min(length, (c1 + window_chunks) * chunk_size), chunks
        yield c0 * chunk_size, c1 * chunk_size, r0, r1, n_sum


def _block_visibility(block, w0: int, chunk_size: int, window_chunks: int, causal: bool, raw_valid, exists,
                      device) -> Tensor:
    i0, i1, r0, r1, n_sum = block
    visible = chunked.visibility(i0, i1, r0, r1, n_sum, chunk_size, window_chunks, causal, None, exists, device)
    if raw_valid is None:
        return visible
    visible = visible.expand(raw_valid.shape[0], -1, -1).clone()
    visible[..., n_sum:] &= raw_valid[:, None, r0 - w0:r1 - w0]
    return visible


class _PieceAttention(torch.autograd.Function):
    """One piece's queries [start, stop) over its fetched window rows [w0, w1) and all summaries."""

    @staticmethod
    def forward(ctx, q, k_win, v_win, k_sum, v_sum, exists, raw_valid, geometry):
        start, stop, w0, length, chunk_size, window_chunks, causal, scale, score_mod = geometry
        out = q.new_empty(*q.shape[:-1], v_win.shape[-1])
        keys_per_row = chunked._keys_per_row(length, chunk_size, window_chunks, causal)
        rows = chunked._rows_per_block(q, keys_per_row)
        for block in _row_blocks(start, stop, chunk_size, window_chunks, causal, length, rows):
            i0, i1, r0, r1, n_sum = block
            visible = _block_visibility(block, w0, chunk_size, window_chunks, causal, raw_valid, exists, q.device)
            keys = torch.cat([k_sum[:, :, :n_sum], k_win[:, :, r0 - w0:r1 - w0]], dim=2)
            values = torch.cat([v_sum[:, :, :n_sum], v_win[:, :, r0 - w0:r1 - w0]], dim=2)
            out[:, :, i0 - start:i1 - start] = chunked.block_attention(q[:, :, i0 - start:i1 - start], keys, values,
                                                                       visible, scale, score_mod)
        ctx.save_for_backward(q, k_win, v_win, k_sum, v_sum, exists, raw_valid)
        ctx.geometry, ctx.rows = geometry, rows
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_win, v_win, k_sum, v_sum, exists, raw_valid = ctx.saved_tensors
        start, stop, w0, length, chunk_size, window_chunks, causal, scale, score_mod = ctx.geometry
        dtype = chunked.work_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dk_win = torch.zeros(k_win.shape, dtype=dtype, device=q.device)
        dv_win = torch.zeros(v_win.shape, dtype=dtype, device=q.device)
        dk_sum = torch.zeros(k_sum.shape, dtype=dtype, device=q.device)
        dv_sum = torch.zeros(v_sum.shape, dtype=dtype, device=q.device)
        grad = grad.contiguous()
        for block in _row_blocks(start, stop, chunk_size, window_chunks, causal, length, ctx.rows):
            i0, i1, r0, r1, n_sum = block
            visible = _block_visibility(block, w0, chunk_size, window_chunks, causal, raw_valid, exists, q.device)
            keys = torch.cat([k_sum[:, :, :n_sum], k_win[:, :, r0 - w0:r1 - w0]], dim=2)
            values = torch.cat([v_sum[:, :, :n_sum], v_win[:, :, r0 - w0:r1 - w0]], dim=2)
            rows = slice(i0 - start, i1 - start)
            dq_b, dkeys, dvalues = chunked.block_attention_backward(grad[:, :, rows], q[:, :, rows], keys, values,
                                                                    visible, scale, score_mod)
            dq[:, :, rows] = dq_b
            dk_sum[:, :, :n_sum] += dkeys[:, :, :n_sum]
            dv_sum[:, :, :n_sum] += dvalues[:, :, :n_sum]
            dk_win[:, :, r0 - w0:r1 - w0] += dkeys[:, :, n_sum:]
            dv_win[:, :, r0 - w0:r1 - w0] += dvalues[:, :, n_sum:]
        return (dq.to(q.dtype), dk_win.to(k_win.dtype), dv_win.to(v_win.dtype), dk_sum.to(k_sum.dtype),
                dv_sum.to(v_sum.dtype), None, None, None)


def _natural_chunks(gathered: Tensor, dim: int, world: int) -> Tensor:
    """Rank-ordered chunk rows (every rank's two pieces) → natural chunk order (the same layout, one row
    per chunk)."""
    return gathered.index_select(dim, restore_indices(gathered.shape[dim], world, gathered.device))


def attend(args: dict, mask: Tensor | None, rank: int, world: int, comm) -> Tensor:
    """This rank's rows of ``attnrewrite::summary_attention`` [B, Hq, T_local, Dv], in local order.

    Args:
        args: the op's arguments by schema name; q, k, v are this rank's shards [B, H, T_local, D].
        mask: None or this rank's key mask [B|1, H|1, 1, T_local|1] (key padding: bool, or 0/−inf).
        comm: the communicator (:mod:`.exchange`).
    """
    q, k, v = args["q"], args["k"], args["v"]
    chunk_size, window_chunks = int(args["chunk_size"]), int(args["window_chunks"])
    causal, summary_query = bool(args["is_causal"]), args.get("summary_query")
    if args.get("cu_seqlens") is not None:
        raise NotImplementedError("context_parallel: summary attention with packed sequences (cu_seqlens) cannot "
                                  "be context-parallel: pass one padded batch with a key mask")
    summary_op.check_inputs(q, k, v, mask, args["dropout_p"], causal, bool(args["enable_gqa"]), chunk_size,
                            window_chunks, args["summary"], summary_query)
    local = q.shape[-2]
    check_chunks(local, world, chunk_size)
    length, piece = local * world, local // 2
    scale = q.shape[-1] ** -0.5 if args["scale"] is None else args["scale"]
    score_mod = parse_score_mod(args.get("score_mod"))
    key_valid = summary_op.key_valid_from_mask(mask, q.shape[0], local)      # bool [B, T_local] or None
    k, v = chunked.hide_padding(k, key_valid), chunked.hide_padding(v, key_valid)

    # 1–2: this rank's summaries, then everyone's (T / C rows), in natural chunk order
    pieces = [slice(0, piece), slice(piece, local)]
    pooled = [chunked.chunk_summaries(k[:, :, p], v[:, :, p], None if key_valid is None else key_valid[:, p],
                                      chunk_size, summary_query) for p in pieces]
    k_sum, v_sum = (torch.cat([part[i] for part in pooled], dim=2) for i in (0, 1))
    exists = torch.cat([part[2] for part in pooled], dim=1)
    if k_sum.dtype == v_sum.dtype:
        both = _natural_chunks(gather_small(torch.cat([k_sum, v_sum], -1), 2, comm), 2, world)
        k_sum, v_sum = both.split([k.shape[-1], v.shape[-1]], dim=-1)
    else:
        k_sum = _natural_chunks(gather_small(k_sum, 2, comm), 2, world)
        v_sum = _natural_chunks(gather_small(v_sum, 2, comm), 2, world)
    exists = _natural_chunks(gather_small(exists.to(torch.uint8), 1, comm), 1, world).bool()

    # 3: each piece's window rows from their owners (the piece's own rows read in place)
    span = window_chunks * chunk_size
    spans = [window_positions(a, b, length, span, causal) for a, b in segments(rank, world, length)]
    wanted = []
    for r in range(world):
        ranges = [window_positions(a, b, length, span, causal) for a, b in segments(r, world, length)]
        wanted.append(torch.cat([torch.arange(w0, w1) for w0, w1 in ranges]))
    plan = plan_fetch(wanted, rank, world, local)
    if k.shape[:-1] == v.shape[:-1] and k.dtype == v.dtype:
        both = fetch(torch.cat([k, v], dim=-1), plan, comm)
        k_win, v_win = both.split([k.shape[-1], v.shape[-1]], dim=-1)
    else:
        k_win, v_win = fetch(k, plan, comm), fetch(v, plan, comm)
    raw_valid = None
    if key_valid is not None:
        raw_valid = fetch(key_valid.to(torch.uint8)[:, :, None], plan, comm)[:, :, 0].bool()

    # 4: each piece's queries over its window and the summaries
    outs, offset = [], 0
    for (start, stop), (w0, w1), rows in zip(segments(rank, world, length), spans, pieces):
        window = slice(offset, offset + w1 - w0)
        offset += w1 - w0
        geometry = (start, stop, w0, length, chunk_size, window_chunks, causal, scale, score_mod)
        outs.append(_PieceAttention.apply(
            q[:, :, rows], k_win[:, :, window], v_win[:, :, window], k_sum, v_sum, exists,
            None if raw_valid is None else raw_valid[:, window], geometry))
    return torch.cat(outs, dim=2)
