"""attnrewrite::sliding_window_attention against its plain-torch reference (outputs and gradients by name,
causal and symmetric, sinks, masks, GQA, decode-shaped Tq < Tk, several blocks), its memory (no [T, T]
tensor), dropout and errors (opcheck: tests/kernels/test_opcheck_every_op.py); the llama target rewritten
equals a hand-written sliding-window llama; a Mistral site that already has a narrower window keeps it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnrewrite import ops
from attnrewrite.kernels.sliding_window.public import blockwise_sliding_window
from attnrewrite.kernels.sliding_window.reference import (
    naive_sliding_window_attention,
    window_visible,
)
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import (
    assert_close_rel,
    assert_gradients_close,
    assert_same_function,
    compile_rewritten,
)
from attnrewrite.testing.numerics import assert_within_budget


def _qkv(b=2, hq=4, hkv=2, tq=21, tk=21, d=8, dv=6, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return make(b, hq, tq, d), make(b, hkv, tk, d), make(b, hkv, tk, dv)


def _mask(name, b=2, hq=4, tq=21, tk=21):
    g = torch.Generator().manual_seed(1)
    if name == "padding":
        keep = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        keep[1, ..., tk - 5:] = False
        return keep
    if name == "bias":  # per head and query, differentiable
        return torch.randn(1, hq, tq, tk, generator=g, dtype=torch.float64).requires_grad_()
    if name == "bool":
        return torch.rand(b, 1, tq, tk, generator=g) > 0.3
    return None


CASES = [  # (causal, window, sinks, tq)
    (True, 4, 0, 21), (True, 1, 0, 21), (True, 3, 2, 21), (True, 40, 0, 21), (True, 5, 3, 6), (True, 4, 1, 1),
    (False, 4, 0, 21), (False, 3, 2, 21), (False, 40, 1, 21),
]


@pytest.mark.parametrize("mask", ["none", "padding", "bias", "bool"])
@pytest.mark.parametrize("causal,window,sinks,tq", CASES)
@pytest.mark.parametrize("block", [None, 4])
def test_fp64_outputs_and_gradients_equal_the_reference(mask, causal, window, sinks, tq, block):
    q, k, v = _qkv(tq=tq, grad=True)
    attn_mask = _mask(mask, tq=tq)
    got = blockwise_sliding_window(q, k, v, attn_mask, 0.0, causal, None, window, sinks, block) if block else \
        ops.sliding_window_attention(q, k, v, attn_mask, is_causal=causal, enable_gqa=True, window=window, sinks=sinks)
    want = naive_sliding_window_attention(q, k, v, attn_mask, causal, None, window, sinks)
    leaves = {"q": q, "k": k, "v": v} | ({"attn_mask": attn_mask} if mask == "bias" else {})
    assert_same_function(got, want, leaves, nonzero_grads=False)  # (a window of one key: no gradient for q, k)


def test_the_reference_window_is_the_issues_definition():
    visible = window_visible(6, 6, window=2, sinks=1, is_causal=True)
    assert visible[4].tolist() == [True, False, False, True, True, False]   # 4 − 2 < j ≤ 4, or j < 1
    visible = window_visible(2, 6, window=2, sinks=0, is_causal=True)        # decode: queries at 4 and 5
    assert visible.tolist() == [[False] * 3 + [True, True, False], [False] * 4 + [True, True]]
    visible = window_visible(6, 6, window=2, sinks=1, is_causal=False)
    assert visible[2].tolist() == [True, True, True, True, False, False]    # |2 − j| < 2, or j < 1


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_linear_in_the_sequence():
    """No tensor of the forward or backward grows like T²: at T = 2048, window 16, the largest holds
    B·H·T·(block + window + sinks) elements, not B·H·T²."""
    t, window, sinks = 2048, 16, 2
    q, k, v = (torch.randn(1, 2, t, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(1, 1, 1, t, dtype=torch.bool)
    with _LargestTensor() as mode:
        out = ops.sliding_window_attention(q, k, v, keep, window=window, sinks=sinks)
        out.sum().backward()
    assert mode.largest <= 2 * t * (16 + window + sinks), mode.largest   # block = 16 rows here
    assert mode.largest < 2 * t * t // 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_budget(dtype):
    q, k, v = _qkv()
    keep = _mask("padding")
    exact = naive_sliding_window_attention(q, k, v, keep, True, None, 5, 1)
    low = [t.to(dtype) for t in (q, k, v)]
    got = ops.sliding_window_attention(*low, keep, enable_gqa=True, window=5, sinks=1)
    assert got.dtype == dtype
    assert_within_budget(got, naive_sliding_window_attention(*low, keep, True, None, 5, 1), exact, dtype, "out")


def test_dropout_drops_and_rescales_like_sdpa():
    """With v the identity (Dv = Tk) the output is the probability matrix after dropout: each visible entry is
    0 or the probability / (1 − p), about a fraction p of them 0, and masked entries stay 0."""
    t, p = 40, 0.3
    q, k, _ = (x.float() for x in _qkv(b=1, hq=2, hkv=2, tq=t, tk=t))
    eye = torch.eye(t).expand(1, 2, t, t)
    plain = ops.sliding_window_attention(q, k, eye, window=8, sinks=1)
    dropped = ops.sliding_window_attention(q, k, eye, dropout_p=p, window=8, sinks=1)
    visible = plain > 0
    assert torch.equal(visible, window_visible(t, t, 8, 1, True).expand_as(visible))
    kept = dropped[visible] != 0
    torch.testing.assert_close(dropped[visible][kept], plain[visible][kept] / (1 - p))
    assert not dropped[~visible].any()
    assert abs(1 - float(kept.float().mean()) - p) < 0.08, float(kept.float().mean())


def test_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.sliding_window_attention(q, k, v, enable_gqa=True, window=0)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        ops.sliding_window_attention(q, k, v, enable_gqa=True, sinks=-1)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.sliding_window_attention(q, k, v, torch.ones(3, 1, 1, 21, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
        ops.sliding_window_attention(q, k, v, torch.ones(1, 1, 1, 21, dtype=torch.long), enable_gqa=True)


# --------------------------------------------------------------------------- the rewrite


def _sliding_attend(window, sinks):
    """Sliding-window attention written out by hand, for the llama target's layers."""
    from attnrewrite.testing.targets import repeat_kv

    def attend(q, k, v, mask):
        k, v = repeat_kv(q, k, v)
        t = q.shape[2]
        i, j = torch.arange(t).view(t, 1), torch.arange(t).view(1, t)
        visible = ((j <= i) & (j > i - window)) | ((j < sinks) & (j <= i))
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ v

    return attend


def test_llama_target_rewritten_equals_hand_written_sliding_window_llama():
    from attnrewrite.targets import llama
    from attnrewrite.testing.targets import hand_written_llama

    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny").eval()
    oracle = hand_written_llama(model, _sliding_attend(window=3, sinks=1))
    tokens = torch.randint(0, oracle.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    report = Report()
    got, want = compile_rewritten(model, report, to="sliding_window", window=3, sinks=1)(tokens), oracle(tokens)
    assert len(report.rewritten) == 2, report
    assert (want - model(tokens)).abs().max() > 1e-3
    assert_close_rel(got, want, 1e-5, "logits")
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()))
    assert_gradients_close([n for n, _ in model.named_parameters()], grads, want_grads, 1e-4)


def _mistral(sliding_window):
    from attnrewrite.testing import zoo

    torch.manual_seed(0)
    model = zoo._hf("MistralModel", "MistralConfig", "eager", num_key_value_heads=2, sliding_window=sliding_window,
                    **zoo._TEXT)
    return model, zoo._text(torch.Generator().manual_seed(0))


def test_a_site_with_its_own_narrower_window_keeps_it():
    """Mistral's own window is 4 (of 8 tokens).  Rewritten with window 6, the site keeps its 4: the model
    is unchanged.  Rewritten with window 2, the smaller is ours: the model equals Mistral with window 2."""
    model, inputs = _mistral(4)
    narrow, _ = _mistral(2)
    narrow.load_state_dict(model.state_dict())
    with torch.no_grad():
        original, want_narrow = model(**inputs).last_hidden_state, narrow(**inputs).last_hidden_state
    assert (original - want_narrow).abs().max() > 1e-3
    for window, want in ((6, original), (2, want_narrow)):
        report = Report()
        with torch.no_grad():
            got = compile_rewritten(model, report, to="sliding_window", window=window)(**inputs).last_hidden_state
        assert len(report.rewritten) == 2, report
        # the padded tail's queries see no key in a window of 2: rows without meaning, left out
        valid = inputs["attention_mask"].bool()
        assert_close_rel(got[valid], want[valid], 1e-5, f"window {window}")
        torch._dynamo.reset()


def test_bidirectional_sites_are_skipped_on_request_with_the_reason():
    from attnrewrite.testing.targets import build

    model, inputs, _ = build("bert")
    report = Report()
    compile_rewritten(model.eval(), report, to="sliding_window", window=4, bidirectional="skip")(**inputs)
    sites = report.attention_sites()
    assert sites and all(s.status == "skipped" and "sliding_window" in s.reason and "bidirectional" in s.reason
                         for s in sites), report


def test_bert_target_rewritten_equals_hand_written_symmetric_window_bert():
    """An encoder gets the symmetric window |i − j| < window, combined with its padding bias."""
    import math

    from attnrewrite.targets import bert
    from attnrewrite.testing.targets import build

    class WindowedSelfAttention(bert.SelfAttention):
        def forward(self, x, mask_bias):
            B, T, C = x.shape
            q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                       for proj in (self.query, self.key, self.value))
            i = torch.arange(T)
            near = (i[None, :] - i[:, None]).abs() < 3
            scores = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias).masked_fill(~near, float("-inf"))
            return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))

    model, inputs, _ = build("bert")
    oracle, _, _ = build("bert")
    model, oracle = model.eval(), oracle.eval()
    for layer in oracle.layers:
        original = layer.attention
        layer.attention = WindowedSelfAttention(oracle.config)
        layer.attention.load_state_dict(original.state_dict())
    report = Report()
    with torch.no_grad():
        got = compile_rewritten(model, report, to="sliding_window", window=3)(**inputs)
        want, exact = oracle(**inputs), model(**inputs)
    assert len(report.rewritten) == 2, report
    valid = inputs["attention_mask"].bool()  # the padded tail sees only padding within 3 tokens
    assert (want[valid] - exact[valid]).abs().max() > 1e-3
    assert_close_rel(got[valid], want[valid], 1e-5, "hidden states")
