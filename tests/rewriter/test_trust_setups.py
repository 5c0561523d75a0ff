"""Training and compile setups a user runs, each with its own small model: the rewrite happens, the result is
right, and ``verify`` tells the truth about it (no silent skip, no false alarm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import attnrewrite
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten


class CappedBlock(nn.Module):
    """Self-attention with Gemma-2-style soft-capping of the scores: the exact kind rewrites it to the
    written-out softmax of the capped scores (plain aten ops, not an attnrewrite op)."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):  # [B, T, W]
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        scores = torch.tanh(q @ k.transpose(-1, -2) * 0.25 / 20.0) * 20.0
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, w))


class CheckpointedStack(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant, self.blocks = reentrant, nn.ModuleList([CappedBlock(), CappedBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_verify_does_not_count_the_recomputation_of_a_checkpointed_rewrite(reentrant):
    """A rewritten site that runs as plain softmax ops (the exact kind with a score modification) is recomputed
    in the backward by activation checkpointing, outside any compiled region: that is the rewritten forward
    again, not attention left as it was (verify used to fail such a model: gemma-2 with gradient checkpointing)."""
    torch.manual_seed(0)
    model = CheckpointedStack(reentrant).train()
    report = Report()
    compiled = compile_rewritten(model, report, to="softmax")
    x = torch.randn(2, 6, 16, requires_grad=True)
    result = attnrewrite.verify(compiled, x)
    assert result.ok and len(report.rewritten) == 2 and not report.skipped, report
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_verify_still_names_checkpointed_attention_that_ran_eagerly():
    """A checkpointed block left uncompiled beside a compiled one is named once, for its forward.  (Reentrant:
    non-reentrant checkpointing recomputes with Dynamo disabled, so a compiled module inside it would not match
    its own forward.)"""
    model = CheckpointedStack(reentrant=True).train()
    model.blocks[0] = compile_rewritten(model.blocks[0], to="softmax")
    result = attnrewrite.verify(model, torch.randn(2, 6, 16, requires_grad=True), raise_on_failure=False)
    assert len(result.failures) == 1 and "ran eagerly" in result.failures[0].cause, result
    assert "test_trust_setups.py" in result.failures[0].module, result  # the model line that ran it
