"""attnrewrite.SlidingCache: on the llama target, a prefill, one token at a time and uneven steps give the
logits of the model rewritten to sliding_window on the whole sequence; a layer keeps at most
sinks + window entries; on random q/k/v the steps equal the op."""

import functools

import pytest
import torch

import attnrewrite
from attnrewrite import ops
from attnrewrite.decode.sliding import SlidingLayer
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.targets.llama import Llama
from attnrewrite.testing.caches import random_qkv, through_layer

T = 30
TOKENS = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window,sinks", [(5, 0), (4, 2)])
def test_llama_prefill_equals_token_by_token_decode(window, sinks):
    torch.manual_seed(0)
    model = Llama.from_name("tiny").double().eval()
    backend = functools.partial(attnrewrite_backend, options=dict(to="sliding_window", compiler="eager", strict=True,
                                                                  window=window, sinks=sinks))
    with torch.no_grad():
        want = torch.compile(model, backend=backend)(TOKENS)
        exact = model(TOKENS)
    assert (want - exact).abs().max() > 1e-3  # the window really cuts keys off at T = 30
    for steps in ([1] * T, [T], [7, 1, 1, 12, 1, 8]):
        cache = attnrewrite.SlidingCache(window=window, sinks=sinks)
        model.setup_cache(2, T, cache=cache)
        got, start = [], 0
        with torch.no_grad():
            for count in steps:
                got.append(model(TOKENS[:, start:start + count], torch.arange(start, start + count)))
                start += count
        # the target's softmax runs in float32 even for float64 weights; the op computes in float64
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=1e-5, msg=str(steps))
        assert all(layer.key_store.shape[2] == window + sinks and layer.entries() <= window + sinks
                   for layer in cache.layers)


@pytest.mark.parametrize("steps", [[1] * 23, [23], [5, 1, 9, 1, 7]])
def test_steps_through_a_layer_equal_the_op(steps):
    q, k, v = random_qkv(sum(steps))
    want = ops.sliding_window_attention(q, k, v, enable_gqa=True, window=6, sinks=2)
    layer = SlidingLayer(window=6, sinks=2)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    torch.testing.assert_close(through_layer(layer, q, k, v, steps), want, rtol=0, atol=1e-12)
    assert layer.entries() == 8 and layer.get_seq_length() == 23
    assert layer.kept_positions().tolist() == [0, 1, 17, 18, 19, 20, 21, 22]


def test_transformers_update_returns_keys_the_op_reads_as_the_sequence():
    """update() hands a transformers model the kept keys in order: the op with the same window and sinks on
    them gives each one-token step exactly the whole-sequence op's row."""
    q, k, v = random_qkv(20)
    want = ops.sliding_window_attention(q, k, v, enable_gqa=True, window=5, sinks=1)
    cache = attnrewrite.SlidingCache(window=5, sinks=1)
    rows = []
    for i in range(20):
        keys, values = cache.update(k[:, :, i:i + 1], v[:, :, i:i + 1], 0)
        assert keys.shape[2] == min(i + 1, 7)  # at most sinks + window kept, plus the new token
        rows.append(ops.sliding_window_attention(q[:, :, i:i + 1], keys, values, enable_gqa=True, window=5, sinks=1))
    torch.testing.assert_close(torch.cat(rows, 2), want, rtol=0, atol=1e-12)
    assert cache.layers[0].get_mask_sizes(1) == (7, 14)


def _hf_llama(impl, window):
    import transformers as T

    import attnrewrite.hf

    attnrewrite.hf.register()
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    config.sliding_window = window
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()


def test_transformers_registry_equals_mistral_and_decodes_with_the_cache():
    """attnrewrite_sliding_window on a transformers Llama equals Mistral's own window-4 attention (same
    weights); fed one token at a time through SlidingCache it gives the same logits."""
    import transformers as T

    model = _hf_llama("attnrewrite_sliding_window", 4)
    mistral = T.MistralForCausalLM._from_config(T.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4), attn_implementation="eager").eval()
    mistral.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(want, mistral(ids).logits, rtol=1e-5, atol=1e-5)
        assert (want - _hf_llama("eager", None)(ids).logits).abs().max() > 1e-3
        cache = attnrewrite.SlidingCache(window=4)
        steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)
    assert all(layer.entries() == 4 for layer in cache.layers)
