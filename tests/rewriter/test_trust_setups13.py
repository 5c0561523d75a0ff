"""What the pass says about softmaxes it does not rewrite, in models a user writes: attention whose probabilities
are changed on their way to the values is attention left as it was (said: a warning, ``RewriteFailed`` under
``strict``, a failure in ``verify``), and probabilities a compiled model returns are not an attention split by a
graph break (no false alarm)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import attnrewrite
from attnrewrite.rewriter.failures import reset_warnings
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten


class Heads(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.qk2 = heads, nn.Linear(width, 3 * width), nn.Linear(width, 2 * width)
        self.gate, self.mix = nn.Parameter(torch.randn(heads)), nn.Parameter(torch.randn(heads, heads))

    def split(self, x, layer):  # [B, T, W] -> each [B, H, T, D]
        b, t, w = x.shape
        return layer(x).view(b, t, -1, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.split(x, self.qkv)
        probs = self.probs(q @ k.transpose(-1, -2) * 0.25, x)  # [B, H, T, T]
        return (probs @ v).transpose(1, 2).flatten(2)


class GatedHeads(Heads):
    def probs(self, scores, x):
        return scores.softmax(-1) * self.gate[:, None, None]


class MaskedSoftmax(Heads):
    """AllenNLP's ``masked_softmax``: softmax, then the mask, then renormalised."""

    def probs(self, scores, x):
        keep = torch.ones(x.shape[1], x.shape[1]).tril()
        probs = scores.softmax(-1) * keep
        return probs / (probs.sum(-1, keepdim=True) + 1e-13)


class Differential(Heads):
    """Differential attention: the difference of two softmaxes meets the values."""

    def probs(self, scores, x):
        q2, k2 = self.split(x, self.qk2)
        return scores.softmax(-1) - 0.4 * (q2 @ k2.transpose(-1, -2) * 0.25).softmax(-1)


class TalkingHeads(Heads):
    """Talking-heads attention: the heads' probabilities mixed by a learned matrix."""

    def probs(self, scores, x):
        return torch.einsum("bhij,hk->bkij", scores.softmax(-1), self.mix)


class TalkingScores(Heads):
    def probs(self, scores, x):
        return torch.einsum("bhij,hk->bkij", scores, self.mix).softmax(-1)


CHANGED = {"gated_heads": GatedHeads, "masked_softmax": MaskedSoftmax, "differential": Differential,
           "talking_heads": TalkingHeads, "talking_scores": TalkingScores}


@pytest.mark.parametrize("case", sorted(CHANGED))
def test_attention_with_probabilities_changed_before_the_values_is_said(case):
    """Such a site stays softmax — no kind can honour what happens between the softmax and the values — and used
    to be a silent near miss ("the probabilities never meet the values", "einsum … is not a probabilities·v
    product"): with ``to="sigmoid"`` the model kept its softmax and nothing said so."""
    torch.manual_seed(0)
    model, x = CHANGED[case]().eval(), torch.randn(2, 6, 16)
    reset_warnings()
    report = Report()
    with pytest.warns(attnrewrite.RewriteWarning, match="attention in a form this version does not rewrite"):
        got = compile_rewritten(model, report, to="sigmoid")(x)
    assert not report.rewritten and report.skipped, report
    assert all(site.attention_left_as_it_was for site in report.skipped), report
    torch.testing.assert_close(got, model(x))  # left as it was
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match="does not rewrite"):
        compile_rewritten(model, to="sigmoid", strict=True)(x)
    result = attnrewrite.verify(model, x, to="sigmoid", raise_on_failure=False)
    assert result.failures and all("does not rewrite" in f.cause for f in result.failures), result


class Pointer(nn.Module):
    """A pointer network: the probabilities over the input positions are the output."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.query = nn.Linear(width, width)

    def forward(self, x):  # [B, T, W] -> [B, T, T]
        return (self.query(x) @ x.transpose(-1, -2)).softmax(-1)


class Retrieval(nn.Module):
    """Attention, then the probabilities of a similarity returned (a zero-shot head's)."""

    def __init__(self):
        super().__init__()
        self.attend, self.pointer = GatedHeads(), Pointer()
        self.attend.probs = lambda scores, x: scores.softmax(-1)  # plain attention

    def forward(self, x):
        return self.pointer(x + self.attend(x))


@pytest.mark.parametrize("to", ["softmax", "sigmoid"])
def test_probabilities_a_compiled_model_returns_are_no_attention_split_by_a_break(to):
    """A graph that ends with the frame's return hands its outputs to the caller, not to the rest of the frame:
    probabilities it returns are no half of an attention (they were reported as "an attention split by a graph
    break": a warning, ``RewriteFailed`` under ``strict`` and a ``verify`` failure for a model with nothing left
    as it was).  A graph cut at a break still says so (``test_trust.py``)."""
    torch.manual_seed(0)
    model, x = Retrieval().eval(), torch.randn(2, 6, 16)
    reset_warnings()
    report = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        got = compile_rewritten(model, report, to=to, strict=True)(x)
    assert len(report.rewritten) == 1 and report.rewritten[0].module == "attend", report
    (returned,) = report.skipped
    assert "returned by the compiled code" in returned.reason and not returned.attention_left_as_it_was, report
    assert attnrewrite.verify(model, x, to=to).ok
    if to == "softmax":
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)


@torch.library.custom_op("userlib13::flash_attn", mutates_args=())
def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


@_flash_attn.register_fake
def _(q, k, v, causal):
    return torch.empty_like(q)


class OpaqueAttention(nn.Module):
    """Attention through an op the matcher cannot read: a custom op (as flash-attn and xformers register), or
    one of aten's SDPA kernels called directly."""

    def __init__(self, op: str):
        super().__init__()
        self.qkv, self.op = nn.Linear(16, 48), op

    def forward(self, x):  # [B, T, 16]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # each [B, 2, T, 8]
        if self.op == "custom":
            out = _flash_attn(q, k, v, True)
        else:
            out = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, is_causal=True)[0]
        return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("op", ["custom", "aten"])
def test_attention_through_an_op_the_matcher_cannot_read_is_said(op):
    """Such a graph used to report nothing at all: ``to="sigmoid"`` kept the op's softmax attention, with no
    warning, and ``verify`` (which trusts a graph's report for what ran inside it) passed."""
    torch.manual_seed(0)
    model, x = OpaqueAttention(op).eval().requires_grad_(False), torch.randn(2, 6, 16)  # (the op has no backward)
    reset_warnings()
    report = Report()
    name = "userlib13::flash_attn" if op == "custom" else "aten::_scaled_dot_product_attention_math"
    with pytest.warns(attnrewrite.RewriteWarning, match=f"an attention op the matcher does not read \\({name}\\)"):
        got = compile_rewritten(model, report, to="sigmoid")(x)
    (site,) = report.sites
    assert site.attention_left_as_it_was and not report.rewritten, report
    torch.testing.assert_close(got, model(x))
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match="does not read"):
        compile_rewritten(model, to="sigmoid", strict=True)(x)
    result = attnrewrite.verify(model, x, to="sigmoid", raise_on_failure=False)
    assert len(result.failures) == 1 and name in result.failures[0].cause, result


@pytest.mark.parametrize("stance", ["force_eager", "eager_on_recompile"])
def test_verify_names_attention_a_stance_runs_eagerly(stance):
    """Under these stances Dynamo runs frames without calling the backend (``eager_on_recompile`` also a frame
    compiled for the first time): no compile-time word is possible, and ``verify`` is the way to know."""
    model, x = Retrieval().eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    compiled = compile_rewritten(model, to="sigmoid")
    with torch.compiler.set_stance(stance):
        result = attnrewrite.verify(compiled, x, raise_on_failure=False)
    assert len(result.failures) == 2 and all("ran eagerly" in f.cause for f in result.failures), result
    assert attnrewrite.verify(compiled, x).ok  # the default stance compiles and rewrites
