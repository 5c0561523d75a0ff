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
from attnrewrite.rewriter.report import Report
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


def test_the_module_own_compile_is_known_through_ddp_optimizer():
    """Under DDP, Dynamo hands each graph to ``DDPOptimizer.compile_fn``, which compiles the buckets with the
    module's own backend: that is still the module's rewrite (no alarm; ``strict`` must not raise)."""
    import functools

    from torch._dynamo.backends.distributed import DDPOptimizer

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.decorator import _unwrapped

    options = {"to": "sigmoid", "compiler": "eager"}
    ddp = DDPOptimizer(bucket_bytes_cap=2**20, backend_compile_fn=functools.partial(attnrewrite_backend,
                                                                                    options=options))
    assert _unwrapped(ddp.compile_fn) == (attnrewrite_backend, options)
    assert _unwrapped(functools.partial(attnrewrite_backend, options=options)) == (attnrewrite_backend, options)
    other = DDPOptimizer(bucket_bytes_cap=2**20, backend_compile_fn=torch._dynamo.backends.registry.lookup_backend(
        "eager"))
    assert _unwrapped(other.compile_fn)[0] is not attnrewrite_backend


@pytest.mark.parametrize("strict_export", [False, True])
def test_exporting_a_model_with_a_rewritten_module_is_said(strict_export):
    """``torch.export`` traces the module's forward as well: the exported program holds its original attention."""
    block, x = _rewritten_block("instance"), torch.randn(2, 6, 16)
    reset_warnings()
    with pytest.warns(attnrewrite.RewriteWarning, match="torch.compile or torch.export"):
        exported = torch.export.export(block, (x,), strict=strict_export)
    torch.testing.assert_close(exported.module()(x), block.by_hand(x, Attention.forward), rtol=1e-5, atol=1e-5)


class Symmetric(nn.Module):
    def forward(self, weight):
        return (weight + weight.T) / 2


class HeadLoop(Attention):
    """Attention written one head at a time in a Python loop, the heads concatenated."""

    def forward(self, x, kv=None, pad=None):
        q, k, v = self.split(x, self.q), self.split(x, self.k), self.split(x, self.v)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        heads = [(q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~causal, float("-inf"))
                 .softmax(-1) @ v[:, h] for h in range(self.heads)]
        return self.o(torch.cat(heads, -1))


def _hooked(attn):
    attn.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    attn.register_forward_hook(lambda module, args, out: out + 1)
    return attn, lambda a, x: sigmoid_attention(a, x * 2) + 1


def _parametrized(attn):
    torch.nn.utils.parametrize.register_parametrization(attn.q, "weight", Symmetric())
    torch.nn.utils.parametrize.register_parametrization(attn.k, "weight", Symmetric())
    return attn, sigmoid_attention


def _weight_normed(attn):
    attn.k = torch.nn.utils.parametrizations.weight_norm(attn.k)
    return attn, sigmoid_attention


def _frozen_keys(attn):
    attn.q.requires_grad_(False)
    attn.k.requires_grad_(False)
    return attn, sigmoid_attention


SETUPS = {"hooks": _hooked, "parametrize": _parametrized, "weight_norm": _weight_normed, "frozen_q_k": _frozen_keys,
          "head_loop": lambda attn: (HeadLoop(), sigmoid_attention)}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_setups_around_an_attention_module_rewrite_exactly(setup):
    """Hooks (they fire, and the rewritten attention sees what the pre-hook made), parametrized and weight-normed
    projections, frozen q/k projections and a loop over heads: rewritten (strict) to sigmoid, outputs and every
    gradient equal the hand-written sigmoid attention of the same module."""
    torch.manual_seed(0)
    attn, by_hand = SETUPS[setup](Attention())
    block, x = Block(attn), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    got = compile_rewritten(block, to="sigmoid", strict=True)(x)
    want = block.by_hand(x, by_hand)
    params = [p for p in block.parameters() if p.requires_grad]
    weights = torch.randn(want.shape)
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_cross_attention_with_key_padding_under_marked_dynamic_sizes(kind):
    """Cross-attention over keys of another length with key padding, batch and both lengths marked dynamic, then
    a call at other sizes: every call equals the hand-written kind (padded keys left out of sigmoid's count)."""
    torch.manual_seed(0)
    attn = Attention()
    compiled = compile_rewritten(attn, to=kind, strict=True)
    torch._dynamo.reset()
    for batch, queries, keys in ((3, 5, 11), (2, 7, 9)):
        x, kv = torch.randn(batch, queries, 16), torch.randn(batch, keys, 16)
        pad = torch.rand(batch, keys) > 0.3
        pad[:, 0] = True
        for tensor, dims in ((x, (0, 1)), (kv, (0, 1)), (pad, (0, 1))):
            for dim in dims:
                torch._dynamo.mark_dynamic(tensor, dim)
        want = sigmoid_attention(attn, x, kv, pad) if kind == "sigmoid" else _linear_attention(attn, x, kv, pad)
        torch.testing.assert_close(compiled(x, kv=kv, pad=pad), want, rtol=1e-5, atol=1e-6)


def _linear_attention(attn, x, kv, pad):
    """The linear kind by hand (elu + 1 features, no scale), padded keys left out."""
    q, k, v = attn.split(x, attn.q), attn.split(kv, attn.k), attn.split(kv, attn.v)
    fq, fk = F.elu(q) + 1, (F.elu(k) + 1) * pad[:, None, :, None]
    out = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))
    return attn.o(out.transpose(1, 2).flatten(2))


class ProbabilitiesBy(nn.Module):
    """Causal attention whose normalisation is given as ``how(scores, keep)`` [B, H, T, T]."""

    def __init__(self, how):
        super().__init__()
        self.qkv, self.how = nn.Linear(16, 48), how

    def forward(self, x):  # [B, T, 16]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # each [B, 2, T, 8]
        keep = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return (self.how(q @ k.transpose(-1, -2) / math.sqrt(8), keep) @ v).transpose(1, 2).flatten(2)


def _log_space_masked(scores, keep):  # the mask added to the log-probabilities: no renormalisation
    return (scores.log_softmax(-1) + torch.where(keep, 0.0, float("-inf"))).exp()


def _softmax_one(scores, keep):  # softmax₁: exp(s) / (1 + Σ exp(s)), an attention sink of logit 0
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True).detach()
    e = (scores - top).exp()
    return e / (e.sum(-1, keepdim=True) + (-top).exp())


def _log_softmax_exponentiated(scores, keep):
    return scores.masked_fill(~keep, float("-inf")).log_softmax(-1).exp()


def _written_out(scores, keep):
    e = scores.masked_fill(~keep, float("-inf")).exp()
    return e / e.sum(-1, keepdim=True)


NORMALISED_OTHERWISE = {"log_space_masked": (_log_space_masked, "a log_softmax changed before it is exponentiated"),
                        "softmax_one": (_softmax_one, "an extra term in its denominator")}


@pytest.mark.parametrize("case", sorted(NORMALISED_OTHERWISE))
def test_attention_normalised_in_a_form_the_matcher_does_not_read_is_said(case):
    """Attention whose normalisation is not a softmax the matcher reads — the mask added to log-probabilities (no
    renormalisation), softmax₁ — was silent: no site at all, ``to="sigmoid"`` kept it with no warning."""
    how, what = NORMALISED_OTHERWISE[case]
    torch.manual_seed(0)
    model, x = ProbabilitiesBy(how).eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    report = Report()
    with pytest.warns(attnrewrite.RewriteWarning, match="attention in a form this version does not rewrite"):
        got = compile_rewritten(model, report, to="sigmoid")(x)
    (site,) = report.sites
    assert site.status == "skipped" and site.attention_left_as_it_was and what in site.reason, report
    torch.testing.assert_close(got, model(x))
    torch._dynamo.reset()
    with pytest.raises(attnrewrite.RewriteFailed, match=what):
        compile_rewritten(model, to="sigmoid", strict=True)(x)


@pytest.mark.parametrize("how", [_log_softmax_exponentiated, _written_out], ids=lambda f: f.__name__)
def test_softmaxes_written_out_are_still_rewritten(how):
    torch.manual_seed(0)
    model, x = ProbabilitiesBy(how).eval(), torch.randn(2, 6, 16)
    torch._dynamo.reset()
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnrewrite.RewriteWarning)
        got = compile_rewritten(model, to="softmax", strict=True)(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
