"""Near misses: computations that look like attention but are not must stay untouched, with a reason.

Each case asserts (1) the report has no rewritten site and names the reason, (2) the compiled
graph calls no attnrewrite op, (3) outputs equal the original's.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.rewriter import certify as certify_module
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten


def _heads(x, h=4):
    b, t, c = x.shape
    return x.view(b, t, h, c // h).transpose(1, 2)


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def qkv_heads(self, x):
        return (_heads(t) for t in self.qkv(x).split(32, dim=-1))


class WrongDim(Base):
    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-2) @ v


class ValuesOnTheLeft(Base):
    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return v.transpose(-2, -1) @ p  # [B, H, D, T]: not probabilities · values


class LearnedMemory(nn.Module):
    """softmax(x Wᵀ) V with parameters W, V: a learned memory / gate, not attention over a sequence."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, 16, 32))
        self.values = nn.Parameter(torch.randn(1, 16, 32))

    def forward(self, x):
        return torch.softmax(x @ self.keys.transpose(-2, -1), dim=-1) @ self.values


class SharedQueryAcrossHeads(Base):
    """q with one head broadcast against per-head keys: heads do not pair up."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        q = q.mean(dim=1, keepdim=True)
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class FillWithZero(Base):
    """masked_fill(…, 0.0) is not a mask: the masked keys still get weight exp(0)."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = q @ k.transpose(-2, -1)
        s = s.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), 0.0)
        return torch.softmax(s, dim=-1) @ v


class MaskedThenCapped(Base):
    """A mask applied before a score modification: tanh turns the −∞ of masked keys into −1, so the
    keys are not masked any more; the spec (mask after the modification) cannot express it."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(torch.tanh(s / 30.0) * 30.0, dim=-1) @ v


class ScoresReused(Base):
    """The scores feed a non-elementwise op whose result is added back: not a function of each score."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = q @ k.transpose(-2, -1)
        return torch.softmax(s + s.mean(dim=-2, keepdim=True), dim=-1) @ v


class ScoresTransposed(Base):
    """A non-elementwise op between the product and the softmax."""

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        s = (q @ k.transpose(-2, -1)).transpose(-2, -1)
        return torch.softmax(s, dim=-1) @ v


class NoValueProduct(Base):
    def forward(self, x):
        q, k, _ = self.qkv_heads(x)
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1).sum(-1)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return torch.softmax(self.head(x), dim=-1)


CASES = {
    "wrong_softmax_dim": (WrongDim, "not the key dim"),
    "values_on_the_left": (ValuesOnTheLeft, "right operand"),
    "learned_memory": (LearnedMemory, "not a sequence from the inputs"),
    "shared_query_across_heads": (SharedQueryAcrossHeads, "do not pair up"),
    "masked_fill_zero": (FillWithZero, "not a mask value"),
    "mask_before_score_mod": (MaskedThenCapped, "before a score modification"),
    "scores_reused": (ScoresReused, "scores are reused"),
    "scores_transposed": (ScoresTransposed, "product of two activations"),  # attention not read: reported
    "no_value_product": (NoValueProduct, "never meet the values"),
    "classifier_softmax": (Classifier, "no score product"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_near_miss_stays_untouched(case):
    cls, reason = CASES[case]
    model = cls().eval()
    x = torch.randn(2, 8, 32)
    report = Report()
    compiled = compile_rewritten(model, report)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert report.sites, "the anchor should be reported"
    assert not report.rewritten, f"a near miss was rewritten:\n{report}"
    assert any(reason in (s.reason or "") for s in report.skipped), f"expected reason {reason!r}:\n{report}"


def test_certifier_rejects_a_wrong_spec(monkeypatch):
    """A matcher bug (here: a scale off by √2) is caught by certification, and the site is left alone."""
    from dataclasses import replace

    from attnrewrite.patterns import eager_matmul

    real_match = eager_matmul.match

    def wrong_match(anchor):
        site = real_match(anchor)
        site.spec = replace(site.spec, scale=site.spec.scale * math.sqrt(2))
        return site

    monkeypatch.setattr(eager_matmul, "match", wrong_match)

    class Plain(Base):
        def forward(self, x):
            q, k, v = self.qkv_heads(x)
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v

    model = Plain().eval()
    x = torch.randn(2, 8, 32)
    report = Report()
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=0, atol=0)
    (site,) = report.sites
    assert site.status == "skipped" and "does not reproduce" in site.reason


def test_certifier_catches_a_mask_claim_that_only_holds_for_the_example(monkeypatch):
    """Dropping a padding mask passes on an all-ones example mask; the random-input probe catches it."""
    from dataclasses import replace

    from attnrewrite.patterns import masks

    real_resolve = masks.resolve

    def lose_the_mask(site, evaluator):
        real_resolve(site, evaluator)
        site.spec = replace(site.spec, bias=())

    monkeypatch.setattr(masks, "resolve", lose_the_mask)

    class Padded(Base):
        def forward(self, x, keep):
            q, k, v = self.qkv_heads(x)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])

    model = Padded().eval()
    x, keep = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    report = Report()
    compile_rewritten(model, report)(x, keep)
    (site,) = report.sites
    assert site.status == "skipped" and "random user inputs" in site.reason


def test_certification_tolerance_is_tight():
    assert certify_module.CERTIFY_RTOL <= 1e-6
