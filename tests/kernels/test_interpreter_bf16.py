"""bfloat16 under the Triton interpreter: its ``tl.dot`` multiplies bfloat16's raw 16-bit patterns
(Triton 3.6 to 3.9), so every kernel's products go through ``triton_common.mma``, which widens them there.
Checked on the helper itself and on the sigmoid kernels end to end (in bf16 they returned ~1e9 before)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from attnrewrite.kernels.sigmoid import op, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention
from attnrewrite.kernels.sigmoid.triton_common import mma
from attnrewrite.testing.numerics import assert_within_budget

if not op.interpreter_active():
    pytest.skip("interpreter behaviour: run under TRITON_INTERPRET=1", allow_module_level=True)


@triton.jit
def _product(X, Y, Out, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(X + r[:, None] * N + r[None, :])
    y = tl.load(Y + r[:, None] * N + r[None, :])
    tl.store(Out + r[:, None] * N + r[None, :], mma(x, y, None, "tf32"))


def test_mma_multiplies_bf16_values_not_their_bits():
    g = torch.Generator().manual_seed(7)
    x, y = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    out = torch.empty(16, 16)
    _product[(1,)](x, y, out, N=16)
    torch.testing.assert_close(out, x.float() @ y.float(), rtol=1e-6, atol=1e-6)   # exact in float32


def test_sigmoid_kernels_in_bf16_within_the_numerics_rule():
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(4))

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, do.to(dtype))]

    exact = run(lambda *a: naive_sigmoid_attention(*a, None, True), torch.float64)
    plain = run(lambda *a: naive_sigmoid_attention(*a, None, True), torch.bfloat16)
    got = run(lambda *a: sigmoid_attention_dispatch(*a, is_causal=True, impl="triton"), torch.bfloat16)
    for what, gx, p, e in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert_within_budget(gx, p, e, torch.bfloat16, f"sigmoid bf16 {what}")
