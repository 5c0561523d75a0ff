"""A row max subtracted by hand before the softmax, softmax(s − max_{-1} s): read as the softmax's
stabiliser (as for the written-out exp(s − max) / Σ), for every kind.  The exact kind equals the original
(outputs and gradients); sigmoid applies to s itself; shifts that are not that stabiliser stay skipped."""

import functools
import math

import pytest
import torch

from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report
from attnrewrite.testing import spellings

B, H, T, D = 2, 4, 8, 16
STABILISERS = ("amax", "max_values", "max_getitem_detached", "amax_of_detached", "max_unsqueezed", "upcast_both")
SOFTMAXES = ("torch", "functional", "method", "upcast_float", "dtype_f32", "written_out", "log_softmax_exp")
SHIFTS = ("stabiliser_scaled", "stabiliser_min", "stabiliser_added", "stabiliser_of_other_scores",
          "scores_reused_amax")


def _compile(fn, report, to="softmax"):
    torch._dynamo.reset()
    backend = functools.partial(attnrewrite_backend, options={"compiler": "eager", "to": to},
                                _report_sink=report.merge)
    return torch.compile(fn, backend=backend)


def _qkv():
    return tuple(torch.randn(B, H, T, D) for _ in range(3))


def _scores(q, k):
    return q @ k.transpose(-2, -1) * D**-0.5


def _attention(stabilise, softmax="torch", mask=None):
    def fn(q, k, v):
        s = _scores(q, k)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return spellings._softmax(spellings._stabilised(s, stabilise), softmax) @ v
    return fn


def _with_grads(fn, qkv, grad):
    leaves = [x.clone().requires_grad_() for x in qkv]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("softmax", SOFTMAXES)
@pytest.mark.parametrize("stabilise", STABILISERS)
def test_stabilised_softmax_is_rewritten_exactly_with_gradients(stabilise, softmax):
    fn, report, qkv = _attention(stabilise, softmax), Report(), _qkv()
    grad = torch.randn(B, H, T, D)
    got, got_grads = _with_grads(_compile(fn, report), qkv, grad)
    (site,) = report.sites
    assert site.status == "rewritten", report
    assert site.spec["scale"] == pytest.approx(D**-0.5) and not site.spec["has_bias"]
    want, want_grads = _with_grads(fn, qkv, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("stabilise", ["amax", "max_getitem_detached", "upcast_both"])
def test_sigmoid_of_stabilised_scores_is_sigmoid_of_the_scores(stabilise):
    """The stabiliser is the softmax's own: sigmoid (not shift-invariant) applies to s, not to s − max s."""
    fn, report, (q, k, v) = _attention(stabilise), Report(), _qkv()
    got = _compile(fn, report, to="sigmoid")(q, k, v)
    (site,) = report.sites
    assert site.status == "rewritten", report
    by_hand = torch.sigmoid(_scores(q, k) - math.log(T)) @ v  # b = −log(n), n = T keys
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert (got - torch.sigmoid(spellings._stabilised(_scores(q, k), stabilise) - math.log(T)) @ v).abs().max() > 1e-3


def test_half_scores_upcast_after_the_stabiliser_keep_a_float32_softmax():
    def fn(q, k, v):
        s = q.half() @ k.half().transpose(-2, -1) * D**-0.5
        return (torch.softmax((s - s.amax(-1, keepdim=True)).float(), -1).half() @ v.half()).float()

    report, qkv = Report(), _qkv()
    got = _compile(fn, report)(*qkv)
    (site,) = report.sites
    assert site.status == "rewritten", report
    assert site.spec["softmax_dtype"] == "float32"
    torch.testing.assert_close(got, fn(*qkv), rtol=2e-3, atol=2e-3)


def test_fully_masked_rows_are_nan_in_the_original_and_finite_rows_match():
    """With a −inf mask a row with every key masked has max −inf, and s − max is NaN there: the original
    is NaN in that row (as plain softmax of an all −inf row is); every row the original computes finitely
    the rewrite computes alike."""
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[2] = False  # query 2 sees no key
    fn, report, qkv = _attention("amax", mask=keep), Report(), _qkv()
    got, want = _compile(fn, report)(*qkv), fn(*qkv)
    (site,) = report.sites
    assert site.status == "rewritten", report
    assert want[:, :, 2].isnan().all()
    finite = want.isfinite().all(-1)
    assert finite.sum() == B * H * (T - 1)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    # and the row the original leaves NaN is rewritten as the plain softmax(s) site's is (the exact kind's
    # convention for a row with no key: certification does not compare such rows)
    plain = _compile(_attention("none", mask=keep), Report())(*qkv)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("to", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shift", SHIFTS)
def test_shifts_that_are_not_the_stabiliser_are_skipped(shift, to):
    """max over the queries, a scaled max, a min, a max added, the max of another tensor: skipped, untouched."""
    first = iter([shift])
    program = spellings.draw_near_miss(lambda name, options: next(first) if name == "near_miss" else options[0])
    report = Report()
    with torch.no_grad():
        want = program.module(*program.inputs)
        got = _compile(program.module, report, to=to)(*program.inputs)
    assert not report.rewritten, report
    (site,) = report.sites
    assert site.status == "skipped" and "reused" in site.reason, site.reason
    assert torch.equal(got, want)


def test_stabilised_softmax_with_dynamic_shapes_is_rewritten_once():
    fn, report = _attention("max_values"), Report()
    compiled = torch.compile(fn, dynamic=True, backend=functools.partial(
        attnrewrite_backend, options={"compiler": "eager"}, _report_sink=report.merge))
    torch._dynamo.reset()
    for t in (8, 12):
        q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.status == "rewritten", report
