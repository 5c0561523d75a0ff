"""Dual-triangle attention: the first ``past_heads`` heads see keys j ≤ i, the other heads keys j ≥ i,
with an exact softmax inside each triangle.

- :func:`attnrewrite.ops.dual_triangle_attention` (``public.py``) — the op with SDPA's signature; its torch
  path lowers to ``F.scaled_dot_product_attention`` with one triangle per head as a bool mask
- ``reference.naive_dual_triangle_attention`` — the readable oracle
"""

from attnrewrite.kernels.dual_triangle.public import dual_triangle_attention

__all__ = ["dual_triangle_attention"]
