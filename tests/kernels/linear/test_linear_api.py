"""Bad input gets a clear error naming the problem; the search spaces are sound."""

import pytest
import torch

from attnrewrite.kernels.checks import DtypeMismatchError
from attnrewrite.kernels import tuning
from attnrewrite.kernels.linear import LinearState, linear_attention_dispatch, linear_attention_decode
from attnrewrite.kernels.linear import spaces, tune

from _linear_testing import make_qkv


def _qkv(**kw):
    return make_qkv(batch=2, heads_q=2, heads_kv=2, tq=8, dk=4, dv=4, **kw)


@pytest.mark.parametrize("change,kwargs,error,message", [
    (lambda q, k, v: (q[0], k, v), {}, ValueError, "must be 4-d"),
    (lambda q, k, v: (q, k.double(), v), {}, DtypeMismatchError, "share a dtype"),  # SDPA's RuntimeError
    (lambda q, k, v: (q.long(), k.long(), v.long()), {}, TypeError, "floating point"),
    (lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, "batch sizes differ"),
    (lambda q, k, v: (q, k, v[:, :, :5]), {}, ValueError, "agree on heads and number of keys"),
    (lambda q, k, v: (q[..., :3], k, v), {}, ValueError, "head dims differ"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), {"enable_gqa": True}, ValueError,
     "multiple of key/value heads"),
    (lambda q, k, v: (torch.cat([q, q], 1), k, v), {}, ValueError, "enable_gqa=True"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), {"is_causal": True}, ValueError,
     "is_causal needs at least as many keys as queries"),
    (lambda q, k, v: (q, k, v), {"dropout_p": 0.1}, ValueError, "dropout_p must be 0"),
    (lambda q, k, v: (q, k, v), {"feature_map": "favor"}, ValueError, "feature_map must be one of"),
    (lambda q, k, v: (q, k, v), {"impl": "cuda"}, ValueError, "impl must be 'auto', 'triton' or 'torch'"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.bool).tril()}, ValueError,
     "cannot honour"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(2, 2, 1, 8, dtype=torch.bool)}, ValueError,
     "not a key-padding mask"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.randn(2, 1, 1, 8)}, ValueError, "additive bias"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(2, 1, 1, 8, dtype=torch.int64)}, TypeError,
     "must be bool or floating point"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(2, 1, 1, 8, dtype=torch.bool),
                                 "kv_lens": torch.tensor([8, 8])}, ValueError, "either attn_mask or kv_lens"),
    (lambda q, k, v: (q, k, v), {"kv_lens": torch.tensor([8.0, 8.0])}, TypeError, "kv_lens must be an integer tensor"),
    (lambda q, k, v: (q, k, v), {"kv_lens": torch.tensor([8, 8, 8])}, ValueError, r"kv_lens must be \[B\] = \[2\]"),
    (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)}, ValueError,
     "batch must be 1"),
    (lambda q, k, v: (q[:1], k[:1], v[:1]), {"cu_seqlens": torch.tensor([0, 9], dtype=torch.int32)}, ValueError,
     "rise from 0"),
    (lambda q, k, v: (q[:1], k[:1], v[:1]), {"cu_seqlens": torch.tensor([0, 8.0])}, TypeError, "int32"),
    (lambda q, k, v: (q[:1], k[:1], v[:1]), {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32),
                                             "kv_lens": torch.tensor([8])}, ValueError, "have no padding"),
    (lambda q, k, v: (q, k, v), {"initial_state": (torch.zeros(2, 2, 4, 4),)}, TypeError, "LinearState"),
    (lambda q, k, v: (q, k, v), {"initial_state": (torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4))}, ValueError,
     "per kv head"),
    (lambda q, k, v: (q, k, v), {"initial_state": (torch.zeros(2, 2, 4, 4, dtype=torch.float16),
                                                   torch.zeros(2, 2, 4, dtype=torch.float16))}, TypeError, "float32"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), {"impl": "triton"}, ValueError,
     "float16, bfloat16 or float32"),
])
def test_bad_input_is_named(change, kwargs, error, message):
    """One exception type per fault (attnrewrite.kernels.checks): TypeError for a wrong type or dtype
    kind, ValueError for shapes, mismatches and values; ``pytest.raises`` would also accept a subclass,
    so the type is compared exactly."""
    q, k, v = change(*_qkv())
    with pytest.raises(error, match=message) as caught:
        linear_attention_dispatch(q, k, v, **kwargs)
    assert type(caught.value) is error


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_attention_dispatch(*_qkv(), impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_attention_decode(*_qkv(), LinearState(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4)), impl="triton")


def test_decode_checks_its_state():
    q, k, v = (x[:, :, :1] for x in _qkv())
    with pytest.raises(ValueError, match="per kv head"):
        linear_attention_decode(q, k, v, LinearState(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(ValueError, match="as many new queries as new keys"):
        linear_attention_decode(q, torch.cat([k, k], 2), torch.cat([v, v], 2),
                                LinearState(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4)))


def test_masks_broadcast_like_sdpa():
    """[Tk], [1, Tk] and [B, 1, 1, Tk] key masks are accepted and mean the same thing."""
    q, k, v = _qkv()
    keep = torch.tensor([True] * 6 + [False] * 2)
    expected = linear_attention_dispatch(q, k, v, kv_lens=torch.tensor([6, 6]), impl="torch")
    for mask in (keep, keep[None], keep.expand(2, 1, 1, 8), torch.zeros(8).masked_fill(~keep, float("-inf"))):
        torch.testing.assert_close(linear_attention_dispatch(q, k, v, attn_mask=mask, impl="torch"), expected)


def test_search_space_defaults_are_valid_for_the_benchmarked_shapes():
    for space in spaces.SPACES.values():
        for d in (64, 128):
            shape = {"N": 4, "Hq": 16, "Hkv": 16, "T": 8192, "Dk": d, "Dv": d, "dtype": "bf16"}
            assert space.valid(dict(space.default), shape), f"{space.kernel}: default invalid at D={d}"
            assert space.configs(shape), f"{space.kernel}: empty search space at D={d}"


def test_workloads_cover_every_kernel_and_bucket_like_the_launchers():
    from attnrewrite.kernels.linear.triton_common import tuning_shape

    workloads = list(tune.workloads(quick=True))
    assert {w.space.kernel for w in workloads} == set(spaces.SPACES)
    launched = tuning_shape(4, 16, 16, 8192, 128, 128, torch.bfloat16)
    for w in workloads:
        assert w.space.bucket(w.shape) == w.space.bucket(launched)
    # a table written from these workloads validates against the declared spaces
    table = {"schema": 1, "kind": "linear", "device": "x", "kernels": {
        w.space.kernel: {w.space.bucket(w.shape): {"config": dict(w.space.default), "ms": 1.0}} for w in workloads}}
    assert tuning.validate_table(table, spaces.SPACES) == []


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("tq", [1, 3])
def test_causal_with_fewer_queries_is_bottom_right(impl, tq):
    """Causal with Tq < Tk: the queries are the last Tq positions, so a decoding step (or a chunk of
    prefill) against the whole cache equals the last rows of the full causal call — padding included."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g) for h in (4, 2, 2))
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., :2] = False  # left padding, as HF pads for generation
    full = linear_attention_dispatch(q, k, v, keep, is_causal=True, enable_gqa=True, impl="torch")
    step = linear_attention_dispatch(q[:, :, -tq:], k, v, keep, is_causal=True, enable_gqa=True, impl=impl)
    torch.testing.assert_close(step, full[:, :, -tq:], rtol=1e-4, atol=1e-5)


def test_bottom_right_gradients_reach_the_prefix_keys():
    q, k, v = (torch.randn(1, 2, t, 4, dtype=torch.float64, requires_grad=True) for t in (2, 5, 5))
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention_dispatch(q, k, v, is_causal=True, impl="torch"),
                                    (q, k, v))
