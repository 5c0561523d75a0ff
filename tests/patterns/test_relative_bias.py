"""Relative position biases R[h, j − i] (T5's buckets, a learned table by clamped distance) rewritten to sigmoid:
the bias reaches the op as the table R [H, Tq + Tk − 1] (``position="relative"``), recomputed from the model's own
nodes, so the model's embedding gets its gradient through R; biases that are not functions of (h, j − i) stay
additive masks, with the reason in the report.  Every model is compared with the same model written by hand
with sigmoid attention, outputs and every parameter gradient."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import transformers as T
from torch._subclasses.fake_tensor import FakeTensor

import attnrewrite
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten, record_sigmoid_calls

BIAS = -1.5
B, T_LEN, E, H = 2, 12, 32, 4
D = E // H
RELATIVE_NOTE = "proven R[h, j − i]"


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every call of the sigmoid op (what the rewritten graph passes it)."""
    return record_sigmoid_calls(monkeypatch)


# --------------------------------------------------------------------------- HF T5

def _t5_oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """T5's eager attention with sigmoid(s + position_bias + mask + BIAS) in place of the softmax (HF passes no
    mask to a registered function when causality alone masks: the decoder's self-attention then masks j > i)."""
    scores = query @ key.transpose(2, 3) * (1.0 if scaling is None else scaling)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.sigmoid(scores + BIAS)
    if attention_mask is None and module.is_causal:
        weights = weights * torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return (weights @ value).transpose(1, 2).contiguous(), weights


T.AttentionInterface.register("t5_sigmoid_oracle", _t5_oracle)
# HF's eager masks (causal and padding as additive float masks) for it, as the eager model gets them
T.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("t5_sigmoid_oracle", T.masking_utils.eager_mask)

T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, dropout_rate=0.0, initializer_factor=3.0,
          decoder_start_token_id=0, pad_token_id=0)


def _t5_pair(attn="eager"):
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration._from_config(T.T5Config(**T5), attn_implementation=attn)
    by_hand = T.T5ForConditionalGeneration._from_config(T.T5Config(**T5), attn_implementation="t5_sigmoid_oracle")
    by_hand.load_state_dict(model.state_dict())
    with torch.no_grad():  # a bias large enough that a wrong distance shows
        for m in (model, by_hand):
            for name, p in m.named_parameters():
                if "relative_attention_bias" in name:
                    p.copy_(torch.randn(p.shape, generator=_gen(name)) * 2)
    return model, by_hand


def _t5_inputs(length=T_LEN):
    ids = torch.randint(0, 64, (B, length), generator=_gen(f"ids{length}"))
    labels = torch.randint(0, 64, (B, length - 3), generator=_gen(f"labels{length}"))
    padding = torch.ones_like(ids)
    padding[1, length - 2:] = 0  # right padding in the encoder: a mask term beside the relative bias
    return {"input_ids": ids, "attention_mask": padding, "labels": labels}


@pytest.mark.parametrize("mode, attn", [("eval", "eager"), ("train", "eager"), ("train", "sdpa")])
def test_t5_relative_bias_reaches_sigmoid_as_a_table(mode, attn, op_calls):
    """eager: the bias and the masks are added to the scores one by one; sdpa: HF merges them into one mask,
    ``where(mask, position_bias, min)``, which the resolver splits into the bias and a keep-mask."""
    model, by_hand = _t5_pair(attn)
    getattr(model, mode)(), getattr(by_hand, mode)()
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    inputs = _t5_inputs()
    loss = compiled(**inputs).loss
    want = by_hand(**inputs).loss
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    # encoder and decoder self-attention (2 + 2 sites) read R; cross-attention has no bias (2 sites)
    assert len(report.sites) == 6 and all(s.status == "rewritten" for s in report.sites), report
    assert sum(any(RELATIVE_NOTE in n for n in s.notes) for s in report.sites) == 4, report
    relative = [c for c in op_calls if c.get("position") == "relative"]
    assert len(relative) == 4
    for call in relative:
        t_q, t_k = call["q"].shape[-2], call["k"].shape[-2]
        assert tuple(call["position_slopes"].shape) == (4, t_q + t_k - 1)
        assert call["attn_mask"] is None or call["attn_mask"].shape[-3] == 1, "the bias reached the op as a mask"
    if mode == "train":
        got = torch.autograd.grad(loss, list(model.parameters()))
        want_grads = torch.autograd.grad(want, list(by_hand.parameters()))
        names = [n for n, _ in model.named_parameters()]
        assert any("relative_attention_bias" in n for n in names)
        for name, g, w in zip(names, got, want_grads):
            assert_close_rel(g, w, 1e-4, name)


def test_t5_relative_bias_at_lengths_the_matcher_never_saw(op_calls):
    """Compiled with dynamic shapes at 12 tokens, run at 40 (beyond max_distance, buckets the example never
    reached) and 5: R is recomputed by the model's own nodes at every length, and equals the model's own bias."""
    model, by_hand = _t5_pair()
    model.eval(), by_hand.eval()
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, dynamic=True, to="sigmoid", strict=True, bias=BIAS)
    for length in (T_LEN, 40, 5):
        inputs = _t5_inputs(length)
        torch.testing.assert_close(compiled(**inputs).loss, by_hand(**inputs).loss, rtol=1e-5, atol=1e-5)
    assert sum(any(RELATIVE_NOTE in n for n in s.notes) for s in report.sites) >= 4, report
    assert {tuple(c["position_slopes"].shape) for c in op_calls if c.get("position") == "relative"} >= {
        (4, 79), (4, 9)}


# --------------------------------------------------------------------------- hand-written models

def _buckets(distance: torch.Tensor, buckets: int = 8, exact: int = 3, far: int = 20) -> torch.Tensor:
    """A T5-like bucketing, written another way: sign · (exact distances, then log-spaced), clamped."""
    sign_bucket = (distance > 0).long() * buckets
    magnitude = distance.abs()
    log_part = exact + (torch.log(magnitude.float().clamp(min=1) / exact) / torch.log(torch.tensor(far / exact))
                        * (buckets - exact)).long()
    return sign_bucket + torch.where(magnitude < exact, magnitude, torch.clamp(log_part, max=buckets - 1))


class Attention(nn.Module):
    """Self-attention with a relative bias; ``form="sigmoid"``: the same model with sigmoid written by hand."""

    def __init__(self, bias: str, form: str = "softmax", causal: bool = False):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.bias, self.form, self.causal = bias, form, causal
        self.K = 4
        if bias == "bucketed":
            self.table = nn.Embedding(16, H)
        elif bias == "clamped":  # a learned table indexed by the clamped distance
            self.table = nn.Parameter(torch.randn(2 * self.K + 1, H))
        elif bias == "dense_parameter":
            self.table = nn.Parameter(torch.randn(H, T_LEN, T_LEN))
        elif bias == "plus_a_dense_parameter":  # a relative bias plus an [H, T, T] parameter that starts at 0:
            self.table = nn.Embedding(16, H)   # R[h, j − i] at the example's values, not after training
            self.dense = nn.Parameter(torch.zeros(H, T_LEN, T_LEN))
        else:
            self.table = nn.Embedding(16, H)
        with torch.no_grad():
            weight = self.table.weight if isinstance(self.table, nn.Embedding) else self.table
            weight.normal_(0, 2, generator=_gen(bias))

    def relative(self, x, offset):
        t = x.shape[1]
        context, memory = torch.arange(t)[:, None], torch.arange(t)[None, :]
        if self.bias == "bucketed":
            return self.table(_buckets(memory - context)).permute(2, 0, 1)[None]  # [1, H, T, T]
        if self.bias == "clamped":
            return self.table[(memory - context).clamp(-self.K, self.K) + self.K].permute(2, 0, 1)
        if self.bias == "dense_parameter":
            return self.table
        if self.bias == "plus_a_dense_parameter":
            return (self.table(_buckets(memory - context)) + self.dense.permute(1, 2, 0)).permute(2, 0, 1)[None]
        if self.bias == "reads_batch":  # the bias scaled by a number computed from the batch
            return self.table(_buckets(memory - context)).permute(2, 0, 1)[None] * x.mean().sigmoid()
        if self.bias == "tensor_offset":  # queries counted from a position that is an input tensor
            return self.table(_buckets(memory - (context + offset)).clamp(0, 15)).permute(2, 0, 1)[None]
        raise AssertionError(self.bias)

    def forward(self, x, offset):
        q, k, v = self.qkv(x).view(B, -1, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * D**-0.5 + self.relative(x, offset)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if self.form == "softmax":
            p = torch.softmax(s.masked_fill(~causal, float("-inf")) if self.causal else s, dim=-1)
        else:
            p = torch.sigmoid(s + BIAS)
            p = p.masked_fill(~causal, 0.0) if self.causal else p
        return self.out((p @ v).transpose(1, 2).reshape(B, t, E))


class Model(nn.Module):
    def __init__(self, bias, form="softmax", causal=False):
        super().__init__()
        self.layers = nn.ModuleList(Attention(bias, form, causal) for _ in range(2))

    def forward(self, x, offset):
        for layer in self.layers:
            x = x + layer(x, offset)
        return x


def _pair(bias, causal=False):
    torch.manual_seed(zlib.crc32(bias.encode()))
    model = Model(bias, causal=causal)
    by_hand = Model(bias, form="sigmoid", causal=causal)
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


def _inputs(name):
    return torch.randn(B, T_LEN, E, generator=_gen(name)), torch.tensor(2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["bucketed", "clamped"])
def test_hand_written_relative_bias_reaches_sigmoid_as_a_table(bias, causal, op_calls):
    model, by_hand = _pair(bias, causal)
    x, offset = _inputs(bias)
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    got = compiled(x, offset)
    want = by_hand(x, offset)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(report.sites) == 2 and all(any(RELATIVE_NOTE in n for n in s.notes) for s in report.sites), report
    assert len(op_calls) == 2
    for call in op_calls:
        assert call["position"] == "relative" and call["attn_mask"] is None
        assert tuple(call["position_slopes"].shape) == (H, 2 * T_LEN - 1)
    grads = torch.autograd.grad(compiled(x, offset).square().sum(), list(model.parameters()))
    wants = torch.autograd.grad(by_hand(x, offset).square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), grads, wants):
        assert_close_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("bias, why", [
    ("reads_batch", "reads the model's inputs"),
    ("dense_parameter", "not computed from positions"),
    ("tensor_offset", "reads the model's inputs"),
    ("plus_a_dense_parameter", "which is not a function of the distance"),
])
def test_a_bias_that_is_not_relative_stays_a_mask(bias, why, op_calls):
    model, by_hand = _pair(bias)
    x, offset = _inputs(bias)
    report = attnrewrite.explain(model, x, offset, to="sigmoid", options={"strict": True, "bias": BIAS})
    assert len(report.sites) == 2, report
    for site in report.sites:
        assert not any(RELATIVE_NOTE in n for n in site.notes), site.notes
        assert any("stays a mask" in n and why in n for n in site.notes), site.notes
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)(x, offset)
    torch.testing.assert_close(got, by_hand(x, offset), rtol=1e-5, atol=1e-5)
    for call in op_calls:
        assert call.get("position") is None and call["attn_mask"] is not None


def test_softmax_keeps_the_relative_bias_exact():
    """The exact kind runs SDPA, which reads a mask: the bias stays the model's own term, and the output is exact."""
    model, _ = _pair("bucketed")
    x, offset = _inputs("softmax")
    report = Report(to="softmax")
    got = compile_rewritten(model, report, to="softmax", strict=True)(x, offset)
    assert all(s.status == "rewritten" and not any(RELATIVE_NOTE in n for n in s.notes) for s in report.sites)
    torch.testing.assert_close(got, model(x, offset), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_over_the_whole_sequence_is_the_model_itself(causal, monkeypatch):
    """sliding_window reads R on its band: with a window as long as the sequence the rewritten model is the
    original softmax model, outputs and every gradient (the table's included)."""
    import attnrewrite.kernels.sliding_window.public as window_public

    seen = []
    check = window_public.check_position_slopes

    def record(slopes, position, q, *args, **kwargs):
        if not isinstance(q, FakeTensor):
            seen.append(position)
        return check(slopes, position, q, *args, **kwargs)

    monkeypatch.setattr(window_public, "check_position_slopes", record)
    model, _ = _pair("bucketed", causal)
    x, offset = _inputs(f"window{causal}")
    report = Report(to="sliding_window")
    compiled = compile_rewritten(model, report, to="sliding_window", strict=True, window=T_LEN,
                                 bidirectional="symmetric")
    got = compiled(x, offset)
    torch.testing.assert_close(got, model(x, offset), rtol=1e-5, atol=1e-5)
    assert seen == ["relative", "relative"]
    assert all(any(RELATIVE_NOTE in n for n in s.notes) for s in report.sites), report
    grads = torch.autograd.grad(compiled(x, offset).square().sum(), list(model.parameters()))
    wants = torch.autograd.grad(model(x, offset).square().sum(), list(model.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), grads, wants):
        assert_close_rel(g, w, 1e-4, name)


@pytest.mark.parametrize("causal, window, sinks, length", [(True, 4, 1, 40), (False, 3, 0, 40), (True, 5, 2, 9)])
def test_sliding_window_op_reads_the_table_on_its_band(causal, window, sinks, length):
    """The op with R (position="relative") against the op with R written out as a [1, H, T, T] float mask (the
    blockwise path at 40 tokens, the dense one at 9): output and dq, dk, dv, dR."""
    from attnrewrite.ops import sliding_window_attention

    g = _gen(f"op{causal}{window}{sinks}{length}")
    q, k, v = (torch.randn(2, H, length, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    table = (torch.randn(H, 2 * length - 1, generator=g, dtype=torch.float64) * 2).requires_grad_()
    index = torch.arange(length).view(1, -1) - torch.arange(length).view(-1, 1) + (length - 1)
    got = sliding_window_attention(q, k, v, is_causal=causal, window=window, sinks=sinks, position_slopes=table,
                                   position="relative")
    want = sliding_window_attention(q, k, v, table[:, index].unsqueeze(0), is_causal=causal, window=window,
                                    sinks=sinks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for name, a, b in zip("q k v table".split(), torch.autograd.grad(got, (q, k, v, table), grad),
                          torch.autograd.grad(want, (q, k, v, table), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")
