"""Sites with a score modification rewritten to the kinds that apply one (sigmoid, sliding_window, summary, hashed):
every site rewritten under strict=True, outputs equal to models written by hand with the kind's math."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn as nn

from attnrewrite.ir.score_program import score_program
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten, record_kernel_launches

B, T, E, H = 2, 12, 32, 4
D = E // H
CAP = 5.0  # small enough that the soft-cap changes the scores of these inputs
BIAS = -2.0


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class Attention(nn.Module):
    """Causal self-attention with optional soft-capping (Gemma-2: tanh(s / c) · c) and ALiBi.

    ``form="softmax"``: the model as written, what attnrewrite finds.  ``form="sigmoid"``: the same model
    written by hand with sigmoid attention, sigmoid(mod(s) + alibi + b) over the visible keys."""

    def __init__(self, cap: float | None, alibi: bool, form: str = "softmax", extra: bool = False):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.cap, self.form, self.extra = cap, form, extra
        self.register_buffer("slopes", _alibi_slopes(H).view(1, H, 1, 1) if alibi else None)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * D**-0.5
        if self.cap is not None:
            s = torch.tanh(s / self.cap) * self.cap
        if self.extra:  # a second nonlinear step after the cap: a generated score function in the kernels
            s = torch.sigmoid(s) * 4.0
        pos = torch.arange(T)
        if self.slopes is not None:
            s = s + self.slopes * (pos.view(1, T) - pos.view(T, 1)).float()
        causal = pos.view(1, T) <= pos.view(T, 1)
        if self.form == "softmax":
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        else:
            p = torch.sigmoid(s + BIAS).masked_fill(~causal, 0.0)
        return self.out((p @ v).transpose(1, 2).reshape(B, T, E))


class Model(nn.Module):
    def __init__(self, cap, alibi, form="softmax", layers=2, extra=False):
        super().__init__()
        self.layers = nn.ModuleList(Attention(cap, alibi, form, extra) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _pair(cap, alibi, name, extra=False):
    torch.manual_seed(zlib.crc32(name.encode()))
    model = Model(cap, alibi, extra=extra).eval()
    by_hand = Model(cap, alibi, form="sigmoid", extra=extra).eval()
    by_hand.load_state_dict(model.state_dict())
    return model, by_hand


@pytest.mark.parametrize("cap,alibi", [(CAP, False), (None, True), (CAP, True)], ids=["softcap", "alibi", "both"])
def test_sigmoid_rewrites_every_site_and_equals_the_model_written_by_hand(cap, alibi):
    model, by_hand = _pair(cap, alibi, f"{cap}{alibi}")
    x = torch.randn(B, T, E, generator=_gen("x")) * 3
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, by_hand(x), rtol=1e-5, atol=1e-5)
    if cap is not None:  # the modification mattered: without it the output differs
        plain = Model(None, alibi, form="sigmoid").eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(x) - got).abs().max() > 1e-2


def test_sigmoid_gradients_flow_through_the_soft_cap():
    model, by_hand = _pair(CAP, True, "grad")
    x = torch.randn(B, T, E, generator=_gen("gx")) * 3
    compiled = compile_rewritten(model, None, to="sigmoid", strict=True, bias=BIAS)
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    want = torch.autograd.grad(by_hand(x).square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close_rel(g, w, 1e-4, name)


def test_a_soft_capped_model_with_an_extra_step_runs_each_site_in_one_kernel(monkeypatch):
    """Soft-capping then sigmoid·4 (two nonlinear steps) and ALiBi, rewritten to sigmoid with impl='triton': every
    site runs the kernels (forward, dQ, dK/dV), each a specialisation with the generated score function, and the
    model and its parameter gradients equal the model written by hand."""
    from attnrewrite.kernels.sigmoid import op

    if not op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    launches = record_kernel_launches(monkeypatch)
    model, by_hand = _pair(CAP, True, "extra", extra=True)
    x = torch.randn(B, T, E, generator=_gen("ex")) * 3
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS, impl="triton")
    got = compiled(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    assert all(s.spec["score_mod"] for s in report.sites), report
    torch.testing.assert_close(got, by_hand(x), rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    want = torch.autograd.grad(by_hand(x).square().sum(), list(by_hand.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), grads, want):
        assert_close_rel(g, w, 1e-4, name)
    programs = {mod for _, mod, _ in launches}
    assert len(programs) == 1 and "tanh" in programs.pop(), launches
    assert all(specialised for _, _, specialised in launches), launches
    kernels = [name for name, _, _ in launches]
    assert kernels.count("sigmoid_fwd_kernel") == 2 and kernels.count("sigmoid_bwd_dq_kernel") == 2, launches
    assert kernels.count("sigmoid_bwd_dkdv_kernel") == 2, launches


class TensorCapped(nn.Module):
    """A modification that reads a tensor (a per-head cap): no program, so sigmoid skips it, saying why."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cap", torch.tensor([3.0, 4.0, 5.0, 6.0]).view(1, H, 1, 1))

    def forward(self, q, k, v):
        s = torch.tanh(q @ k.transpose(-2, -1) * D**-0.5) * self.cap
        return torch.softmax(s, dim=-1) @ v


def test_a_modification_without_a_program_is_skipped_with_the_reason():
    q, k, v = (torch.randn(B, H, T, D, generator=_gen(n)) for n in "qkv")
    report = Report(to="sigmoid")
    compile_rewritten(TensorCapped(), report, to="sigmoid")(q, k, v)
    (site,) = report.sites
    assert site.status == "skipped" and "not a constant number" in site.reason, report


#: spellings of score modifications: the program read off the graph must compute what the graph does
SPELLINGS = {
    "gemma2": lambda s: torch.tanh(s / 50.0) * 50.0,
    "methods": lambda s: (s * 0.5).tanh().mul(3.0).clamp(min=-2.0),
    "rsub_pow": lambda s: torch.pow(1.0 - torch.sigmoid(-s), 2) * 4,
    "square_erf": lambda s: -torch.square(torch.erf(s)),
    "divisor": lambda s: 2.0 / (s.abs() + 1.0),
    "clamp_max": lambda s: torch.clamp_max(torch.exp(s * 0.3), 2.5),
    "relu_inplace_kwarg": lambda s: torch.nn.functional.relu(s - 0.5, inplace=False) + 1.0,
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_the_program_read_off_the_graph_computes_what_the_graph_does(name):
    mod = SPELLINGS[name]
    q, k, v = (torch.randn(B, H, T, D, generator=_gen(name + n)) for n in "qkv")
    report = Report(to="sigmoid")
    compiled = compile_rewritten(lambda q, k, v: torch.softmax(mod(q @ k.transpose(-2, -1) * 0.7), -1) @ v,
                                 report, to="sigmoid", strict=True, bias=BIAS)
    got = compiled(q, k, v)
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["score_mod"], report
    want = torch.sigmoid(mod(q @ k.transpose(-2, -1) * 0.7) + BIAS) @ v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_score_program_without_a_modification():
    assert score_program(None) == (None, None)


def _hand_written_sigmoid(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                          **kwargs):
    """Gemma-2's eager attention with sigmoid in place of softmax: sigmoid(cap·tanh(s/cap) + mask + b)·v."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    s = query @ key.transpose(2, 3) * scaling
    s = torch.tanh(s / softcap) * softcap
    if attention_mask is not None:
        s = s + attention_mask if attention_mask.dtype != torch.bool else s.masked_fill(~attention_mask, -math.inf)
    return (torch.sigmoid(s + BIAS) @ value).transpose(1, 2).contiguous(), None


def test_hf_gemma2_soft_capped_model_rewritten_to_sigmoid(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma2 import modeling_gemma2

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=64,
        attn_logit_softcapping=1.0, final_logit_softcapping=None, attn_implementation="eager")
    torch.manual_seed(zlib.crc32(b"gemma2"))
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 10), generator=_gen("ids"))
    report = Report(to="sigmoid")
    compiled = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)
    got = compiled(input_ids=ids, use_cache=False).logits
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    assert all(s.spec["score_mod"] for s in report.sites), report
    with monkeypatch.context() as patch:
        patch.setattr(modeling_gemma2, "eager_attention_forward", _hand_written_sigmoid)
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sliding_window_rewrites_soft_capped_sites_and_keeps_the_cap():
    """A window as long as the sequence is the model itself; a short one equals the reference with the cap."""
    from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention

    model, _ = _pair(CAP, True, "window")
    x = torch.randn(B, T, E, generator=_gen("wx")) * 3
    report = Report(to="sliding_window")
    got = compile_rewritten(model, report, to="sliding_window", strict=True, window=T)(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)

    def capped(q, k, v):
        return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP
                             + torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf),
                             dim=-1) @ v

    q, k, v = (torch.randn(B, H, T, D, generator=_gen("w" + n)) * 3 for n in "qkv")
    got = compile_rewritten(capped, None, to="sliding_window", strict=True, window=3, sinks=1)(q, k, v)
    want = naive_sliding_window_attention(q, k, v, None, True, D**-0.5 / CAP, 3, 1,
                                          score_mod=lambda s: torch.tanh(s) * CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_summary_rewrites_soft_capped_sites_and_keeps_the_cap():
    """A window covering the sequence is the model itself; a short one equals the reference with the cap."""
    from attnrewrite.kernels.summary.reference import naive_summary_attention

    model, _ = _pair(CAP, False, "summary")
    x = torch.randn(B, T, E, generator=_gen("sx")) * 3
    report = Report(to="summary")
    got = compile_rewritten(model, report, to="summary", strict=True, chunk_size=2, window_chunks=T)(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)

    def capped(q, k, v):
        return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP
                             + torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf),
                             dim=-1) @ v

    q, k, v = (torch.randn(B, H, T, D, generator=_gen("s" + n)) * 3 for n in "qkv")
    got = compile_rewritten(capped, None, to="summary", strict=True, chunk_size=2, window_chunks=1)(q, k, v)
    want = naive_summary_attention(q, k, v, None, True, D**-0.5 / CAP, chunk_size=2, window_chunks=1,
                                   score_mod=lambda s: torch.tanh(s) * CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["summary", "hashed", "sliding_window"])
def test_a_modification_without_a_program_is_skipped_by_every_kind_that_applies_programs(kind):
    q, k, v = (torch.randn(B, H, T, D, generator=_gen(n)) for n in "qkv")
    report = Report(to=kind)

    def causal_tensor_capped(q, k, v):
        s = torch.tanh(q @ k.transpose(-2, -1) * D**-0.5) * TensorCapped().cap
        return torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf), dim=-1) @ v

    compile_rewritten(causal_tensor_capped, report, to=kind)(q, k, v)
    (site,) = report.sites
    assert site.status == "skipped" and "not a constant number" in site.reason, report


def test_hashed_rewrites_soft_capped_sites_and_keeps_the_cap():
    """Every key selected is the model itself; a small selection equals the reference with the cap."""
    from attnrewrite.kernels.hashed.codes import random_hyperplanes
    from attnrewrite.kernels.hashed.reference import naive_hashed_attention

    model, _ = _pair(CAP, False, "hashed")
    x = torch.randn(B, T, E, generator=_gen("hx")) * 3
    report = Report(to="hashed")
    got = compile_rewritten(model, report, to="hashed", strict=True, bits=16, top_k=T, window=T, sinks=0)(x)
    assert len(report.sites) == 2 and all(s.status == "rewritten" for s in report.sites), report
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)

    def capped(q, k, v):
        return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP
                             + torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf),
                             dim=-1) @ v

    q, k, v = (torch.randn(B, H, T, D, generator=_gen("h" + n)) * 3 for n in "qkv")
    got = compile_rewritten(capped, None, to="hashed", strict=True, bits=16, top_k=2, window=3, sinks=1)(q, k, v)
    plane = random_hyperplanes(D, 16, 0)
    want, _ = naive_hashed_attention(q, k, v, None, True, D**-0.5 / CAP, top_k=2, window=3, sinks=1, proj_q=plane,
                                     proj_k=plane, score_mod=lambda s: torch.tanh(s) * CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sigmoid_returns_weights_of_a_soft_capped_site():
    """Returned weights (a site whose probabilities escape) are sigmoid(mod(s) + b), 0 on masked keys."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def capped(q, k, v):
        p = torch.softmax((torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP).masked_fill(~causal, -math.inf),
                          dim=-1)
        return p @ v, p

    q, k, v = (torch.randn(B, H, T, D, generator=_gen("rw" + n)) * 3 for n in "qkv")
    report = Report(to="sigmoid")
    out, weights = compile_rewritten(capped, report, to="sigmoid", strict=True, bias=BIAS)(q, k, v)
    want = torch.sigmoid(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP + BIAS).masked_fill(~causal, 0.0)
    torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,options", [("summary", dict(chunk_size=2, window_chunks=1)),
                                          ("hashed", dict(bits=16, top_k=2, window=3, sinks=1))])
def test_impl_triton_runs_every_program_in_the_kernels(kind, options, monkeypatch):
    """With the kind option impl='triton', a soft-capped site runs on the kernels (under TRITON_INTERPRET=1 on
    the CPU) and equals the torch path; so does a program with two nonlinear steps, in a specialisation of the
    kernels with the generated score function."""
    triton_ops = pytest.importorskip(f"attnrewrite.kernels.{kind}.{'triton_op' if kind == 'summary' else 'triton_ops'}")
    if not triton_ops.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")

    def capped(q, k, v):
        return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP) * CAP
                             + torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf),
                             dim=-1) @ v

    def capped_twice(q, k, v):
        return torch.softmax(torch.exp(torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / CAP))
                             + torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf),
                             dim=-1) @ v

    q, k, v = (torch.randn(1, H, T, D, generator=_gen("t" + n)) * 3 for n in "qkv")
    report = Report(to=kind)
    got = compile_rewritten(capped, report, to=kind, strict=True, impl="triton", **options)(q, k, v)
    assert [s.status for s in report.sites] == ["rewritten"], report
    want = compile_rewritten(capped, None, to=kind, strict=True, impl="torch", **options)(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    launches = record_kernel_launches(monkeypatch)
    report = Report(to=kind)
    got = compile_rewritten(capped_twice, report, to=kind, strict=True, impl="triton", **options)(q, k, v)
    assert [s.status for s in report.sites] == ["rewritten"], report
    want = compile_rewritten(capped_twice, None, to=kind, strict=True, impl="torch", **options)(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert launches and all(specialised and "exp" in mod for _, mod, specialised in launches), launches
