"""``far_dtype`` on the hashed Triton kernels (``impl="triton"``, under ``TRITON_INTERPRET=1`` on the CPU): the
far keys and values are rounded inside the kernels; outputs and dq, dk, dv by name against the reference's
(whose rounding passes the gradient straight through), with masks and GQA; sinks and window untouched.

Shapes are tiny: the interpreter runs one program at a time."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention

triton_ops = pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_ops.interpreter_active(),
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")
KW = dict(enable_gqa=True, bits=16, top_k=3, window=3, sinks=2)


def _inputs(t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(DEVICE)  # noqa: E731
    return make(2, 4, t, 8), make(2, 2, t, 8), make(2, 2, t, 6)


def _mask(name, t):
    if name == "none":
        return None
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 1, t, t, generator=g) > 0.3
    return (0.5 * torch.randn(2, 1, t, t, generator=g)).masked_fill(~keep, float("-inf")).to(DEVICE)


def _reference(q, k, v, mask, causal, far):
    plane = random_hyperplanes(q.shape[-1], KW["bits"], 0).to(DEVICE)
    return naive_hashed_attention(q, k, v, mask, is_causal=causal, top_k=KW["top_k"], window=KW["window"],
                                  sinks=KW["sinks"], proj_q=plane, proj_k=plane, far_dtype=far)[0]


@pytest.mark.parametrize("far_dtype, mask, causal", [("bfloat16", "none", True), ("float16", "additive", False)])
def test_kernels_round_far_keys_as_the_reference(far_dtype, mask, causal):
    q, k, v = (x.requires_grad_() for x in _inputs())
    attn_mask = _mask(mask, q.shape[2])
    got = ops.hashed_attention(q, k, v, attn_mask, is_causal=causal, far_dtype=far_dtype, impl="triton", **KW)
    want = _reference(q, k, v, attn_mask, causal, getattr(torch, far_dtype))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = ops.hashed_attention(q, k, v, attn_mask, is_causal=causal, impl="triton", **KW)
    assert (got - full).abs().max() > 1e-4, "the far keys did change the output"
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    wants = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_sinks_and_window_stay_full_precision():
    """top_k=0 selects only sinks and window: far_dtype changes nothing on the kernels."""
    q, k, v = _inputs(t=8, seed=1)
    kw = dict(KW, top_k=0)
    full = ops.hashed_attention(q, k, v, is_causal=True, impl="triton", **kw)
    assert torch.equal(ops.hashed_attention(q, k, v, is_causal=True, far_dtype="float16", impl="triton", **kw), full)



@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8_e4m3fn in this torch")
def test_the_kind_runs_far_dtype_on_the_kernels():
    """A model rewritten with impl='triton' and far_dtype='bfloat16' runs the kernels with it; float8, which the
    kernels do not implement, is refused by the kind by name (strict: RewriteFailed)."""
    import torch.nn.functional as F

    from attnrewrite import RewriteFailed

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (x[:1, :2] for x in _inputs(seed=2))
    kind = dict(top_k=3, window=3, sinks=2, bits=16, impl="triton")
    torch._dynamo.reset()
    options = dict(to="hashed", compiler="eager", strict=True, far_dtype="bfloat16", **kind)
    got = torch.compile(Attention(), backend="attnrewrite", options=options)(q, k, v)
    torch.testing.assert_close(got, ops.hashed_attention(q, k, v, is_causal=True, far_dtype="bfloat16", **kind),
                               rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(RewriteFailed, match="far_dtype='float8_e4m3fn'"):
        torch.compile(Attention(), backend="attnrewrite", options=dict(options, far_dtype="float8_e4m3fn"))(q, k, v)
