"""The certifier checks the scores, not only the softmax, for kinds that are not shift-invariant.

Softmax ignores a constant added to one query's scores, so comparing softmax outputs cannot tell a bias
b(i, j) from b(i, j) + c(i).  A spec off by such a per-query term is certified by the output probes, and
sigmoid (each score normalised on its own) would then silently compute sigmoid(s + b − c(i)).  Certification
for a kind with ``shift_invariant=False`` therefore also runs score probes (the site's softmax and the
canonical form's both replaced by elu + 1, ``certify.shift_sensitive``).

Planted bugs (a matcher or resolver whose bias is off by a per-query term, the ALiBi recogniser with its
own check removed and the shift dropped) must be refused for sigmoid with that reason, and still rewritten
for the exact kind (for which the spec is right).  Unplanted spellings with per-query terms (a learned row
bias, BLOOM's ALiBi over keys only, T5 buckets plus a row term, an additive causal mask with a row shift, a
softmax written out with a per-row stabiliser) are rewritten to sigmoid and equal sigmoid attention written
by hand on the scores the site's softmax normalises.

What "the scores" are, decided here: the input of the softmax, or x for a softmax written out as
exp(x − m) / Σ exp(x − m) (m, constant along the keys, is the stabiliser of that spelling, not a score
term).  ``softmax(s − s.amax(-1, keepdim=True))`` reuses the scores in a reduction, which the matcher does
not read: it is skipped for every kind, with that reason — never rewritten with a guess.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from attnrewrite.patterns import masks
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T, E, H = 2, 9, 32, 4
D = E // H
BIAS = -2.0  # sigmoid's b


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _slopes() -> torch.Tensor:
    return torch.tensor([2.0 ** (-4.0 * (h + 1) / H) for h in range(H)])


def _back(t: int) -> torch.Tensor:
    """T5-style buckets of i − j: exact up to 7, then 7 (the future clamps to 0)."""
    return (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).clamp(max=7)


#: name: the scores the softmax normalises, from s = q·kᵀ/√d (module m, length t), before the causal mask
SPELLINGS = {
    "learned_row": lambda m, s, t: s + m.row[:t, None],
    "relative_plus_query_position": lambda m, s, t: s + m.table(_back(t)).permute(2, 0, 1) + 0.1 * torch.arange(t)[:, None],
    "t5_plus_learned_row": lambda m, s, t: s + m.table(_back(t)).permute(2, 0, 1) + m.row[:t, None],
    "bloom_alibi_over_keys": lambda m, s, t: s + m.slopes[:, None, None] * torch.arange(t)[None, None, :],
    "alibi_plus_query_constant": lambda m, s, t: (s + m.slopes[:, None, None] * (torch.arange(t)[None, :]
                                                                                 - torch.arange(t)[:, None])
                                                  + 0.3 * torch.arange(t)[:, None]),
    "additive_causal_mask_with_a_row_shift": lambda m, s, t: s + (torch.where(
        torch.arange(t)[None, :] <= torch.arange(t)[:, None], 0.0, float("-inf")) + 0.5 * torch.arange(t)[:, None]),
}


class Block(nn.Module):
    """Causal attention with one of :data:`SPELLINGS`; ``normalise``: ``"softmax"``, ``"written_out"``
    (exp(x − m) / Σ exp(x − m), m the row max, or ``"written_out_row"``: m a learned per-row value),
    ``"stable"`` (softmax(x − amax(x))), or ``"sigmoid"``: the same model with sigmoid attention written by hand,
    sigmoid(x + b) on the visible keys (x the scores as the module docstring defines them)."""

    def __init__(self, spelling="learned_row", normalise="softmax", sdpa=False):
        super().__init__()
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.table = nn.Embedding(8, H)
        self.row = nn.Parameter(torch.randn(16))
        self.register_buffer("slopes", _slopes())
        self.spelling, self.normalise, self.sdpa = spelling, normalise, sdpa

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).view(B, t, 3, H, D).permute(2, 0, 3, 1, 4)     # [B, H, T, D] each
        visible = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        if self.sdpa and self.normalise != "sigmoid":  # the bias as SDPA's float mask (scores: q·kᵀ/√d + mask)
            bias = SPELLINGS[self.spelling](self, torch.zeros(1, 1, t, t), t).masked_fill(~visible, float("-inf"))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.o(out.transpose(1, 2).reshape(B, t, E))
        s = SPELLINGS[self.spelling](self, q @ k.transpose(-2, -1) * D**-0.5, t).masked_fill(~visible, float("-inf"))
        if self.normalise == "softmax":
            p = s.softmax(-1)
        elif self.normalise == "stable":
            p = (s - s.amax(-1, keepdim=True)).softmax(-1)
        elif self.normalise in ("written_out", "written_out_row"):
            m = s.amax(-1, keepdim=True) if self.normalise == "written_out" else self.row[:t, None]
            e = torch.exp(s - m)
            p = e / e.sum(-1, keepdim=True)
        else:
            p = torch.sigmoid(s + BIAS).masked_fill(~visible, 0.0)
        return self.o((p @ v).transpose(1, 2).reshape(B, t, E))


def _pair(spelling, normalise="softmax", sdpa=False):
    torch.manual_seed(zlib.crc32(f"{spelling}{normalise}{sdpa}".encode()))
    model, by_hand = Block(spelling, normalise, sdpa), Block(spelling, "sigmoid")
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


def _x(name: str) -> torch.Tensor:
    return torch.randn(B, T, E, generator=_gen(name))


def _sigmoid_equals_by_hand(model, by_hand, name):
    """``model`` rewritten to sigmoid: every site rewritten, and the output and every parameter's gradient
    are those of sigmoid attention written by hand on the site's scores."""
    torch._dynamo.reset()
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    x = _x(name)
    got, want = compiled(x), by_hand(x)
    assert report.sites and all(s.status == "rewritten" for s in report.sites), report
    assert_close_rel(got, want, 1e-5, f"{name}: output")
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad(want.square().sum(), list(by_hand.parameters()), allow_unused=True)
    for (label, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        if w is not None and float(w.abs().max()) > 0:
            assert_close_rel(g, w, 1e-4, f"{name}: gradient of {label}")
    return report


# --------------------------------------------------------------------------- unplanted: rewritten, exact


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_per_query_terms_reach_sigmoid_as_the_site_wrote_them(spelling, sdpa):
    model, by_hand = _pair(spelling, sdpa=sdpa)
    report = _sigmoid_equals_by_hand(model, by_hand, spelling)
    assert all(any("certified" in n for n in s.notes) for s in report.sites), report


@pytest.mark.parametrize("normalise", ["written_out", "written_out_row", "stable"])
def test_a_written_out_softmax_is_sigmoid_of_what_it_exponentiates_less_its_stabiliser(normalise):
    """exp(x − m) / Σ exp(x − m) is softmax(x) for every per-row m (the row max, or a learned value), and so is
    softmax(x − amax(x)) (the matcher drops that stabiliser, ``ir/capture.without_stabiliser``): the kind's
    scores are x."""
    model, by_hand = _pair("t5_plus_learned_row", normalise)
    _sigmoid_equals_by_hand(model, by_hand, normalise)


# --------------------------------------------------------------------------- planted: refused for sigmoid


def _shift_rows(bias: torch.Tensor) -> torch.Tensor:
    """The planted bug: a bias term off by c(i) = 0.25 · i, a constant per query (softmax cannot see it)."""
    return bias + 0.25 * torch.arange(bias.shape[-2], dtype=bias.dtype).view(-1, 1)


def _off_by_a_row_constant(site, spec):
    """The resolver's planted bug: its first additive term reads through :func:`_shift_rows`."""
    index, term = next((i, t) for i, t in enumerate(spec.bias) if t.kind == "add")
    graph = term.node.graph
    with graph.inserting_after(term.node):
        node = graph.call_function(_shift_rows, (term.node,))
    node.meta = {key: (value.clone() if key in ("val", "example_value") else value)
                 for key, value in term.node.meta.items()}
    return replace(spec, bias=spec.bias[:index] + (replace(term, node=node),) + spec.bias[index + 1:])


def _plant_resolver(monkeypatch, perturb):
    real = masks.resolve

    def planted(site, evaluator):
        real(site, evaluator)
        site.spec = perturb(site, site.spec)

    monkeypatch.setattr(masks, "resolve", planted)


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
@pytest.mark.parametrize("spelling", ["learned_row", "t5_plus_learned_row"])
def test_a_bias_off_by_a_constant_per_query_is_refused_for_sigmoid_and_kept_for_softmax(monkeypatch, spelling,
                                                                                       sdpa):
    """The planted spec passes the output probes (softmax cannot see c(i)): the exact kind rewrites it and
    equals the model; sigmoid refuses it on the score probes, and the compiled model is the model."""
    _plant_resolver(monkeypatch, _off_by_a_row_constant)
    model, _ = _pair(spelling, sdpa=sdpa)
    x = _x(f"planted{spelling}")
    for kind in ("softmax", "sigmoid"):
        torch._dynamo.reset()
        report = Report(to=kind)
        got = compile_rewritten(model, report, to=kind, **({"bias": BIAS} if kind == "sigmoid" else {}))(x)
        assert_close_rel(got, model(x), 1e-5, f"{kind}: output")
        (site,) = report.sites
        if kind == "softmax":
            assert site.status == "rewritten", f"the exact kind refused a spec right for it:\n{report}"
        else:
            assert site.status == "skipped", f"a spec off by a constant per query was certified for sigmoid:\n{report}"
            assert "not its scores" in site.reason, site.reason


def test_offset_alibi_with_the_shift_dropped_is_refused_by_the_certifier_itself(monkeypatch):
    """Last session's bug, with the ALiBi recogniser's own check (compare the term as a bias) removed and the
    shift of queries counted from an offset dropped: slope_h · (j − i) instead of slope_h · (j − i − start), a
    constant per head and query; the score probes refuse it for sigmoid."""
    real_term = masks._position_term
    monkeypatch.setattr(masks, "_differs_as_a_bias", lambda *args: None)
    monkeypatch.setattr(masks, "_position_term",
                        lambda term, site, evaluator: (lambda taken, why: (
                            taken if taken is None else replace(taken, offset=()), why))(
                            *real_term(term, site, evaluator)))

    class Chunk(nn.Module):  # Tq = 5 new tokens against Tk = 12 keys, queries counted from 7
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(E, E), nn.Linear(E, 2 * E)
            self.register_buffer("slopes", _slopes())

        def forward(self, x, past):
            t_q, full = x.shape[1], torch.cat([past, x], dim=1)
            t_k, start = full.shape[1], full.shape[1] - x.shape[1]
            q = self.q(x).view(B, t_q, H, D).transpose(1, 2)
            k, v = self.kv(full).view(B, t_k, 2, H, D).permute(2, 0, 3, 1, 4)
            distance = torch.arange(t_k)[None, :] - torch.arange(start, start + t_q)[:, None]
            s = q @ k.transpose(-2, -1) * D**-0.5 + self.slopes[:, None, None] * distance
            return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, t_q, E)

    torch._dynamo.reset()
    torch.manual_seed(3)
    model = Chunk()
    x, past = torch.randn(B, 5, E, generator=_gen("x")), torch.randn(B, 7, E, generator=_gen("past"))
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", bias=BIAS)(x, past)
    assert_close_rel(got, model(x, past), 1e-5, "output")
    (site,) = report.sites
    assert site.status == "skipped" and "not its scores" in site.reason, report


def test_the_score_probe_normalisation_sees_a_row_constant_and_ignores_masked_scores():
    """elu + 1: 0 for −∞ and for −10⁴ and finfo.min (masks written with a large negative number), and a per-row
    constant of 1e-3 changes it by about that much (no saturation at large scores)."""
    from attnrewrite.rewriter.certify import shift_sensitive

    masked = torch.tensor([float("-inf"), -1e4, torch.finfo(torch.float64).min], dtype=torch.float64)
    assert torch.equal(shift_sensitive(masked), torch.zeros(3, dtype=torch.float64))
    s = torch.tensor([-3.0, 0.5, 40.0], dtype=torch.float64)
    change = (shift_sensitive(s + 1e-3) - shift_sensitive(s)).abs()
    assert bool((change > 1e-3 * math.exp(-3.0) * 0.9).all()), change
