"""attnrewrite.HashedCache: T tokens at once, one at a time, or in uneven steps give the op's outputs; a
decode step reads only the selected keys; codes are stored bit-packed, T·bits/8 bytes per head."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.decode.hashed import HashedCache, HashedLayer
from attnrewrite.kernels.hashed.state import HashProjections
from attnrewrite.testing.caches import attend_returned, random_qkv

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
    picks = {tuple(layer.select_decode(q[:, :, i:i + 1])[0, 0].sort().values.tolist()) for i in range(10)}
    assert len(picks) > 1


def test_transformers_update_needs_the_query():
    _, k, v = random_qkv(3)
    layer = HashedCache(**OPTIONS)
    with pytest.raises(ValueError, match="query_states"):
        layer.update(k, v, 0)
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
    got = layer.select_decode(q_last)
    from attnrewrite.kernels.hashed.codes import signs
    from attnrewrite.kernels.hashed.sparse import select, visible_keys

    want = select(signs(q_last, layer.proj_q), signs(k, layer.proj_k), visible_keys(None, slice(0, 1), 500, 499, "cpu"),
                  8, top_k, window, sinks)[:, :, 0]
    assert torch.equal(got, want.sort(-1).values)
