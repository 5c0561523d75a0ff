"""strict=True raises for every path that leaves attention as it was — one test per path, with the
message asserted word for word (a loose ``match="no"`` would accept almost any error).

The paths: certification refuses the spec (wrong values, wrong dropout); the kind cannot honour the
site (a bias it cannot add, a score modification it cannot apply, returned weights it cannot
supply, per-site parameters not converted); an internal error in one stage; the whole pass
failing; an attention split by a graph break.  A near miss (not attention) is not a failure and
must *not* raise.  Without strict, each path warns instead (checked once at the end).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import attnrewrite
from attnrewrite.rewriter.failures import reset_warnings
from attnrewrite.testing.checks import compile_rewritten

T, C, H = 8, 32, 4
HEAD = "attnrewrite: attention not rewritten to {to} at 1 site(s): <root>: "


class Attention(nn.Module):
    """softmax(q kᵀ/√d + extras) v, with the extras chosen per test."""

    def __init__(self, bias=False, capped=False, weights=False, dropout=0.0, causal=False):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.bias = nn.Parameter(0.1 * torch.randn(H, T, T)) if bias else None
        self.capped, self.weights, self.causal, self.drop = capped, weights, causal, nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, H, c // H).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(c // H)
        if self.capped:
            s = torch.tanh(s / 5.0) * 5.0
        if self.bias is not None:
            s = s + self.bias
        if self.causal:
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        p = self.drop(torch.softmax(s, dim=-1))
        out = p @ v
        return (out, p) if self.weights else out


def _x():
    return torch.randn(2, T, C, generator=torch.Generator().manual_seed(1))


def _strict_failure(model, to: str, **options) -> attnrewrite.RewriteFailed:
    """Compile with strict=True and return the RewriteFailed it raises (itself, not wrapped)."""
    with pytest.raises(attnrewrite.RewriteFailed) as caught:
        compile_rewritten(model, to=to, strict=True, **options)(_x())
    return caught.value


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def test_certification_refusing_the_spec_raises(monkeypatch):
    from attnrewrite.patterns import eager_matmul

    real = eager_matmul.match

    def off_scale(anchor):
        site = real(anchor)
        site.spec = replace(site.spec, scale=site.spec.scale * 1.01)
        return site

    monkeypatch.setattr(eager_matmul, "match", off_scale)
    failed = _strict_failure(Attention().eval(), "softmax")
    assert re.fullmatch(re.escape(HEAD.format(to="softmax")) + r"spec does not reproduce the site \(relative error "
                        r"\d\.\d\de-0\d on random q, k, v\)", _first_line(failed)), _first_line(failed)
    (failure,) = failed.failures
    assert failure.module == "" and failure.cause.startswith("spec does not reproduce the site")


def test_a_wrong_dropout_probability_raises(monkeypatch):
    from attnrewrite.patterns import eager_matmul

    real = eager_matmul.match

    def wrong_p(anchor):
        site = real(anchor)
        site.spec = replace(site.spec, dropout_p=0.3)
        return site

    monkeypatch.setattr(eager_matmul, "match", wrong_p)
    failed = _strict_failure(Attention(dropout=0.2).train(), "softmax")
    assert _first_line(failed) == HEAD.format(to="softmax") + (
        "spec's dropout probability 0.3 differs from the site's 0.2")


def test_a_bias_the_kind_cannot_add_raises():
    failed = _strict_failure(Attention(bias=True).eval(), "linear")
    assert _first_line(failed) == HEAD.format(to="linear") + (
        "linear cannot honour this site: an additive bias on the scores (a linear kind has no scores to add it to)")


def test_a_score_modification_the_kind_cannot_apply_raises():
    failed = _strict_failure(Attention(capped=True).eval(), "linear")
    assert _first_line(failed) == HEAD.format(to="linear") + (
        "linear cannot honour this site: it cannot apply the score modification tanh·mul")


def test_returned_weights_the_kind_cannot_supply_raise():
    failed = _strict_failure(Attention(weights=True, causal=True).eval(), "summary")
    assert _first_line(failed) == HEAD.format(to="summary") + (
        "summary cannot honour this site: the attention weights are used elsewhere and it cannot supply them")


def test_per_site_parameters_without_convert_raise():
    failed = _strict_failure(Attention().eval(), "linear", feature_map="hedgehog")
    assert _first_line(failed) == HEAD.format(to="linear") + (
        "linear with these options has per-site parameters: call attnrewrite.convert(model, to='linear', ...) "
        "before compiling")


def test_an_internal_error_in_a_stage_raises(monkeypatch):
    from attnrewrite.patterns import masks

    def broken(site, evaluator):
        raise KeyError("planted")

    monkeypatch.setattr(masks, "resolve", broken)
    failed = _strict_failure(Attention().eval(), "softmax")
    assert _first_line(failed) == "attnrewrite pass failed: KeyError: 'planted'"
    (failure,) = failed.failures
    assert failure.cause == "the pass failed: 'planted'"


def test_the_whole_pass_failing_raises(monkeypatch):
    from attnrewrite.rewriter import pipeline

    def broken(ctx):
        raise RuntimeError("planted lint failure")

    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:-1] + (("finish", broken),))
    failed = _strict_failure(Attention().eval(), "sigmoid")
    assert _first_line(failed) == "attnrewrite pass failed: RuntimeError: planted lint failure"


class SplitByABreak(Attention):
    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, H, c // H).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(c // H)
        torch._dynamo.graph_break()
        return torch.softmax(s, dim=-1) @ v


def test_an_attention_split_by_a_graph_break_raises():
    failed = _strict_failure(SplitByABreak().eval(), "sigmoid")
    assert _first_line(failed) == HEAD.format(to="sigmoid") + (
        "an attention split by a graph break: the scores are a graph input and the probabilities meet a value "
        "product (q·kᵀ is in another graph)")


class NotAttention(nn.Module):
    """A softmax over a learned memory (parameters as keys and values): a near miss, not a failure."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, 16, C))
        self.values = nn.Parameter(torch.randn(1, 16, C))

    def forward(self, x):
        return torch.softmax(x @ self.keys.transpose(-2, -1), dim=-1) @ self.values


def test_a_near_miss_does_not_raise():
    model = NotAttention().eval()
    torch.testing.assert_close(compile_rewritten(model, to="sigmoid", strict=True)(_x()), model(_x()))


@pytest.mark.parametrize("model, to", [(Attention(bias=True), "linear"), (Attention(capped=True), "linear"),
                                       (Attention(weights=True, causal=True), "summary")], ids=["bias", "score_mod", "weights"])
def test_without_strict_the_same_paths_warn(model, to):
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match=f"not rewritten to {to} at 1 site"):
        compile_rewritten(model.eval(), to=to)(_x())
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        torch._dynamo.reset()
        compile_rewritten(model.eval(), to=to)(_x())  # once per cause: said already


class Layered(nn.Module):
    """``n`` biased attention layers in ``layers.i.attn``: one cause at ``n`` sites."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": Attention(bias=True)}) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["attn"](x).transpose(1, 2).reshape(x.shape)
        return x


BIAS_CAUSE = "linear cannot honour this site: an additive bias on the scores (a linear kind has no scores to add it to)"


def test_the_warning_names_the_sites_and_the_cause_once():
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning) as caught:
        compile_rewritten(Layered(5).eval(), to="linear")(_x())
    (warning,) = [w for w in caught if issubclass(w.category, attnrewrite.RewriteWarning)]
    assert str(warning.message) == (
        "attnrewrite: attention not rewritten to linear at 5 site(s) (layers.0.attn, layers.1.attn, layers.2.attn "
        f"and 2 more): {BIAS_CAUSE}. Such sites run as before; attnrewrite.explain() lists every site, "
        "strict=True raises instead.")


def test_the_strict_error_lists_every_site():
    failed = _strict_failure(Layered(2).eval(), "linear")
    assert _first_line(failed) == (f"attnrewrite: attention not rewritten to linear at 2 site(s): layers.0.attn: "
                                   f"{BIAS_CAUSE}; layers.1.attn: {BIAS_CAUSE}")
    assert [(f.module, f.cause) for f in failed.failures] == [("layers.0.attn", BIAS_CAUSE),
                                                              ("layers.1.attn", BIAS_CAUSE)]


@pytest.mark.parametrize("n, shown", [
    (3, "layers.0.attn, layers.1.attn, layers.2.attn"),
    (4, "layers.0.attn, layers.1.attn, layers.2.attn and 1 more"),
])
def test_the_warning_shows_three_sites_then_counts(n, shown):
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning) as caught:
        compile_rewritten(Layered(n).eval(), to="linear")(_x())
    (warning,) = [w for w in caught if issubclass(w.category, attnrewrite.RewriteWarning)]
    assert str(warning.message).startswith(f"attnrewrite: attention not rewritten to linear at {n} site(s) ({shown}): ")


class TwoCauses(nn.Module):
    """Two sites left for two different reasons: a bias, and a score modification."""

    def __init__(self):
        super().__init__()
        self.biased, self.capped = Attention(bias=True), Attention(capped=True)

    def forward(self, x):
        return self.biased(x) + self.capped(x)


def test_each_cause_warns_once_even_after_another_was_said():
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match=r"at 1 site\(s\) \(<root>\): linear cannot honour this site: "
                                                        r"an additive bias"):
        compile_rewritten(Attention(bias=True).eval(), to="linear")(_x())
    torch._dynamo.reset()
    with pytest.warns(attnrewrite.RewriteWarning) as caught:  # the bias was said; the score modification was not
        compile_rewritten(TwoCauses().eval(), to="linear")(_x())
    messages = [str(w.message) for w in caught if issubclass(w.category, attnrewrite.RewriteWarning)]
    assert len(messages) == 1 and messages[0].startswith(
        "attnrewrite: attention not rewritten to linear at 1 site(s) (capped): linear cannot honour this site: it "
        "cannot apply the score modification tanh·mul"), messages


def test_rewrite_failed_derives_from_the_class_dynamo_passes_through(monkeypatch):
    """Dynamo wraps a backend's exceptions in ``BackendCompilerFailed`` except its ``ShortenTraceback``
    family: RewriteFailed's base must be that class while torch has it (so ``except RewriteFailed``
    catches it from ``torch.compile``), and a plain RuntimeError when a torch without it is used."""
    from torch._dynamo import exc

    from attnrewrite.rewriter import failures

    assert failures._passed_through_by_dynamo() is exc.ShortenTraceback
    assert issubclass(attnrewrite.RewriteFailed, exc.ShortenTraceback)
    monkeypatch.delattr(exc, "ShortenTraceback")
    assert failures._passed_through_by_dynamo() is RuntimeError
    monkeypatch.setattr(exc, "ShortenTraceback", ValueError, raising=False)  # not a RuntimeError: not a base
    assert failures._passed_through_by_dynamo() is RuntimeError


def test_the_recompile_limit_is_said_at_the_last_compile_only_and_names_the_frame():
    """``recompile_limit_reached`` outside a Dynamo frame (a compile context alone, as an AOT compile or a
    replay has): silent below and past the frame's last compile and outside any compile; at the last one
    it names the frame by its id, raises under strict, and otherwise warns once."""
    from torch._guards import CompileContext, CompileId, compile_context

    from attnrewrite.rewriter.failures import recompile_limit_reached

    def at(compile_count: int, strict: bool) -> None:
        with compile_context(CompileContext(CompileId(frame_id=7, frame_compile_id=compile_count))):
            recompile_limit_reached(strict)

    cause = ("frame 7 is compiled for the 5th time, torch._dynamo.config.recompile_limit: Dynamo runs further "
             "versions of it (new shapes or other guards, e.g. another instance or a module holding other states) "
             "uncompiled, with their original attention. Raise the limit, mark the varying sizes dynamic, or "
             "compile the whole model once")
    reset_warnings()
    with torch._dynamo.config.patch(recompile_limit=5), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recompile_limit_reached(True)  # no compile going on
        for count in (0, 3, 5):
            at(count, strict=True)
        assert not caught
        with pytest.raises(attnrewrite.RewriteFailed) as raised:
            at(4, strict=True)
        assert str(raised.value) == f"attnrewrite: {cause}"
        assert [(f.module, f.cause) for f in raised.value.failures] == [("", cause)]
        at(4, strict=False)
        at(4, strict=False)
    assert [(w.category, str(w.message)) for w in caught] == [(attnrewrite.RewriteWarning, f"attnrewrite: {cause}.")]
