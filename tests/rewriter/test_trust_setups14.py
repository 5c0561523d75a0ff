"""What the pass says in setups a user builds around it: a module rewritten with ``attnrewrite.rewrite`` inside a
model that is compiled as a whole (Dynamo ignores the module's own compile there), and setups that were tried and
work (hooks, parametrizations, head loops, cross-attention with padding under dynamic shapes)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnrewrite
from attnrewrite.rewriter.failures import reset_warnings
from attnrewrite.testing.checks import compile_rewritten


class Attention(nn.Module):
    """Causal self-attention through SDPA, or cross-attention over ``kv`` with a key-padding ``pad`` [B, Tk]."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def split(self, x, layer):  # [B, T, W] -> [B, H, T, D]
        return layer(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, kv=None, pad=None):
        q = self.split(x, self.q)
        k, v = self.split(x if kv is None else kv, self.k), self.split(x if kv is None else kv, self.v)
        mask = None if pad is None else pad[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kv is None)
        return self.o(out.transpose(1, 2).flatten(2))


def sigmoid_attention(attn, x, kv=None, pad=None):
    """The sigmoid kind written by hand: sigmoid(s·q·kᵀ − log n)·v, n the keys each query sees."""
    q = attn.split(x, attn.q)
    k, v = attn.split(x if kv is None else kv, attn.k), attn.split(x if kv is None else kv, attn.v)
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    keep = keep.tril() if kv is None else keep
    keep = keep if pad is None else keep & pad[:, None, None, :]
    n = keep.sum(-1, keepdim=True).clamp(min=1)
    probs = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) - n.log()) * keep
    return attn.o((probs @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, attention: nn.Module | None = None):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(16), attention or Attention(), nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x).relu()

    def by_hand(self, x, attention=sigmoid_attention):  # the block with sigmoid (or another) attention
        x = x + attention(self.attn, self.norm(x))
        return x + self.mlp(x).relu()


@attnrewrite.rewrite(to="sigmoid", compiler="eager")
class SigmoidAttention(Attention):
    pass


def _rewritten_block(how: str, strict: bool = False) -> Block:
    torch.manual_seed(0)
    if how == "class":
        return Block(SigmoidAttention()) if not strict else Block(attnrewrite.rewrite(Attention(), to="sigmoid",
                                                                                     compiler="eager", strict=True))
    block = Block()
    attnrewrite.rewrite(block.attn, to="sigmoid", compiler="eager", strict=strict)
    return block


@pytest.mark.parametrize("how", ["instance", "class"])
@pytest.mark.parametrize("outer", ["eager", "inductor", "attnrewrite-softmax"])
def test_a_rewritten_module_inside_a_model_compiled_whole_is_said(how, outer):
    """``torch.compile(model)`` traces a submodule rewritten with ``attnrewrite.rewrite`` as plain code: Dynamo
    ignores the submodule's own compile inside another compiled region, so the enclosing compile's backend
    compiles its attention (the original softmax for ``eager`` / ``inductor``; softmax for an attnrewrite
    compile asking for softmax).  That used to be silent: the model ran softmax attention where sigmoid was asked
    for, with no warning (``verify`` caught the first two, not the third)."""
    block, x = _rewritten_block(how), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    whole = (compile_rewritten(block, to="softmax") if outer == "attnrewrite-softmax"
             else torch.compile(block, backend=outer))
    with pytest.warns(attnrewrite.RewriteWarning, match="traced as part of an enclosing torch.compile"):
        got = whole(x)
    torch.testing.assert_close(got, block.by_hand(x, Attention.forward), rtol=1e-5, atol=1e-5)  # softmax
    torch.testing.assert_close(block.attn(block.norm(x)), sigmoid_attention(block.attn, block.norm(x)),
                               rtol=1e-5, atol=1e-6)  # called on its own, the module is rewritten


def test_a_rewritten_module_inside_a_model_compiled_whole_raises_under_strict():
    block, x = _rewritten_block("instance", strict=True), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match="traced as part of an enclosing torch.compile"):
        torch.compile(block, backend="eager")(x)


@pytest.mark.parametrize("how", ["instance", "class"])
def test_a_model_compiled_whole_with_the_same_rewrite_is_no_alarm(how):
    """The enclosing compile is attnrewrite's with the module's kind: the attention is rewritten as asked."""
    block, x = _rewritten_block(how), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        got = compile_rewritten(block, to="sigmoid")(x)
        torch._dynamo.reset()
        got_registered = torch.compile(block, backend="attnrewrite", options={"to": "sigmoid", "compiler": "eager"})(x)
        torch.testing.assert_close(block(x), block.by_hand(x), rtol=1e-5, atol=1e-5)  # its own compile, no alarm
    torch.testing.assert_close(got, block.by_hand(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_registered, block.by_hand(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict_export", [False, True])
def test_exporting_a_model_with_a_rewritten_module_is_said(strict_export):
    """``torch.export`` traces the module's forward as well: the exported program holds its original attention."""
    block, x = _rewritten_block("instance"), torch.randn(2, 6, 16)
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match="torch.compile or torch.export"):
        exported = torch.export.export(block, (x,), strict=strict_export)
    torch.testing.assert_close(exported.module()(x), block.by_hand(x, Attention.forward), rtol=1e-5, atol=1e-5)
