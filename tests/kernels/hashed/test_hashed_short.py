"""Sequences shorter than the selection (default top_k 256 + window 64 + sinks 4): every visible key is
selected, so the hashed kind equals exact softmax attention.  The torch path once crashed there (its sparse
product held more entries than its dense shape)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.ops import hashed_attention


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length,batch,causal", [(1, 1, True), (5, 2, True), (16, 1, False), (33, 2, True)])
def test_a_sequence_shorter_than_the_selection_is_exact(monkeypatch, native, dtype, length, batch, causal):
    monkeypatch.setenv("ATTNREWRITE_NATIVE", native)
    gen = torch.Generator().manual_seed(length * 10 + batch)
    q = torch.randn(batch, 4, length, 16, generator=gen, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, 2, length, 16, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    out = hashed_attention(q, k, v, is_causal=causal, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, want, **tol)
    weights = torch.randn(out.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)
