"""Packed variable-length sequences for the summary kernels: where each sequence and its chunks live, the
block tables that give each program its sequence, and the chunk summaries of every sequence.

q/k/v are [1, H, total, D] holding N sequences back to back, ``cu_seqlens`` [N+1] their starts.  Sequence s
has ceil(L_s / C) chunks counted from its own first token; its summaries are stored at rows
``cu_chunks[s] …`` of one summary tensor [1, Hkv, slots, D].  Everything here runs on the device without
reading a value back to the host (no sync, and torch.compile traces it with static shapes): the number of
summary rows and of programs are bounds known from the shapes alone (Σ_s ceil(L_s / C) ≤ ceil(total / C) + N),
and the rows or programs past the real ones belong to an empty sequence N whose work is nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked import hide_padding, pooling_backward, pooling_weights, work_dtype

Tensor = torch.Tensor


def _cdiv(a, b):
    return (a + b - 1) // b


@dataclass(frozen=True)
class Packing:
    """Where the sequences of a packed call are.

    ``cu_seqlens`` / ``cu_chunks``: int32 [N + 2], the first token / first summary row of each sequence,
    then the totals twice (sequence N, empty, is the idle programs'); ``lengths`` / ``chunks`` int32 [N]
    each sequence's tokens and chunks; ``slots``: the summary rows allocated (a bound on Σ chunks).
    """
    cu_seqlens: Tensor
    cu_chunks: Tensor
    lengths: Tensor
    chunks: Tensor
    slots: int

    @property
    def n_seqs(self) -> int:
        return self.lengths.shape[0]


def packing(cu_seqlens: Tensor, total: int, chunk_size: int) -> Packing:
    """The :class:`Packing` of checked ``cu_seqlens`` [N+1] over a packed length ``total``."""
    cu = cu_seqlens.to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    chunks = _cdiv(lengths, chunk_size)
    cu_chunks = torch.cat([cu.new_zeros(1), torch.cumsum(chunks, 0, dtype=torch.int32)])
    slots = _cdiv(total, chunk_size) + lengths.shape[0]
    return Packing(torch.cat([cu, cu[-1:]]).contiguous(), torch.cat([cu_chunks, cu_chunks[-1:]]).contiguous(),
                   lengths, chunks, slots)


def block_table(sizes: Tensor, block: int, programs: int) -> tuple[Tensor, Tensor]:
    """(sequence, first index) int32 [programs] of each program of a grid that covers every sequence's
    ``sizes`` [N] (tokens or chunks) in blocks of ``block``: sequence s gets ceil(sizes[s] / block) programs,
    one after another; the programs past them get sequence N (empty) and index 0."""
    blocks = _cdiv(sizes, block)
    ends = torch.cumsum(blocks, 0)
    pid = torch.arange(programs, device=sizes.device, dtype=ends.dtype)
    seq = torch.searchsorted(ends, pid, right=True)                       # N past the last block
    real = seq < sizes.shape[0]
    first_block = (ends - blocks)[seq.clamp(max=sizes.shape[0] - 1)]
    first = torch.where(real, (pid - first_block) * block, 0)
    return seq.to(torch.int32).contiguous(), first.to(torch.int32).contiguous()


def query_programs(total: int, n_seqs: int, block: int) -> int:
    """A grid size that covers ceil(L_s / block) programs for every sequence (Σ ≤ ceil(total / block) + N)."""
    return _cdiv(total, block) + n_seqs


def _slots(pack: Packing, chunk_size: int, device) -> tuple[Tensor, Tensor]:
    """(token index int64 [slots, C], valid bool [slots, C]): the tokens in each summary row's chunk (0 where
    the slot is empty: past the sequence's last token, or a row of no sequence)."""
    n = pack.n_seqs
    row = torch.arange(pack.slots, device=device, dtype=torch.int32)
    seq = torch.searchsorted(pack.cu_chunks[1:n + 1], row, right=True)
    real = seq < n
    seq = seq.clamp(max=n - 1)
    first = pack.cu_seqlens[seq] + (row - pack.cu_chunks[seq]) * chunk_size          # [slots]
    tokens = first[:, None].long() + torch.arange(chunk_size, device=device)[None, :]  # [slots, C]
    valid = real[:, None] & (tokens < pack.cu_seqlens[seq + 1][:, None])
    return torch.where(valid, tokens, 0), valid


def _gathered(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """x [1, H, total, D] → [1, H, slots, C, D] in the work dtype, empty slots 0."""
    return hide_padding(x[:, :, index.flatten()], valid.flatten()[None]).to(work_dtype(x.dtype)).unflatten(
        2, index.shape)


def packed_chunk_summaries(k: Tensor, v: Tensor, pack: Packing, chunk_size: int, summary_query: Tensor | None):
    """(k̄ [1, Hkv, slots, D], v̄ [1, Hkv, slots, Dv] in k's dtype, exists bool [1, slots]) of every
    sequence's chunks, sequence s's at rows cu_chunks[s] …; the pooling of
    :func:`~attnrewrite.kernels.summary.chunked.chunk_summaries` (mean or learned), chunk by chunk."""
    index, valid = _slots(pack, chunk_size, k.device)
    k_chunks, v_chunks = _gathered(k, index, valid), _gathered(v, index, valid)
    weights, exists = pooling_weights(k_chunks, valid[None, None], summary_query)
    k_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(k_chunks.shape[:-1]), k_chunks)
    v_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(v_chunks.shape[:-1]), v_chunks)
    return k_sum.to(k.dtype), v_sum.to(v.dtype), exists


def packed_chunk_summaries_backward(dk_sum: Tensor, dv_sum: Tensor, k: Tensor, v: Tensor, pack: Packing,
                                    chunk_size: int, summary_query: Tensor | None):
    """(dk, dv [1, Hkv, total, D|Dv] in the work dtype, d_summary_query or None) of
    :func:`packed_chunk_summaries` (every token is in one slot; the pooling queries' gradient is summed over
    all sequences' chunks)."""
    index, valid = _slots(pack, chunk_size, k.device)
    k_chunks, v_chunks = _gathered(k, index, valid), _gathered(v, index, valid)
    weights, _ = pooling_weights(k_chunks, valid[None, None], summary_query)
    dk_chunks, dv_chunks, d_query = pooling_backward(dk_sum, dv_sum, k_chunks, v_chunks,
                                                     weights.expand(k_chunks.shape[:-1]), summary_query)
    flat = index.flatten()
    keep = valid.flatten()[None, None, :, None]
    dk = torch.zeros(k.shape, dtype=k_chunks.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v_chunks.dtype, device=v.device)
    dk.index_add_(2, flat, torch.where(keep, dk_chunks.flatten(2, 3), 0.0))
    dv.index_add_(2, flat, torch.where(keep, dv_chunks.flatten(2, 3), 0.0))
    return dk, dv, d_query
