"""The load-balanced sequence layout of context parallelism, the same as torch's.

A sequence of T tokens is cut into 2·W chunks of C = T / (2·W) tokens; rank r holds chunk r and
chunk 2·W − 1 − r, in that order (torch 2.13's ``_HeadTailLoadBalancer``).  Under causal attention
the early chunk sees few keys and the late one many, so every rank does the same work.

Everything here is plain torch on index tensors: no process group is needed, so the layout can be
tested, and a W-rank run simulated, in one process.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_divisible(length: int, world: int, what: str) -> None:
    """Raise ValueError when ``length`` cannot be cut into 2·``world`` equal chunks."""
    if length % (2 * world) != 0:
        raise ValueError(
            f"context_parallel: {what} has sequence length {length}, which is not divisible by 2 × world size "
            f"= {2 * world} (the load-balanced layout cuts the sequence into 2·W equal chunks); pad the "
            f"sequence to a multiple of {2 * world} and mask the padding")


def segments(rank: int, world: int, length: int) -> list[tuple[int, int]]:
    """The (start, stop) natural positions of the two chunks rank ``rank`` holds, in local order."""
    check_divisible(length, world, "the sequence")
    chunk = length // (2 * world)
    late = 2 * world - 1 - rank
    return [(rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk)]


def shard_indices(length: int, world: int, device=None) -> Tensor:
    """[T] int64: position p of the rank-ordered sequence (rank 0's shard, then rank 1's, …) holds
    natural position ``shard_indices(...)[p]``."""
    parts = [torch.arange(a, b, device=device) for r in range(world) for a, b in segments(r, world, length)]
    return torch.cat(parts)


def restore_indices(length: int, world: int, device=None) -> Tensor:
    """[T] int64: ``rank_ordered.index_select(dim, restore_indices(...))`` is in natural order."""
    return torch.argsort(shard_indices(length, world, device))


def local_positions(rank: int, world: int, length: int, device=None) -> Tensor:
    """[T / W] int64: the natural positions of rank ``rank``'s tokens, in local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in segments(rank, world, length)])


def shard(x: Tensor, dim: int, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (its two chunks, concatenated)."""
    check_divisible(x.shape[dim], world, f"a tensor of shape {tuple(x.shape)} (dim {dim})")
    return x.index_select(dim, local_positions(rank, world, x.shape[dim], x.device))


def unshard(rank_ordered: Tensor, dim: int, world: int) -> Tensor:
    """The natural-order sequence from the rank-ordered concatenation of every rank's shard."""
    return rank_ordered.index_select(dim, restore_indices(rank_ordered.shape[dim], world, rank_ordered.device))
