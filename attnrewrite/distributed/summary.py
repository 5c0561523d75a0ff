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
   the piece's own rows are read in place;
4. each piece's queries attend block by block (:mod:`attnrewrite.kernels.summary.chunked`'s blocks) to
   the summaries, the fetched rows and the piece's own rows.

Memory: one autograd function runs the rank's whole share (:class:`_SummaryAttention`) and keeps only q, k,
v, the output and each row's log-sum-exp; the backward fetches and gathers again and writes every gradient
into one buffer per tensor in place: dQ, dK, dV (the rank's shards), the fetched rows' dK/dV (sent to their
owners and added there) and the summaries' (each rank's part summed at that rank, then through its
pooling).  On the CPU in float32/float64 without a score modification a block never concatenates the
summaries and the window: it attends to each part (the summaries; the rows before, in and after the piece)
with the fused kernel and merges them by their log-sum-exp, which is exact (softmax over disjoint key sets
is the parts' softmaxes weighted by their shares of the normaliser); the backward runs the fused backward
per part (the summaries in pieces of :data:`KEY_ROWS`) with the merged output and log-sum-exp, so each part
gets its exact share.  Elsewhere a block concatenates its keys and runs the single op's block functions.

A learned pooling query gets this rank's share of its gradient, as any parameter does under context
parallelism: reduce it over the mesh.

A piece that is not a multiple of ``chunk_size`` would split a chunk between two ranks: refused with a
ValueError naming the lengths to pad to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnrewrite.distributed.exchange import FetchPlan, add_back, move_rows, plan_fetch
from attnrewrite.distributed.layout import segments
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.summary import chunked
from attnrewrite.kernels.summary import op as summary_op

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: Keys per fused backward call: a call returns its keys' dK/dV, so the T / C summaries go in pieces of this many.
KEY_ROWS = 1024


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


@dataclass(frozen=True)
class _Piece:
    """One of the rank's two pieces: natural rows [start, stop) at local rows [local, local + stop − start).  Its
    queries also see the raw rows [pre, start) and [stop, post), fetched into the window buffer from row
    ``buffer`` on (those before the piece, then those after)."""

    start: int
    stop: int
    local: int
    pre: int
    post: int
    buffer: int

    def raw(self, r0: int, r1: int) -> list[tuple[str, int, int]]:
        """The raw rows [r0, r1) as consecutive runs (source, first row in it, count): "buffer" or "local"."""
        runs = []
        if r0 < self.start:
            runs.append(("buffer", self.buffer + r0 - self.pre, min(r1, self.start) - r0))
        if max(r0, self.start) < min(r1, self.stop):
            first = max(r0, self.start)
            runs.append(("local", self.local + first - self.start, min(r1, self.stop) - first))
        if r1 > self.stop:
            first = max(r0, self.stop)
            runs.append(("buffer", self.buffer + self.start - self.pre + first - self.stop, r1 - first))
        return runs


@dataclass(frozen=True)
class _Setup:
    """Where the rank is and what it computes (the same in forward and backward)."""

    rank: int
    world: int
    length: int
    chunk_size: int
    window_chunks: int
    causal: bool
    scale: float
    score_mod: object
    pieces: tuple[_Piece, ...]
    plan: FetchPlan
    comm: object


def _pieces(rank: int, world: int, length: int, span: int, causal: bool) -> list[_Piece]:
    pieces, local, buffer = [], 0, 0
    for start, stop in segments(rank, world, length):
        pre, post = max(0, start - span), (stop if causal else min(length, stop + span))
        pieces.append(_Piece(start, stop, local, pre, post, buffer))
        local += stop - start
        buffer += (start - pre) + (post - stop)
    return pieces


def _setup(rank: int, world: int, length: int, chunk_size: int, window_chunks: int, causal: bool, scale: float,
           score_mod, comm) -> _Setup:
    span = window_chunks * chunk_size
    wanted = []  # every rank's window rows outside its pieces, so that each rank knows what to send
    for r in range(world):
        wanted.append(torch.cat([torch.arange(a, b) for p in _pieces(r, world, length, span, causal)
                                 for a, b in ((p.pre, p.start), (p.stop, p.post))]))
    pieces = tuple(_pieces(rank, world, length, span, causal))
    plan = plan_fetch(wanted, rank, world, length // world)
    return _Setup(rank, world, length, chunk_size, window_chunks, causal, scale, score_mod, pieces, plan, comm)


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


# ---------------------------------------------------------------------------------------------
# the keys a rank's blocks read: pooled, gathered, fetched


def _pooling(k: Tensor, key_valid: Tensor | None, chunk_size: int, summary_query: Tensor | None):
    """(k in chunks [B, Hkv, N_local, C, D] in the work dtype, weights [B, 1|Hkv, N_local, C], exists bool
    [B, N_local]) of the rank's own chunks (:func:`~attnrewrite.kernels.summary.chunked.pooling_weights`)."""
    batch, _, local, _ = k.shape
    k_chunks = k.unflatten(2, (local // chunk_size, chunk_size)).to(chunked.work_dtype(k.dtype))
    valid = torch.ones(batch, local, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    weights, exists = chunked.pooling_weights(k_chunks, valid.view(batch, 1, -1, chunk_size), summary_query)
    return k_chunks, weights, exists


def _pool(k: Tensor, v: Tensor, key_valid: Tensor | None, chunk_size: int, summary_query: Tensor | None):
    """(summaries [B, Hkv, N_local, D + Dv] in k's dtype, exists bool [B, N_local]) of the rank's own chunks, as
    :func:`~attnrewrite.kernels.summary.chunked.chunk_summaries` computes them."""
    k_chunks, weights, exists = _pooling(k, key_valid, chunk_size, summary_query)
    v_chunks = v.unflatten(2, k_chunks.shape[2:4]).to(k_chunks.dtype)
    k_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(k_chunks.shape[:-1]), k_chunks).to(k.dtype)
    v_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(v_chunks.shape[:-1]), v_chunks).to(v.dtype)
    return torch.cat([k_sum, v_sum], dim=-1), exists


def _own_chunks(rank: int, world: int, per_piece: int) -> list[tuple[int, int]]:
    """The natural chunk ranges [a, b) of rank ``rank``'s two pieces, in local order."""
    return [(p * per_piece, (p + 1) * per_piece) for p in (rank, 2 * world - 1 - rank)]


class _Keys:
    """The keys and values a rank's blocks read: everyone's summaries (natural chunk order), the fetched window
    rows, and the rank's own rows, each as (k, v) by source name ("sum", "buffer", "local")."""

    def __init__(self, k: Tensor, v: Tensor, key_valid: Tensor | None, summary_query: Tensor | None, setup: _Setup):
        comm, world, dim = setup.comm, setup.world, k.shape[-1]
        summaries, exists = _pool(k, v, key_valid, setup.chunk_size, summary_query)
        per_piece = summaries.shape[2] // 2
        parts = comm.all_gather(summaries)
        flags = comm.all_gather(exists.to(torch.uint8))
        summaries = exists = None
        both = parts[0].new_empty(*parts[0].shape[:2], per_piece * 2 * world, parts[0].shape[-1])
        self.exists = torch.empty(both.shape[0], both.shape[2], dtype=torch.bool, device=k.device)
        for r in range(world):
            for half, (a, b) in enumerate(_own_chunks(r, world, per_piece)):
                both[:, :, a:b] = parts[r][:, :, half * per_piece:(half + 1) * per_piece]
                self.exists[:, a:b] = flags[r][:, half * per_piece:(half + 1) * per_piece].bool()
            parts[r] = None
        buffer = (move_rows(k, setup.plan, comm), move_rows(v, setup.plan, comm))
        self.valid = None
        if key_valid is not None:
            self.valid = {"local": key_valid,
                          "buffer": move_rows(key_valid.to(torch.uint8)[:, :, None], setup.plan, comm)[:, :, 0].bool()}
        self.dim = dim
        self.tensors = {"sum": (both[..., :dim], both[..., dim:]), "buffer": buffer, "local": (k, v)}

    def parts(self, block, piece: _Piece) -> list[tuple[str, int, int, slice]]:
        """(source, first row, count, columns of the block's visibility) of each run of keys block sees."""
        _, _, r0, r1, n_sum = block
        parts = [("sum", 0, n_sum, slice(0, n_sum))] if n_sum else []
        column = n_sum
        for source, first, count in piece.raw(r0, r1):
            parts.append((source, first, count, slice(column, column + count)))
            column += count
        return parts

    def visibility(self, block, piece: _Piece, setup: _Setup, device) -> Tensor:
        """bool [B|1, rows, n_sum + raw keys]: which summaries and raw keys each query of the block sees."""
        i0, i1, r0, r1, n_sum = block
        visible = chunked.visibility(i0, i1, r0, r1, n_sum, setup.chunk_size, setup.window_chunks, setup.causal, None,
                                     self.exists, device)
        if self.valid is None:
            return visible
        raw_valid = torch.cat([self.valid[source][:, first:first + count]
                               for source, first, count in piece.raw(r0, r1)], dim=1)
        visible = visible.expand(raw_valid.shape[0], -1, -1).clone()
        visible[..., n_sum:] &= raw_valid[:, None, :]
        return visible

    def keys(self, source: str, first: int, count: int) -> tuple[Tensor, Tensor]:
        k, v = self.tensors[source]
        return k[:, :, first:first + count], v[:, :, first:first + count]


# ---------------------------------------------------------------------------------------------
# one block: the fused kernel per part, merged by the log-sum-exp (or the single op's block functions)


def _fused_applies(q: Tensor, v: Tensor, setup: _Setup) -> bool:
    return (q.device.type == "cpu" and setup.score_mod is None and q.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float32, torch.float64))


def _block_forward(q_rows: Tensor, keys: _Keys, parts, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, n, D], lse [B, Hq, n]) of q_rows over the block's parts, each part a fused call and the
    parts merged by their log-sum-exp; a row that sees no key gets out 0 and lse −inf."""
    batch, heads_q, rows, _ = q_rows.shape
    heads_kv = keys.tensors["local"][0].shape[1]
    q_grouped = chunked._grouped(q_rows, heads_kv)
    out = lse = None
    for source, first, count, columns in parts:
        k_part, v_part = keys.keys(source, first, count)
        mask, seen = chunked.block_mask(visible[..., columns], heads_q // heads_kv, q_rows.dtype)
        o, l = _FLASH(q_grouped, k_part, v_part, attn_mask=mask, scale=scale)
        l = l.masked_fill(~seen[..., 0], float("-inf"))  # the kernel reports 0 for a row with no visible key
        if out is None:
            out, lse = o, l
            continue
        total = torch.logaddexp(lse, l)
        safe = total.masked_fill(total == float("-inf"), 0.0)
        out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(o.mul_(torch.exp(l - safe).unsqueeze(-1)))
        lse = total
    return chunked._ungrouped(out, heads_q), lse.reshape(batch, heads_q, rows)


def _block_backward(grad_rows, q_rows, out_rows, lse_rows, keys: _Keys, parts, visible, scale: float, grads: dict
                    ) -> Tensor:
    """dQ of the block's rows [B, Hq, n, D]; each part's dK/dV added into ``grads[source]`` in place.  The fused
    backward of a part with the merged output and log-sum-exp gives the part's exact share."""
    heads_q = q_rows.shape[1]
    heads_kv = keys.tensors["local"][0].shape[1]
    q_grouped, grad_grouped, out_grouped = (chunked._grouped(t, heads_kv) for t in (q_rows, grad_rows, out_rows))
    # a row that sees no key at all: every weight exp(s − lse) must be 0
    lse_grouped = lse_rows.masked_fill(lse_rows == float("-inf"), float("inf")).reshape(*q_grouped.shape[:-1])
    dq = None
    for source, first, count, columns in parts:
        dk_target, dv_target = grads[source]
        for offset in range(0, count, KEY_ROWS):
            n = min(KEY_ROWS, count - offset)
            k_part, v_part = keys.keys(source, first + offset, n)
            cols = slice(columns.start + offset, columns.start + offset + n)
            mask, _ = chunked.block_mask(visible[..., cols], heads_q // heads_kv, q_rows.dtype)
            dq_part, dk_part, dv_part = _FLASH_BACKWARD(grad_grouped, q_grouped, k_part, v_part, out_grouped,
                                                        lse_grouped, 0.0, False, attn_mask=mask, scale=scale)
            dq = dq_part if dq is None else dq.add_(dq_part)
            dk_target[:, :, first + offset:first + offset + n] += dk_part
            dv_target[:, :, first + offset:first + offset + n] += dv_part
            dq_part = dk_part = dv_part = None
    return chunked._ungrouped(dq, heads_q)


def _concatenated(keys: _Keys, parts) -> tuple[Tensor, Tensor]:
    pairs = [keys.keys(source, first, count) for source, first, count, _ in parts]
    return torch.cat([k for k, _ in pairs], dim=2), torch.cat([v for _, v in pairs], dim=2)


def _blocks(q: Tensor, setup: _Setup):
    """(piece, block, local rows) of every block of the rank's queries."""
    rows = chunked._rows_per_block(q, chunked._keys_per_row(setup.length, setup.chunk_size, setup.window_chunks,
                                                            setup.causal))
    for piece in setup.pieces:
        for block in _row_blocks(piece.start, piece.stop, setup.chunk_size, setup.window_chunks, setup.causal,
                                 setup.length, rows):
            i0, i1 = block[:2]
            yield piece, block, slice(piece.local + i0 - piece.start, piece.local + i1 - piece.start)


def _forward(q: Tensor, keys: _Keys, setup: _Setup) -> tuple[Tensor, Tensor | None]:
    dim_v = keys.tensors["local"][1].shape[-1]
    out = q.new_empty(*q.shape[:-1], dim_v)
    fused = _fused_applies(q, keys.tensors["local"][1], setup)
    lse = q.new_empty(q.shape[:-1]) if fused else None
    for piece, block, rows in _blocks(q, setup):
        visible = keys.visibility(block, piece, setup, q.device)
        parts = keys.parts(block, piece)
        if fused:
            out[:, :, rows], lse[:, :, rows] = _block_forward(q[:, :, rows], keys, parts, visible, setup.scale)
        else:
            k_block, v_block = _concatenated(keys, parts)
            out[:, :, rows] = chunked.block_attention(q[:, :, rows], k_block, v_block, visible, setup.scale,
                                                      setup.score_mod)
    return out, lse


def _backward(grad, q, out, lse, keys: _Keys, setup: _Setup, grads: dict, dq: Tensor) -> None:
    """dQ into ``dq`` and every key's dK/dV into ``grads`` (by source), in place."""
    for piece, block, rows in _blocks(q, setup):
        visible = keys.visibility(block, piece, setup, q.device)
        parts = keys.parts(block, piece)
        if lse is not None:
            dq[:, :, rows] = _block_backward(grad[:, :, rows], q[:, :, rows], out[:, :, rows], lse[:, :, rows], keys,
                                             parts, visible, setup.scale, grads)
            continue
        k_block, v_block = _concatenated(keys, parts)
        dq[:, :, rows], dk_block, dv_block = chunked.block_attention_backward(
            grad[:, :, rows], q[:, :, rows], k_block, v_block, visible, setup.scale, setup.score_mod)
        for source, first, count, columns in parts:
            grads[source][0][:, :, first:first + count] += dk_block[:, :, columns]
            grads[source][1][:, :, first:first + count] += dv_block[:, :, columns]
        k_block = v_block = dk_block = dv_block = None


def _summary_gradients_home(d_sum: Tensor, setup: _Setup) -> Tensor:
    """The gradient of the rank's own summaries [B, Hkv, N_local, D + Dv]: every rank's part of it summed (each
    rank sends every other its rows, one peer per step, so that a single send is alive at a time)."""
    comm, rank, world = setup.comm, setup.rank, setup.world
    per_piece = d_sum.shape[2] // (2 * world)

    def rows_of(r):
        return torch.cat([d_sum[:, :, a:b] for a, b in _own_chunks(r, world, per_piece)], dim=2)

    mine = rows_of(rank)
    for step in range(1, world):
        to, source = (rank + step) % world, (rank - step) % world
        received = comm.exchange({to: rows_of(to)}, {source: (tuple(mine.shape), mine.dtype)})
        mine += received.pop(source)
    return mine


def _pooling_backward_into(dk: Tensor, dv: Tensor, d_own: Tensor, k: Tensor, v: Tensor, key_valid, chunk_size: int,
                           summary_query: Tensor | None) -> Tensor | None:
    """dk, dv [B, Hkv, T_local, D|Dv] (work dtype) += the pooling's share of the own summaries' gradient d_own
    [B, Hkv, N_local, D + Dv]; returns the pooling query's gradient (None for the mean)."""
    dim = k.shape[-1]
    k_chunks, weights, _ = _pooling(k, key_valid, chunk_size, summary_query)
    dk_chunks, dv_chunks = dk.unflatten(2, k_chunks.shape[2:4]), dv.unflatten(2, k_chunks.shape[2:4])
    dk_sum, dv_sum = d_own[..., :dim].to(dk.dtype), d_own[..., dim:].to(dv.dtype)
    if summary_query is None:  # each token's share is its weight: added without a [B, Hkv, N, C, D] temporary
        dk_chunks.addcmul_(weights.unsqueeze(-1), dk_sum.unsqueeze(-2))
        dv_chunks.addcmul_(weights.unsqueeze(-1), dv_sum.unsqueeze(-2))
        return None
    v_chunks = v.unflatten(2, k_chunks.shape[2:4]).to(k_chunks.dtype)
    dk_through, dv_through, d_query = chunked.pooling_backward(dk_sum, dv_sum, k_chunks, v_chunks,
                                                               weights.expand(k_chunks.shape[:-1]), summary_query)
    dk_chunks += dk_through
    dv_chunks += dv_through
    return d_query.to(summary_query.dtype)


class _SummaryAttention(torch.autograd.Function):
    """The rank's rows of summary attention; saves q, k, v, the output and (fused) each row's log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, summary_query, key_valid, setup: _Setup):
        with torch.no_grad():
            keys = _Keys(k, v, key_valid, summary_query, setup)
            out, lse = _forward(q, keys, setup)
        ctx.save_for_backward(q, k, v, summary_query, key_valid, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, summary_query, key_valid, out, lse = ctx.saved_tensors
        setup = ctx.setup
        dtype = chunked.work_dtype(q.dtype)
        with torch.no_grad():
            keys = _Keys(k, v, key_valid, summary_query, setup)     # the same rows again: nothing kept in between
            dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
            dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
            dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
            k_sum, v_sum = keys.tensors["sum"]
            d_sum = torch.zeros(*k_sum.shape[:-1], k_sum.shape[-1] + v_sum.shape[-1], dtype=dtype, device=q.device)
            k_buf, v_buf = keys.tensors["buffer"]
            dk_buf = torch.zeros(k_buf.shape, dtype=dtype, device=q.device)
            dv_buf = torch.zeros(v_buf.shape, dtype=dtype, device=q.device)
            grads = {"sum": (d_sum[..., :keys.dim], d_sum[..., keys.dim:]), "buffer": (dk_buf, dv_buf),
                     "local": (dk, dv)}
            _backward(grad, q, out, lse, keys, setup, grads, dq)
            keys = k_sum = v_sum = k_buf = v_buf = grads = None
            add_back(dk_buf, setup.plan, dk, setup.comm)
            add_back(dv_buf, setup.plan, dv, setup.comm)
            dk_buf = dv_buf = None
            d_own = _summary_gradients_home(d_sum, setup)
            d_sum = None
            d_query = _pooling_backward_into(dk, dv, d_own, k, v, key_valid, setup.chunk_size, summary_query)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_query, None, None


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
    scale = q.shape[-1] ** -0.5 if args["scale"] is None else args["scale"]
    key_valid = summary_op.key_valid_from_mask(mask, q.shape[0], local)      # bool [B, T_local] or None
    k, v = chunked.hide_padding(k, key_valid), chunked.hide_padding(v, key_valid)
    setup = _setup(rank, world, local * world, chunk_size, window_chunks, causal, scale,
                   parse_score_mod(args.get("score_mod")), comm)
    return _SummaryAttention.apply(q, k, v, summary_query, key_valid, setup)
