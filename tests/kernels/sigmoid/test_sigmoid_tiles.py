"""The torch path's tiles: with small key blocks and chunks of a few rows, every case crosses tile
edges (causal diagonals inside a block, key blocks cut by kv_lens, rows that see no key), and must
still equal the float64 oracle, outputs and gradients by name; causal chunks must not read keys
above the diagonal."""

import pytest
import torch

from attnrewrite.kernels.sigmoid import chunked, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention

CASES = {
    "causal_gqa": dict(shape=(2, 4, 2, 37, 37), kwargs=dict(is_causal=True)),
    "bottom_right_kv_lens": dict(shape=(3, 2, 2, 13, 37), kv_lens=[37, 20, 15],
                                 kwargs=dict(is_causal=True, causal_align="bottom_right")),
    "more_queries_than_keys_float_mask": dict(shape=(1, 2, 1, 29, 19), mask="float",
                                              kwargs=dict(is_causal=True, causal_align="bottom_right")),
    "bool_mask_kv_lens": dict(shape=(2, 2, 2, 21, 30), mask="bool", kv_lens=[30, 11], kwargs={}),
    "plain_float_bias": dict(shape=(1, 3, 3, 17, 26), kwargs=dict(bias=-1.5)),
}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(chunked, "KEY_BLOCK", 8)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 8 * 2 * 8 * 3)  # a few rows per chunk


@pytest.mark.parametrize("name", list(CASES))
def test_small_tiles_equal_the_oracle(name, small_tiles):
    case = CASES[name]
    batch, heads_q, heads_kv, len_q, len_k = case["shape"]
    g = torch.Generator().manual_seed(len(name))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = rnd(batch, heads_q, len_q, 8), rnd(batch, heads_kv, len_k, 8), rnd(batch, heads_kv, len_k, 6)
    grad = torch.randn(batch, heads_q, len_q, 6, generator=g, dtype=torch.float64)
    kwargs = dict(case["kwargs"])
    inputs = [q, k, v]
    if case.get("kv_lens"):
        kwargs["kv_lens"] = torch.tensor(case["kv_lens"])
    if case.get("mask") == "float":
        kwargs["attn_mask"] = rnd(1, heads_q, len_q, len_k)
        inputs.append(kwargs["attn_mask"])
    elif case.get("mask") == "bool":
        kwargs["attn_mask"] = torch.rand(batch, 1, len_q, len_k, generator=g) < 0.7
    want = naive_sigmoid_attention(q, k, v, **kwargs)
    got = sigmoid_attention_dispatch(q, k, v, enable_gqa=heads_q != heads_kv, impl="torch", **kwargs)
    names = ("out", "dq", "dk", "dv", "dmask")
    for label, a, b in zip(names, (got, *torch.autograd.grad(got, inputs, grad)),
                           (want, *torch.autograd.grad(want, inputs, grad))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name}: {label}")


def test_dropout_masks_agree_between_forward_and_backward_across_tiles(small_tiles):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 11, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def dropped(q, k, v):
        torch.manual_seed(321)
        return sigmoid_attention_dispatch(q, k, v, dropout_p=0.3, is_causal=True, impl="torch")

    torch.autograd.gradcheck(dropped, (q, k, v))


def test_causal_chunks_read_no_key_above_the_diagonal(monkeypatch):
    """The speed of the causal path: a chunk of rows start:stop reads keys 0:stop and no more, and only
    its diagonal keys need the visibility mask (top-left); bottom-right shifts both by n_k - Tq."""
    monkeypatch.setattr(chunked, "KEY_BLOCK", 64)
    q, k = torch.zeros(1, 2, 256, 8), torch.zeros(1, 1, 256, 8)
    geometry = chunked._Geometry(q, k, k, None, torch.zeros(1, 2), None, 1.0, 1, 32)
    chunks = list(geometry.chunks(q))
    assert [(c.start, c.stop) for c in chunks] == [(s, s + 32) for s in range(0, 256, 32)]
    for c in chunks:
        assert c.blocks[-1][2] == c.stop and c.full == c.start + 1
    assert sum(len(c.blocks) for c in chunks) == 2 * (1 + 2 + 3 + 4)  # not 8 chunks x 4 blocks
    decode = chunked._Geometry(q[:, :, :16], k, k, None, torch.zeros(1, 2), None, 1.0, 2, 0)
    (only,) = list(decode.chunks(q[:, :, :16]))
    assert (only.full, only.blocks[-1][2]) == (256 - 16 + 1, 256)
