"""The functionalise stage on its own: which in-place writes it makes out of place, and that the graph
computes the same values afterwards (rewriter/functionalise.py).  The attention sites these writes
belong to are tested in test_inplace_masks.py."""

import pytest
import torch

from attnrewrite.rewriter.functionalise import functionalise_writes


def _functionalised(fn, *args):
    """``fn`` compiled with a backend that only runs the stage: (graph outputs, writes replaced, graph code)."""
    found = {}

    def backend(gm, example_inputs):
        found["done"] = functionalise_writes(gm)
        found["code"] = gm.code
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    fresh = [a.clone() for a in args]
    out = compiled(*fresh)
    return out, found["done"], found["code"]


def _check(fn, *args, replaced):
    want = fn(*[a.clone() for a in args])
    got, done, code = _functionalised(fn, *args)
    assert done == replaced, code
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return code


def test_a_returned_tensor_read_before_and_after_its_writes():
    def fn(x):
        s = x * 2.0
        before = s.sum()
        s.add_(1.0)
        middle = s.sum()
        s *= 3.0
        return s, before, middle

    code = _check(fn, torch.randn(4, 4), replaced=2)
    assert "add_" not in code and "*=" not in code


def test_a_write_reading_its_own_target():
    def fn(x):
        s = x + 1.0
        s.masked_fill_(s > 1.5, -1.0)
        s.sub_(s * 0.5, alpha=2.0)
        return s

    _check(fn, torch.randn(3, 5), replaced=2)


def test_type_promotion_is_left_as_written():
    """``half += float``: the in-place op keeps float16, the out-of-place one would give float32."""

    def fn(x, bias):
        s = x.half() * 2
        s += bias
        return s

    _check(fn, torch.randn(4, 4), torch.randn(4, 4), replaced=0)


@pytest.mark.parametrize("alias", ["view", "transpose", "slice", "detach", "unsqueeze", "reshape", "expand"])
def test_a_tensor_with_an_alias_is_left_as_written(alias):
    make = {"view": lambda s: s.view(-1), "transpose": lambda s: s.transpose(0, 1), "slice": lambda s: s[1:],
            "detach": lambda s: s.detach(), "unsqueeze": lambda s: s.unsqueeze(0), "reshape": lambda s: s.reshape(-1),
            "expand": lambda s: s.expand(2, 4, 4)}[alias]

    def fn(x):
        s = x * 2.0
        a = make(s)
        s.div_(4.0)
        return s + 0, a * 1

    _check(fn, torch.randn(4, 4), replaced=0)


def test_inputs_and_views_are_left_as_written():
    def fn(x, y):
        x.mul_(2.0)  # a graph input
        s = y * 1.0
        s[0].add_(1.0)  # through a view
        s[1] = 5.0  # an item assignment
        return x + 0, s

    _check(fn, torch.randn(4, 4), torch.randn(4, 4), replaced=0)


def test_an_alias_made_after_the_last_write_reads_the_result():
    """``s.float()`` on float32 (the same tensor), a view and a transpose made after the writes see the
    final values, as the out-of-place result's aliases (XLM's ``softmax(scores.float())``)."""

    def fn(x):
        s = x * 2.0
        s.masked_fill_(x > 1.0, -5.0)
        s += 1.0
        f = s.float()
        return f.view(-1)[:5] * 1, s.transpose(0, 1) + 0, f.exp()

    code = _check(fn, torch.randn(4, 4), replaced=2)
    assert "masked_fill_" not in code and "+=" not in code


def test_an_alias_made_between_two_writes_is_left_as_written():
    """An alias made after the first write sees the second: nothing is made out of place."""

    def fn(x):
        s = x * 2.0
        s.add_(1.0)
        f = s.view(-1)
        s.mul_(3.0)
        return f * 1

    _check(fn, torch.randn(4, 4), replaced=0)
