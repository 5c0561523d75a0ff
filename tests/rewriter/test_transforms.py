"""torch.func transforms around a compiled model: ``torch.compile(torch.vmap(f))`` and ``torch.compile(grad(f))``.

Dynamo inlines the transform, so the pass sees attention on functorch's wrapped tensors (per-example shapes for
vmap), which the kinds' operators have no rule for.  Such a site is left as it was with a reason that says what
happened and what to do (call the compiled model on the batch; torch.autograd for gradients) — not an internal
error — the output is the transform's own, and ``strict=True`` raises.  What the reason recommends is checked too:
the model compiled without vmap and called on the batch is rewritten and equals vmap of the exact attention.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.rewriter.failures import RewriteFailed, reset_warnings
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

N, H, T, D = 3, 2, 6, 8


def _example(q, k, v):  # one example: [H, T, D]
    s = q @ k.transpose(-2, -1) * D**-0.5
    return s.softmax(-1) @ v


def _example_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _qkv(name):
    return [torch.randn(N, H, T, D, generator=torch.Generator().manual_seed(zlib.crc32(f"{name}{x}".encode())))
            for x in "qkv"]


@pytest.mark.parametrize("fn", [_example, _example_sdpa], ids=["matmul", "sdpa"])
def test_compiled_vmap_is_left_as_it_was_with_what_to_do(fn):
    torch._dynamo.reset()
    reset_warnings()
    q, k, v = _qkv(fn.__name__)
    report = Report(to="sigmoid")
    with pytest.warns(Warning, match="torch.vmap"):
        got = compile_rewritten(torch.vmap(fn), report, to="sigmoid", bias=-2.0)(q, k, v)
    assert_close_rel(got, torch.vmap(fn)(q, k, v), 1e-6, "output")
    (site,) = report.attention_sites()
    assert site.status == "skipped", report
    assert "inside torch.vmap" in site.reason and "call it on the whole batch" in site.reason, site.reason
    assert "internal error" not in site.reason


def test_compiled_vmap_strict_raises_with_the_reason():
    torch._dynamo.reset()
    q, k, v = _qkv("strict")
    with pytest.raises(Exception, match="inside torch.vmap") as info:
        compile_rewritten(torch.vmap(_example), to="sigmoid", strict=True, bias=-2.0)(q, k, v)
    assert isinstance(info.value, RewriteFailed) or isinstance(info.value.__cause__, RewriteFailed), info.value


def test_compiled_grad_transform_is_left_as_it_was_with_what_to_do():
    torch._dynamo.reset()
    reset_warnings()
    q, k, v = (x[0] for x in _qkv("grad"))
    loss = lambda q, k, v: _example(q, k, v).square().sum()  # noqa: E731
    report = Report(to="sigmoid")
    with pytest.warns(Warning, match="torch.func transform"):
        got = compile_rewritten(torch.func.grad(loss), report, to="sigmoid", bias=-2.0)(q, k, v)
    assert_close_rel(got, torch.func.grad(loss)(q, k, v), 1e-5, "gradient")
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "torch.autograd" in site.reason, report


@pytest.mark.parametrize("fn", [_example, _example_sdpa], ids=["matmul", "sdpa"])
def test_what_the_reason_recommends_rewrites_and_equals_vmap(fn):
    """The same function compiled without vmap, called on the batch: rewritten, equal to vmap(fn)."""
    torch._dynamo.reset()
    q, k, v = _qkv(f"batch{fn.__name__}")
    report = Report(to="softmax")
    got = compile_rewritten(fn, report, to="softmax", strict=True)(q, k, v)
    assert_close_rel(got, torch.vmap(fn)(q, k, v), 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten", report
