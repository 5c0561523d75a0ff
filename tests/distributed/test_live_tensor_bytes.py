"""The live-tensor-bytes counter the ring's memory test relies on (:mod:`attnrewrite.testing.memory`)."""

from __future__ import annotations

import torch

from attnrewrite.testing.memory import LiveTensorBytes


def test_it_counts_what_is_made_inside_and_alive_together_not_views_of_inputs():
    x = torch.randn(256, 256)                                  # made before: not counted
    size = x.numel() * x.element_size()
    with LiveTensorBytes() as live:
        view = x[:128]                                         # a view of an input: adds nothing
        a = x * 2                                              # one tensor
        b = a + 1                                              # two alive together
        del a
        small = b.sum(0)                                       # small, while b is alive
        del b
        d = torch.empty_like(x)                                # one again
    assert live.peak == 2 * size, live.peak
    assert view.data_ptr() == x.data_ptr() and d.shape == x.shape and small.shape == (256,)
    assert live.peak_tensors[0][0] == size


def test_it_counts_inside_a_custom_op():
    """An attnrewrite op's scratch tensors are counted though the op is one call to the dispatcher: its tile
    buffers (here 32–64 KiB) are many times its 4 KiB output (not descending into the op counts 4.3 KiB)."""
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    with LiveTensorBytes() as live:
        out = torch.ops.attnrewrite.sigmoid_attention(q, k, v, None, is_causal=True)
    out_bytes = out.numel() * out.element_size()
    assert live.peak >= 8 * out_bytes, (live.peak, out_bytes)
