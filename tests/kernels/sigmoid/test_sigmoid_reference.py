"""The oracle against the definition written as loops, and the chunked torch path against the oracle."""

import math

import pytest
import torch

from attnrewrite.kernels.sigmoid import chunked, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention


def loop_sigmoid_attention(q, k, v, mask=None, causal=None, bias="auto", kv_lens=None):
    """The definition, one query and one key at a time (float64, tiny shapes only)."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    out = torch.zeros(batch, heads_q, len_q, v.shape[3], dtype=torch.float64)
    for b in range(batch):
        n_keys = len_k if kv_lens is None else min(int(kv_lens[b]), len_k)
        for h in range(heads_q):
            hk = h // (heads_q // heads_kv)

            def allowed(i, j):
                if j >= n_keys:
                    return False
                return mask is None or mask.dtype != torch.bool or bool(mask[b, h, i, j])

            def counted(i, j):  # a float mask's -inf or lowest finite value excludes the key from n
                if mask is not None and mask.dtype != torch.bool:
                    value = float(mask[b, h, i, j])
                    if value == -math.inf or value == torch.finfo(mask.dtype).min:
                        return False
                return allowed(i, j)
            shift = 0 if causal in (None, "top_left") else n_keys - len_q
            for i in range(len_q):
                b_value = bias
                if bias == "auto":  # the keys this query sees, its own n
                    n_row = sum(counted(i, j) and (causal is None or j <= i + shift) for j in range(len_k))
                    b_value = -math.log(max(n_row, 1))
                for j in range(len_k):
                    if not allowed(i, j) or (causal is not None and j > i + shift):
                        continue
                    s = float(q[b, h, i] @ k[b, hk, j]) / math.sqrt(dim) + b_value
                    if mask is not None and mask.dtype != torch.bool:
                        s += float(mask[b, h, i, j])
                    out[b, h, i] += v[b, hk, j] * (0.0 if s < -700 else 1 / (1 + math.exp(-s)))  # exp overflows below
    return out


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_reference_matches_the_definition(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kv_lens = torch.tensor([7, 4])
    bool_mask = torch.rand(2, 4, 5, 7, generator=g) < 0.6
    float_mask = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    # HF's masked value and -inf: both exclude a key from bias="auto"'s n (a mere -30 is a bias)
    hf_mask = float_mask.masked_fill(torch.rand(2, 4, 5, 7, generator=g) < 0.3, torch.finfo(torch.float64).min)
    hf_mask = hf_mask.masked_fill(torch.rand(2, 4, 5, 7, generator=g) < 0.2, -math.inf)
    hf_mask = hf_mask.masked_fill(torch.rand(2, 4, 5, 7, generator=g) < 0.2, -30.0)
    for mask in (None, bool_mask, float_mask, hf_mask):
        for bias in ("auto", -1.5):
            expected = loop_sigmoid_attention(q, k, v, mask, causal, bias, kv_lens)
            got = naive_sigmoid_attention(q, k, v, mask, causal is not None, bias=bias, kv_lens=kv_lens,
                                          causal_align=causal or "top_left")
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_varlen_is_each_sequence_alone():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    # two sequences: 3 queries against 5 keys, then 6 queries against 2 keys
    cu_q, cu_k = torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([0, 5, 7], dtype=torch.int32)
    got = naive_sigmoid_attention(q, k, v, is_causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  causal_align="bottom_right")
    first = loop_sigmoid_attention(q[:, :, :3], k[:, :, :5], v[:, :, :5], causal="bottom_right")
    second = loop_sigmoid_attention(q[:, :, 3:], k[:, :, 5:], v[:, :, 5:], causal="bottom_right")
    torch.testing.assert_close(got, torch.cat([first, second], dim=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * 2 * 11])  # one chunk; chunks of 3 rows
def test_chunked_path_equals_reference_in_float64(chunk_elements, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 4, 13, 11, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 4, 13, 6, generator=g, dtype=torch.float64)
    results = []
    for fn in (naive_sigmoid_attention, lambda *a, **kw: sigmoid_attention_dispatch(*a, enable_gqa=True, impl="torch", **kw)):
        out = fn(q, k, v, mask, is_causal=True, causal_align="bottom_right")
        results.append((out, *torch.autograd.grad(out, (q, k, v, mask), grad)))
    for name, got, expected in zip(("out", "dq", "dk", "dv", "dmask"), results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_chunked_path_gradcheck():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.randn(1, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, m: sigmoid_attention_dispatch(q, k, v, m, is_causal=True, enable_gqa=True,
                                                                  impl="torch"), (q, k, v, mask))


def test_dropout_is_deterministic_per_seed_and_has_consistent_gradients():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def dropped(q, k, v):
        torch.manual_seed(123)  # the dropout seed comes from the global generator
        return sigmoid_attention_dispatch(q, k, v, dropout_p=0.4, impl="torch")

    first, second = dropped(q, k, v), dropped(q, k, v)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, sigmoid_attention_dispatch(q, k, v, impl="torch"))
    torch.autograd.gradcheck(dropped, (q, k, v))


def test_dropout_keeps_the_expectation():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 8, 4, generator=g) for _ in range(3))
    plain = sigmoid_attention_dispatch(q, k, v, impl="torch")
    mean = torch.stack([sigmoid_attention_dispatch(q, k, v, dropout_p=0.3, impl="torch") for _ in range(400)]).mean(0)
    # 400 draws of a sum of 8 terms each kept with p = 0.7: the mean is within a few standard errors
    assert (mean - plain).abs().max() < 0.1 * plain.abs().max()
