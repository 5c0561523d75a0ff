"""The Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the float64 oracle: every output
and gradient by name, within 2 x plain torch's error at the same precision plus a rounding band.

Small tiles (16-32 rows) are forced so that every case runs several blocks: full blocks, causal
diagonals, tails and padding all occur.  The torch path is checked on the same cases.
"""

import zlib

import pytest
import torch
import triton
import triton.language as tl

from attnrewrite.kernels.sigmoid import op, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.triton_common import sigmoid_log2
from sigmoid_testing import Case, check_against_reference

SMALL_TILES = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, RCP_NEWTON=0),
    "bwd_dq": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, RCP_NEWTON=0),
    "bwd_dkdv": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2, RCP_NEWTON=0),
}

CASES = {
    "plain": Case(len_q=40, len_k=50),
    "causal_top_left": Case(len_q=70, len_k=70, causal=True),
    "causal_bottom_right_decode": Case(len_q=24, len_k=90, causal=True, causal_align="bottom_right"),
    "causal_bottom_right_more_queries": Case(len_q=50, len_k=30, causal=True, causal_align="bottom_right"),
    "causal_top_left_more_keys": Case(len_q=30, len_k=75, causal=True),
    "gqa_causal": Case(heads_q=6, heads_kv=2, len_q=45, len_k=45, causal=True),
    "kv_lens": Case(batch=3, len_q=20, len_k=64, kv_lens=[64, 37, 0], causal=True, causal_align="bottom_right"),
    "varlen_gqa_causal": Case(heads_q=4, heads_kv=2, cu_q=[0, 17, 50, 51, 90], cu_k=[0, 30, 45, 46, 100],
                              causal=True, causal_align="bottom_right"),
    "varlen": Case(cu_q=[0, 33, 40, 72], cu_k=[0, 20, 61, 61]),
    "alibi_float_mask": Case(mask="alibi"),
    "t5_bias_with_grad": Case(mask="t5", causal=True),
    "float_mask_neginf_with_grad": Case(mask="neginf"),
    "bool_key_padding": Case(mask="keypad"),
    "bool_mask_gqa": Case(mask="bool", heads_q=4, heads_kv=2),
    "float_bias": Case(bias=-2.5),
    "odd_head_dims": Case(dim=24, dim_v=40),
    "decode_one_query": Case(len_q=1, len_k=70, causal=True, causal_align="bottom_right"),
}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(op, "launch_config", lambda kernel, *args, **kwargs: dict(SMALL_TILES[kernel]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, dtype, small_tiles):
    check_against_reference(CASES[name], dtype, "triton", seed=zlib.crc32(name.encode()) % 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference(name, dtype):
    check_against_reference(CASES[name], dtype, "torch", seed=zlib.crc32(name.encode()) % 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["causal_top_left", "gqa_causal", "t5_bias_with_grad"])
def test_newton_reciprocal_matches_reference(name, dtype, monkeypatch):
    newton = {kernel: dict(config, RCP_NEWTON=1) for kernel, config in SMALL_TILES.items()}
    monkeypatch.setattr(op, "launch_config", lambda kernel, *args, **kwargs: dict(newton[kernel]))
    check_against_reference(CASES[name], dtype, "triton", seed=7)


def test_default_configs_match_reference():
    """Through the real configuration lookup (table -> default, fitted to the shape)."""
    check_against_reference(Case(len_q=150, len_k=130, causal=True, heads_q=4, heads_kv=2), torch.float16, "triton")


def _nan_rows(t, rows):
    t = t.clone()
    t[:, :, rows] = float("nan")
    return t


def test_forward_never_visits_blocks_above_the_diagonal(small_tiles):
    """NaN keys/values in rows 48..63 poison every query row whose program loads the key tile
    32..63 (0 * NaN = NaN in P.V); finite rows 0..31 prove their programs skipped it."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    out = sigmoid_attention_dispatch(q, _nan_rows(k, slice(48, 64)), _nan_rows(v, slice(48, 64)), is_causal=True,
                            impl="triton")
    expected = sigmoid_attention_dispatch(q, k, v, is_causal=True, impl="torch")
    assert torch.isnan(out[:, :, 48:]).all()
    torch.testing.assert_close(out[:, :, :32], expected[:, :, :32])


def test_backward_never_visits_query_blocks_above_the_diagonal(small_tiles):
    """NaN in query rows 0..15 and their output gradient may only reach keys 0..15 (causal)."""
    g = torch.Generator().manual_seed(4)
    q, k, v, grad = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(4))
    k.requires_grad_()
    v.requires_grad_()
    out = sigmoid_attention_dispatch(_nan_rows(q, slice(0, 16)), k, v, is_causal=True, impl="triton")
    out.backward(_nan_rows(grad, slice(0, 16)))
    k_ref, v_ref = k.detach().requires_grad_(), v.detach().requires_grad_()
    sigmoid_attention_dispatch(q, k_ref, v_ref, is_causal=True, impl="torch").backward(grad)
    # dK/dV kernel: key block 16..31 starts at query block 16 (tile 32 rows: block 0..31 is masked).
    torch.testing.assert_close(k.grad[:, :, 32:], k_ref.grad[:, :, 32:])
    torch.testing.assert_close(v.grad[:, :, 32:], v_ref.grad[:, :, 32:])


def test_padding_keys_are_never_read(small_tiles):
    """Keys beyond kv_lens may hold anything, NaN included; their gradients are exactly zero."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 20, 16, generator=g)
    k, v = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(2))
    kv_lens = torch.tensor([37, 64])
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, :, 37:] = float("nan")
    v_bad[0, :, 37:] = float("nan")
    k_bad.requires_grad_()
    v_bad.requires_grad_()
    out = sigmoid_attention_dispatch(q, k_bad, v_bad, kv_lens=kv_lens, impl="triton")
    out.sum().backward()
    torch.testing.assert_close(out, sigmoid_attention_dispatch(q, k, v, kv_lens=kv_lens, impl="torch"))
    assert (k_bad.grad[0, :, 37:] == 0).all() and (v_bad.grad[0, :, 37:] == 0).all()
    assert (k_bad.grad[0, :, :37] != 0).any()


def test_rows_without_visible_keys_are_zero(small_tiles):
    """Bottom-right causal with more queries than keys: the first Tq - Tk rows see nothing."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 40, 16, generator=g)
    k, v = (torch.randn(1, 2, 25, 16, generator=g) for _ in range(2))
    out = sigmoid_attention_dispatch(q, k, v, is_causal=True, causal_align="bottom_right", impl="triton")
    assert (out[:, :, :15] == 0).all() and (out[:, :, 15:] != 0).all()


@triton.jit
def _apply_sigmoid(x_ptr, y_ptr, N: tl.constexpr, STEPS: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, sigmoid_log2(tl.load(x_ptr + offs), STEPS))


@pytest.mark.parametrize("steps,bound", [(0, 4e-7), (2, 2e-5), (3, 4e-7)])
def test_sigmoid_of_log2_scores_is_accurate(steps, bound):
    """The kernels' sigmoid, both reciprocals, over the whole range (scores in log2 units)."""
    x = torch.cat([torch.linspace(-120, 120, 2040), torch.tensor([0.0, 1e-30, -1e-30, 126.0, -126.0, 200.0,
                                                                  float("-inf"), float("inf")])])
    y = torch.empty_like(x)
    _apply_sigmoid[(1,)](x, y, x.numel(), steps)
    exact = torch.sigmoid(x.double() / 1.4426950408889634)
    normal = exact > 1e-37  # below that float32 flushes; the kernels need exact 0 only at -inf
    assert ((y.double() - exact).abs() / exact)[normal].max() < bound
    assert ((1 - y.double()) - (1 - exact)).abs().max() < bound  # no cancellation near 1 either
    assert y[-2] == 0 and abs(y[-1] - 1) < bound  # masked keys (-inf) must give exactly 0
