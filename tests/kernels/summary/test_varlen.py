"""Packed variable-length sequences (``cu_seqlens``) in summary attention: a packed call equals each
sequence run alone (outputs and gradients of q, k, v and the learned pooling queries), its chunks are
counted from each sequence's start, bad ``cu_seqlens`` are refused by name, and ``impl="triton"`` runs the
kernels on them (their numerics: test_varlen_triton.py)."""

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.summary import chunked
from attnrewrite.kernels.summary.reference import naive_summary_attention

HQ, HKV, D, DV = 4, 2, 8, 6
LENGTHS = [5, 1, 0, 11, 8, 3]  # not multiples of the chunk, a single token, an empty sequence


def _packed(lengths, seed: str, grad=True):
    g = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    total = sum(lengths)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    return make(1, HQ, total, D), make(1, HKV, total, D), make(1, HKV, total, DV), make(HKV, D), cu


def _options(learned, p, causal=True, chunk=3, window=1):
    return dict(is_causal=causal, enable_gqa=True, chunk_size=chunk, window_chunks=window,
                summary="learned" if learned else "mean", summary_query=p if learned else None)


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_equals_each_sequence_alone(learned, causal, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 40 * 8)  # several query blocks in the longer sequences
    q, k, v, p, cu = _packed(LENGTHS, f"varlen-{learned}-{causal}")
    kw = _options(learned, p, causal)
    packed = ops.summary_attention(q, k, v, cu_seqlens=cu, **kw)
    grad_out = torch.randn(packed.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(packed, (q, k, v, p) if learned else (q, k, v), grad_out)

    alone_out, alone_grads = [], [torch.zeros_like(x) for x in grads]
    starts = cu.tolist()
    for a, b in zip(starts, starts[1:]):
        if b == a:
            continue
        out = ops.summary_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **kw)
        alone_out.append(out)
        g = torch.autograd.grad(out, (q, k, v, p) if learned else (q, k, v), grad_out[:, :, a:b])
        for acc, x in zip(alone_grads, g):
            acc += x
    torch.testing.assert_close(packed, torch.cat(alone_out, dim=2), rtol=0, atol=1e-13)
    for name, got, want in zip("qkvp", grads, alone_grads):
        assert want.abs().max() > 1e-3, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("learned", [False, True])
def test_packed_equals_reference(learned):
    """Against the reference's own loop over sequences; and chunks restart at each sequence (the
    same tokens unpacked, with chunks counted across the boundary, differ)."""
    q, k, v, p, cu = _packed([7, 1, 10], f"ref-{learned}", grad=False)
    kw = _options(learned, p, chunk=4, window=0)
    got = ops.summary_attention(q, k, v, cu_seqlens=cu, **kw)
    want = naive_summary_attention(q, k, v, chunk_size=4, window_chunks=0, summary_query=kw["summary_query"],
                                   cu_seqlens=cu)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    unpacked = ops.summary_attention(q, k, v, **kw)
    assert (unpacked[:, :, 8:] - got[:, :, 8:]).abs().max() > 1e-3


def test_int64_cu_seqlens_and_one_sequence():
    q, k, v, _, _ = _packed([9], "one", grad=False)
    cu = torch.tensor([0, 9], dtype=torch.int64)
    torch.testing.assert_close(ops.summary_attention(q, k, v, cu_seqlens=cu, **_options(False, None)),
                               ops.summary_attention(q, k, v, **_options(False, None)), rtol=0, atol=0)


def test_auto_on_the_cpu_takes_the_torch_path_and_triton_runs_the_kernels(monkeypatch):
    """``"auto"`` runs the torch path on the CPU; ``"triton"`` runs the kernels with packed sequences (their
    numerics: test_varlen_triton.py), never the torch path."""
    from attnrewrite.kernels.summary import triton_op

    q, k, v, _, cu = _packed([5, 4], "impl", grad=False)
    q, k, v = (x.float() for x in (q, k, v))
    auto = ops.summary_attention(q, k, v, cu_seqlens=cu, impl="auto", **_options(False, None))
    torch.testing.assert_close(auto, ops.summary_attention(q, k, v, cu_seqlens=cu, impl="torch",
                                                           **_options(False, None)))
    calls = []
    real = triton_op.summary_attention_triton
    monkeypatch.setattr(triton_op, "summary_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kernels = ops.summary_attention(q, k, v, cu_seqlens=cu, impl="triton", **_options(False, None))
    assert calls == [1]
    torch.testing.assert_close(kernels, auto, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cu,error,match", [
    ([0, 5, 9], ValueError, r"end at the packed length 10"),
    ([1, 5, 10], ValueError, r"start at 0"),
    ([0, 6, 5, 10], ValueError, r"never decrease"),
    ([[0, 10]], ValueError, r"cu_seqlens must be 1-D"),
    ([0], ValueError, r"cu_seqlens must be 1-D"),
])
def test_bad_cu_seqlens_refused_by_name(cu, error, match):
    q, k, v, _, _ = _packed([10], "bad", grad=False)
    with pytest.raises(error, match=match):
        ops.summary_attention(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), **_options(False, None))


def test_bad_cu_seqlens_type_batch_and_mask_refused():
    q, k, v, _, cu = _packed([4, 6], "bad2", grad=False)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64"):
        ops.summary_attention(q, k, v, cu_seqlens=cu.float(), **_options(False, None))
    with pytest.raises(ValueError, match="need batch 1"):
        ops.summary_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                              cu_seqlens=cu, **_options(False, None))
    with pytest.raises(ValueError, match="attn_mask cannot be combined with cu_seqlens"):
        ops.summary_attention(q, k, v, torch.ones(1, 1, 1, 10, dtype=torch.bool), cu_seqlens=cu,
                              **_options(False, None))


def test_opcheck_packed():
    q, k, v, p, cu = _packed([5, 0, 7], "opcheck")
    for summary_query in (None, p):
        args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_())
        kwargs = dict(is_causal=True, enable_gqa=True, chunk_size=3, window_chunks=1,
                      summary="mean" if summary_query is None else "learned",
                      summary_query=None if summary_query is None else summary_query.detach().requires_grad_(),
                      cu_seqlens=cu)
        torch.library.opcheck(torch.ops.attnrewrite.summary_attention_torch.default, args, kwargs)


def test_compiles_with_packed_sequences():
    q, k, v, _, cu = _packed([5, 7], "compile")
    kw = _options(False, None)
    fn = torch.compile(lambda q, k, v, cu: ops.summary_attention(q, k, v, cu_seqlens=cu, **kw), backend="aot_eager",
                       fullgraph=True)
    got = fn(q, k, v, cu)
    torch.testing.assert_close(got, ops.summary_attention(q, k, v, cu_seqlens=cu, **kw))
    got.sum().backward()
    assert q.grad is not None and q.grad.abs().max() > 0
