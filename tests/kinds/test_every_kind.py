"""Tests generated from the kind registry: every kind × the reference targets × dtypes.

A new kind registered in ``attnrewrite.kinds`` gets these without editing a list: the targets it
cannot honour and the options that make it differ from softmax on short inputs are data beside
the kind (``Kind.expected_skips``, ``Kind.example_options``).

Each case compiles a target with the kind and checks that

- every attention site the kind can honour is rewritten *to that kind*, and the others are skipped
  with the declared reason (no silent softmax);
- the output is finite and, for kinds other than the exact one, differs from the original model
  (the new attention really ran), while the exact kind equals the original;
- in float32, gradients reach every parameter of the model through the rewritten graph.
"""

from __future__ import annotations

import pytest
import torch

import attnrewrite
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten
from attnrewrite.testing.targets import build

TARGETS = ("llama", "gpt2-eager", "bert", "vit")
#: dtypes beyond float32, each on one target (the CPU has no fast bf16 attention; keep CI short)
LOW_PRECISION = (("llama", torch.bfloat16),)

CASES = [(kind, target, torch.float32) for kind in attnrewrite.kinds.names() for target in TARGETS]
CASES += [(kind, target, dtype) for kind in attnrewrite.kinds.names() for target, dtype in LOW_PRECISION]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind,target,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kind_on_target(kind, target, dtype):
    spec = attnrewrite.kinds.get(kind)
    model, inputs, _ = build(target)
    model = model.to(dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        original = model(**inputs)

    report = Report()
    out = compile_rewritten(model, report, to=kind, **spec.example_options)(**inputs)

    sites = report.attention_sites()
    assert sites, report
    expected_skip = spec.expected_skips.get(target)
    if expected_skip is None:
        assert all(s.status == "rewritten" and s.kind == kind for s in sites), report
    else:
        assert all(s.status == "skipped" and expected_skip in s.reason for s in sites), report
    assert out.dtype == original.dtype and torch.isfinite(out).all()
    error = _relative(out, original)
    if kind == "softmax" or expected_skip is not None:
        assert error <= (1e-5 if dtype == torch.float32 else 2e-2), (kind, target, error)
    else:
        # 10x the exact kind's tolerance: the new attention ran (post-norm BERT, whose residual stream
        # dwarfs its tiny attention output, differs by 3.5e-4 under linear attention)
        assert error > 1e-4, f"{kind} on {target} computes softmax's output (relative difference {error:.1e})"

    if dtype == torch.float32:
        out.float().square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradient reached {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_kind_declares_checked_options():
    """Each option of each kind has a default its own check accepts."""
    for name in attnrewrite.kinds.names():
        kind = attnrewrite.kinds.get(name)
        assert kind.check_options({}) == kind.defaults
        assert kind.check_options(kind.example_options) == {**kind.defaults, **kind.example_options}
        for option, declared in kind.options.items():
            assert declared.check(declared.default) is None, (name, option)


def test_expected_skips_name_real_targets():
    from attnrewrite.testing.targets import NAMES

    for name in attnrewrite.kinds.names():
        assert set(attnrewrite.kinds.get(name).expected_skips) <= set(NAMES), name
