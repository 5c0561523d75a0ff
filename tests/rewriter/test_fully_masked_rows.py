"""Query rows whose every key is masked, some by −∞ and others by a large finite value (−1e9).

The spec reads a score set to −∞ and one set to a constant ≤ −9000 alike, as masked: exact in every row that keeps
a key, where neither gets any weight.  In a row whose every key is masked the two differ: eager softmax averages
over the keys masked by the finite value alone (−∞ keys get 0), so a row whose only finite score is a −1e9 is
that key's value — a definite output, which a rewrite reading the row as fully masked turns into zeros.  The
certifier used to leave every row the *spec* reads as fully masked out of the comparison, so such sites were
rewritten wrong and reported "certified".  Now a row is left out only when the original masks its keys alike
(all −∞: NaN; all finite: an average over every key, HF's padded query rows, which stay rewritten); the others are
compared, and a spec that does not reproduce them is refused with the reason.
"""

import math
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T, C, H = 2, 8, 32, 4
D = C // H
NEG = float("-inf")
UNALIKE = "spec does not reproduce the site in query rows it reads as fully masked"


def causal_drop():
    return torch.ones(T, T, dtype=torch.bool).triu(1)


def one_key(head: int, row: int, key: int) -> torch.Tensor:
    m = torch.zeros(B, H, T, T, dtype=torch.bool)
    m[:, head, row, key] = True
    return m


class Site(nn.Module):
    #: "rewritten", or a piece of the reason the site is left alone
    expect = "rewritten"
    kv_heads = H

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * self.kv_heads * D)

    def heads(self, x):
        q = self.q(x).view(x.shape[0], -1, H, D).transpose(1, 2)
        k, v = (t.view(x.shape[0], -1, self.kv_heads, D).transpose(1, 2)
                for t in self.kv(x).split(self.kv_heads * D, dim=-1))
        return q, k, v

    def scores(self, x):
        q, k, v = self.heads(x)
        return q @ k.transpose(-2, -1) / math.sqrt(D), v


# --------------------------------------------------------------------------- a finite fill over a −∞ row: refused


class InPlaceFill(Site):
    """The reproducer: row 0 of head 1 keeps key 0 at −1e9, its other keys are −∞ (causal)."""
    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        s.masked_fill_(causal_drop(), NEG)
        s.masked_fill_(one_key(1, 0, 0), -1e9)
        return torch.softmax(s, -1) @ v


class OutOfPlaceFill(Site):
    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        s = s.masked_fill(causal_drop(), NEG).masked_fill(one_key(1, 0, 0), -1e9)
        return torch.softmax(s, -1) @ v


class WhereFillLaterRow(Site):
    """Row 5 of head 2: keys 0–4 dropped with −∞ by a second mask, key 5 filled with finfo.min (HF's value)."""
    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        drop = one_key(2, 5, 0) | one_key(2, 5, 1) | one_key(2, 5, 2) | one_key(2, 5, 3) | one_key(2, 5, 4)
        s = torch.where(causal_drop() | drop, NEG, s)
        s = torch.where(one_key(2, 5, 5), torch.finfo(torch.float32).min, s)
        return torch.softmax(s, -1) @ v


class FiniteFillsOnly(Site):
    """No −∞ at all: causal by −1e9, and key 0 of row 0 of head 3 by −1e4 — the higher fill takes the row."""
    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        s = s.masked_fill(causal_drop(), -1e9).masked_fill(one_key(3, 0, 0), -1e4)
        return torch.softmax(s, -1) @ v


class GroupedKV(Site):
    """GQA (2 kv heads, repeat_kv) with the reproducer's mask."""
    expect = UNALIKE
    kv_heads = 2

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        k, v = (t[:, :, None].expand(-1, -1, H // self.kv_heads, -1, -1).reshape(x.shape[0], H, T, D)
                for t in (k, v))
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s.masked_fill_(causal_drop(), NEG)
        s.masked_fill_(one_key(1, 0, 0), -1e9)
        return torch.softmax(s, -1) @ v


class FillFromLengths(Site):
    """The finite fill depends on the input: query rows past the length keep their own key at −1e9 and
    drop the others with −∞ (so each such row is that key's value)."""
    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        pad = torch.arange(T)[None, :] >= lengths[:, None]  # [B, T] padded queries
        others = pad[:, None, :, None] & ~torch.eye(T, dtype=torch.bool)
        own = pad[:, None, :, None] & torch.eye(T, dtype=torch.bool)
        s = s.masked_fill(others, NEG).masked_fill(own, -1e9)
        return torch.softmax(s, -1) @ v


# --------------------------------------------------------------------------- exact: rewritten


class SdpaMixedFloatMask(Site):
    """SDPA with one additive float mask holding −∞ and −1e9 in one row (row 1 of head 1: keys 0 and 1 at
    −1e9, the rest −∞): the mask is an additive term, passed on as it is, so the row is exact."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        m = torch.zeros(T, T).masked_fill(causal_drop(), NEG).expand(B, H, T, T).clone()
        m[:, 1, 1, :2] = -1e9
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class BoolMaskAndFloatBias(Site):
    """A float bias with −1e9 entries (row 2 of head 0: keys 0–2), then a bool causal mask by −∞.  The bias's
    item write is made a ``masked_fill`` of the zeros (functionalise), so its −1e9 is read as a fill like any
    other and row 2 of head 0 mixes it with −∞: refused."""

    expect = UNALIKE

    def forward(self, x, lengths):
        s, v = self.scores(x)
        bias = torch.zeros(B, H, T, T)
        bias[:, 0, 2, :3] = -1e9
        s = (s + bias).masked_fill(causal_drop(), NEG)
        return torch.softmax(s, -1) @ v


class LeftPaddingFinfoMin(Site):
    """HF's eager mask: ``where(causal & padding, 0, finfo.min)`` with left padding, so the padded query rows
    have every key masked, all by finfo.min — alike: rewritten (those rows give zeros, documented)."""

    def forward(self, x, lengths):
        s, v = self.scores(x)
        padding = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # [B, T] left padding
        keep = padding[:, None, None, :] & ~causal_drop()
        return torch.softmax(s + torch.where(keep, 0.0, torch.finfo(torch.float32).min), -1) @ v


class BertPaddingFullyPadded(Site):
    """BERT's ``(1 − m)·−10000`` where the first sequence is all padding (its rows: every key at −1e4 + s,
    alike)."""

    def forward(self, x, lengths):
        s, v = self.scores(x)
        keep = (torch.arange(T)[None, :] < lengths[:, None]).float()
        return torch.softmax(s + (1.0 - keep[:, None, None, :]) * -10000.0, -1) @ v


REFUSED = [InPlaceFill, OutOfPlaceFill, WhereFillLaterRow, FiniteFillsOnly, GroupedKV, FillFromLengths,
           BoolMaskAndFloatBias]
EXACT = [SdpaMixedFloatMask, LeftPaddingFinfoMin, BertPaddingFullyPadded]


def inputs(cls, probe: str):
    g = torch.Generator().manual_seed(zlib.crc32(f"{cls.__name__}-{probe}".encode()))
    x = torch.randn(B, T, C, generator=g)
    lengths = torch.randint(3, T, (B,), generator=g)
    if cls is BertPaddingFullyPadded:
        lengths[0] = 0
    return x, lengths


def rows_that_see_a_key(cls, lengths) -> torch.Tensor:
    """[B, 1, T, 1] bool: the query rows compared with eager (the padded rows of the padding models see no key:
    zeros after the rewrite, a uniform average in eager, as the README says)."""
    rows = torch.ones(B, 1, T, 1, dtype=torch.bool)
    if cls is LeftPaddingFinfoMin:
        rows = (torch.arange(T)[None, :] >= (T - lengths)[:, None])[:, None, :, None]
    if cls is BertPaddingFullyPadded:
        rows = (lengths > 0)[:, None, None, None].expand(B, 1, T, 1)
    return rows


@pytest.mark.parametrize("cls", REFUSED + EXACT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("to", ["softmax", "sigmoid"])
def test_rows_masked_by_a_finite_fill_and_minus_inf(cls, to):
    """Refused with the reason where a row mixes −∞ and finite fills (for every kind: the spec is wrong there),
    rewritten and equal to eager otherwise."""
    torch.manual_seed(zlib.crc32(cls.__name__.encode()))
    model = cls().eval()
    report = Report(to=to)
    compiled = compile_rewritten(model, report, to=to)
    with torch.no_grad():
        x, lengths = inputs(cls, "example")
        got, want = compiled(x, lengths), model(x, lengths)
    (site,) = report.attention_sites()
    if cls.expect != "rewritten":
        assert site.status == "skipped" and cls.expect in site.reason, f"{cls.__name__}: {site.reason}"
        assert_close_rel(got, want, 1e-5, f"{cls.__name__}: the site is left as it was")
        return
    assert site.status == "rewritten", f"{cls.__name__}: {site.reason}"
    if to == "softmax":  # (sigmoid is another function: its rewrite is certified, not compared with eager)
        rows = rows_that_see_a_key(cls, lengths).expand_as(want)
        assert_close_rel(got[rows], want[rows], 1e-5, f"{cls.__name__}")


def test_eager_gives_the_mixed_row_a_definite_value():
    """What the refusal guards: eager's row 0 of head 1 is key 0's value (the −1e9 key takes all the weight),
    not a row without meaning; a rewrite that reads it as fully masked gives it zeros."""
    torch.manual_seed(0)
    model = InPlaceFill().eval()
    x, lengths = inputs(InPlaceFill, "example")
    with torch.no_grad():
        _, _, v = model.heads(x)
        want = model(x, lengths)
    assert float(v[:, 1, 0].abs().max()) > 0.1
    assert_close_rel(want[:, 1, 0], v[:, 1, 0], 1e-6, "eager's row 0 of head 1 is key 0's value")
