"""The collectives context-parallel attention needs, on a process group (gloo on the CPU, NCCL on CUDA).

:func:`gather_sequence` is differentiable: forward, every rank's shard is all-gathered and put in
natural order; backward, the gradient of the whole sequence is summed over the ranks (each rank's
attention contributed to every key) and each rank keeps the part of its own shard.  The backward
uses ``all_reduce`` rather than ``reduce_scatter``, which gloo does not offer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnrewrite.distributed.layout import restore_indices


def _all_gather_cat(x: Tensor, dim: int, group) -> Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` in rank order; the backward sums the gradient over the ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        ctx.dim, ctx.group, ctx.local = dim, group, x.shape[dim]
        return _all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.local, ctx.local), None, None


def gather_sequence(x: Tensor, dim: int, group) -> Tensor:
    """Every rank's shard of ``x`` along ``dim``, as the whole sequence in natural order (differentiable)."""
    dim = dim % x.dim()
    world = dist.get_world_size(group)
    if x.requires_grad and torch.is_grad_enabled():
        gathered = _GatherSequence.apply(x, dim, group)
    else:
        gathered = _all_gather_cat(x, dim, group)
    return gathered.index_select(dim, restore_indices(gathered.shape[dim], world, x.device))


def gather_ranks(x: Tensor, dim: int, group) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (differentiable, as :func:`gather_sequence`)."""
    dim = dim % x.dim()
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherSequence.apply(x, dim, group)
    return _all_gather_cat(x, dim, group)
