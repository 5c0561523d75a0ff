"""The compiled CPU loop of the sigmoid torch path (kernels/sigmoid/native.py): the elementwise pass against
torch's sigmoid in float64, and the whole forward and backward against the float64 oracle, outputs and
gradients by name, with tiles small enough that every case crosses chunk and key-block edges."""

import shutil

import pytest
import torch

from attnrewrite.kernels.sigmoid import chunked, native, sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the torch path keeps ATen's ops")


@pytest.fixture
def one_thread(one_thread, monkeypatch):
    """conftest's one thread (where the compiled loop runs), with small tiles so every case crosses their edges."""
    monkeypatch.setattr(chunked, "NATIVE_ROWS", 6)
    monkeypatch.setattr(chunked, "NATIVE_BLOCK", 8)


def test_the_elementwise_pass_is_sigmoid_to_float32_rounding_with_exact_zeros():
    assert native.library() is not None, "a C compiler is on the PATH, so the kernel must build"
    g = torch.Generator().manual_seed(3)
    rows, cols = 7, 45
    scores = torch.randn(rows, cols, generator=g) * 30
    scores[0, :6] = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e30, 1e30, 0.0])
    bias = torch.randn(rows, generator=g) * 5
    limit = torch.tensor([45, 40, 0, 17, 100, -3, 44])
    key_start, scale = 3, 0.37
    # the kernel rounds scale * s + b once (a fused multiply-add with scale in float32): compare from there
    scale32 = torch.tensor(scale, dtype=torch.float32).double()
    want = torch.sigmoid((scores.double() * scale32 + bias.double()[:, None]).float().double())
    visible = torch.arange(cols)[None, :] + key_start < limit[:, None]
    got = native.sigmoid_tile_(scores.clone(), bias, limit, key_start, scale)
    assert torch.equal(got[~visible], torch.zeros_like(got[~visible]))
    assert torch.isnan(got[0, 2]) and got[0, 0] == 0 and got[0, 3] == 0 and got[0, 1] == 1
    finite = visible & ~torch.isnan(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=5e-7, atol=1e-37)
    all_keys = native.sigmoid_tile_(scores.clone(), bias, None, key_start, scale)
    torch.testing.assert_close(all_keys[~torch.isnan(want)].double(), want[~torch.isnan(want)], rtol=5e-7, atol=1e-37)


CASES = {
    "causal_gqa": dict(shape=(2, 4, 2, 23, 23), kwargs=dict(is_causal=True)),
    "bottom_right_kv_lens": dict(shape=(3, 2, 1, 13, 29),
                                 kwargs=dict(is_causal=True, causal_align="bottom_right", kv_lens=[29, 9, 0])),
    "more_queries_than_keys": dict(shape=(1, 3, 1, 21, 11), kwargs=dict(is_causal=True, causal_align="bottom_right")),
    "not_causal_kv_lens_gqa": dict(shape=(2, 6, 2, 17, 26), kwargs=dict(kv_lens=[26, 5])),
    "not_causal_float_bias": dict(shape=(1, 2, 2, 9, 30), kwargs=dict(bias=-1.5)),
}


def _count_loop_calls(monkeypatch) -> list[str]:
    """Names of the compiled loop's entry points, appended as the test's calls reach them."""
    calls = []
    for fn in ("sigmoid_forward", "sigmoid_backward"):
        original = getattr(native, fn)
        monkeypatch.setattr(native, fn, lambda *a, _f=original, _n=fn, **kw: calls.append(_n) or _f(*a, **kw))
    return calls


def _inputs(shape, g):
    """q, k (head width 8), v (5) needing gradients and the output's gradient, for (B, Hq, Hkv, Tq, Tk)."""
    batch, heads_q, heads_kv, len_q, len_k = shape
    q = torch.randn(batch, heads_q, len_q, 8, generator=g, requires_grad=True)
    k = torch.randn(batch, heads_kv, len_k, 8, generator=g, requires_grad=True)
    v = torch.randn(batch, heads_kv, len_k, 5, generator=g, requires_grad=True)
    return q, k, v, torch.randn(batch, heads_q, len_q, 5, generator=g)


def _case(cases, name, monkeypatch):
    """What a case of ``cases`` starts from: (the compiled loop's calls, as they come; the case; its generator,
    seeded by the name; q, k, v and the output's gradient from it; the op's keyword arguments, with kv_lens
    as a tensor; enable_gqa)."""
    calls = _count_loop_calls(monkeypatch)
    case = cases[name]
    g = torch.Generator().manual_seed(len(name))
    q, k, v, grad = _inputs(case["shape"], g)
    kwargs = dict(case["kwargs"])
    if "kv_lens" in kwargs:
        kwargs["kv_lens"] = torch.tensor(kwargs["kv_lens"])
    heads_q, heads_kv = case["shape"][1:3]
    return calls, case, g, (q, k, v, grad), kwargs, heads_q != heads_kv


@pytest.mark.parametrize("name", list(CASES))
def test_the_compiled_loop_equals_the_oracle(name, one_thread, monkeypatch):
    calls, _, _, (q, k, v, grad), kwargs, gqa = _case(CASES, name, monkeypatch)
    got = sigmoid_attention_dispatch(q, k, v, enable_gqa=gqa, impl="torch", **kwargs)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    assert calls == ["sigmoid_forward", "sigmoid_backward"], "the compiled loop was not used"
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = naive_sigmoid_attention(*inputs, **kwargs)
    want_grads = torch.autograd.grad(want, inputs, grad.double())
    for label, a, b in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
        assert a.dtype == torch.float32 and a.is_contiguous()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"{name}: {label}")


def test_switched_off_it_falls_back_to_the_aten_ops(one_thread, monkeypatch):
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")
    monkeypatch.setattr(native, "sigmoid_forward", None)  # would raise if called
    monkeypatch.setattr(native, "sigmoid_tile_", None)
    q, k, v = (torch.randn(1, 2, 19, 4) for _ in range(3))
    out = sigmoid_attention_dispatch(q, k, v, is_causal=True, impl="torch")
    torch.testing.assert_close(out.double(), naive_sigmoid_attention(q.double(), k.double(), v.double(), is_causal=True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("len_q,len_k", [(0, 5), (5, 0)])
def test_empty_sides_give_zeros(len_q, len_k, one_thread):
    q = torch.randn(1, 4, len_q, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, len_k, 8, requires_grad=True) for _ in range(2))
    out = sigmoid_attention_dispatch(q, k, v, enable_gqa=True, impl="torch")
    assert out.shape == (1, 4, len_q, 8) and not out.any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and not dq.any() and not dk.any() and not dv.any()


# Per-key masks [B|1, 1, 1, Tk] as HF encoders write them: 0 for a real key, the dtype's lowest value (or -inf)
# for padding; the compiled loop takes them whole (and never reads the trailing padding).
LOWEST = torch.finfo(torch.float32).min
KEY_MASKS = {
    "hf_right_padding_gqa": dict(shape=(3, 4, 2, 19, 19), real=[19, 11, 0], fill=LOWEST, kwargs={}),
    "neginf_left_padding": dict(shape=(2, 2, 2, 17, 17), real=[-5, -17], fill=float("-inf"), kwargs={}),
    "holes_and_bias_values": dict(shape=(2, 3, 1, 9, 26), real=None, fill=LOWEST, kwargs={}),
    "bool_padding_causal": dict(shape=(2, 2, 1, 21, 21), real=[21, 8], fill=None, kwargs=dict(is_causal=True)),
    "one_mask_for_the_batch_float_bias": dict(shape=(3, 2, 2, 11, 23), real=[14], fill=LOWEST,
                                               kwargs=dict(bias=-2.0)),
    "with_kv_lens": dict(shape=(2, 2, 2, 13, 24), real=[20, 24], fill=LOWEST, kwargs=dict(kv_lens=[24, 6])),
}


def _key_mask(case, g):
    """The case's mask [Bm, 1, 1, Tk]: ``real`` keys per batch row (negative: the last ones, left padding), None:
    random holes and small finite biases; ``fill`` the padding value, None for a bool mask."""
    batch, _, _, _, len_k = case["shape"]
    keys = torch.arange(len_k)
    if case["real"] is None:
        keep = torch.rand(batch, len_k, generator=g) < 0.6
        values = 0.5 * torch.randn(batch, len_k, generator=g)
    else:
        keep = torch.stack([keys < n if n >= 0 else keys >= len_k + n for n in case["real"]])
        values = torch.zeros(keep.shape)
    if case["fill"] is None:
        return keep.view(-1, 1, 1, len_k)
    return values.masked_fill(~keep, case["fill"]).view(-1, 1, 1, len_k)


@pytest.mark.parametrize("name", list(KEY_MASKS))
def test_per_key_masks_run_in_the_compiled_loop_and_equal_the_oracle(name, one_thread, monkeypatch):
    calls, case, g, (q, k, v, grad), kwargs, gqa = _case(KEY_MASKS, name, monkeypatch)
    mask = _key_mask(case, g)
    got = sigmoid_attention_dispatch(q, k, v, mask, enable_gqa=gqa, impl="torch", **kwargs)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    assert calls == ["sigmoid_forward", "sigmoid_backward"], "the compiled loop was not used"
    # the oracle in float64: the float32 lowest value is float64's -inf (both hide the key, uncounted)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = mask if mask.dtype == torch.bool else mask.double().masked_fill(mask == LOWEST, float("-inf"))
    want = naive_sigmoid_attention(*inputs, mask64, **kwargs)
    want_grads = torch.autograd.grad(want, inputs, grad.double())
    # and the loop of ATen ops, which takes the same call tile by tile in Python
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")
    plain_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    plain = sigmoid_attention_dispatch(*plain_inputs, mask, enable_gqa=gqa, impl="torch", **kwargs)
    plain_grads = torch.autograd.grad(plain, plain_inputs, grad)
    for label, a, b, c in zip(("out", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads),
                              (plain, *plain_grads)):
        assert a.dtype == torch.float32 and a.is_contiguous()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"{name}: {label} against the oracle")
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=f"{name}: {label} against the ATen loop")
    if case["real"] is not None and 0 in case["real"]:  # a row that sees no key: 0, and no gradient from it
        row = case["real"].index(0)
        assert not got[row].any() and not got_grads[0][row].any()


def test_masks_the_loop_cannot_take_keep_the_tile_path(one_thread, monkeypatch):
    """A mask that varies along the queries runs the Python loop of tiles; so does the backward of a per-key mask
    that needs a gradient (the loop computes none for it), whose forward the compiled loop still runs."""
    calls = []
    for fn in ("sigmoid_forward", "sigmoid_backward"):
        original = getattr(native, fn)
        monkeypatch.setattr(native, fn, lambda *a, _f=original, _n=fn, **kw: calls.append(_n) or _f(*a, **kw))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, requires_grad=True) for _ in range(3))
    per_query = torch.randn(2, 1, 9, 9, generator=g)
    out = sigmoid_attention_dispatch(q, k, v, per_query, impl="torch")
    torch.testing.assert_close(out.double(), naive_sigmoid_attention(q.double(), k.double(), v.double(),
                                                                     per_query.double()), rtol=1e-5, atol=1e-5)
    assert calls == []
    learned = (0.5 * torch.randn(2, 1, 1, 9, generator=g)).requires_grad_()
    out = sigmoid_attention_dispatch(q, k, v, learned, impl="torch")
    grads = torch.autograd.grad(out, (q, learned), torch.ones_like(out))
    assert calls == ["sigmoid_forward"]
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, learned)]
    want = naive_sigmoid_attention(*inputs)
    want_grads = torch.autograd.grad(want, (inputs[0], inputs[3]), torch.ones_like(want))
    for label, a, b in zip(("out", "dq", "dmask"), (out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=label)
