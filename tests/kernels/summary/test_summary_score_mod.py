"""Score modifications in summary attention: the torch path and the Triton kernels (under TRITON_INTERPRET=1,
16-row tiles), outputs and gradients by name against the reference with the modification written as a
lambda.  The reference applies the modification to every score, the summaries' as well as the window keys',
and so do both paths.  A program with several nonlinear steps runs in the kernels too, through a generated
score function."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.summary import triton_op
from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.ops import summary_attention
from attnrewrite.testing.checks import assert_launched_with_mod, record_kernel_launches

SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)
SHIFTED_SIGMOID = ("mul 0.5; add 1.0; sigmoid; mul 4.0; add -2.0", lambda s: torch.sigmoid(s * 0.5 + 1.0) * 4.0 - 2.0)
CHAIN = ("div 2.0; tanh; mul 2.0; square", lambda s: (torch.tanh(s / 2.0) * 2.0) ** 2)  # two nonlinear steps


def _inputs(name, t=11):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize("causal,learned", [(True, False), (False, False), (True, True)])
def test_torch_path_applies_the_modification(causal, learned):
    text, mod = SOFTCAP
    q, k, v = _inputs(f"summary{causal}{learned}")
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, -3:] = False
    query = torch.randn(2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                        requires_grad=True) if learned else None
    options = dict(chunk_size=2, window_chunks=1, summary="learned" if learned else "mean", summary_query=query)
    out = summary_attention(q, k, v, valid[:, None, None], is_causal=causal, scale=0.3, enable_gqa=True,
                            impl="torch", score_mod=text, **options)
    want = naive_summary_attention(q, k, v, valid, causal, 0.3, chunk_size=2, window_chunks=1, summary_query=query,
                                   score_mod=mod)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    inputs = (q, k, v) + ((query,) if learned else ())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got, expected = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad)
    for name, g, w in zip(("dq", "dk", "dv", "dquery"), got, expected):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    plain = naive_summary_attention(q, k, v, valid, causal, 0.3, chunk_size=2, window_chunks=1, summary_query=query)
    assert (plain - want).abs().max() > 1e-3


@pytest.mark.parametrize("program,causal,learned,length,chunk", [
    (SOFTCAP, True, True, 37, 4),             # GQA, learned pooling, padding
    (SHIFTED_SIGMOID, False, False, 38, 2),   # bidirectional: summaries on both sides, two summary tiles
    (CHAIN, True, False, 21, 4),              # tanh then square: a generated score function
], ids=["softcap_causal_learned", "sigmoid_bidirectional", "chain_causal"])
def test_triton_kernels_apply_the_modification(program, causal, learned, length, chunk, monkeypatch):
    if not triton_op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    monkeypatch.setattr(triton_op, "launch_config", lambda *a, **kw: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                          num_stages=2))
    launches = record_kernel_launches(monkeypatch)
    text, mod = program
    q, k, v = _inputs(f"kernels{text}{causal}", length)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, 5:7] = False
    valid[1, -3:] = False
    query = torch.randn(2, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64,
                        requires_grad=True) if learned else None
    options = dict(chunk_size=chunk, window_chunks=1)
    want = naive_summary_attention(q, k, v, valid, causal, 0.3, summary_query=query, score_mod=mod, **options)
    inputs = (q, k, v) + ((query,) if learned else ())
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=want.dtype)
    expected = torch.autograd.grad(want, inputs, grad)
    leaves = [x.detach().float().requires_grad_() for x in inputs]
    out = summary_attention(*leaves[:3], valid[:, None, None], is_causal=causal, scale=0.3, enable_gqa=True,
                            impl="triton", score_mod=text, summary="learned" if learned else "mean",
                            summary_query=leaves[3] if learned else None, **options)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out, leaves, grad.float())
    for name, g, w in zip(("dq", "dk", "dv", "dquery"), got, expected):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    plain = naive_summary_attention(q, k, v, valid, causal, 0.3, summary_query=query, **options)
    assert (plain - want).abs().max() > 1e-2
    assert_launched_with_mod(launches, {"summary_fwd_kernel", "summary_bwd_dq_kernel", "summary_bwd_dkdv_kernel"},
                             text, generated=program is CHAIN)


def test_auto_on_the_cpu_runs_a_chain_on_the_torch_path(monkeypatch):
    launches = record_kernel_launches(monkeypatch)
    q, k, v = (x.detach().float() for x in _inputs("refuse"))
    out = summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1, score_mod=CHAIN[0])
    want = naive_summary_attention(q, k, v, None, True, None, chunk_size=2, window_chunks=1, score_mod=CHAIN[1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert launches == []


def test_decoding_through_the_cache_with_the_modification_equals_the_op(monkeypatch):
    """A decoding step runs the site's own code — its soft-cap included — over the keys SummaryCache returns
    (window keys and summaries): the op with the modification must give the same rows."""
    from attnrewrite.decode.summary import SummaryLayer
    from attnrewrite.testing import caches

    text, mod = SOFTCAP

    def capped_attend(q, keys, values, visible):
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = mod((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, -1) @ values

    monkeypatch.setattr(caches, "attend_returned", capped_attend)
    q, k, v = (x * 2 for x in caches.random_qkv(17))
    want = summary_attention(q, k, v, enable_gqa=True, chunk_size=3, window_chunks=1, score_mod=text)
    layer = SummaryLayer(3, 1, None, max_seq_len=17)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    torch.testing.assert_close(caches.through_layer(layer, q, k, v, [5, 1, 1, 7, 3]), want, rtol=0, atol=1e-12)
