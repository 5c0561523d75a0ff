"""bias="auto" in a causal call: each query row has its own b_i = −log n_i (n_i = the keys it sees), so a
token's output does not depend on how many tokens follow it — a causal prefill and a one-token decoding
step against the same keys agree, on every path (reference, torch, Triton kernels, public op, weights)."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention


def _qkv(t=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(2, h, t, 16, generator=g).to(dtype) for h in (4, 2, 2))


PATHS = {
    "reference": lambda q, k, v, **kw: naive_sigmoid_attention(
        q, k, v.repeat(1, 1, 1, 1), kw.get("attn_mask"), True, kv_lens=kw.get("kv_lens"),
        causal_align=kw.get("causal_align", "top_left")),
    "torch": lambda q, k, v, **kw: sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="torch",
                                                              **kw),
    "triton": lambda q, k, v, **kw: sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True,
                                                               impl="triton", **kw),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_prefill_last_row_equals_a_decoding_step(path):
    """Row T−1 of a causal prefill over T tokens = one query (the same token) against the T keys: the
    step is bottom-right aligned; its n is T, as the last prefill row's."""
    q, k, v = _qkv()
    run = PATHS[path]
    prefill = run(q, k, v)
    step = run(q[:, :, -1:], k, v, causal_align="bottom_right")
    torch.testing.assert_close(step, prefill[:, :, -1:], rtol=1e-5, atol=1e-6)
    # and every earlier row is unchanged by the tokens after it (a prefill of T − 3 tokens)
    shorter = run(q[:, :, :-3], k[:, :, :-3], v[:, :, :-3])
    torch.testing.assert_close(shorter, prefill[:, :, :-3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_padding_and_a_bool_mask_count_per_row(path):
    """Left padding through kv_lens-free bool masks and right padding through kv_lens: n_i counts what
    row i sees under both, and the paths agree with the reference."""
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    keep[1, ..., :3] = False  # left padding of the second sequence
    kv_lens = torch.tensor([12, 9])
    for kw in (dict(attn_mask=keep), dict(kv_lens=kv_lens), dict(kv_lens=kv_lens, causal_align="bottom_right")):
        want = PATHS["reference"](q.double(), k.double(), v.double(), **kw).float()
        torch.testing.assert_close(PATHS[path](q, k, v, **kw), want, rtol=1e-4, atol=1e-5)


def test_packed_sequences_count_per_row_too():
    q, k, v = _qkv(t=10)
    q, k, v = q[:1], k[:1], v[:1]
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want = torch.cat([sigmoid_attention_dispatch(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                 enable_gqa=True, impl="torch") for a, b in ((0, 4), (4, 10))], dim=2)
    for impl in ("torch", "triton"):
        got = sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl=impl, cu_seqlens_q=cu,
                                         cu_seqlens_k=cu)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gradients_on_the_triton_path_follow_the_row_bias():
    q, k, v = (t.requires_grad_() for t in _qkv(t=20))
    grads = {}
    for impl in ("torch", "triton"):
        out = sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl=impl)
        grads[impl] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads["torch"], grads["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_public_op_and_the_kinds_weights_agree():
    """The rewriter's weights formula (kinds/sigmoid.py, computed in fp32) is the op's: out = weights @ v."""
    from attnrewrite.ir.canonical import AttentionCall
    from attnrewrite.kinds.sigmoid import weights

    q, k, v = _qkv(dtype=torch.float64)
    out = ops.sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True)
    w = weights(AttentionCall(q, k, v, None, 0.0, True, None, True), {"bias": "auto"}, None)
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), out, rtol=1e-5, atol=1e-6)  # (weights in fp32)
    # with a per-query bool mask, too (n_i counts the row's visible keys)
    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.7
    out = ops.sigmoid_attention(q, k, v, keep, is_causal=True, enable_gqa=True)
    w = weights(AttentionCall(q, k, v, keep, 0.0, True, None, True, bool_mask=True), {"bias": "auto"}, None)
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), out, rtol=1e-5, atol=1e-6)  # (weights in fp32)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_causal_or_padding_mask_given_as_a_mask_counts_as_causality_and_padding_do(impl):
    """bias="auto" counts, per query row, the keys a mask leaves it — False in a bool mask, ≤ −9000 in a float one
    (−inf, the dtype's lowest value as HF writes a masked key, BERT's −10000 also as bfloat16 rounds it: −9984);
    a merely negative entry is a bias and counts.  So the causal mask written as a mask (as a layer compiled
    without its model receives it) gives the same rows as ``is_causal=True``, a padding mask the same as
    ``kv_lens``, in every mask spelling."""
    q, k, v = _qkv()
    t = q.shape[2]
    run = lambda **kw: sigmoid_attention_dispatch(q, k, v, enable_gqa=True, impl=impl, **kw)  # noqa: E731
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    kv_lens = torch.tensor([t, t - 5])
    padded = (torch.arange(t) < kv_lens.view(-1, 1)).view(2, 1, 1, t)
    lowest = torch.finfo(torch.float32).min
    for keep, expected in ((causal, run(is_causal=True)), (padded, run(kv_lens=kv_lens)),
                           (causal & padded, run(is_causal=True, kv_lens=kv_lens))):
        bert = (1 - keep.to(torch.bfloat16)) * -10000.0  # -9984 where masked
        for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, lowest),
                     torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), bert.float()):
            torch.testing.assert_close(run(attn_mask=mask), expected, rtol=1e-5, atol=1e-6)
    # a finite negative entry is a bias, not an exclusion: the row's n keeps the key
    biased = torch.zeros(t, t).masked_fill(~causal, -30.0)
    assert (run(attn_mask=biased) - run(is_causal=True)).abs().max() > 1e-3
    torch.testing.assert_close(run(attn_mask=biased), naive_sigmoid_attention(
        q, k, v, biased, False), rtol=1e-5, atol=1e-6)
