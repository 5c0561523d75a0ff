"""Oracle models: a model written by hand with sigmoid or linear attention must equal the softmax
model rewritten to that kind (same weights): outputs and every parameter gradient.

The oracles are written here from the definitions, independently of the kernels and the rewriter.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import (
    assert_close_rel,
    assert_gradients_close,
    compile_rewritten,
)

torch.set_default_dtype(torch.float32)


def elu1(x):
    return F.elu(x) + 1


class Decoder(nn.Module):
    """nanoGPT-style decoder with a padding mask (an encoder with ``causal=False``); ``attention``
    picks the hand-written kind."""

    def __init__(self, attention="softmax", layers=2, dim=32, heads=4, kv_heads=2, vocab=50, causal=True):
        super().__init__()
        self.attention, self.heads, self.kv_heads, self.causal = attention, heads, kv_heads, causal
        self.embed = nn.Embedding(vocab, dim)
        hd = dim // heads
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.kv = nn.ModuleList(nn.Linear(dim, 2 * kv_heads * hd) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def attend(self, q, k, v, keep):
        """q [B, H, T, D], k/v [B, H, T, D] (already repeated), keep [B, 1, 1, T] bool."""
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool).tril() if self.causal else torch.ones(t, t, dtype=torch.bool)
        visible = causal & keep
        if self.attention == "softmax":
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v
        if self.attention == "sigmoid":  # b_i = -log(n_i), n_i = the keys query i sees (padding-aware)
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            n = visible.sum(-1, keepdim=True).clamp(min=1).float()
            return (torch.sigmoid(s - torch.log(n)) * visible) @ v
        if self.attention == "linear":  # quadratic form of elu+1 linear attention, no scale
            w = (elu1(q) @ elu1(k).transpose(-2, -1)) * visible
            return (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
        raise ValueError(self.attention)

    def forward(self, ids, keep):
        b, t = ids.shape
        x = self.embed(ids)
        hd = x.shape[-1] // self.heads
        mask = keep[:, None, None, :]
        for q_proj, kv_proj, o_proj, norm in zip(self.q, self.kv, self.o, self.norm):
            h = norm(x)
            q = q_proj(h).view(b, t, self.heads, hd).transpose(1, 2)
            k, v = kv_proj(h).view(b, t, 2, self.kv_heads, hd).permute(2, 0, 3, 1, 4)
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            x = x + o_proj(self.attend(q, k, v, mask).transpose(1, 2).reshape(b, t, -1))
        return self.head(x)


def _inputs():
    ids = torch.randint(0, 50, (3, 10))
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, 7:] = False  # right padding: every row sees a key
    keep[2, 4:] = False
    return ids, keep


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("kind,options", [
    ("sigmoid", {}),
    ("linear", {"feature_map": "elu"}),
])
def test_rewritten_model_equals_the_hand_written_oracle(kind, options, causal):
    torch.manual_seed(0)
    model = Decoder("softmax", causal=causal).eval()
    oracle = Decoder(kind, causal=causal).eval()
    oracle.load_state_dict(model.state_dict())
    ids, keep = _inputs()

    report = Report()
    compiled = compile_rewritten(model, report, to=kind, **options)
    got, want = compiled(ids, keep), oracle(ids, keep)
    assert len(report.rewritten) == 2, report
    assert all(s.spec["kv_groups"] == 2 and s.spec["causal"] == causal for s in report.rewritten)

    valid = keep[..., None].expand_as(want)  # padded query rows are garbage in both
    assert_close_rel(got[valid], want[valid], 1e-5, "logits")
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)) * valid
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()))
    assert_gradients_close([n for n, _ in model.named_parameters()], grads, want_grads, 1e-4)


def test_softmax_oracle_is_the_model_itself():
    """The oracle's softmax branch is the model: the rewrite to softmax must leave it unchanged."""
    torch.manual_seed(0)
    model = Decoder("softmax").eval()
    ids, keep = _inputs()
    report = Report()
    got = compile_rewritten(model, report)(ids, keep)
    valid = keep[..., None].expand_as(got)
    assert_close_rel(got[valid], model(ids, keep)[valid], 1e-5, "logits")
    assert len(report.rewritten) == 2


def _llama_oracle_attend(kind):
    """The kind written by hand in place of the llama target's softmax."""
    from attnrewrite.testing.targets import repeat_kv

    def attend(q, k, v, mask):
        k, v = repeat_kv(q, k, v)
        if kind == "sigmoid":  # causal: b_i = -log(n_i), n_i = the keys query i sees (i + 1, no padding)
            s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            n = mask.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
            return (torch.sigmoid(s - torch.log(n)) * mask) @ v
        w = (elu1(q) @ elu1(k).transpose(-2, -1)) * mask  # linear, elu+1, no scale
        return (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)

    return attend


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_llama_target_rewritten_equals_its_hand_written_oracle(kind):
    from attnrewrite.targets import llama
    from attnrewrite.testing.targets import hand_written_llama

    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny").eval()
    oracle = hand_written_llama(model, _llama_oracle_attend(kind))
    tokens = torch.randint(0, oracle.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    report = Report()
    got, want = compile_rewritten(model, report, to=kind)(tokens), oracle(tokens)
    assert len(report.rewritten) == 2, report
    assert_close_rel(got, want, 1e-5, "logits")
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()))
    assert_gradients_close([n for n, _ in model.named_parameters()], grads, want_grads, 1e-4)
