"""Context-parallel summary attention (:mod:`attnrewrite.distributed.summary`), W ranks as threads.

The ranks' rows, put back in order, and the q/k/v gradients (window rows' gradients having gone back
to their owners, summaries' through the ranks that pooled them) must equal the single-process op; a
learned pooling query's gradient, summed over the ranks, the op's.  And a rank receives only its
window's raw rows and the chunk summaries, never the whole sequence's keys and values.
"""

from __future__ import annotations

import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnrewrite import ops
from attnrewrite.distributed import layout, summary
from attnrewrite.testing.threads import run_ranks

B, HQ, HKV, D = 2, 4, 2, 8


def _inputs(name: str, length: int, mask_kind: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(B, h, length, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, length - 7:] = False   # right padding: whole chunks of the last piece have no valid key
    valid[0, 3] = False
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = valid[:, None, None, :]
    else:
        mask = torch.zeros(B, 1, 1, length, dtype=torch.float64).masked_fill(~valid[:, None, None, :], float("-inf"))
    return q, k, v, grad, mask


def _args(q, k, v, causal, chunk_size, window_chunks, summary_query=None):
    return dict(q=q, k=k, v=v, dropout_p=0.0, is_causal=causal, scale=None, enable_gqa=True, chunk_size=chunk_size,
                window_chunks=window_chunks, summary="mean" if summary_query is None else "learned",
                summary_query=summary_query, score_mod=None, cu_seqlens=None)


def _distributed(world, q, k, v, grad, mask, causal, chunk_size, window_chunks, summary_query=None):
    length = q.shape[-2]

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        query = None if summary_query is None else summary_query.clone().requires_grad_()
        local_mask = None if mask is None else mask.index_select(3, positions)
        out = summary.attend(_args(*local, causal, chunk_size, window_chunks, query), local_mask, rank, world, comm)
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local], None if query is None else query.grad, comm

    results = run_ranks(world, rank_main)
    out = layout.unshard(torch.cat([r[0] for r in results], 2), 2, world)
    grads = [layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, world) for i in range(3)]
    query_grad = None if summary_query is None else sum(r[2] for r in results)
    return out, grads, query_grad, [r[3] for r in results]


def _whole(q, k, v, mask, causal, chunk_size, window_chunks, summary_query=None):
    return ops.summary_attention(q, k, v, mask, is_causal=causal, enable_gqa=True, chunk_size=chunk_size,
                                 window_chunks=window_chunks, summary="mean" if summary_query is None else "learned",
                                 summary_query=summary_query)


# (causal, mask, world, T, chunk_size, window_chunks): window_chunks = 4 with pieces of 6 tokens reaches
# across more than one piece (rows from two other ranks); 0 sees its own chunk only.
CELLS = [(causal, mask_kind, world, {2: 24, 3: 36}[world], 2, 1)
         for causal in (True, False) for mask_kind in ("none", "bool") for world in (2, 3)]
CELLS += [(True, "float", 4, 48, 2, 4), (False, "bool", 4, 48, 2, 4), (True, "bool", 1, 24, 3, 2),
          (True, "none", 2, 32, 4, 0), (False, "none", 2, 32, 4, 0)]
# the fused path's runs of keys that every row of a block sees whole (no position mask, the key flags only): a window
# longer than a block, several blocks of FUSED_ROWS per piece (T = 1024 over 2 ranks: pieces of 256 rows)
CELLS += [(True, "bool", 2, 64, 2, 8), (False, "float", 2, 64, 2, 8), (True, "bool", 2, 1024, 4, 40),
          (False, "bool", 2, 1024, 4, 40)]


@pytest.mark.parametrize("causal,mask_kind,world,length,chunk_size,window_chunks", CELLS)
def test_summary_cp_equals_the_whole_op(causal, mask_kind, world, length, chunk_size, window_chunks):
    name = f"summary{causal}{mask_kind}{world}{length}{chunk_size}{window_chunks}"
    q, k, v, grad, mask = _inputs(name, length, mask_kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _whole(*leaves, mask, causal, chunk_size, window_chunks)
    ref.backward(grad)
    out, grads, _, _ = _distributed(world, q, k, v, grad, mask, causal, chunk_size, window_chunks)
    torch.testing.assert_close(out, ref.detach())
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_learned_summary_gradient_reaches_the_pooling_query(causal):
    """The summaries' gradients go back to the ranks that pooled them: the pooling query's gradient,
    summed over the ranks, is the op's (and so are q/k/v's)."""
    q, k, v, grad, mask = _inputs(f"learned{causal}", 36, "bool")
    query = torch.randn(HKV, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, query)]
    ref = _whole(*leaves[:3], mask, causal, 3, 1, leaves[3])
    ref.backward(grad)
    out, grads, query_grad, _ = _distributed(3, q, k, v, grad, mask, causal, 3, 1, query)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(query_grad, leaves[3].grad)
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")


def test_a_rank_receives_its_window_and_the_summaries_only():
    """Counted on the communicator, forward: each rank receives exactly the raw rows of its pieces'
    windows that other ranks hold, plus the other ranks' summaries (T / C rows) and their flags — never
    a piece larger than the window; forward and backward together stay below one copy of the whole
    sequence's keys and values (an all-gather of K/V alone would receive (W − 1)/W of it, twice)."""
    world, length, chunk_size, window_chunks = 4, 128, 4, 2
    q, k, v, grad, _ = _inputs("probe", length, "none")
    span = window_chunks * chunk_size
    row_bytes = B * HKV * 2 * D * 8                           # one position of k and v, float64
    chunks = length // chunk_size

    def rank_main(rank, comm, backward):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        out = summary.attend(_args(*local, True, chunk_size, window_chunks), None, rank, world, comm)
        if backward:
            out.backward(grad.index_select(2, positions))
        return comm

    forward_only = run_ranks(world, lambda rank, comm: rank_main(rank, comm, False))
    for rank, comm in enumerate(forward_only):
        held = set(layout.local_positions(rank, world, length).tolist())
        window = [p for start, _ in layout.segments(rank, world, length) for p in range(max(0, start - span), start)]
        foreign = sum(p not in held for p in window)
        others = chunks * (world - 1) // world
        assert comm.received_bytes == foreign * row_bytes + others * row_bytes + others * B, rank
        assert max(shape[-2] for shape in comm.received_shapes) <= max(2 * span, chunks // world)
    whole_kv = length * row_bytes
    for rank, comm in enumerate(run_ranks(world, lambda rank, comm: rank_main(rank, comm, True))):
        assert comm.received_bytes < whole_kv, (rank, comm.received_bytes, whole_kv)


def test_pieces_that_split_a_chunk_are_refused():
    q, k, v, _, _ = _inputs("split", 24, "none")
    positions = layout.local_positions(0, 2, 24)
    local = [t.index_select(2, positions) for t in (q, k, v)]
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 2 × world × chunk_size = 16"):
        summary.attend(_args(*local, True, 4, 1), None, 0, 2, comm=None)


def test_summary_cp_applies_the_score_modification():
    """A soft-capped summary site: the cap acts on the window's and the summaries' scores alike."""
    cap = "div 0.5; tanh; mul 0.5"
    q, k, v, grad, mask = _inputs("softcap", 36, "bool")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.summary_attention(*leaves, mask, enable_gqa=True, chunk_size=2, window_chunks=2, score_mod=cap)
    ref.backward(grad)

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, 3, 36)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        args = {**_args(*local, True, 2, 2), "score_mod": cap}
        out = summary.attend(args, mask.index_select(3, positions), rank, 3, comm)
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local]

    results = run_ranks(3, rank_main)
    torch.testing.assert_close(layout.unshard(torch.cat([r[0] for r in results], 2), 2, 3), ref.detach())
    for i, leaf in enumerate(leaves):
        torch.testing.assert_close(layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, 3), leaf.grad)


class _GlooLikeComm:
    """The communicator with gloo's memory (:class:`~attnrewrite.distributed.exchange.GroupComm`): a rank makes its
    receiving buffers itself, and what it sends stays alive until the receiver has copied it."""

    def __init__(self, rank: int, world: int, boxes: dict):
        self.rank, self.world, self.boxes = rank, world, boxes
        self.received_bytes = 0

    def exchange(self, sends: dict, receives: dict) -> dict:
        taken = []
        for peer, tensor in sends.items():
            taken.append(threading.Event())
            self.boxes[self.rank, peer].put((tensor.contiguous(), taken[-1]))
        received = {}
        for peer, (shape, dtype) in receives.items():
            received[peer] = torch.empty(shape, dtype=dtype)
            theirs, their_taken = self.boxes[peer, self.rank].get(timeout=120)
            received[peer].copy_(theirs)
            theirs = None
            their_taken.set()
        assert all(event.wait(120) for event in taken)
        return received

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        peers = [p for p in range(self.world) if p != self.rank]
        received = self.exchange({p: tensor for p in peers}, {p: (tuple(tensor.shape), tensor.dtype) for p in peers})
        return [tensor.clone() if p == self.rank else received[p] for p in range(self.world)]


def _peak_shards(world: int, heads: int = 8, length: int = 2048, dim: int = 64, window_chunks: int = 64
                 ) -> tuple[float, float]:
    """(the most live tensor bytes any rank holds over its forward and backward, the fetched window rows the
    largest rank holds) of causal float32 summary attention with chunk_size 8 (``window_chunks`` · 8 raw rows
    before each piece), ranks as threads, both in shards [1, heads, length / world, dim]."""
    from attnrewrite.testing.memory import LiveTensorBytes

    g = torch.Generator().manual_seed(world)
    q, k, v, grad = (torch.randn(1, heads, length, dim, generator=g) for _ in range(4))
    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    peaks, windows = {}, {}

    def rank_main(rank):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        local_grad = grad.index_select(2, positions)
        args = {**_args(*local, True, 8, window_chunks), "enable_gqa": False}
        comm = _GlooLikeComm(rank, world, boxes)
        windows[rank] = summary._setup(rank, world, length, 8, window_chunks, True, 1.0, None, comm).plan.length
        with LiveTensorBytes() as live:
            out = summary.attend(args, None, rank, world, comm)
            out.backward(local_grad)
            del out
        peaks[rank] = live.peak

    with ThreadPoolExecutor(world) as pool:
        list(pool.map(rank_main, range(world)))
    rows = length // world
    return max(peaks.values()) / (q.numel() * q.element_size() / world), max(windows.values()) / rows


@pytest.mark.parametrize("world", [2, 4])
def test_summary_cp_holds_its_gradients_and_one_head_of_the_rest(world, one_thread):
    """Per-rank memory of causal summary attention (float32), counted as live tensor bytes
    (:class:`~attnrewrite.testing.memory.LiveTensorBytes`) in units of one shard [B, H, T/W, D]: at its peak a rank
    holds its output and dQ, dK, dV (4) and, running one key/value head at a time, that head's summaries (T / C
    rows of k and v) and fetched window rows with their gradients (4 · (T/C + window rows) / (T/W) / H), and
    besides them only a block's run of keys (a fused call's dK/dV, at most KEY_ROWS rows of one head), its mask
    (O(FUSED_ROWS²)) and the rows' log-sum-exp — not a whole-width copy of the window, the summaries or their
    gradients, nor a piece's gradients of the whole window.  (At T = 2048, D = 64, 8 heads, window_chunks 64, where
    the window is 1 and 2 shards: each piece an autograd node over its window and every block concatenating
    summaries and window, as before, 20.6 shards at 2 ranks and 30.6 at 4; one node per rank, all heads at once,
    11.2 and 17.8.)"""
    heads, length, chunk_size = 8, 2048, 8
    held, window = _peak_shards(world, heads, length)
    summaries = (length // chunk_size) / (length // world)
    allowed = 4 + 4 * (summaries + window) / heads + 0.5
    assert held <= allowed, f"{world} ranks: a rank holds {held:.2f} shards at its peak, allowed {allowed:.2f}"
