"""Every kind's public op, compiled with AOTAutograd (``aot_eager``: the backward graph is traced on fake
tensors, then run on real ones), gives the eager gradients when q/k/v arrive as HF models pass them:
slices of one fused projection, viewed [B, T, H, D] and transposed to [B, H, T, D], and the output
viewed back to [B, T, H·D] — in float32 and under CPU bfloat16 autocast.

A traced backward is only as right as the strides its fakes promise: a tensor that is contiguous at run
time where the fake said "transposed" makes the graph's ``view`` fail ("view size is not compatible
with input tensor's size and stride").  The linear kind's torch path did exactly that (PyTorch's fake
``aten.elu_backward`` takes its input's strides, the real kernel the gradient's), which broke GPT-2
training with the linear kind under ``aot_eager``/inductor.
"""

import pytest
import torch

from attnrewrite import ops

KINDS = ("softmax", "sigmoid", "linear", "summary", "hashed")
B, T, H, D = 2, 24, 4, 8


def _grads(fn, compiler, bf16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 3 * H * D, generator=g, requires_grad=True)
    weights = torch.randn(B, T, H * D, generator=g)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = torch.compile(fn, backend=compiler, fullgraph=True)(x)
    (out.float() * weights).sum().backward()
    return x.grad


def _assert_same_gradient(got, want, bf16):
    """The same maths: fp32 to rounding; under autocast a compiled backward is traced with autocast on,
    so a matmul that eager autograd runs in fp32 may run in bf16: one bf16 rounding step (2⁻⁸) of the
    largest gradient."""
    tol = 2.0 ** -8 if bf16 else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))


def _hf_layout(attention):
    def fn(x):
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=-1))
        return attention(q, k, v).transpose(1, 2).reshape(B, T, H * D)
    return fn


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_backward_of_transposed_views_equals_eager(kind, bf16):
    op = getattr(ops, f"{kind}_attention")
    fn = _hf_layout(lambda q, k, v: op(q, k, v, is_causal=True))
    want = _grads(fn, "eager", bf16)
    got = _grads(fn, "aot_eager", bf16)
    torch._dynamo.reset()
    _assert_same_gradient(got, want, bf16)


@pytest.mark.parametrize("case", ["bidirectional-padded", "causal-fewer-queries"])
def test_linear_compiled_backward_other_paths(case):
    """The linear kind's other torch paths with the same layouts: a key-padding mask without causality,
    and a causal step with fewer queries than keys (the prefix folded into the initial state)."""
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., T - 5:] = False

    def attention(q, k, v):
        if case == "bidirectional-padded":
            return ops.linear_attention(q, k, v, attn_mask=mask)
        return torch.cat([q[:, :, :T - 7], ops.linear_attention(q[:, :, T - 7:], k, v, is_causal=True)], dim=2)

    fn = _hf_layout(attention)
    for bf16 in (False, True):
        want = _grads(fn, "eager", bf16)
        got = _grads(fn, "aot_eager", bf16)
        torch._dynamo.reset()
        _assert_same_gradient(got, want, bf16)
