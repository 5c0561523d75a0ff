"""attnrewrite::hashed_attention against its brute-force reference: selected sets and outputs over dtypes,
masks (bool, additive, padding), GQA, causal and decode-shaped calls, many blocks; gradients by name (the
selected keys only), the straight-through gradient of learned projections; codes; opcheck; errors."""

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed import sparse
from attnrewrite.kernels.hashed.codes import hamming, hamming_by_table, pack, random_hyperplanes, signs
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.kernels.hashed.state import HashProjections
from attnrewrite.testing.numerics import assert_within_budget

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b=2, hq=4, hkv=2, tq=19, tk=19, d=8, dv=6, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return make(b, hq, tq, d), make(b, hkv, tk, d), make(b, hkv, tk, dv)


def _masks(tq, tk, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 1, tq, tk, generator=g) > 0.25
    padding = torch.ones(2, 1, 1, tk, dtype=torch.bool)
    padding[1, ..., :3] = False  # left padding
    bias = 0.5 * torch.randn(2, 1, tq, tk, generator=g, dtype=torch.float64)
    return {"none": None, "bool": keep, "padding": padding,
            "additive": bias.masked_fill(~keep, float("-inf")), "min-fill": bias.masked_fill(~keep, -1e9)}


CASES = [  # (causal, Tq, Tk, top_k, window, sinks, bits)
    (True, 19, 19, 3, 4, 2, 16),
    (True, 19, 19, 0, 0, 0, 8),    # nothing selected: zeros
    (True, 19, 19, 4, 30, 1, 64),  # window longer than the sequence
    (False, 19, 19, 5, 3, 2, 32),
    (False, 1, 30, 5, 3, 2, 32),   # a decoding query against a cache
    (False, 7, 30, 50, 3, 2, 8),   # top_k beyond the keys
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask", ["none", "bool", "padding", "additive", "min-fill"])
def test_fp64_equals_reference(case, mask, monkeypatch):
    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", 3000)  # several query blocks
    causal, tq, tk, top_k, window, sinks, bits = case
    q, k, v = _inputs(tq=tq, tk=tk)
    attn_mask = _masks(tq, tk)[mask]
    plane = random_hyperplanes(8, bits, 0)
    kw = dict(is_causal=causal, top_k=top_k, window=window, sinks=sinks)
    got = ops.hashed_attention(q, k, v, attn_mask, enable_gqa=True, bits=bits, **kw)
    want, chosen = naive_hashed_attention(q, k, v, attn_mask, proj_q=plane, proj_k=plane, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    if top_k and tk > sinks + window + top_k:
        assert any(len(c) == sinks + window + top_k for per_head in chosen for rows in per_head for c in rows)


@pytest.mark.parametrize("mask", ["none", "additive"])
def test_gathered_attention_equals_the_sparse_products(mask, monkeypatch):
    """The forward off the CPU gathers the selected keys; on the CPU it uses sparse products: the same output."""
    q, k, v = _inputs(tq=19, tk=19)
    kw = dict(attn_mask=_masks(19, 19)[mask], is_causal=True, enable_gqa=True, bits=16, top_k=3, window=4, sinks=2)
    sparse_products = ops.hashed_attention(q, k, v, **kw)
    monkeypatch.setattr(sparse, "USE_CSR", False)
    torch.testing.assert_close(ops.hashed_attention(q, k, v, **kw), sparse_products, rtol=0, atol=1e-13)


def test_selection_uses_the_codes():
    """With a small top_k the output differs from exact attention, and from a selection by position."""
    q, k, v = _inputs(tq=40, tk=40)
    exact = ops.softmax_attention(q, k, v, is_causal=True, enable_gqa=True)
    hashed = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, top_k=4, window=4, sinks=1)
    other_draw = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, top_k=4, window=4, sinks=1, seed=1)
    assert (hashed - exact).abs().max() > 1e-2 and (hashed - other_draw).abs().max() > 1e-3
    wide = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, top_k=40, window=4, sinks=1)
    torch.testing.assert_close(wide, exact)  # every key selected: exact attention


def test_packed_popcount_equals_sign_products():
    q, k, _ = _inputs(tq=5, tk=33, d=16)
    plane = random_hyperplanes(16, 64, 3)
    via_signs = ((signs(q, plane).reshape(2, 2, 2, 5, 64).sum(2) @ signs(k, plane).transpose(-1, -2) + 2 * 64) / 2)
    for row in range(5):
        codes = pack(q[:, :, row:row + 1], plane).reshape(2, 2, 2, 8)
        via_popcount = 2 * 64 - hamming(codes, pack(k, plane))
        assert torch.equal(via_popcount, via_signs[:, :, row].long())
        assert torch.equal(2 * 64 - hamming_by_table(codes, pack(k, plane)), via_popcount)  # the non-CPU path
    assert pack(k, plane).dtype == torch.uint8 and pack(k, plane).shape[-1] == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_error_bound(dtype):
    """The rule of attnrewrite.testing.numerics, the reference at ``dtype`` being plain torch.  Both select
    from codes of the rounded inputs, so both are compared with the fp64 computation on those inputs."""
    q, k, v = (x.to(dtype) for x in _inputs(tq=17, tk=17))
    mask = _masks(17, 17)["additive"]
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=True, top_k=3, window=3, sinks=1)
    exact, _ = naive_hashed_attention(q.double(), k.double(), v.double(), mask, proj_q=plane, proj_k=plane, **kw)
    got = ops.hashed_attention(q, k, v, mask.to(dtype), enable_gqa=True, bits=16, **kw)
    plain, _ = naive_hashed_attention(q, k, v, mask.to(dtype), proj_q=plane, proj_k=plane, **kw)
    assert_within_budget(got, plain, exact, dtype, "out")


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_the_reference(causal, monkeypatch):
    """q gets its gradient, and only the selected keys and values get theirs (the reference's autograd)."""
    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", 2000)
    q, k, v = _inputs(tq=15, tk=15, grad=True)
    mask = _masks(15, 15)["additive"]
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=causal, top_k=2, window=2, sinks=1)
    weights = torch.randn(2, 4, 15, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((ops.hashed_attention(q, k, v, mask, enable_gqa=True, bits=16, **kw) * weights).sum(),
                              (q, k, v))
    out, _ = naive_hashed_attention(q, k, v, mask, proj_q=plane, proj_k=plane, **kw)
    want = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert w.abs().max() > 1e-3, name
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=f"gradient of {name}")
    assert (want[1] == 0).all(-1).any()  # some keys were never selected and get exactly nothing


def test_learned_projections_get_the_straight_through_gradient():
    """d(out)/d(projections) equals autograd through softmax(s·q·k_sel + (ã − stopgrad ã)) on the op's
    selection."""
    q, k, v = _inputs(b=1, tq=12, tk=12)
    state = HashProjections(4, 2, 8, 8, seed=0).double()
    with torch.no_grad():
        state.q_projection.add_(0.1 * torch.randn(state.q_projection.shape, dtype=torch.float64))
    kw = dict(is_causal=True, top_k=2, window=2, sinks=1)
    weights = torch.randn(1, 4, 12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ops.hashed_attention(q, k, v, enable_gqa=True, bits=8, hash="learned",
                               projections=(state.q_projection, state.k_projection), **kw)
    got = torch.autograd.grad((out * weights).sum(), (state.q_projection, state.k_projection))

    _, chosen = naive_hashed_attention(q, k, v, proj_q=state.q_projection.detach(),
                                       proj_k=state.k_projection.detach(), **kw)
    soft_q = torch.tanh(torch.einsum("bhtd,hdn->bhtn", q, state.q_projection))
    soft_k = torch.tanh(torch.einsum("bhtd,hdn->bhtn", k, state.k_projection))
    total = 0
    for h in range(4):
        for i in range(12):
            keys = chosen[0][h // 2][i]
            soft = soft_k[0, h // 2, keys] @ soft_q[0, h, i] / 8
            logits = (k[0, h // 2, keys] @ q[0, h, i]) * 8 ** -0.5 + soft - soft.detach()
            total = total + (torch.softmax(logits, 0) @ v[0, h // 2, keys] * weights[0, h, i]).sum()
    want = torch.autograd.grad(total, (state.q_projection, state.k_projection))
    for name, g, w in zip(("q_projection", "k_projection"), got, want):
        assert w.abs().max() > 1e-4, name
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=f"gradient of {name}")


def test_gradcheck_fp64():
    q, k, v = _inputs(b=1, tq=9, tk=9, d=4, dv=3, grad=True)
    keep = _masks(9, 9)["bool"][:1]

    def fn(q, k, v):
        return ops.hashed_attention(q, k, v, keep, is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2, sinks=1)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("learned", [False, True])
def test_opcheck(learned):
    q, k, v = (x.detach().float().requires_grad_() for x in _inputs(tq=11, tk=11))
    kwargs = dict(attn_mask=_masks(11, 11)["bool"], is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2,
                  sinks=1)
    if learned:
        state = HashProjections(4, 2, 8, 8)
        kwargs.update(hash="learned", q_projection=state.q_projection, k_projection=state.k_projection)
    result = torch.library.opcheck(torch.ops.attnrewrite.hashed_attention.default, (q, k, v), kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("change,message", [
    (dict(is_causal=True, tq=3), "is_causal needs Tq == Tk"),
    (dict(attn_mask=torch.ones(2, 4, 11, 11, dtype=torch.bool)), "the same for every head"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(bits=12), "multiple of 8"),
    (dict(hash="learned"), "q_projection"),
    (dict(hash="lsh"), "hash must be one of"),
    (dict(top_k=-1), ">= 0"),
])
def test_clear_errors(change, message):
    change = dict(change)
    q, k, v = (x.float() for x in _inputs(tq=change.pop("tq", 11), tk=11))
    with pytest.raises(ValueError, match=message):
        ops.hashed_attention(q, k, v, enable_gqa=True, **change)
