"""Score modifications in sliding-window attention: the torch path and the Triton kernels (under
TRITON_INTERPRET=1, 16-row tiles so that the sinks, the band's masked edges and its unmasked inside all
run), outputs and gradients by name against the reference with the modification written as a lambda; a
program with several nonlinear steps runs in the kernels too, through a generated score function."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.sliding_window import op
from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention
from attnrewrite.ops import sliding_window_attention
from attnrewrite.testing.checks import assert_launched_with_mod, record_kernel_launches

SOFTCAP = ("div 3.0; tanh; mul 3.0", lambda s: torch.tanh(s / 3.0) * 3.0)
CHAIN = ("mul 0.5; exp; clamp none 4.0; neg", lambda s: -torch.clamp(torch.exp(s * 0.5), max=4.0))
#: one nonlinear step between affine ones on both sides: every constant of the kernels' form is used
SHIFTED_SIGMOID = ("mul 0.5; add 1.0; sigmoid; mul 4.0; add -2.0", lambda s: torch.sigmoid(s * 0.5 + 1.0) * 4.0 - 2.0)


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


def _needs_kernels():
    if not op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")


@pytest.mark.parametrize("program,causal,window,sinks,t", [
    (SOFTCAP, True, 40, 3, 64),           # sinks, masked edges and unmasked blocks inside the band
    (SHIFTED_SIGMOID, False, 9, 2, 40),   # symmetric band
    (CHAIN, True, 20, 2, 40),             # exp, clamp: a generated score function
], ids=["softcap_causal", "sigmoid_symmetric", "chain_causal"])
def test_triton_kernels_apply_the_modification(program, causal, window, sinks, t, monkeypatch):
    _needs_kernels()
    monkeypatch.setattr(op, "launch_config", lambda *a, **kw: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                     num_stages=2))
    launches = record_kernel_launches(monkeypatch)
    text, mod = program
    q, k, v, mask = _inputs(f"kernels{text}{causal}", t)
    mask = mask.detach()  # added after the modification; the kernels take a float mask without a gradient
    want = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks, score_mod=mod)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=want.dtype)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = sliding_window_attention(*leaves, mask.float(), is_causal=causal, scale=0.3, enable_gqa=True,
                                   window=window, sinks=sinks, impl="triton", score_mod=text)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out, leaves, grad.float())
    for name, g, w in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    plain = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks)
    assert (plain - want).abs().max() > 1e-2  # the modification changes these outputs
    assert_launched_with_mod(launches, {"sliding_window_fwd_kernel", "sliding_window_bwd_dq_kernel",
                                        "sliding_window_bwd_dkdv_kernel"}, text, generated=program is CHAIN)


def test_auto_on_the_cpu_runs_a_chain_on_the_torch_path(monkeypatch):
    """``impl="auto"`` takes the kernels on CUDA only; on the CPU a chain still runs the blockwise torch path."""
    launches = record_kernel_launches(monkeypatch)
    q, k, v, _ = (x.detach().float() for x in _inputs("auto"))
    out = sliding_window_attention(q, k, v, enable_gqa=True, window=4, score_mod=CHAIN[0])
    want = naive_sliding_window_attention(q, k, v, None, True, None, 4, 0, score_mod=CHAIN[1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert launches == []


def test_a_modification_starts_the_d128_backward_from_its_own_defaults():
    """The derivative tile makes the plain d128 dK/dV default spill on sm_90 (bench/RESULTS.md): a call with a
    modification gets its own bucket and default, one without keeps the plain ones."""
    q = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
    args = (q, q, q, False, True, 1024, 0, None)
    tiles = lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])  # noqa: E731
    assert tiles(op.launch_config("bwd_dkdv", *args)) == (64, 128, 8, 2)
    assert tiles(op.launch_config("bwd_dkdv", *args, has_mod=True)) == (32, 64, 8, 2)
    assert tiles(op.launch_config("bwd_dq", *args, has_mod=True)) == (64, 64, 8, 3)
    assert tiles(op.launch_config("fwd", *args, has_mod=True)) == tiles(op.launch_config("fwd", *args))
