"""Masks built in place inside ``forward``: each site is rewritten, certified and exact, or left
alone with its reason — never rewritten while a write is ignored.

Every model builds its mask by in-place writes (slices, ``masked_fill_``, ``index_put_``, ``copy_``,
``fill_`` on views, loops, bool item assignment, ``+=`` of a parameter, a shifted-window mask).
Dynamo keeps such writes as they are written, with no dataflow edge from the write to the later
reads of the mask, so a certifier that follows dataflow alone sees the mask before its writes.
"""

import math
import zlib

import pytest
import torch
import torch.nn as nn

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T, C, H = 2, 8, 32, 4
D = C // H
NEG = float("-inf")


def _seed(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


class Site(nn.Module):
    """One attention layer; subclasses build the mask.  ``attention`` picks softmax (the model that is
    compiled) or a hand-written sigmoid attention with a fixed bias (the oracle for the sigmoid kind)."""

    #: "rewritten", or a piece of the reason the site is left alone
    expect = "rewritten"
    sigmoid_bias = -1.0

    def __init__(self, attention: str = "softmax"):
        super().__init__()
        self.attention = attention
        self.qkv = nn.Linear(C, 3 * C)

    def heads(self, x):
        q, k, v = self.qkv(x).split(C, dim=-1)
        return (t.view(x.shape[0], -1, H, D).transpose(1, 2) for t in (q, k, v))

    def mask(self, x, lengths):
        """An additive float mask or a bool keep-mask broadcastable to [B, H, T, T]."""
        raise NotImplementedError

    def attend(self, s, v, mask):
        if mask.dtype == torch.bool:
            if self.attention == "softmax":
                return torch.softmax(s.masked_fill(~mask, NEG), dim=-1) @ v
            return (torch.sigmoid(s + self.sigmoid_bias) * mask) @ v
        if self.attention == "softmax":
            return torch.softmax(s + mask, dim=-1) @ v
        return torch.sigmoid(s + mask + self.sigmoid_bias) @ v

    def normalise(self, s):
        """The attention weights of scores already masked (for sites that mask their scores themselves)."""
        return torch.softmax(s, dim=-1) if self.attention == "softmax" else torch.sigmoid(s + self.sigmoid_bias)

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return self.attend(s, v, self.mask(x, lengths))


# --------------------------------------------------------------------------- rewritten and exact


class SliceOfZeros(Site):
    def mask(self, x, lengths):
        m = torch.zeros(T, T)
        m[:, 5:] = NEG
        return m


class MaskedFillInPlace(Site):
    def mask(self, x, lengths):
        m = torch.zeros(T, T)
        m.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
        return m


class LoopOverFull(Site):
    """Full of -inf, then the allowed keys of each row written to 0 in a loop (a causal mask)."""

    def mask(self, x, lengths):
        m = torch.full((T, T), NEG)
        for i in range(T):
            m[i, : i + 1] = 0.0
        return m


class BoolItemAssignment(Site):
    def mask(self, x, lengths):
        keep = torch.ones(T, T, dtype=torch.bool)
        keep[:, 6:] = False
        keep[0, 7] = True
        keep[3, :2] = False
        return keep


class SlidingWindowByLoop(Site):
    """A causal bool mask whose old keys are cut off row by row: a window of 3."""

    def mask(self, x, lengths):
        keep = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(3, T):
            keep[i, : i - 2] = False
        return keep


class CausalCloneWritten(Site):
    """A clone of the causal triangle with two old keys cut off the last rows: a causal ``tril`` with an in-place
    write into its clone, which is no longer causal.  The resolver reads the clone with its write (an explicit
    mask), not through the clone to the triangle ("proven causal" would then be refused by the certifier)."""

    def mask(self, x, lengths):
        keep = torch.ones(T, T, dtype=torch.bool).tril().clone()
        keep[5:, :2] = False
        return keep


class CausalAdditiveCloneWritten(Site):
    """The same with an additive -inf causal mask: ``masked_fill(triu)`` cloned, then written."""

    def mask(self, x, lengths):
        m = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).clone()
        m[5:, :2] = NEG
        return m


class IndexPut(Site):
    def mask(self, x, lengths):
        m = torch.zeros(T, T)
        m.index_put_((torch.tensor([0, 1, 5, 7]), torch.tensor([3, 4, 0, 2])), torch.tensor(NEG))
        return m


class CopyIntoSlice(Site):
    def mask(self, x, lengths):
        m = torch.zeros(T, T)
        m[4:6, 3:].copy_(torch.full((2, T - 3), -1e9))
        return m


class FillThroughViews(Site):
    """Writes through a slice, a flat view and a transposed view of the mask."""

    def mask(self, x, lengths):
        m = torch.zeros(T, T)
        m[2:4, 5:].fill_(NEG)
        m.view(-1)[3] = NEG  # row 0, key 3
        m.t()[6, 1] = NEG  # row 1, key 6
        return m


class AddedParameter(Site):
    """zeros, then a learned relative bias added in place: the mask depends on a parameter through a
    write, so certification must draw it at random like any learned bias."""

    def __init__(self, attention="softmax"):
        super().__init__(attention)
        self.rel = nn.Parameter(torch.randn(H, T, T, generator=_seed("rel")))

    def mask(self, x, lengths):
        m = torch.zeros(H, T, T)
        m += self.rel
        m[:, :, 7] = NEG
        return m


class PaddingFromLengths(Site):
    """A key-padding mask written from the input lengths: data-dependent through a write."""

    def mask(self, x, lengths):
        m = torch.zeros(x.shape[0], T)
        m[torch.arange(T)[None, :] >= lengths[:, None]] = NEG
        return m[:, None, None, :]


def window_partition(x, w):
    """[B, Hi, Wi, C] -> [B * nW, w * w, C]."""
    b, hi, wi, c = x.shape
    x = x.view(b, hi // w, w, wi // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


class ShiftedWindow(Site):
    """Swin's shifted-window mask: an image of region labels written by slice assignment, split into
    windows; keys of another region get -100.  Attention runs per window over [B * nW, H, N, N]."""

    image, window, shift = 8, 4, 2  # 8x8 feature map, 4x4 windows (N = 16 tokens), shift 2

    def mask(self, x, lengths):
        img = torch.zeros(1, self.image, self.image, 1)
        label = 0
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        for hs in cuts:
            for ws in cuts:
                img[:, hs, ws, :] = label
                label += 1
        windows = window_partition(img, self.window).squeeze(-1)  # [nW, N]
        m = windows.unsqueeze(1) - windows.unsqueeze(2)
        m = m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)  # [nW, N, N]
        return m.repeat(x.shape[0] // m.shape[0], 1, 1).unsqueeze(1)  # [B * nW, 1, N, N]


class CloneWrittenAfterItsSpelling(Site):
    """A causal mask cloned, then one entry set to -1e9: the clone holds the write, which its spelling
    (``masked_fill(triu, -inf)``) does not say — the mask is not causal, and is kept whole."""

    def mask(self, x, lengths):
        m = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG).clone()
        m[3, 0] = -1e9
        return m


class MaskWrittenAfterTheSite(Site):
    """The mask and v are written in place only after the attention output: the original and a rewrite
    at the output read the same values, so the writes are no reason to refuse."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        m = torch.zeros(T, T)
        m[:, 6:] = NEG
        out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + m, dim=-1) @ v
        m.fill_(0.5)
        v.mul_(2.0)
        return out + m[0, 0] + v[0, 0, 0, 0]


class ScoresMaskedFillInPlace(Site):
    """``s.masked_fill_(...)`` whose result is dropped: softmax reads ``s``, which the fill wrote (made out
    of place before matching, rewriter/functionalise.py)."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
        return self.normalise(s) @ v


class ScoresReassignedFromTheFill(Site):
    """``s = s.masked_fill_(...)``: the write's own result is what the softmax reads."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1)
        s = s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
        return self.normalise(s / math.sqrt(D)) @ v


class ScoresWrittenElementwise(Site):
    """Several elementwise writes into the scores, one after another: ``div_``, ``mul_``, ``*=``, ``/=``,
    ``sub_``, ``-=``, ``+=`` of a padding mask, ``add_`` of a causal one and a ``masked_fill_``."""

    def mask(self, x, lengths):
        return torch.zeros(x.shape[0], 1, 1, T).masked_fill(torch.arange(T) >= lengths[:, None, None, None], NEG)

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1)
        s.div_(math.sqrt(D))
        s.mul_(2.0)
        s *= 0.5
        s /= 1.0
        s.sub_(0.0)
        s -= 0.0
        s += self.mask(x, lengths)
        s.add_(torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NEG))
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(2), NEG)
        return self.normalise(s) @ v


class ScoresFilledThenUpcast(Site):
    """XLM's and Flaubert's spelling: ``scores.masked_fill_(mask, finfo.min)``, then
    ``softmax(scores.float()).type_as(scores)`` — on float32 scores ``.float()`` is the scores
    themselves, an alias made after the write."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        keep = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
        s.masked_fill_((~keep)[:, None, None, :].expand_as(s), torch.finfo(s.dtype).min)
        return self.normalise(s.float()).type_as(s) @ v


class ScoresReadBeforeTheirWrite(Site):
    """The scores are read by another op between their product and the write: that read keeps the
    values before the write (a reader placed before a write is never moved after it)."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        before = s.mean(-1, keepdim=True)  # [B, H, T, 1], finite only before the fill
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
        return self.normalise(s) @ v + before


class ScoresWrittenAfterTheSoftmax(Site):
    """The softmax reads the scores before a write into them: it must keep the unwritten scores (the
    write is not moved earlier); the written scores are read afterwards."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        p = self.normalise(s)
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), -1e4)
        return p @ v + s.clamp(min=-1.0).mean(-1, keepdim=True)


class ScoresSliceAssigned(Site):
    """``s[..., 6:] = -inf``: an item assignment into a slice of the scores (``operator.setitem``), made a
    ``masked_fill`` over an ``arange`` range before matching (rewriter/item_writes.py)."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s[..., 6:] = NEG
        return self.normalise(s) @ v


class ScoresBoolIndexAssigned(Site):
    """``s[:, :, drop] = -inf`` with a bool [T, T] index over the last two dims: the causal triangle (proven
    causal once made a ``masked_fill``), then key 0 masked for a few rows of one head by int + slice."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s[:, :, torch.ones(T, T, dtype=torch.bool).triu(1)] = NEG
        s[:, 1, 3:6, 0] = -1e9  # head 1, rows 3-5: key 0 masked as well
        return self.normalise(s) @ v


class ScoresFullMaskAssigned(Site):
    """``s[pad.expand_as(s)] = -1e9``: a key-padding mask from the input lengths as a full bool index
    (the same as ``masked_fill``), then the same padding written again with ``index_put_``."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        pad = (torch.arange(T)[None, :] >= lengths[:, None])[:, None, None, :]  # [B, 1, 1, T]
        s[pad.expand_as(s)] = -1e9
        s.index_put_((pad.expand(s.shape),), torch.tensor(NEG))
        return self.normalise(s) @ v


class ScoresSliceFilled(Site):
    """``s[..., 5:].fill_(-inf)`` and a strided column ``s[..., 1::3, 2] = -inf``: writes into views of the
    scores used by the write alone."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s[..., 5:].fill_(NEG)
        s[..., 1::3, 2] = NEG
        return self.normalise(s) @ v


class ScoresBiasAddedBySlice(Site):
    """``s[..., :, :T] += rel`` (a learned bias over the whole scores, by a slice), ``s[..., :4] -= alibi``
    on the first keys, and ``s[..., 6:] += mask`` of a -inf column: getitem → iadd → setitem, made
    ``s + P`` with ``P`` the value padded with zeros."""

    def __init__(self, attention="softmax"):
        super().__init__(attention)
        self.rel = nn.Parameter(torch.randn(H, T, T, generator=_seed("rel-slice")))

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s[..., :, :T] += self.rel
        s[..., :4] -= 0.5 * torch.arange(4.0)
        s[..., 6:] += torch.full((T, 2), NEG)
        return self.normalise(s) @ v


class ScoresRowsAssignedInALoop(Site):
    """A causal mask written into the scores row by row, ``s[..., i, i + 1:] = -inf``: one write per row."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        for i in range(T - 1):
            s[..., i, i + 1:] = NEG
        return self.normalise(s) @ v


class ScoresAssignedAfterTheSoftmax(Site):
    """The softmax reads the scores before an item assignment into them: it keeps the unwritten scores."""

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        p = self.normalise(s)
        s[..., 6:] = -1e4
        return p @ v + s.clamp(min=-1.0).mean(-1, keepdim=True)


# --------------------------------------------------------------------------- left alone, with the reason


class MaskWrittenAfterItsRead(Site):
    """The mask changes after the scores read it and before the output: the original used the old
    mask, a rewrite placed at the output would read the new one."""

    expect = "written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        m = torch.zeros(T, T)
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + m
        m.fill_(NEG)
        return torch.softmax(s, dim=-1) @ v + m[0, 0].clamp(min=0)


class ScoresAssignedFromTheQueries(Site):
    """The value assigned reads the queries: made a ``masked_fill`` whose value depends on q, which is no
    mask value — the matcher refuses it."""

    expect = "not a constant mask value"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s[..., 6:] = q.detach().amin() - 1e4
        return torch.softmax(s, dim=-1) @ v


class ScoresAssignedThroughAnAliasReadElsewhere(Site):
    """``tail = s[..., 6:]; tail.fill_(-inf)`` with ``tail`` read afterwards as well: the view is not the
    write's alone, so nothing is made out of place."""

    expect = "is written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        tail = s[..., 6:]
        tail.fill_(NEG)
        return torch.softmax(s, dim=-1) @ v + tail.clamp(min=-1.0).sum()


class ProbabilitiesAssigned(Site):
    """An item assignment into the probabilities after the softmax (``p[..., 6:] = 0``): made out of place,
    it changes the probabilities on their way to the values, which the matcher does not rewrite."""

    expect = "change the scores or probabilities (div, masked_fill)"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        p[..., 6:] = 0.0
        return p @ v


class ScoresViewAssigned(Site):
    """The scores are a view (``bmm`` output viewed as [B, H, T, T]) assigned by index: not a private op
    output, so the assignment stays as written."""

    expect = "is written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = (torch.bmm(q.reshape(-1, T, D), k.reshape(-1, T, D).transpose(1, 2)) / math.sqrt(D)).view(-1, H, T, T)
        s[..., 6:] = NEG
        return torch.softmax(s, dim=-1) @ v


class ScoresFilledThroughAView(Site):
    """``masked_fill_`` on a view of the scores: the write reaches ``s`` through the view, so it is not
    made out of place (that would leave the view's write behind)."""

    expect = "is written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s.view(B, H, T * T).masked_fill_(torch.ones(T * T, dtype=torch.bool).view(T, T).triu(1).view(-1), NEG)
        return torch.softmax(s, dim=-1) @ v


class ScoresViewedAndFilled(Site):
    """``s.masked_fill_`` while a view of ``s`` exists (and is read after the write): the view sees the
    write, so the write stays as it is."""

    expect = "is written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        flat = s.view(B, H, T * T)
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), NEG)
        return torch.softmax(s, dim=-1) @ v + flat.clamp(min=-1.0).sum(-1, keepdim=True)[..., None].expand(B, H, T, D)

class ValuesWrittenInside(Site):
    """v changes between the score product and the value product."""

    expect = "written in place by"

    def forward(self, x, lengths):
        q, k, v = self.heads(x)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        v.mul_(2.0)
        return p @ v


REWRITTEN = [SliceOfZeros, MaskedFillInPlace, LoopOverFull, BoolItemAssignment, SlidingWindowByLoop, IndexPut,
             CausalCloneWritten, CausalAdditiveCloneWritten,
             CopyIntoSlice, FillThroughViews, AddedParameter, PaddingFromLengths, ShiftedWindow, MaskWrittenAfterTheSite,
             ScoresMaskedFillInPlace, ScoresReassignedFromTheFill, ScoresWrittenElementwise,
             ScoresReadBeforeTheirWrite, ScoresWrittenAfterTheSoftmax, ScoresFilledThenUpcast, ScoresSliceAssigned,
             ScoresBoolIndexAssigned, ScoresFullMaskAssigned, ScoresSliceFilled, ScoresBiasAddedBySlice,
             ScoresRowsAssignedInALoop, ScoresAssignedAfterTheSoftmax, CloneWrittenAfterItsSpelling]
LEFT_ALONE = [MaskWrittenAfterItsRead, ScoresFilledThroughAView, ScoresViewedAndFilled, ValuesWrittenInside,
              ScoresAssignedFromTheQueries, ScoresAssignedThroughAnAliasReadElsewhere, ProbabilitiesAssigned,
              ScoresViewAssigned]


def inputs(model: Site, name: str):
    g = _seed(name)
    batch = B * 4 if isinstance(model, ShiftedWindow) else B  # 4 windows per image
    tokens = ShiftedWindow.window ** 2 if isinstance(model, ShiftedWindow) else T
    x = torch.randn(batch, tokens, C, generator=g)
    lengths = torch.randint(3, T + 1, (batch,), generator=g)
    return x, lengths


def build(cls, attention="softmax"):
    torch.manual_seed(zlib.crc32(cls.__name__.encode()))
    return cls(attention).eval()


@pytest.mark.parametrize("cls", REWRITTEN + LEFT_ALONE, ids=lambda c: c.__name__)
def test_every_in_place_mask_is_rewritten_exactly_or_left_alone(cls):
    """The compiled model equals eager on the example and on fresh inputs (other lengths, other
    activations), whatever happened to the site; and the site's fate is the one declared."""
    model = build(cls)
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, to="softmax")
    with torch.no_grad():
        for probe in ("example", "fresh"):
            x, lengths = inputs(model, f"{cls.__name__}-{probe}")
            assert_close_rel(compiled(x, lengths), model(x, lengths), 1e-5, f"{cls.__name__} ({probe})")
    (site,) = report.attention_sites() or report.sites  # (a near miss has no spec)
    if cls.expect == "rewritten":
        assert site.status == "rewritten", f"{cls.__name__}: {site.reason}"
        assert any("certified" in n for n in site.notes)
    else:
        assert site.status == "skipped" and cls.expect in site.reason, f"{cls.__name__}: {site.reason}"


@pytest.mark.parametrize("cls", [MaskedFillInPlace, LoopOverFull], ids=lambda c: c.__name__)
def test_a_causal_mask_written_in_place_is_proven_causal(cls):
    report = Report(to="softmax")
    model = build(cls)
    compile_rewritten(model, report, to="softmax")(*inputs(model, "causal"))
    (site,) = report.attention_sites()
    assert site.spec["causal"] and site.spec["bias"] == [], site
    assert any("proven causal" in n for n in site.notes)


@pytest.mark.parametrize("cls", [CausalCloneWritten, CausalAdditiveCloneWritten], ids=lambda c: c.__name__)
def test_a_written_clone_of_the_causal_triangle_is_an_explicit_mask(cls):
    report = Report(to="softmax")
    model = build(cls)
    compile_rewritten(model, report, to="softmax")(*inputs(model, "clone"))
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason
    assert not site.spec["causal"] and site.spec["bias"], site
    assert not any("proven causal" in n for n in site.notes), site.notes


def test_scores_assigned_a_causal_bool_index_are_proven_causal():
    report = Report(to="softmax")
    model = build(ScoresBoolIndexAssigned)
    compile_rewritten(model, report, to="softmax")(*inputs(model, "bool-causal"))
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.spec["causal"], site
    assert any("proven causal" in n for n in site.notes), site.notes


def test_a_mask_written_in_place_is_not_dropped():
    """The bug this file guards: zeros read without their writes look like 'no mask' and were dropped."""
    report = Report(to="softmax")
    model = build(SliceOfZeros)
    compile_rewritten(model, report, to="softmax")(*inputs(model, "dropped"))
    (site,) = report.attention_sites()
    # (the slice written into zeros is made a masked_fill before matching: read as the drop-mask it writes)
    assert site.status == "rewritten" and site.spec["bias"] == ["drop"] and not site.spec["causal"]


@pytest.mark.parametrize("cls", [SliceOfZeros, LoopOverFull, BoolItemAssignment, IndexPut, FillThroughViews,
                                 PaddingFromLengths, ScoresMaskedFillInPlace, ScoresWrittenElementwise,
                                 ScoresReadBeforeTheirWrite, ScoresSliceAssigned, ScoresBoolIndexAssigned,
                                 ScoresFullMaskAssigned, ScoresSliceFilled, ScoresBiasAddedBySlice,
                                 ScoresRowsAssignedInALoop, CausalCloneWritten, CausalAdditiveCloneWritten],
                         ids=lambda c: c.__name__)
def test_sigmoid_rewrite_equals_a_hand_written_sigmoid_model(cls):
    """The softmax model rewritten to sigmoid (fixed bias) equals the same model written by hand with
    sigmoid attention over the same in-place mask: outputs and parameter gradients."""
    model, oracle = build(cls), build(cls, "sigmoid")
    oracle.load_state_dict(model.state_dict())
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", bias=cls.sigmoid_bias)
    x, lengths = inputs(model, f"{cls.__name__}-sigmoid")
    got, want = compiled(x, lengths), oracle(x, lengths)
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason
    assert_close_rel(got, want, 1e-5, "output")
    weights = torch.randn(want.shape, generator=_seed("w"))
    g_got = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    g_want = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()))
    for a, b in zip(g_got, g_want):
        assert_close_rel(a, b, 1e-4, "gradient")


def test_returned_weights_see_the_writes():
    """A site whose probabilities are also returned: the recorded weights read the mask after its writes."""

    class Returned(SliceOfZeros):
        def forward(self, x, lengths):
            q, k, v = self.heads(x)
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + self.mask(x, lengths), dim=-1)
            return p @ v, p

    model = build(Returned)
    report = Report(to="sigmoid")
    x, lengths = inputs(model, "returned")
    _, p = compile_rewritten(model, report, to="sigmoid", bias=-1.0)(x, lengths)
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason
    assert bool((p[..., 5:] == 0).all()) and bool((p[..., :5] > 0).all())


def test_a_kv_cache_written_before_the_site_is_rewritten():
    """Writes into q, k or v before the site (a static KV cache filled with index_copy_ and slice
    assignment) are part of their values: the site is rewritten, exact over several decode steps."""

    class Cached(nn.Module):
        def __init__(self, slots=16):
            super().__init__()
            self.qkv = nn.Linear(C, 3 * C)
            self.register_buffer("keys", torch.zeros(B, H, slots, D))
            self.register_buffer("values", torch.zeros(B, H, slots, D))

        def forward(self, x, pos):
            q, k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
            self.keys.index_copy_(2, pos, k)
            self.values[:, :, pos] = v
            keep = torch.arange(self.keys.shape[2])[None, :] <= pos[:, None]
            s = q @ self.keys.transpose(-2, -1) / math.sqrt(D)
            return torch.softmax(s.masked_fill(~keep, NEG), dim=-1) @ self.values

    torch.manual_seed(zlib.crc32(b"cached"))
    model, reference = Cached().eval(), Cached().eval()
    reference.load_state_dict(model.state_dict())
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, to="softmax")
    with torch.no_grad():
        for step in range(3):
            x, pos = torch.randn(B, 4, C, generator=_seed(f"step{step}")), torch.arange(4 * step, 4 * step + 4)
            assert_close_rel(compiled(x, pos), reference(x, pos), 1e-5, f"step {step}")
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason


def test_scores_filled_in_place_under_dynamic_shapes():
    """``dynamic=True``: the scores' sizes are symbols, the causal fill is built from them; the write is
    made out of place (its shape proven equal without a guard), the site rewritten, and other
    sequence lengths reuse the one compiled graph."""

    class Dynamic(Site):
        def forward(self, x, lengths):
            q, k, v = self.heads(x)
            s = q @ k.transpose(-2, -1) / math.sqrt(D)
            s.masked_fill_(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).triu(1), NEG)
            return torch.softmax(s, dim=-1) @ v

    model = build(Dynamic)
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, dynamic=True, to="softmax")
    torch._dynamo.reset()
    with torch.no_grad():
        for tokens in (T, T + 3, T - 2):
            x = torch.randn(B, tokens, C, generator=_seed(f"dynamic{tokens}"))
            assert_close_rel(compiled(x, None), model(x, None), 1e-5, f"{tokens} tokens")
    assert report.graphs == 1, report
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason
