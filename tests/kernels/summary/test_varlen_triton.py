"""Packed variable-length sequences (``cu_seqlens``) through the summary Triton kernels (TRITON_INTERPRET=1):
the output and every gradient by name (q, k, v and the learned pooling queries) against the float64
reference run sequence by sequence, within the rule of attnrewrite.testing.numerics; the device-side
layout (summary rows, block tables) on its own; and what the kernels still refuse, by name.

Tiles of 16 are forced so that sequences start and end inside query and key blocks.  Shapes are tiny
(the interpreter is slow): each case covers something the others do not.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.summary import packed, triton_op
from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.testing.numerics import assert_within_budget

SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)

CASES = {
    # one sequence, not a multiple of the chunk: the packed launch equals the plain one's semantics
    "one_causal_learned": dict(lengths=[23], causal=True, learned=True),
    # two sequences, the first ending inside a chunk and inside a tile, GQA, mean pooling, soft-capped scores
    "two_causal_mean_softcap": dict(lengths=[19, 14], causal=True, learned=False, softcap=True),
    # three unequal sequences and an empty one, bidirectional (summaries on both sides), learned
    "three_bidirectional_learned": dict(lengths=[6, 0, 21, 10], causal=False, learned=True),
}
HQ, HKV, D, DV, CHUNK, WINDOW = 4, 2, 8, 6, 4, 1
SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_op, "launch_config", lambda kernel, *args, **kwargs: dict(SMALL_TILES))


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lengths, name):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    total = sum(lengths)
    return (make(1, HQ, total, D), make(1, HKV, total, D), make(1, HKV, total, DV), make(HKV, D),
            make(1, HQ, total, DV))


def _run(fn, xs, weights, dtype, learned):
    xs = [x.to(dtype).requires_grad_() for x in (xs if learned else xs[:3])]
    out = fn(*xs)
    return [out, *torch.autograd.grad((out * weights.to(dtype)).sum(), xs)]


@pytest.mark.parametrize("name", list(CASES))
def test_packed_kernels_match_the_reference(name, small_tiles):
    case = CASES[name]
    cu = _cu(case["lengths"])
    q, k, v, p, weights = _inputs(case["lengths"], name)
    kw = dict(is_causal=case["causal"], chunk_size=CHUNK, window_chunks=WINDOW)
    text, mod = SOFTCAP if case.get("softcap") else (None, None)

    def kernel(q, k, v, p=None):
        return ops.summary_attention(q, k, v, enable_gqa=True, summary="learned" if p is not None else "mean",
                                     summary_query=p, impl="triton", cu_seqlens=cu, score_mod=text, **kw)

    def reference(q, k, v, p=None):
        return naive_summary_attention(q, k, v, summary_query=p, cu_seqlens=cu, score_mod=mod, **kw)

    learned = case["learned"]
    got = _run(kernel, (q, k, v, p), weights, torch.float32, learned)
    plain = _run(reference, (q, k, v, p), weights, torch.float32, learned)
    exact = _run(reference, (q, k, v, p), weights, torch.float64, learned)
    for what, g, pl, ex in zip(["out", "dq", "dk", "dv", "d_summary_query"], got, plain, exact):
        assert ex.abs().max() > 1e-3, what
        assert_within_budget(g, pl, exact=ex, dtype=torch.float32, what=f"{name}: {what}")


def test_packed_differs_from_unpacked(small_tiles):
    """The kernels restart chunks at each sequence: the same tokens run as one sequence give another output
    after the first boundary (the offset is not dropped)."""
    q, k, v, _, _ = _inputs([9, 14], "boundary")
    q, k, v = q.float(), k.float(), v.float()
    kw = dict(enable_gqa=True, chunk_size=CHUNK, window_chunks=0, impl="triton")
    got = ops.summary_attention(q, k, v, cu_seqlens=_cu([9, 14]), **kw)
    joined = ops.summary_attention(q, k, v, **kw)
    torch.testing.assert_close(got[:, :, :9], joined[:, :, :9])
    assert (got[:, :, 9:] - joined[:, :, 9:]).abs().max() > 1e-2


def test_layout_on_the_device():
    """Summary rows of each sequence and the block tables: sequence s's chunk m holds tokens
    cu[s] + m·C …, and every block of every sequence is some program's, once."""
    lengths = [5, 0, 9, 4]
    pack = packed.packing(_cu(lengths), sum(lengths), 4)
    assert pack.cu_chunks.tolist() == [0, 2, 2, 5, 6, 6]
    assert pack.cu_seqlens.tolist() == [0, 5, 5, 14, 18, 18]
    index, valid = packed._slots(pack, 4, torch.device("cpu"))
    assert index[2].tolist() == [5, 6, 7, 8] and index[4][valid[4]].tolist() == [13]
    assert index[5].tolist() == [14, 15, 16, 17] and not valid[6:].any()
    seq, first = packed.block_table(pack.lengths, 4, packed.query_programs(18, 4, 4))
    blocks = sorted((s, f) for s, f in zip(seq.tolist(), first.tolist()) if s < 4)
    assert blocks == [(0, 0), (0, 4), (2, 0), (2, 4), (2, 8), (3, 0)]
    assert all(s == 4 and f == 0 for s, f in zip(seq.tolist(), first.tolist()) if s >= 4)


def test_what_the_kernels_refuse_with_packed_sequences():
    q, k, v, _, _ = _inputs([5, 4], "refuse")
    cu = _cu([5, 4])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got torch.float64"):
        ops.summary_attention(q, k, v, enable_gqa=True, cu_seqlens=cu, impl="triton")
    with pytest.raises(ValueError, match="attn_mask cannot be combined with cu_seqlens"):
        ops.summary_attention(q.float(), k.float(), v.float(), torch.ones(1, 1, 1, 9, dtype=torch.bool),
                              enable_gqa=True, cu_seqlens=cu, impl="triton")
    with pytest.raises(ValueError, match="end at the packed length 9"):
        ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True, impl="triton",
                              cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32))
