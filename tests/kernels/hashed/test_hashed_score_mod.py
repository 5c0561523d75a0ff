"""Score modifications in hashed attention: the torch path and the gathered-attention Triton kernels (under
TRITON_INTERPRET=1), outputs against the reference with the modification written as a lambda, gradients by
name against autograd through that reference; a program with several nonlinear steps runs in the kernels
too, through a generated score function."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.testing.checks import assert_launched_with_mod, record_kernel_launches

SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)
SHIFTED_SIGMOID = ("mul 0.5; add 1.0; sigmoid; mul 4.0; add -2.0", lambda s: torch.sigmoid(s * 0.5 + 1.0) * 4.0 - 2.0)
CHAIN = ("div 2.0; tanh; mul 2.0; square", lambda s: (torch.tanh(s / 2.0) * 2.0) ** 2)  # two nonlinear steps
#: singular at 0 (an infinite derivative), the score of an empty slot: its 0 · inf must not reach dQ/dK
ROOT = ("abs; pow 0.5; mul 2.0", lambda s: s.abs() ** 0.5 * 2.0)


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


@pytest.mark.parametrize("program,causal,masked", [(SOFTCAP, True, True), (SHIFTED_SIGMOID, False, False),
                                                  (CHAIN, False, True), (ROOT, True, False)],
                         ids=["softcap_causal_bias", "sigmoid_bidirectional", "chain_bias", "root_causal"])
def test_triton_kernels_apply_the_modification(program, causal, masked, monkeypatch):
    triton_ops = pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")
    if not triton_ops.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    launches = record_kernel_launches(monkeypatch)
    text, mod = program
    (q, k, v), bias = _inputs(f"kernels{text}", t=12)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    exact = [x.detach().double().requires_grad_() for x in leaves]  # the same values, so the same codes
    mask = bias.float() if masked else None
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=causal, top_k=3, window=4, sinks=2)
    out = ops.hashed_attention(*leaves, mask, enable_gqa=True, bits=16, impl="triton", score_mod=text, **kw)
    want, _ = naive_hashed_attention(*exact, None if mask is None else mask.double(), proj_q=plane, proj_k=plane,
                                     score_mod=mod, **kw)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got, expected = torch.autograd.grad(out, leaves, grad.float()), torch.autograd.grad(want, exact, grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    plain, _ = naive_hashed_attention(*exact, None if mask is None else mask.double(), proj_q=plane, proj_k=plane,
                                      **kw)
    assert (plain - want).abs().max() > 1e-2
    assert_launched_with_mod(launches, {"hashed_attn_fwd_kernel", "hashed_attn_bwd_kernel"}, text,
                             generated=program in (CHAIN, ROOT))


def test_auto_on_the_cpu_runs_a_chain_on_the_torch_path(monkeypatch):
    launches = record_kernel_launches(monkeypatch)
    (q, k, v), _ = _inputs("refuse")
    q, k, v = (x.detach().float() for x in (q, k, v))
    kw = dict(is_causal=True, enable_gqa=True, bits=16, top_k=3, window=4, sinks=2)
    out = ops.hashed_attention(q, k, v, score_mod=CHAIN[0], **kw)
    plane = random_hyperplanes(8, 16, 0)
    want, _ = naive_hashed_attention(q, k, v, None, is_causal=True, top_k=3, window=4, sinks=2, proj_q=plane,
                                     proj_k=plane, score_mod=CHAIN[1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert launches == []


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
