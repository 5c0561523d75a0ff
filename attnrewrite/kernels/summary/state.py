"""The learned part of ``summary="learned"``: one attention-pooling query per key/value head.

A chunk's summary is Σ_j softmax_j(p·k_j / √D) (k_j, v_j) over its tokens.  p starts at zero, so a
freshly converted model summarises by the mean (``summary="mean"``) and training moves it from
there.  :func:`attnrewrite.convert` attaches one :class:`SummaryPooling` per site
(``<attention module>.attnrewrite_summary``); :class:`attnrewrite.SummaryCache` reads it from there.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SummaryPooling(nn.Module):
    """Pooling queries p [Hkv, D]; ``forward(k)`` returns a copy of them (k only makes the call a graph call;
    the copy makes it a new value, which tracing needs)."""

    def __init__(self, heads_kv: int, head_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(heads_kv, head_dim))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.query.clone()
