"""The sliding-window torch path compiled by inductor with dynamic shapes (``torch.compile(dynamic=True)``,
as a rewritten model trains): the output and the gradients of q, k, v (and of a relative table R) equal the
same op run eagerly, at several lengths from one compiled graph.

The blockwise path read the band through ``unfold``; inductor (torch 2.13, CPU) compiled the backward of that
view with symbolic lengths into code that read out of bounds: wrong gradients in a rewritten model, a crash
when compiled alone.  The band is gathered by index now."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.ops import sliding_window_attention
from attnrewrite.testing.checks import assert_close_rel

B, HQ, HKV, D = 2, 4, 2, 8

#: name: (window, sinks, causal, the bias: None, "alibi", "relative" or "padding")
CASES = {
    "band_sinks_alibi": (5, 1, True, "alibi"),
    "wider_than_the_sequence_relative": (64, 0, True, "relative"),
    "symmetric_key_padding": (4, 2, False, "padding"),
}


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(name: str, t: int, bias: str | None):
    g = _gen(f"{name}{t}")
    q = torch.randn(B, HQ, t, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, HKV, t, D, generator=g, requires_grad=True) for _ in range(2))
    extra: dict = {}
    if bias == "alibi":
        extra = dict(position_slopes=torch.tensor([0.5, 0.25, -0.125, 0.3]), position="j-i")
    elif bias == "relative":
        extra = dict(position_slopes=torch.randn(HQ, 2 * t - 1, generator=g, requires_grad=True), position="relative")
    elif bias == "padding":
        keep = torch.ones(B, 1, 1, t, dtype=torch.bool)
        keep[1, ..., t - 3:] = False
        extra = dict(attn_mask=keep)
    return q, k, v, extra


@pytest.mark.parametrize("name", sorted(CASES))
def test_inductor_with_dynamic_shapes_gives_the_eager_gradients(name):
    window, sinks, causal, bias = CASES[name]

    def attention(q, k, v, extra):
        return sliding_window_attention(q, k, v, is_causal=causal, enable_gqa=True, window=window, sinks=sinks,
                                        impl="torch", **extra)

    compiled = torch.compile(attention, backend="inductor", dynamic=True)
    for t in (7, 13, 22):
        q, k, v, extra = _inputs(name, t, bias)
        leaves = [q, k, v] + [x for x in extra.values() if isinstance(x, torch.Tensor) and x.requires_grad]
        got, want = compiled(q, k, v, extra), attention(q, k, v, extra)
        assert_close_rel(got, want, 1e-5, f"{name} T={t}: output")
        weights = torch.randn(want.shape, generator=_gen(f"grad{name}{t}"))
        grads = torch.autograd.grad((got * weights).sum(), leaves)
        want_grads = torch.autograd.grad((want * weights).sum(), leaves)
        for label, g, w in zip(("dq", "dk", "dv", "dR"), grads, want_grads):
            assert_close_rel(g, w, 1e-5, f"{name} T={t}: {label}")


class _RelativeBiasBlock(torch.nn.Module):
    """Causal self-attention with a bucketed relative bias R[h, j − i] (distances past 3 share log-spaced buckets),
    written here, and a residual MLP."""

    def __init__(self, heads=4, dim=8, buckets=8):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv, self.out = torch.nn.Linear(heads * dim, 3 * heads * dim), torch.nn.Linear(heads * dim, heads * dim)
        self.table = torch.nn.Embedding(buckets, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(heads * dim, 64), torch.nn.GELU(), torch.nn.Linear(64, heads * dim))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        back = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0)       # i − j, 0 for the future
        far = 4 + (torch.log(back.float() / 4 + 1e-6) / 2.0 * 4).long().clamp(max=3)
        bucket = torch.where(back < 4, back, far)
        scores = q @ k.transpose(-1, -2) * self.dim**-0.5 + self.table(bucket).permute(2, 0, 1)
        scores = scores.masked_fill(torch.arange(t)[None, :] > torch.arange(t)[:, None], float("-inf"))
        x = x + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(x)


def test_a_rewritten_block_trained_under_inductor_with_dynamic_shapes_gets_the_eager_gradients():
    """The user's view of the same bug: a block with a relative bias rewritten to sliding_window (a window as long
    as the sequences: exact), compiled by inductor with dynamic=True; every parameter's gradient as eager's."""
    from attnrewrite.rewriter.report import Report
    from attnrewrite.testing.checks import compile_rewritten

    torch.manual_seed(5)
    model = _RelativeBiasBlock()
    report = Report(to="sliding_window")
    compiled = compile_rewritten(model, report, dynamic=True, to="sliding_window", window=32, strict=True,
                                 compiler="inductor")
    params = list(model.parameters())
    for t in (9, 14):
        x = torch.randn(2, t, 32, generator=_gen(f"block{t}"))
        got, want = compiled(x), model(x)
        assert_close_rel(got, want, 1e-5, f"T={t}: output")
        for (name, _), g, w in zip(model.named_parameters(), torch.autograd.grad(got.square().sum(), params),
                                   torch.autograd.grad(want.square().sum(), params)):
            assert_close_rel(g, w, 1e-4, f"T={t}: gradient of {name}")
    assert report.sites and all(s.status == "rewritten" and any("R[h, j − i]" in n for n in s.notes)
                                for s in report.sites), report
