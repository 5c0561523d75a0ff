"""``HashedCache(far_dtype=...)``: decoding through the cache with mixed precision gives the op with the same
far_dtype on the whole sequence (far keys and values rounded, sinks and window at full precision), in one-token
steps, prefills and uneven steps, with padding, and through transformers' ``update``; cache dtypes whose values
cannot hold the rounded far keys are refused by name."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.decode.hashed import HashedCache, HashedLayer
from attnrewrite.testing.caches import (
    assert_equal_where_seen,
    attend_returned,
    hf_decode_mask,
    random_qkv,
    through_layer,
)
from attnrewrite.testing.caches import padding as padding_mask

OPTIONS = dict(bits=16, top_k=4, window=3, sinks=2)
STEPS = [[1] * 31, [31], [6, 1, 1, 11, 1, 11]]


def _layer(t, batch=2, dtype=torch.float64, far_dtype="bfloat16"):
    layer = HashedLayer(**OPTIONS, max_seq_len=t, far_dtype=far_dtype)
    layer.prepare(batch, 4, 2, 8, dtype, "cpu")
    return layer


@pytest.mark.parametrize("steps", STEPS)
def test_steps_equal_the_op_with_far_dtype(steps):
    t = sum(steps)
    q, k, v = random_qkv(t, seed=16)
    want = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, far_dtype="bfloat16", **OPTIONS)
    got = through_layer(_layer(t), q, k, v, steps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    full = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, **OPTIONS)
    assert (got - full).abs().max() > 1e-4  # the far keys did change the output


@pytest.mark.parametrize("padding", ["left", "inner"])
@pytest.mark.parametrize("steps", STEPS[1:])
def test_padded_steps_equal_the_op_with_far_dtype(padding, steps):
    """Sinks and window are each row's first and last valid keys, for the rounding as for the selection."""
    t = sum(steps)
    q, k, v = random_qkv(t, b=3, seed=17)
    valid = padding_mask(padding, t)
    want = ops.hashed_attention(q, k, v, valid[:, None, None, :], is_causal=True, enable_gqa=True,
                                far_dtype="bfloat16", **OPTIONS)
    assert_equal_where_seen(through_layer(_layer(t, batch=3), q, k, v, steps, key_valid=valid), want, valid)


def test_float32_cache_float8_and_bfloat16():
    t = 31
    q, k, v = (x.float() for x in random_qkv(t, seed=18))
    for far in ("bfloat16", "float8_e4m3fn"):
        if not hasattr(torch, far):
            continue
        want = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, far_dtype=far, **OPTIONS)
        got = through_layer(_layer(t, dtype=torch.float32, far_dtype=far), q, k, v, [5] + [1] * 26)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8_e4m3fn in this torch")
def test_bfloat16_cache_returns_the_float8_rounding_exactly():
    """A bfloat16 cache with float8 far keys returns the values a float32 cache returns for the same inputs:
    the rounding did not round again in bfloat16 (so the step reads the op's far keys)."""
    t = 29
    q, k, v = (x.to(torch.bfloat16) for x in random_qkv(t, seed=19))
    low, high = _layer(t, dtype=torch.bfloat16, far_dtype="float8_e4m3fn"), _layer(t, dtype=torch.float32,
                                                                                  far_dtype="float8_e4m3fn")
    for count, start in ((20, 0), (1, 20), (8, 21)):  # a prefill, a decode step, several tokens
        rows = slice(start, start + count)
        a = low.step(q[:, :, rows], k[:, :, rows], v[:, :, rows])
        b = high.step(q[:, :, rows].float(), k[:, :, rows].float(), v[:, :, rows].float())
        for x, y in zip(a[:2], b[:2]):
            assert x.dtype == torch.bfloat16 and torch.equal(x.float(), y)
        assert torch.equal(a[2], b[2]) if a[2] is not None else b[2] is None


def test_update_with_the_query_and_left_padding_equals_the_op():
    """transformers' path: every key while rows are short (the far ones rounded), then the selection."""
    t = 34
    q, k, v = random_qkv(t, b=3, seed=20)
    mask = padding_mask("left", t, pads=(0, 3, 14))
    want = ops.hashed_attention(q, k, v, mask[:, None, None, :], is_causal=True, enable_gqa=True,
                                far_dtype="bfloat16", **OPTIONS)
    cache = HashedCache(**OPTIONS, attention_mask=mask.long(), far_dtype="bfloat16")
    got = []
    for i in range(t):
        hf_mask = hf_decode_mask(cache, mask, i)
        keys, values = cache.update(k[:, :, i:i + 1], v[:, :, i:i + 1], 0, {"query_states": q[:, :, i:i + 1]})
        got.append(attend_returned(q[:, :, i:i + 1], keys, values, hf_mask))
    assert_equal_where_seen(torch.cat(got, 2), want, mask)


def test_off_by_default_and_refusals():
    assert HashedCache(**OPTIONS).options["far_dtype"] is None
    with pytest.raises(ValueError, match="far_dtype"):
        HashedCache(**OPTIONS, far_dtype="int8")
    with pytest.raises(ValueError, match="far_dtype='float16' values do not all fit .*bfloat16"):
        _layer(4, dtype=torch.bfloat16, far_dtype="float16")
    with pytest.raises(ValueError, match="far_dtype='bfloat16' values do not all fit .*float16"):
        _layer(4, dtype=torch.float16, far_dtype="bfloat16")
    _layer(4, dtype=torch.bfloat16, far_dtype="bfloat16")  # equal: nothing to round, taken


def _hf_llama(far_dtype):
    import transformers as T

    import attnrewrite.hf

    attnrewrite.hf.register()
    config = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    config.hashed_attention = dict(OPTIONS, far_dtype=far_dtype)
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(config, attn_implementation="attnrewrite_hashed").eval()


def test_transformers_generate_with_far_dtype_equals_a_full_rerun():
    """config.hashed_attention's far_dtype reaches the cacheless op; generate() with HashedCache(far_dtype=...)
    gives its logits at every step (the prompt through the op, the steps through the cache); a cache whose
    far_dtype differs from the config's is refused by name."""
    model = _hf_llama("bfloat16")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(21))
    new = 6
    with torch.no_grad():
        result = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                cache=HashedCache(**OPTIONS, far_dtype="bfloat16"), return_dict_in_generate=True,
                                output_logits=True)
        rerun = model(input_ids=result.sequences, use_cache=False).logits
        for step in range(new):
            torch.testing.assert_close(result.logits[step], rerun[:, 10 + step - 1], rtol=1e-4, atol=1e-5)
        full = _hf_llama(None)(input_ids=result.sequences, use_cache=False).logits
        assert (rerun - full).abs().max() > 1e-4  # the config's far_dtype reached the op
        with pytest.raises(ValueError, match="far_dtype"):
            model(input_ids=ids, cache=HashedCache(**OPTIONS), use_cache=True)
