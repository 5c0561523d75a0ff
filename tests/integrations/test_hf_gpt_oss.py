"""HF gpt-oss (learned attention sinks, alternating sliding-window and full layers) through the compiler pass and
through attnrewrite's HF attention functions.

A tiny random GptOss model (offline, float32: its experts' grouped matmul takes no float64) compiled with
``to="softmax"``: every attention site — the sliding-window layer's and the full layer's — is rewritten with its
sink logits, and the compiled model equals the uncompiled one in its outputs and in the gradients of a training
step (the sinks' included).  ``attn_implementation="attnrewrite_softmax"`` honours the sinks HF passes as
``s_aux``; the other functions refuse them by name.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers as T

from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report

WINDOW = 4  # shorter than the sequence: the sliding layer's window masks keys


def _model():
    config = T.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                            max_position_embeddings=64, num_local_experts=2, num_experts_per_tok=1,
                            layer_types=["sliding_attention", "full_attention"], attention_dropout=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the default YaRN factor against a short context)
        model = T.GptOssForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that take a real share of each row
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def _compiled(model, report):
    backend = functools.partial(attnrewrite_backend, options={"to": "softmax", "compiler": "aot_eager"},
                                _report_sink=report.merge)
    return torch.compile(model, backend=backend)


def test_the_sinks_and_the_window_change_the_model():
    """The comparisons below have teeth: gpt-oss without its sinks, or with a window covering the sequence,
    computes other logits."""
    model, batch = _model(), _batch()
    with torch.no_grad():
        want = model(**batch).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
        assert (model(**batch).logits - want).abs().max() > 1e-3
        model = _model()
        model.config.sliding_window = model.model.layers[0].self_attn.sliding_window = 64  # (the mask reads config)
        assert (model(**batch).logits - want).abs().max() > 1e-3


@pytest.mark.slow
def test_gpt_oss_is_rewritten_to_softmax_exactly_in_a_training_step():
    model, batch = _model(), _batch()
    model.train()
    report = Report()
    got = _compiled(model, report)(**batch)
    attention = [s for s in report.sites if s.module.endswith("self_attn")]
    assert [s.status for s in attention] == ["rewritten", "rewritten"], report
    assert all("learned sink logits: exact (one zero-value key per head)" in s.notes for s in attention), report
    assert [len(s.spec["bias"]) for s in attention] == [2, 1], report  # the window's mask and the padding
    got.loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = model(**batch)
    want.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in got_grads, name
            continue
        assert name in got_grads, f"{name}: no gradient through the compiled model"
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(model.model.layers[i].self_attn.sinks.grad.abs().max() > 1e-6 for i in range(2))


def test_attnrewrite_softmax_honours_the_sinks_hf_passes():
    import attnrewrite.hf

    attnrewrite.hf.register()
    model, batch = _model().eval(), _batch()
    with torch.no_grad():
        want = model(**batch, output_attentions=True)
        model.config._attn_implementation = "attnrewrite_softmax"
        got = model(**batch, output_attentions=True)
    real = batch["attention_mask"].bool()  # (rows of padding see no key: 0 in one, a uniform average in the other)
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(mine.transpose(1, 2)[real], theirs.transpose(1, 2)[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["attnrewrite_sigmoid", "attnrewrite_sliding_window"])
def test_the_other_hf_functions_refuse_the_sinks(impl):
    import attnrewrite.hf

    attnrewrite.hf.register()
    model, batch = _model().eval(), _batch()
    model.config._attn_implementation = impl
    with pytest.raises(ValueError, match="learned sink logits .*s_aux"), torch.no_grad():
        model(**batch)


@pytest.mark.parametrize("kind", ["linear", "hashed", "summary"])
def test_the_causal_only_hf_functions_refuse_the_sinks(kind):
    """(A gpt-oss model's sliding-window mask stops these at their mask function; called directly they refuse the
    sinks by name.)"""
    import attnrewrite.hf

    module = _model().model.layers[1].self_attn
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    with pytest.raises(ValueError, match="learned sink logits .*s_aux"):
        getattr(attnrewrite.hf, f"{kind}_forward")(module, q, k, v, None, s_aux=module.sinks)
