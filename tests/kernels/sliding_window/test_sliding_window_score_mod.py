"""Score modifications on the sliding-window torch path: outputs and gradients by name against plain torch
(the reference with the modification written as a lambda); the kernels refuse a modification."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention
from attnrewrite.ops import sliding_window_attention

SOFTCAP = ("div 3.0; tanh; mul 3.0", lambda s: torch.tanh(s / 3.0) * 3.0)
CHAIN = ("mul 0.5; exp; clamp none 4.0; neg", lambda s: -torch.clamp(torch.exp(s * 0.5), max=4.0))


def _inputs(name, t=23):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    mask = torch.randn(2, 1, t, t, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, mask)]


@pytest.mark.parametrize("program", [SOFTCAP, CHAIN], ids=["softcap", "chain"])
@pytest.mark.parametrize("causal,window,sinks", [(True, 5, 2), (False, 4, 0), (True, 30, 0)])
def test_torch_path_applies_the_modification(program, causal, window, sinks):
    text, mod = program
    q, k, v, mask = _inputs(f"{text}{causal}{window}")
    out = sliding_window_attention(q, k, v, mask, is_causal=causal, scale=0.3, enable_gqa=True, window=window,
                                   sinks=sinks, impl="torch", score_mod=text)
    want = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks, score_mod=mod)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v, mask), grad)
    expected = torch.autograd.grad(want, (q, k, v, mask), grad)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, expected):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    plain = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks)
    assert (plain - want).abs().max() > 1e-3  # the modification changes these outputs


def test_the_kernels_refuse_a_modification_and_auto_takes_the_torch_path():
    q, k, v, _ = (x.detach().float() for x in _inputs("refuse"))
    with pytest.raises(ValueError, match="do not apply a score modification"):
        sliding_window_attention(q, k, v, enable_gqa=True, window=4, impl="triton", score_mod=SOFTCAP[0])
    out = sliding_window_attention(q, k, v, enable_gqa=True, window=4, score_mod=SOFTCAP[0])
    want = naive_sliding_window_attention(q, k, v, None, True, None, 4, 0, score_mod=SOFTCAP[1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
