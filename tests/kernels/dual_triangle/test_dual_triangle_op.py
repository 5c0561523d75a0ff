"""attnrewrite::dual_triangle_attention against its plain-torch reference (outputs and gradients by name,
over masks, GQA, head splits and dtypes), dropout as SDPA draws it, clear errors (opcheck:
tests/kernels/test_opcheck_every_op.py), and the BERT target rewritten to dual_triangle equal to BERT
written by hand with dual-triangle attention."""

import math

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.dual_triangle.reference import naive_dual_triangle_attention
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import (
    assert_close_rel,
    assert_same_function,
    compile_rewritten,
)
from attnrewrite.testing.numerics import assert_within_budget


def _qkv(b=2, hq=4, hkv=2, t=11, d=8, dv=6, grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return make(b, hq, t, d), make(b, hkv, t, d), make(b, hkv, t, dv)


def _masks(b=2, hq=4, t=11):
    keep = torch.ones(b, 1, 1, t, dtype=torch.bool)
    keep[1, ..., 7:] = False  # right padding
    bias = torch.randn(1, hq, t, t, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {"none": None, "padding": keep, "bias": bias}


@pytest.mark.parametrize("mask", ["none", "padding", "bias"])
@pytest.mark.parametrize("past_heads", [None, 0, 1, 4])
def test_fp64_outputs_and_gradients_equal_the_reference(mask, past_heads):
    q, k, v = _qkv(grad=True)
    attn_mask = _masks()[mask]
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.clone().requires_grad_()
    got = ops.dual_triangle_attention(q, k, v, attn_mask, enable_gqa=True, past_heads=past_heads)
    want = naive_dual_triangle_attention(q, k, v, attn_mask, past_heads=past_heads)
    leaves = {"q": q, "k": k, "v": v} | ({"attn_mask": attn_mask} if mask == "bias" else {})
    assert_same_function(got, want, leaves)


def test_each_head_sees_its_own_triangle():
    """Moving a future key changes only the future-looking heads' output of earlier queries, and the other
    way round: the split is by head, as declared."""
    q, k, v = _qkv(hkv=4)
    base = ops.dual_triangle_attention(q, k, v, past_heads=2)
    v2 = v.clone()
    v2[:, :, 8] += 1.0  # key 8
    moved = ops.dual_triangle_attention(q, k, v2, past_heads=2)
    changed = (moved - base).abs().amax(-1) > 1e-9  # [B, H, T]
    assert not changed[:, :2, :8].any() and changed[:, :2, 8:].all()   # past heads: only queries i ≥ 8
    assert changed[:, 2:, :9].all() and not changed[:, 2:, 9:].any()   # future heads: only queries i ≤ 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_budget(dtype):
    q, k, v = _qkv()
    keep = _masks()["padding"]
    exact = naive_dual_triangle_attention(q, k, v, keep)
    low = [t.to(dtype) for t in (q, k, v)]
    got = ops.dual_triangle_attention(*low, keep, enable_gqa=True)
    assert got.dtype == dtype
    assert_within_budget(got, naive_dual_triangle_attention(*low, keep), exact, dtype, "out")


def test_dropout_is_sdpas():
    """Same seed, same draw: the op's dropout is SDPA's on the per-head triangle mask."""
    q, k, v = (t.float() for t in _qkv(hkv=4))
    i = torch.arange(11)
    tri = torch.stack([i[None] <= i[:, None]] * 2 + [i[None] >= i[:, None]] * 2)
    torch.manual_seed(5)
    got = ops.dual_triangle_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, tri, dropout_p=0.3)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, ops.dual_triangle_attention(q, k, v))


def test_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="is_causal"):
        ops.dual_triangle_attention(q, k, v, is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="past_heads"):
        ops.dual_triangle_attention(q, k, v, enable_gqa=True, past_heads=5)
    with pytest.raises(ValueError, match="Tq == Tk"):
        ops.dual_triangle_attention(q[:, :, :3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        ops.dual_triangle_attention(q, k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.dual_triangle_attention(q, k, v, torch.ones(3, 1, 11, 11, dtype=torch.bool), enable_gqa=True)


# --------------------------------------------------------------------------- the rewrite, against a hand-written model


def _hand_written_bert():
    """The BERT target with dual-triangle attention written out by hand (first half of the heads: j ≤ i)."""
    from attnrewrite.targets import bert

    class DualTriangleSelfAttention(bert.SelfAttention):
        def forward(self, x, mask_bias):
            B, T, C = x.shape
            q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            v = self.value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
            i = torch.arange(T)
            past, future = i[None, :] <= i[:, None], i[None, :] >= i[:, None]
            half = self.n_heads // 2
            visible = torch.stack([past] * half + [future] * (self.n_heads - half))  # [H, T, T]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            return self.out((probs @ v).transpose(1, 2).reshape(B, T, C))

    return DualTriangleSelfAttention


def test_bert_target_rewritten_equals_hand_written_dual_triangle_bert():
    from attnrewrite.testing.targets import build

    model, inputs, _ = build("bert")
    model = model.eval()
    oracle, _, _ = build("bert")
    oracle = oracle.eval()
    for layer in oracle.layers:
        original = layer.attention
        layer.attention = _hand_written_bert()(oracle.config)
        layer.attention.load_state_dict(original.state_dict())

    report = Report()
    got = compile_rewritten(model, report, to="dual_triangle")(**inputs)
    want = oracle(**inputs)
    assert len(report.rewritten) == 2 and not report.skipped, report
    assert (want - model(**inputs)).abs().max() > 1e-2  # the kind differs from the encoder's attention
    assert_close_rel(got, want, 1e-5, "hidden states")
    # padded query rows attend only to padding in the future-looking heads: garbage in both, left out
    valid = inputs["attention_mask"].bool()[..., None].expand_as(want)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)) * valid
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()), allow_unused=True)
    want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()), allow_unused=True)
    floor = 1e-2 * max(float(g.abs().max()) for g in want_grads if g is not None)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        if w is None:
            assert g is None, name
            continue
        assert_close_rel(g, w, 1e-4, f"gradient of {name}", floor)


def test_causal_sites_are_skipped_with_the_reason():
    from attnrewrite.testing.targets import build

    model, inputs, _ = build("llama")
    report = Report()
    compile_rewritten(model.eval(), report, to="dual_triangle")(**inputs)
    sites = report.attention_sites()
    assert sites and all(s.status == "skipped" for s in sites), report
    assert all("dual_triangle" in s.reason and "already causal" in s.reason for s in sites), report
