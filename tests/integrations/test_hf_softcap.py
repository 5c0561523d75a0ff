"""HF's ``softcap`` (Gemma-2's ``attn_logit_softcapping``) through attnrewrite's attention functions.

transformers passes the cap to the attention function as a keyword; each ``attnrewrite_*`` function must
apply it (c·tanh(s / c) on the scores, before the mask) or refuse — never drop it silently.  Oracles: the
model's own eager attention (softmax; hashed and sliding-window with windows covering the sequence, where
they are exact softmax) and a sigmoid written here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from transformers.models.gemma2 import modeling_gemma2

import attnrewrite.hf
from attnrewrite import HashedCache, SummaryCache

CAP = 0.5  # low enough that every score is capped hard: dropping the cap changes every logit
HASHED = dict(bits=16, top_k=4, window=3, sinks=1)
SUMMARY = dict(chunk_size=2, window_chunks=1)


def _gemma(impl: str, cap: float | None = CAP, sliding_window: int = 4):
    attnrewrite.hf.register()
    config = T.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=sliding_window,
        max_position_embeddings=64, attn_logit_softcapping=cap, final_logit_softcapping=None,
        attention_dropout=0.0)
    config.hashed_attention = dict(HASHED)
    config.summary_attention = dict(SUMMARY)
    torch.manual_seed(7)
    model = T.Gemma2ForCausalLM(config)
    with torch.no_grad():  # large q/k so that the cap matters
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    model.config._attn_implementation = impl  # same weights, another attention function
    return model.eval()


def _ids(batch=2, length=10):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(3))


def _logits(impl, ids, **model_options):
    with torch.no_grad():
        return _gemma(impl, **model_options)(input_ids=ids, use_cache=False).logits


def test_the_cap_changes_the_model():
    """The comparisons below have teeth: Gemma-2 with and without its cap differ."""
    ids = _ids()
    assert (_logits("eager", ids) - _logits("eager", ids, cap=None)).abs().max() > 1e-1


@pytest.mark.parametrize("impl,sliding_window", [("attnrewrite_softmax", 4), ("attnrewrite_sliding_window", 64),
                                                 ("attnrewrite_hashed", 64), ("attnrewrite_summary", 64)])
def test_exact_kinds_apply_the_cap_as_eager_gemma_does(impl, sliding_window):
    """Softmax always, and sliding-window / hashed when their window covers the sequence, are exact
    softmax: with the cap applied they equal Gemma-2's eager attention."""
    ids = _ids()
    if impl == "attnrewrite_hashed":
        model = _gemma(impl, sliding_window=sliding_window)
        model.config.hashed_attention = dict(HASHED, window=64)  # every key in the window: exact softmax
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
    elif impl == "attnrewrite_summary":
        model = _gemma(impl, sliding_window=sliding_window)
        model.config.summary_attention = dict(SUMMARY, window_chunks=32)  # no chunk summarised: exact softmax
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
    else:
        got = _logits(impl, ids, sliding_window=sliding_window)
    want = _logits("eager", ids, sliding_window=sliding_window)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _hand_written_sigmoid(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                          **kwargs):
    """sigmoid(c·tanh(s/c) + b_i)·v over the keys HF's mask keeps, b_i = −log(keys query i sees)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    s = torch.tanh(query @ key.transpose(2, 3) * scaling / softcap) * softcap
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
    keep = keep[..., :key.shape[-2]]
    bias = -torch.log(keep.sum(-1, keepdim=True).clamp(min=1).to(s.dtype))
    w = torch.sigmoid(s + bias).masked_fill(~keep, 0.0)
    return (w @ value).transpose(1, 2).contiguous(), None


def test_sigmoid_applies_the_cap(monkeypatch):
    ids = _ids()
    got = _logits("attnrewrite_sigmoid", ids)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_gemma2, "eager_attention_forward", _hand_written_sigmoid)
        want = _logits("eager", ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["attnrewrite_softmax", "attnrewrite_sigmoid"])
def test_returned_weights_are_capped(impl):
    """output_attentions: softmax returns eager Gemma's probabilities; sigmoid's weights times v are
    its output (checked on the first layer's weights: rows of the capped sigmoid, in (0, 1))."""
    ids = _ids(1, 6)
    with torch.no_grad():
        got = _gemma(impl)(input_ids=ids, output_attentions=True, use_cache=False).attentions
        want = _gemma("eager")(input_ids=ids, output_attentions=True, use_cache=False).attentions
    assert len(got) == 2
    if impl == "attnrewrite_softmax":
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    else:  # capped scores lie in (−CAP, CAP): every kept weight within sigmoid(±CAP − log n)
        w = got[0][0, :, -1]  # last query sees 4 keys (the sliding layer's window)
        kept = w[w > 0]
        lo, hi = 1 / (1 + math.exp(CAP + math.log(4))), 1 / (1 + math.exp(-CAP + math.log(4)))
        assert kept.numel() == 4 * 4 and ((kept > lo) & (kept < hi)).all(), w


def test_linear_refuses_a_capped_model():
    with pytest.raises(ValueError, match="soft-caps its attention scores"):
        _logits("attnrewrite_linear", _ids(), sliding_window=64)


def test_a_bad_cap_is_refused():
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        attnrewrite.hf._softcap({"softcap": -1.0})


def test_hashed_decode_steps_apply_the_cap():
    """A HashedCache decode step (selected keys, written-out softmax) equals the cacheless capped model's
    last row; and the step differs from the same step without the cap."""
    ids = _ids(1, 12)
    model = _gemma("attnrewrite_hashed", sliding_window=64)
    with torch.no_grad():
        cache = HashedCache(**HASHED)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        want = model(input_ids=ids, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-5)
        uncapped = _gemma("attnrewrite_hashed", cap=None, sliding_window=64)
        cache = HashedCache(**HASHED)
        uncapped(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        other = uncapped(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert (step - other).abs().max() > 1e-2


def test_summary_decode_steps_apply_the_cap():
    """SummaryCache steps (summaries + window, written-out softmax) equal the cacheless capped model's rows,
    past the window (12 tokens, chunks of 2, one window chunk: most keys are summaries)."""
    ids = _ids(1, 12)
    model = _gemma("attnrewrite_summary", sliding_window=64)
    with torch.no_grad():
        cache = SummaryCache(**SUMMARY)
        steps = torch.cat([model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True,
                                 position_ids=torch.tensor([[i]])).logits for i in range(12)], 1)
        want = model(input_ids=ids, use_cache=False).logits
        uncapped = _gemma("attnrewrite_summary", cap=None, sliding_window=64)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(steps, want, rtol=1e-4, atol=1e-5)
    assert (want - uncapped).abs().max() > 1e-1
