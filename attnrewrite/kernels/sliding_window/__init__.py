"""Sliding-window attention: exact softmax over the last ``window`` keys (both sides when not causal),
plus ``sinks`` first keys.

- :func:`attnrewrite.ops.sliding_window_attention` (``public.py``) — the op with SDPA's signature, and
  its blockwise torch path (O(T · window) memory and time)
- ``reference.naive_sliding_window_attention`` — the readable oracle
"""

from attnrewrite.kernels.sliding_window.public import sliding_window_attention

__all__ = ["sliding_window_attention"]
