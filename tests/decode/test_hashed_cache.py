"""attnrewrite.HashedCache: T tokens at once, one at a time, or in uneven steps give the op's outputs; a
decode step reads only the selected keys; codes are stored bit-packed, T·bits/8 bytes per head."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.decode.hashed import HashedCache, HashedLayer
from attnrewrite.kernels.hashed.state import HashProjections
from attnrewrite.testing.caches import (
    assert_equal_where_seen,
    attend_returned,
    hf_decode_mask,
    random_qkv,
    through_layer,
)
from attnrewrite.testing.caches import padding as padding_mask

OPTIONS = dict(bits=16, top_k=4, window=3, sinks=2)


@pytest.mark.parametrize("steps", [[1] * 31, [31], [6, 1, 1, 11, 1, 11]])
@pytest.mark.parametrize("learned", [False, True])
def test_steps_through_the_cache_equal_the_op(steps, learned):
    t = sum(steps)
    q, k, v = random_qkv(t)
    state = None
    if learned:
        state = HashProjections(4, 2, 8, 16, seed=0).double()
        with torch.no_grad():
            state.k_projection.add_(0.2 * torch.randn(state.k_projection.shape, dtype=torch.float64))
    projections = None if state is None else (state.q_projection, state.k_projection)
    want = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, hash="learned" if learned else "random",
                                projections=projections, **OPTIONS)
    layer = HashedLayer(**OPTIONS, learned=projections, max_seq_len=t)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    got, start = [], 0
    for count in steps:
        rows = slice(start, start + count)
        keys, values, visible = layer.attend(torch.arange(start, start + count), q[:, :, rows], k[:, :, rows],
                                             v[:, :, rows])
        if count == 1 and start + 1 > sum(OPTIONS[n] for n in ("top_k", "window", "sinks")):
            assert keys.shape[2] == OPTIONS["top_k"] + OPTIONS["window"] + OPTIONS["sinks"]  # reads only these
        got.append(attend_returned(q[:, :, rows], keys, values, visible))
        start += count
    torch.testing.assert_close(torch.cat(got, 2), want, rtol=0, atol=1e-12)


def test_codes_are_bit_packed_beside_the_keys():
    t, bits = 40, 64
    _, k, v = random_qkv(t, b=1)
    layer = HashedLayer(bits=bits, max_seq_len=t)
    layer.prepare(1, 4, 2, 8, torch.float32, "cpu")
    layer.append(k.float(), v.float())
    assert layer.code_store.dtype == torch.uint8 and layer.code_store.shape == (1, 2, t, bits // 8)
    kv_bytes = 2 * k.numel() * 4
    assert layer.nbytes() == kv_bytes + 2 * t * bits // 8
    assert layer.get_seq_length() == t


def test_decode_selection_depends_on_the_query():
    q, k, v = random_qkv(60, b=1)
    layer = HashedLayer(**OPTIONS)
    layer.prepare(1, 4, 2, 8, torch.float64, "cpu")
    layer.append(k[:, :, :59], v[:, :, :59])
    picks = {tuple(layer.select_decode(q[:, :, i:i + 1])[0][0, 0].sort().values.tolist()) for i in range(10)}
    assert len(picks) > 1


def test_transformers_update_with_the_query_selects():
    _, k, v = random_qkv(3)
    layer = HashedCache(**OPTIONS)
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    keys, values = layer.update(k[:, :, :1], v[:, :, :1], 0, {"query_states": q})
    assert keys.shape == (2, 2, 1, 8) and layer.get_seq_length() == 1


@pytest.mark.parametrize("top_k,window,sinks", [(37, 5, 3), (0, 4, 2), (600, 0, 0), (10, 0, 0)])
def test_decode_selection_equals_a_topk_over_agreement_and_position(top_k, window, sinks):
    """The histogram selection of a decode step picks the op's set: top_k by (agreement, position)."""
    q, k, v = random_qkv(500, b=2, d=8, seed=4)
    layer = HashedLayer(bits=8, top_k=top_k, window=window, sinks=sinks)  # 8 bits: many ties
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    layer.append(k, v)
    q_last = q[:, :, -1:]
    got, _ = layer.select_decode(q_last)
    from attnrewrite.kernels.hashed.codes import signs
    from attnrewrite.kernels.hashed.sparse import select, visible_keys

    want = select(signs(q_last, layer.proj_q), signs(k, layer.proj_k), visible_keys(None, slice(0, 1), 500, 499, "cpu"),
                  8, top_k, window, sinks)[:, :, 0]
    assert torch.equal(got, want.sort(-1).values)


@pytest.mark.parametrize("padding", ["left", "right", "inner"])
@pytest.mark.parametrize("steps", [[1] * 31, [31], [6, 1, 1, 11, 1, 11]])
@pytest.mark.parametrize("learned", [False, True])
def test_padded_batch_through_the_cache_equals_the_op_with_the_padding_mask(padding, steps, learned):
    """Padded keys are never selected (not as sinks, window or top-k; the sinks are a row's first tokens and
    the window its last), in one-token steps as in prefills: per row, the op with the same key mask."""
    t = sum(steps)
    q, k, v = random_qkv(t, b=3)
    valid = padding_mask(padding, t)
    for x in (k, v):  # a model may give padded tokens any state
        x[~valid[:, None, :, None].expand_as(x)] = float("nan")
    projections = None
    if learned:
        state = HashProjections(4, 2, 8, 16, seed=0).double()
        projections = (state.q_projection.detach(), state.k_projection.detach() + 0.2)
    want = ops.hashed_attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), valid[:, None, None, :], is_causal=True, enable_gqa=True,
                                hash="learned" if learned else "random", projections=projections, **OPTIONS)
    layer = HashedLayer(**OPTIONS, learned=projections, max_seq_len=t)
    layer.prepare(3, 4, 2, 8, torch.float64, "cpu")
    assert_equal_where_seen(through_layer(layer, q, k, v, steps, key_valid=valid), want, valid)


def test_decode_with_padding_reads_only_selected_valid_keys():
    """A decode step returns sinks + window + top_k slots; a row with fewer valid keys marks its spare slots."""
    t = 12
    q, k, v = random_qkv(t, b=3)
    valid = padding_mask("left", t, pads=(0, 2, 9))
    layer = HashedLayer(**OPTIONS)
    layer.prepare(3, 4, 2, 8, torch.float64, "cpu")
    layer.attend(torch.arange(t - 1), q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], key_valid=valid[:, :-1])
    keys, _, visible = layer.attend(torch.tensor([t - 1]), q[:, :, -1:], k[:, :, -1:], v[:, :, -1:],
                                    key_valid=valid[:, -1:])
    budget = sum(OPTIONS.values()) - OPTIONS["bits"]
    assert keys.shape[2] == budget
    assert visible.shape == (3, 1, 1, budget) and visible.sum(-1).flatten().tolist() == [budget, budget, 3]


def test_transformers_left_padded_batch_decodes_as_the_op():
    """Through ``update`` (query in cache_kwargs) with the mask transformers' sdpa_mask builds from the batch's
    2-d mask and the cache's sizes: every key while rows are short, then the selection in the last slots
    (a short left-padded row's spare slots read its padding). Rows padded by 0, 3 and 14 tokens."""
    t = 34
    q, k, v = random_qkv(t, b=3)
    mask = padding_mask("left", t, pads=(0, 3, 14))
    want = ops.hashed_attention(q, k, v, mask[:, None, None, :], is_causal=True, enable_gqa=True, **OPTIONS)
    cache = HashedCache(**OPTIONS, attention_mask=mask.long())
    got = []
    for i in range(t):
        hf_mask = hf_decode_mask(cache, mask, i)
        keys, values = cache.update(k[:, :, i:i + 1], v[:, :, i:i + 1], 0, {"query_states": q[:, :, i:i + 1]})
        got.append(attend_returned(q[:, :, i:i + 1], keys, values, hf_mask))
    assert_equal_where_seen(torch.cat(got, 2), want, mask)


@pytest.mark.parametrize("padding", ["right", "inner"])
def test_transformers_padding_its_mask_cannot_express_is_refused(padding):
    t = 30
    q, k, v = random_qkv(t, b=3)
    cache = HashedCache(**OPTIONS, attention_mask=padding_mask(padding, t, pads=(0, 12, 14)))
    with pytest.raises(ValueError, match="padding mask reads"):
        for i in range(t):
            cache.update(k[:, :, i:i + 1], v[:, :, i:i + 1], 0, {"query_states": q[:, :, i:i + 1]})


def test_transformers_padded_positions_without_the_mask_are_refused():
    _, k, v = random_qkv(2)
    cache = HashedCache(**OPTIONS)
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask"):
        cache.update(k[:, :, :1], v[:, :, :1], 0, {"query_states": q}, kwargs={"position_ids": torch.tensor([[0], [1]])})


@pytest.mark.parametrize("top_k,window,sinks,learned", [(37, 5, 3, False), (600, 0, 0, False), (37, 5, 3, True)])
def test_decode_selection_on_the_kernels_equals_the_torch_selection(top_k, window, sinks, learned, monkeypatch):
    """On CUDA a step's selection runs on the Triton decode kernels (forced here, under the interpreter on
    the CPU): the same indices, in the same ascending layout, as the histogram selection in torch — with
    learned hashes too (one projection per head)."""
    from attnrewrite.decode import hashed

    if hashed._triton_decode is None:
        pytest.skip("triton is not installed")
    from attnrewrite.kernels.hashed import triton_ops

    if not torch.cuda.is_available() and not triton_ops.interpreter_active():
        pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v = random_qkv(500, b=2, d=8, seed=4)
    projections = None
    if learned:  # moved apart from the shared draw, per head
        state = HashProjections(4, 2, 8, 8, seed=0).double()
        g = torch.Generator().manual_seed(9)
        projections = tuple(p.detach() + 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)
                            for p in (state.q_projection, state.k_projection))
    layer = HashedLayer(bits=8, top_k=top_k, window=window, sinks=sinks, learned=projections)  # 8 bits: many ties
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    layer.append(k, v)
    want, _ = layer.select_decode(q[:, :, -1:])
    if learned:  # the learned codes select other keys than the shared draw would
        shared = HashedLayer(bits=8, top_k=top_k, window=window, sinks=sinks)
        shared.prepare(2, 4, 2, 8, torch.float64, "cpu")
        shared.append(k, v)
        assert not torch.equal(shared.select_decode(q[:, :, -1:])[0], want)
    monkeypatch.setattr(hashed, "decode_on_kernels", lambda q: True)
    got, slots = layer.select_decode(q[:, :, -1:])
    assert slots is None and got.dtype == want.dtype
    assert torch.equal(got, want)


HF_OPTIONS = dict(bits=16, top_k=4, window=3, sinks=2)


def _hf_hashed_llama(impl="attnrewrite_hashed"):
    import transformers as T

    import attnrewrite.hf

    attnrewrite.hf.register()
    config = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    config.hashed_attention = dict(HF_OPTIONS)
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_transformers_generate_with_the_cache_equals_a_full_rerun(padded):
    """generate() on a transformers Llama with attn_implementation="attnrewrite_hashed" and a HashedCache: each
    greedy step's logits are those of the cacheless hashed model over everything so far (prompt 10 + 16 new
    tokens, far past sinks + window + top_k = 9 keys, so decode steps read a selection)."""
    model = _hf_hashed_llama()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding, as batched generation pads
    new = 16
    with torch.no_grad():
        cache = HashedCache(**HF_OPTIONS, attention_mask=mask if padded else None)
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                pad_token_id=0, cache=cache, return_dict_in_generate=True,
                                output_logits=True)
        tokens = result.sequences
        assert tokens.shape == (2, 10 + new) and cache.get_seq_length() == 10 + new - 1
        full = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        rerun = model(input_ids=tokens, attention_mask=full, position_ids=positions, use_cache=False).logits
        softmax = _hf_hashed_llama("sdpa")(input_ids=tokens, attention_mask=full, position_ids=positions).logits
        for step in range(new):
            prefix = slice(0, 10 + step)
            want = model(input_ids=tokens[:, prefix], attention_mask=full[:, prefix],
                         position_ids=positions[:, prefix], use_cache=False).logits[:, -1]
            torch.testing.assert_close(want, rerun[:, 10 + step - 1], rtol=1e-5, atol=1e-6)  # causal
            torch.testing.assert_close(result.logits[step], want, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            assert torch.equal(want.argmax(-1), tokens[:, 10 + step]), step
    assert (rerun - softmax)[:, 12:].abs().max() > 1e-2  # the selection really leaves keys out


def test_transformers_cache_without_the_hashed_attention_raises():
    """HashedCache under another attention implementation would attend to every key: the next update raises."""
    model = _hf_hashed_llama("sdpa")
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pytest.raises(ValueError, match="attnrewrite_hashed"):
        model(input_ids=ids, cache=HashedCache(**HF_OPTIONS), use_cache=True)
