"""The certifier refuses specs that are only *slightly* wrong.

Each test plants a small matcher or resolver bug — a scale off by one part in 10⁴, a learned bias
of size 1e-3 forgotten, a sliding window claimed to be plain causal, one batch row's padding
forgotten, a dropout probability off by 0.01 — and asserts that certification refuses the site
with its reason, and that the compiled model still equals the original.  Reading the tolerance
constant proves nothing; these tests fail if the tolerance is loosened enough to let any of the
planted errors through, or if a probe stops exercising what it is meant to.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from attnrewrite.patterns import eager_matmul, masks
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten

T, C, H = 10, 32, 4  # T differs from the head width (8): a layout mix-up cannot pass by symmetry


def _heads(x):
    b, t, c = x.shape
    return x.view(b, t, H, c // H).transpose(1, 2)


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)

    def qkv_heads(self, x):
        return (_heads(t) for t in self.qkv(x).split(C, dim=-1))


class Plain(Base):
    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1) @ v


class SmallBias(Base):
    """A learned relative bias of size ~1e-3: small, but the spec must still carry it."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(1e-3 * torch.randn(H, T, T))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(C // H) + self.bias
        return torch.softmax(s, dim=-1) @ v


class SlidingWindow(Base):
    """Causal attention over the last 3 keys: inside the causal triangle, but not the triangle."""

    def __init__(self):
        super().__init__()
        i = torch.arange(T)
        self.register_buffer("band", (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~self.band, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class Padded(Base):
    def forward(self, x, keep):
        q, k, v = self.qkv_heads(x)
        s = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class Dropped(Base):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.drop(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1)) @ v


class BiasBeforeScale(SmallBias):
    """(q·kᵀ + b) / √d: the bias added before the scale must be scaled with the scores."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax((q @ k.transpose(-2, -1) + self.bias) / math.sqrt(C // H), dim=-1) @ v


class QueryDivided(Base):
    """q / c before the product: a scale of 1/c, not c."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax((q / 3.0) @ k.transpose(-2, -1), dim=-1) @ v


def _x():
    return torch.randn(2, T, C, generator=torch.Generator().manual_seed(1))


def _plant(monkeypatch, where, attribute, perturb):
    """Wrap ``where.attribute`` (a matcher or the resolver) so that its spec goes through ``perturb``."""
    real = getattr(where, attribute)

    if attribute == "match":
        def planted(anchor):
            site = real(anchor)
            site.spec = perturb(site, site.spec)
            return site
    else:
        def planted(site, evaluator):
            real(site, evaluator)
            site.spec = perturb(site, site.spec)

    monkeypatch.setattr(where, attribute, planted)


def _refused(model, *inputs, reason: str) -> None:
    report = Report()
    compiled = compile_rewritten(model, report)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=0, atol=0)
    (site,) = report.sites
    assert site.status == "skipped", f"a slightly wrong spec was certified:\n{report}"
    assert reason in (site.reason or ""), f"expected {reason!r}, got {site.reason!r}"


UNPLANTED = {  # model → what its spec must say
    "plain": (Plain, dict(causal=False, bias=[], scale=(C // H) ** -0.5)),
    "small_bias": (SmallBias, dict(causal=False, bias=["add"])),
    "sliding_window": (SlidingWindow, dict(causal=False, has_bias=True)),  # inside the triangle: not "causal"
    "padded": (Padded, dict(causal=False, bias=["keep"])),
    "dropout_eval": (Dropped, dict(dropout_p=0.0)),
    "bias_before_scale": (BiasBeforeScale, dict(bias=["add"], scale=(C // H) ** -0.5)),
    "query_divided": (QueryDivided, dict(scale=1 / 3.0)),
}


@pytest.mark.parametrize("name", sorted(UNPLANTED))
def test_the_unplanted_models_are_rewritten(name):
    """Without a planted bug every model here is rewritten with the spec its code says: the refusals
    below are the certifier's doing, and a resolver or matcher that misreads one of these spellings
    (a window called causal, a bias not scaled, q / c read as q · c) fails here by name."""
    cls, expected = UNPLANTED[name]
    model = cls().eval()
    keep = torch.ones(2, T, dtype=torch.bool)
    keep[1, -3:] = False
    inputs = (_x(), keep) if cls is Padded else (_x(),)
    report = Report()
    out = compile_rewritten(model, report)(*inputs)
    (site,) = report.sites
    assert site.status == "rewritten", report
    for key, value in expected.items():
        got = site.spec[key]
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, site.spec)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("off", [1e-4, 3e-6])
def test_a_scale_off_by_a_few_parts_in_a_million_is_refused(monkeypatch, off):
    """3e-6 moves the output by ~1.2e-6 to 2e-6 of its scale (the two probes): the tolerance (1e-6) may not
    be loosened even 2×."""
    _plant(monkeypatch, eager_matmul, "match", lambda site, spec: replace(spec, scale=spec.scale * (1 + off)))
    _refused(Plain().eval(), _x(), reason="does not reproduce the site")


def test_a_forgotten_bias_of_size_1e_3_is_refused(monkeypatch):
    _plant(monkeypatch, masks, "resolve",
           lambda site, spec: replace(spec, bias=tuple(t for t in spec.bias if t.kind != "add")))
    _refused(SmallBias().eval(), _x(), reason="does not reproduce the site")


def test_a_sliding_window_claimed_as_plain_causal_is_refused(monkeypatch):
    _plant(monkeypatch, masks, "resolve", lambda site, spec: replace(spec, bias=(), causal=True))
    _refused(SlidingWindow().eval(), _x(), reason="does not reproduce the site")


def test_padding_forgotten_in_one_batch_row_is_refused(monkeypatch):
    """The planted resolver keeps the padding mask for batch row 0 only: row 1 attends to its padding."""

    def forget_row_one(site, spec):
        (term,) = spec.bias
        graph = term.node.graph
        with graph.inserting_after(term.node):
            node = graph.call_function(_keep_row_one, (term.node,))
        node.meta = {key: (value.clone() if key in ("val", "example_value") else value)  # its own storage
                     for key, value in term.node.meta.items()}
        return replace(spec, bias=(replace(term, node=node),))

    _plant(monkeypatch, masks, "resolve", forget_row_one)
    keep = torch.ones(2, T, dtype=torch.bool)
    keep[0, -2:] = False  # the example pads only row 0: row 1 must be caught on a random probe
    _refused(Padded().eval(), _x(), keep, reason="random user inputs")


def _keep_row_one(mask: torch.Tensor) -> torch.Tensor:
    """The planted bug of the test above: batch row 1 of a keep-mask keeps every key."""
    mask = mask.clone()
    if mask.dtype == torch.bool:
        mask[1:2] = True
    else:  # an additive or drop form: row 1 masks nothing
        mask[1:2] = 0
    return mask


def test_a_dropout_probability_off_by_one_percent_is_refused(monkeypatch):
    """Certification runs with dropout off, so the probability is checked against the graph's own."""
    _plant(monkeypatch, eager_matmul, "match", lambda site, spec: replace(spec, dropout_p=spec.dropout_p + 0.01))
    _refused_in_training(Dropped().train(), reason="dropout")


def test_a_dropout_claimed_absent_in_training_is_refused(monkeypatch):
    _plant(monkeypatch, eager_matmul, "match", lambda site, spec: replace(spec, dropout_p=0.0))
    _refused_in_training(Dropped().train(), reason="dropout")


def _refused_in_training(model, reason):
    report = Report()
    compiled = compile_rewritten(model, report)
    x = _x()
    torch.manual_seed(3)
    got = compiled(x)
    torch.manual_seed(3)
    want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (site,) = report.sites
    assert site.status == "skipped", f"a wrong dropout probability was certified:\n{report}"
    assert reason in (site.reason or ""), site.reason


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_right_dropout_probability_is_certified(p):
    model = Dropped().train()
    model.drop.p = p
    report = Report()
    compile_rewritten(model, report)(_x())
    (site,) = report.sites
    assert site.status == "rewritten", report


# --------------------------------------------------------------------------- refusals of the probes themselves


class FullyMasked(Base):
    """A buffer mask that hides every key: no query row can be compared, so nothing is proven."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hidden", torch.ones(T, T, dtype=torch.bool))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(self.hidden, -1e9)
        return torch.softmax(s, dim=-1) @ v


class LogBias(Base):
    """A bias log(b) of a parameter b: finite on the example, NaN on a random probe (b < 0)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.rand(T, T) + 0.5)

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + torch.log(self.b), dim=-1) @ v


class DeepMask(Base):
    """A mask computed from an input through more ops than the certifier may evaluate."""

    def forward(self, x, m):
        for _ in range(1100):
            m = m * 1.0 + 0.0
        q, k, v = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + m[:, None, None, :], dim=-1) @ v


def test_a_site_whose_probe_rows_are_all_masked_is_refused():
    _refused(FullyMasked().eval(), _x(), reason="could not certify: every probed query row is fully masked")


def test_a_site_whose_original_is_not_finite_on_a_probe_is_refused():
    _refused(LogBias().eval(), _x(), reason="original output is not finite on probe inputs")


def test_a_mask_beyond_the_evaluation_budget_is_refused():
    _refused(DeepMask().eval(), _x(), torch.zeros(2, T), reason="could not certify: the site's masks depend on too "
                                                                 "much of the graph")


def test_an_output_layout_of_the_wrong_shape_is_refused(monkeypatch):
    """A matcher that adds a layout step the site does not have is refused by shape, not by values."""

    def extra_step(anchor):
        site = real(anchor)
        site.out_steps = site.out_steps + (("transpose", 1, 2),)
        return site

    real = eager_matmul.match
    monkeypatch.setattr(eager_matmul, "match", extra_step)
    _refused(Plain().eval(), _x(), reason="canonical form has shape (2, 10, 4, 8), site output torch.Size([2, 4, 10, 8])")


# --------------------------------------------------------------------------- one proof per identical site only


class TwoSites(nn.Module):
    """Two attention layers alike in structure, differing in one constant: a scale, or a buffer mask."""

    def __init__(self, second_scale: float, second_mask: torch.Tensor):
        super().__init__()
        self.first, self.second = Base(), Base()
        i = torch.arange(T)
        self.register_buffer("causal", i[None, :] <= i[:, None])
        self.register_buffer("other", second_mask)
        self.scales = (1 / math.sqrt(C // H), second_scale)
        self.keyword = False  # the scale as a keyword argument: torch.mul(s, other=scale)

    def forward(self, x):
        out = []
        for layer, mask, scale in ((self.first, self.causal, self.scales[0]), (self.second, self.other, self.scales[1])):
            q, k, v = layer.qkv_heads(x)
            s = torch.mul(q @ k.transpose(-2, -1), other=scale) if self.keyword else q @ k.transpose(-2, -1) * scale
            s = s.masked_fill(~mask, float("-inf"))
            out.append(torch.softmax(s, dim=-1) @ v)
        return out[0] + out[1]


def _band(width):
    i = torch.arange(T)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - width)


def _two_site_report(model, monkeypatch, bug):
    """Plant ``bug`` (a resolver bug: the spec of every site made like the first's) and compile."""
    real = masks.resolve

    def planted(site, evaluator):
        real(site, evaluator)
        site.spec = bug(site.spec)

    monkeypatch.setattr(masks, "resolve", planted)
    report = Report()
    x = _x()
    torch.testing.assert_close(compile_rewritten(model.eval(), report)(x), model(x), rtol=1e-5, atol=1e-6)
    return report


def test_a_site_differing_only_in_a_constant_mask_is_proven_on_its_own(monkeypatch):
    """Both sites claimed plain causal: true for the first, false for the second (a window). A
    fingerprint that ignored the buffers' values would hand the first site's proof to the second."""
    report = _two_site_report(TwoSites(1 / math.sqrt(C // H), _band(3)), monkeypatch,
                              lambda spec: replace(spec, bias=(), causal=True))
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report


@pytest.mark.parametrize("keyword", [False, True])
def test_a_site_differing_only_in_its_scale_is_proven_on_its_own(monkeypatch, keyword):
    """Both sites claimed with the first's scale: a fingerprint that ignored the ops' arguments (positional
    or keyword) would hand the first site's proof to the second."""
    first = 1 / math.sqrt(C // H)
    model = TwoSites(first * 1.5, _band(T))
    model.keyword = keyword
    report = _two_site_report(model, monkeypatch, lambda spec: replace(spec, scale=first))
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report


def test_identical_sites_are_proven_once():
    """The same structure reading the same inputs: one proof, shared (the pass's cost stays linear in
    the distinct layers, not in the depth)."""
    import attnrewrite.rewriter.pipeline as pipeline

    calls = []
    real = pipeline.certify

    def counting(site, evaluator, *args, **kwargs):
        calls.append(site)
        return real(site, evaluator, *args, **kwargs)

    model = TwoSites(1 / math.sqrt(C // H), _band(T)).eval()  # band of width T: the causal triangle itself
    report = Report()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "certify", counting)
        compile_rewritten(model, report)(_x())
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"], report
    assert len(calls) == 1, f"{len(calls)} proofs for two identical sites"


def test_identical_sites_with_different_specs_are_proven_apart(monkeypatch):
    """Two identical layers, the second matched with a wrong scale (a planted matcher bug): a fingerprint
    that ignored the spec would hand the first, right, spec's proof to the second."""
    seen = []
    real = eager_matmul.match

    def second_wrong(anchor):
        site = real(anchor)
        seen.append(anchor)
        if len(seen) == 2:
            site.spec = replace(site.spec, scale=site.spec.scale * 1.5)
        return site

    monkeypatch.setattr(eager_matmul, "match", second_wrong)
    model = TwoSites(1 / math.sqrt(C // H), _band(T)).eval()
    report = Report()
    x = _x()
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report


class KeyBiased(nn.Module):
    """Two layers with the same weights, each adding a bias that reads some of its keys' features
    (``u · k`` with ``u`` selecting the features ``cut``, Transformer-XL's content-free term): the
    ``k[..., cut]`` is one of the site's own nodes, so its slice is part of what the site computes."""

    def __init__(self, first: slice, second: slice):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.second.load_state_dict(self.first.state_dict())
        self.cuts = (first, second)

    def forward(self, x):
        out = 0
        for layer, cut in zip((self.first, self.second), self.cuts):
            q, k, v = layer.qkv_heads(x)
            if cut == "sized":  # a bound computed from a size outside the site (a graph node under dynamic=True)
                cut = slice(0, x.size(1) // 5)
            s = q @ k.transpose(-2, -1) / math.sqrt(C // H) + k[..., cut].sum(-1)[:, :, None, :]
            out = out + torch.softmax(s, dim=-1) @ v
        return out


@pytest.mark.parametrize("first, second, proofs", [(slice(0, 2), slice(0, 2), 1), (slice(0, 2), slice(2, 4), 2),
                                                   ("sized", "sized", 1)], ids=["same", "other", "sized"])
def test_sites_differing_only_in_a_slice_of_their_own_nodes_are_proven_apart(first, second, proofs):
    """The sites differ in nothing but the bounds of a slice inside them: the same bounds share a proof,
    other bounds are another function and are proven on their own.  A fingerprint that could not describe
    a slice would fail on both (the sites skipped with an internal error); one that ignored its bounds would
    prove the second site by the first's proof.  ``sized``: under ``dynamic=True`` the bound is a graph node
    (``x.size(1) // 5``) outside the site, described by its value."""
    import attnrewrite.rewriter.pipeline as pipeline

    calls = []
    real = pipeline.certify

    def counting(site, evaluator, *args, **kwargs):
        calls.append(site)
        return real(site, evaluator, *args, **kwargs)

    model = KeyBiased(first, second).eval()
    report = Report()
    x = _x()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "certify", counting)
        out = compile_rewritten(model, report, dynamic=True if first == "sized" else None)(x)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"], report
    assert len(calls) == proofs, f"{len(calls)} proofs, expected {proofs}"
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


class ListOrTupleIndexed(nn.Module):
    """Two layers adding a bias ``t[index] - t[:2]`` of the keys' sums ``t`` ([B=2, H, T]), alike but for
    ``index``: the list ``[0, 1]`` picks batch rows 0 and 1 (the bias is exactly 0), the tuple ``(0, 1)`` picks
    one row of batch 0, head 1 (a bias that is not 0)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()

    def forward(self, x):
        out = 0
        for layer, index in ((self.first, [0, 1]), (self.second, (0, 1))):
            q, k, v = layer.qkv_heads(x)
            t = k.sum(-1)
            s = q @ k.transpose(-2, -1) / math.sqrt(C // H) + (t[index] - t[:2])[:, :, None, :]
            out = out + torch.softmax(s, dim=-1) @ v
        return out


def test_sites_differing_only_in_a_list_or_a_tuple_index_are_proven_apart(monkeypatch):
    """A planted resolver bug drops the bias from both specs: right for the first site (its bias is 0), wrong
    for the second.  The sites differ only in whether an index is a list or a tuple: a fingerprint that
    described both alike would hand the first site's proof to the second."""
    report = _two_site_report(ListOrTupleIndexed(), monkeypatch, lambda spec: replace(spec, bias=()))
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


# --------------------------------------------------------------------------- the dropout the graph applies


class TwiceDropped(Dropped):
    """Two dropouts in a row on the probabilities: no single probability describes the site."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.drop(self.drop(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1))) @ v


def test_two_dropouts_in_one_site_are_refused():
    """The matcher reads one probability (the last dropout's); the certifier counts the site's dropouts."""
    _refused_in_training(TwiceDropped().train(), reason="could not certify the dropout: 2 dropouts in one site")


def test_a_symbolic_dropout_probability_is_read_from_its_hint():
    """Under ``dynamic=True`` an ``nn.Dropout``'s p is a SymFloat graph input: the certifier compares the
    spec with its value, so the right probability is certified and one off by 0.01 is refused."""
    report = Report()
    compile_rewritten(Dropped().train(), report, dynamic=True)(_x())
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["dropout_p"] == pytest.approx(0.1), report


def test_a_symbolic_dropout_probability_off_by_one_percent_is_refused(monkeypatch):
    _plant(monkeypatch, eager_matmul, "match", lambda site, spec: replace(spec, dropout_p=spec.dropout_p + 0.01))
    report = Report()
    compile_rewritten(Dropped().train(), report, dynamic=True)(_x())
    (site,) = report.sites
    assert site.status == "skipped", report
    assert site.reason == "spec's dropout probability 0.11 differs from the site's 0.1", site.reason


# --------------------------------------------------------------------------- what a probe must compute, and where


class OutputScaledInPlace(Base):
    """The attention output is written in place *after* the site (``out.mul_(2)``): the write reads the
    rewritten output, so it is no reason to refuse, and a probe that ran the graph past the site's output
    would compare a doubled original with the canonical form."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1) @ v
        out.mul_(2.0)
        return out


class IntegerBias(Base):
    """An integer relative-position bias (int64 buffer) added to float scores: the canonical form must
    cast it to the probe's dtype as SDPA's additive masks are."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel", torch.randint(-2, 3, (T, T), generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + self.rel, dim=-1) @ v


class Windows(Base):
    """x [B, W, T, C]: attention inside each of W windows, q/k/v [B, W, H, T, d].  Under ``dynamic=True``
    the output's layout steps read a size from the graph (W is symbolic): the probe must look it up."""

    def forward(self, x):
        b, w, t, _ = x.shape
        q, k, v = (h.view(b, w, t, H, C // H).transpose(2, 3) for h in self.qkv(x).split(C, dim=-1))
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1) @ v


@pytest.mark.parametrize("cls, dynamic", [(OutputScaledInPlace, None), (IntegerBias, None), (Windows, True)])
def test_sites_the_probes_must_evaluate_exactly_are_rewritten(cls, dynamic):
    x = torch.randn(2, 3, T, C, generator=torch.Generator().manual_seed(1)) if cls is Windows else _x()
    model = cls().eval()
    report = Report()
    out = compile_rewritten(model, report, dynamic=dynamic)(x)
    (site,) = report.sites
    assert site.status == "rewritten", report
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


class SoftCapped(Base):
    """Gemma-2's soft-capping ``tanh(s / 5) · 5`` before a mask built in place; ``spelling`` writes the
    capping in place (its ops are the site's own: no reason to refuse) or writes the mask again after the
    scores read it (the original used the old mask, a rewrite at the output would read the new one)."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        m = torch.zeros(T, T)
        m[:, 7:] = -1e9
        s = q @ k.transpose(-2, -1) / math.sqrt(C // H)
        s = (s.div_(5.0).tanh_().mul_(5.0) if self.spelling == "in_place" else torch.tanh(s / 5.0) * 5.0) + m
        if self.spelling == "mask_written_late":
            m.fill_(-1e9)
        return torch.softmax(s, dim=-1) @ v + m[0, 0].clamp(min=0)


@pytest.mark.parametrize("spelling, reason", [
    ("plain", None),
    ("in_place", None),
    ("mask_written_late", "m, an input of the site, is written in place by fill_ after the site reads it"),
])
def test_a_score_modification_and_the_inputs_beside_it(spelling, reason):
    """The certifier's view of a site with a score modification: the modification's own nodes are not
    inputs written in the way, the mask beside it still is."""
    model = SoftCapped(spelling).eval()
    report = Report()
    out = compile_rewritten(model, report)(_x())
    torch.testing.assert_close(out, model(_x()), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.spec["score_mod"] == "tanh·mul", site.spec
    if reason is None:
        assert site.status == "rewritten", report
    else:
        assert site.status == "skipped" and site.reason.startswith(reason), site.reason


def test_a_probe_holds_few_score_sized_values_at_once(monkeypatch):
    """A probe drops each value of the site after its last reader: at long sequence lengths every
    [B, H, T, T] float64 intermediate held at once is what made certification run out of memory.  The
    soft-capped site has seven such intermediates in a row; a probe never holds more than two."""
    import attnrewrite.rewriter.pipeline as pipeline
    from attnrewrite.ir.evaluate import GraphEvaluator

    live, certifying = [], []
    compute, certify = GraphEvaluator.compute, pipeline.certify

    def counting_compute(self, node, env, *args, **kwargs):
        if certifying:
            live.append(sum(1 for value in env.values() if isinstance(value, torch.Tensor)
                            and tuple(value.shape) == (2, H, T, T)))
        return compute(self, node, env, *args, **kwargs)

    def flagged_certify(*args, **kwargs):
        certifying.append(True)
        try:
            return certify(*args, **kwargs)
        finally:
            certifying.pop()

    monkeypatch.setattr(GraphEvaluator, "compute", counting_compute)
    monkeypatch.setattr(pipeline, "certify", flagged_certify)
    report = Report()
    compile_rewritten(SoftCapped("plain").eval(), report)(_x())
    assert [s.status for s in report.sites] == ["rewritten"], report
    assert live and max(live) <= 2, f"score-sized values held at once: {max(live)}"


class SoftCappedTwice(nn.Module):
    """Two layers alike, each soft-capping its scores (``tanh(s / 5) · 5``)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()

    def forward(self, x):
        out = 0
        for layer in (self.first, self.second):
            q, k, v = layer.qkv_heads(x)
            s = torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(C // H) / 5.0) * 5.0
            out = out + torch.softmax(s, dim=-1) @ v
        return out


def test_identical_sites_with_different_score_modifications_are_proven_apart(monkeypatch):
    """A planted resolver bug drops the second site's score modification from its spec (softmax of the
    uncapped scores).  The two specs differ only in it: a fingerprint blind to it would hand the first
    site's proof to the second."""
    seen = []

    def second_uncapped(spec):
        seen.append(spec)
        return spec if len(seen) == 1 else replace(spec, score_mod=None)

    report = _two_site_report(SoftCappedTwice(), monkeypatch, second_uncapped)
    assert seen[0].score_mod is not None, "the capping is no score modification any more: the test proves nothing"
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


# --------------------------------------------------------------------------- what a proof may be shared on (mutants)


class MaskWrittenBetween(nn.Module):
    """Two layers alike but for their additive masks: the first reads a causal mask that is written in
    place (to a window of 3) *after* the first site, the second a buffer holding that window.  The first
    site's mask, as it reads it, is the causal triangle: its key must hold the value before the write, or
    the two sites (whose masks are equal at the end of the graph) would share the first one's proof."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.register_buffer("window", torch.zeros(T, T).masked_fill(~_band(3), float("-inf")))

    def forward(self, x):
        mask = torch.zeros(T, T).masked_fill(~_band(T).to(x.device), float("-inf"))  # out of place: no write
        out = []
        for layer, m in ((self.first, mask), (self.second, self.window)):
            q, k, v = layer.qkv_heads(x)
            out.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + m, dim=-1) @ v)
            if layer is self.first:
                mask.masked_fill_(~_band(3).to(x.device), float("-inf"))  # after the first site's output
        return out[0] + out[1] + mask[0, 0]


def test_a_mask_written_after_its_site_is_fingerprinted_as_the_site_reads_it(monkeypatch):
    """Both sites claimed plain causal (a planted resolver bug): true for the first, false for the
    second (a window).  The masks are equal only after the in-place write that follows the first site."""
    report = _two_site_report(MaskWrittenBetween(), monkeypatch, lambda spec: replace(spec, bias=(), causal=True))
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report


class LearnedBiases(nn.Module):
    """Two layers with the same weights, each adding its own learned bias (parameters: read by identity)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.second.load_state_dict(self.first.state_dict())
        g = torch.Generator().manual_seed(7)
        self.biases = nn.ParameterList([nn.Parameter(torch.randn(H, T, T, generator=g)) for _ in range(2)])

    def forward(self, x):
        out = 0
        for layer, bias in zip((self.first, self.second), self.biases):
            q, k, v = layer.qkv_heads(x)
            out = out + torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + bias, dim=-1) @ v
        return out


def test_sites_reading_different_learned_biases_are_proven_apart(monkeypatch):
    """A planted resolver bug gives the second site the first one's bias.  The sites differ only in which
    parameter they read: a fingerprint that described every parameter alike would hand the first site's
    proof to the second."""
    terms = []

    def first_bias(spec):
        terms.append(spec.bias)
        return replace(spec, bias=terms[0])

    report = _two_site_report(LearnedBiases(), monkeypatch, first_bias)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


class TwoBiases(nn.Module):
    """Two layers, each adding a constant bias buffer of its own; ``spelling`` picks how they differ:

    - ``bytes``: an int8 buffer of -1 and a uint8 buffer of 255 at the same places (the same bytes, other
      numbers: only the dtype tells them apart);
    - ``op``: the same float buffer, added by the first and subtracted by the second (only the op differs).
    """

    def __init__(self, spelling: str):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.spelling = spelling
        band = _band(3)
        if spelling == "bytes":
            self.register_buffer("b1", torch.where(band, 0, -1).to(torch.int8))
            self.register_buffer("b2", torch.where(band, 0, 255).to(torch.uint8))
        else:
            bias = torch.randn(T, T, generator=torch.Generator().manual_seed(11))
            self.register_buffer("b1", bias)
            self.register_buffer("b2", bias.clone())

    def forward(self, x):
        out = 0
        for layer, bias, op in ((self.first, self.b1, torch.add), (self.second, self.b2, torch.add if
                                                                      self.spelling == "bytes" else torch.sub)):
            q, k, v = layer.qkv_heads(x)
            out = out + torch.softmax(op(q @ k.transpose(-2, -1) / math.sqrt(C // H), bias), dim=-1) @ v
        return out


@pytest.mark.parametrize("spelling", ["bytes", "op"])
def test_sites_differing_only_in_a_constant_bias_dtype_or_op_are_proven_apart(monkeypatch, spelling):
    """A planted resolver bug gives the second site the first one's spec.  The sites differ only in the
    dtype of a constant (equal bytes) or in one op of their region: a fingerprint blind to either would
    hand the first site's proof to the second."""
    specs = []

    def first_spec(spec):  # (its own q, k, v: those are named by role)
        specs.append(spec)
        return replace(spec, bias=specs[0].bias, scale=specs[0].scale, causal=specs[0].causal)

    report = _two_site_report(TwoBiases(spelling), monkeypatch, first_spec)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


class SizeScaled(nn.Module):
    """Two layers scaling their scores by a size read from the graph: the batch size (2) for the first,
    the sequence length (10) for the second.  Under ``dynamic=True`` the scales are graph nodes of no
    user data (SymInts): the sites differ only in those nodes' values."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()

    def forward(self, x):
        out = 0
        for layer, dim in ((self.first, 0), (self.second, -2)):
            q, k, v = layer.qkv_heads(x)
            out = out + torch.softmax(q @ k.transpose(-2, -1) / q.size(dim) ** 0.5, dim=-1) @ v
        return out


def test_sites_differing_only_in_a_symbolic_size_are_proven_apart(monkeypatch):
    specs = []
    real = masks.resolve

    def planted(site, evaluator):
        real(site, evaluator)
        specs.append(site.spec)
        site.spec = replace(site.spec, scale=specs[0].scale, q_factors=specs[0].q_factors)

    monkeypatch.setattr(masks, "resolve", planted)
    model, x = SizeScaled().eval(), _x()
    report = Report()
    torch.testing.assert_close(compile_rewritten(model, report, dynamic=True)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


class TwoKeyBiases(nn.Module):
    """Two identical layers adding two biases computed inside the site from different features of the keys
    (``k[..., :2]`` and ``k[..., 2:4]``): both terms are nodes of the site's own region."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.second.load_state_dict(self.first.state_dict())

    def forward(self, x):
        out = 0
        for layer in (self.first, self.second):
            q, k, v = layer.qkv_heads(x)
            s = (q @ k.transpose(-2, -1) / math.sqrt(C // H) + k[..., :2].sum(-1)[:, :, None, :]
                 + k[..., 2:4].sum(-1)[:, :, None, :])
            out = out + torch.softmax(s, dim=-1) @ v
        return out


def test_sites_whose_specs_name_different_nodes_of_their_own_are_proven_apart(monkeypatch):
    """A planted resolver bug makes the second site's spec add its first bias twice.  The two specs differ
    only in which of the site's own nodes a term names: a fingerprint that numbered every node of the
    site alike would hand the first site's proof to the second."""
    seen = []

    def first_term_twice(spec):
        seen.append(spec)
        if len(seen) == 1:
            return spec
        first, second = spec.bias
        return replace(spec, bias=(first, replace(second, node=first.node, steps=first.steps)))

    report = _two_site_report(TwoKeyBiases(), monkeypatch, first_term_twice)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


class OneTokenAndTen(Base):
    """One layer applied to the first token alone (a single key: softmax is 1 whatever the scale) and to
    all ten: the two sites run the same ops on q, k, v of different shapes."""

    def forward(self, x):
        out = []
        for h in (x[:, :1], x):
            q, k, v = self.qkv_heads(h)
            out.append((torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1) @ v).sum(2))
        return out[0] + out[1]


def test_a_proof_on_one_key_is_not_shared_with_a_site_of_ten(monkeypatch):
    """Both specs given a wrong scale (a planted matcher bug): on one key any scale reproduces the site,
    so the first is rightly certified; the second, alike but for its q, k, v shapes, must be proven on
    its own and refused."""
    _plant(monkeypatch, eager_matmul, "match", lambda site, spec: replace(spec, scale=spec.scale * 1.5))
    model, x = OneTokenAndTen().eval(), _x()
    report = Report()
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert "does not reproduce the site" in report.sites[1].reason, report


class InputWrittenInTheSecondSite(nn.Module):
    """Two identical layers reading one additive mask input; ``written`` (the mask, the second layer's
    query, or its scores) is scaled in place while the second site runs (after its scores read it, before
    its output): the second site's rewrite would read the scaled value, or miss the scaling of its scores.
    Nothing but the write tells the sites' keys apart: they read the same mask node, and q, k, v are named
    by role."""

    def __init__(self, written: str):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.second.load_state_dict(self.first.state_dict())
        self.written = written

    def forward(self, x, m):
        out, mask = 0, m[:, None, None, :]  # one view, read by both sites
        for layer in (self.first, self.second):
            q, k, v = layer.qkv_heads(x)
            q = q.contiguous()  # its own storage (a view of split's output may not be written in place)
            s = q @ k.transpose(-2, -1) / math.sqrt(C // H) + mask
            if layer is self.second:
                # (the scores through a view of them: a write into s itself is made out of place before matching)
                {"mask": lambda: mask, "query": lambda: q, "scores": lambda: s[..., :],
                 "scores themselves": lambda: s}[self.written]().mul_(2.0)
            out = out + torch.softmax(s, dim=-1) @ v
        return out


@pytest.mark.parametrize("written, reason", [
    ("mask", "mask, an input of the site, is written in place by mul_ after the site reads it (s_1) and before "
             "its output"),
    ("query", "q_3, an input of the site, is written in place by mul_ after the site reads it (matmul_2) and "
              "before its output"),
    ("scores", "the site's s_1 is written in place by mul_, which is not part of the attention it matched"),
], ids=["mask", "query", "scores"])
def test_a_site_whose_input_is_written_in_the_way_does_not_share_a_proof(written, reason):
    model = InputWrittenInTheSecondSite(written).eval()
    x, m = _x(), torch.randn(2, T, generator=torch.Generator().manual_seed(2))
    report = Report()
    got = compile_rewritten(model, report)(x, m.clone())
    torch.testing.assert_close(got, model(x, m.clone()), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "skipped"], report
    assert report.sites[1].reason == reason, report



def test_scores_scaled_in_place_in_one_site_are_proven_apart():
    """``s.mul_(2.0)`` on the second site's own scores is made out of place before matching: the second
    site's scores are doubled in its spec, so the two sites are proven (and rewritten) each as itself."""
    model = InputWrittenInTheSecondSite("scores themselves").eval()
    x, m = _x(), torch.randn(2, T, generator=torch.Generator().manual_seed(2))
    report = Report()
    got = compile_rewritten(model, report)(x, m.clone())
    torch.testing.assert_close(got, model(x, m.clone()), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"], report
    first, second = (s.spec["scale"] for s in report.sites)
    assert second == pytest.approx(2 * first), (first, second)


class WrittenAfterTheSites(nn.Module):
    """Two identical layers reading one constant additive mask (the causal triangle); ``later`` is a write
    that comes after a site's output, so no site reads what it writes:

    - ``value``: each layer's v is scaled in place right after its site's output;
    - ``mask``: the mask is written in place at the end, adding a tensor ``z`` that is itself written
      between the two sites (``z[0, 0] = 1``).

    Neither site's computation depends on the write: the two keep one shared proof."""

    def __init__(self, later: str):
        super().__init__()
        self.first, self.second = Base(), Base()
        self.later = later

    def forward(self, x):
        mask = torch.zeros(T, T).masked_fill(~_band(T).to(x.device), float("-inf"))  # out of place: no write
        out = []
        for layer in (self.first, self.second):
            q, k, v = layer.qkv_heads(x)
            v = v.contiguous()  # its own storage (a view of split's output may not be written in place)
            out.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H) + mask, dim=-1) @ v)
            if self.later == "value":
                v.mul_(0.5)
            elif layer is self.first:
                z = torch.zeros(T, T)
                z[0, 0] = 1.0  # between the sites: before the second one's output
        if self.later == "mask":
            mask.add_(z)  # after both outputs
        return out[0] + out[1] + mask[0, 0]


@pytest.mark.parametrize("later", ["value", "mask"])
def test_writes_after_a_sites_output_do_not_keep_layers_from_sharing_a_proof(later):
    """Only writes a site can see (before its output) belong in its key: counting a write into its v after
    the output, or the writes that a later write into its mask reads, would give each layer a key of its
    own and prove identical layers once each (the pass's cost growing with depth)."""
    import attnrewrite.rewriter.pipeline as pipeline

    calls = []
    real = pipeline.certify

    def counting(site, evaluator, *args, **kwargs):
        calls.append(site)
        return real(site, evaluator, *args, **kwargs)

    model, x = WrittenAfterTheSites(later).eval(), _x()
    report = Report()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "certify", counting)
        got = compile_rewritten(model, report)(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"], report
    assert len(calls) == 1, f"{len(calls)} proofs for two identical sites"


class SdpaDropped(Base):
    """SDPA with its own dropout: the probability is the call's ``dropout_p``, in training."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)


class EvalThenTrainDropout(Dropped):
    """Two dropout modules on the probabilities, the first switched to eval (it does nothing): the
    site drops with the second one's probability only."""

    def __init__(self):
        super().__init__()
        self.off = nn.Dropout(0.3)

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.drop(self.off(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1))) @ v


@pytest.mark.parametrize("cls", [SdpaDropped, EvalThenTrainDropout])
def test_the_dropout_a_site_applies_in_training_is_certified(cls):
    """The certifier reads the probability the graph applies: SDPA's ``dropout_p``; a dropout in eval
    mode is none, and the scan goes on past it."""
    model = cls().train()
    if cls is EvalThenTrainDropout:
        model.off.eval()
    report = Report()
    compile_rewritten(model, report)(_x())
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["dropout_p"] == pytest.approx(0.1), report


def test_an_sdpa_dropout_probability_off_by_one_percent_is_refused(monkeypatch):
    from attnrewrite.patterns import sdpa

    _plant(monkeypatch, sdpa, "match", lambda site, spec: replace(spec, dropout_p=spec.dropout_p + 0.01))
    _refused_in_training(SdpaDropped().train(), reason="spec's dropout probability 0.11 differs from the site's 0.1")


# --------------------------------------------------------------------------- certify's decisions on given probe outcomes


W = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)  # max |want| = 2: errors are divided by 3
Z = torch.zeros(2, 2, dtype=torch.float64)
ALL, NONE = torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)
FIRST_ROW = torch.tensor([[True, True], [False, False]])
REAL, RANDOM, PERTURBED = False, "random", "perturbed"  # the probes' `randomize`, in PROBES order
EVERY_PROBE = [REAL, RANDOM, RANDOM, PERTURBED, PERTURBED, PERTURBED]
ALL_MASKED = ("could not certify: every probed query row is fully masked ({} informative probe(s) of 6: the "
              "example, random and perturbed user inputs)")
PADDING = "an additive mask taken as key padding holds values other than 0 and <= -9000 on {}"


def _off(base, delta, rows=ALL, at=(0, 0)):
    """A probe outcome (got, want, rows) whose original differs from the canonical form by ``delta`` at ``at``."""
    got = base.clone()
    got[at] += delta
    return got, base.clone(), rows


def _exact():
    return _off(W, 0.0)


def _nan_in_second_row():
    return _off(W, float("nan"), rows=FIRST_ROW, at=(1, 0))


# name: (probe outcomes in order, the last repeating; certify's (ok, reason, worst); the probes run)
SCRIPTS = {
    "exact": ([_exact()], (True, None, 0.0), [REAL, RANDOM]),
    "example_fully_masked": ([(W, W, NONE), _exact()], (True, None, 0.0), [REAL, RANDOM, RANDOM]),
    "error_at_the_tolerance": ([_off(Z, 1e-6)], (True, None, 1e-6), [REAL, RANDOM]),
    "worst_of_two": ([_off(Z, 3e-7), _off(Z, 5e-7)], (True, None, 5e-7), [REAL, RANDOM]),
    "uncompared_row_not_finite": ([_nan_in_second_row()], (True, None, 0.0), [REAL, RANDOM]),
    "error_above": ([_off(Z, 3e-7), _off(W, 1.5e-3)],
                    (False, "spec does not reproduce the site (relative error 5.00e-04 on random q, k, v and random "
                            "user inputs)", 5e-4), [REAL, RANDOM]),
    "not_finite": ([_off(Z, 3e-7), _off(W, float("nan"))], (False, "original output is not finite on probe inputs",
                                                             3e-7), [REAL, RANDOM]),
    "every_probe_fully_masked": ([(W, W, NONE)], (False, ALL_MASKED.format(0), 0.0), EVERY_PROBE),
    "one_random_informative": ([(W, W, NONE), _exact(), (W, W, NONE)], (False, ALL_MASKED.format(1), 0.0),
                               EVERY_PROBE),
    "only_the_example_informative": ([_off(Z, 3e-7), (W, W, NONE)], (False, ALL_MASKED.format(1), 3e-7), EVERY_PROBE),
    "wrong_shape": ([(W, W[:1], ALL[:1])], (False, "canonical form has shape (1, 2), site output torch.Size([2, 2])",
                                           0.0), [REAL]),
    "not_a_tensor": ([((1.0,), W, ALL)], (False, "canonical form has shape (2, 2), site output (1.0,)", 0.0), [REAL]),
}


def _raising(exc_type, message):
    from attnrewrite.ir import evaluate
    from attnrewrite.ir.spec import PADDING_GUARD

    return RuntimeError(f"x {PADDING_GUARD} y") if exc_type == "padding" else getattr(evaluate, exc_type)(message)


RAISING = {
    "closure_too_large": ([_off(Z, 3e-7), _raising("ClosureTooLarge", "more than 9 nodes feed m")],
                          (False, "could not certify: the site's masks depend on too much of the graph (more than 9 "
                                  "nodes feed m)", 3e-7), [REAL, RANDOM]),
    "unreadable_write": ([_raising("UnreadableWrite", "m is written in place by foo")],
                         (False, "could not certify: m is written in place by foo", 0.0), [REAL]),
    "padding_on_the_example": ([_raising("padding", "")], (False, PADDING.format("random q, k, v"), 0.0), [REAL]),
    "padding_on_random_inputs": ([_exact(), _raising("padding", "")], (False, PADDING.format("random user inputs"),
                                                                       0.0), [REAL, RANDOM]),
    "padding_on_perturbed_inputs": ([_exact(), (W, W, NONE), (W, W, NONE), _raising("padding", "")],
                                    (False, PADDING.format("perturbed user inputs"), 0.0),
                                    [REAL, RANDOM, RANDOM, PERTURBED]),
}


def test_certify_decides_on_its_probes_as_documented():
    """certify's own logic, on scripted probe outcomes (``_probe`` replaced inside a real compile, for the real
    site and evaluator): which probes run and in what order, the error formula and the tolerance (an error
    equal to CERTIFY_RTOL passes), the worst error returned, rows not compared, and each refusal's exact
    reason.  A RuntimeError that is not the padding guard propagates."""
    import attnrewrite.rewriter.certify as certify_mod
    import attnrewrite.rewriter.pipeline as pipeline

    results, real = {}, pipeline.certify

    def scripted(outcomes):
        calls = []

        def probe(site, evaluator, targets, randomize, scores=None):
            calls.append(randomize if scores is None else ("scores", randomize))
            outcome = outcomes[min(len(calls), len(outcomes)) - 1]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return probe, calls

    def hook(site, evaluator, *args, **kwargs):
        for name, (outcomes, _, _) in {**SCRIPTS, **RAISING}.items():
            probe, calls = scripted(outcomes)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(certify_mod, "_probe", probe)
                results[name] = certify_mod.certify(site, evaluator), calls
        for probes, outcomes in ((1, [_exact()]), (3, [_exact()]), (2, [RuntimeError("boom")])):
            probe, calls = scripted(outcomes)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(certify_mod, "_probe", probe)
                try:
                    results[f"probes={probes}"] = certify_mod.certify(site, evaluator, probes=probes), calls
                except RuntimeError as exc:
                    results["other_runtime_error"] = str(exc), calls
        # a kind that is not shift-invariant: the score probes follow the output probes, alike
        for name, outcomes in (("scores_exact", [_exact()]), ("scores_off", [_exact(), _exact(), _off(Z, 3e-7),
                                                                              _off(W, 1.5e-3)])):
            probe, calls = scripted(outcomes)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(certify_mod, "_probe", probe)
                results[name] = certify_mod.certify(site, evaluator, scores=True), calls
        return real(site, evaluator, *args, **kwargs)

    report = Report()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "certify", hook)
        compile_rewritten(Plain().eval(), report)(_x())
    assert [s.status for s in report.sites] == ["rewritten"], report
    for name, (_, (ok, reason, worst), probes) in {**SCRIPTS, **RAISING}.items():
        (got_ok, got_reason, got_worst), calls = results[name]
        assert (got_ok, got_reason) == (ok, reason), name
        assert got_worst == pytest.approx(worst, rel=1e-12, abs=0), (name, got_worst)
        assert calls == probes, (name, calls)
    assert results["probes=1"] == ((True, None, 0.0), [REAL])
    assert results["probes=3"] == ((True, None, 0.0), [REAL, RANDOM, RANDOM])
    assert results["other_runtime_error"] == ("boom", [REAL])
    both = [REAL, RANDOM, ("scores", REAL), ("scores", RANDOM)]
    assert results["scores_exact"] == ((True, None, 0.0), both)
    (ok, reason, _), calls = results["scores_off"]
    assert not ok and calls == both
    assert reason.startswith("spec reproduces the site's softmax but not its scores (relative error 5.00e-04") and (
        "on random q, k, v and random user inputs, both normalised by elu + 1" in reason), reason
