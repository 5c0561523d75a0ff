"""The backend as users meet it: the entry point, options, strict mode, fallback, dynamic shapes,
the decorator, training, inductor and returned attention weights."""

import importlib.metadata
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import attnrewrite
from attnrewrite.rewriter import pipeline
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import check_rewrite, compile_rewritten


class Block(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.dropout = dropout

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(8)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        p = F.dropout(torch.softmax(s, dim=-1), p=self.dropout, training=self.training)
        return (p @ v).transpose(1, 2).reshape(b, t, c)


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    ours = [ep for ep in eps if ep.name == "attnrewrite"]
    if not ours:
        pytest.skip("attnrewrite is not installed (running from a source tree)")
    assert ours[0].value == "attnrewrite.rewriter.backend:attnrewrite_backend"


def test_backend_by_name():
    attnrewrite.register()
    model, x = Block().eval(), torch.randn(2, 8, 32)
    compiled = torch.compile(model, backend="attnrewrite", options={"compiler": "eager"})
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert attnrewrite.recent_reports()[-1].rewritten


@pytest.mark.parametrize("options,error,match", [
    ({"to": "nonsense"}, ValueError, "unknown attention kind 'nonsense'"),
    ({"compiler": "tvm"}, ValueError, "'compiler' must be one of"),
    ({"strict": "yes"}, TypeError, "'strict' must be a bool"),
    ({"feature_map": "elu"}, ValueError, "unknown option"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        attnrewrite.rewrite(Block(), **options)


def test_internal_error_falls_back_with_a_warning(monkeypatch):
    """A failing pass restores the graph and says so with a RewriteWarning (not only a log line)."""
    from attnrewrite.rewriter.failures import reset_warnings

    def broken(ctx):
        raise RuntimeError("boom")

    reset_warnings()
    monkeypatch.setattr(pipeline, "STAGES", pipeline.STAGES[:-2] + (("rewrite", broken),) + pipeline.STAGES[-1:])
    model, x = Block().eval(), torch.randn(2, 8, 32)
    report = Report()
    with pytest.warns(attnrewrite.RewriteWarning, match=r"not rewritten to softmax at 1 site.*boom"):
        out = compile_rewritten(model, report)(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # the original graph ran
    assert report.errors and not report.rewritten and "boom" in report.sites[0].reason


def test_a_site_left_as_it_was_warns_once_per_cause():
    """Non-strict: each cause warns once (a second model with the same cause is quiet); strict raises
    RewriteFailed listing each site and its cause."""
    import warnings

    from attnrewrite.rewriter.failures import reset_warnings

    class Biased(Block):
        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
            bias = torch.arange(t, dtype=x.dtype)[None, :] * 0.1  # an additive bias: linear cannot honour it
            return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v

    reset_warnings()
    x = torch.randn(2, 8, 32)
    with pytest.warns(attnrewrite.RewriteWarning, match="not rewritten to linear at 1 site.*additive bias"):
        compile_rewritten(Biased().eval(), to="linear")(x)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        compile_rewritten(Biased().eval(), to="linear")(x)  # the same cause: already said
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed) as caught:  # itself, not Dynamo's BackendCompilerFailed
        compile_rewritten(Biased().eval(), to="linear", strict=True)(x)
    (failure,) = caught.value.failures
    assert "additive bias" in failure.cause and failure.module == ""


def test_internal_error_on_one_site_skips_that_site(monkeypatch):
    from attnrewrite.patterns import masks

    def broken(site, evaluator):
        raise KeyError("site-local failure")

    monkeypatch.setattr(masks, "resolve", broken)
    report = Report()
    model, x = Block().eval(), torch.randn(2, 8, 32)
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=0, atol=0)
    (site,) = report.sites
    assert site.status == "skipped" and "internal error in resolve" in site.reason


def test_strict_raises(monkeypatch):
    from attnrewrite.patterns import masks

    monkeypatch.setattr(masks, "resolve", lambda site, ev: (_ for _ in ()).throw(KeyError("no")))
    compiled = compile_rewritten(Block().eval(), strict=True)
    with pytest.raises(Exception, match="no"):
        compiled(torch.randn(2, 8, 32))


def test_strict_raises_on_an_attention_site_that_is_not_rewritten():
    class WrongDim(Block):
        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
            return torch.softmax(q @ k.transpose(-2, -1), -2) @ v  # over the queries: not attention

    compiled = compile_rewritten(WrongDim().eval(), strict=True)
    compiled(torch.randn(2, 8, 32))  # a near miss (no spec) is not a failure...
    assert attnrewrite.recent_reports()[-1].skipped


def test_dynamic_shapes_do_not_recompile_per_length():
    from attnrewrite.rewriter.backend import attnrewrite_backend

    calls = []
    model = Block().eval()
    report = Report()

    def counting(gm, example_inputs, **kw):
        calls.append(len(gm.graph.nodes))
        return attnrewrite_backend(gm, example_inputs, options={"compiler": "eager"}, _report_sink=report.merge)

    compiled = torch.compile(model, backend=counting, dynamic=True)
    for t in (8, 12, 16, 31):
        x = torch.randn(2, t, 32)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1, f"compiled {len(calls)} times"
    assert report.rewritten and report.rewritten[0].spec["causal"]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dynamic_shapes_on_llama(impl):
    """HF computes the scale from the head dim, a SymFloat under dynamic=True: still one compile."""
    from attnrewrite.rewriter.backend import attnrewrite_backend

    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
    calls, report = [], Report()

    def counting(gm, example_inputs, **kw):
        calls.append(1)
        return attnrewrite_backend(gm, example_inputs, options={"compiler": "eager"}, _report_sink=report.merge)

    compiled = torch.compile(model, backend=counting, dynamic=True)
    for t in (8, 12, 16, 31):
        ids, mask = torch.randint(0, 100, (2, t)), torch.ones(2, t, dtype=torch.long)
        mask[0, -2:] = 0
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and len(report.rewritten) == 2, report


def test_decorator_on_a_class_and_an_instance():
    @attnrewrite.rewrite(to="softmax", compiler="eager")
    class Decorated(Block):
        pass

    model, x = Decorated().eval(), torch.randn(2, 8, 32)
    reference = Block().eval()
    reference.load_state_dict(model.state_dict())  # the decorator does not wrap: same state_dict keys
    before = attnrewrite.recent_reports()[-1:]  # (the log keeps the last 64: compare identities, not lengths)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    after = attnrewrite.recent_reports()[-1]
    assert (not before or after is not before[0]) and after.rewritten

    instance = attnrewrite.rewrite(Block().eval(), compiler="eager")
    assert isinstance(instance, Block)
    instance(x)
    assert attnrewrite.recent_reports()[-1].rewritten


def test_bare_decorator():
    @attnrewrite.rewrite
    class Bare(Block):
        pass

    assert isinstance(Bare(), Block)


def test_dropout_is_carried_into_the_op_in_training():
    model, x = Block(dropout=0.25).train(), torch.randn(2, 8, 32)
    report = attnrewrite.explain(model, x)
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["dropout_p"] == 0.25
    report = attnrewrite.explain(model.eval(), x)
    assert report.sites[0].spec["dropout_p"] == 0.0


def test_training_gradients_through_aot_autograd():
    """With AOTAutograd the rewrite happens before the joint graph: the op's own backward is used."""
    check_rewrite(Block().eval(), {"x": torch.randn(2, 8, 32)}, expected_sites=1, compiler="aot_eager")


@pytest.mark.slow
def test_inductor_forward_and_backward():
    check_rewrite(Block().eval(), {"x": torch.randn(2, 8, 32)}, expected_sites=1, compiler="inductor", rtol=1e-4)


def test_returned_attention_weights_are_kept():
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 8))
    report = Report()
    got = compile_rewritten(model, report)(input_ids=ids, output_attentions=True)
    want = model(input_ids=ids, output_attentions=True)
    assert len(report.rewritten) == 2 and all(s.spec["weights_escape"] for s in report.rewritten)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_report_prints_a_table():
    report = attnrewrite.explain(Block().eval(), torch.randn(2, 8, 32))
    text = str(report)
    assert "1 rewritten, 0 skipped" in text
    for column in ("status", "module", "pattern", "causal", "gqa", "scale", "bias", "reason"):
        assert column in text
    site = report.sites[0]
    assert set(site.spec) >= {"causal", "kv_groups", "scale", "has_bias", "dropout_p"}
    assert site.pattern == "eager_matmul" and site.reason is None


def test_no_warnings_on_a_clean_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnrewrite.explain(Block().eval(), torch.randn(2, 8, 32))


def test_identical_layers_are_certified_once_and_different_ones_each(monkeypatch):
    from attnrewrite.rewriter import certify as certify_module

    calls = []
    real = certify_module.certify
    monkeypatch.setattr(pipeline, "certify", lambda site, ev, **kw: (calls.append(site), real(site, ev, **kw))[1])

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(4))

        def forward(self, x):
            x = self.blocks[0](x) + self.blocks[1](x) + self.blocks[2](x)
            b, t, c = x.shape  # a fourth site without the causal mask: a different function
            q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.blocks[3].qkv(x).split(c, dim=-1))
            return x + (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(b, t, c)

    report = Report()
    model, x = Mixed().eval(), torch.randn(2, 8, 32)
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(report.rewritten) == 4
    assert len(calls) == 2  # three identical causal layers share one proof; the bidirectional one has its own


def test_every_stage_is_timed_and_counted_into_the_report():
    """Report.stages lists the pipeline's stages in order, with times and the sites in play; a site
    the kind cannot honour leaves at 'select', and graphs merge stage by stage."""
    import attnrewrite

    def two_sites(q, k, v, bias):
        plain = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
        biased = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1) @ v
        return plain + biased

    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    report = attnrewrite.explain(two_sites, q, k, v, torch.randn(6, 6), to="linear")
    assert [s.name for s in report.stages] == [name for name, _ in pipeline.STAGES]
    counts = {s.name: (s.sites_in, s.sites_out) for s in report.stages}
    assert counts["match"] == (0, 2) and counts["select"] == (2, 1) and counts["rewrite"] == (1, 1), counts
    assert all(s.seconds >= 0 for s in report.stages) and report.stages[-1].sites_out == len(report.rewritten)
    assert "stages: functionalise" in str(report) and "select" in str(report)
    merged = attnrewrite.Report()
    merged.merge(report)
    merged.merge(report)
    assert [s.sites_out for s in merged.stages] == [2 * s.sites_out for s in report.stages]
