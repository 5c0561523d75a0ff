"""attnrewrite::summary_attention against its brute-force reference: outputs over dtypes, masks, GQA,
causal and bidirectional, mean and learned summaries, many blocks; gradients by name; opcheck;
clear errors for what it does not take."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.summary import chunked
from attnrewrite.kernels.summary.reference import naive_chunk_summaries, naive_summary_attention
from attnrewrite.testing.numerics import assert_within_budget

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b=2, hq=4, hkv=2, t=21, d=8, dv=6, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return make(b, hq, t, d), make(b, hkv, t, d), make(b, hkv, t, dv), make(hkv, d)


def _padding(b=2, t=21):
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 4:7] = False      # a hole inside chunks
    valid[1, -5:] = False      # right padding, a whole chunk included
    return valid


CASES = [  # (T, chunk_size, window_chunks): W = 0, several summaries, T not a multiple of C, window past T
    (21, 4, 1), (21, 3, 0), (16, 8, 0), (21, 2, 20),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,chunk,window", CASES)
@pytest.mark.parametrize("learned", [False, True])
def test_fp64_equals_reference(causal, t, chunk, window, learned, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 40 * 8)  # several query blocks
    q, k, v, p = _inputs(t=t)
    valid = _padding(t=t)
    got = ops.summary_attention(q, k, v, valid[:, None, None, :], is_causal=causal, enable_gqa=True, chunk_size=chunk,
                                window_chunks=window, summary="learned" if learned else "mean",
                                summary_query=p if learned else None)
    want = naive_summary_attention(q, k, v, valid, is_causal=causal, chunk_size=chunk, window_chunks=window,
                                   summary_query=p if learned else None)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_mean_summary_is_the_chunk_mean_and_summaries_are_used():
    """The op differs from a plain sliding window exactly by the summaries: check both facts."""
    q, k, v, _ = _inputs(t=16)
    k_sum, v_sum, exists = naive_chunk_summaries(k, v, None, 4)
    torch.testing.assert_close(k_sum[:, :, 1], k[:, :, 4:8].mean(2))
    assert exists.all()
    with_summaries = ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=4, window_chunks=1)
    chunk = torch.arange(16) // 4
    keep = torch.ones(16, 16, dtype=torch.bool).tril() & (chunk[None] >= chunk[:, None] - 1)
    window_only = ops.softmax_attention(q, k, v, keep, enable_gqa=True)
    torch.testing.assert_close(with_summaries[:, :, :8], window_only[:, :, :8])  # no older chunk yet
    assert (with_summaries[:, :, 8:] - window_only[:, :, 8:]).abs().max() > 1e-3


def test_huge_window_is_exact_softmax():
    q, k, v, _ = _inputs(t=13)
    got = ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=4, window_chunks=4)
    torch.testing.assert_close(got, ops.softmax_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_error_bound(dtype, causal):
    """The rule of attnrewrite.testing.numerics, the reference at ``dtype`` being plain torch."""
    q, k, v, p = _inputs(t=19)
    valid = _padding(t=19)
    kw = dict(is_causal=causal, chunk_size=4, window_chunks=1)
    exact = naive_summary_attention(q, k, v, valid, summary_query=p, **kw)
    low = [x.to(dtype) for x in (q, k, v)]
    got = ops.summary_attention(*low, valid[:, None, None], enable_gqa=True, summary="learned", summary_query=p.float(),
                                **kw)
    plain = naive_summary_attention(*low, valid, summary_query=p.float(), **kw)
    assert_within_budget(got, plain, exact, dtype, "out")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dv", [6, 8])  # Dv == D: the fused CPU backward of each block; Dv != D: the formulas
def test_gradients_equal_the_references(causal, dv, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 32 * 8)
    q, k, v, p = _inputs(t=17, dv=dv, grad=True)
    valid = _padding(t=17)
    kw = dict(is_causal=causal, chunk_size=3, window_chunks=1, summary_query=p)
    weights = torch.randn(2, 4, 17, dv, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((ops.summary_attention(q, k, v, valid[:, None, None], enable_gqa=True, summary="learned",
                                                     **kw) * weights).sum(), (q, k, v, p))
    want = torch.autograd.grad((naive_summary_attention(q, k, v, valid, **kw) * weights).sum(), (q, k, v, p))
    for name, g, w in zip(("q", "k", "v", "summary_query"), got, want):
        assert w.abs().max() > 1e-3, name
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=f"gradient of {name}")


def test_gradcheck_fp64():
    q, k, v, p = _inputs(b=1, t=10, d=4, dv=3, grad=True)

    def fn(q, k, v, p):
        return ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=3, window_chunks=1, summary="learned",
                                     summary_query=p)
    assert torch.autograd.gradcheck(fn, (q, k, v, p), fast_mode=True)


@pytest.mark.parametrize("kwargs", [
    dict(chunk_size=3, window_chunks=1),
    dict(chunk_size=4, window_chunks=0, is_causal=False, attn_mask="padding", summary="learned"),
])
def test_opcheck(kwargs):
    q, k, v, p = (x.detach().float().requires_grad_() for x in _inputs(t=13))
    kwargs = dict(kwargs, enable_gqa=True)
    if kwargs.get("attn_mask") == "padding":
        kwargs["attn_mask"] = _padding(t=13)[:, None, None]
    if kwargs.get("summary") == "learned":
        kwargs["summary_query"] = p
    result = torch.library.opcheck(torch.ops.attnrewrite.summary_attention.default, (q, k, v), kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_float_padding_mask_equals_bool():
    q, k, v, _ = _inputs(t=13)
    valid = _padding(t=13)[:, None, None]
    additive = torch.zeros(valid.shape, dtype=q.dtype).masked_fill(~valid, float("-inf"))
    kw = dict(enable_gqa=True, chunk_size=4, window_chunks=1)
    torch.testing.assert_close(ops.summary_attention(q, k, v, additive, **kw),
                               ops.summary_attention(q, k, v, valid, **kw))


@pytest.mark.parametrize("change,message", [
    (dict(k=torch.zeros(2, 2, 9, 8)), "Tq == Tk"),
    (dict(attn_mask=torch.ones(13, 13, dtype=torch.bool).tril()), "key-padding"),
    (dict(attn_mask=torch.randn(2, 1, 1, 13)), "cannot add a float bias"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(summary="learned"), "summary_query"),
    (dict(summary="max"), "summary must be one of"),
    (dict(enable_gqa=False), "enable_gqa"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_clear_errors(change, message):
    q, k, v, _ = (x.float() for x in _inputs(t=13))
    args = dict(q=q, k=k, v=v[:, :, :k.shape[2]], enable_gqa=True)
    args.update(change)
    if "k" in change:
        args["v"] = torch.zeros(2, 2, change["k"].shape[2], 6)
    with pytest.raises(ValueError, match=message):
        ops.summary_attention(**args)


@pytest.mark.parametrize("dv", [6, 8])  # both backward paths (fused blocks when Dv == D)
def test_rows_that_see_nothing_give_zero_and_zero_gradients(dv):
    """A sequence of padding only: its queries see no key and no summary; output 0, gradients 0 (not nan)."""
    q, k, v, _ = _inputs(t=12, dv=dv, grad=True)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1] = False
    kw = dict(chunk_size=4, window_chunks=1)
    out = ops.summary_attention(q, k, v, valid[:, None, None], enable_gqa=True, **kw)
    torch.testing.assert_close(out, naive_summary_attention(q, k, v, valid, **kw), rtol=0, atol=1e-13)
    assert (out[1] == 0).all() and out[0].abs().max() > 0.1
    for name, grad in zip("qkv", torch.autograd.grad(out.square().sum(), (q, k, v))):
        assert torch.isfinite(grad).all() and (grad[1] == 0).all() and grad[0].abs().max() > 1e-3, name


@pytest.mark.parametrize("t,chunk,window,rows", [(61, 4, 2, 8), (64, 8, 3, 16), (45, 2, 0, 4), (40, 4, 20, 12)])
@pytest.mark.parametrize("learned", [False, True])
def test_split_forward_equals_reference(t, chunk, window, rows, learned, monkeypatch):
    """Causal float32 without padding: the unmasked call over what a block sees whole, the masked call over its
    staircase and diagonal, merged by log-sum-exp (chunked._split_forward), match the float64 reference."""
    monkeypatch.setattr(chunked, "SPLIT_ROWS", rows)  # several blocks, staircases of 1 to 3 chunks
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")  # on one thread the compiled loop (test_summary_native.py) would run
    taken = []
    split = chunked._split_forward
    monkeypatch.setattr(chunked, "_split_forward", lambda *a: taken.append(1) or split(*a))
    q, k, v, p = _inputs(t=t, d=8, dv=8)
    kw = dict(is_causal=True, chunk_size=chunk, window_chunks=window, summary_query=p if learned else None)
    got = ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True,
                                summary="learned" if learned else "mean", **kw)
    want = naive_summary_attention(q, k, v, None, **kw)
    assert taken, "the split path was not taken"
    assert got.dtype == torch.float32 and want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-6)
