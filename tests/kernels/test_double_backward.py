"""Second-order gradients of every kind: exact where implemented (gradgradcheck in fp64), a clear
error where not — never a silently wrong number (causal linear attention used to drop the paths of
the second derivative through k and v)."""

import pytest
import torch
from torch.autograd import gradgradcheck

from attnrewrite import ops
from attnrewrite.kernels.linear import linear_attention_dispatch
from attnrewrite.kernels.linear.chunk_torch import chunk_linear_attn_torch
from attnrewrite.kernels.sigmoid.api import sigmoid_attention_dispatch


def _qkv(hq=2, hkv=2, t=5, d=3):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, t, d, generator=g, dtype=torch.float64).requires_grad_()
                 for h in (hq, hkv, hkv))


def _padding(t=5):
    keep = torch.ones(1, 1, 1, t, dtype=torch.bool)
    keep[..., -2:] = False
    return keep


EXACT = {
    "linear causal": lambda q, k, v: ops.linear_attention(q, k, v, is_causal=True),
    "linear causal, gqa, padding, relu": lambda q, k, v: ops.linear_attention(
        q, k, v, _padding(), is_causal=True, enable_gqa=True, feature_map="relu"),
    "linear causal, 3 chunks": lambda q, k, v: chunk_linear_attn_torch(
        q, k, v, causal=True, scale=0.7, chunk_size=2)[0],
    "linear bidirectional": lambda q, k, v: ops.linear_attention(q, k, v, _padding(), enable_gqa=True),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_linear_second_order_gradients_are_exact(name):
    gqa = "gqa" in name
    q, k, v = _qkv(hq=4 if gqa else 2)
    assert gradgradcheck(EXACT[name], (q, k, v))


def test_linear_second_order_gradients_reach_the_initial_state():
    q, k, v = _qkv()
    s0 = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    z0 = torch.rand(1, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, s0, z0):
        out, state = linear_attention_dispatch(q, k, v, is_causal=True, impl="torch", initial_state=(s0, z0),
                                               output_final_state=True)
        return out, state.S, state.z
    assert gradgradcheck(fn, (q, k, v, s0, z0))


REFUSED = {  # kinds (and paths) whose backward is an operator without a derivative of its own
    "sigmoid": lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True),
    "sigmoid triton": lambda q, k, v: sigmoid_attention_dispatch(q.float(), k.float(), v.float(), is_causal=True,
                                                                 impl="triton"),
    "linear triton": lambda q, k, v: linear_attention_dispatch(q.float(), k.float(), v.float(), is_causal=True,
                                                               impl="triton"),
    "summary": lambda q, k, v: ops.summary_attention(q, k, v, chunk_size=2, window_chunks=1),
    "hashed": lambda q, k, v: ops.hashed_attention(q, k, v, bits=8, top_k=2, window=2, sinks=1),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_second_order_gradients_are_refused_by_name(name):
    q, k, v = _qkv()
    out = REFUSED[name](q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # first order: fine
    with pytest.raises(NotImplementedError, match=r"^attnrewrite::\w+ has no derivative: second-order gradients"):
        torch.autograd.grad(dq.sum(), (q, k, v))


def test_softmax_second_order_gradients_are_sdpas():
    """The softmax op is SDPA: exact on the math backend, SDPA's own error on a fused one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv()
    with sdpa_kernel(SDPBackend.MATH):
        assert gradgradcheck(lambda q, k, v: ops.softmax_attention(q, k, v, is_causal=True), (q, k, v))
    out = ops.softmax_attention(q, k, v, is_causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    try:
        torch.autograd.grad(dq.sum(), (q, k, v))
    except RuntimeError as error:  # a fused backend without a double backward
        assert "not implemented" in str(error)
