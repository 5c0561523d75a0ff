"""Point-to-point fetches of sequence positions between ranks.

Summary attention (:mod:`.summary`) needs only a few pieces of the other ranks' shards: the raw
key/value rows its queries' windows reach into, and every rank's chunk summaries.  This module moves
exactly those pieces:

- :func:`fetch` gives a rank the rows at a list of global positions (a *plan*, computed the same way
  on every rank from the load-balanced layout, so no request has to be sent): each owner sends the rows
  another rank needs, a rank's own rows are read in place.  Backward, the gradient of each fetched row
  goes back to its owner and is added there.
- :func:`move_rows` and :func:`add_back` are the same two directions without autograd, for a caller that
  runs its own backward (:mod:`.summary`, which also all-gathers the chunk summaries through the
  communicator and sends each rank its summaries' gradients).

All communication goes through a *communicator* with ``all_gather(tensor)`` and
``exchange(sends, receives)``: :class:`GroupComm` on a process group, or (in the tests) threads in one
process.  Each communicator counts the bytes it received (``received_bytes``), which the tests use to
prove that a rank never receives the whole sequence's keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class GroupComm:
    """The communicator on a process group: ``dist.all_gather`` and ``isend``/``irecv`` (gloo or NCCL)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.received_bytes = 0

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (the same shape on every rank), in rank order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor, group=self.group)
        self.received_bytes += tensor.numel() * tensor.element_size() * (self.world - 1)
        return parts

    def exchange(self, sends: dict[int, Tensor], receives: dict[int, tuple[tuple[int, ...], torch.dtype]]
                 ) -> dict[int, Tensor]:
        """Send ``sends[peer]`` to each peer and receive a tensor of ``receives[peer]`` = (shape, dtype)
        from each; every rank calls it at the same point with plans that match."""
        works, received = [], {}
        for peer, (shape, dtype) in receives.items():
            buffer = torch.empty(shape, dtype=dtype, device=_device_of(sends, received))
            received[peer] = buffer
            works.append(dist.irecv(buffer, dist.get_global_rank(self.group, peer), group=self.group))
        for peer, tensor in sends.items():
            works.append(dist.isend(tensor.contiguous(), dist.get_global_rank(self.group, peer), group=self.group))
        for work in works:
            work.wait()
        self.received_bytes += sum(t.numel() * t.element_size() for t in received.values())
        return received


def _device_of(sends: dict, received: dict):
    for tensor in list(sends.values()) + list(received.values()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# fetching rows by position


@dataclass(frozen=True)
class FetchPlan:
    """What one rank receives and sends in :func:`fetch`, along the sequence dim of [..., T_local, D].

    ``length``: the number of rows fetched; ``own``: (slots, local indices) of the rows this rank holds
    itself; ``receive[peer]``: (slots) filled from ``peer``; ``send[peer]``: (local indices) of the rows
    this rank sends to ``peer``, in the order the peer's ``receive`` expects.
    """

    length: int
    own: tuple[Tensor, Tensor]
    receive: dict[int, Tensor]
    send: dict[int, Tensor]


def owner(position: Tensor, world: int, local_length: int) -> tuple[Tensor, Tensor]:
    """(rank, index in that rank's shard) of each global position, in the load-balanced layout
    (:mod:`.layout`: rank r holds chunks r and 2W − 1 − r of 2W chunks of ``local_length / 2`` rows)."""
    chunk = local_length // 2
    piece = torch.div(position, chunk, rounding_mode="floor")
    late = piece >= world
    rank = torch.where(late, 2 * world - 1 - piece, piece)
    index = position - piece * chunk + late.long() * chunk
    return rank, index


def plan_fetch(wanted: list[Tensor], rank: int, world: int, local_length: int) -> FetchPlan:
    """The plan of :func:`fetch` for rank ``rank``, ``wanted[r]`` being the global positions (int64) rank r
    needs, in the order it wants them; every rank computes every rank's wish, so no request is sent."""
    mine = wanted[rank]
    owners, index = owner(mine, world, local_length)
    slots = torch.arange(mine.numel())
    own = (slots[owners == rank], index[owners == rank])
    receive = {peer: slots[owners == peer] for peer in range(world) if peer != rank and bool((owners == peer).any())}
    send = {}
    for peer in range(world):
        if peer == rank:
            continue
        their_owners, their_index = owner(wanted[peer], world, local_length)
        if bool((their_owners == rank).any()):
            send[peer] = their_index[their_owners == rank]
    return FetchPlan(mine.numel(), own, receive, send)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    return x.index_select(-2, index.to(x.device))


def move_rows(x: Tensor, plan: FetchPlan, comm) -> Tensor:
    """The rows of the plan, [..., plan.length, D], from each rank's x [..., T_local, D]: the forward of
    :func:`fetch`, not differentiable (a caller that runs its own backward returns the gradients with
    :func:`add_back`)."""
    sends = {peer: _rows(x, index) for peer, index in plan.send.items()}
    shape = lambda n: (*x.shape[:-2], n, x.shape[-1])
    received = comm.exchange(sends, {peer: (shape(slots.numel()), x.dtype) for peer, slots in plan.receive.items()})
    out = x.new_empty(shape(plan.length))
    slots, index = plan.own
    out.index_copy_(-2, slots.to(x.device), _rows(x, index))
    for peer, slots in plan.receive.items():
        out.index_copy_(-2, slots.to(x.device), received[peer])
    return out


def add_back(grad: Tensor, plan: FetchPlan, target: Tensor, comm) -> None:
    """The backward of :func:`move_rows` in place: the gradient of each fetched row, grad [..., plan.length, D],
    added to ``target`` [..., T_local, D] at the row's owner (every rank calls it with its own plan)."""
    sends = {peer: _rows(grad, slots) for peer, slots in plan.receive.items()}
    shape = lambda n: (*grad.shape[:-2], n, grad.shape[-1])
    received = comm.exchange(sends, {peer: (shape(index.numel()), grad.dtype) for peer, index in plan.send.items()})
    sends = None
    slots, index = plan.own
    target.index_add_(-2, index.to(grad.device), _rows(grad, slots))
    for peer, index in plan.send.items():
        target.index_add_(-2, index.to(grad.device), received.pop(peer))


def _move_back(grad: Tensor, plan: FetchPlan, local_shape, comm) -> Tensor:
    """The backward of :func:`fetch`: each fetched row's gradient added at its owner."""
    out = grad.new_zeros(local_shape)
    add_back(grad, plan, out, comm)
    return out


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: FetchPlan, comm) -> Tensor:
        ctx.plan, ctx.comm, ctx.local_shape = plan, comm, x.shape
        return move_rows(x, plan, comm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _move_back(grad.contiguous(), ctx.plan, ctx.local_shape, ctx.comm), None, None


def fetch(x: Tensor, plan: FetchPlan, comm) -> Tensor:
    """The rows of the whole sequence at the plan's positions, [..., plan.length, D], from each rank's
    shard x [..., T_local, D] (differentiable: the backward sends each row's gradient to its owner)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Fetch.apply(x, plan, comm)
    return move_rows(x, plan, comm)
