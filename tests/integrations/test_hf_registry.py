"""attnrewrite.hf.register(): the kinds as HF attention implementations, equal to the rewritten model."""

import pytest
import torch
import transformers as T

import attnrewrite.hf
from attnrewrite.testing.checks import compile_rewritten

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _inputs():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "linear"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_registry_equals_the_rewritten_model(kind, family):
    attnrewrite.hf.register()
    cls, cfg = (T.LlamaForCausalLM, T.LlamaConfig(**LLAMA)) if family == "llama" else (T.BertModel, T.BertConfig(**BERT))
    torch.manual_seed(0)
    base = cls._from_config(cfg, attn_implementation="eager").eval()
    registered = cls._from_config(type(cfg)(**(LLAMA if family == "llama" else BERT)),
                                  attn_implementation=f"attnrewrite_{kind}").eval()
    registered.load_state_dict(base.state_dict())
    out = lambda o: o.logits if family == "llama" else o.last_hidden_state  # noqa: E731
    inputs = _inputs()
    got = out(registered(**inputs))
    want = out(compile_rewritten(base, None, to=kind)(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_refuses_a_sliding_window_mask():
    attnrewrite.hf.register()
    cfg = T.MistralConfig(**LLAMA, sliding_window=4)
    model = T.MistralForCausalLM._from_config(cfg, attn_implementation="attnrewrite_linear").eval()
    with pytest.raises(ValueError, match="causal and key-padding masks only"):
        model(**_inputs())


def _llama(kind, **overrides):
    attnrewrite.hf.register()
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(T.LlamaConfig(**{**LLAMA, **overrides}),
                                           attn_implementation=f"attnrewrite_{kind}").eval()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "linear"])
def test_output_attentions_returns_the_kinds_weights(kind):
    """The weights returned are the ones the kind used: out = weights @ v, per layer (captured around
    the attention: v_proj's output in, o_proj's input out), and zero on masked keys."""
    model = _llama(kind)
    seen = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.v_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("v", i), out))
        attn.o_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("o", i), a[0]))
    inputs = _inputs()
    result = model(**inputs, output_attentions=True)
    assert len(result.attentions) == LLAMA["num_hidden_layers"]
    b, t = inputs["input_ids"].shape
    hq, hkv = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"]
    d = LLAMA["hidden_size"] // hq
    for i, weights in enumerate(result.attentions):
        assert weights.shape == (b, hq, t, t)
        v = seen["v", i].view(b, t, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        out = seen["o", i].view(b, t, hq, d).transpose(1, 2)
        torch.testing.assert_close(weights @ v, out, rtol=1e-4, atol=1e-5)
        assert bool((weights[1, :, :, 6:] == 0).all())  # padded keys
        assert bool((weights.triu(1) == 0).all())  # causal
    assert model(**inputs).attentions is None  # not materialised unless asked for


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_output_attentions_with_dropout_in_training_is_refused(kind):
    model = _llama(kind, attention_dropout=0.5).train()
    with pytest.raises(ValueError, match="cannot be returned"):
        model(**_inputs(), output_attentions=True)


def test_linear_refuses_attention_dropout_in_training():
    model = _llama("linear", attention_dropout=0.1).train()
    with pytest.raises(ValueError, match=r"attnrewrite_linear: attention dropout \(p=0.1\) cannot be honoured"):
        model(**_inputs())
    model.eval()(**_inputs())  # no dropout in eval: runs


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "linear"])
def test_generate_equals_a_full_rerun(kind):
    """Greedy generate() with the KV cache: each step's token is the argmax of a full, cacheless run
    over everything so far (one-token steps with Tq=1 < Tk)."""
    model = _llama(kind)
    ids = _inputs()["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched generation pads
    result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True, output_logits=True)
    tokens = result.sequences
    assert tokens.shape == (2, ids.shape[1] + 4)
    for step in range(4):
        prefix = tokens[:, : ids.shape[1] + step]
        prefix_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = model(input_ids=prefix, attention_mask=prefix_mask, position_ids=positions,
                       use_cache=False).logits[:, -1]
        torch.testing.assert_close(result.logits[step], logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(logits.argmax(-1), tokens[:, ids.shape[1] + step]), step
