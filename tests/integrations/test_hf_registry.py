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
