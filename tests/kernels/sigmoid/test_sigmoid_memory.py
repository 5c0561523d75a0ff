"""The sigmoid op's peak tensor memory over a forward and backward, counted (not sampled) with
:class:`~attnrewrite.testing.memory.LiveTensorBytes`, in units of one [B, H, T, D] tensor."""

from __future__ import annotations

import pytest
import torch

from attnrewrite.kernels.sigmoid import native
from attnrewrite.ops import sigmoid_attention
from attnrewrite.testing.memory import LiveTensorBytes


@pytest.mark.parametrize("path", ["compiled loop", "torch tiles"])
def test_the_backward_scales_its_gradients_in_place(path, one_thread, monkeypatch):
    """At its peak the op holds the output and dQ, dK, dV (4 tensors) and its tiles (three 1 MiB buffers on the
    torch path: T is long enough here for them to be a fraction of a tensor), not a second dQ and dK for the
    scale (2 more tensors before the scale was applied in place)."""
    if path == "compiled loop" and not native.forward_available():
        pytest.skip("no C compiler here")
    if path == "torch tiles":
        monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")
    length, heads, dim = (2048 if path == "compiled loop" else 8192), 4, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, length, dim, generator=g)
    with LiveTensorBytes() as live:
        out = sigmoid_attention(q, k, v, is_causal=True)
        out.backward(grad)
        del out
    whole = q.numel() * q.element_size()
    held = live.peak / whole
    assert held <= 5.0, f"{path}: the op holds {held:.2f} tensors at its peak: {live.peak_tensors[:8]}"
    assert q.grad is not None and k.grad is not None and v.grad is not None
