"""Score modifications on the hashed torch path: outputs against the reference with the modification written as
a lambda, gradients by name against autograd through that reference; the kernels refuse a modification."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention

SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)


def _inputs(name, t=19):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 1, t, t, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)], bias


@pytest.mark.parametrize("causal,masked", [(True, False), (True, True), (False, True)])
def test_torch_path_applies_the_modification(causal, masked):
    text, mod = SOFTCAP
    (q, k, v), bias = _inputs(f"hashed{causal}{masked}")
    mask = bias if masked else None
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=causal, top_k=3, window=4, sinks=2)
    out = ops.hashed_attention(q, k, v, mask, enable_gqa=True, bits=16, impl="torch", score_mod=text, **kw)
    want, _ = naive_hashed_attention(q, k, v, mask, proj_q=plane, proj_k=plane, score_mod=mod, **kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got, expected = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    plain, _ = naive_hashed_attention(q, k, v, mask, proj_q=plane, proj_k=plane, **kw)
    assert (plain - want).abs().max() > 1e-3


def test_the_kernels_refuse_a_modification():
    (q, k, v), _ = _inputs("refuse")
    with pytest.raises(ValueError, match="do not apply a score modification"):
        ops.hashed_attention(q.detach().float(), k.detach().float(), v.detach().float(), is_causal=True,
                             enable_gqa=True, bits=16, top_k=3, window=4, sinks=2, impl="triton",
                             score_mod=SOFTCAP[0])


def test_decoding_through_the_cache_with_the_modification_equals_the_op():
    """A decoding step runs the site's own code — its soft-cap included — over the keys HashedCache selects:
    the op with the modification must give the same rows."""
    from attnrewrite.decode.hashed import HashedLayer
    from attnrewrite.testing.caches import random_qkv

    text, mod = SOFTCAP
    options = dict(bits=16, top_k=4, window=3, sinks=2)
    q, k, v = (x * 2 for x in random_qkv(23))
    want = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, score_mod=text, **options)
    layer = HashedLayer(**options, learned=None, max_seq_len=23)
    layer.prepare(2, 4, 2, 8, torch.float64, "cpu")
    got, start = [], 0
    for count in [6, 1, 1, 11, 1, 3]:
        rows = slice(start, start + count)
        keys, values, visible = layer.attend(torch.arange(start, start + count), q[:, :, rows], k[:, :, rows],
                                             v[:, :, rows])
        keys, values = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
        scores = mod((q[:, :, rows] @ keys.transpose(-1, -2)) * 8**-0.5)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        got.append(torch.softmax(scores, -1) @ values)
        start += count
    torch.testing.assert_close(torch.cat(got, 2), want, rtol=0, atol=1e-12)
