"""Hashed attention, context-parallel: an all-gather of the packed key codes, the selection on each
rank for its own queries, then a ring of key/value blocks; no rank holds the whole sequence's K/V.

Each query attends to its first ``sinks`` and last ``window`` visible keys and to the ``top_k`` others
whose codes agree best with its own (semantics: :mod:`attnrewrite.kernels.hashed.reference`).  The
selection reads codes only, so:

1. every rank packs its keys' codes (``bits / 8`` bytes per key and head, 1/32 of fp32 K at
   bits = D = 64) and all-gathers them, with the key mask (bools, or a float key bias);
2. each rank selects, block by block of its query rows, the same keys the single-process op selects
   (the same integer costs, positions and tie rule), and keeps the selection as each key's index in its
   owner's shard (int16 while a shard holds at most 32768 positions).  On the CPU this is the op's own
   compiled selection (:func:`attnrewrite.kernels.hashed.native.select_rows`, popcounts of 64-bit code words,
   the rows' global positions for the causal limit), which also sorts the slots by owner; the torch form
   (:func:`select_rows`, float agreement counts and a partition over [rows, T]) is the fallback, many times
   slower (``bench/RESULTS.md``, issue 18);
3. the key/value blocks then go round the ring (send to the next rank, receive from the previous):
   while rank p's block is here, each query attends to the selected keys that lie in it (each row's
   slots are kept ordered by owner, so only those are gathered), and the partial outputs are merged by
   their log-sum-exp, as ring softmax attention does.  At most two blocks (the one here and the one
   arriving) live on a rank.

Backward: the blocks make the trip again with dK/dV accumulators that end at their owners; each block's
share uses the merged output and log-sum-exp (exact, as in ring attention).

Where the single-process op runs its compiled loop (float32 on the CPU at one torch thread, no score
modification, far keys' rounding or learned projections), so do the ring's steps
(:func:`attnrewrite.kernels.hashed.native.ring_forward` / ``ring_backward``: each row's slots of the block at
hand read in place, no gathered [rows, S, D] copies); else torch ops gather the selected keys per block.

Why a ring and not a gather of the selected keys: with the usual settings a rank's queries together
select almost every key (T / W queries × ``top_k`` each), so fetching "only the selected keys" moves
either the whole sequence at once or, block by block, ``top_k`` / W times more than the ring does.
The ring moves (W − 1) / W of K/V per rank, like an all-gather, but never keeps it.

Memory per rank: its shard, one block in flight (the blocks pass one tensor at a time), every key's
code (packed, bits / 8 bytes per key and key/value head; the torch form's selection unpacks it to ±1 int8,
T × bits bytes, 1/4 of fp32 K at bits = D, the same at any W; dropped before the ring) and the selection
(T / W × (sinks + window + top_k) owner-local int16 indices per key/value
head, :func:`local_index_dtype`: int32 only past 32768 positions per rank).

The op's options, each as the single-process op computes it:

- ``hash="learned"``: the codes come from the per-head projections (still packed codes: the same
  all-gather).  Their straight-through gradient (:mod:`attnrewrite.kernels.hashed.sparse`) adds, for
  each (query, selected key), d_logit / bits times the soft codes tanh(q·P_q), tanh(k·P_k): a rank
  computes the part of its own queries, the key's soft code from the block at hand, and turns the
  keys' part into its share of dP_k at once (dP_k is linear in it).  Each rank's projection gradients
  are its share, as for every parameter under the manager: summed over the ranks, the op's.
- ``score_mod``: applied to scale·q·k of the selected keys before the key bias, its derivative in the
  backward.
- ``far_dtype``: a selected key that is neither among the row's first ``sinks`` nor its last
  ``window`` visible keys is used (key and value) rounded through far_dtype; which ones those are
  follows from the global positions and the key mask's running count of visible keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.distributed.exchange import owner
from attnrewrite.distributed.layout import local_positions, restore_indices
from attnrewrite.kernels.hashed import native
from attnrewrite.kernels.hashed import op as hashed_op
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.hashed.codes import pack, project, projections, signs
from attnrewrite.kernels.hashed.op import far_dtype_of
from attnrewrite.kernels.hashed.sparse import (
    MASKED_SCORE,
    _agreement_cost,
    _priority_dtype,
    scatter_add,
    round_far,
    top_indices,
    visible_keys,
    work_dtype,
)

#: keys whose ±1 codes are converted to float32 at once while a block of queries is scored
KEY_TILE = 2048
#: about how many (query, key/value head, key) entries one step of the selection scores at once
SELECT_ELEMENTS = 1 << 19
#: query rows per block of the ring: its gathered keys [B, Hkv, rows, S, D] stay near this many entries
#: (a quarter of the single op's block: the gathers are the largest transients a rank has)
RING_ELEMENTS = 1 << 20
#: choose the keys with the single-process op's compiled selection where it is built (tests switch it off to
#: cover the torch form, :func:`select_rows`)
NATIVE_SELECTION = True
#: run the ring's steps in the compiled loop where it covers the call (float32 on the CPU at one torch thread, as the
#: single-process op's; no score modification, far keys' rounding or learned projections), else in torch ops
NATIVE_RING = True
#: selected slots per block of rows where the ring's steps are compiled (the int32 selection of a block, 8 MB)
NATIVE_ELEMENTS = 1 << 21
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def applies(args: dict) -> bool:
    """Whether this form computes the call (else the manager all-gathers K/V for it)."""
    return args["q"].dim() == 4


def unpack_signs(codes: Tensor, bits: int) -> Tensor:
    """±1 float32 [..., bits] from packed codes [..., bits / 8] uint8 (the inverse of ``codes.pack``)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=codes.device)
    set_bits = (codes.unsqueeze(-1) & weights) != 0                                   # [..., bytes, 8]
    return torch.where(set_bits, 1.0, -1.0).to(torch.float32).flatten(-2)[..., :bits]


def _natural(gathered: Tensor, dim: int, world: int) -> Tensor:
    return gathered.index_select(dim, restore_indices(gathered.shape[dim], world, gathered.device))


def select_rows(q_rows: Tensor, rows: slice, key_signs: Tensor, keep: Tensor | None, causal: bool, bits: int,
                top_k: int, window: int, sinks: int, proj_q: Tensor, heads_kv: int) -> Tensor:
    """Selected global key positions [B, Hkv, n, S'] (:func:`index_dtype`; −1: empty) of the queries at
    global rows ``rows``, from every key's ±1 code ``key_signs`` int8 [B, Hkv, T, bits] and ``keep`` bool
    [B|1, T] (the key mask) — the keys :func:`attnrewrite.kernels.hashed.sparse.select` chooses."""
    length = key_signs.shape[2]
    q_signs = signs(q_rows, proj_q)                                                   # [B, Hq, n, bits]
    batch, heads_q, n, _ = q_signs.shape
    groups = heads_q // heads_kv
    reach = rows.stop if causal else length                                           # later keys are not visible
    cost = torch.empty(batch, heads_kv, n, reach, dtype=_priority_dtype(groups, bits, length), device=q_rows.device)
    for j0 in range(0, reach, KEY_TILE):
        j1 = min(reach, j0 + KEY_TILE)
        tile = key_signs[:, :, j0:j1].to(torch.float32)
        cost[..., j0:j1] = _agreement_cost(q_signs, tile, bits, length) - j0
    keep_rows = None if keep is None else keep[:, None, :reach].expand(keep.shape[0], n, reach)
    visible = visible_keys(keep_rows, rows, reach, 0 if causal else None, q_rows.device)[:, None]
    rank = visible.long().cumsum(-1)
    count = rank[..., -1:]
    special = visible & ((rank <= sinks) | (rank > count - window))
    cost = cost.masked_fill(special, -(groups * bits + 1) * length).masked_fill(~visible, 1)
    return top_indices(cost, min(reach, sinks + window + top_k)).to(index_dtype(length))


def _select_block(q_rows: Tensor, rows: slice, key_signs: Tensor, keep, causal: bool, bits: int, top_k: int,
                  window: int, sinks: int, proj_q: Tensor, heads_kv: int) -> Tensor:
    """:func:`select_rows` for a block of query rows, a few rows at a time: the selection's transients
    are as wide as the sequence (costs [B, Hkv, rows, T], the partition's int64 positions), so they are
    kept to about ``SELECT_ELEMENTS`` entries; the parts are padded with −1 to one width."""
    length = key_signs.shape[2]
    step = max(1, SELECT_ELEMENTS // max(1, key_signs.shape[0] * heads_kv * length))
    parts = [select_rows(q_rows[:, :, i0:i0 + step], slice(rows.start + i0, min(rows.stop, rows.start + i0 + step)),
                         key_signs, keep, causal, bits, top_k, window, sinks, proj_q, heads_kv)
             for i0 in range(0, rows.stop - rows.start, step)]
    width = max(part.shape[-1] for part in parts)
    parts = [torch.nn.functional.pad(part, (0, width - part.shape[-1]), value=-1) for part in parts]
    return torch.cat(parts, dim=2)


def index_dtype(length: int) -> torch.dtype:
    """The narrowest integer type that holds the positions −1 … length − 1 (the kept selection)."""
    return torch.int16 if length <= torch.iinfo(torch.int16).max else torch.int32


def local_index_dtype(local: int) -> torch.dtype:
    """The narrowest integer type that holds a shard's indices −1 … ``local`` − 1 (the kept selection)."""
    return torch.int16 if local - 1 <= torch.iinfo(torch.int16).max else torch.int32


def by_owner(index: Tensor, world: int, local: int) -> tuple[Tensor, Tensor]:
    """The selection as kept for the ring, from global positions ``index`` [B, Hkv, n, S] (−1: empty):
    (each selected key's index in its owner's shard, :func:`local_index_dtype`, each row's slots ordered by
    the owner, −1 empties last; starts [B, Hkv, n, W + 1]: rank p's slots of a row are starts[p] …
    starts[p + 1] − 1 (int32), so the owner, and with it the global position, follows from the slot)."""
    ranks, local_index = owner(index.long().clamp(min=0), world, local)
    ranks = torch.where(index >= 0, ranks, world)
    local_index = torch.where(index >= 0, local_index, -1)
    ranks, order = torch.sort(ranks, dim=-1, stable=True)
    counts = torch.zeros(*index.shape[:-1], world + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(-1, ranks, torch.ones_like(ranks))
    starts = torch.nn.functional.pad(counts[..., :world].cumsum(-1), (1, 0)).to(torch.int32)  # ≤ S slots a row
    return local_index.gather(-1, order).to(local_index_dtype(local)), starts


def _in_block(index: Tensor, starts: Tensor, block_owner: int, world: int, local: int):
    """(global positions [B, Hkv, n, m], local indices in rank ``block_owner``'s shard, −1 for padding)
    of the selected keys that lie in that shard, m the most any row has; None when no row has one."""
    first, count = starts[..., block_owner], starts[..., block_owner + 1] - starts[..., block_owner]
    width = int(count.max()) if count.numel() else 0
    if width == 0:
        return None
    step = torch.arange(width, device=index.device)
    slot = (first.unsqueeze(-1) + step).clamp(max=index.shape[-1] - 1)
    local_index = index.gather(-1, slot).long()
    valid = step < count.unsqueeze(-1)
    chunk = local // 2  # the owner's two chunks (load-balanced layout): block_owner and 2W − 1 − block_owner
    positions = torch.where(local_index < chunk, block_owner * chunk + local_index,
                            (2 * world - 1 - block_owner) * chunk + local_index - chunk)
    return torch.where(valid, positions, -1), torch.where(valid, local_index, -1)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, T, D] at index [B, H, n, S] (−1 read as 0) → [B, H, n, S, D]."""
    batch, heads, length, dim = x.shape
    offsets = (torch.arange(batch * heads, device=x.device) * length).view(batch, heads, 1, 1)
    return x.reshape(-1, dim).index_select(0, (index.clamp(min=0) + offsets).reshape(-1)).view(*index.shape, dim)


def _logits(q5: Tensor, k_sel: Tensor, slots: Tensor, bias: Tensor | None, index: Tensor, scale: float,
            score_mod=None, want_grad: bool = False):
    """(scores [B, Hkv, g, n, S] over the slots in this block, −inf elsewhere; the score modification's
    derivative there when ``want_grad`` and there is one, else None) from the gathered keys k_sel."""
    scores = torch.einsum("bkgnd,bknsd->bkgns", q5, k_sel) * scale
    mod_grad = None
    if score_mod is not None:  # on scale·q·k, before the key bias (the op's order)
        scores, mod_grad = score_mod.with_grad(scores) if want_grad else (score_mod(scores), None)
    if bias is not None:  # the key bias [B|1, T] at the selected global positions
        batch, heads_kv, n, _ = index.shape
        picked = bias[:, None, None, :].expand(batch, heads_kv, n, bias.shape[-1]).gather(-1, index.long().clamp(min=0))
        scores = scores + picked[:, :, None].to(scores.dtype)
    return scores.masked_fill((slots < 0)[:, :, None], float("-inf")), mod_grad


def _grouped(x: Tensor, heads_kv: int) -> Tensor:
    batch, heads_q, n, dim = x.shape
    return x.reshape(batch, heads_kv, heads_q // heads_kv, n, dim)


class _HashedRing(torch.autograd.Function):
    """The ring over a fixed selection: q [B, Hq, T_local, D], this rank's k/v shards (and, learned, the
    projections) → out in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, q_projection, k_projection, setup):
        dtype = work_dtype(q.dtype)
        batch, heads_q, local, _ = q.shape
        heads_kv = k.shape[1]
        out = torch.zeros(batch, heads_q, local, v.shape[-1], dtype=dtype, device=q.device)
        lse = torch.full((batch, heads_q, local), float("-inf"), dtype=dtype, device=q.device)
        held, block_owner = [k, v], setup.rank
        if setup.native:
            q = q.contiguous()
        for step in range(setup.world):
            k_block, v_block = held
            for rows, index, starts in setup.blocks:
                if setup.native:  # the same merge in the compiled loop, reading the block in place
                    native.ring_forward(q, k_block, v_block, index, starts, block_owner, setup.bias, out, lse, rows,
                                        setup.scale)
                    continue
                found = _in_block(index, starts, block_owner, setup.world, local)
                if found is None:  # no row of the block chose a key of this shard
                    continue
                positions, slots = found
                q5 = _grouped(q[:, :, rows], heads_kv).to(dtype)
                k_sel, v_sel = setup.selected(k_block, v_block, slots, positions, rows, dtype)
                scores, _ = _logits(q5, k_sel, slots, setup.bias, positions, setup.scale, setup.score_mod)
                del k_sel
                part_lse = torch.logsumexp(scores, dim=-1)                            # [B, Hkv, g, n]
                probs = torch.exp(scores - part_lse.unsqueeze(-1)).nan_to_num(0.0)
                part = torch.einsum("bkgns,bknsv->bkgnv", probs, v_sel)
                part, part_lse = part.reshape(batch, heads_q, -1, v.shape[-1]), part_lse.reshape(batch, heads_q, -1)
                old_lse = lse[:, :, rows]
                new_lse = torch.logaddexp(old_lse, part_lse)
                seen = torch.isfinite(new_lse)
                keep_old = torch.where(seen, torch.exp(old_lse - new_lse), 0.0).unsqueeze(-1)
                take_new = torch.where(seen, torch.exp(part_lse - new_lse), 0.0).unsqueeze(-1)
                out[:, :, rows] = out[:, :, rows] * keep_old + part * take_new
                lse[:, :, rows] = new_lse
            if step < setup.world - 1:
                del k_block, v_block
                setup.pass_on(held)
                block_owner = (block_owner - 1) % setup.world
        ctx.save_for_backward(q, k, v, out, lse, q_projection, k_projection)
        ctx.setup = setup
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, q_projection, k_projection = ctx.saved_tensors
        setup = ctx.setup
        dtype = out.dtype
        batch, heads_q, local, dim = q.shape
        heads_kv = k.shape[1]
        grad = grad.to(dtype)
        delta = (grad * out).sum(-1)                                                  # [B, Hq, T_local]
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        learned = setup.learned
        if learned:  # the straight-through estimate's soft codes (module docstring)
            bits = setup.proj_q.shape[-1]
            soft_q = torch.tanh(project(q, setup.proj_q).to(dtype))                    # [B, Hq, T_local, bits]
            d_soft_q = torch.zeros(soft_q.shape, dtype=dtype, device=q.device)
            d_proj_k = torch.zeros(setup.proj_k.shape, dtype=dtype, device=q.device)
        block_owner = setup.rank
        held = [k, v, torch.zeros(k.shape, dtype=dtype, device=q.device), torch.zeros(v.shape, dtype=dtype,
                                                                                       device=q.device)]
        if setup.native:
            q, grad, delta = q.contiguous(), grad.contiguous(), delta.contiguous()
        for step in range(setup.world):
            if setup.native:  # the compiled loop accumulates into the blocks in place
                held[:] = [tensor.contiguous() for tensor in held]
            k_block, v_block, dk_block, dv_block = held
            if learned:
                soft_k = torch.tanh(project(k_block, setup.proj_k).to(dtype))          # the block's keys' soft codes
                d_soft_k = torch.zeros(soft_k.shape, dtype=dtype, device=q.device)
            for rows, index, starts in setup.blocks:
                if setup.native:
                    native.ring_backward(q, k_block, v_block, index, starts, block_owner, setup.bias, grad, lse, delta,
                                         dq, dk_block, dv_block, rows, setup.scale)
                    continue
                found = _in_block(index, starts, block_owner, setup.world, local)
                if found is None:
                    continue
                positions, slots = found
                q5 = _grouped(q[:, :, rows], heads_kv).to(dtype)
                k_sel, v_sel = setup.selected(k_block, v_block, slots, positions, rows, dtype)
                scores, mod_grad = _logits(q5, k_sel, slots, setup.bias, positions, setup.scale, setup.score_mod,
                                           want_grad=True)
                row_lse = _grouped(lse[:, :, rows].unsqueeze(-1), heads_kv)             # [B, Hkv, g, n, 1]
                probs = torch.exp(scores - row_lse).nan_to_num(0.0)
                d_out = _grouped(grad[:, :, rows], heads_kv)                          # [B, Hkv, g, n, Dv]
                d_probs = torch.einsum("bkgnv,bknsv->bkgns", d_out, v_sel)
                d_logits = probs * (d_probs - _grouped(delta[:, :, rows].unsqueeze(-1), heads_kv))
                d_scores = (d_logits if mod_grad is None else d_logits * mod_grad) * setup.scale
                dq[:, :, rows] += torch.einsum("bkgns,bknsd->bkgnd", d_scores, k_sel).reshape(batch, heads_q, -1, dim)
                scatter_add(dk_block, slots, torch.einsum("bkgns,bkgnd->bknsd", d_scores, q5))
                scatter_add(dv_block, slots, torch.einsum("bkgns,bkgnv->bknsv", probs, d_out))
                if learned:
                    d_agree = d_logits / bits
                    sq = _grouped(soft_q[:, :, rows], heads_kv)
                    d_soft_q[:, :, rows] += torch.einsum("bkgns,bknsc->bkgnc", d_agree, _gather(soft_k, slots)).reshape(
                        batch, heads_q, -1, bits)
                    scatter_add(d_soft_k, slots, torch.einsum("bkgns,bkgnc->bknsc", d_agree, sq))
            if learned:  # this block's keys' part of dP_k, from the queries of this rank
                d_proj_k += torch.einsum("bhtd,bhtn->hdn", k_block.to(dtype), d_soft_k * (1 - soft_k.square()))
                del soft_k, d_soft_k
            del k_block, v_block, dk_block, dv_block
            if step < setup.world - 1:
                setup.pass_on(held)
                block_owner = (block_owner - 1) % setup.world
            elif setup.world > 1:  # one more hop: each accumulator comes home
                held = held[2:]
                setup.pass_on(held)
            else:
                held = held[2:]
        dk, dv = held
        d_pq = d_pk = None
        if learned:
            d_pq = torch.einsum("bhtd,bhtn->hdn", q.to(dtype), d_soft_q * (1 - soft_q.square())).to(q_projection.dtype)
            d_pk = d_proj_k.to(k_projection.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_pq, d_pk, None


class _Setup:
    """What the ring needs besides q/k/v: the selection per block of local rows, the key bias, the op's
    options (score modification, far keys' rounding, learned projections), the ring."""

    def __init__(self, blocks, bias, scale, rank, world, comm, score_mod=None, far=None, proj_q=None, proj_k=None,
                 learned=False, native=False):
        self.blocks, self.bias, self.scale = blocks, bias, scale
        #: the ring's steps in the compiled loop (:func:`attnrewrite.kernels.hashed.native.ring_forward`)
        self.native = native
        self.rank, self.world, self.comm = rank, world, comm
        self.score_mod, self.proj_q, self.proj_k, self.learned = score_mod, proj_q, proj_k, learned
        #: None, or (far dtype, rank of each key among the visible ones [B|1, T], its rows' global positions
        #: [T_local], sinks, window, causal)
        self.far = far

    def selected(self, k_block: Tensor, v_block: Tensor, slots: Tensor, positions: Tensor, rows: slice, dtype):
        """The keys and values at ``slots`` of the block at hand [B, Hkv, n, S, D|Dv] in ``dtype``, the far
        ones rounded through ``far_dtype`` (``positions``: their global positions, −1 padding)."""
        k_sel, v_sel = _gather(k_block, slots).to(dtype), _gather(v_block, slots).to(dtype)
        if self.far is None:
            return k_sel, v_sel
        far_dtype, key_rank, row_positions, sinks, window, causal = self.far
        batch, heads_kv, n, width = positions.shape
        rank = key_rank[:, None, None, :].expand(batch, heads_kv, n, key_rank.shape[-1]).gather(
            -1, positions.clamp(min=0))                                               # 1-based among the visible
        rows_at = row_positions[rows]
        count = key_rank[:, rows_at] if causal else key_rank[:, -1:].expand(key_rank.shape[0], n)  # [B|1, n]
        far = (positions >= 0) & (rank > sinks) & (rank <= count[:, None, :, None] - window)
        return round_far(k_sel, far, far_dtype), round_far(v_sel, far, far_dtype)

    def pass_on(self, held: list[Tensor]) -> None:
        """Replace each tensor of ``held`` by the previous rank's, sending ours to the next rank, one
        tensor at a time (so that at most one extra tensor is alive besides the blocks)."""
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        for i, tensor in enumerate(held):
            spec = (tuple(tensor.shape), tensor.dtype)
            held[i] = self.comm.exchange({nxt: tensor}, {prev: spec})[prev]
            del tensor


def select_blocks(q: Tensor, codes: Tensor, keep: Tensor | None, rank: int, world: int, causal: bool, bits: int,
                  top_k: int, window: int, sinks: int, proj_q: Tensor, heads_kv: int,
                  native_ring: bool = False) -> list:
    """The selection of this rank's queries q [B, Hq, T_local, D] (load-balanced layout), block by block of
    the ring: [(local rows, kept index, starts)] (:func:`by_owner`), from every key's packed code ``codes``
    uint8 [B, Hkv, T, bits / 8] (in global order) and the key mask ``keep`` (None or bool [B|1, T]).
    ``native_ring``: the ring's steps run compiled, which gather nothing: blocks of about ``NATIVE_ELEMENTS``
    selected slots (a block of a few rows would make the compiled step switch heads every few rows and miss the
    cache: 2.6× slower at T = 8k), else of about ``RING_ELEMENTS`` gathered entries.

    On the CPU the compiled selection of the single-process op chooses the keys
    (:func:`attnrewrite.kernels.hashed.native.select_rows`, on one thread, whatever the torch thread count:
    it reads codes only, so it covers every dtype and option); elsewhere, or with ``NATIVE_SELECTION`` off,
    the torch form :func:`select_rows` (float agreement counts and a partition over [rows, T], many times
    slower on the CPU).  Both choose the keys the single-process op chooses."""
    local = q.shape[-2]
    length = local * world
    use_native = NATIVE_SELECTION and native.selects(q, heads_kv, bits)
    if use_native:
        key_codes = native.packed_words(codes)                                        # [B, Hkv, T, words]
        q_codes = native.codes_of(q, proj_q)                                           # [B, Hq, T_local, words]
    else:
        key_signs = unpack_signs(codes, bits).to(torch.int8)                            # [B, Hkv, T, bits]
    positions = local_positions(rank, world, length)
    selected = min(length, sinks + window + top_k)
    if native_ring:
        step = max(1, NATIVE_ELEMENTS // max(1, q.shape[0] * heads_kv * selected))
    else:
        per_row = q.shape[0] * max(q.shape[1] * length, heads_kv * selected * q.shape[-1])
        step = max(1, RING_ELEMENTS // max(1, per_row))
    blocks, piece = [], local // 2
    for offset in (0, piece):  # the rank's two pieces, each contiguous in global positions
        start = int(positions[offset])
        for i0 in range(0, piece, step):
            i1 = min(piece, i0 + step)
            here = slice(offset + i0, offset + i1)
            if use_native:
                index = native.select_rows(q_codes[:, :, here], key_codes, keep, causal, start + i0, top_k, window,
                                           sinks)
                blocks.append((here, *native.by_owner(index, world, local, local_index_dtype(local))))
                continue
            index = _select_block(q[:, :, here], slice(start + i0, start + i1), key_signs, keep, causal, bits,
                                  top_k, window, sinks, proj_q, heads_kv)
            blocks.append((here, *by_owner(index, world, local)))
    return blocks


def attend(args: dict, mask: Tensor | None, rank: int, world: int, comm) -> Tensor:
    """This rank's rows of ``attnrewrite::hashed_attention`` [B, Hq, T_local, Dv], in local order.

    Args:
        args: the op's arguments by schema name; q, k, v are this rank's shards [B, H, T_local, D]
            (and, with ``hash="learned"``, the projections q_projection / k_projection).
        mask: None or this rank's key mask [B|1, 1, 1, T_local|1] (bool, or a float key bias with
            entries ≤ MASKED_SCORE = −9000 excluding the key).
        comm: the communicator (:mod:`.exchange`).
    """
    q, k, v = args["q"], args["k"], args["v"]
    bits, top_k, window, sinks = (int(args[name]) for name in ("bits", "top_k", "window", "sinks"))
    causal = bool(args["is_causal"])
    q_projection, k_projection = args.get("q_projection"), args.get("k_projection")
    far_dtype = far_dtype_of(args.get("far_dtype"))
    score_mod = parse_score_mod(args.get("score_mod"))
    hashed_op.check_inputs(q, k, v, mask, args["dropout_p"], causal, bool(args["enable_gqa"]), bits, top_k, window,
                           sinks, args["hash"], q_projection, k_projection)
    learned = q_projection is not None
    local = q.shape[-2]
    length = local * world
    scale = q.shape[-1] ** -0.5 if args["scale"] is None else args["scale"]
    proj_q, proj_k = projections(q_projection, k_projection, q.shape[-1], bits, int(args["seed"]), q.device)
    with torch.no_grad():
        codes = _natural(torch.cat(comm.all_gather(pack(k, proj_k)), dim=2), 2, world)  # [B, Hkv, T, bits/8]
        keep = bias = None
        if mask is not None:
            flat = mask.reshape(mask.shape[0], mask.shape[-1])                         # [B|1, T_local|1]
            if flat.shape[-1] == local:
                gathered = comm.all_gather(flat.to(torch.uint8) if flat.dtype == torch.bool else flat)
                flat = _natural(torch.cat(gathered, dim=-1), -1, world)
                flat = flat.bool() if mask.dtype == torch.bool else flat
            flat = flat.expand(flat.shape[0], length)
            if flat.dtype == torch.bool:
                keep = flat
            else:
                keep = flat > MASKED_SCORE
                bias = flat.masked_fill(~keep, 0.0)
        positions = local_positions(rank, world, length)
        ring = (NATIVE_RING and not learned and score_mod is None and far_dtype is None
                and torch.get_num_threads() == 1 and native.ring_covers(q, k, v))
        blocks = select_blocks(q, codes, keep, rank, world, causal, bits, top_k, window, sinks, proj_q, k.shape[1],
                               native_ring=ring)
        del codes
        far = None
        if far_dtype is not None:  # each key's rank among the visible keys (1-based), for the far test
            visible = torch.ones(1, length, dtype=torch.long, device=q.device) if keep is None else keep.long()
            far = (far_dtype, visible.cumsum(-1), positions.to(q.device), sinks, window, causal)
    if ring and bias is not None:
        bias = bias.to(torch.float32).contiguous()
    setup = _Setup(blocks, bias, scale, rank, world, comm, score_mod, far, proj_q, proj_k, learned, ring)
    return _HashedRing.apply(q, k, v, q_projection, k_projection, setup)
