"""What the pass says in setups a user builds around it (red team 15): a module rewritten with ``attnrewrite.rewrite``
called under a ``torch.func`` transform or otherwise run uncompiled, and setups that were tried and work."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnrewrite
from attnrewrite.rewriter.failures import reset_warnings
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten
# causal self-attention through SDPA, [B, T, 16] -> [B, T, 16], two heads (here called with x alone)
from test_trust_setups14 import Attention


class OtherAttention(Attention):
    pass


def sigmoid_attention(attn, x):
    """The sigmoid kind written by hand: sigmoid(s·q·kᵀ − log n)·v, n the keys each query sees."""
    q, k, v = attn.split(x, attn.q), attn.split(x, attn.k), attn.split(x, attn.v)
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    n = keep.sum(-1, keepdim=True)
    probs = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) - n.log()) * keep
    return attn.o((probs @ v).transpose(1, 2).flatten(2))


def _rewritten(cls=Attention, **options):
    torch.manual_seed(0)
    return attnrewrite.rewrite(cls().eval(), to="sigmoid", compiler="eager", **options)


def _under(transform, module, x):
    """``module`` called under a torch.func transform: vmap over a leading dim of ``x``, or grad of a sum."""
    if transform == "vmap":
        return torch.vmap(module)(x.expand(3, *x.shape))
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,)).sum())(params)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_rewritten_module_under_a_torch_func_transform_is_said_and_stays_rewritten(transform):
    """``torch.vmap(model)`` / ``torch.func.grad`` over a module rewritten with ``attnrewrite.rewrite``: Dynamo runs
    no compiled code under a functorch transform and falls back to eager — silently, with the original attention —
    and marks the frame's code (``nn.Module._call_impl``) skipped for the process, so every later call of that
    module, and of every module compiled afterwards, ran its original attention too, with no word said."""
    module, x = _rewritten(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    torch.testing.assert_close(module(x), sigmoid_attention(module, x), rtol=1e-5, atol=1e-6)
    with pytest.warns(attnrewrite.RewriteWarning, match="inside a torch.func transform"):
        got = _under(transform, module, x)
    if transform == "vmap":  # the original attention ran, as said
        torch.testing.assert_close(got, Attention.forward(module, x).expand(3, 2, 6, 16), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        torch.testing.assert_close(module(x), sigmoid_attention(module, x), rtol=1e-5, atol=1e-6)
        later = _rewritten(OtherAttention)  # a module compiled afterwards
        torch.testing.assert_close(later(x), sigmoid_attention(later, x), rtol=1e-5, atol=1e-6)


def test_a_rewritten_module_under_a_torch_func_transform_raises_under_strict():
    module, x = _rewritten(strict=True), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match="inside a torch.func transform"):
        _under("vmap", module, x)


def test_verify_names_what_a_torch_func_transform_left_of_a_compiled_model():
    """``torch.compile(model, backend="attnrewrite")`` cannot tell (its backend is never called under a transform,
    and afterwards Dynamo skips the frame's code): ``verify`` names the attention that ran."""
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    compiled = compile_rewritten(model, to="sigmoid")
    torch.testing.assert_close(compiled(x), sigmoid_attention(model, x), rtol=1e-5, atol=1e-6)
    torch.vmap(compiled)(x.expand(3, 2, 6, 16))
    with pytest.raises(attnrewrite.RewriteFailed, match="ran eagerly"):
        attnrewrite.verify(compiled, x)


@pytest.mark.parametrize("how", ["copy", "force_eager"])
def test_a_rewritten_module_run_uncompiled_is_said(how):
    """A call of a rewritten module that Dynamo does not compile — a copy of an instance rewritten in place (its
    compile does not travel with it), ``set_stance("force_eager")`` — ran the original attention silently (``verify`` found it; nothing else did).  The module's pre-hook, which leaves
    nothing in a compiled graph, runs only then: it says so."""
    module, x = _rewritten(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    module(x)
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match="Dynamo did not compile this call"):
        if how == "copy":
            copy.deepcopy(module)(x)
        else:
            with torch.compiler.set_stance("force_eager"):
                module(x)


class Layer(nn.Module):
    """A residual layer around ``attn``, with a graph break before it (a print, a .item(), a data-dependent branch)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        torch._dynamo.graph_break()
        return x + self.attn(x)


class BrokenAttention(Attention):
    """The attention module's own forward breaks the graph between the projections and SDPA."""

    def forward(self, x):
        q, k, v = self.split(x, self.q), self.split(x, self.k), self.split(x, self.v)
        torch._dynamo.graph_break()
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(Attention()), Layer(BrokenAttention())])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_sites_after_a_graph_break_are_named_from_the_model_root():
    """A graph break in a layer makes Dynamo compile the rest of it (and of the attention module that breaks
    itself) as frames of their own, rooted at the layer or the attention module: their sites were reported as
    ``attn`` and ``<root>`` — in warnings too — where the model names them ``layers.0.attn`` and
    ``layers.1.attn``."""
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    report = Report(to="summary")
    with pytest.warns(attnrewrite.RewriteWarning, match=r"\(layers\.1\.attn\): summary cannot honour"):
        compile_rewritten(model, report, to="summary")(x)  # layer 1 is bidirectional: skipped, said by name
    assert sorted(s.module for s in report.sites) == ["layers.0.attn", "layers.1.attn"], report
    torch._dynamo.reset()
    assert sorted(s.module for s in attnrewrite.explain(model, x, to="sigmoid").sites) == ["layers.0.attn",
                                                                                           "layers.1.attn"]


def _encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.25, batch_first=True)


def test_multihead_attention_with_dropout_in_training_is_rewritten_with_it(monkeypatch):
    """``nn.MultiheadAttention`` (here inside ``nn.TransformerEncoderLayer``) with attention dropout in train mode
    was skipped silently ("written-out form differs from the fused op"): the check of its written-out form ran
    the fused op with its dropout on and compared two random draws.  The float64 evaluator turns dropout off for
    MHA's op as it does for SDPA's: the site is rewritten with its probability (sigmoid), or refused by name
    (linear), in train mode; eval mode is unchanged."""
    from attnrewrite.testing.checks import record_sigmoid_calls

    layer, x = _encoder_layer().train(), torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    calls = record_sigmoid_calls(monkeypatch)
    torch._dynamo.reset()
    reset_warnings()
    report = Report(to="sigmoid")
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        compiled = compile_rewritten(layer, report, to="sigmoid", strict=True)
        first, second = compiled(x, src_key_padding_mask=pad), compiled(x, src_key_padding_mask=pad)
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["dropout_p"] == 0.25, report
    assert [call["args"][0] for call in calls] == [0.25, 0.25]  # both calls ran the sigmoid op, with the dropout
    assert not torch.allclose(first, second)  # the dropout is drawn at each call
    layer.eval()
    torch.testing.assert_close(compiled(x, src_key_padding_mask=pad), compiled(x, src_key_padding_mask=pad))
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match="dropout on the attention probabilities"):
        compile_rewritten(layer.train(), to="linear", strict=True)(x, src_key_padding_mask=pad)


def test_a_fused_attention_op_left_fused_is_said(monkeypatch):
    """A fused attention op (MHA's) whose written-out form cannot be proven was skipped with no warning: the site
    has no spec, so it was not counted as attention left as it was."""
    from attnrewrite.ir.spec import NotAttention
    from attnrewrite.patterns import multihead

    def refuse(*args, **kwargs):
        raise NotAttention("written-out form differs from the fused op")

    monkeypatch.setattr(multihead, "unfuse", refuse)
    layer, x = _encoder_layer().eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match="attention in a form this version does not rewrite"):
        compile_rewritten(layer.self_attn, to="sigmoid")(x, x, x)


def test_generate_of_a_compiled_causal_lm_decodes_rewritten():
    """Tried and works: ``generate()`` of a tiny HF Llama (GQA, a left-padded row) whose forward is compiled to
    sigmoid with ``cache_implementation="static"`` (decode steps of one token against the cache, its unfilled slots
    masked; the default cache was tried too): every prefill and decode site is rewritten, and the logits
    of every step equal a cacheless run of the rewritten model over the whole sequence (sigmoid's ``bias="auto"``
    counts the keys each step sees, as the whole sequence does)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    torch._dynamo.reset()
    report = Report(to="sigmoid")
    model.forward = compile_rewritten(transformers.LlamaForCausalLM.forward.__get__(model), report, to="sigmoid",
                                      strict=True)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, cache_implementation="static")
    finally:
        del model.forward
    assert len(report.sites) >= 2 and all(s.status == "rewritten" for s in report.sites), report
    torch._dynamo.reset()
    whole = compile_rewritten(model, to="sigmoid", strict=True, dynamic=False)(
        out.sequences, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1), use_cache=False)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, whole.logits[:, 6 + step], rtol=1e-5, atol=1e-5)
