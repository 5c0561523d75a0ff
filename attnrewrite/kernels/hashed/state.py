"""The learned part of ``hash="learned"``: one query projection per query head and one key projection
per key/value head, [H, D, bits] each.

Both start from the seeded random hyperplanes that ``hash="random"`` uses, so a freshly converted
model selects keys as the random variant does (up to the rounding of the draw to the parameters'
dtype), and training moves the two apart (the codes are asymmetric).  Their gradient is the
straight-through estimate described in :mod:`attnrewrite.kernels.hashed.sparse`.
:func:`attnrewrite.convert` attaches one :class:`HashProjections` per site
(``<attention module>.attnrewrite_hashed``); :class:`attnrewrite.HashedCache` reads it from there.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .codes import random_hyperplanes


class HashProjections(nn.Module):
    """``forward(q) -> copies of (q_projection [Hq, D, bits], k_projection [Hkv, D, bits])`` (q only makes the
    call a graph call; the copies make them new values, which tracing needs)."""

    def __init__(self, heads_q: int, heads_kv: int, head_dim: int, bits: int, seed: int = 0):
        super().__init__()
        draw = random_hyperplanes(head_dim, bits, seed).float()
        self.q_projection = nn.Parameter(draw.repeat(heads_q, 1, 1))
        self.k_projection = nn.Parameter(draw.repeat(heads_kv, 1, 1))

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_projection.clone(), self.k_projection.clone()
