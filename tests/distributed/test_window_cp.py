"""Context-parallel sliding-window attention (:mod:`attnrewrite.distributed.window`), W ranks as threads.

Each rank fetches its pieces' window rows and the sink rows; the ranks' rows and q/k/v gradients must
equal the single-process op, and a rank receives only those rows.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.distributed import layout, window
from attnrewrite.testing.threads import run_ranks

B, HQ, HKV, D = 2, 4, 2, 8


def _inputs(name: str, length: int, mask_kind: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(B, h, length, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, length - 7:] = False
    valid[0, 1] = False
    bias = torch.randn(B, 1, 1, length, generator=g, dtype=torch.float64).masked_fill(~valid[:, None, None, :],
                                                                                     float("-inf"))
    mask = {"none": None, "bool": valid[:, None, None, :], "bias": bias,
            "float": torch.zeros(B, 1, 1, length, dtype=torch.float64).masked_fill(~valid[:, None, None, :],
                                                                                   float("-inf"))}[mask_kind]
    return q, k, v, grad, mask


def _distributed(world, q, k, v, grad, mask, causal, size, sinks, score_mod=None, **extra):
    length = q.shape[-2]

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        local_mask = None if mask is None else mask.index_select(3, positions)
        args = dict(q=local[0], k=local[1], v=local[2], dropout_p=0.0, is_causal=causal, scale=None,
                    enable_gqa=True, window=size, sinks=sinks, score_mod=score_mod, **extra)
        out = window.attend(args, local_mask, rank, world, comm)
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local], comm

    results = run_ranks(world, rank_main)
    out = layout.unshard(torch.cat([r[0] for r in results], 2), 2, world)
    grads = [layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, world) for i in range(3)]
    return out, grads, [r[2] for r in results]


# window 3 stays inside a neighbour piece; 9 reaches across two pieces (pieces of 4 tokens at W = 3)
CELLS = [(causal, mask_kind, world, size, sinks) for causal in (True, False) for mask_kind in ("none", "bool")
         for world, size, sinks in ((2, 3, 0), (3, 9, 2))]
CELLS += [(True, "float", 4, 5, 1), (False, "float", 1, 4, 1), (True, "bool", 2, 40, 0)]


@pytest.mark.parametrize("causal,mask_kind,world,size,sinks", CELLS)
def test_window_cp_equals_the_whole_op(causal, mask_kind, world, size, sinks):
    length = 24
    q, k, v, grad, mask = _inputs(f"window{causal}{mask_kind}{world}{size}{sinks}", length, mask_kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.sliding_window_attention(*leaves, mask, is_causal=causal, enable_gqa=True, window=size, sinks=sinks)
    ref.backward(grad)
    out, grads, _ = _distributed(world, q, k, v, grad, mask, causal, size, sinks)
    torch.testing.assert_close(out, ref.detach())
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")


def test_window_cp_applies_the_score_modification():
    cap = "div 0.5; tanh; mul 0.5"
    q, k, v, grad, mask = _inputs("softcap", 24, "bool")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.sliding_window_attention(*leaves, mask, enable_gqa=True, window=5, sinks=1, score_mod=cap)
    ref.backward(grad)
    out, grads, _ = _distributed(3, q, k, v, grad, mask, True, 5, 1, score_mod=cap)
    torch.testing.assert_close(out, ref.detach())
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_a_rank_receives_only_its_window_and_the_sinks():
    """Forward and backward, the bytes a rank receives are its windows' and sinks' foreign rows, twice
    (the rows, then the gradients of its own rows other ranks used): far below the whole K/V."""
    world, length, size, sinks = 4, 64, 3, 2
    q, k, v, grad, _ = _inputs("probe", length, "none")
    _, _, comms = _distributed(world, q, k, v, grad, None, True, size, sinks)
    row_bytes = B * HKV * 2 * D * 8
    for rank, comm in enumerate(comms):
        held = set(layout.local_positions(rank, world, length).tolist())
        mine = [p for a, b in layout.segments(rank, world, length)
                for p in window.needed(a, b, length, size, sinks, True).tolist()]
        forward = sum(p not in held for p in mine) * row_bytes
        assert forward <= comm.received_bytes < length * row_bytes / 2, (rank, comm.received_bytes)


@pytest.mark.parametrize("causal,mask_kind,world,position", [
    (True, "bias", 3, None), (False, "bias", 4, None), (True, "bool", 4, "j-i"), (False, "none", 3, "|j-i|"),
    (True, "bias", 3, "|j-i|")])
def test_window_cp_adds_a_key_bias_and_the_position_bias(causal, mask_kind, world, position):
    """A float key bias (fetched with the window rows) and a position bias from the global positions, each
    added after the score modification as the whole op adds them."""
    cap = "div 2.0; tanh; mul 2.0"
    q, k, v, grad, mask = _inputs(f"window-bias{causal}{mask_kind}{world}{position}", 24, mask_kind)
    extra = {} if position is None else dict(position_slopes=torch.tensor([0.4, -0.3, 0.2, 0.1], dtype=torch.float64),
                                              position=position)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.sliding_window_attention(*leaves, mask, is_causal=causal, enable_gqa=True, window=5, sinks=2,
                                       score_mod=cap, **extra)
    ref.backward(grad)
    out, grads, _ = _distributed(world, q, k, v, grad, mask, causal, 5, 2, score_mod=cap, **extra)
    torch.testing.assert_close(out, ref.detach())
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")
