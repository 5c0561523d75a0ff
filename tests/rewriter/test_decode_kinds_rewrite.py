"""The summary and hashed kinds in the pass: the llama target's causal sites are rewritten and compute the
op; bidirectional, cross-attention, masked-per-query and score-modified sites are skipped with the reason;
learned variants get their parameters from convert and train."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnrewrite
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.rewriter.report import Report
from attnrewrite.targets import bert, llama
from attnrewrite.testing.checks import compile_rewritten
from attnrewrite.testing.targets import hand_written_llama

OPTIONS = {"summary": dict(chunk_size=4, window_chunks=1), "hashed": dict(bits=16, top_k=3, window=3, sinks=1)}
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _reference_attend(kind, options):
    """The kind written out in plain torch for the llama target's layers: the readable references
    (``kernels/*/reference.py``, loops over queries), which share no code with the ops the rewrite emits."""

    def attend(q, k, v, mask):
        if kind == "summary":
            return naive_summary_attention(q, k, v, is_causal=True, **options)
        # the kind's default: random hyperplanes drawn from seed 0, shared by queries and keys
        hyperplanes = torch.randn(q.shape[-1], options["bits"], generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)
        rest = {key: value for key, value in options.items() if key != "bits"}
        return naive_hashed_attention(q, k, v, is_causal=True, proj_q=hyperplanes, proj_k=hyperplanes, **rest)[0]

    return attend


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_llama_target_rewritten_equals_the_hand_written_oracle(kind):
    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny").double().eval()
    oracle = hand_written_llama(model, _reference_attend(kind, OPTIONS[kind]))
    report = Report()
    with torch.no_grad():
        got = compile_rewritten(model, report, to=kind, **OPTIONS[kind])(TOKENS)
        want = oracle(TOKENS)
    assert len(report.rewritten) == 2 and not report.skipped, report
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_bidirectional_models_are_skipped_with_the_reason(kind):
    model = bert.Bert.from_name("tiny").eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    report = Report()
    out = compile_rewritten(model, report, to=kind)(ids, torch.ones(2, 12, dtype=torch.long))
    assert torch.isfinite(out).all() and not report.rewritten
    assert all("not causal self-attention" in s.reason for s in report.attention_sites())


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, memory):
        q = self.proj(x).view(1, 10, 2, 4).transpose(1, 2)
        k = memory.view(1, 6, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, k)


class _CausalAndPerQueryMask(nn.Module):
    """Causal attention whose mask also holds a data-dependent part that differs from query to query."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("causal", torch.ones(10, 10, dtype=torch.bool).tril())

    def forward(self, x, allowed):
        q = self.proj(x).view(1, 10, 2, 4).transpose(1, 2)
        scores = (q @ q.transpose(-1, -2)) * 0.5
        scores = scores.masked_fill(~self.causal, float("-inf")).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, -1) @ q


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_cross_attention_is_skipped(kind):
    report = Report()
    compile_rewritten(_CrossAttention(), report, to=kind)(torch.randn(1, 10, 8), torch.randn(1, 6, 8))
    assert not report.rewritten
    assert any("not causal self-attention" in s.reason for s in report.attention_sites())


def test_a_mask_that_varies_across_queries_is_skipped_by_summary_only():
    for kind, rewritten in (("summary", False), ("hashed", True)):
        report = Report()
        torch._dynamo.reset()
        allowed = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) > 0.2
        allowed.fill_diagonal_(True)
        compile_rewritten(_CausalAndPerQueryMask(), report, to=kind)(torch.randn(1, 10, 8), allowed)
        assert bool(report.rewritten) == rewritten, report
        if not rewritten:
            assert "varies across queries" in report.attention_sites()[0].reason


@pytest.mark.parametrize("kind,option", [("summary", {"summary": "learned"}), ("hashed", {"hash": "learned"})])
def test_learned_variants_are_converted_and_train(kind, option):
    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny")
    options = {**OPTIONS[kind], **option}
    report = attnrewrite.explain(model, TOKENS, to=kind, options=options)
    assert not report.rewritten and all("attnrewrite.convert" in s.reason for s in report.skipped)

    model = attnrewrite.convert(model, kind, (TOKENS,), **options)
    states = [n for n, _ in model.named_parameters() if "attnrewrite" in n]
    assert states and all(n.startswith("layers.") and f".attention.attnrewrite_{kind}." in n for n in states)
    report = Report()
    compiled = compile_rewritten(model, report, to=kind, compiler="aot_eager", **options)
    logits = compiled(TOKENS)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    assert len(report.rewritten) == 2
    for name, p in model.named_parameters():
        if "attnrewrite" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
