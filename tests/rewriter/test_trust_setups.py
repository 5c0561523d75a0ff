"""Training and compile setups a user runs, each with its own small model: the rewrite happens, the result is
right, and ``verify`` tells the truth about it (no silent skip, no false alarm)."""

from __future__ import annotations

import functools
import warnings

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
    """A checkpointed block left uncompiled beside a compiled one is named once, for its forward."""
    model = CheckpointedStack(reentrant=False).train()
    model.blocks[0] = compile_rewritten(model.blocks[0], to="softmax")
    result = attnrewrite.verify(model, torch.randn(2, 6, 16, requires_grad=True), raise_on_failure=False)
    assert len(result.failures) == 1 and "ran eagerly" in result.failures[0].cause, result
    assert "test_trust_setups.py" in result.failures[0].module, result  # the model line that ran it


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_a_block_compiled_on_its_first_call_inside_checkpoint(kind):
    """``checkpoint(compiled_block, x, use_reentrant=False)`` where that call compiles: the pass's own evaluations
    (certification) ran under checkpointing's saved-tensor hooks, which counted what they saved, and the
    backward's recomputation (the compiled code) saved fewer: a CheckpointError.  Now outputs and gradients are
    the kind's."""
    torch.manual_seed(0)
    block = CappedBlock()
    compiled = compile_rewritten(block, to=kind, compiler="aot_eager")
    x = torch.randn(2, 6, 16, requires_grad=True)
    got = checkpoint(compiled, x, use_reentrant=False)
    (got_grad,) = torch.autograd.grad(got.pow(2).sum(), x)
    want = compiled(x)  # the compiled block outside checkpointing
    (want_grad,) = torch.autograd.grad(want.pow(2).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    if kind == "softmax":
        torch.testing.assert_close(got, block(x), rtol=1e-5, atol=1e-6)


class LegacyPaddedEncoder(nn.Module):
    """BERT's older spelling of padding: an additive ``(1 - mask) · -10000`` term, [B, 1, 1, Tk] or, built per
    query, [B, 1, Tq, Tk]."""

    def __init__(self, per_query: bool, width: int = 16, heads: int = 2):
        super().__init__()
        self.per_query, self.heads = per_query, heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x, mask):  # x [B, T, W], mask [B, T] of 0/1
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        keep = mask[:, None, None, :].float()
        if self.per_query:
            keep = keep.expand(b, 1, t, t)
        scores = q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5 + (1.0 - keep) * -10000.0
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, w)


@pytest.mark.parametrize("per_query", [False, True])
def test_sigmoid_counts_keys_padded_by_an_additive_minus_ten_thousand_as_masked(per_query):
    """A score at −10⁴ is masked for the matcher, so sigmoid's b = −log(n) must not count such keys: a padded
    row equals the row alone, and the op with the bool mask (the op itself counts only −inf and the lowest
    value as masked; the kind used to pass the −10⁴ keys through and count them)."""
    torch.manual_seed(0)
    model = LegacyPaddedEncoder(per_query).eval()
    x, mask = torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    report = Report()
    compiled = compile_rewritten(model, report, to="sigmoid")
    got = compiled(x, mask)
    assert len(report.rewritten) == 1 and not report.skipped, report
    q, k, v = model.qkv(x).view(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want = attnrewrite.ops.sigmoid_attention(q, k, v, mask[:, None, None, :].bool()).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    alone = compiled(x[1:, :4], mask[1:, :4])
    torch.testing.assert_close(got[1:, :4], alone, rtol=1e-5, atol=1e-6)


def test_torch_compile_modes_reach_inductor(monkeypatch):
    """``torch.compile(..., backend="attnrewrite", mode=...)`` passes ``mode`` to the backend, which used to
    refuse it (a TypeError inside Dynamo); with options it is an option (torch.compile takes one or the
    other).  The mode's settings reach inductor, and the sites are rewritten."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []
    real = compile_fx_module.compile_fx

    def spy(gm, example_inputs, *args, config_patches=None, **kwargs):
        seen.append(config_patches)
        return real(gm, example_inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    model, x = CappedBlock().eval(), torch.randn(1, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnrewrite", mode="max-autotune-no-cudagraphs")
    result = attnrewrite.verify(compiled, x)
    assert result.ok and len(result.report.rewritten) == 1
    assert torch._inductor.list_mode_options("max-autotune-no-cudagraphs") in seen  # (it calls itself again)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_mode_as_an_option_is_checked():
    from attnrewrite.rewriter.options import RewriteOptions

    assert RewriteOptions.parse({"to": "sigmoid", "mode": "reduce-overhead"}).mode == "reduce-overhead"
    assert RewriteOptions.parse({"mode": "default"}).mode is None
    with pytest.raises(ValueError, match="option 'mode' must be one of"):
        RewriteOptions.parse({"mode": "fast"})
    with pytest.raises(ValueError, match="cannot go with compiler='eager'"):
        RewriteOptions.parse({"mode": "max-autotune", "compiler": "eager"})


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([CappedBlock(), CappedBlock()])
        for block in self.blocks:  # plain causal attention: linear takes it (no score modification)
            block.forward = functools.partial(_plain_causal, block)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _plain_causal(block, x):
    b, t, w = x.shape
    q, k, v = block.qkv(x).view(b, t, 3, block.heads, w // block.heads).permute(2, 0, 3, 1, 4)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf")).softmax(-1)
    return block.out((probs @ v).transpose(1, 2).reshape(b, t, w))


def test_a_converted_state_the_compiled_options_do_not_use_is_said():
    """Converted with hedgehog maps, compiled with ``to="linear"`` alone (elu): the sites run elu as asked, but
    the maps would train on nothing — this used to be silent."""
    model, x = TwoBlocks(), torch.randn(2, 6, 16)
    attnrewrite.convert(model, "linear", (x,), feature_map="hedgehog")
    report = Report()
    with pytest.warns(attnrewrite.RewriteWarning, match="state attached to it .* is not used by the options"):
        compile_rewritten(model, report, to="linear")(x)
    assert len(report.rewritten) == 2 and all("hedgehog" in " ".join(s.notes) for s in report.sites), report
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)  # the options it was converted with: no word
        torch._dynamo.reset()
        compile_rewritten(model, to="linear", feature_map="hedgehog")(x)
