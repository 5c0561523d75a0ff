"""Sliding-window attention: exact softmax over the last ``window`` keys (both sides when not causal),
plus ``sinks`` first keys.

- :func:`attnrewrite.ops.sliding_window_attention` (``public.py``) — the op with SDPA's signature, and
  its blockwise torch path (O(T · window) memory and time)
- ``triton_fwd`` / ``triton_bwd`` (launched through ``op``) — the Triton kernels, block-sparse over the band
  and the sinks; ``spaces`` / ``tune`` — their tuning spaces and workloads
- ``reference.naive_sliding_window_attention`` — the readable oracle
"""

from attnrewrite.kernels.sliding_window.public import sliding_window_attention

__all__ = ["sliding_window_attention"]
