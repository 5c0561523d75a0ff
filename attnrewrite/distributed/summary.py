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
v, the output and each row's log-sum-exp.  It runs one key/value head (with its query heads) after the
other, so the gathered summaries, the fetched rows and their gradients are one head's; the backward
fetches and gathers that head's again and writes every gradient in place: dQ, dK, dV (the rank's shards,
through views), the fetched rows' dK/dV (sent to their owners and added there) and the summaries' (each
rank's part summed at that rank, then through its pooling).  At its peak a rank holds its output, dQ, dK,
dV and an H_kv-th of the rest (counted: ``tests/distributed/test_summary_cp.py``).

On the CPU in float32/float64 without a score modification a block never concatenates the summaries and
the window: it attends to each run of keys (summaries; rows before, in and after the piece; cut where
every row of the block sees the whole run, which then needs no position mask) with the fused kernel and
merges the runs by their log-sum-exp, which is exact (softmax over disjoint key sets is the parts'
softmaxes weighted by their shares of the normaliser); the backward runs the fused backward per run with
the merged output and log-sum-exp, so each run gets its exact share.  Elsewhere a block concatenates its
keys and runs the single op's block functions.

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


def _pool(k: Tensor, v: Tensor, key_valid: Tensor | None, chunk_size: int, summary_query: Tensor | None) -> Tensor:
    """The summaries [B, Hkv, N_local, D + Dv] in k's dtype of the rank's own chunks, as
    :func:`~attnrewrite.kernels.summary.chunked.chunk_summaries` computes them."""
    k_chunks, weights, _ = _pooling(k, key_valid, chunk_size, summary_query)
    v_chunks = v.unflatten(2, k_chunks.shape[2:4]).to(k_chunks.dtype)
    k_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(k_chunks.shape[:-1]), k_chunks).to(k.dtype)
    v_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(v_chunks.shape[:-1]), v_chunks).to(v.dtype)
    return torch.cat([k_sum, v_sum], dim=-1)


def _own_chunks(rank: int, world: int, per_piece: int) -> list[tuple[int, int]]:
    """The natural chunk ranges [a, b) of rank ``rank``'s two pieces, in local order."""
    return [(p * per_piece, (p + 1) * per_piece) for p in (rank, 2 * world - 1 - rank)]


def _natural_order(parts: list[Tensor], dim: int, world: int) -> Tensor:
    """Every rank's rows of its own chunks (``parts``, rank order, each [..., N_local, ...] along ``dim``) in
    natural chunk order, one tensor; each part is let go once placed."""
    per_piece = parts[0].shape[dim] // 2
    shape = list(parts[0].shape)
    shape[dim] = per_piece * 2 * world
    whole = parts[0].new_empty(shape)
    for r in range(world):
        for half, (a, b) in enumerate(_own_chunks(r, world, per_piece)):
            whole.narrow(dim, a, b - a).copy_(parts[r].narrow(dim, half * per_piece, per_piece))
        parts[r] = None
    return whole


@dataclass(frozen=True)
class _Part:
    """A run of keys a block sees: ``count`` rows of ``source`` from ``first``; ``columns`` of the block's
    visibility (summaries, then raw rows from r0); ``kind`` "sum" (``start`` = its first chunk) or "raw" (``start``
    = its first natural position); ``whole``: every row of the block sees every key of it (flags aside)."""

    source: str
    first: int
    count: int
    columns: slice
    kind: str
    start: int
    whole: bool


def _cut(a: int, b: int, full: list[tuple[int, int]]):
    """[a, b) cut into runs (lo, hi, inside one of the ``full`` intervals) of at most :data:`KEY_ROWS`."""
    edges = sorted({a, b} | {x for f in full for x in f if a < x < b})
    for lo, hi in zip(edges, edges[1:]):
        whole = any(f0 <= lo and hi <= f1 for f0, f1 in full)
        for start in range(lo, hi, KEY_ROWS):
            yield start, min(hi, start + KEY_ROWS), whole


class _Flags:
    """What does not depend on the head: which chunks have a valid token (everyone's, bool [B, N]) and, with key
    padding, which raw rows are valid (the rank's own [B, T_local] and the fetched ones), by source."""

    def __init__(self, key_valid: Tensor | None, batch: int, local: int, setup: _Setup, device):
        valid = torch.ones(batch, local, dtype=torch.bool, device=device) if key_valid is None else key_valid
        own = valid.view(batch, -1, setup.chunk_size).any(-1)                                # [B, N_local]
        self.exists = _natural_order(setup.comm.all_gather(own.to(torch.uint8)), 1, setup.world).bool()
        self.all_exist = bool(self.exists.all())
        self.valid = None
        if key_valid is not None:
            fetched = move_rows(key_valid.to(torch.uint8)[:, :, None], setup.plan, setup.comm)[:, :, 0].bool()
            self.valid = {"local": key_valid, "buffer": fetched}


class _Keys:
    """The keys and values a head group's blocks read: everyone's summaries (natural chunk order), the fetched
    window rows, and the rank's own rows, each as (k, v) by source name ("sum", "buffer", "local")."""

    def __init__(self, k: Tensor, v: Tensor, key_valid: Tensor | None, summary_query: Tensor | None, setup: _Setup,
                 flags: _Flags):
        summaries = _natural_order(setup.comm.all_gather(_pool(k, v, key_valid, setup.chunk_size, summary_query)),
                                   2, setup.world)
        self.dim, self.exists, self.valid, self.all_exist = k.shape[-1], flags.exists, flags.valid, flags.all_exist
        buffer = (move_rows(k, setup.plan, setup.comm), move_rows(v, setup.plan, setup.comm))
        self.tensors = {"sum": (summaries[..., :self.dim], summaries[..., self.dim:]), "buffer": buffer,
                        "local": (k, v)}

    def parts(self, block, piece: _Piece, setup: _Setup) -> list[_Part]:
        """The runs of keys the block sees, cut where every row starts or stops seeing all of them (no mask needed
        there but the key flags) and into at most :data:`KEY_ROWS` keys."""
        i0, i1, r0, r1, n_sum = block
        c0, c1, window, chunk = i0 // setup.chunk_size, i1 // setup.chunk_size, setup.window_chunks, setup.chunk_size
        parts = []
        if n_sum:  # summaries every row sees: older than every row's window (bidirectional: or newer)
            full = [(0, c0 - window)] + ([] if setup.causal else [(c1 + window, n_sum)])
            for lo, hi, whole in _cut(0, n_sum, full):
                parts.append(_Part("sum", lo, hi - lo, slice(lo, hi), "sum", lo, whole))
        # raw rows every row sees: in every row's window and (causal) before the block
        full = [((c1 - 1 - window) * chunk, i0 if setup.causal else (c0 + window + 1) * chunk)]
        position = r0
        for source, first, count in piece.raw(r0, r1):
            for lo, hi, whole in _cut(position, position + count, full):
                parts.append(_Part(source, first + lo - position, hi - lo, slice(n_sum + lo - r0, n_sum + hi - r0),
                                   "raw", lo, whole))
            position += count
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

    def keys(self, part: _Part) -> tuple[Tensor, Tensor]:
        k, v = self.tensors[part.source]
        return k[:, :, part.first:part.first + part.count], v[:, :, part.first:part.first + part.count]

    def flags(self, part: _Part) -> Tensor | None:
        """bool [B, keys]: which keys of the part exist (a summary of a chunk with a valid token, a valid raw row);
        None when all do."""
        if part.kind == "sum":
            return None if self.all_exist else self.exists[:, part.start:part.start + part.count]
        return None if self.valid is None else self.valid[part.source][:, part.first:part.first + part.count]


# ---------------------------------------------------------------------------------------------
# one block: the fused kernel per part, merged by the log-sum-exp (or the single op's block functions)


def _fused_applies(q: Tensor, v: Tensor, setup: _Setup) -> bool:
    return (q.device.type == "cpu" and setup.score_mod is None and q.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float32, torch.float64))


def _visible(i0: int, i1: int, part: _Part, setup: _Setup, device) -> Tensor:
    """bool [rows, keys]: which keys of ``part`` the queries [i0, i1) see by position (the rule of
    :func:`~attnrewrite.kernels.summary.chunked.visibility`)."""
    rows = torch.arange(i0, i1, device=device)
    row_chunk = (rows // setup.chunk_size)[:, None]
    keys = torch.arange(part.start, part.start + part.count, device=device)
    if part.kind == "sum":
        visible = keys[None, :] < row_chunk - setup.window_chunks
        return visible if setup.causal else visible | (keys[None, :] > row_chunk + setup.window_chunks)
    key_chunk = (keys // setup.chunk_size)[None, :]
    visible = key_chunk >= row_chunk - setup.window_chunks
    return visible & (keys[None, :] <= rows[:, None] if setup.causal else key_chunk <= row_chunk + setup.window_chunks)


def _part_mask(block, part: _Part, keys: _Keys, setup: _Setup, groups: int, dtype, device):
    """(additive mask broadcastable to [B, 1, g·n, keys] or None, rows that see a key of the part [B|1, 1, g·n|1]
    or None when all do) of one part: by position where the part is not seen whole, and by the key flags."""
    flags = keys.flags(part)                                                              # bool [B, keys] or None
    if part.whole:
        if flags is None:
            return None, None
        mask = torch.zeros(flags.shape[0], 1, 1, part.count, dtype=dtype, device=device)
        return mask.masked_fill_(~flags[:, None, None, :], float("-inf")), flags.any(-1)[:, None, None]
    visible = _visible(block[0], block[1], part, setup, device)[None]
    if flags is not None:
        visible = visible & flags[:, None, :]
    mask, seen = chunked.block_mask(visible, groups, dtype)
    return mask, seen[..., 0]


def _block_forward(q_rows: Tensor, keys: _Keys, block, parts: list[_Part], setup: _Setup) -> tuple[Tensor, Tensor]:
    """(out [B, g, n, D], lse [B, g, n]) of one key/value head's query rows [B, g, n, D] over the block's parts,
    each part a fused call and the parts merged by their log-sum-exp; a row that sees no key gets out 0 and lse
    −inf."""
    batch, groups, rows, _ = q_rows.shape
    q_grouped = chunked._grouped(q_rows, 1)
    out = lse = None
    for part in parts:
        k_part, v_part = keys.keys(part)
        mask, seen = _part_mask(block, part, keys, setup, groups, q_rows.dtype, q_rows.device)
        o, l = _FLASH(q_grouped, k_part, v_part, attn_mask=mask, scale=setup.scale)
        if seen is not None:  # the kernel reports 0 for a row with no visible key
            l = l.masked_fill(~seen, float("-inf"))
        if out is None:
            out, lse = o, l
            continue
        total = torch.logaddexp(lse, l)
        safe = total.masked_fill(total == float("-inf"), 0.0)
        out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(o.mul_(torch.exp(l - safe).unsqueeze(-1)))
        lse = total
    return chunked._ungrouped(out, groups), lse.reshape(batch, groups, rows)


def _block_backward(grad_rows, q_rows, out_rows, lse_rows, keys: _Keys, block, parts: list[_Part], setup: _Setup,
                    grads: dict) -> Tensor:
    """dQ of one key/value head's query rows [B, g, n, D]; each part's dK/dV added into ``grads[source]`` in place.
    The fused backward of a part with the merged output and log-sum-exp gives the part's exact share."""
    groups = q_rows.shape[1]
    q_grouped, grad_grouped, out_grouped = (chunked._grouped(t, 1) for t in (q_rows, grad_rows, out_rows))
    # a row that sees no key at all: every weight exp(s − lse) must be 0
    lse_grouped = lse_rows.masked_fill(lse_rows == float("-inf"), float("inf")).reshape(*q_grouped.shape[:-1])
    dq = None
    for part in parts:
        k_part, v_part = keys.keys(part)
        mask, _ = _part_mask(block, part, keys, setup, groups, q_rows.dtype, q_rows.device)
        dq_part, dk_part, dv_part = _FLASH_BACKWARD(grad_grouped, q_grouped, k_part, v_part, out_grouped, lse_grouped,
                                                    0.0, False, attn_mask=mask, scale=setup.scale)
        dq = dq_part if dq is None else dq.add_(dq_part)
        dk_target, dv_target = grads[part.source]
        dk_target[:, :, part.first:part.first + part.count] += dk_part
        dv_target[:, :, part.first:part.first + part.count] += dv_part
        dq_part = dk_part = dv_part = None
    return chunked._ungrouped(dq, groups)


def _concatenated(keys: _Keys, parts: list[_Part]) -> tuple[Tensor, Tensor]:
    pairs = [keys.keys(part) for part in parts]
    return torch.cat([k for k, _ in pairs], dim=2), torch.cat([v for _, v in pairs], dim=2)


#: Query rows per block of the fused path: only a block's staircase and diagonal are masked (O(rows²) mask).
FUSED_ROWS = 128


def _blocks(q: Tensor, setup: _Setup, fused: bool):
    """(piece, block, local rows) of every block of the rank's queries; elsewhere than the fused path, rows per
    block as the single op picks them for all heads (its scores [B, Hq, rows, keys] stay near a fixed size)."""
    keys_per_row = chunked._keys_per_row(setup.length, setup.chunk_size, setup.window_chunks, setup.causal)
    rows = FUSED_ROWS if fused else chunked._rows_per_block(q, keys_per_row)
    for piece in setup.pieces:
        for block in _row_blocks(piece.start, piece.stop, setup.chunk_size, setup.window_chunks, setup.causal,
                                 setup.length, rows):
            i0, i1 = block[:2]
            yield piece, block, slice(piece.local + i0 - piece.start, piece.local + i1 - piece.start)


def _head_groups(q: Tensor, k: Tensor, summary_query: Tensor | None):
    """(query heads, key/value head, that head's pooling query or None) of each key/value head: the rank runs one
    after the other, so the summaries, the fetched rows and their gradients are a head's, not the whole width."""
    groups = q.shape[1] // k.shape[1]
    for h in range(k.shape[1]):
        query = None if summary_query is None else summary_query[h:h + 1]
        yield slice(h * groups, (h + 1) * groups), slice(h, h + 1), query


def _forward_heads(q: Tensor, keys: _Keys, setup: _Setup, blocks, out: Tensor, lse: Tensor | None) -> None:
    """A key/value head's query rows of ``out`` (and ``lse``) [B, g, T_local, ...], written in place."""
    for piece, block, rows in blocks:
        parts = keys.parts(block, piece, setup)
        if lse is not None:
            out[:, :, rows], lse[:, :, rows] = _block_forward(q[:, :, rows], keys, block, parts, setup)
            continue
        k_block, v_block = _concatenated(keys, parts)
        visible = keys.visibility(block, piece, setup, q.device)
        out[:, :, rows] = chunked.block_attention(q[:, :, rows], k_block, v_block, visible, setup.scale,
                                                  setup.score_mod)


def _backward_heads(grad, q, out, lse, keys: _Keys, setup: _Setup, blocks, grads: dict, dq: Tensor) -> None:
    """A key/value head's dQ into ``dq`` and every key's dK/dV into ``grads`` (by source), in place."""
    for piece, block, rows in blocks:
        parts = keys.parts(block, piece, setup)
        if lse is not None:
            dq[:, :, rows] = _block_backward(grad[:, :, rows], q[:, :, rows], out[:, :, rows], lse[:, :, rows], keys,
                                             block, parts, setup, grads)
            continue
        k_block, v_block = _concatenated(keys, parts)
        visible = keys.visibility(block, piece, setup, q.device)
        dq[:, :, rows], dk_block, dv_block = chunked.block_attention_backward(
            grad[:, :, rows], q[:, :, rows], k_block, v_block, visible, setup.scale, setup.score_mod)
        for part in parts:
            grads[part.source][0][:, :, part.first:part.first + part.count] += dk_block[:, :, part.columns]
            grads[part.source][1][:, :, part.first:part.first + part.count] += dv_block[:, :, part.columns]
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
    """The rank's rows of summary attention, one key/value head (with its query heads) after the other; saves q, k,
    v, the output and (fused) each row's log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, summary_query, key_valid, setup: _Setup):
        with torch.no_grad():
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            lse = q.new_empty(q.shape[:-1]) if _fused_applies(q, v, setup) else None
            flags = _Flags(key_valid, q.shape[0], q.shape[-2], setup, q.device)
            blocks = list(_blocks(q, setup, lse is not None))
            for qh, kh, query in _head_groups(q, k, summary_query):
                keys = _Keys(k[:, kh], v[:, kh], key_valid, query, setup, flags)
                _forward_heads(q[:, qh], keys, setup, blocks, out[:, qh], None if lse is None else lse[:, qh])
                keys = None
        ctx.save_for_backward(q, k, v, summary_query, key_valid, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, summary_query, key_valid, out, lse = ctx.saved_tensors
        setup = ctx.setup
        dtype = chunked.work_dtype(q.dtype)
        with torch.no_grad():
            dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
            dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
            dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
            d_query = None if summary_query is None else torch.zeros_like(summary_query)
            flags = _Flags(key_valid, q.shape[0], q.shape[-2], setup, q.device)
            blocks = list(_blocks(q, setup, lse is not None))
            for h, (qh, kh, query) in enumerate(_head_groups(q, k, summary_query)):
                # the same rows as forward, fetched and gathered again: nothing is kept in between
                keys = _Keys(k[:, kh], v[:, kh], key_valid, query, setup, flags)
                k_sum, v_sum = keys.tensors["sum"]
                d_sum = torch.zeros(*k_sum.shape[:-1], k_sum.shape[-1] + v_sum.shape[-1], dtype=dtype,
                                    device=q.device)
                k_buf, v_buf = keys.tensors["buffer"]
                dk_buf = torch.zeros(k_buf.shape, dtype=dtype, device=q.device)
                dv_buf = torch.zeros(v_buf.shape, dtype=dtype, device=q.device)
                grads = {"sum": (d_sum[..., :keys.dim], d_sum[..., keys.dim:]), "buffer": (dk_buf, dv_buf),
                         "local": (dk[:, kh], dv[:, kh])}
                _backward_heads(grad[:, qh], q[:, qh], out[:, qh], None if lse is None else lse[:, qh], keys, setup,
                                blocks, grads, dq[:, qh])
                keys = k_sum = v_sum = k_buf = v_buf = grads = None
                add_back(dk_buf, setup.plan, dk[:, kh], setup.comm)
                add_back(dv_buf, setup.plan, dv[:, kh], setup.comm)
                dk_buf = dv_buf = None
                d_own = _summary_gradients_home(d_sum, setup)
                d_sum = None
                d_head = _pooling_backward_into(dk[:, kh], dv[:, kh], d_own, k[:, kh], v[:, kh], key_valid,
                                                setup.chunk_size, query)
                if d_head is not None:
                    d_query[h] = d_head[0]
                d_own = None
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
