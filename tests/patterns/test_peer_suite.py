"""The peer's own attention spellings (inductor's fusion tests, restated in attnrewrite/testing/peer.py):
every site rewritten, certified and exact against eager; with the sigmoid kind, equal to the sigmoid
op called by hand on the q, k, v, scale and mask each spelling means."""

import functools
import math

import pytest
import torch

from attnrewrite.ops import sigmoid_attention
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report
from attnrewrite.testing import peer

CASES = {c.name: c for c in peer.cases()}


def _run(case: peer.PeerCase, to: str):
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": "eager"},
                                _report_sink=report.merge)
    inputs = list(case.inputs)
    if case.dynamic:
        for x in inputs[:3]:
            torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.manual_seed(0)
        want = case.fn(*inputs)
        torch.manual_seed(0)
        got = torch.compile(case.fn, backend=backend)(*inputs)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return first(got), first(want), report


def _assert_rewritten_and_certified(report: Report, case: peer.PeerCase) -> None:
    sites = report.attention_sites()
    assert len(sites) == case.sites, f"{case.name}: expected {case.sites} attention site(s):\n{report}"
    for site in sites:
        assert site.status == "rewritten", f"{case.name}:\n{report}"
        assert any(n.startswith("certified") for n in site.notes), f"{case.name}: not certified:\n{report}"


def test_the_suite_has_the_peers_56_spellings():
    assert len(CASES) == 56 and all(c.attention for c in CASES.values())


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.checkpoint])
def test_peer_spelling_is_rewritten_exactly(name):
    case = CASES[name]
    got, want, report = _run(case, "softmax")
    _assert_rewritten_and_certified(report, case)
    torch.testing.assert_close(got, want, rtol=case.tol, atol=case.tol)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.checkpoint])
def test_checkpointed_peer_spelling_is_rewritten(name):
    case = CASES[name]
    got, want, report = _run(case, "softmax")
    _assert_rewritten_and_certified(report, case)
    torch.testing.assert_close(got, want, rtol=case.tol, atol=case.tol)


# ---------------------------------------------------------------------------------------- sigmoid


def _heads_first(*xs):
    return tuple(x.transpose(1, 2) for x in xs)


def _key_keep(batch: int, t_k: int) -> torch.Tensor:
    """p15's padding: key j of sequence b is kept when j <= b, as a [B, 1, 1, Tk] keep-mask."""
    return torch.ones(batch, t_k, dtype=torch.bool).tril()[:, None, None, :]


SIGMOID_REFERENCES = {
    # case: (q, k, v, *rest) -> the sigmoid op called by hand with the spelling's meaning
    "p1_float": lambda q, k, v: sigmoid_attention(q, k, v, scale=32 ** -0.5),
    "p11": lambda q, k, v: sigmoid_attention(*_heads_first(q, k, v), scale=32 ** -0.5),
    "prev13": lambda q, k, v: sigmoid_attention(q, k, v, scale=32 ** -0.5),
    "p5_bool_filled": lambda q, k, v: sigmoid_attention(q, k, v, torch.ones(16, 16), scale=32 ** -0.5),
    "int_mask_added": lambda q, k, v, m: sigmoid_attention(q, k, v, m.float(), scale=0.5),
    "p15_expand_as": lambda q, k, v: sigmoid_attention(*_heads_first(q, k, v), _key_keep(4, 2), scale=1 / 3),
    "p21": lambda q, k, v, bias: sigmoid_attention(*_heads_first(q, k, v), bias, scale=1.0),
    "p24": lambda q, k, v, bias: sigmoid_attention(q, k, v, bias, scale=1.0),
    "tensor_factor_mul": lambda q, k, v, f: sigmoid_attention(q * f, k, v, scale=1.0),
}


@pytest.mark.parametrize("name", sorted(SIGMOID_REFERENCES))
def test_peer_spelling_rewritten_to_sigmoid_means_what_it_says(name):
    case = CASES[name]
    got, _, report = _run(case, "sigmoid")
    _assert_rewritten_and_certified(report, case)
    with torch.no_grad():
        want = SIGMOID_REFERENCES[name](*case.inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(got.abs().max()))
