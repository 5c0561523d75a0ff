"""attnrewrite.SummaryCache: running T tokens at once, one at a time, or in uneven steps through the cache
gives the op's outputs; memory is O(window + T / chunk_size) and accounted exactly; transformers models
decode with it."""

import pytest
import torch

import attnrewrite
from attnrewrite import ops
from attnrewrite.decode.summary import SummaryCache, SummaryLayer
from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.testing.caches import (
    assert_equal_where_seen,
    random_qkv,
    through_layer,
)
from attnrewrite.testing.caches import padding as padding_mask


@pytest.mark.parametrize("steps", [
    [1] * 29,                 # token by token
    [29],                     # one prefill
    [5, 1, 1, 9, 3, 1, 10],   # prefills of uneven length between decode steps, across chunk boundaries
])
@pytest.mark.parametrize("learned", [False, True])
def test_steps_through_the_cache_equal_the_op(steps, learned):
    chunk, window, t = 3, 2, sum(steps)
    q, k, v = random_qkv(t)
    query = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if learned else None
    want = ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=chunk, window_chunks=window,
                                 summary="learned" if learned else "mean", summary_query=query)
    layer = SummaryLayer(chunk, window, query, max_seq_len=t)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    torch.testing.assert_close(through_layer(layer, q, k, v, steps), want, rtol=0, atol=1e-12)


def test_memory_is_window_plus_one_summary_per_chunk():
    chunk, window, t = 4, 3, 103
    _, k, v = random_qkv(t, b=1)
    layer = SummaryLayer(chunk, window, max_seq_len=t)
    layer.prepare(1, 2, 2, 8, torch.float64, "cpu")
    for i in range(t):
        layer.step(k[:, :, i:i + 1], v[:, :, i:i + 1])
        n_sum = max(0, (i + 1) // chunk - window)  # state is folded lazily, at the next step
        assert layer.n_sum <= n_sum and layer.entries() <= SummaryCache.entries_bound(i + 1, chunk, window)
    store = layer.key_store
    assert store.shape[2] == layer.capacity_for(t) == (t - 1) // chunk - window + (window + 1) * chunk
    assert layer.nbytes() == 2 * store.numel() * store.element_size()


def test_cache_is_six_times_smaller_at_64k_with_chunks_of_8():
    """The issue's target, from allocated bytes: full cache 65536 entries vs summaries + window."""
    layer = SummaryLayer(8, 128, max_seq_len=65536)
    layer.prepare(1, 1, 1, 4, torch.float32, "cpu")
    full = 2 * 65536 * 4 * 4
    assert full / layer.nbytes() >= 6, full / layer.nbytes()


def test_positions_must_continue_the_sequence():
    q, k, v = random_qkv(4)
    layer = SummaryLayer(2, 1)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    layer.attend(torch.arange(2), q[:, :, :2], k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="positions in order"):
        layer.attend(torch.tensor([3]), q[:, :, :1], k[:, :, :1], v[:, :, :1])


def test_learned_cache_needs_the_converted_states():
    from attnrewrite.targets.llama import Llama

    model = Llama.from_name("tiny")
    with pytest.raises(ValueError, match="attnrewrite.convert"):
        model.setup_cache(1, 16, cache=SummaryCache(summary="learned"))


def test_transformers_model_decodes_with_the_cache():
    """An HF Llama decoding token by token through SummaryCache gives the logits of the same model
    rewritten to the summary kind on the whole sequence (HF's causal mask sees every returned key)."""
    import functools

    import transformers as T

    from attnrewrite.rewriter.backend import attnrewrite_backend

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").double().eval()
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
    options = dict(to="summary", compiler="eager", chunk_size=4, window_chunks=2)
    with torch.no_grad():
        want = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=options))(ids).logits
        torch._dynamo.reset()
        exact_kind = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=dict(
            to="softmax", compiler="eager")))(ids).logits
        exact = model(ids).logits
        cache = attnrewrite.SummaryCache(chunk_size=4, window_chunks=2)
        got = torch.cat([model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(30)], 1)
    assert (want - exact).abs().max() > 1e-3  # the kind is not exact attention
    # HF's eager attention takes its softmax in float32 even in a float64 model, the ops in float64:
    # the cache path may differ from the op by that rounding, measured on the exact kind.
    rounding = (exact_kind - exact).abs().max()
    assert (got - want).abs().max() <= 2 * rounding + 1e-12, ((got - want).abs().max(), rounding)
    assert cache.get_seq_length() == 30 and cache.layers[0].entries() < 30


def test_transformers_prefill_that_needs_per_query_summaries_is_refused():
    _, k, v = random_qkv(12)
    layer = SummaryLayer(2, 1)
    with pytest.raises(ValueError, match="different chunk summaries"):
        layer.update(k, v)
    layer.update(k[:, :, :3], v[:, :, :3])  # within the first window: a causal mask says it all
    assert layer.get_seq_length() == 3


@pytest.mark.parametrize("padding", ["left", "right", "inner"])
@pytest.mark.parametrize("chunk,window", [(3, 2), (4, 1), (2, 0), (5, 3)])
@pytest.mark.parametrize("steps", [[1] * 31, [31], [7, 1, 1, 9, 3, 1, 9]])
@pytest.mark.parametrize("learned", [False, True])
def test_padded_batch_through_the_cache_equals_the_op_with_the_padding_mask(padding, chunk, window, steps, learned):
    """Padded keys are left out of the window and of the summaries, in the cache as in the op: a chunk that
    holds padding is summarised over its tokens only, and a chunk of padding only has no summary."""
    t = sum(steps)
    q, k, v = random_qkv(t, b=3)
    valid = padding_mask(padding, t)
    query = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if learned else None
    want = ops.summary_attention(q, k, v, valid[:, None, None, :], enable_gqa=True, chunk_size=chunk,
                                 window_chunks=window, summary="learned" if learned else "mean", summary_query=query)
    layer = SummaryLayer(chunk, window, query, max_seq_len=t)
    layer.prepare(3, 4, 2, 8, torch.float64, "cpu")
    got = through_layer(layer, q, k, v, steps, key_valid=valid)
    assert_equal_where_seen(got, want, valid)
    assert layer.entries() <= SummaryCache.entries_bound(t, chunk, window)


def _hf_padded_batch(pads, side, length=26):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").double().eval()
    ids = torch.randint(0, 64, (len(pads), length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        if pad:
            mask[row, :pad] = 0 if side == "left" else 1
            mask[row, length - pad:] = 0 if side == "right" else 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() makes them
    return model, ids, mask, positions


def _hf_steps(model, ids, mask, positions, cache):
    return torch.cat([model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=positions[:, i:i + 1],
                            cache=cache, use_cache=True).logits for i in range(ids.shape[1])], 1)


@pytest.mark.parametrize("side,chunk,window,pads", [
    ("left", 4, 1, [0, 1, 3]), ("left", 3, 2, [2, 0, 1]), ("left", 5, 0, [4, 2, 0]),
    ("right", 4, 1, [0, 1, 3]), ("right", 3, 2, [2, 0, 1]),
])
def test_transformers_padded_batch_decodes_as_the_whole_sequence_op(side, chunk, window, pads):
    """A padded HF batch (the prompt's attention_mask given to the cache) decoding token by token through the
    cache gives the logits of the model rewritten to the summary kind on the whole padded sequence, after
    chunks holding padding are folded into summaries (the padded keys are left out of them, as in the op)."""
    import functools

    from attnrewrite.rewriter.backend import attnrewrite_backend

    model, ids, mask, positions = _hf_padded_batch(pads, side)
    options = dict(to="summary", compiler="eager", chunk_size=chunk, window_chunks=window)
    with torch.no_grad():
        want = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=options))(
            ids, attention_mask=mask, position_ids=positions).logits
        torch._dynamo.reset()
        cache = attnrewrite.SummaryCache(chunk_size=chunk, window_chunks=window, attention_mask=mask)
        got = _hf_steps(model, ids, mask, positions, cache)
    assert cache.layers[0].n_sum >= 3  # chunks with padding are summaries by the end
    valid = mask.bool()
    # HF's eager softmax runs in float32 in a float64 model (see test_transformers_model_decodes_with_the_cache)
    assert (got - want)[valid].abs().max() < 1e-6, (got - want)[valid].abs().max()


def test_transformers_padded_batch_without_the_mask_is_refused():
    model, ids, mask, positions = _hf_padded_batch([0, 2], "left")
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):
        _hf_steps(model, ids, mask, positions, attnrewrite.SummaryCache(chunk_size=4, window_chunks=1))


def test_transformers_chunk_of_padding_only_is_refused_not_wrong():
    """HF's padding mask reads the summary slots at token positions: it cannot hide the (absent) summary of a
    chunk that is all padding, so such a step raises instead of diverging from the op."""
    model, ids, mask, positions = _hf_padded_batch([0, 9], "left")
    cache = attnrewrite.SummaryCache(chunk_size=4, window_chunks=1, attention_mask=mask)
    with torch.no_grad(), pytest.raises(ValueError, match="chunk of padding only"):
        _hf_steps(model, ids, mask, positions, cache)


def _whole_sequence(model, ids, mask, positions, chunk, window):
    import functools

    from attnrewrite.rewriter.backend import attnrewrite_backend

    options = dict(to="summary", compiler="eager", chunk_size=chunk, window_chunks=window)
    want = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=options))(
        ids, attention_mask=mask, position_ids=positions).logits
    torch._dynamo.reset()
    return want


@pytest.mark.parametrize("side,pads,chunk,window,dtype", [
    ("left", [0, 5, 9], 4, 1, torch.float64),    # rows with 1 and 2 chunks of padding only
    ("right", [0, 7, 13], 3, 2, torch.bool),
    ("inner", [0, 5, 9], 2, 1, torch.float64),   # 4 padded tokens: two chunks of padding only
])
def test_transformers_any_padding_decodes_as_the_op_with_the_cache_step_mask(side, pads, chunk, window, dtype):
    """Step by step with the cache's own 4-d mask (``step_mask``) in place of the 2-d one: padding that covers
    whole chunks, which transformers' mask cannot express, decodes as the whole-sequence op, per row."""
    from attnrewrite.testing.caches import padding

    model, ids, _, _ = _hf_padded_batch(pads, "left")
    mask = padding(side, ids.shape[1], pads).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if dtype == torch.bool:
        model.config._attn_implementation = "sdpa"  # takes a bool mask; eager adds the mask to the scores
    with torch.no_grad():
        want = _whole_sequence(model, ids, mask, positions, chunk, window)
        cache = attnrewrite.SummaryCache(chunk_size=chunk, window_chunks=window, attention_mask=mask)
        got = torch.cat([model(ids[:, i:i + 1], attention_mask=cache.step_mask(dtype), position_ids=positions[:, i:i + 1],
                               cache=cache, use_cache=True).logits for i in range(ids.shape[1])], 1)
        with pytest.raises(ValueError, match="chunk of padding only"):  # the 2-d mask cannot say it
            _hf_steps(model, ids, mask, positions, attnrewrite.SummaryCache(chunk_size=chunk, window_chunks=window,
                                                                           attention_mask=mask))
    valid = mask.bool()
    assert (got - want)[valid].abs().max() < 1e-6, (got - want)[valid].abs().max()


def test_transformers_generate_with_left_padding_under_a_chunk_is_the_op():
    """``generate()`` (its own 2-d mask and positions) on a left-padded batch: the logits of every new token
    equal the whole-sequence op on the final padded sequence; padding of a whole chunk raises, naming the way out."""
    model, ids, mask, _ = _hf_padded_batch([0, 2, 3], "left", length=8)
    new = 14
    with torch.no_grad():
        cache = attnrewrite.SummaryCache(chunk_size=4, window_chunks=1, attention_mask=mask)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], 1)
        want = _whole_sequence(model, out.sequences, full, (full.cumsum(-1) - 1).clamp(min=0), 4, 1)
        model2, ids2, mask2, _ = _hf_padded_batch([0, 4, 7], "left", length=8)
        with pytest.raises(ValueError, match="step_mask"):
            model2.generate(ids2, attention_mask=mask2, max_new_tokens=new, do_sample=False, pad_token_id=0,
                            cache=attnrewrite.SummaryCache(chunk_size=4, window_chunks=1, attention_mask=mask2))
    assert cache.layers[0].n_sum >= 3
    got = torch.stack(out.logits, 1)
    assert (got - want[:, ids.shape[1] - 1:-1]).abs().max() < 1e-6


def test_step_mask_needs_the_padding_and_one_token_steps():
    with pytest.raises(ValueError, match="attention_mask"):
        attnrewrite.SummaryCache(chunk_size=4).step_mask()
    _, k, v = random_qkv(3)
    cache = attnrewrite.SummaryCache(chunk_size=4, window_chunks=1, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert cache.step_mask().tolist() == [[[[False]]], [[[True]]]]
    with pytest.raises(ValueError, match="one-token step"):
        cache.update(k, v, 0)


def _summary_model(model, chunk, window, summary="mean"):
    """A copy of ``model`` (weights and converted states) under ``attn_implementation="attnrewrite_summary"``."""
    import copy

    import attnrewrite.hf

    attnrewrite.hf.register()
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("attnrewrite_summary")
    twin.config.summary_attention = dict(chunk_size=chunk, window_chunks=window, summary=summary)
    return twin


def _generate(model, ids, mask, chunk, window, new, summary="mean", **generate_kwargs):
    """(logits of each generated step [B, new, V], the final mask, the sequences, the cache): greedy ``generate``
    through SummaryCache (the learned pooling queries read from the model's converted states)."""
    states = [layer.self_attn.attnrewrite_summary for layer in model.model.layers] if summary == "learned" else None
    cache = attnrewrite.SummaryCache(chunk_size=chunk, window_chunks=window, summary=summary, layer_states=states,
                                     attention_mask=mask)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **generate_kwargs)
    full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)
    return torch.stack(out.logits, 1), full, out.sequences, cache


@pytest.mark.parametrize("summary", ["mean", "learned"])
def test_transformers_generate_any_padding_any_prompt_with_attnrewrite_summary(summary):
    """``attn_implementation="attnrewrite_summary"``: ``generate()`` takes the cache's own mask, so rows left-padded
    by several whole chunks and a prompt that needs several summary sets (14 tokens > (W + 1)·C = 8) decode as
    the whole-sequence op: each step's logits equal a cacheless re-run of the eager model rewritten to the kind."""
    import functools

    from attnrewrite.rewriter.backend import attnrewrite_backend

    chunk, window, new = 4, 1, 8
    eager, ids, mask, _ = _hf_padded_batch([0, 5, 9], "left", length=14)  # row 2: two chunks of padding only
    options = dict(to="summary", compiler="eager", chunk_size=chunk, window_chunks=window, summary=summary)
    if summary == "learned":  # converted, then pooling queries far from their zero start (the mean)
        attnrewrite.convert(eager, example_inputs={"input_ids": ids[:, :8]}, **options)
        gen = torch.Generator().manual_seed(3)
        for layer in eager.model.layers:
            layer.self_attn.attnrewrite_summary.query.data.normal_(0, 3, generator=gen)
    model = _summary_model(eager, chunk, window, summary)
    with torch.no_grad():
        got, full, sequences, cache = _generate(model, ids, mask, chunk, window, new, summary)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        want = torch.compile(eager, backend=functools.partial(attnrewrite_backend, options=options))(
            sequences, attention_mask=full, position_ids=positions).logits
        torch._dynamo.reset()
        direct = model(sequences, attention_mask=full, position_ids=positions).logits
    assert cache.layers[0].n_sum >= 4 and cache.layers[0].valid is not None
    assert (cache.layers[0].summary_query is not None) == (summary == "learned")
    # the prompt's last position predicts the first new token; generate() hands out logits in float32
    assert (got - want[:, ids.shape[1] - 1:-1]).abs().max() < 1e-6
    assert (direct - want)[full.bool()].abs().max() < 1e-6  # without a cache: the op itself


def test_transformers_decode_steps_take_the_triton_decode_kernel(monkeypatch):
    """``attnrewrite_summary``'s one-token steps go through ``decode_attention``: on CUDA (16-bit) the decode
    kernel reads the cache's store, elsewhere the torch block.  Forced onto the kernel (under TRITON_INTERPRET=1
    on the CPU, as the hashed cache's selection test does), greedy ``generate`` over a left-padded batch with
    several summaries gives the torch route's tokens and logits, and the kernel ran for every step and layer."""
    from attnrewrite.decode import summary as summary_cache

    if summary_cache._triton_decode is None:
        pytest.skip("triton is not installed")
    from attnrewrite.kernels import triton_scaffold

    if not torch.cuda.is_available() and not triton_scaffold.interpreter_active(
            summary_cache._triton_decode.summary_decode_kernel):
        pytest.skip("the kernel needs a GPU or TRITON_INTERPRET=1")
    chunk, window, new = 4, 1, 5
    eager, ids, mask, _ = _hf_padded_batch([0, 5], "left", length=14)
    model = _summary_model(eager.float(), chunk, window)
    calls = []
    kernel = summary_cache._triton_decode.summary_decode

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])  # the entries the step read
        return kernel(*args, **kwargs)

    with torch.no_grad():
        want, _, want_sequences, _ = _generate(model, ids, mask, chunk, window, new)
        assert not calls  # the CPU takes the torch route unless told otherwise
        monkeypatch.setattr(summary_cache._triton_decode, "summary_decode", counted)
        monkeypatch.setattr(summary_cache, "decode_on_kernels", lambda *args: True)
        got, _, sequences, cache = _generate(model, ids, mask, chunk, window, new)
    layers = len(model.model.layers)
    assert len(calls) == (new - 1) * layers  # the prefill is one step of 14 tokens; each new token one step
    assert cache.layers[0].n_sum >= 2 and cache.layers[0].valid is not None
    assert torch.equal(sequences, want_sequences)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


def test_transformers_generate_long_prompt_in_chunks_with_the_model_s_own_attention():
    """An eager model (transformers' own mask): a prompt longer than one summary set is refused in one prefill,
    and decodes as the op when ``generate`` prefills it in chunks (``prefill_chunk_size=chunk_size``)."""
    chunk, window, new = 4, 1, 6
    model, ids, mask, _ = _hf_padded_batch([0, 2, 3], "left", length=14)
    with torch.no_grad():
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            _generate(model, ids, mask, chunk, window, new)
        got, full, sequences, cache = _generate(model, ids, mask, chunk, window, new, prefill_chunk_size=chunk)
        want = _whole_sequence(model, sequences, full, (full.cumsum(-1) - 1).clamp(min=0), chunk, window)
    assert cache.layers[0].n_sum >= 3
    assert (got - want[:, ids.shape[1] - 1:-1]).abs().max() < 1e-6


def test_attnrewrite_summary_refuses_what_it_cannot_honour():
    model, ids, _, _ = _hf_padded_batch([0, 0], "left", length=6)
    summary = _summary_model(model, 4, 1)
    with torch.no_grad(), pytest.raises(ValueError, match="options differ"):
        summary(ids, cache=attnrewrite.SummaryCache(chunk_size=2, window_chunks=1), use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="without attnrewrite.SummaryCache"):
        summary.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # generate's own DynamicCache


@pytest.mark.parametrize("learned", [False, True])
def test_padded_keys_holding_nan_or_inf_take_no_part(learned):
    """A padded key or value must not reach a score or a summary even when a model left nan/inf there: the op (torch
    and Triton paths), its reference and the cache agree, and the gradients at padded tokens are 0, not nan."""
    chunk, window, t = 4, 1, 22
    q, k, v = random_qkv(t, b=2)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :9] = False   # left padding: two chunks of padding only, and one that holds some
    valid[0, 14] = False   # a hole in a chunk that is folded into a summary
    hide = ~valid[:, None, :, None]
    k, v = k.masked_fill(hide, float("nan")), v.masked_fill(hide, float("inf"))
    query = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if learned else None
    kw = dict(chunk_size=chunk, window_chunks=window, summary="learned" if learned else "mean", summary_query=query)
    want = naive_summary_attention(q, k, v, valid, chunk_size=chunk, window_chunks=window, summary_query=query)
    assert torch.isfinite(want).all()
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    got = ops.summary_attention(qg, kg, vg, valid[:, None, None], enable_gqa=True, impl="torch", **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (qg, kg, vg))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[1].masked_select(hide).abs().max() == 0 and grads[2].masked_select(hide).abs().max() == 0
    triton_kw = dict(kw, summary_query=None if query is None else query.float())
    qt, kt, vt = (x.float().requires_grad_() for x in (q, k, v))
    got_triton = ops.summary_attention(qt, kt, vt, valid[:, None, None], enable_gqa=True, impl="triton", **triton_kw)
    torch.testing.assert_close(got_triton.double(), want, rtol=0, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(got_triton.sum(), (qt, kt, vt)))
    layer = SummaryLayer(chunk, window, query, max_seq_len=t)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    assert_equal_where_seen(through_layer(layer, q, k, v, [1] * t, key_valid=valid), want, valid)
