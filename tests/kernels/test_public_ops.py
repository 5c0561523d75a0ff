"""attnrewrite.ops: every kind's public operator against its plain-torch reference, opcheck and
fp64 gradcheck, over dtypes, masks, causality, GQA and Tq != Tk."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention
from attnrewrite.testing.numerics import assert_within_budget

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(b=2, hq=4, hkv=2, tq=12, tk=12, d=8, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)  # noqa: E731
    return make(b, hq, tq, d), make(b, hkv, tk, d), make(b, hkv, tk, d)


def _padding(b=2, t=12):
    keep = torch.ones(b, 1, 1, t, dtype=torch.bool)
    keep[1, ..., 8:] = False
    return keep


def _error_bound(fn, ref_fn, args, dtype):
    """The rule of attnrewrite.testing.numerics: ``fn`` at ``dtype`` against the fp64 reference."""
    exact = ref_fn(*[a.double() for a in args])
    low = [a.to(dtype) for a in args]
    assert_within_budget(fn(*low), ref_fn(*low), exact, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sigmoid_against_reference(dtype, causal):
    q, k, v = _qkv()
    keep = _padding()
    fn = lambda q, k, v: ops.sigmoid_attention(q, k, v, keep, is_causal=causal, enable_gqa=True)  # noqa: E731

    def ref(q, k, v):  # the reference resolves bias="auto" itself (padding-aware)
        return naive_sigmoid_attention(q, k, v, keep, is_causal=causal)
    _error_bound(fn, ref, (q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_against_reference(dtype, causal):
    q, k, v = _qkv()
    keep = _padding()
    fn = lambda q, k, v: ops.linear_attention(q, k, v, keep, is_causal=causal, enable_gqa=True)  # noqa: E731

    def ref(q, k, v):
        return naive_quadratic_linear_attn(q, k, v, causal=causal, feature_map="elu", key_mask=keep[:, 0, 0, :],
                                           compute_dtype=q.dtype)[0]
    _error_bound(fn, ref, (q, k, v), dtype)


def test_sigmoid_decode_shape_and_bias_options():
    q, k, v = _qkv(tq=1, tk=12)
    out = ops.sigmoid_attention(q, k, v, enable_gqa=True)
    assert out.shape == (2, 4, 1, 8)
    fixed = ops.sigmoid_attention(q, k, v, enable_gqa=True, bias=-2.0)
    assert not torch.allclose(out, fixed)
    with pytest.raises(ValueError, match="bias must be 'auto' or a number"):
        ops.sigmoid_attention(q, k, v, enable_gqa=True, bias="learned")


def test_linear_feature_map_callables_and_pairs():
    q, k, v = _qkv(hq=2, hkv=2)
    by_name = ops.linear_attention(q, k, v, feature_map="relu")
    by_callable = ops.linear_attention(q, k, v, feature_map=torch.relu)
    by_pair = ops.linear_attention(q, k, v, feature_map=(torch.relu, torch.relu))
    torch.testing.assert_close(by_callable, by_name)
    torch.testing.assert_close(by_pair, by_name)


def test_linear_refuses_what_it_cannot_honour():
    q, k, v = _qkv(hq=2, hkv=2)
    with pytest.raises(ValueError, match="key-padding"):
        ops.linear_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="dropout"):
        ops.linear_attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("op,kwargs", [
    ("sigmoid_attention", dict(is_causal=True, enable_gqa=True)),
    ("sigmoid_attention", dict(attn_mask="padding", enable_gqa=True, bias=-1.5)),
    ("linear_attention", dict(is_causal=True, enable_gqa=True)),
    ("linear_attention", dict(attn_mask="padding", enable_gqa=True, feature_map="relu")),
])
def test_opcheck(op, kwargs):
    q, k, v = _qkv(dtype=torch.float32, grad=True)
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "padding":
        kwargs["attn_mask"] = _padding()
    result = torch.library.opcheck(getattr(torch.ops.attnrewrite, op).default, (q, k, v), kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("fn", [
    lambda q, k, v: ops.sigmoid_attention(q, k, v, _padding(), is_causal=True, enable_gqa=True),
    lambda q, k, v: ops.linear_attention(q, k, v, _padding(), is_causal=True, enable_gqa=True),
], ids=["sigmoid", "linear"])
def test_gradcheck_fp64(fn):
    q, k, v = _qkv(b=2, tq=12, tk=12, d=4, grad=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))
