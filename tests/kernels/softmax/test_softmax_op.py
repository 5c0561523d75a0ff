"""attnrewrite.ops.softmax_attention against the plain-torch reference, opcheck, and input errors."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.softmax import reference
from attnrewrite.testing.numerics import assert_within_budget


def _qkv(b=2, hq=4, hkv=4, tq=8, tk=8, d=16, dtype=torch.float64, grad=False):
    make = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=grad)  # noqa: E731
    return make(b, hq, tq, d), make(b, hkv, tk, d), make(b, hkv, tk, d)


MASKS = {
    "none": lambda b, tq, tk: None,
    "bool_padding": lambda b, tq, tk: torch.rand(b, 1, 1, tk) > 0.3,
    "additive": lambda b, tq, tk: torch.randn(b, 1, tq, tk, dtype=torch.float64),
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_matches_reference_outputs_and_gradients(mask, causal, hkv):
    q, k, v = _qkv(hkv=hkv, grad=True)
    m = MASKS[mask](2, 8, 8)
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # every row keeps a key: the reference would give 0/0 otherwise
    kwargs = dict(attn_mask=m, is_causal=causal, scale=0.3, enable_gqa=hkv != 4)
    out = ops.softmax_attention(q, k, v, **kwargs)
    ref = reference.softmax_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")


def test_fully_masked_rows_give_zero():
    q, k, v = _qkv(b=1, hq=1, hkv=1)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 3, :] = False
    out = ops.softmax_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
    assert torch.equal(reference.softmax_attention(q, k, v, attn_mask=mask)[..., 3, :], out[..., 3, :])


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(enable_gqa=True), dict(attn_mask="additive")])
def test_opcheck(kwargs):
    q, k, v = _qkv(hkv=2 if kwargs.get("enable_gqa") else 4, dtype=torch.float32, grad=True)
    if kwargs.get("attn_mask") == "additive":
        kwargs = dict(attn_mask=torch.randn(2, 1, 8, 8))
    result = torch.library.opcheck(torch.ops.attnrewrite.softmax_attention.default, (q, k, v), kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp64(dtype):
    q, k, v = _qkv(dtype=torch.float64)
    ref = reference.softmax_attention(q, k, v, is_causal=True)
    low = ops.softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
    plain = reference.softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
    # band: one eps, absolute (the outputs are O(1) averages of v), tighter than the default two ulps
    # of max|ref|, as this check has always been
    assert_within_budget(low, plain, ref, dtype, "out", band=torch.finfo(dtype).eps)


def test_compiles_without_graph_break():
    q, k, v = _qkv(dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: ops.softmax_attention(q, k, v, is_causal=True), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), reference.softmax_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda q, k, v: (q, k[..., :8], v), "head dims differ"),
        (lambda q, k, v: (q, k, v[:, :, :4]), "agree on heads and number of keys"),
        (lambda q, k, v: (q, k.float(), v), "share a dtype"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), "enable_gqa"),
    ],
)
def test_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ops.softmax_attention(*bad(*_qkv()))


def test_gqa_needs_divisible_heads():
    q, k, v = _qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match="multiple"):
        ops.softmax_attention(q, k, v, enable_gqa=True)
