"""A rewritten site's inputs that nothing reads any more are erased (and what only they read), the rest stays.

The mask of a causal site is proved causal and not passed on: the model's ``~mask`` [T, T] (and its
``repeat_interleave`` of k and v) would otherwise stay in the graph and run in every layer under
``compiler="eager"``.  An input another node still reads, or an in-place write, stays.
"""

import operator

import pytest
import torch
import torch.nn as nn

import attnrewrite.rewriter.backend as backend
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

T, C, H, KV = 16, 32, 4, 2
D = C // H


class Layer(nn.Module):
    """Grouped-query causal attention, the mask inverted inside each layer (as the llama target writes it)."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(C, C), nn.Linear(C, 2 * KV * D)

    def forward(self, x, mask):
        q = self.q(x).view(1, T, H, D).transpose(1, 2)
        k, v = (t.view(1, T, KV, D).transpose(1, 2) for t in self.kv(x).split(KV * D, dim=-1))
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = (q @ k.transpose(-2, -1)) * D ** -0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, T, C)


class Model(nn.Module):
    def __init__(self, reuse_inverse: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.reuse_inverse = reuse_inverse
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril())

    def forward(self, x):
        mask = self.causal[:T, :T]
        for layer in self.layers:
            x = x + layer(x, mask)
        if self.reuse_inverse:  # a user of the inverse outside every site: it must stay
            x = x + (~mask).sum()
        return x


def _rewritten_graph(monkeypatch, model, x, to):
    graphs = []
    original = backend.compile_graph

    def capture(gm, example_inputs, *args, **kwargs):
        graphs.append(gm)
        return original(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(backend, "compile_graph", capture)
    torch._dynamo.reset()
    got = compile_rewritten(model, to=to, strict=True)(x)
    assert len(graphs) == 1
    return graphs[0], got


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target == target or (n.op == "call_method" and n.target == target))


@pytest.mark.parametrize("to", ["softmax", "summary"])
def test_unread_mask_inverse_and_repeats_are_erased(monkeypatch, to):
    torch.manual_seed(0)
    model, x = Model(), torch.randn(1, T, C)
    gm, got = _rewritten_graph(monkeypatch, model, x, to)
    assert _count(gm, operator.invert) == 0, gm.code
    assert _count(gm, "repeat_interleave") == 0, gm.code
    if to == "softmax":
        assert_close_rel(got, model(x), 1e-5, "rewritten model")


def test_an_input_read_elsewhere_stays(monkeypatch):
    torch.manual_seed(0)
    model, x = Model(reuse_inverse=True), torch.randn(1, T, C)
    gm, got = _rewritten_graph(monkeypatch, model, x, "softmax")
    assert _count(gm, operator.invert) == 1, gm.code  # the inverse outside the sites; the layers' ones erased
    assert_close_rel(got, model(x), 1e-5, "rewritten model")
