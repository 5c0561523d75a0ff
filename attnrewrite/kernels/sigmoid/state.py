"""The learned part of ``sigmoid`` with ``learned=True``: a temperature and a bias per query head.

Sigmoid attention has no normalisation across keys, so a softmax model rewritten to it changes
the size of every head's output; attention transfer (:func:`attnrewrite.distill`) fits, per head
h, a temperature t_h and a bias β_h so that sigmoid(t_h · scale · q·kᵀ + b + β_h)·v matches the
site's softmax output.  Both start at the untrained kind (t = 1, β = 0).
"""

from __future__ import annotations

import torch
from torch import nn


class SigmoidHeadState(nn.Module):
    """log t [H] and β [H].  ``forward(q)`` returns (q·t_h, β_h broadcast to [B, H, T, 1]) for q [B, H, T, D]."""

    def __init__(self, heads: int):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(heads))
        self.bias = nn.Parameter(torch.zeros(heads))

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temperature = self.log_temperature.exp().to(q.dtype).view(1, -1, 1, 1)
        bias = self.bias.to(q.dtype).view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
        return q * temperature, bias
