"""Relative position biases R[h, j − i] in causal models rewritten to ``hashed`` (and not to ``summary``).

hashed reads R per selected key (``position="relative"``, the table R [H, Tq + Tk − 1] recomputed from the model's
own nodes), where it used to skip such a site ("a mask that differs across heads"): a hand-written causal model with
a bucketed bias and grouped-query heads, and HF T5's decoder self-attention, are compared — outputs and every
parameter gradient, the bias table's included — with the same model running the hashed reference
(:func:`attnrewrite.kernels.hashed.reference.naive_hashed_attention`) on the model's own dense [1, H, T, T] bias.
A ``HashedLayer`` decoding step, whose selected keys' positions the model reads to gather its own bias, gives the
whole-sequence op's last row.  ``summary`` keeps skipping such sites: a chunk summary has no single position."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import transformers as T

import attnrewrite
import attnrewrite.kernels.hashed.op as hashed_op
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T_LEN, E, H, HKV = 2, 12, 32, 4, 2
D = E // H
OPTIONS = dict(bits=16, top_k=2, window=2, sinks=1)
RELATIVE_NOTE = "proven R[h, j − i]"


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


@pytest.fixture
def tables(monkeypatch):
    """The relative tables the hashed op's torch path received at run time (None for a call without one)."""
    seen = []
    forward = hashed_op.hashed_attention_forward

    def recording(*args, **kwargs):
        relative = args[14] if len(args) > 14 else kwargs.get("relative")
        seen.append(None if relative is None else tuple(relative.shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(hashed_op, "hashed_attention_forward", recording)
    return seen


def _hashed_reference(q, k, v, bias, mask=None, scale=None):
    """The hashed reference with the model's own dense bias [1, H, Tq, Tk] per head (the op's options)."""
    plane = random_hyperplanes(q.shape[-1], OPTIONS["bits"], 0)
    options = {name: OPTIONS[name] for name in ("top_k", "window", "sinks")}
    return naive_hashed_attention(q, k, v, mask, is_causal=True, scale=scale, proj_q=plane, proj_k=plane,
                                  head_bias=bias, **options)[0]


# --------------------------------------------------------------------------- a hand-written causal model

def _buckets(distance: torch.Tensor, buckets: int = 8, exact: int = 3, far: int = 20) -> torch.Tensor:
    """T5's decoder bucketing, written by hand: only j ≤ i counts (j − i > 0 falls in bucket 0), log-spaced."""
    magnitude = (-distance).clamp(min=0)
    log_part = exact + (torch.log(magnitude.float().clamp(min=1) / exact) / torch.log(torch.tensor(far / exact))
                        * (buckets - exact)).long()
    return torch.where(magnitude < exact, magnitude, torch.clamp(log_part, max=buckets - 1))


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and a bucketed relative bias; ``form="hashed"``: the same
    model with the hashed reference on its dense bias."""

    def __init__(self, form: str = "softmax", position: str = "bucketed"):
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(E, E), nn.Linear(E, 2 * HKV * D), nn.Linear(E, E)
        self.table = nn.Embedding(8, H)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1.0, H + 1))  # ALiBi's (``position="alibi"``)
        self.form, self.position = form, position
        with torch.no_grad():
            self.table.weight.normal_(0, 2, generator=_gen("table"))

    def bias(self, t_q: int, t_k: int, start: int = 0) -> torch.Tensor:
        context, memory = torch.arange(start, start + t_q)[:, None], torch.arange(t_k)[None, :]
        if self.position == "alibi":  # (spelled as tests/kinds/test_position_bias.py does; whole sequences only)
            pos = torch.arange(t_k)
            return (pos[None, :] - pos[:, None]).to(torch.float32) * self.slopes[:, None, None]  # [H, T, T]
        return self.table(_buckets(memory - context)).permute(2, 0, 1)[None]         # [1, H, Tq, Tk]

    def heads(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)                               # [B, H, T, D]
        k, v = self.kv(x).view(b, t, 2, HKV, D).permute(2, 0, 3, 1, 4)              # [B, Hkv, T, D] each
        return q, k, v

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.heads(x)
        if self.form == "hashed":
            o = _hashed_reference(q, k, v, self.bias(t, t))
        else:  # repeat_kv, as Llama writes it
            k, v = (z[:, :, None].expand(b, HKV, H // HKV, t, D).reshape(b, H, t, D) for z in (k, v))
            s = q @ k.transpose(-2, -1) * D**-0.5 + self.bias(t, t)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            o = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, t, E))


class Model(nn.Module):
    def __init__(self, form="softmax", position="bucketed"):
        super().__init__()
        self.layers = nn.ModuleList(Attention(form, position) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _pair(position="bucketed"):
    torch.manual_seed(0)
    model, by_hand = Model(position=position), Model("hashed", position)
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


@pytest.mark.parametrize("position, note", [("bucketed", RELATIVE_NOTE), ("alibi", "ALiBi")])
def test_hand_written_relative_bias_reaches_hashed_as_a_table(position, note, tables):
    """T5's decoder buckets reach the op as R; ALiBi as its slopes, which the op reads as the table slope_h · d."""
    model, by_hand = _pair(position)
    x = torch.randn(B, T_LEN, E, generator=_gen("x"))
    report = Report(to="hashed")
    compiled = compile_rewritten(model, report, to="hashed", strict=True, **OPTIONS)
    got, want = compiled(x), by_hand(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - model(x)).abs().max() > 1e-2  # hashed differs from the softmax model at these options
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    assert all(any(note in n for n in s.notes) for s in report.sites), report
    assert tables == [(H, 2 * T_LEN - 1)] * 2  # the table, never a [1, H, T, T] mask
    grads = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()), allow_unused=True)
    wants = torch.autograd.grad(by_hand(x).square().sum(), list(by_hand.parameters()), allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), grads, wants):
        if position == "alibi" and name.endswith("table.weight"):  # (the ALiBi model does not read its table)
            assert g is None and w is None, name
            continue
        assert_close_rel(g, w, 1e-4, name)


def test_hashed_reads_the_table_at_lengths_the_matcher_never_saw(tables):
    """Compiled with dynamic shapes at 12 tokens, run at 20 and 7: R [H, 2T − 1] is recomputed at each length."""
    model, by_hand = _pair()
    report = Report(to="hashed")
    compiled = compile_rewritten(model, report, dynamic=True, to="hashed", strict=True, **OPTIONS)
    for length in (T_LEN, 20, 7):
        x = torch.randn(B, length, E, generator=_gen(f"x{length}"))
        torch.testing.assert_close(compiled(x), by_hand(x), rtol=1e-5, atol=1e-5, msg=lambda m: f"T={length}: {m}")
    assert set(tables) == {(H, 2 * length - 1) for length in (T_LEN, 20, 7)}, tables


def test_a_per_head_bias_that_is_not_relative_is_still_skipped():
    """An [H, T, T] parameter added to the scores is no function of j − i: it stays a mask, which hashed cannot
    read per head (the heads of a group share one selection), and the site is skipped, saying so."""
    model, _ = _pair()
    for layer in model.layers:
        layer.dense = nn.Parameter(torch.randn(H, T_LEN, T_LEN, generator=_gen("dense")))
        layer.bias = lambda t_q, t_k, start=0, layer=layer: layer.dense[None]
    x = torch.randn(B, T_LEN, E, generator=_gen("dense x"))
    report = attnrewrite.explain(model, x, to="hashed", options=OPTIONS)
    assert len(report.sites) == 2, report
    for site in report.sites:
        assert site.status == "skipped" and "a mask that differs across heads" in site.reason, report


def test_summary_skips_a_relative_bias_saying_why():
    model, _ = _pair()
    x = torch.randn(B, T_LEN, E, generator=_gen("summary"))
    report = attnrewrite.explain(model, x, to="summary", options={"chunk_size": 2, "window_chunks": 1})
    assert len(report.sites) == 2, report
    for site in report.sites:
        assert site.status == "skipped", report
        assert "a chunk summary has no single score to add it to" in site.reason, site.reason
        assert "relative position bias R[h, j − i]" in site.reason, site.reason


def test_a_decoding_step_gathers_the_models_bias_at_the_selected_positions():
    """One token at a time through ``HashedCache.update`` (with the query): the step returns the selected keys, the
    layer their positions (``selected_positions``), the model's own code computes its bias for the query's position
    over every key and reads it there; each token's output is the whole-sequence op's row (with the table R)."""
    from attnrewrite.decode.hashed import HashedCache
    from attnrewrite.ops import hashed_attention

    layer = Model().layers[0]
    x = torch.randn(1, T_LEN, E, generator=_gen("decode"))
    with torch.no_grad():
        q, k, v = layer.heads(x)
        distance = torch.arange(-(T_LEN - 1), T_LEN)
        table = layer.table(_buckets(distance)).t()                                     # [H, 2T − 1]
        whole = hashed_attention(q, k, v, is_causal=True, enable_gqa=True, position_slopes=table,
                                 position="relative", impl="torch", **OPTIONS)
        cache = HashedCache(**OPTIONS)
        for t in range(T_LEN):
            keys, values = cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0, {"query_states": q[:, :, t:t + 1]})
            positions = cache.layers[0].selected_positions                                # [B, Hkv, S]
            bias = layer.bias(1, t + 1, start=t).expand(1, H, 1, t + 1)                  # the model's own code
            bias = bias.gather(-1, positions.repeat_interleave(H // HKV, dim=1)[:, :, None])
            keys, values = (z.repeat_interleave(H // HKV, dim=1) for z in (keys, values))
            scores = q[:, :, t:t + 1] @ keys.transpose(-2, -1) * D**-0.5 + bias
            step = torch.softmax(scores, dim=-1) @ values
            torch.testing.assert_close(step, whole[:, :, t:t + 1], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"token {t}: {m}")
        assert positions.shape[-1] < T_LEN  # the last steps did select


# --------------------------------------------------------------------------- HF T5's decoder

@pytest.mark.parametrize("kind", ["hashed", "summary"])
def test_the_hf_attention_functions_refuse_a_position_bias_rather_than_drop_it(kind):
    """T5 passes its relative bias to the attention function as ``position_bias``; ``attnrewrite_hashed`` and
    ``attnrewrite_summary`` do not add it, so they refuse it, naming it, instead of running without it."""
    module = nn.Module()
    module.is_causal = True
    q = torch.randn(1, H, 5, D)
    import attnrewrite.hf

    forward = getattr(attnrewrite.hf, f"{kind}_forward")
    with pytest.raises(ValueError, match="position_bias"):
        forward(module, q, q, q, None, position_bias=torch.zeros(1, H, 5, 5))
    assert forward(module, q, q, q, None)[0].shape == (1, 5, H, D)  # the same call without one runs


def _t5_oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """T5's eager attention, with the hashed reference on the dense position bias in the decoder's self-attention
    (``module.is_causal``: the sites the kind rewrites) and softmax elsewhere."""
    if module.is_causal:
        out = _hashed_reference(query, key, value, position_bias, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = query @ key.transpose(2, 3) * (1.0 if scaling is None else scaling)
    scores = scores + (position_bias if position_bias is not None else 0.0)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
    return (weights @ value).transpose(1, 2).contiguous(), weights


T.AttentionInterface.register("t5_hashed_oracle", _t5_oracle)
T.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("t5_hashed_oracle", T.masking_utils.eager_mask)

T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, dropout_rate=0.0, initializer_factor=3.0,
          decoder_start_token_id=0, pad_token_id=0)


def _t5_pair():
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration._from_config(T.T5Config(**T5), attn_implementation="eager")
    by_hand = T.T5ForConditionalGeneration._from_config(T.T5Config(**T5), attn_implementation="t5_hashed_oracle")
    by_hand.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (model, by_hand):
            for name, p in m.named_parameters():
                if "relative_attention_bias" in name:
                    p.copy_(torch.randn(p.shape, generator=_gen(name)) * 2)
    return model, by_hand


def test_t5_decoder_self_attention_reads_the_table(tables):
    model, by_hand = _t5_pair()
    model.train(), by_hand.train()
    ids = torch.randint(0, 64, (B, T_LEN), generator=_gen("ids"))
    labels = torch.randint(0, 64, (B, 9), generator=_gen("labels"))
    report = Report(to="hashed")
    compiled = compile_rewritten(model, report, to="hashed", **OPTIONS)
    loss = compiled(input_ids=ids, labels=labels).loss
    want = by_hand(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    rewritten = [s for s in report.sites if s.status == "rewritten"]
    assert [s.module for s in rewritten] == [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    assert all(any(RELATIVE_NOTE in n for n in s.notes) for s in rewritten), report
    assert tables == [(4, 17)] * 2
    got = torch.autograd.grad(loss, list(model.parameters()))
    wants = torch.autograd.grad(want, list(by_hand.parameters()))
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in names
    for name, g, w in zip(names, got, wants):
        assert_close_rel(g, w, 1e-4, name)
