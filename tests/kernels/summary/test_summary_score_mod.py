"""Score modifications on the summary torch path: outputs and gradients by name against the reference with the
modification written as a lambda; the kernels refuse a modification."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.ops import summary_attention

SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)


def _inputs(name, t=11):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize("causal,learned", [(True, False), (False, False), (True, True)])
def test_torch_path_applies_the_modification(causal, learned):
    text, mod = SOFTCAP
    q, k, v = _inputs(f"summary{causal}{learned}")
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, -3:] = False
    query = torch.randn(2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                        requires_grad=True) if learned else None
    options = dict(chunk_size=2, window_chunks=1, summary="learned" if learned else "mean", summary_query=query)
    out = summary_attention(q, k, v, valid[:, None, None], is_causal=causal, scale=0.3, enable_gqa=True,
                            impl="torch", score_mod=text, **options)
    want = naive_summary_attention(q, k, v, valid, causal, 0.3, chunk_size=2, window_chunks=1, summary_query=query,
                                   score_mod=mod)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    inputs = (q, k, v) + ((query,) if learned else ())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got, expected = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad)
    for name, g, w in zip(("dq", "dk", "dv", "dquery"), got, expected):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    plain = naive_summary_attention(q, k, v, valid, causal, 0.3, chunk_size=2, window_chunks=1, summary_query=query)
    assert (plain - want).abs().max() > 1e-3


def test_the_kernels_refuse_a_modification():
    q, k, v = (x.detach().float() for x in _inputs("refuse"))
    with pytest.raises(ValueError, match="do not apply a score modification"):
        summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1, impl="triton",
                          score_mod=SOFTCAP[0])


def test_decoding_through_the_cache_with_the_modification_equals_the_op(monkeypatch):
    """A decoding step runs the site's own code — its soft-cap included — over the keys SummaryCache returns
    (window keys and summaries): the op with the modification must give the same rows."""
    from attnrewrite.decode.summary import SummaryLayer
    from attnrewrite.testing import caches

    text, mod = SOFTCAP

    def capped_attend(q, keys, values, visible):
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = mod((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, -1) @ values

    monkeypatch.setattr(caches, "attend_returned", capped_attend)
    q, k, v = (x * 2 for x in caches.random_qkv(17))
    want = summary_attention(q, k, v, enable_gqa=True, chunk_size=3, window_chunks=1, score_mod=text)
    layer = SummaryLayer(3, 1, None, max_seq_len=17)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    torch.testing.assert_close(caches.through_layer(layer, q, k, v, [5, 1, 1, 7, 3]), want, rtol=0, atol=1e-12)
