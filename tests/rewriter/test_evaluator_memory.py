"""The float64 evaluator does not hold every intermediate value at once.

Certification evaluates each site at its real size in float64: at long sequence lengths every
[B, H, T, T] intermediate (scores, scaled scores, masked scores, probabilities) is a large tensor,
and holding all of them until the probe ends made compiling a model take memory far beyond the
model's own (bench/RESULTS.md, "Memory of compiling at long T").  These tests watch the values the
evaluator holds while it works: each is dropped after its last reader, and what the certifier and
the mask resolver read afterwards (masks written in place included) is still right.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn

import attnrewrite
from attnrewrite.ir.evaluate import GraphEvaluator

B, T, H, D = 1, 96, 4, 8
SCORES_BYTES = B * H * T * T * 8  # one float64 [B, H, T, T] value


def _capture(fn, *args):
    """The graph dynamo captures for ``fn`` and its example inputs."""
    seen = {}

    def backend(gm, inputs):
        seen["gm"], seen["inputs"] = gm, inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen["gm"], seen["inputs"]


def _live_bytes(values) -> int:
    storages = {}
    for value in values:
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _mask_built_in_place(x):
    m = torch.zeros(x.shape[-1], x.shape[-1])
    m[:, 5:] = float("-inf")  # a write with no dataflow edge to the later reads of m
    scaled = m * 2.0
    shifted = scaled + 1.0
    return x[:, None, :] + shifted


def test_value_keeps_only_what_was_asked_and_replays_the_write(monkeypatch):
    x = torch.zeros(3, 12)
    gm, inputs = _capture(_mask_built_in_place, x)
    evaluator = GraphEvaluator(gm, inputs)
    computed: dict[str, weakref.ref] = {}
    held = []
    compute = GraphEvaluator.compute

    def spy(self, node, env, randomize=False):
        held.append(len(env))
        value = compute(self, node, env, randomize)
        if isinstance(value, torch.Tensor):
            computed[node.name] = weakref.ref(value)
        return value

    monkeypatch.setattr(GraphEvaluator, "compute", spy)
    shifted = next(n for n in gm.graph.nodes if n.name == "shifted")
    got = evaluator.value(shifted)
    want = torch.zeros(12, 12, dtype=torch.float64)
    want[:, 5:] = float("-inf")
    torch.testing.assert_close(got, want * 2.0 + 1.0)
    alive = sorted(name for name, ref in computed.items() if ref() is not None)
    assert alive == [shifted.name], f"intermediates kept after value(): {alive}"
    # m (written in place by setitem), then scaled: one value held at a time, m until scaled reads it
    assert max(held) == 1, f"held {max(held)} values at once"
    assert evaluator.value(shifted) is got  # memoised


class Causal(nn.Module):
    """Attention written out as the llama target writes it (causal buffer, masked_fill, softmax in float)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, H, D).transpose(1, 2) for y in self.qkv(x).split(H * D, dim=-1))
        scores = (q @ k.transpose(-2, -1)) * D ** -0.5
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return (probs @ v).transpose(1, 2).reshape(b, t, H * D)


def test_certification_holds_about_one_score_sized_value_at_a_time(monkeypatch):
    peak = []
    compute = GraphEvaluator.compute

    def spy(self, node, env, randomize=False):  # what is held while each node is computed
        peak.append(_live_bytes(env.values()))
        return compute(self, node, env, randomize)

    monkeypatch.setattr(GraphEvaluator, "compute", spy)
    model = Causal().eval()
    x = torch.randn(B, T, H * D)
    with torch.no_grad():
        want = model(x)
    attnrewrite.rewrite(model, to="softmax", compiler="eager", strict=True)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert peak, "certification evaluated nothing"
    # scores, scaled, masked and probabilities held together would be 4x; one at a time is 1x
    # (plus q, k, v and the mask, a small fraction at this T)
    assert max(peak) < 1.5 * SCORES_BYTES, f"held {max(peak) / SCORES_BYTES:.1f}x one [B, H, T, T] value"


@pytest.mark.parametrize("release", [False, True])
def test_evaluate_keeps_everything_unless_told_to_release(release):
    gm, inputs = _capture(_mask_built_in_place, torch.zeros(3, 12))
    evaluator = GraphEvaluator(gm, inputs)
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    output = output[0] if isinstance(output, (tuple, list)) else output
    env = evaluator.evaluate([output], release=release)
    every = [n for n in gm.graph.nodes if n.op != "output"]  # all of them feed the output
    assert list(env) == ([output] if release else every)
    want = torch.zeros(12, 12, dtype=torch.float64)
    want[:, 5:] = float("-inf")
    torch.testing.assert_close(env[output], (want * 2.0 + 1.0).expand(3, 12, 12))
