"""Hashed attention: exact softmax over the keys whose binary codes agree best with the query's.

- ``reference`` — the readable oracle (per query: visible keys, agreement bit by bit, the chosen set);
- ``codes`` — projections, signs, bit packing and XOR/popcount scoring;
- ``sparse`` — the torch path (block-wise selection by ``topk``, gathered attention, manual backward);
- ``op`` — ``attnrewrite::hashed_attention`` and its backward as custom ops;
- ``kind`` — :func:`hashed_attention` (the public wrapper) and the ``hashed`` kind;
- ``state`` — :class:`HashProjections`, the learned projections;
- ``cache`` — :class:`HashedCache`, the KV cache that stores bit-packed key codes.
"""

from .kind import hashed_attention
from .state import HashProjections

__all__ = ["HashProjections", "hashed_attention"]
