"""Position biases (``position="j-i"`` / ``"|j-i|"`` with per-head slopes: ALiBi) computed in sliding-window
attention — the blockwise and dense torch paths and the Triton kernels (under TRITON_INTERPRET=1, 16-row
tiles: sinks, the band's masked edges and its unmasked inside) — outputs and gradients by name against the
reference with the bias materialised as a float mask."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.sliding_window import op
from attnrewrite.kernels.sliding_window.public import blockwise_sliding_window
from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention
from attnrewrite.ops import sliding_window_attention

SLOPES = torch.tensor([0.5, -0.25, 0.125, 0.3], dtype=torch.float64)
SOFTCAP = ("div 3.0; tanh; mul 3.0", lambda s: torch.tanh(s / 3.0) * 3.0)


def _inputs(name, t=23):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64)
    mask = torch.randn(2, 1, t, t, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, mask)]


def _bias(position, t):
    """[1, Hq, T, T]: SLOPES[h] · (j − i) or · |j − i|, written out."""
    distance = (torch.arange(t).view(1, -1) - torch.arange(t).view(-1, 1)).double()
    return SLOPES.view(1, -1, 1, 1) * (distance.abs() if position == "|j-i|" else distance)


@pytest.mark.parametrize("position", ["j-i", "|j-i|"])
@pytest.mark.parametrize("causal,window,sinks,t", [(True, 5, 2, 23), (False, 4, 1, 23), (True, 8, 0, 12)],
                         ids=["blockwise_causal", "blockwise_symmetric", "dense"])
def test_torch_paths_compute_the_position_bias(position, causal, window, sinks, t):
    q, k, v, mask = _inputs(f"{position}{causal}{window}", t)
    out = sliding_window_attention(q, k, v, mask, is_causal=causal, scale=0.3, enable_gqa=True, window=window,
                                   sinks=sinks, impl="torch", position_slopes=SLOPES, position=position)
    want = naive_sliding_window_attention(q, k, v, mask + _bias(position, t), causal, 0.3, window, sinks)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v, mask), grad)
    expected = torch.autograd.grad(want, (q, k, v, mask), grad)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, expected):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    plain = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks)
    assert (plain - want).abs().max() > 1e-3  # the bias changes these outputs


def test_blockwise_path_in_small_blocks_with_a_bool_mask():
    """Blocks shorter than the band, a bool mask and a modification: the bias follows each block's offsets."""
    q, k, v, _ = (x.detach() for x in _inputs("blocks", 30))
    keep = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(5)) > 0.2
    out = blockwise_sliding_window(q, k, v, keep, 0.0, True, 0.3, 7, 2, block=4, score_mod=None, slopes=SLOPES,
                                   position="j-i")
    want = naive_sliding_window_attention(q, k, v, torch.where(keep, _bias("j-i", 30), float("-inf")), True, 0.3,
                                          7, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position,causal,window,sinks,t,mod", [
    ("j-i", True, 40, 3, 64, SOFTCAP),     # sinks, masked edges and unmasked blocks inside the band
    ("|j-i|", False, 9, 2, 40, None),      # symmetric band
], ids=["alibi_softcap_causal", "abs_symmetric"])
def test_triton_kernels_compute_the_position_bias(position, causal, window, sinks, t, mod, monkeypatch):
    if not op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    monkeypatch.setattr(op, "launch_config", lambda *a, **kw: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                     num_stages=2))
    text, fn = mod if mod is not None else (None, None)
    q, k, v, mask = _inputs(f"kernels{position}{causal}", t)
    mask = mask.detach()
    want = naive_sliding_window_attention(q, k, v, mask + _bias(position, t), causal, 0.3, window, sinks,
                                          score_mod=fn)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=want.dtype)
    expected = torch.autograd.grad(want, (q, k, v), grad)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = sliding_window_attention(*leaves, mask.float(), is_causal=causal, scale=0.3, enable_gqa=True,
                                   window=window, sinks=sinks, impl="triton", score_mod=text,
                                   position_slopes=SLOPES.float(), position=position)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out, leaves, grad.float())
    for name, g, w in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_the_op_checks_the_slopes():
    q, k, v, _ = (x.detach() for x in _inputs("checks"))
    with pytest.raises(ValueError, match="sliding-window attention: position must be one of"):
        sliding_window_attention(q, k, v, enable_gqa=True, window=4, position_slopes=SLOPES, position="j+i")
    with pytest.raises(ValueError, match="requires grad"):
        sliding_window_attention(q, k, v, enable_gqa=True, window=4, position_slopes=SLOPES.clone().requires_grad_(),
                                 position="j-i")


def test_a_position_bias_starts_from_the_modification_defaults(monkeypatch):
    """Its distance tile makes the plain d128 dK/dV default spill on sm_90 (bench/RESULTS.md): the launcher asks
    for the modification bucket, as for a score modification, in forward and backward."""
    if not op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    asked = []

    def config(kernel, *args):
        asked.append((kernel, args[-1]))
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)

    monkeypatch.setattr(op, "launch_config", config)
    q, k, v, _ = (x.detach().float().requires_grad_() for x in _inputs("defaults", 16))
    out = sliding_window_attention(q, k, v, enable_gqa=True, window=4, impl="triton", position_slopes=SLOPES.float(),
                                   position="j-i")
    out.sum().backward()
    assert sorted(asked) == [("bwd_dkdv", True), ("bwd_dq", True), ("fwd", True)]


@pytest.mark.parametrize("position", ["j-i", "|j-i|"])
@pytest.mark.parametrize("t_k", [23, 8], ids=["blockwise", "dense"])
def test_fewer_queries_than_keys_count_i_from_the_first_query(position, t_k):
    """Tq < Tk (queries at the end, as against a cache): the bias uses the query index i, as the sigmoid op's."""
    q, k, v, mask = (x.detach() for x in _inputs(f"short{position}{t_k}", t_k))
    q, mask = q[:, :, -7:], mask[:, :, -7:]
    out = sliding_window_attention(q, k, v, mask, scale=0.3, enable_gqa=True, window=5, sinks=2, impl="torch",
                                   position_slopes=SLOPES, position=position)
    distance = (torch.arange(t_k).view(1, -1) - torch.arange(7).view(-1, 1)).double()
    bias = SLOPES.view(1, -1, 1, 1) * (distance.abs() if position == "|j-i|" else distance)
    want = naive_sliding_window_attention(q, k, v, mask + bias, True, 0.3, 5, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
