"""ALiBi-style biases rewritten to sigmoid: a bias proven to be slope_h · (j − i) (or slope_h · |j − i|) reaches
the op as per-head slopes (``position_slopes``), no [Tq, Tk] tensor; biases that are almost that but not
(a product of positions, slopes per query, clamped distances, trainable slopes) stay additive masks.  Every
model is compared with the same model written by hand with sigmoid attention."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten, record_sigmoid_calls

B, T, E, H = 2, 12, 32, 4
D = E // H
BIAS = -2.0


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _slopes() -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


#: bias(slopes, pos) -> what the model adds to its [B, H, T, T] scores; the first three are ALiBi
BIASES = {
    "alibi": lambda s, pos: s.view(1, H, 1, 1) * (pos.view(1, T) - pos.view(T, 1)).float(),
    "alibi_indexing": lambda s, pos: (pos[None, :] - pos[:, None]).to(torch.float32) * s[:, None, None],
    "alibi_symmetric": lambda s, pos: -s.view(H, 1, 1) * (pos.view(T, 1) - pos.view(1, T)).abs(),
    # almost ALiBi, but not: these must stay additive masks
    "product_of_positions": lambda s, pos: s.view(1, H, 1, 1) * (pos.view(1, T) * pos.view(T, 1)).float() / T,
    "slopes_per_query": lambda s, pos: torch.linspace(0.1, 0.5, T).view(1, 1, T, 1) * (pos.view(1, T) - pos.view(T, 1)),
    "clamped_distance": lambda s, pos: s.view(1, H, 1, 1) * (pos.view(1, T) - pos.view(T, 1)).clamp(min=-3).float(),
    # queries counted from 2: slope·(j − i − 2), the same as ALiBi under softmax, not under sigmoid: ALiBi with
    # a shift (tests/kinds/test_position_bias_offset.py)
    "offset_queries": lambda s, pos: s.view(1, H, 1, 1) * (torch.arange(end=T).view(1, T) - (pos + 2).view(T, 1)),
}
ALIBI = {"alibi": "j-i", "alibi_indexing": "j-i", "alibi_symmetric": "|j-i|"}


class Attention(nn.Module):
    """Causal self-attention with a bias of positions; ``form="sigmoid"``: the same model with sigmoid
    attention written by hand, sigmoid(s + bias + b) over the visible keys."""

    def __init__(self, bias: str, form: str = "softmax", trainable: bool = False):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.bias, self.form = BIASES[bias], form
        if trainable:
            self.slopes = nn.Parameter(_slopes())
        else:
            self.register_buffer("slopes", _slopes())

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * D**-0.5
        pos = torch.arange(T)
        s = s + self.bias(self.slopes, pos)
        causal = pos.view(1, T) <= pos.view(T, 1)
        if self.form == "softmax":
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        else:
            p = torch.sigmoid(s + BIAS).masked_fill(~causal, 0.0)
        return self.out((p @ v).transpose(1, 2).reshape(B, T, E))


class Model(nn.Module):
    def __init__(self, bias, form="softmax", trainable=False, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Attention(bias, form, trainable) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _pair(bias, trainable=False):
    torch.manual_seed(zlib.crc32(bias.encode()))
    model = Model(bias, trainable=trainable).eval()
    by_hand = Model(bias, form="sigmoid", trainable=trainable).eval()
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every call of the sigmoid op (what the rewritten graph passes it)."""
    return record_sigmoid_calls(monkeypatch)


def _rewrite(bias, op_calls, trainable=False):
    model, by_hand = _pair(bias, trainable)
    x = torch.randn(B, T, E, generator=_gen("x" + bias)) * 3
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    got = compiled(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, by_hand(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls) == 2
    return model, by_hand, compiled, x, report


@pytest.mark.parametrize("bias", sorted(ALIBI))
def test_alibi_reaches_the_op_as_slopes_not_as_a_mask(bias, op_calls):
    _, _, _, _, report = _rewrite(bias, op_calls)
    for call in op_calls:
        assert call["attn_mask"] is None, "the bias was passed as a tensor"  # causality: is_causal
        assert call["position"] == ALIBI[bias]
        sign = -1.0 if ALIBI[bias] == "|j-i|" else 1.0
        torch.testing.assert_close(call["position_slopes"].reshape(-1), sign * _slopes())
    assert all(any("ALiBi" in note for note in site.notes) for site in report.sites), report


def test_alibi_gradients_equal_the_model_written_by_hand(op_calls):
    model, by_hand, compiled, x, _ = _rewrite("alibi", op_calls)
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    want = torch.autograd.grad(by_hand(x).square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("bias", ["product_of_positions", "slopes_per_query", "clamped_distance"])
def test_a_bias_that_is_almost_alibi_stays_a_mask(bias, op_calls):
    *_, report = _rewrite(bias, op_calls)
    for call in op_calls:
        assert call.get("position") is None and call.get("position_slopes") is None
        assert call["attn_mask"] is not None and call["attn_mask"].shape[-2:] == (T, T)
    why = {"slopes_per_query": "is not one slope per head", "clamped_distance": "(clamp) is not an index operation"
           }.get(bias)
    if why is not None:  # a product added to the scores: the report says why it stays a mask
        assert all(any("stays a mask" in n and why in n for n in s.notes) for s in report.sites), report


def test_queries_counted_from_an_offset_reach_the_op_as_slopes_and_a_constant_per_head(op_calls):
    """slope·(j − i − 2): the slopes for j − i, and the shift −2·slope_h as a [1, H, 1, 1] mask (sigmoid's rows
    change with it); equal to the model written by hand (checked by ``_rewrite``)."""
    _rewrite("offset_queries", op_calls)
    for call in op_calls:
        assert call["position"] == "j-i" and call["attn_mask"].shape == (1, H, 1, 1)
        torch.testing.assert_close(call["attn_mask"].reshape(-1), -2 * _slopes())


def test_trainable_slopes_stay_a_mask_and_get_their_gradient(op_calls):
    model, by_hand, compiled, x, _ = _rewrite("alibi", op_calls, trainable=True)
    assert all(call.get("position") is None and call["attn_mask"] is not None for call in op_calls)
    got = torch.autograd.grad(compiled(x).square().sum(), [layer.slopes for layer in model.layers])
    want = torch.autograd.grad(by_hand(x).square().sum(), [layer.slopes for layer in by_hand.layers])
    for g, w in zip(got, want):
        assert_close_rel(g, w, 1e-4, "slopes")


def test_other_kinds_keep_alibi_as_a_mask():
    """Kinds that do not compute position biases (softmax here) get the term as before, and the output is exact."""
    model, _ = _pair("alibi")
    x = torch.randn(B, T, E, generator=_gen("softmax"))
    report = Report(to="softmax")
    got = compile_rewritten(model, report, to="softmax", strict=True)(x)
    assert all(s.status == "rewritten" and not any("ALiBi" in n for n in s.notes) for s in report.sites), report
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_a_wrong_position_claim_is_refused_by_the_certifier(monkeypatch):
    """The certifier is the backstop of the recogniser: a position term with a wrong coefficient (planted
    here) does not reproduce the site, which is skipped saying so, never rewritten."""
    from attnrewrite.patterns import masks

    form = masks._position_form
    monkeypatch.setattr(masks, "_position_form", lambda *a: None if form(*a) is None else (form(*a)[0], 2 * form(*a)[1]))
    # (the recogniser's own comparison of the term as a bias would refuse it first: taken out here)
    monkeypatch.setattr(masks, "_differs_as_a_bias", lambda *a: None)
    model, _ = _pair("alibi")
    x = torch.randn(B, T, E, generator=_gen("wrong"))
    report = Report(to="sigmoid")
    with pytest.warns(Warning):
        got = compile_rewritten(model, report, to="sigmoid", bias=BIAS)(x)
    assert report.sites and all(s.status == "skipped" and "does not reproduce" in s.reason for s in report.sites), report
    torch.testing.assert_close(got, model(x))


def test_sliding_window_computes_alibi_over_the_band(monkeypatch):
    """sliding_window takes ALiBi as slopes too: with a window as long as the sequence the model itself,
    with a short one the reference with the bias written out as a mask."""
    import attnrewrite.kernels.sliding_window.public as window_public
    from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention

    seen = []
    check, check_slopes = window_public._check, window_public.check_position_slopes

    def record_mask(q, k, v, attn_mask, *args):
        if not isinstance(q, FakeTensor):
            seen.append(("mask", attn_mask))
        return check(q, k, v, attn_mask, *args)

    def record_slopes(slopes, position, q, *args):
        if not isinstance(q, FakeTensor):
            seen.append(("position", position, slopes))
        return check_slopes(slopes, position, q, *args)

    monkeypatch.setattr(window_public, "_check", record_mask)
    monkeypatch.setattr(window_public, "check_position_slopes", record_slopes)
    model, _ = _pair("alibi")
    x = torch.randn(B, T, E, generator=_gen("window"))
    report = Report(to="sliding_window")
    got = compile_rewritten(model, report, to="sliding_window", strict=True, window=T)(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert [s[1] for s in seen if s[0] == "mask"] == [None, None]
    assert [s[1] for s in seen if s[0] == "position"] == ["j-i", "j-i"]

    slopes = _slopes()

    def alibi(q, k, v):
        pos = torch.arange(T)
        s = q @ k.transpose(-2, -1) * D**-0.5 + slopes.view(1, H, 1, 1) * (pos.view(1, T) - pos.view(T, 1))
        return torch.softmax(s.masked_fill(pos.view(1, T) > pos.view(T, 1), float("-inf")), dim=-1) @ v

    q, k, v = (torch.randn(B, H, T, D, generator=_gen("w" + n)) for n in "qkv")
    got = compile_rewritten(alibi, None, to="sliding_window", strict=True, window=3, sinks=1)(q, k, v)
    pos = torch.arange(T)
    bias = slopes.view(1, H, 1, 1) * (pos.view(1, T) - pos.view(T, 1))
    torch.testing.assert_close(got, naive_sliding_window_attention(q, k, v, bias, True, D**-0.5, 3, 1),
                               rtol=1e-5, atol=1e-5)


def test_alibi_under_dynamic_shapes_is_proven_once_for_every_length(op_calls):
    """The distance built from arange of a symbolic length: one graph serves both lengths, each computed from
    the slopes and equal to sigmoid attention written by hand."""
    slopes = _slopes()

    def alibi(q, k, v):
        t = q.shape[2]
        pos = torch.arange(t)
        s = q @ k.transpose(-2, -1) * D**-0.5 + slopes.view(1, H, 1, 1) * (pos[None, :] - pos[:, None])
        return torch.softmax(s.masked_fill(pos[None, :] > pos[:, None], float("-inf")), dim=-1) @ v

    report = Report(to="sigmoid")
    compiled = compile_rewritten(alibi, report, dynamic=True, to="sigmoid", strict=True, bias=BIAS)
    for t in (12, 20):
        q, k, v = (torch.randn(B, H, t, D, generator=_gen(f"dyn{t}{n}")) for n in "qkv")
        pos = torch.arange(t)
        z = q @ k.transpose(-2, -1) * D**-0.5 + slopes.view(1, H, 1, 1) * (pos[None, :] - pos[:, None]) + BIAS
        want = torch.sigmoid(z).masked_fill(pos[None, :] > pos[:, None], 0.0) @ v
        torch.testing.assert_close(compiled(q, k, v), want, rtol=1e-5, atol=1e-5)
    assert len(report.sites) == 1 and report.sites[0].status == "rewritten", report
    assert [c["position"] for c in op_calls] == ["j-i", "j-i"] and all(c["attn_mask"] is None for c in op_calls)
