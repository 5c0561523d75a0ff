"""A relative position bias read by distance in sigmoid attention (``position="relative"``, ``position_slopes`` the
table R [Hq, Tq + Tk − 1], T5's bias): on the torch path and in the Triton kernels (under TRITON_INTERPRET=1),
outputs and gradients by name — dq, dk, dv, dmask and dR, the table's — against plain torch written here, with
the bias written out as a [Hq, Tq, Tk] tensor R[h, j − i + Tq − 1]."""

from __future__ import annotations


import pytest
import torch

from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch
from attnrewrite.ops import sigmoid_attention
from sigmoid_testing import BIAS, SOFTCAP, masked_inputs, plain_sigmoid, require_interpreter, seeded


def _inputs(name, dtype, heads_q=4, heads_kv=2, len_q=9, len_k=11, dim=8):
    g, (q, k, v, mask) = masked_inputs(name, heads_q, heads_kv, len_q, len_k, dim)
    table = torch.randn(heads_q, len_q + len_k - 1, generator=g, dtype=torch.float64) * 2
    return [t.to(dtype).requires_grad_() for t in (q, k, v, mask, table)]


def written_out(table, len_q, len_k):
    """[1, Hq, Tq, Tk]: R[h, j − i + Tq − 1]."""
    index = torch.arange(len_k).view(1, -1) - torch.arange(len_q).view(-1, 1) + (len_q - 1)
    return table[:, index].unsqueeze(0)


def _reference(q, k, v, mask, table, causal, scale, mod=None):
    """sigmoid(mod(scale·q·kᵀ) + mask + R[h, j − i + Tq − 1] + b)·v over visible keys, plain torch (float64)."""
    return plain_sigmoid(q, k, v, scale, causal, mask, written_out(table, q.shape[2], k.shape[2]), mod)


NAMES = ("dq", "dk", "dv", "dmask", "dtable")


def _check(impl, dtype, causal, tol, with_mask=True, mod=None, len_q=9, len_k=11):
    name = f"{impl}{dtype}{causal}{with_mask}{mod is not None}{len_q}{len_k}"
    q, k, v, mask, table = _inputs(name, dtype, len_q=len_q, len_k=len_k)
    text, fn = mod if mod is not None else (None, None)
    out = sigmoid_attention_dispatch(q, k, v, mask if with_mask else None, is_causal=causal, scale=0.4,
                                     enable_gqa=True, bias=BIAS, impl=impl, score_mod=text, position_slopes=table,
                                     position="relative")
    grad = torch.randn(out.shape, generator=seeded("grad" + name), dtype=torch.float64)
    inputs = {"dq": q, "dk": k, "dv": v, "dtable": table} | ({"dmask": mask} if with_mask else {})
    got = dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), grad.to(dtype))))
    ref = {key: t.detach().double().requires_grad_() for key, t in inputs.items()}
    expected_out = _reference(ref["dq"], ref["dk"], ref["dv"], ref.get("dmask"), ref["dtable"], causal, 0.4, fn)
    expected = dict(zip(ref, torch.autograd.grad(expected_out, list(ref.values()), grad)))
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol, msg=lambda m: f"out: {m}")
    for key in NAMES:
        if key in got:
            torch.testing.assert_close(got[key].double(), expected[key], rtol=tol, atol=tol,
                                       msg=lambda m: f"{key}: {m}")
    # the bias mattered: without it the output differs
    plain = _reference(*(ref[key].detach() for key in ("dq", "dk", "dv")), None, ref["dtable"].detach() * 0,
                       causal, 0.4, fn)
    assert (plain - expected_out.detach()).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_path_reads_the_relative_bias(causal, with_mask):
    _check("torch", torch.float64, causal, 1e-9, with_mask=with_mask)


def test_torch_path_relative_bias_after_a_soft_cap():
    _check("torch", torch.float64, True, 1e-9, mod=SOFTCAP)


@pytest.mark.parametrize("causal,with_mask,len_q,len_k", [(True, False, 9, 11), (False, True, 9, 11),
                                                          (True, True, 20, 20), (False, False, 40, 7)])
def test_triton_kernels_read_the_relative_bias(causal, with_mask, len_q, len_k):
    require_interpreter()
    _check("triton", torch.float32, causal, 2e-4, with_mask=with_mask, len_q=len_q, len_k=len_k)


def test_triton_kernels_relative_bias_after_a_soft_cap():
    require_interpreter()
    _check("triton", torch.float32, True, 2e-4, with_mask=True, mod=SOFTCAP)


def test_torch_path_relative_bias_in_small_chunks_equals_the_whole():
    """Tiles of a few rows and keys each read their own diagonals of R (and sum their own part of dR)."""
    from attnrewrite.kernels.sigmoid import chunked

    old = chunked.KEY_BLOCK
    try:
        chunked.KEY_BLOCK = 8
        q, k, v, _, table = _inputs("chunks", torch.float64, len_q=40, len_k=40)
        out = chunked.chunk_sigmoid_attention(q, k, v, None, torch.full((2, 4), BIAS, dtype=torch.float64), None,
                                              None, None, 0.4, 1, chunk_size=5, slopes=table, position="relative")
        grad = torch.randn(out.shape, generator=seeded("chunks-grad"), dtype=torch.float64)
        got = torch.autograd.grad(out, table, grad)[0]
    finally:
        chunked.KEY_BLOCK = old
    ref = table.detach().requires_grad_()
    want_out = _reference(q.detach(), k.detach(), v.detach(), None, ref, True, 0.4)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, torch.autograd.grad(want_out, ref, grad)[0], rtol=1e-10, atol=1e-10)


def test_the_public_op_checks_the_table():
    q, k, v, mask, table = (t.detach() for t in _inputs("public", torch.float32))
    out = sigmoid_attention(q, k, v, mask, scale=0.4, enable_gqa=True, bias=BIAS, position_slopes=table,
                            position="relative")
    want = _reference(*(t.double() for t in (q, k, v, mask, table)), False, 0.4)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Tq \\+ Tk - 1"):
        sigmoid_attention(q, k, v, enable_gqa=True, position_slopes=table[:, :-1], position="relative")
    with pytest.raises(ValueError, match="must be \\[Hq=4 or 1"):
        sigmoid_attention(q, k, v, enable_gqa=True, position_slopes=table[:3], position="relative")
    with pytest.raises(TypeError, match="needs position_slopes"):
        sigmoid_attention(q, k, v, enable_gqa=True, position="relative")


#: two nonlinear steps (a generated score function) before R is added
SOFTCAP_SIGMOID = ("div 5.0; tanh; mul 5.0; sigmoid; mul 3.0", lambda s: torch.sigmoid(torch.tanh(s / 5.0) * 5.0) * 3.0)


def test_triton_kernels_relative_bias_after_a_generated_chain():
    """dR is dS before the chain's derivative, as after a single step: out, dq, dk, dv, dmask and dtable by name."""
    require_interpreter()
    _check("triton", torch.float32, True, 2e-4, with_mask=True, mod=SOFTCAP_SIGMOID)
