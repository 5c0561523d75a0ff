"""attnrewrite.ops.sink_softmax_attention (gpt-oss's learned attention sinks) against the written-out reference
``softmax(cat([s, sink], -1))[..., :-1] @ v``: outputs and the gradients of q, k, v and the sinks, opcheck,
input errors."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.softmax import reference
from attnrewrite.testing.numerics import assert_within_budget

B, HQ, T, D = 2, 4, 8, 16


def _inputs(hkv=HQ, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(B, HQ, T, D), make(B, hkv, T, D), make(B, hkv, T, D), (2 * make(HQ)).detach().requires_grad_(grad)


MASKS = {
    "none": lambda: None,
    "bool_padding": lambda: torch.arange(T).view(1, 1, 1, T) < torch.tensor([T, 3]).view(B, 1, 1, 1),
    "additive": lambda: torch.randn(B, 1, T, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2])
def test_matches_the_written_out_form_outputs_and_gradients(mask, causal, hkv):
    q, k, v, sinks = _inputs(hkv=hkv, grad=True)
    kwargs = dict(attn_mask=MASKS[mask](), is_causal=causal, scale=0.3, enable_gqa=hkv != HQ, sink_logits=sinks)
    out = ops.sink_softmax_attention(q, k, v, **kwargs)
    ref = reference.softmax_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), g)
    for name, got, want in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert want.abs().max() > 1e-3, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_the_sinks_take_their_share_of_each_row():
    """out = softmax-attention · (1 − p_sink), p_sink = exp(sink) / (exp(sink) + Σ exp(s)): checked by that identity,
    and a sink of −inf is plain softmax attention."""
    q, k, v, sinks = _inputs()
    plain = ops.softmax_attention(q, k, v, scale=0.3)
    lse = torch.logsumexp(q @ k.mT * 0.3, dim=-1, keepdim=True)
    share = torch.sigmoid(lse - sinks.view(1, -1, 1, 1))  # Σ exp(s) / (Σ exp(s) + exp(sink))
    torch.testing.assert_close(ops.sink_softmax_attention(q, k, v, scale=0.3, sink_logits=sinks), plain * share,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.sink_softmax_attention(q, k, v, scale=0.3, sink_logits=torch.full(
        (HQ,), float("-inf"), dtype=q.dtype)), plain, rtol=1e-12, atol=1e-12)
    assert torch.equal(ops.sink_softmax_attention(q, k, v, scale=0.3), plain)  # no sinks: the softmax op itself


def test_a_row_that_sees_no_key_gives_zero():
    q, k, v, sinks = _inputs()
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    mask[..., 3, :] = False
    out = ops.sink_softmax_attention(q, k, v, attn_mask=mask, sink_logits=sinks)
    assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
    torch.testing.assert_close(out, reference.softmax_attention(q, k, v, attn_mask=mask, sink_logits=sinks))


@pytest.mark.parametrize("shape", [(HQ,), (HQ, 1, 1), (1, HQ, 1, 1), (1,)])
def test_sink_shapes_one_per_head_or_one_for_all(shape):
    q, k, v, sinks = _inputs()
    sinks = sinks[:1].expand(HQ) if shape == (1,) else sinks
    got = ops.sink_softmax_attention(q, k, v, sink_logits=sinks[:shape[0] if len(shape) == 1 else HQ].reshape(shape))
    torch.testing.assert_close(got, reference.softmax_attention(q, k, v, sink_logits=sinks))


@pytest.mark.parametrize("bad,error,match", [
    (torch.zeros(HQ + 1), ValueError, "one logit per query head"),
    (torch.zeros(B, HQ, 1, 1), ValueError, "one logit per query head"),
    (torch.zeros(1, HQ, T, 1), ValueError, "one logit per query head"),
    (torch.zeros(HQ, dtype=torch.int64), TypeError, "floating-point"),
])
def test_bad_sinks_are_refused_by_name(bad, error, match):
    q, k, v, _ = _inputs()
    with pytest.raises(error, match=match):
        ops.sink_softmax_attention(q, k, v, sink_logits=bad)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(enable_gqa=True), dict(attn_mask="additive")])
def test_opcheck(kwargs):
    q, k, v, sinks = _inputs(hkv=2 if kwargs.get("enable_gqa") else HQ, dtype=torch.float32, grad=True)
    if kwargs.get("attn_mask") == "additive":
        kwargs = dict(attn_mask=torch.randn(B, 1, T, T))
    result = torch.library.opcheck(torch.ops.attnrewrite.sink_softmax_attention.default, (q, k, v),
                                   {**kwargs, "sink_logits": sinks})
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp64(dtype):
    q, k, v, sinks = _inputs()
    ref = reference.softmax_attention(q, k, v, is_causal=True, sink_logits=sinks)
    low = ops.sink_softmax_attention(*(x.to(dtype) for x in (q, k, v)), is_causal=True, sink_logits=sinks)
    plain = reference.softmax_attention(*(x.to(dtype) for x in (q, k, v)), is_causal=True, sink_logits=sinks)
    assert_within_budget(low, plain, ref, dtype, "out", band=torch.finfo(dtype).eps)
