"""The attention weights a kind returns when a model's probabilities escape (``output_attentions``),
checked by value — twice, with oracles that share no code with the kinds:

1. *consistency*: the returned weights times the values are the site's rewritten output (what the
   model computes with the weights is what ran);
2. *formula*: the weights equal the kind's definition written out here by hand — sigmoid:
   ``sigmoid(s − log n_i)`` with n_i the keys query i may see (``bias="auto"``) or a fixed bias;
   linear: ``φ(q)·φ(k)ᵀ`` normalised per row, φ = elu + 1 — with masked keys at 0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import compile_rewritten

T, C, H = 7, 24, 3
D = C // H


class Returns(nn.Module):
    """Attention whose probabilities are returned with the output (an HF ``output_attentions`` layer)."""

    def __init__(self, causal: bool):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.causal = causal

    def heads(self, x):
        b, t, c = x.shape
        return [y.view(b, t, H, D).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1)]

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        if self.causal:
            s = s.masked_fill(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        return p @ v, p


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, C, generator=g)
    keep = torch.ones(2, T, dtype=torch.bool)
    keep[1, -2:] = False  # row 1 pads its last two keys
    return x, keep


def _visible(keep, causal):
    """[B, 1, Tq, Tk]: may query i see key j."""
    visible = keep[:, None, None, :].expand(-1, 1, T, -1)
    if causal:
        visible = visible & torch.ones(T, T, dtype=torch.bool).tril()
    return visible


def _run(model, to, **options):
    report = Report()
    x, keep = _inputs()
    out, w = compile_rewritten(model.eval(), report, to=to, **options)(x, keep)
    assert [s.status for s in report.sites] == ["rewritten"], report
    q, k, v = (t.detach() for t in model.heads(x))
    return out, w, q, k, v, keep


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("bias", ["auto", -2.0])
def test_sigmoid_weights(causal, bias):
    out, w, q, k, v, keep = _run(Returns(causal), "sigmoid", bias=bias)
    visible = _visible(keep, causal)
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    if bias == "auto" and causal:
        b = -visible.sum(-1, keepdim=True).clamp(min=1).log()  # the keys query i sees
    elif bias == "auto":
        b = -visible.any(-2, keepdim=True).sum(-1, keepdim=True).clamp(min=1).log()  # the keys of the row
    else:
        b = torch.tensor(bias)
    want = torch.sigmoid(s + b).masked_fill(~visible, 0.0)
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, w @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_linear_weights(causal):
    out, w, q, k, v, keep = _run(Returns(causal), "linear")
    visible = _visible(keep, causal)
    raw = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * visible
    want = raw / raw.sum(-1, keepdim=True)
    torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, w @ v, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5), "linear weights are normalised per row"


def test_softmax_weights_are_the_original_probabilities():
    model = Returns(causal=True)
    out, w, q, k, v, keep = _run(model, "softmax")
    want_out, want_w = model(*_inputs())
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
