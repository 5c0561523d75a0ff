"""Position biases computed in sigmoid attention (``position="j-i"`` / ``"|j-i|"`` with per-head slopes: ALiBi)
on the torch path and in the Triton kernels (under TRITON_INTERPRET=1): outputs and gradients by name
against plain torch written here, with the bias materialised as a [Tq, Tk] tensor."""

from __future__ import annotations


import pytest
import torch

from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch
from attnrewrite.ops import sigmoid_attention
from sigmoid_testing import BIAS, SOFTCAP, masked_inputs, plain_sigmoid, require_interpreter, seeded


def _inputs(name, dtype, heads_q=4, heads_kv=2, len_q=9, len_k=11, dim=8):
    _, (q, k, v, mask) = masked_inputs(name, heads_q, heads_kv, len_q, len_k, dim)
    slopes = torch.tensor([0.5, -0.25, 0.125, 0.3], dtype=torch.float64)[:heads_q]
    return [t.to(dtype).requires_grad_() for t in (q, k, v, mask)] + [slopes.to(dtype)]


def _position_bias(slopes, position, len_q, len_k):
    """[1, Hq, Tq, Tk]: slopes[h] · (j − i) or slopes[h] · |j − i|, materialised."""
    distance = (torch.arange(len_k).view(1, -1) - torch.arange(len_q).view(-1, 1)).double()
    if position == "|j-i|":
        distance = distance.abs()
    return slopes.double().view(1, -1, 1, 1) * distance


def _reference(q, k, v, mask, slopes, position, causal, scale, mod=None):
    """sigmoid(mod(scale·q·kᵀ) + mask + position bias + b)·v over visible keys, in plain torch (float64)."""
    return plain_sigmoid(q, k, v, scale, causal, mask, _position_bias(slopes, position, q.shape[2], k.shape[2]), mod)


def _check(impl, dtype, position, causal, tol, with_mask=True, mod=None):
    name = f"{impl}{dtype}{position}{causal}{with_mask}{mod is not None}"
    q, k, v, mask, slopes = _inputs(name, dtype)
    text, fn = mod if mod is not None else (None, None)
    out = sigmoid_attention_dispatch(q, k, v, mask if with_mask else None, is_causal=causal, scale=0.4,
                                     enable_gqa=True, bias=BIAS, impl=impl, score_mod=text, position_slopes=slopes,
                                     position=position)
    grad = torch.randn(out.shape, generator=seeded("grad" + name), dtype=torch.float64)
    inputs = (q, k, v, mask) if with_mask else (q, k, v)
    got = dict(zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(out, inputs, grad.to(dtype))))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_mask = ref_inputs[3] if with_mask else None
    expected_out = _reference(*ref_inputs[:3], ref_mask, slopes, position, causal, 0.4, fn)
    expected = dict(zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(expected_out, ref_inputs, grad)))
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol, msg=lambda m: f"out: {m}")
    for key in got:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")
    # the bias mattered: without it the output differs
    plain = _reference(*(t.detach() for t in ref_inputs[:3]), None if ref_mask is None else ref_mask.detach(),
                       slopes * 0, position, causal, 0.4, fn)
    assert (plain - expected_out.detach()).abs().max() > 1e-2


@pytest.mark.parametrize("position", ["j-i", "|j-i|"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_path_computes_the_position_bias(position, causal):
    _check("torch", torch.float64, position, causal, 1e-9)


@pytest.mark.parametrize("position,causal,with_mask", [("j-i", True, False), ("|j-i|", False, True)])
def test_triton_kernels_compute_the_position_bias(position, causal, with_mask):
    require_interpreter()
    _check("triton", torch.float32, position, causal, 2e-4, with_mask=with_mask)


def test_triton_kernels_compute_the_position_bias_after_a_soft_cap():
    require_interpreter()
    _check("triton", torch.float32, "j-i", True, 2e-4, with_mask=True, mod=SOFTCAP)


def test_torch_path_position_bias_in_small_chunks_equals_the_whole():
    """Tiles of a few rows and keys each compute their own part of the bias (the offsets of a chunk)."""
    from attnrewrite.kernels.sigmoid import chunked

    q, k, v, _, slopes = (t.detach() for t in _inputs("chunks", torch.float64, len_q=40, len_k=40))
    old = chunked.KEY_BLOCK
    try:
        chunked.KEY_BLOCK = 8
        got = chunked.chunk_sigmoid_attention(q, k, v, None, torch.full((2, 4), BIAS, dtype=torch.float64), None,
                                              None, None, 0.4, 1, chunk_size=5, slopes=slopes, position="j-i")
    finally:
        chunked.KEY_BLOCK = old
    torch.testing.assert_close(got, _reference(q, k, v, None, slopes, "j-i", True, 0.4), rtol=1e-10, atol=1e-10)


def test_the_public_op_takes_the_slopes_and_checks_them():
    q, k, v, mask, slopes = (t.detach() for t in _inputs("public", torch.float32))
    out = sigmoid_attention(q, k, v, mask, scale=0.4, enable_gqa=True, bias=BIAS, position_slopes=slopes,
                            position="j-i")
    want = _reference(*(t.double() for t in (q, k, v, mask)), slopes, "j-i", False, 0.4)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position must be one of"):
        sigmoid_attention(q, k, v, enable_gqa=True, position_slopes=slopes, position="i*j")
    with pytest.raises(ValueError, match="one slope per query head"):
        sigmoid_attention(q, k, v, enable_gqa=True, position_slopes=slopes[:3], position="j-i")
    with pytest.raises(TypeError, match="needs position_slopes"):
        sigmoid_attention(q, k, v, enable_gqa=True, position="j-i")
    with pytest.raises(ValueError, match="requires grad"):
        sigmoid_attention(q, k, v, enable_gqa=True, position_slopes=slopes.clone().requires_grad_(), position="j-i")


def test_triton_kernels_compute_the_position_bias_after_a_generated_chain():
    require_interpreter()
    chain = ("mul 0.5; square; tanh; mul 2.0", lambda s: torch.tanh((s * 0.5) ** 2) * 2.0)
    _check("triton", torch.float32, "|j-i|", False, 2e-4, with_mask=True, mod=chain)
