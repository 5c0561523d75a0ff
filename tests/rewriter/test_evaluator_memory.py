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
import zlib
from dataclasses import replace

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


# --------------------------------------------------------------------------- query rows in blocks

from attnrewrite.ir import row_blocks  # noqa: E402
from attnrewrite.patterns import masks  # noqa: E402
from attnrewrite.rewriter.report import Report  # noqa: E402
from attnrewrite.testing.checks import compile_rewritten  # noqa: E402


@pytest.fixture
def in_blocks(monkeypatch):
    """Every region evaluated in row blocks of 12 query rows (at T = 96, [B, H, T, T] values); the
    blocked evaluations are counted."""
    monkeypatch.setattr(row_blocks, "MIN_BYTES", 0)
    monkeypatch.setattr(row_blocks, "BLOCK_BYTES", 12 * B * H * T * 8)
    used = []
    evaluate = row_blocks.evaluate_in_blocks

    def spy(plan, *args, **kwargs):
        used.append(len(list(plan.blocks())))
        return evaluate(plan, *args, **kwargs)

    monkeypatch.setattr(row_blocks, "evaluate_in_blocks", spy)
    return used


def test_certification_in_row_blocks_never_computes_a_whole_score_value(monkeypatch, in_blocks):
    largest = []
    compute = GraphEvaluator.compute

    def spy(self, node, env, randomize=False):
        value = compute(self, node, env, randomize)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == T:
            largest.append(value.numel() * value.element_size())
        return value

    monkeypatch.setattr(GraphEvaluator, "compute", spy)
    model = Causal().eval()
    x = torch.randn(B, T, H * D)
    with torch.no_grad():
        want = model(x)
    report = Report()
    got = compile_rewritten(model, report)(x)
    assert [s.status for s in report.sites] == ["rewritten"], report
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert in_blocks == [8, 8], f"probes evaluated in blocks: {in_blocks}"  # two probes of 96 / 12 blocks
    assert largest and max(largest) <= SCORES_BYTES // 8, f"largest score value {max(largest) / SCORES_BYTES:.2f}x"


@pytest.mark.parametrize("plant, reason", [
    (lambda spec: replace(spec, causal=False), "does not reproduce the site"),
    (lambda spec: replace(spec, scale=spec.scale * (1 + 3e-6)), "does not reproduce the site"),
])
def test_a_slightly_wrong_spec_is_still_refused_in_row_blocks(monkeypatch, in_blocks, plant, reason):
    real = masks.resolve

    def planted(site, evaluator):
        real(site, evaluator)
        site.spec = plant(site.spec)

    monkeypatch.setattr(masks, "resolve", planted)
    model = Causal().eval()
    x = torch.randn(B, T, H * D)
    report = Report()
    torch.testing.assert_close(compile_rewritten(model, report)(x), model(x), rtol=0, atol=0)
    (site,) = report.sites
    assert in_blocks, "the wrong spec was not probed in blocks"
    assert site.status == "skipped" and reason in (site.reason or ""), report


def _region(fn, *args):
    """(region: every call node in graph order, q: the placeholder of the argument named q, output) of ``fn``'s graph."""
    gm, inputs = _capture(fn, *args)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    q = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "l_q_")
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return gm, inputs, nodes, q, output[0] if isinstance(output, (tuple, list)) else output


def _masked(q, k, v, mask, keep):
    s = (q @ k.transpose(-2, -1)).mul(0.5).masked_fill(~mask, float("-inf")) + keep[:, None, None, :]
    p = torch.softmax(s.float(), dim=-1)
    return (p @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def test_a_row_local_region_in_blocks_equals_it_whole():
    """A [T, T] mask is sliced with the rows, a [B, T] additive padding row broadcasts whole."""
    g = torch.Generator().manual_seed(zlib.crc32(b"row blocks"))
    q, k, v = (torch.randn(2, 3, 20, 4, generator=g) for _ in range(3))
    mask = torch.rand(20, 20, generator=g) > 0.3
    keep = torch.randn(2, 20, generator=g)
    gm, inputs, region, q_node, output = _region(_masked, q, k, v, mask, keep)
    evaluator = GraphEvaluator(gm, inputs)
    plan = row_blocks.plan_rows(region, region, q_node, output, evaluator.writes.written)
    assert isinstance(plan, row_blocks.RowPlan), plan
    plan.rows_per_block = 3  # blocks of 3, 3, ..., 2 rows
    whole = evaluator.evaluate([output])
    env = {n: v for n, v in whole.items() if n not in plan.axis or n is q_node}
    got = row_blocks.evaluate_in_blocks(plan, region, env, lambda node, local: evaluator.compute(node, local),
                                        output)
    torch.testing.assert_close(got, whole[output], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn, reason", [
    (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v, "normalises along q's rows"),
    (lambda q, k, v: torch.softmax(q @ q.transpose(-2, -1), dim=-1) @ v, "reads q's rows in a way not followed"),
    (lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)).cumsum(-2), dim=-1) @ v, "in a way not followed"),
    (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-1).transpose(-2, -1) @ v, "multiplies along"),
    (lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) + q.sum(-2, keepdim=True), -1) @ v, "in a way not followed"),
    (lambda q, k, v: (lambda s: torch.softmax(s + s.transpose(-2, -1), dim=-1) @ v)(q @ k.transpose(-2, -1)),
     "along different dimensions"),
])
def test_a_region_that_mixes_query_rows_has_no_row_plan(fn, reason):
    g = torch.Generator().manual_seed(zlib.crc32(b"mixed rows"))
    q, k, v = (torch.randn(2, 3, 20, 20, generator=g) for _ in range(3))  # D = T: only the ops tell rows apart
    gm, inputs, region, q_node, output = _region(fn, q, k, v)
    evaluator = GraphEvaluator(gm, inputs)
    plan = row_blocks.plan_rows(region, region, q_node, output, evaluator.writes.written)
    assert isinstance(plan, str) and reason in plan, plan


def test_a_block_that_does_not_evaluate_falls_back_to_the_whole_region(monkeypatch, in_blocks):
    def fails(*args):
        raise RuntimeError("a rule followed an op that does not run on a block")

    monkeypatch.setattr(row_blocks, "_compute", fails)
    model = Causal().eval()
    x = torch.randn(B, T, H * D)
    report = Report()
    got = compile_rewritten(model, report)(x)
    assert in_blocks and [s.status for s in report.sites] == ["rewritten"], report
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
