"""W ranks simulated by threads in one process, for the context-parallel forms that talk through a
communicator (:mod:`attnrewrite.distributed.exchange`): the same computation as on a process group,
with the messages carried by queues, so W = 1 … 4 run in float64 without spawning processes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class ThreadComm:
    """The communicator of rank ``rank``: what it sends to ``peer`` waits in the (rank, peer) queue.

    Every rank makes the same calls in the same order, so first-in first-out queues match them up.
    ``received_bytes`` counts what arrived from other ranks; ``received_shapes`` lists their shapes.
    """

    def __init__(self, rank: int, world: int, boxes: dict, lock: threading.Lock | None = None):
        self.rank, self.world, self.boxes, self.lock = rank, world, boxes, lock or threading.Lock()
        self.received_bytes = 0
        self.received_shapes: list[tuple[int, ...]] = []

    def _take(self, peer: int) -> torch.Tensor:
        tensor = self.boxes[peer, self.rank].get(timeout=60)
        self.received_bytes += tensor.numel() * tensor.element_size()
        self.received_shapes.append(tuple(tensor.shape))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        for peer in range(self.world):
            if peer != self.rank:
                self.boxes[self.rank, peer].put(tensor.detach().clone())
        return [tensor.detach().clone() if peer == self.rank else self._take(peer) for peer in range(self.world)]

    def exchange(self, sends: dict, receives: dict) -> dict:
        for peer, tensor in sends.items():
            self.boxes[self.rank, peer].put(tensor.detach().clone())
        received = {}
        for peer, (shape, dtype) in receives.items():
            tensor = self._take(peer)
            assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, (tensor.shape, shape)
            received[peer] = tensor
        return received


    def _channel(self, src: int, dst: int, channel: str) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault((src, dst, channel), queue.Queue())

    def start(self, tensors: list[torch.Tensor], channel: str):
        """The ring's exchange (as :class:`attnrewrite.distributed.ring.P2PRing`): send to the next rank,
        return a function that waits for the previous rank's tensors; one queue per channel."""
        self._channel(self.rank, (self.rank + 1) % self.world, channel).put([t.detach().clone() for t in tensors])
        source = self._channel((self.rank - 1) % self.world, self.rank, channel)
        return lambda: source.get(timeout=60)


def run_ranks(world: int, rank_main: Callable[[int, ThreadComm], object]) -> list:
    """``rank_main(rank, comm)`` for every rank, each in its own thread; their results in rank order."""
    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    lock = threading.Lock()
    comms = [ThreadComm(rank, world, boxes, lock) for rank in range(world)]
    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(lambda rank: rank_main(rank, comms[rank]), range(world)))
