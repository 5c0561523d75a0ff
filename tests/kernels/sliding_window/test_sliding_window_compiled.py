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


def _visible(t: int, window: int, sinks: int) -> torch.Tensor:
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return ((j <= i) & (j > i - window)) | ((j < sinks) & (j <= i))


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative_table"])
def test_inductor_with_dynamic_shapes_and_dropout_gives_the_gradients_of_the_mask_it_drew(relative):
    """With dropout, the right gradient is that of the function the forward computed: the softmax times the mask
    it drew, rescaled.  v carries an identity block, so the output shows that mask (out[..., :T] is the dropped,
    rescaled probability matrix); a plain-torch reference with the same mask gives the gradients (and dR, for a
    relative table R[h, j − i + T − 1] read on the band and the sinks).

    Traced through (the opaque op took no dropout), inductor compiled this backward with symbolic lengths into
    code that was 27–136 % off, or wrote out of bounds (a double free)."""
    window, sinks, p = 5, 1, 0.3

    def attention(q, k, v, table):
        extra = {} if table is None else dict(position_slopes=table, position="relative")
        return sliding_window_attention(q, k, v, dropout_p=p, enable_gqa=True, window=window, sinks=sinks,
                                        impl="torch", **extra)

    compiled = torch.compile(attention, backend="inductor", dynamic=True)
    torch.manual_seed(12)
    for t in (7, 12, 19):
        g = _gen(f"dropout{t}")
        q = torch.randn(B, HQ, t, D, generator=g, requires_grad=True)
        k = torch.randn(B, HKV, t, D, generator=g, requires_grad=True)
        v = torch.cat([torch.eye(t).expand(B, HKV, t, t), torch.randn(B, HKV, t, D, generator=g)], -1).requires_grad_()
        table = torch.randn(HQ, 2 * t - 1, generator=g, requires_grad=True) if relative else None
        leaves = (q, k, v) + ((table,) if relative else ())
        out = compiled(q, k, v, table)
        weights = torch.randn(out.shape, generator=g)
        grads = torch.autograd.grad((out * weights).sum(), leaves)

        visible = _visible(t, window, sinks)
        kept = out[..., :t].detach() != 0                                    # [B, Hq, T, T]: the mask drawn
        dropped = 1 - kept[..., visible].float().mean()
        assert 0.15 < dropped < 0.45, f"T={t}: {dropped:.2f} of the visible weights dropped, p = {p}"
        scores = (q @ k.repeat_interleave(HQ // HKV, 1).transpose(-1, -2)) * D**-0.5
        if relative:  # R[h, j − i + T − 1]
            scores = scores + table[:, torch.arange(t)[None, :] - torch.arange(t)[:, None] + t - 1]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        want = (probs * kept / (1 - p)) @ v.repeat_interleave(HQ // HKV, 1)
        assert_close_rel(out, want, 1e-5, f"T={t}: output")
        for label, got_grad, want_grad in zip(("dq", "dk", "dv", "dR"), grads,
                                              torch.autograd.grad((want * weights).sum(), leaves)):
            assert_close_rel(got_grad, want_grad, 1e-5, f"T={t}: {label}")


def test_the_opaque_op_draws_its_dropout_mask_from_its_seed():
    """One seed, one mask (the backward recomputes the forward's from it); another seed, another mask; and a
    dropout_p > 0 without a seed is refused, naming it."""
    g = _gen("seed")
    q, k, v = (torch.randn(1, 2, 9, D, generator=g) for _ in range(3))

    def run(seed):
        return torch.ops.attnrewrite.sliding_window_blockwise(q, k, v, None, True, None, 4, 0, None, None, None,
                                                               0.5, seed)

    first, again, other = run(torch.tensor(3)), run(torch.tensor(3)), run(torch.tensor(4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    with pytest.raises(ValueError, match="seed"):
        run(None)


class _DropoutBlock(torch.nn.Module):
    """Causal self-attention with ALiBi and dropout on the attention weights (as GPT-2/BLOOM train), written here."""

    def __init__(self, heads=4, dim=8, p=0.25):
        super().__init__()
        self.heads, self.dim, self.p = heads, dim, p
        self.qkv, self.out = torch.nn.Linear(heads * dim, 3 * heads * dim), torch.nn.Linear(heads * dim, heads * dim)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(heads, 1, 1))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        distance = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).float()          # j − i
        scores = q @ k.transpose(-1, -2) * self.dim**-0.5 + self.slopes * distance
        scores = scores.masked_fill(torch.arange(t)[None, :] > torch.arange(t)[:, None], float("-inf"))
        weights = torch.nn.functional.dropout(scores.softmax(-1), self.p, training=self.training)
        return x + self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_rewritten_block_with_attention_dropout_trained_under_inductor_with_dynamic_shapes():
    """The user's view: a block with attention dropout rewritten to sliding_window and trained under inductor with
    dynamic=True gets the gradients of the rewritten graph run by aot_eager, drawing the same masks (inductor with
    fallback_random draws the op's seed as eager does); and dropout does happen (the output is not eval's)."""
    from torch._inductor import config as inductor_config

    from attnrewrite.rewriter.report import Report
    from attnrewrite.testing.checks import compile_rewritten

    torch.manual_seed(5)
    model = _DropoutBlock().train()
    reports = {name: Report(to="sliding_window") for name in ("inductor", "aot_eager")}
    compiled = {name: compile_rewritten(model, reports[name], dynamic=True, to="sliding_window", window=32,
                                        strict=True, compiler=name) for name in reports}
    params = list(model.parameters())
    with inductor_config.patch(fallback_random=True):
        for t in (7, 12, 19):
            x = torch.randn(2, t, 32, generator=_gen(f"dropout block{t}"))
            runs = {}
            for name, fn in compiled.items():
                torch.manual_seed(t)
                out = fn(x)
                runs[name] = out, torch.autograd.grad(out.square().sum(), params)
            (got, got_grads), (want, want_grads) = runs["inductor"], runs["aot_eager"]
            assert_close_rel(got, want, 1e-5, f"T={t}: output")
            for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
                assert_close_rel(g, w, 1e-4, f"T={t}: gradient of {name}")
            with torch.no_grad():
                assert (got - model.eval()(x)).abs().max() > 1e-2, f"T={t}: no dropout happened"
            model.train()
    for report in reports.values():
        assert report.sites and all(s.status == "rewritten" for s in report.sites), report
