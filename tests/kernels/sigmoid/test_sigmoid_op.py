"""The torch.library ops (opcheck, compile), the entry point's choice of path, and its errors."""

import pytest
import torch

from attnrewrite.kernels.sigmoid import op, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention

FWD = torch.ops.attnrewrite.sigmoid_attention_fwd_interpreted.default
BWD = torch.ops.attnrewrite.sigmoid_attention_bwd_interpreted.default


def _inputs(g, batch=1, heads_q=2, heads_kv=1, len_q=9, len_k=11, dim=16, grad=True):
    q = torch.randn(batch, heads_q, len_q, dim, generator=g, requires_grad=grad)
    k = torch.randn(batch, heads_kv, len_k, dim, generator=g, requires_grad=grad)
    v = torch.randn(batch, heads_kv, len_k, dim, generator=g, requires_grad=grad)
    bias = torch.full((batch, heads_q), -2.0)
    return q, k, v, bias


def test_opcheck_forward_and_backward_ops():
    g = torch.Generator().manual_seed(0)
    q, k, v, bias = _inputs(g)
    mask = torch.randn(1, 2, 9, 11, generator=g, requires_grad=True)
    kv_lens = torch.tensor([7], dtype=torch.int32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
    samples = [
        (q, k, v, None, bias, None, None, None, 0.25, 0),
        (q, k, v, mask, bias, kv_lens, None, None, 0.25, 2),
        (q, k, v, None, torch.full((2, 2), -1.0), None, *cu, 0.25, 1),
    ]
    for args in samples:
        torch.library.opcheck(FWD, args)
    grad = torch.randn(1, 2, 9, 16, generator=g)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in samples[1]]
    torch.library.opcheck(BWD, (*detached[:3], grad, *detached[3:], True))
    torch.library.opcheck(BWD, (*detached[:3], grad, *detached[3:], False))


def test_compiles_with_the_interpreted_op_and_the_torch_path():
    g = torch.Generator().manual_seed(1)
    q, k, v, _ = _inputs(g, grad=False)
    for impl in ("triton", "torch"):
        fn = torch.compile(lambda q, k, v: sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl=impl),
                           backend="aot_eager", fullgraph=True)
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(q_, k_, v_)
        out.sum().backward()
        expected = naive_sigmoid_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, expected)
        assert q_.grad is not None and k_.grad is not None and v_.grad is not None


def test_auto_runs_the_torch_path_off_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(op, "sigmoid_attention_triton", lambda *a: calls.append(a))
    q, k, v, _ = _inputs(torch.Generator().manual_seed(2), grad=False)
    sigmoid_attention_dispatch(q, k, v, enable_gqa=True)
    assert calls == []


def test_triton_on_cpu_without_the_interpreter_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(op, "interpreter_active", lambda: False)
    q, k, v, _ = _inputs(torch.Generator().manual_seed(3), grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sigmoid_attention_dispatch(q, k, v, enable_gqa=True, impl="triton")


def _call(**changes):
    g = torch.Generator().manual_seed(4)
    args = dict(q=torch.randn(2, 4, 8, 16, generator=g), k=torch.randn(2, 2, 10, 16, generator=g),
                v=torch.randn(2, 2, 10, 16, generator=g), enable_gqa=True)
    args.update(changes)
    return sigmoid_attention_dispatch(**args)


BAD_INPUTS = {
    "q rank": (dict(q=torch.randn(4, 8, 16)), ValueError, "q must be 4-d"),
    "dtypes differ": (dict(k=torch.randn(2, 2, 10, 16).half()), ValueError, "share a dtype"),
    "integer dtype": (dict(q=torch.ones(2, 4, 8, 16, dtype=torch.int32), k=torch.ones(2, 2, 10, 16, dtype=torch.int32),
                           v=torch.ones(2, 2, 10, 16, dtype=torch.int32)), TypeError, "must be floating point"),
    "batch differs": (dict(k=torch.randn(3, 2, 10, 16)), ValueError, "batch sizes differ"),
    "heads not a multiple": (dict(q=torch.randn(2, 3, 8, 16)), ValueError, "multiple of key/value heads"),
    "gqa not enabled": (dict(enable_gqa=False), ValueError, "enable_gqa=True"),
    "head dims differ": (dict(k=torch.randn(2, 2, 10, 8)), ValueError, "head dims differ"),
    "v length differs": (dict(v=torch.randn(2, 2, 9, 16)), ValueError, "agree on heads and number of keys"),
    "mask does not broadcast": (dict(attn_mask=torch.zeros(2, 4, 8, 9)), ValueError, "does not broadcast"),
    "mask dtype": (dict(attn_mask=torch.zeros(8, 10, dtype=torch.int64)), TypeError, "bool or floating"),
    "kv_lens shape": (dict(kv_lens=torch.tensor([3])), ValueError, r"kv_lens must be \[B\]"),
    "kv_lens dtype": (dict(kv_lens=torch.tensor([3.0, 4.0])), TypeError, "integer tensor"),
    "cu_seqlens alone": (dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "together"),
    "cu_seqlens int64": (dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 10, 16), v=torch.randn(1, 2, 10, 16),
                              cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 10])),
                         TypeError, "int32"),
    "cu_seqlens with batch 2": (dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32),
                                     cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "batch 1"),
    "causal_align": (dict(is_causal=True, causal_align="center"), ValueError, "causal_align"),
    "impl": (dict(impl="cuda"), ValueError, "impl must be 'auto', 'triton' or 'torch'"),
    "dropout range": (dict(dropout_p=1.5), ValueError, "dropout_p"),
    "bias": (dict(bias="none"), ValueError, "bias must be"),
    "dropout on triton": (dict(dropout_p=0.1, impl="triton"), ValueError, "do not implement dropout"),
    "float64 on triton": (dict(q=torch.randn(2, 4, 8, 16).double(), k=torch.randn(2, 2, 10, 16).double(),
                               v=torch.randn(2, 2, 10, 16).double(), impl="triton"), ValueError, "float64"),
    "head dim on triton": (dict(q=torch.randn(1, 2, 4, 320), k=torch.randn(1, 2, 4, 320), v=torch.randn(1, 2, 4, 320),
                                impl="triton"), ValueError, "head dims up to 256"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(name):
    changes, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message):
        _call(**changes)
