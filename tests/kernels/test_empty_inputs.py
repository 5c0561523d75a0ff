"""Every public op takes an empty call as SDPA does: a batch, head or query count of 0 gives an empty
output of the right shape and empty gradients; a call with no keys gives 0 where the kind accepts it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnrewrite.ops as ops

OPS = {
    "softmax": (ops.softmax_attention, {}),
    "sigmoid": (ops.sigmoid_attention, {}),
    "linear": (ops.linear_attention, {}),
    "summary": (ops.summary_attention, {"chunk_size": 2, "window_chunks": 2}),
    "hashed": (ops.hashed_attention, {"bits": 16, "top_k": 2, "window": 2, "sinks": 1}),
    "sliding_window": (ops.sliding_window_attention, {"window": 3}),
    "dual_triangle": (ops.dual_triangle_attention, {}),
}


def _inputs(q_shape, kv_shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, requires_grad=True) for shape in (q_shape, kv_shape, kv_shape)]


@pytest.mark.parametrize("kind", sorted(OPS))
@pytest.mark.parametrize("shape", [(0, 4, 6, 8), (2, 0, 6, 8), (2, 4, 0, 8)], ids=["batch0", "heads0", "tokens0"])
@pytest.mark.parametrize("causal", [False, True])
def test_an_empty_call_gives_an_empty_output_and_gradients(kind, shape, causal):
    op, options = OPS[kind]
    q, k, v = _inputs(shape, shape)
    kwargs = dict(options) if kind == "dual_triangle" else dict(options, is_causal=causal)
    out = op(q, k, v, **kwargs)
    assert out.shape == F.scaled_dot_product_attention(q, k, v).shape
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "linear", "hashed", "sliding_window"])
def test_queries_without_keys_get_zero(kind):
    op, options = OPS[kind]
    q, k, v = _inputs((2, 4, 5, 8), (2, 4, 0, 8))
    out = op(q, k, v, **options)
    assert out.shape == (2, 4, 5, 8)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_a_nonempty_call_is_not_taken_for_an_empty_one():
    """The empty-call shortcut must not swallow real work (guards the size test, not just its shape)."""
    q, k, v = _inputs((1, 2, 6, 8), (1, 2, 6, 8))
    out = ops.sigmoid_attention(q, k, v, is_causal=True)
    assert out.abs().sum() > 0


def test_an_empty_batch_under_compile_with_dynamic_shapes():
    """Compiled with symbolic sizes, a later empty batch still runs (Dynamo specialises the size 0)."""
    compiled = torch.compile(lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True), backend="eager",
                             dynamic=True)
    for batch in (2, 3, 0):
        q, k, v = _inputs((batch, 2, 6, 8), (batch, 2, 6, 8))
        out = compiled(q, k, v)
        assert out.shape == (batch, 2, 6, 8)
        torch.testing.assert_close(out, ops.sigmoid_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("kind", sorted(OPS))
@pytest.mark.parametrize("fault", ["batch", "dtype", "integer", "head_dim"])
def test_a_malformed_empty_call_raises_as_a_full_one_does(kind, fault):
    """The empty-call shortcut must not hide bad input: each malformed empty call raises, as the same fault
    does in a call with something to compute (batch sizes 0 and 2 do not broadcast, for SDPA either)."""
    op, options = OPS[kind]
    kwargs = dict(options) if kind == "dual_triangle" else dict(options, is_causal=True)

    def call(batch):
        q, k, v = (torch.randn(batch, 2, 6, 8) for _ in range(3))
        if fault == "batch":
            k, v = torch.randn(batch + 2, 2, 6, 8), torch.randn(batch + 2, 2, 6, 8)
        elif fault == "dtype":
            k = k.double()
        elif fault == "integer":
            q, k, v = (x.long() for x in (q, k, v))
        else:
            k = torch.randn(batch, 2, 6, 4)
        return op(q, k, v, **kwargs)

    with pytest.raises((TypeError, ValueError, RuntimeError)):
        call(2)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        call(0)


def test_an_empty_batch_broadcasts_against_one_as_sdpa_does():
    q, k, v = torch.randn(0, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ops.softmax_attention(q, k, v, is_causal=True).shape == want.shape
