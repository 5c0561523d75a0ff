"""Ring attention (softmax, sigmoid) with W ranks simulated by threads in one process.

Each thread is one rank holding its load-balanced shard; the ring's exchange is a queue per
(rank, channel), so W = 3 and 4 (where the next and the previous rank differ) run without spawning.
The rows of all ranks, put back in order, must equal the op on the whole sequence, and the q/k/v
gradients (dK/dV having travelled back to their owners) the whole op's.
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnrewrite.distributed import layout, ring

T, B, HQ, HKV, D = 24, 2, 4, 2, 8


class QueueRing:
    """The ring's exchange between threads: what rank r sends arrives in rank r + 1's box."""

    def __init__(self, rank: int, world: int, boxes: dict):
        self.rank, self.world, self.boxes = rank, world, boxes

    def start(self, tensors, channel):
        self.boxes[(self.rank + 1) % self.world, channel].put([t.detach().clone() for t in tensors])
        return lambda: self.boxes[self.rank, channel].get(timeout=60)


def _inputs(name: str, mask_kind: str):
    g = torch.Generator().manual_seed(len(name) * 31 + len(mask_kind))
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, T, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, T - 7:] = False      # right padding: whole key chunks of some ranks are masked
    valid[0, 2] = False
    if mask_kind == "allpad":  # a sequence with no key at all: rows of zeros, as the whole op gives
        valid[1] = False
    if mask_kind == "none":
        mask = None
    elif mask_kind in ("bool", "allpad"):
        mask = valid[:, None, None, :]
    else:  # a float per-key bias with -inf padding
        mask = torch.randn(B, 1, 1, T, generator=g, dtype=torch.float64).masked_fill(~valid[:, None, None, :],
                                                                                     float("-inf"))
    return q, k, v, grad, mask


def _whole(kind, bias, q, k, v, mask, causal, score_mod=None, slopes=None, position=None):
    if kind == "softmax":
        return torch.ops.attnrewrite.softmax_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
    return torch.ops.attnrewrite.sigmoid_attention(q, k, v, mask, is_causal=causal, enable_gqa=True, bias=bias,
                                                   score_mod=score_mod, position_slopes=slopes, position=position)


def _run_ranks(world, kind, bias, q, k, v, grad, mask, causal, score_mod=None, slopes=None, position=None):
    boxes = {(r, c): queue.Queue() for r in range(world) for c in ("kv", "grad")}

    def rank_main(rank):
        positions = layout.local_positions(rank, world, T)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        local_mask = None if mask is None else mask.index_select(3, positions)
        rows = None
        if kind == "sigmoid" and bias is None:
            rows = ring.sigmoid_rows(mask, T, positions, causal, q.dtype)
        spec = ring.RingSpec(kind, causal, None, True, bias, rank, world, score_mod, slopes, position)
        out = ring.ring_attention(*local, local_mask, rows, spec, QueueRing(rank, world, boxes))
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local]

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(rank_main, range(world)))
    out = layout.unshard(torch.cat([o for o, _ in results], 2), 2, world)
    grads = [layout.unshard(torch.cat([g[i] for _, g in results], 2), 2, world) for i in range(3)]
    return out, grads


def _assert_ring_equals_whole(world, kind, bias, q, k, v, grad, mask, causal, **options):
    """The ranks' rows, unsharded, and the gradients of q, k and v equal the whole op's (``options``:
    ``score_mod``, ``slopes`` with ``position``, passed to both)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _whole(kind, bias, *leaves, mask, causal, **options)
    ref.backward(grad)
    out, grads = _run_ranks(world, kind, bias, q, k, v, grad, mask, causal, **options)
    torch.testing.assert_close(out, ref.detach())
    for name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=name: f"d{n}: {m}")


CELLS = [(kind, bias, causal, mask_kind, world)
         for kind, bias in (("softmax", None), ("sigmoid", None), ("sigmoid", -1.5))
         for causal in (True, False)
         for mask_kind in ("none", "bool", "float")
         for world in (3, 4)]
CELLS += [("softmax", None, True, "bool", 1), ("sigmoid", None, True, "bool", 2)]
CELLS += [(kind, None, causal, "allpad", 3) for kind in ("softmax", "sigmoid") for causal in (True, False)]


@pytest.mark.parametrize("kind,bias,causal,mask_kind,world", CELLS)
def test_ring_equals_the_whole_op(kind, bias, causal, mask_kind, world):
    q, k, v, grad, mask = _inputs(f"{kind}{bias}{causal}", mask_kind)
    _assert_ring_equals_whole(world, kind, bias, q, k, v, grad, mask, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_sigmoid_ring_applies_the_score_modification(causal):
    """A soft-capped sigmoid site under context parallelism: the cap acts on every score of every
    block (it commutes with the split into key blocks), so the ranks' rows equal the whole op's."""
    cap = "div 0.5; tanh; mul 0.5"  # a cap low enough that dropping it changes every output
    q, k, v, grad, mask = _inputs(f"softcap{causal}", "bool")
    _assert_ring_equals_whole(3, "sigmoid", None, q, k, v, grad, mask, causal, score_mod=cap)


def test_causal_ring_skips_future_blocks_and_balances_work():
    """Causal: every rank computes the same number of query×key cells at every step (load balance),
    and in all 2W² of them together exactly the causal half plus the diagonal."""
    world, chunk = 4, 3
    total = 0
    for step in range(world):
        per_rank = []
        for rank in range(world):
            cells = 0
            for _, _, diagonal, _ in ring._pairs(rank, (rank - step) % world, world, chunk, True):
                cells += chunk * (chunk + 1) // 2 if diagonal else chunk * chunk
            per_rank.append(cells)
        assert len(set(per_rank)) == 1, (step, per_rank)
        total += sum(per_rank)
    length = 2 * world * chunk
    assert total == length * (length + 1) // 2


def test_softmax_ring_refuses_heads_without_gqa():
    q, k, v, grad, _ = _inputs("gqa", "none")
    boxes = {(0, c): queue.Queue() for c in ("kv", "grad")}
    spec = ring.RingSpec("softmax", True, None, False, None, 0, 1)
    with pytest.raises(ValueError, match="need enable_gqa=True"):
        ring.ring_attention(q, k, v, None, None, spec, QueueRing(0, 1, boxes))


class _HoldingRing(QueueRing):
    """A QueueRing that keeps weak references to the key/value blocks it delivers and, when a block's gradients
    set off, records how many delivered blocks are still alive."""

    def __init__(self, *args):
        super().__init__(*args)
        self.delivered, self.alive_at_grad = [], []

    def start(self, tensors, channel):
        if channel == "grad":
            self.alive_at_grad.append(sum(ref() is not None for ref in self.delivered))
        wait = super().start(tensors, channel)
        if channel != "kv":
            return wait

        def deliver():
            block = wait()
            self.delivered += [weakref.ref(t) for t in block]
            return block

        return deliver


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_the_backward_lets_each_block_and_its_gradient_parts_go(kind, monkeypatch):
    """Per-rank memory: a key/value block that is done is gone before its gradients travel on, and a pair's
    gradient parts are gone (added into the accumulators) before the next pair computes its own — each
    of them a copy of shard-sized tensors alive for nothing at the backward's peak."""
    world = 3
    q, k, v, grad, mask = _inputs(f"hold{kind}", "bool")
    name = f"_{kind}_block_backward"
    parts, alive_at_call = {}, []  # per rank (thread)
    original = getattr(ring, name)

    def counted(*args):
        mine = parts.setdefault(threading.get_ident(), [])
        alive_at_call.append(sum(ref() is not None for ref in mine))
        out = original(*args)
        mine.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(ring, name, counted)
    boxes = {(r, c): queue.Queue() for r in range(world) for c in ("kv", "grad")}
    rank = 1
    rings = {r: _HoldingRing(r, world, boxes) for r in range(world)}

    def rank_main(r):
        positions = layout.local_positions(r, world, T)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        rows = ring.sigmoid_rows(mask, T, positions, True, q.dtype) if kind == "sigmoid" else None
        spec = ring.RingSpec(kind, True, None, True, None, r, world)
        out = ring.ring_attention(*local, mask.index_select(3, positions), rows, spec, rings[r])
        out.backward(grad.index_select(2, positions))

    with ThreadPoolExecutor(world) as pool:
        list(pool.map(rank_main, range(world)))
    assert len(alive_at_call) > world  # several pairs per step on every rank
    assert max(alive_at_call) == 0, alive_at_call
    kv_tensors = 3  # k, v and the key mask travel together
    head_groups = HKV  # the ring runs one key/value head at a time
    assert rings[rank].alive_at_grad and max(rings[rank].alive_at_grad) == 0, rings[rank].alive_at_grad
    assert len(rings[rank].delivered) == 2 * (world - 1) * kv_tensors * head_groups  # forward and backward rings


@pytest.mark.parametrize("position,causal,mask_kind,world", [
    ("j-i", True, "float", 3), ("j-i", False, "bool", 4), ("|j-i|", True, "none", 4), ("|j-i|", False, "float", 3)])
def test_sigmoid_ring_adds_the_position_bias_of_global_positions(position, causal, mask_kind, world):
    """sigmoid's position bias (ALiBi) under context parallelism: each block's op sees local positions, the ring
    adds the chunks' global offset; the ranks' rows and gradients equal the whole op's."""
    slopes = torch.tensor([0.3, -0.2, 0.1, -0.05], dtype=torch.float64)
    q, k, v, grad, mask = _inputs(f"alibi{position}{causal}", mask_kind)
    _assert_ring_equals_whole(world, "sigmoid", None, q, k, v, grad, mask, causal, slopes=slopes, position=position)


def _float32(tensors):
    return [None if t is None else t.float() for t in tensors]


@pytest.mark.parametrize("bias,causal,world,heads", [
    (None, True, 2, (4, 2)), (None, False, 3, (4, 4)), (-1.5, True, 4, (4, 2)), (-1.5, False, 2, (4, 1)),
    (None, True, 1, (4, 4))])
def test_sigmoid_ring_in_float32_runs_the_compiled_loop_and_equals_the_whole_op(bias, causal, world, heads, one_thread,
                                                                                monkeypatch):
    """float32 on one thread without a key mask: each (query chunk, key chunk) pair runs the op's compiled loop one
    (batch, kv head) at a time, added into the ring's buffers (GQA rows folded as the loop folds them, the per-row
    b_i of bias="auto", the causal diagonal as key limits); rows and gradients equal the whole op's, within
    float32 rounding of the float64 result."""
    if not ring.sigmoid_native.forward_available():
        pytest.skip("no C compiler here: the ring runs the op")
    heads_q, heads_kv = heads
    g = torch.Generator().manual_seed(7 + world)
    q64 = torch.randn(B, heads_q, T, D, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(B, heads_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    grad64 = torch.randn(B, heads_q, T, D, generator=g, dtype=torch.float64)
    calls = []
    original = ring.sigmoid_native.sigmoid_backward
    monkeypatch.setattr(ring.sigmoid_native, "sigmoid_backward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    out, grads = _run_ranks(world, "sigmoid", bias, *_float32((q64, k64, v64, grad64)), None, causal)
    assert calls, "the compiled loop did not run"
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = _whole("sigmoid", bias, *leaves, None, causal)
    ref.backward(grad64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


class _GlooLikeRing:
    """The exchange with the memory of :class:`ring.P2PRing`: the receiving buffers are made (by the receiving
    rank) when the exchange starts, and a rank's wait also waits until what it sent has been taken."""

    def __init__(self, rank: int, world: int, boxes: dict):
        self.rank, self.world, self.boxes = rank, world, boxes

    def start(self, tensors, channel):
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        taken = threading.Event()
        self.boxes[(self.rank + 1) % self.world, channel].put((tensors, taken))

        def wait():
            theirs, their_taken = self.boxes[self.rank, channel].get(timeout=120)
            for mine, sent in zip(received, theirs):
                mine.copy_(sent)
            theirs = sent = None  # the sender's buffer is free once copied
            their_taken.set()
            assert taken.wait(120)
            return received

        return wait


def _peak_shards(kind: str, world: int, heads: int, length: int = 4096, dim: int = 32) -> float:
    """The most live tensor bytes any rank of a causal float32 ring of ``kind`` holds over its forward and
    backward (ranks as threads), in shards [1, heads, length / world, dim]; sigmoid with bias="auto"."""
    from attnrewrite.testing.memory import LiveTensorBytes

    g = torch.Generator().manual_seed(world)
    q, k, v, grad = (torch.randn(1, heads, length, dim, generator=g) for _ in range(4))
    boxes = {(r, c): queue.Queue() for r in range(world) for c in ("kv", "grad")}
    peaks = {}

    def rank_main(rank):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        local_grad = grad.index_select(2, positions)
        rows = ring.sigmoid_rows(None, length, positions, True, q.dtype) if kind == "sigmoid" else None
        spec = ring.RingSpec(kind, True, None, False, None, rank, world)
        with LiveTensorBytes() as live:
            out = ring.ring_attention(*local, None, rows, spec, _GlooLikeRing(rank, world, boxes))
            out.backward(local_grad)
            del out
        peaks[rank] = live.peak

    with ThreadPoolExecutor(world) as pool:
        list(pool.map(rank_main, range(world)))
    return max(peaks.values()) / (q.numel() * q.element_size() / world)


@pytest.mark.parametrize("world", [2, 4])
def test_sigmoid_ring_holds_its_gradients_and_the_blocks_in_flight_and_little_else(world, one_thread):
    """Per-rank memory of the sigmoid ring (float32, one thread, causal, bias="auto"), counted as live tensor bytes
    (:class:`~attnrewrite.testing.memory.LiveTensorBytes`) in units of one shard [B, H, T/W, D]: at its peak a rank
    holds its output and dQ, dK, dV (4) and, the ring running one key/value head at a time, that head's part of the
    key/value block arriving (2/H) and from 3 ranks on of the foreign block at hand (2/H), and besides them only a
    travelling piece of dK/dV and the loop's buffers for one head — not a (query chunk, key chunk) pair's output,
    gradients and recomputed forward, nor a whole second dK in transit.  (Each pair through the op: 11.1 shards at
    2 ranks and 14.6 at 4; dK/dV travelling whole: 7.0 and 9.0; all heads at once: 6.3 and 8.4.)"""
    if not ring.sigmoid_native.forward_available():
        pytest.skip("no C compiler here: the ring runs the op")
    heads = 8
    held = _peak_shards("sigmoid", world, heads)
    allowed = 4 + (2 + (2 if world > 2 else 0)) / heads + 0.5
    assert held <= allowed, f"{world} ranks: a rank holds {held:.2f} shards at its peak, allowed {allowed}"


@pytest.mark.parametrize("world", [2, 4])
def test_softmax_ring_holds_its_gradients_and_a_head_of_the_blocks_in_flight(world, one_thread):
    """Per-rank memory of the softmax ring (float32, causal), counted as live tensor bytes in units of one shard
    [B, H, T/W, D]: at its peak a rank holds its output and dQ, dK, dV (4; the single op holds those and one more
    whole tensor) and, running one key/value head at a time, only that head's part of the key/value block
    arriving (2/H), from 3 ranks on of the foreign block at hand (2/H) and of a pair's dQ/dK/dV (1.5/H), plus
    the LSE rows.  (All heads at once, as before: 7.56 shards at 2 ranks and 9.56 at 4.)"""
    heads = 8
    held = _peak_shards("softmax", world, heads)
    allowed = 4 + (2 + (2 if world > 2 else 0) + 1.5) / heads + 0.1
    assert held <= allowed, f"{world} ranks: a rank holds {held:.2f} shards at its peak, allowed {allowed:.2f}"


@pytest.mark.parametrize("kind,world", [("softmax", 1), ("softmax", 3), ("sigmoid", 2), ("sigmoid", 4)])
def test_ring_with_a_mask_per_head_equals_the_whole_op(kind, world):
    """A key mask with one row per query head ([B, Hq, 1, T]) goes round with each key/value head's group of it
    (and sigmoid's bias="auto" rows, counted per head, are cut the same way)."""
    q, k, v, grad, _ = _inputs("perhead", "none")
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(B, HQ, 1, T, generator=g) > 0.3
    keep[..., 0] = True
    mask = torch.randn(B, HQ, 1, T, generator=g, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    _assert_ring_equals_whole(world, kind, None, q, k, v, grad, mask, True)


def test_softmax_ring_leaves_a_value_head_size_of_its_own_to_the_all_gather():
    """torch's CPU flash kernel, which the softmax ring runs per block, takes one head size for q, k and v:
    with another value head size (DeepSeek-style MLA) the ring must not be chosen (the manager all-gathers
    K/V instead: tests/distributed/test_context_parallel.py, "softmax-value-head-size"); sigmoid's ring
    takes it."""
    q, k, v = (torch.zeros(B, h, T, D, dtype=torch.float64) for h in (HQ, HKV, HKV))
    assert ring.applies("softmax", q, k, v, 0.0)
    assert not ring.applies("softmax", q, k, v[..., : D // 2], 0.0)
    assert ring.applies("sigmoid", q, k, v[..., : D // 2], 0.0)
