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
        x[0] = 5.0  # an item assignment into an input
        s = y * 1.0
        t = s[1:]
        t.add_(1.0)  # through a view that is read again
        return x + 0, s, t * 2

    _check(fn, torch.randn(4, 4), torch.randn(4, 4), replaced=0)


NEG = float("-inf")
ITEM_WRITES = {  # spelling -> (write(s, m, b) into a private s [2, 3, 8, 8], or None: s[i] += spelled in fn)
    "slice": (lambda s, m, b: s.__setitem__((Ellipsis, slice(5, None)), NEG), 1),
    "int and slice": (lambda s, m, b: s.__setitem__((slice(None), 1, slice(2, 5)), -3.0), 1),
    "strided": (lambda s, m, b: s.__setitem__((Ellipsis, slice(1, None, 3), 2), 7.0), 1),
    "negative bounds": (lambda s, m, b: s.__setitem__((Ellipsis, slice(-3, -1)), 2.5), 1),
    "empty slice": (lambda s, m, b: s.__setitem__((Ellipsis, slice(6, 2)), 9.0), 1),
    "bool index": (lambda s, m, b: s.__setitem__((slice(None), m), NEG), 1),
    "bool index and int": (lambda s, m, b: s.__setitem__((1, m), -1e9), 1),
    "full bool mask": (lambda s, m, b: s.__setitem__(m.expand_as(s), -1e9), 1),
    "0-d tensor value": (lambda s, m, b: s.__setitem__((Ellipsis, slice(None, 2)), b.sum()), 1),
    "fill_ on a slice": (lambda s, m, b: s[:, :, 3:].fill_(NEG), 1),
    "index_put_": (lambda s, m, b: s.index_put_((m.expand_as(s),), torch.tensor(-2.0)), 1),
    "+= tensor on a slice": (None, 1),
    "-= tensor on int and slice": (None, 1),
    "add_ on a slice": (lambda s, m, b: s[..., 4:].add_(b[..., :4]), 1),
}


def _item_fn(spelling):
    write, _ = ITEM_WRITES[spelling]

    def fn(x, m, b):
        s = x * 2.0  # [2, 3, 8, 8]
        before = s.sum()
        if spelling.startswith("+=") or spelling.startswith("-="):  # s[i] += b is getitem, iadd, setitem
            index = {"+= tensor on a slice": (Ellipsis, slice(None), slice(2, 7)),
                     "-= tensor on int and slice": (slice(None), 0, slice(1, 3))}[spelling]
            if spelling.startswith("+="):
                s[index] += b[..., 2:7]
            else:
                s[index] -= b[1:3]
        else:
            write(s, m, b)
        s.masked_fill_(x > 1.5, -1.0)  # an elementwise write after it
        return s.exp(), before

    return fn


@pytest.mark.parametrize("spelling", list(ITEM_WRITES))
def test_item_writes_are_made_out_of_place(spelling):
    """Each item-write spelling (rewriter/item_writes.py) becomes out-of-place ops, bit for bit the same values."""
    g = torch.Generator().manual_seed(len(spelling))
    x, m, b = torch.randn(2, 3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g) > 0.6, torch.randn(8, 8,
                                                                                                         generator=g)
    code = _check(_item_fn(spelling), x, m, b, replaced=ITEM_WRITES[spelling][1] + 1)
    assert "setitem" not in code and "index_put_" not in code and "fill_(" not in code and "+=" not in code \
        and "-=" not in code and "add_(" not in code, code


def _add_on_a_bool_index(s, y):
    s[y > 0] += 1.0  # (the bool getitem is a copy of data-dependent size, whose size Dynamo asserts: read twice)


def test_a_bool_mask_built_by_item_assignment():
    def fn(x):
        keep = torch.ones(4, 6, dtype=torch.bool)
        keep[:, 4:] = False
        keep[0, 5] = True
        return x.masked_fill(~keep, -1.0)

    code = _check(fn, torch.randn(4, 6), replaced=2)
    assert "keep_functional_1 = keep_functional.masked_fill(" in code, code


LEFT_AS_WRITTEN = {  # spelling -> fn(s, y): each stays as written (with the elementwise write beside it)
    "view of a view": lambda s, y: s[1:].__getitem__((slice(None), slice(2, None))).fill_(0.0),
    "integer tensor index": lambda s, y: s.__setitem__((slice(None), torch.tensor([0, 2])), 0.0),
    "two bool indices": lambda s, y: s.__setitem__((y[0] > 0, y[0] > 0), 0.0),  # (pairs, not a product)
    "a tensor assigned": lambda s, y: s.__setitem__((slice(None), slice(2, None)), y[:, :2]),
    "+= on a strided slice": lambda s, y: s[:, ::2].add_(y[:, :2]),
    "add_ with alpha": lambda s, y: s[:, 1:].add_(y[:, 1:], alpha=2.0),
    "index_put_ accumulating": lambda s, y: s.index_put_((y > 0,), torch.tensor(1.0), accumulate=True),
    "a value read from the tensor's own view": lambda s, y: s.__setitem__((slice(None), 0), s[0, 1]),
    "+= on a bool index": _add_on_a_bool_index,
}


@pytest.mark.parametrize("spelling", list(LEFT_AS_WRITTEN))
def test_item_writes_outside_the_rules_are_left_as_written(spelling):
    write = LEFT_AS_WRITTEN[spelling]

    def fn(x, y):
        s = x * 2.0
        write(s, y)
        s.add_(1.0)
        return s.exp()

    g = torch.Generator().manual_seed(len(spelling))
    _check(fn, torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), replaced=0)


def test_a_number_added_to_half_precision_is_left_as_written():
    """``s16[i] += c`` adds c in float32 before rounding: a float16 P = where(R, c, 0) would round c first."""

    def fn(x):
        s = x.half() * 2
        s[:, 1:] += 0.1
        return s

    _check(fn, torch.randn(4, 4), replaced=0)


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
