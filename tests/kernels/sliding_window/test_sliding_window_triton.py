"""The sliding-window Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the float64 reference
(``reference.naive_sliding_window_attention``): the output and the gradients of q, k, v by name, within
the numerics rule (2 × plain torch's error at the same precision plus a rounding band).

Tiles of 16 rows are forced so that every case runs several query and key blocks: sink blocks before
the band, the band's masked edges, unmasked blocks inside a wide band, padding, the end of the keys.
Block skipping is checked by poisoning (NaN) the keys and values no query may see: a kernel that
visits their blocks, even masked, returns NaN.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.sliding_window import op
from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention, window_visible
from attnrewrite.kernels.sliding_window.triton_bwd import sliding_window_bwd
from attnrewrite.kernels.sliding_window.triton_fwd import sliding_window_fwd
from attnrewrite.testing.numerics import assert_within_budget

if not op.interpreter_active():
    pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1", allow_module_level=True)

TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)

# name: (batch, heads_q, heads_kv, Tq, Tk, causal, window, sinks, mask)
CASES = {
    "causal_band": (1, 2, 1, 50, 50, True, 12, 0, None),          # GQA, the band's edges masked
    "causal_wide_band_sinks": (1, 2, 2, 64, 64, True, 40, 3, None),  # unmasked blocks inside the band
    "symmetric_sinks": (1, 2, 1, 50, 50, False, 9, 2, None),
    "decode_shaped": (1, 2, 1, 20, 64, True, 12, 17, None),        # Tq < Tk, sinks spanning two blocks
    "more_queries_than_keys": (1, 2, 1, 40, 30, True, 6, 1, None),
    "kv_lens": (2, 2, 1, 48, 48, True, 6, 1, "kv_lens"),
    "bool_mask_symmetric": (2, 2, 1, 40, 40, False, 5, 1, "bool"),
    "float_mask": (1, 2, 1, 40, 40, True, 24, 0, "float"),
}


def _inputs(name, batch, heads_q, heads_kv, len_q, len_k, dim=8, dim_v=8):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (make(batch, heads_q, len_q, dim), make(batch, heads_kv, len_k, dim), make(batch, heads_kv, len_k, dim_v),
            make(batch, heads_q, len_q, dim_v), g)


def _reference_and_grads(q, k, v, do, mask, causal, window, sinks):
    """The reference's output and gradients (q, k, v) at the inputs' dtype (float64: exact; float32: plain)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = naive_sliding_window_attention(*leaves, mask, causal, None, window, sinks)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_reference(name):
    batch, heads_q, heads_kv, len_q, len_k, causal, window, sinks, mask_kind = CASES[name]
    q, k, v, do, g = _inputs(name, batch, heads_q, heads_kv, len_q, len_k)
    kv_lens = ref_mask = kernel_mask = None
    if mask_kind == "kv_lens":
        kv_lens = torch.tensor([len_k, len_k - 19][:batch], dtype=torch.int32)
        ref_mask = torch.arange(len_k).view(1, 1, 1, len_k) < kv_lens.view(-1, 1, 1, 1)
    elif mask_kind == "bool":
        ref_mask = torch.rand(batch, 1, len_q, len_k, generator=g) > 0.3
        kernel_mask = torch.zeros(ref_mask.shape).masked_fill_(~ref_mask, float("-inf"))
    elif mask_kind == "float":  # a bias per head and position, -inf on some entries
        ref_mask = torch.randn(1, heads_q, len_q, len_k, generator=g, dtype=torch.float64)
        ref_mask[..., 5] = float("-inf")
        kernel_mask = ref_mask.float()

    exact = _reference_and_grads(q, k, v, do, ref_mask, causal, window, sinks)
    f32 = [x.float() for x in (q, k, v, do)]
    plain = _reference_and_grads(*f32, None if ref_mask is None else
                                 (ref_mask if ref_mask.dtype == torch.bool else ref_mask.float()),
                                 causal, window, sinks)
    scale = q.shape[-1] ** -0.5
    out, lse = sliding_window_fwd(*f32[:3], kernel_mask, kv_lens, scale, causal, window, sinks, TILES)
    grads = sliding_window_bwd(*f32[:3], out, lse, f32[3], kernel_mask, kv_lens, scale, causal, window, sinks,
                               TILES, TILES)
    assert exact[0].abs().max() > 0.1
    for what, got, p, e in zip(("out", "dq", "dk", "dv"), (out, *grads), plain, exact):
        assert e.abs().max() > 0.01, f"{what} is (nearly) zero: it proves nothing"
        assert_within_budget(got, p, e, torch.float32, f"{name}: {what}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
def test_blocks_outside_the_band_and_sinks_are_never_visited(causal):
    """Decode-shaped (the last 16 queries of 96 keys, window 12, sinks 3): key blocks 1 … 3 (keys 16 … 63)
    are seen by no query.  Poisoned with NaN, they must not reach the output or any gradient (a masked
    visit would: 0 · NaN)."""
    len_q, len_k, window, sinks = 16, 96, 12, 3
    q, k, v, do, _ = _inputs("poison", 1, 2, 1, len_q, len_k)
    seen = window_visible(len_q, len_k, window, sinks, causal).any(0)
    assert not seen[16:64].any() and seen[:3].all()         # whole key blocks 1 … 3 are unreachable
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 16:64] = float("nan")
    poisoned_v[:, :, 16:64] = float("nan")
    f32 = [x.float() for x in (q, poisoned_k, poisoned_v, do)]
    scale = q.shape[-1] ** -0.5
    out, lse = sliding_window_fwd(*f32[:3], None, None, scale, causal, window, sinks, TILES)
    dq, dk, dv, _ = sliding_window_bwd(*f32[:3], out, lse, f32[3], None, None, scale, causal, window, sinks,
                                       TILES, TILES)
    exact = _reference_and_grads(q, k, v, do, None, causal, window, sinks)
    for what, got, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), exact):
        assert not got.isnan().any(), f"{what}: a block outside the band and the sinks was visited"
        torch.testing.assert_close(got.double(), e, rtol=0, atol=1e-5, msg=what)


def test_the_op_runs_the_kernels_with_autograd():
    """ops.sliding_window_attention(impl="triton"): GQA, a bool padding mask and sinks, outputs and gradients
    against the torch path (and the reference) in float32, through the registered autograd."""
    q, k, v, do, _ = _inputs("op", 2, 4, 2, 40, 40)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 31:] = False
    results = {}
    for impl in ("triton", "torch"):
        leaves = [x.float().requires_grad_() for x in (q, k, v)]
        out = ops.sliding_window_attention(*leaves, mask, enable_gqa=True, window=7, sinks=2, impl=impl)
        results[impl] = [out, *torch.autograd.grad(out, leaves, do.float())]
    exact = _reference_and_grads(q, k, v, do, mask, True, 7, 2)
    for what, got, plain, e in zip(("out", "dq", "dk", "dv"), results["triton"], results["torch"], exact):
        assert_within_budget(got, plain, e, torch.float32, what)


def test_bf16_within_the_numerics_rule():
    q, k, v, do, _ = _inputs("bf16", 1, 2, 1, 48, 48, dim=16, dim_v=16)
    exact = _reference_and_grads(q, k, v, do, None, True, 20, 1)
    low = [x.to(torch.bfloat16) for x in (q, k, v, do)]
    plain = _reference_and_grads(*low, None, True, 20, 1)
    leaves = [x.clone().requires_grad_() for x in low[:3]]
    out = ops.sliding_window_attention(*leaves, enable_gqa=True, window=20, sinks=1, impl="triton")
    got = [out, *torch.autograd.grad(out, leaves, low[3])]
    for what, gx, p, e in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert gx.dtype == torch.bfloat16
        assert_within_budget(gx, p, e, torch.bfloat16, f"bf16 {what}")


def test_impl_choices_and_refusals():
    q, k, v, _, _ = _inputs("impl", 1, 2, 2, 20, 20)
    q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match="impl must be"):
        ops.sliding_window_attention(q, k, v, window=4, impl="cuda")
    with pytest.raises(ValueError, match="dropout"):
        ops.sliding_window_attention(q, k, v, dropout_p=0.1, window=4, impl="triton")
    bias = torch.zeros(1, 1, 20, 20, requires_grad=True)
    with pytest.raises(ValueError, match="gradient of a float attn_mask"):
        ops.sliding_window_attention(q, k, v, bias, window=4, impl="triton")
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.sliding_window_attention(torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 8),
                                     window=2, impl="triton")
    # "auto" on the CPU is the torch path: the kernels are not called
    calls = []
    original = op.sliding_window_triton
    try:
        op.sliding_window_triton = lambda *a: calls.append(a) or original(*a)
        ops.sliding_window_attention(q, k, v, window=4, impl="auto")
        assert not calls
        ops.sliding_window_attention(q, k, v, window=4, impl="triton")
        assert len(calls) == 1
    finally:
        op.sliding_window_triton = original
