"""ALiBi with queries counted from an offset — a chunk of a prefill or a decoding step against cached keys:
``slopes[:, None, None] * (arange(Tk)[None, :] - arange(start, start + Tq)[:, None])``, the start a Python int
or ``Tk − Tq``.  The bias is slope_h · (j − i − start): the distance part reaches the kinds as slopes, and
the shift −slope_h · start, a constant per head, is added by sigmoid (whose rows it changes) and left out by
the kinds that normalise each row with a softmax (sliding_window, hashed).  Near misses (slopes broadcast
over the queries, i + j, an offset read from a tensor, |j − i − start|) stay additive masks.  Every model is
compared with itself (the exact kind) or with the same model written by hand with sigmoid attention."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import (assert_close_rel, check_rewrite, compile_rewritten,
                                        record_sigmoid_calls)

B, E, H = 2, 32, 4
D = E // H
BIAS = -2.0


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _slopes() -> torch.Tensor:
    return torch.tensor([2.0 ** (-4.0 * (h + 1) / H) for h in range(H)])


#: per-head slopes, shaped to broadcast over [Tq, Tk] (one value per head)
SLOPES = {
    "indexing": lambda s: s[:, None, None],
    "view": lambda s: s.view(H, 1, 1),
    "unsqueeze": lambda s: s.unsqueeze(-1).unsqueeze(-1),
    "view4": lambda s: s.view(1, H, 1, 1),
}

#: the distance j − i_abs of key j and query i counted from ``start``, [Tq, Tk]
DISTANCES = {
    "arange_start": lambda t_q, t_k, start: torch.arange(t_k)[None, :] - torch.arange(start, start + t_q)[:, None],
    "negated": lambda t_q, t_k, start: -(torch.arange(start, start + t_q)[:, None] - torch.arange(t_k)[None, :]),
    "added_start": lambda t_q, t_k, start: (torch.arange(t_k).view(1, -1) - (torch.arange(t_q) + start).view(-1, 1)),
    "float_start": lambda t_q, t_k, start: (torch.arange(t_k, dtype=torch.float32)[None, :]
                                            - torch.arange(start, start + t_q, dtype=torch.float32)[:, None]),
}

#: almost ALiBi with an offset, but not: these must stay additive masks (and stay correct)
NEAR_MISSES = {
    # (1, H, 1) broadcasts against [Tq, Tk] as one slope per *query* (Tq == H below), not per head
    "slopes_over_queries": (lambda s: s.view(1, H, 1), DISTANCES["arange_start"]),
    "i_plus_j": (SLOPES["indexing"],
                 lambda t_q, t_k, start: torch.arange(t_k)[None, :] + torch.arange(start, start + t_q)[:, None]),
    "abs_with_offset": (SLOPES["view"], lambda t_q, t_k, start: -(torch.arange(t_k)[None, :]
                                                                  - torch.arange(start, start + t_q)[:, None]).abs()),
}


class Chunk(nn.Module):
    """Attention of a chunk of Tq new tokens over Tk = Tp + Tq keys (Tp cached), queries at start … start + Tq − 1.

    ``causal``: key j is visible to query i when j ≤ start + i; ``form="sigmoid"``: the same model with sigmoid
    attention written by hand, sigmoid(s + bias + b) over the visible keys (b = ``BIAS``, or −log n with
    ``auto``).  ``start="cache"`` counts the queries from Tk − Tq, ``"argument"`` from the ``start`` passed."""

    def __init__(self, slopes="indexing", distance="arange_start", start="cache", causal=True, form="softmax",
                 auto=False, spelling=None):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(E, E), nn.Linear(E, 2 * E), nn.Linear(E, E)
        self.register_buffer("slopes", _slopes())
        self.spell_slopes, self.spell_distance = spelling or (SLOPES[slopes], DISTANCES[distance])
        self.start, self.causal, self.form, self.auto = start, causal, form, auto

    def forward(self, x, past, start=None, slopes=None):
        t_q = x.shape[1]
        full = torch.cat([past, x], dim=1)
        t_k = full.shape[1]
        q = self.q(x).view(B, t_q, H, D).transpose(1, 2)                   # [B, H, Tq, D]
        k, v = self.kv(full).view(B, t_k, 2, H, D).permute(2, 0, 3, 1, 4)  # [B, H, Tk, D] each
        if self.start == "cache":
            start = t_k - t_q
        slopes = self.slopes if slopes is None else slopes
        s = q @ k.transpose(-2, -1) * D**-0.5 + self.spell_slopes(slopes) * self.spell_distance(t_q, t_k, start)
        visible = torch.arange(t_k)[None, :] <= torch.arange(start, start + t_q)[:, None]
        if not self.causal:
            visible = torch.ones_like(visible)
        if self.form == "softmax":
            p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        else:
            b = -visible.sum(-1, keepdim=True).clamp(min=1).float().log() if self.auto else BIAS
            p = torch.sigmoid(s + b).masked_fill(~visible, 0.0)
        return self.o((p @ v).transpose(1, 2).reshape(B, t_q, E))


class Model(nn.Module):
    """Two chunk-attention layers over the same cached states (each a site)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(Chunk(**kwargs) for _ in range(2))

    def forward(self, x, past, start=None, slopes=None):
        for layer in self.layers:
            x = x + layer(x, past, start, slopes)
        return x


def _pair(**kwargs):
    torch.manual_seed(zlib.crc32(repr(sorted(kwargs.items(), key=str)).encode()))
    model = Model(**kwargs)
    by_hand = Model(form="sigmoid", **kwargs)
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


def _inputs(t_q, t_p, name):
    return (torch.randn(B, t_q, E, generator=_gen("x" + name)) * 2,
            torch.randn(B, t_p, E, generator=_gen("p" + name)) * 2)


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every call of the sigmoid op (what the rewritten graph passes it)."""
    return record_sigmoid_calls(monkeypatch)


def _all_rewritten(report, alibi=True):
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    assert all(any("ALiBi" in n for n in s.notes) == alibi for s in report.sites), report


SPELLINGS = [("indexing", "arange_start", "cache"), ("view", "negated", "cache"), ("unsqueeze", "added_start", "cache"),
             ("view4", "float_start", "argument"), ("indexing", "added_start", "argument")]


@pytest.mark.parametrize("slopes,distance,start", SPELLINGS)
def test_offset_alibi_reaches_sigmoid_as_slopes_and_a_constant_per_head(slopes, distance, start, op_calls):
    """No causal mask: the op gets the slopes for j − i and the shift −slope_h · start as a [1, H, 1, 1] mask,
    and the output is sigmoid attention written by hand (forward and every parameter's gradient)."""
    model, by_hand = _pair(slopes=slopes, distance=distance, start=start, causal=False)
    x, past = _inputs(5, 7, slopes + distance)
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    got = compiled(x, past, 7)
    _all_rewritten(report)
    want = by_hand(x, past, 7)
    assert_close_rel(got, want, 1e-5, "output")
    assert len(op_calls) == 2
    for call in op_calls:
        assert call["position"] == "j-i"
        torch.testing.assert_close(call["position_slopes"].reshape(-1), _slopes())
        assert call["attn_mask"].shape == (1, H, 1, 1), "the bias was passed as a [Tq, Tk] tensor"
        torch.testing.assert_close(call["attn_mask"].reshape(-1), -7 * _slopes())
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        assert_close_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("auto", [False, True])
def test_causal_chunk_with_offset_alibi_equals_sigmoid_by_hand(auto, op_calls):
    """Causal over the cache (j ≤ start + i) with b fixed or −log n: the keep-mask and the shift reach the op
    together, masked keys still masked (bias="auto" counts the same keys)."""
    model, by_hand = _pair(causal=True, auto=auto)
    x, past = _inputs(6, 5, f"causal{auto}")
    report = Report(to="sigmoid")
    options = {} if auto else {"bias": BIAS}
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, **options)
    got = compiled(x, past)
    _all_rewritten(report)
    want = by_hand(x, past)
    assert_close_rel(got, want, 1e-5, "output")
    assert all(c["position"] == "j-i" for c in op_calls) and len(op_calls) == 2
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        assert_close_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("start", ["cache", "argument"])
def test_offset_alibi_under_dynamic_shapes_follows_the_start(start, op_calls):
    """dynamic=True: the start is a symbolic size (Tk − Tq, or an int argument); one graph serves every
    (chunk, cache) length, each step computing its own shift."""
    model, by_hand = _pair(start=start, causal=True)
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, dynamic=True, to="sigmoid", strict=True, bias=BIAS)
    for t_q, t_p in ((6, 5), (3, 9), (8, 2)):
        x, past = _inputs(t_q, t_p, f"dyn{t_q}{t_p}{start}")
        assert_close_rel(compiled(x, past, t_p), by_hand(x, past, t_p), 1e-5, f"output at {t_q}+{t_p}")
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    assert [c["position"] for c in op_calls] == ["j-i"] * 6


@pytest.mark.parametrize("slopes,distance,start", SPELLINGS[:3])
def test_exact_kind_reproduces_offset_alibi(slopes, distance, start):
    """The exact kind writes the bias out: the model itself, forward and gradients."""
    model, _ = _pair(slopes=slopes, distance=distance, start=start)
    x, past = _inputs(5, 4, "exact" + slopes)
    check_rewrite(model, dict(x=x, past=past, start=4), expected_sites=2, to="softmax", strict=True)


@pytest.mark.parametrize("miss", sorted(NEAR_MISSES))
def test_a_bias_that_is_almost_offset_alibi_stays_a_mask(miss, op_calls):
    model, by_hand = _pair(spelling=NEAR_MISSES[miss])
    x, past = _inputs(H, 5, miss)  # Tq == H: (1, H, 1) slopes broadcast over the queries
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)(x, past)
    _all_rewritten(report, alibi=False)
    assert_close_rel(got, by_hand(x, past), 1e-5, "output")
    for call in op_calls:
        assert call.get("position") is None and call["attn_mask"].shape[-2:] == (H, 5 + H)
    why = {"slopes_over_queries": "is not one slope per head", "i_plus_j": "is not c·(j − i) nor c·|j − i|",
           "abs_with_offset": "takes abs of a distance with an offset"}[miss]
    assert all(any("stays a mask" in n and why in n for n in s.notes) for s in report.sites), report


class PositionsFromATensor(nn.Module):
    """Queries at positions read from a tensor — ``cache_position`` (the distance is not made of aranges), or
    ``arange(Tq) + offset`` with a tensor offset — and slopes passed in: the bias stays a mask."""

    def __init__(self, offset_tensor: bool, form="softmax"):
        super().__init__()
        self.qkv, self.form, self.offset_tensor = nn.Linear(E, 3 * E), form, offset_tensor

    def forward(self, x, positions):
        t = x.shape[1]
        q, k, v = self.qkv(x).view(B, t, 3, H, D).permute(2, 0, 3, 1, 4)
        rows = torch.arange(t) + positions if self.offset_tensor else positions  # [Tq]
        s = q @ k.transpose(-2, -1) * D**-0.5 + _slopes()[:, None, None] * (rows[None, :] - rows[:, None])
        return torch.sigmoid(s + BIAS) @ v if self.form == "sigmoid" else torch.softmax(s, -1) @ v


@pytest.mark.parametrize("offset_tensor", [False, True])
def test_positions_read_from_a_tensor_stay_a_mask_and_follow_the_tensor(offset_tensor, op_calls):
    torch.manual_seed(3)
    model, by_hand = PositionsFromATensor(offset_tensor), PositionsFromATensor(offset_tensor, "sigmoid")
    by_hand.load_state_dict(model.state_dict())
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    x = torch.randn(B, 6, E, generator=_gen("positions"))
    for shift in (0, 5):  # the positions change between calls: the mask follows them
        positions = torch.tensor(shift) if offset_tensor else torch.tensor([0, 1, 3, 4, 7, 8]) + shift
        assert_close_rel(compiled(x, positions), by_hand(x, positions), 1e-5, f"output at {shift}")
    assert report.sites and all(s.status == "rewritten" and not any("ALiBi" in n for n in s.notes)
                                for s in report.sites), report
    assert all(c.get("position") is None and c["attn_mask"].shape[-2:] == (6, 6) for c in op_calls)


def test_slopes_passed_in_are_read_on_every_call(op_calls):
    """Slopes that are an input (not a buffer): the op reads the slopes of each call, so new slopes give the
    model's new output — never the first call's slopes baked in."""
    model, by_hand = _pair(causal=False)
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    x, past = _inputs(5, 3, "slopes in")
    for scale in (1.0, -3.0):
        slopes = _slopes().flip(0) * scale
        assert_close_rel(compiled(x, past, None, slopes), by_hand(x, past, None, slopes), 1e-5, f"slopes ×{scale}")
    _all_rewritten(report)
    torch.testing.assert_close(op_calls[-1]["position_slopes"].reshape(-1), _slopes().flip(0) * -3.0)


class SelfAttention(nn.Module):
    """Causal self-attention with ALiBi whose queries are counted from ``start`` (a Python int) and keys from 0:
    slope_h · (j − i − start), ALiBi plus a constant per row, which softmax ignores (sigmoid would not)."""

    def __init__(self, start: int):
        super().__init__()
        self.qkv, self.start = nn.Linear(E, 3 * E), start
        self.register_buffer("slopes", _slopes())

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).view(B, t, 3, H, D).permute(2, 0, 3, 1, 4)
        rows = torch.arange(self.start, self.start + t)
        s = q @ k.transpose(-2, -1) * D**-0.5 + self.slopes.view(H, 1, 1) * (torch.arange(t)[None, :] - rows[:, None])
        causal = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("kind,options", [("sliding_window", dict(window=16, sinks=0)),
                                          ("hashed", dict(top_k=16, window=2, sinks=1))])
def test_softmax_kinds_leave_the_shift_out_and_stay_exact(kind, options):
    """With a window (or a selection) covering every key the kind is exact softmax attention: equal to the model,
    the shift left out (softmax ignores it) rather than passed as a per-head mask hashed would refuse."""
    torch.manual_seed(4)
    model = SelfAttention(start=3)
    x = torch.randn(B, 10, E, generator=_gen(kind))
    report = Report(to=kind)
    got = compile_rewritten(model, report, to=kind, strict=True, **options)(x)
    assert report.sites and all(s.status == "rewritten" and any("ALiBi" in n for n in s.notes)
                                for s in report.sites), report
    want = model(x)
    assert_close_rel(got, want, 1e-5, "output")
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert_close_rel(g, w, 1e-4, "gradient")


def test_a_term_that_loses_its_shift_is_refused_before_the_certifier(monkeypatch, op_calls):
    """The certifier compares softmax outputs, blind to a constant per query row; sigmoid is not.  A position
    term whose shift is lost (planted: the recogniser's term built without its offset) is compared as a bias
    with the term it replaces, differs, and stays the mask it was: the output is still the model's."""
    from attnrewrite.patterns import masks

    real = masks.MaskTerm
    monkeypatch.setattr(masks, "MaskTerm", lambda kind, *args, offset=(), **kwargs: real(kind, *args, **kwargs))
    model, by_hand = _pair(causal=False)
    x, past = _inputs(5, 7, "lost shift")
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)(x, past)
    _all_rewritten(report, alibi=False)
    assert all(any("written out from its slopes differs" in n for n in s.notes) for s in report.sites), report
    assert all(c.get("position") is None for c in op_calls)
    assert_close_rel(got, by_hand(x, past), 1e-5, "output")
