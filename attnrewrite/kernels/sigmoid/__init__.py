"""Sigmoid attention kernels: sigmoid(scale * q.k^T + mask + b) . v, forward and backward.

- :func:`sigmoid_attention_dispatch` — the kernel-level entry point (Triton on CUDA, a chunked torch path
  elsewhere); the public op with SDPA's signature is :func:`attnrewrite.ops.sigmoid_attention`
- ``reference.naive_sigmoid_attention`` — the readable oracle
- ``chunked.chunk_sigmoid_attention`` — the memory-efficient torch path
- ``triton_fwd`` / ``triton_bwd`` — the Triton kernels; ``op`` — their torch.library ops
- ``tune`` — search spaces and tuning workloads; ``tuning/<gpu>.json`` — measured tables
"""

from .api import sigmoid_attention_dispatch

__all__ = ["sigmoid_attention_dispatch"]
