"""Masks computed from the inputs, and biases of unusual shapes: certified on informative probes.

- A padding mask computed from input lengths by arithmetic (a convolution's length formula) can
  mask every key on random inputs: certification must then find probes that leave rows open, and
  never rewrite on the example alone.
- A 1-D additive bias ``s + b`` (``b`` of shape [Tk]) is a bias like any other (issue 19: it made
  certification fail with an internal IndexError).
"""

import math
import zlib

import pytest
import torch
import torch.nn as nn

from attnrewrite.rewriter import certify as certify_module
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, T, C, H = 2, 8, 32, 4
D = C // H


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def heads(self, x):
        return (t.view(x.shape[0], -1, H, D).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))


class FramesFromSeconds(Attention):
    """Recordings with a 3-second preamble cut off; the frames left go through a convolution's length
    formula (kernel 400 samples, stride 320 at 16 kHz) and pad the keys.  Random lengths (around 0)
    leave no frame at all: every key of every row is masked."""

    def forward(self, x, seconds):
        samples = (seconds - 3.0) * 16000
        frames = torch.floor((samples - 400) / 320) + 1
        keep = torch.arange(x.shape[1])[None, :] < frames[:, None]  # [B, T]
        q, k, v = self.heads(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1) @ v


def test_a_mask_that_random_inputs_close_is_certified_on_perturbed_inputs():
    torch.manual_seed(0)
    model = FramesFromSeconds().eval()
    x = torch.randn(B, T, C, generator=_gen("frames"))
    seconds = torch.tensor([3.16, 3.12])  # 7 and 5 frames
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, to="softmax")
    with torch.no_grad():
        assert_close_rel(compiled(x, seconds), model(x, seconds), 1e-5, "output")
        other = torch.tensor([3.1, 3.14])  # other lengths, same graph
        assert_close_rel(compiled(x, other), model(x, other), 1e-5, "output on other lengths")
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason


def test_probes_that_mask_everything_never_certify(monkeypatch):
    """Without the perturbed probes (random ones only), the site is left alone with the reason: the
    example alone is not a proof."""
    monkeypatch.setattr(certify_module, "PROBES", ("real", "random", "random"))
    model = FramesFromSeconds().eval()
    report = Report(to="softmax")
    compile_rewritten(model, report, to="softmax")(torch.randn(B, T, C), torch.tensor([3.16, 3.12]))
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "every probed query row is fully masked" in site.reason


def _tiny_wav2vec2(impl):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                            attn_implementation=impl)
    torch.manual_seed(zlib.crc32(impl.encode()))
    return Wav2Vec2Model(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_wav2vec2_padding_from_input_lengths(impl):
    """wav2vec2 builds its frame mask from the sample mask through the feature extractor's length
    formula and a write into zeros (``mask[(arange, lengths - 1)] = 1``): both sites rewritten, exact."""
    pytest.importorskip("transformers")
    model = _tiny_wav2vec2(impl)
    audio = torch.randn(2, 400, generator=_gen("audio"))
    sample_mask = torch.ones(2, 400, dtype=torch.long)
    sample_mask[1, 250:] = 0
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, to="softmax")
    with torch.no_grad():
        got = compiled(audio, attention_mask=sample_mask).last_hidden_state
        want = model(audio, attention_mask=sample_mask).last_hidden_state
        # frames of the padded recording are not compared: they see only the padded keys' values
        assert_close_rel(got[:1], want[:1], 1e-5, "output")
        assert_close_rel(got[1, :20], want[1, :20], 1e-5, "output of the padded recording")
    sites = report.attention_sites()
    assert len(sites) == 2 and all(s.status == "rewritten" for s in sites), report


# --------------------------------------------------------------------------- issue 19: a 1-D bias


class KeyBias1d(Attention):
    """``s + b`` with ``b`` of shape [Tk]: one learned (or buffered) bias per key position."""

    def __init__(self, buffer: bool):
        super().__init__()
        bias = torch.randn(T, generator=_gen("key-bias"))
        if buffer:
            self.register_buffer("b", bias)
        else:
            self.b = nn.Parameter(bias)

    def forward(self, x):
        q, k, v = self.heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + self.b, dim=-1) @ v


@pytest.mark.parametrize("buffer", [False, True], ids=["parameter", "buffer"])
def test_a_1d_bias_is_certified(buffer):
    torch.manual_seed(1)
    model = KeyBias1d(buffer).eval()
    report = Report(to="softmax")
    x = torch.randn(B, T, C, generator=_gen("x1d"))
    with torch.no_grad():
        assert_close_rel(compile_rewritten(model, report, to="softmax")(x), model(x), 1e-5, "output")
    (site,) = report.attention_sites()
    assert site.status == "rewritten", site.reason
    assert site.spec["bias"] == ["add"]


def test_a_wrong_1d_bias_is_still_refused(monkeypatch):
    """The 1-D bias is compared, not assumed: a spec that doubles it is refused."""
    from dataclasses import replace

    from attnrewrite.patterns import masks

    real_resolve = masks.resolve

    def double_the_bias(site, evaluator):
        real_resolve(site, evaluator)
        site.spec = replace(site.spec, bias=tuple(t.scaled(2.0) for t in site.spec.bias))

    monkeypatch.setattr(masks, "resolve", double_the_bias)
    report = Report(to="softmax")
    compile_rewritten(KeyBias1d(False).eval(), report, to="softmax")(torch.randn(B, T, C))
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "does not reproduce" in site.reason


# --------------------------------------------------------------------------- key padding as an additive bias


class AdditivePadding(Attention):
    """BERT's spelling: ``(1 - mask[:, None, None, :]) * -10000.0`` from a [B, Tk] float mask; causal
    on request (for the kinds that need causal self-attention)."""

    def __init__(self, causal=False, extra=False):
        super().__init__()
        self.causal, self.extra = causal, extra

    def forward(self, x, mask, gain=None):
        q, k, v = self.heads(x)
        bias = (1 - mask[:, None, None, :]) * -10000.0
        if gain is not None:  # a bias that is key padding only while gain is 1
            bias = bias * gain[:, None, None, :]
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        if self.causal:
            s = s.masked_fill(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _padding_inputs():
    x = torch.randn(B, T, C, generator=_gen("padding"))
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    return x, mask


def _hand_written_linear(model, x, mask):
    """elu+1 linear attention without scale over the kept keys, written from the definition."""
    q, k, v = model.heads(x)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    w = (fq @ fk.transpose(-2, -1)) * mask[:, None, None, :]
    return (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)


def test_additive_key_padding_is_rewritten_to_linear_and_checked_at_run_time():
    torch.manual_seed(2)
    model = AdditivePadding().eval()
    x, mask = _padding_inputs()
    report = Report(to="linear")
    compiled = compile_rewritten(model, report, to="linear")
    with torch.no_grad():
        assert_close_rel(compiled(x, mask), _hand_written_linear(model, x, mask), 1e-5, "output")
        (site,) = report.attention_sites()
        assert site.status == "rewritten" and site.spec["bias"] == ["padding"], site
        other = mask.clone()
        other[0, 2:] = 0
        assert_close_rel(compiled(x, other), _hand_written_linear(model, x, other), 1e-5, "other padding")
        bad = mask.clone()
        bad[0, 3] = 0.5  # bias -5000: neither kept nor masked
        with pytest.raises(RuntimeError, match="neither 0 nor <= -9000"):
            compiled(x, bad)


@pytest.mark.parametrize("to", ["linear", "sigmoid"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_a_bfloat16_bert_padding_mask_is_padding(to, model_dtype):
    """A bfloat16 attention mask makes BERT's -10000 into -9984, added to float32 scores as -9984: still a
    masked key.  sigmoid leaves it out of bias="auto"'s count (it counted it) and linear takes it as padding,
    as a bool mask would (hashed, causal only: tests/kernels/test_masked_score.py)."""
    torch.manual_seed(2)
    model = AdditivePadding().eval().to(model_dtype)
    x, mask = _padding_inputs()
    x, mask = x.to(model_dtype), mask.to(torch.bfloat16)
    report = Report(to=to)
    with torch.no_grad():
        got = compile_rewritten(model, report, to=to)(x, mask)
        (site,) = report.attention_sites()
        assert site.status == "rewritten", site
        reference = model.float()  # the same (perhaps bfloat16-rounded) weights, in float32
        keep = mask.bool()[:, None, None, :]
        if to == "linear":
            want = _hand_written_linear(reference, x.float(), mask.float())
        else:
            q, k, v = reference.heads(x.float())
            want = torch.ops.attnrewrite.sigmoid_attention(q, k, v, keep)
        assert_close_rel(got.float(), want, 3e-2 if model_dtype == torch.bfloat16 else 1e-5, f"{to}")


def test_additive_key_padding_is_rewritten_to_summary():
    torch.manual_seed(3)
    model = AdditivePadding(causal=True).eval()
    x, mask = _padding_inputs()
    report = Report(to="summary")
    with torch.no_grad():
        compile_rewritten(model, report, to="summary", chunk_size=2, window_chunks=1)(x, mask)
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.spec["bias"] == ["padding"] and site.spec["causal"], site


def test_a_bias_with_other_values_is_not_taken_as_padding():
    """Example values outside {0, <= -1e4}: refused at compile time, the reason named."""
    model = AdditivePadding().eval()
    x, _ = _padding_inputs()
    report = Report(to="linear")
    with torch.no_grad():
        mask = torch.full((B, T), 0.75)  # bias -2500 everywhere
        compile_rewritten(model, report, to="linear")(x, mask)
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "additive bias" in site.reason


def test_a_bias_that_is_padding_only_on_the_example_is_refused_by_certification():
    """gain = 2 in the example keeps the bias at 0 or -2e4, like padding; certification's random gains do not."""
    model = AdditivePadding().eval()
    x, mask = _padding_inputs()
    report = Report(to="linear")
    with torch.no_grad():
        compile_rewritten(model, report, to="linear")(x, mask, torch.full((B, T), 2.0))
    (site,) = report.attention_sites()
    assert site.status == "skipped" and "taken as key padding holds values other than" in site.reason, site


def test_bert_target_rewritten_to_linear_with_its_padding_bias():
    """The reference BERT (``(1 - m)·finfo.min``): every site rewritten to linear, padding honoured."""
    from attnrewrite.testing.targets import build

    model, inputs, _ = build("bert")
    report = Report(to="linear")
    with torch.no_grad():
        compile_rewritten(model.eval(), report, to="linear")(**inputs)
    sites = report.attention_sites()
    assert sites and all(s.status == "rewritten" and s.spec["bias"] == ["padding"] for s in sites), report


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_bert_with_attention_mask_rewritten_to_linear(impl):
    """transformers' BertModel with a padding attention_mask: every site rewritten to linear; the padded
    keys get no weight (the real tokens' outputs do not move when the padding tokens change), and the
    output differs from softmax's (linear attention ran)."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, attn_implementation=impl)
    torch.manual_seed(zlib.crc32(f"bert-{impl}".encode()))
    model = BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 8), generator=_gen("ids"))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    report = Report(to="linear")
    compiled = compile_rewritten(model, report, to="linear")
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).last_hidden_state
        other = ids.clone()
        other[1, 5:] = (other[1, 5:] + 7) % 50  # change only the padded tokens
        again = compiled(other, attention_mask=mask).last_hidden_state
    sites = report.attention_sites()
    assert len(sites) == 2 and all(s.status == "rewritten" and s.kind == "linear" for s in sites), report
    assert_close_rel(again[:, :5], out[:, :5], 1e-6, "real tokens after changing padded ones")
    assert float((out - model(ids, attention_mask=mask).last_hidden_state).abs().max()) > 1e-4  # linear ran
