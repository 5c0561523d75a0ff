"""Learned sink logits (gpt-oss's attention sinks): ``softmax(cat([s, sink[h]], -1))[..., :-1] @ v``.

Read as softmax attention with one more key per head (score sink[h], value 0), certified with the sinks, and
rewritten exactly by the softmax kind: outputs and the gradients of q, k, v and the sinks equal the written-out
form in float64.  Forms that are not one learned logit per head dropped again after the softmax are left as they
were, with the reason; a spec that loses or changes the sinks is refused by the certifier; every other kind
drops them with a note or skips the site, as its ``Kind.sink_logits`` says.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from attnrewrite import kinds
from attnrewrite.kernels.softmax.reference import softmax_attention as reference_attention
from attnrewrite.patterns import eager_matmul
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report

B, H, HKV, T, D = 2, 4, 2, 6, 8
SCALE = 0.3


def _g(name: str) -> torch.Generator:
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(name: str, dtype=torch.float64, grad=False):
    g = _g(name)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, HKV, T, D, generator=g, dtype=dtype) for _ in range(2))
    sinks = 2 * torch.randn(H, generator=g, dtype=dtype)  # large enough to take a real share of each row
    return tuple(x.requires_grad_(grad) for x in (q, k, v, sinks))


def _compile(fn, to="softmax", compiler="aot_eager", dynamic=None, **kind_options):
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": compiler, **kind_options},
                                _report_sink=report.merge)
    return torch.compile(fn, backend=backend, dynamic=dynamic), report


def _repeat(x):  # HF's repeat_kv
    return x[:, :, None].expand(B, HKV, H // HKV, T, D).reshape(B, H, T, D)


def _padding_bias(dtype):
    """HF's additive causal + padding mask, finfo.min where masked: batch row 1 pads its last two keys."""
    lengths = torch.tensor([T, T - 2]).view(B, 1, 1, 1)
    keep = torch.ones(T, T, dtype=torch.bool).tril() & (torch.arange(T) < lengths)
    return torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------- spellings read


def gpt_oss(q, k, v, sinks):  # transformers' GptOss eager_attention_forward, with its causal + padding mask
    s = torch.matmul(q, _repeat(k).transpose(2, 3)) * SCALE + _padding_bias(q.dtype)
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([s, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    weights = F.dropout(probs[..., :-1], p=0.0, training=False).to(v.dtype)
    return torch.matmul(weights, _repeat(v))


def sink_first_causal(q, k, v, sinks):  # the sink column first and sliced off with [..., 1:]; a causal triangle
    s = (q @ _repeat(k).mT / D ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    column = sinks.view(H, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([column, s], dim=-1), dim=-1)[..., 1:] @ _repeat(v)


def full_index_slice(q, k, v, sinks):  # every dim indexed: [:, :, :, :T]; one logit for all heads
    s = torch.einsum("bhqd,bhkd->bhqk", q, _repeat(k)) * SCALE
    column = sinks[:1].reshape(1, 1, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], dim=3), dim=3)[:, :, :, :T] @ _repeat(v)


READ = {"gpt_oss": gpt_oss, "sink_first_causal": sink_first_causal, "full_index_slice": full_index_slice}


@pytest.mark.parametrize("name", sorted(READ))
def test_sink_logits_are_rewritten_exactly_with_their_gradients(name):
    """Outputs and the gradients of q, k, v and the sinks, float64, against the site's own written-out form."""
    fn = READ[name]
    compiled, report = _compile(fn)
    got_inputs, want_inputs = _inputs(name, grad=True), _inputs(name, grad=True)
    got, want = compiled(*got_inputs), fn(*want_inputs)
    (site,) = report.sites
    assert site.status == "rewritten", report
    assert site.spec["sink_logits"] is True and "learned sink logits: exact (one zero-value key per head)" in site.notes
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn(got.shape, generator=_g("cotangent"), dtype=got.dtype)
    (got * cotangent).sum().backward()
    (want * cotangent).sum().backward()
    for label, a, b in zip("q k v sinks".split(), got_inputs, want_inputs):
        assert b.grad.abs().max() > 1e-3, label  # (the gradient exists: a sink that is dropped has none)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=label)


def test_the_sinks_change_the_output():
    """The comparisons above have teeth: the same attention without its sinks differs."""
    q, k, v, sinks = _inputs("teeth")
    with_sinks = reference_attention(q, _repeat(k), _repeat(v), scale=SCALE, sink_logits=sinks)
    assert (with_sinks - reference_attention(q, _repeat(k), _repeat(v), scale=SCALE)).abs().max() > 1e-2
    torch.testing.assert_close(full_index_slice(q, k, v, sinks[:1].expand(H)), reference_attention(
        q, _repeat(k), _repeat(v), scale=SCALE, sink_logits=sinks[:1].expand(H)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiler,dynamic", [("inductor", None), ("aot_eager", True)])
def test_sink_logits_under_inductor_and_dynamic_shapes(compiler, dynamic):
    q, k, v, sinks = _inputs(compiler, dtype=torch.float32, grad=True)
    compiled, report = _compile(sink_first_causal, compiler=compiler, dynamic=dynamic)
    got = compiled(q, k, v, sinks)
    torch.testing.assert_close(got, sink_first_causal(q, k, v, sinks), rtol=1e-5, atol=1e-5)
    assert [s.status for s in report.sites] == ["rewritten"], report
    (grad,) = torch.autograd.grad(got.square().sum(), sinks)
    (want,) = torch.autograd.grad(sink_first_causal(q, k, v, sinks).square().sum(), sinks)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- forms not read


def _scores(q, k):
    return q @ _repeat(k).mT * SCALE


def column_from_queries(q, k, v, sinks):  # one column, but it varies along the queries
    s = _scores(q, k)
    return torch.softmax(torch.cat([s, q.mean(-1, keepdim=True)], -1), -1)[..., :-1] @ _repeat(v)


def column_from_keys(q, k, v, sinks):  # one number per head, computed from the keys
    s = _scores(q, k)
    column = _repeat(k).mean((0, 2, 3)).reshape(1, H, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], -1), -1)[..., :-1] @ _repeat(v)


def column_per_batch_row(q, k, v, sinks):
    s = _scores(q, k)
    column = sinks[:B].reshape(B, 1, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], -1), -1)[..., :-1] @ _repeat(v)


def slice_keeps_the_sink(q, k, v, sinks):  # drops the first key instead
    s = _scores(q, k)
    column = sinks.reshape(1, H, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], -1), -1)[..., 1:] @ _repeat(v)


def slice_drops_a_key_too(q, k, v, sinks):
    s = _scores(q, k)
    column = sinks.reshape(1, H, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], -1), -1)[..., :-2] @ _repeat(v)[..., :-1, :]


def probabilities_with_the_sink_returned(q, k, v, sinks):
    s = _scores(q, k)
    probs = torch.softmax(torch.cat([s, sinks.reshape(1, H, 1, 1).expand(B, H, T, 1)], -1), -1)
    return probs[..., :-1] @ _repeat(v), probs


def sink_on_merged_heads(q, k, v, sinks):  # [B·H, T, T] scores
    s = _scores(q, k).reshape(B * H, T, T)
    column = sinks.repeat(B).reshape(B * H, 1, 1).expand(B * H, T, 1)
    return (torch.softmax(torch.cat([s, column], -1), -1)[..., :-1] @ _repeat(v).reshape(B * H, T, D))


def scores_set_to_a_number(q, k, v, sinks):  # masked_fill with -1: not a mask value, an op the spec cannot hold
    s = _scores(q, k).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1.0)
    column = sinks.reshape(1, H, 1, 1).expand(B, H, T, 1)
    return torch.softmax(torch.cat([s, column], -1), -1)[..., :-1] @ _repeat(v)


NOT_READ = {
    "column_from_queries": (column_from_queries, "varies along the queries"),
    "column_from_keys": (column_from_keys, "reads the queries, keys, values or scores"),
    "column_per_batch_row": (column_per_batch_row, "varies along the batch"),
    "slice_keeps_the_sink": (slice_keeps_the_sink, "does not drop exactly the sink column (the last of 7)"),
    "slice_drops_a_key_too": (slice_drops_a_key_too, "does not drop exactly the sink column"),
    "probabilities_with_the_sink_returned": (probabilities_with_the_sink_returned, "used elsewhere too"),
    "sink_on_merged_heads": (sink_on_merged_heads, "rank-3 scores"),
    "scores_set_to_a_number": (scores_set_to_a_number, "which is not a mask value"),
}


@pytest.mark.parametrize("name", sorted(NOT_READ))
def test_forms_not_read_as_sink_logits_are_left_as_they_were(name):
    from attnrewrite.rewriter.failures import RewriteWarning

    fn, reason = NOT_READ[name]
    compiled, report = _compile(fn, compiler="eager")
    inputs = _inputs(name)
    with pytest.warns(RewriteWarning, match="attention in a form this version does not rewrite"):
        got = compiled(*inputs)
    want = fn(*inputs)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)
    (site,) = report.sites
    assert site.status == "skipped" and site.attention_left_as_it_was, report
    assert reason in site.reason, site.reason


# --------------------------------------------------------------------------------- the certifier


def _plant(monkeypatch, perturb):
    real = eager_matmul.match

    def planted(anchor):
        site = real(anchor)
        site.spec = perturb(site.spec)
        return site

    monkeypatch.setattr(eager_matmul, "match", planted)


def _other_sinks(spec, fn):
    """The spec with its sink logits replaced by ``fn`` of them, a node inserted into the graph."""
    node = spec.sink_logits.node
    graph = node.graph
    with graph.inserting_after(node):
        other = graph.call_function(fn, (node,))
    other.meta = {key: (value.clone() if key in ("val", "example_value") else value) for key, value in node.meta.items()}
    return replace(spec, sink_logits=replace(spec.sink_logits, node=other))


def _sinks_off_by_a_little(x):
    return x * (1 + 1e-4)


def _sinks_of_the_next_head(x):
    return x.roll(1, dims=-3)


PLANTED = {
    "dropped": lambda spec: replace(spec, sink_logits=None),
    "off_by_1e-4": lambda spec: _other_sinks(spec, _sinks_off_by_a_little),
    "heads_shifted": lambda spec: _other_sinks(spec, _sinks_of_the_next_head),
}


@pytest.mark.parametrize("to", ["softmax", "sigmoid"])
@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_a_spec_with_wrong_or_missing_sinks_is_refused(monkeypatch, plant, to):
    """sigmoid drops the sinks when it rewrites, but only once the spec with them reproduces the site."""
    _plant(monkeypatch, PLANTED[plant])
    compiled, report = _compile(gpt_oss, to=to, compiler="eager")
    inputs = _inputs(plant)
    with pytest.warns(UserWarning):
        got = compiled(*inputs)
    assert torch.equal(got, gpt_oss(*inputs))
    (site,) = report.sites
    assert site.status == "skipped", f"a wrong spec was certified:\n{report}"
    assert "does not reproduce the site" in site.reason, site.reason


# --------------------------------------------------------------------------------- the other kinds


def _plain(q, k, v, sinks):  # gpt_oss without its sinks
    s = torch.matmul(q, _repeat(k).transpose(2, 3)) * SCALE + _padding_bias(q.dtype)
    return torch.matmul(F.softmax(s, dim=-1), _repeat(v))


@pytest.mark.parametrize("name", kinds.names())
def test_each_kind_honours_drops_with_a_note_or_skips_sink_logits(name):
    """As ``Kind.sink_logits`` says: "exact" (softmax, above), "dropped" (the kind's own attention without the
    sinks, said in the notes), or a skip naming the kind."""
    kind = kinds.get(name)
    options = dict(kind.example_options)
    q, k, v, sinks = _inputs(name, dtype=torch.float32)
    compiled, report = _compile(gpt_oss, to=name, compiler="eager", **options)
    with torch.no_grad():
        got = compiled(q, k, v, sinks)
    (site,) = report.sites
    if kind.sink_logits is None:
        assert site.status == "skipped", report
        assert site.reason.startswith(f"{name} cannot honour this site: it has no form for learned sink logits")
        assert torch.equal(got, gpt_oss(q, k, v, sinks))
    elif kind.sink_logits == "dropped":
        assert site.status == "rewritten", report
        assert any(n.startswith("learned sink logits: dropped") for n in site.notes), site.notes
        plain, plain_report = _compile(_plain, to=name, compiler="eager", **options)
        with torch.no_grad():
            torch.testing.assert_close(got, plain(q, k, v, sinks), rtol=1e-6, atol=1e-6)
        assert [s.status for s in plain_report.sites] == ["rewritten"], plain_report
    else:
        assert kind.sink_logits == "exact", kind.sink_logits
        assert site.status == "rewritten", report
        torch.testing.assert_close(got, gpt_oss(q, k, v, sinks), rtol=1e-5, atol=1e-5)


def returning_weights(q, k, v, sinks):  # HF's eager attention returns the probabilities without the sink column
    s = torch.matmul(q, _repeat(k).transpose(2, 3)) * SCALE
    combined = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], dim=-1)
    weights = F.softmax(combined - combined.max(-1, keepdim=True).values, dim=-1)[..., :-1]
    return torch.matmul(weights, _repeat(v)), weights


@pytest.mark.parametrize("to", ["softmax", "sigmoid"])
def test_returned_weights_are_those_without_the_sink_column(to):
    """softmax keeps the site's own weights; sigmoid returns its own [B, H, Tq, Tk] (the sinks dropped)."""
    compiled, report = _compile(returning_weights, to=to)
    inputs = _inputs(to)
    (out, weights), (want_out, want_weights) = compiled(*inputs), returning_weights(*inputs)
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["weights_escape"], report
    assert weights.shape == want_weights.shape == (B, H, T, T)
    if to == "softmax":
        torch.testing.assert_close((out, weights), (want_out, want_weights), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(out, weights @ _repeat(inputs[2]), rtol=1e-5, atol=1e-6)  # (op vs its formula)
