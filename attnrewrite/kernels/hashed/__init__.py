"""Hashed attention: exact softmax over the keys whose binary codes agree best with the query's.

- ``reference`` — the readable oracle (per query: visible keys, agreement bit by bit, the chosen set);
- ``codes`` — projections, signs, bit packing and XOR/popcount scoring;
- ``sparse`` — the torch path (block-wise selection by ``topk``, gathered attention, manual backward);
- ``op`` — ``attnrewrite::hashed_attention`` and its backward as custom ops;
- ``public`` — :func:`hashed_attention` (the public wrapper; ``impl`` picks the torch path or the kernels);
- ``triton_codes``, ``triton_select``, ``triton_attn``, ``triton_decode`` — the Triton kernels (codes,
  selection, attention over the selected keys forward and backward, a decode step over a cache);
- ``triton_ops`` — their ``attnrewrite::hashed_attention_fwd`` / ``_bwd`` operators;
- ``spaces``, ``tune`` — the kernels' search spaces and tuning workloads;
- ``state`` — :class:`HashProjections`, the learned projections;
"""

from .public import hashed_attention
from .state import HashProjections

__all__ = ["HashProjections", "hashed_attention"]
