"""One attention, many spellings: each is found, certified, rewritten, and gets the right spec."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.rewriter.report import Report
from attnrewrite.rewriter.backend import attnrewrite_backend

B, H, T, D = 2, 4, 8, 16


def _compile(fn, report):
    import functools

    return torch.compile(fn, backend=functools.partial(attnrewrite_backend, options={"compiler": "eager"},
                                                       _report_sink=report.merge))


def _qkv(h_kv=H):
    return torch.randn(B, H, T, D), torch.randn(B, h_kv, T, D), torch.randn(B, h_kv, T, D)


def _causal(t=T):
    return torch.ones(t, t, dtype=torch.bool).tril()


def matmul_div_sqrt(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D), dim=-1) @ v


def einsum_scaled(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_other_layout(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * D**-0.5
    return torch.einsum("bhij,bhjd->bihd", torch.softmax(s, -1), v)  # output [B, T, H, D]


def bmm_three_dims(q, k, v):
    q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
    p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * D**-0.5, dim=-1)
    return torch.bmm(p, v3)


def baddbmm_with_bias(q, k, v):
    q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
    alibi = (torch.arange(T, dtype=q.dtype)[None, None, :] * -0.1).expand(B * H, 1, T)
    s = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=1.0, alpha=D**-0.5)
    return torch.bmm(torch.softmax(s, dim=-1), v3)


def where_causal(q, k, v):
    s = q @ k.transpose(-2, -1) * D**-0.5
    s = torch.where(_causal(), s, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) @ v


def arange_causal_additive(q, k, v):
    i = torch.arange(T)
    mask = torch.zeros(T, T).masked_fill(i[None, :] > i[:, None], float("-inf"))
    return torch.softmax(q @ k.transpose(-2, -1) * D**-0.5 + mask, -1) @ v


def scale_folded_into_q(q, k, v):  # Whisper: q is scaled right after its projection
    return torch.softmax((q * D**-0.5) @ k.transpose(-2, -1), -1) @ v


def upcast_softmax(q, k, v):  # Llama: softmax in float32, cast back
    s = (q.half() @ k.half().transpose(-2, -1)) * D**-0.5
    return (torch.softmax(s, dim=-1, dtype=torch.float32).to(torch.float16) @ v.half()).float()


def gqa_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, -1) @ v


def gqa_repeat_kv(q, k, v):
    def repeat_kv(x, n):
        b, h, t, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)

    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)


def sdpa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.2)


def keys_permuted_early(q, k, v):  # kᵀ produced by a permute, as old GPT-2 code did
    kt = k.permute(0, 1, 3, 2)
    return torch.softmax(q @ kt * D**-0.5, -1) @ v


def unbatched_single_head(q, k, v):
    return torch.softmax(q[0, 0] @ k[0, 0].T * D**-0.5, -1) @ v[0, 0]


CASES = {
    # name: (fn, kv heads, expected spec fields)
    "matmul_div_sqrt": (matmul_div_sqrt, H, dict(scale=D**-0.5, causal=False)),
    "einsum_scaled": (einsum_scaled, H, dict(scale=D**-0.5)),
    "einsum_other_layout": (einsum_other_layout, H, dict(scale=D**-0.5)),
    "bmm_three_dims": (bmm_three_dims, H, dict(scale=D**-0.5)),
    "baddbmm_with_bias": (baddbmm_with_bias, H, dict(scale=D**-0.5, bias=["add"])),
    "where_causal": (where_causal, H, dict(causal=True, has_bias=False)),
    "arange_causal_additive": (arange_causal_additive, H, dict(causal=True, has_bias=False)),
    "scale_folded_into_q": (scale_folded_into_q, H, dict(scale=D**-0.5)),
    "upcast_softmax": (upcast_softmax, H, dict(softmax_dtype="float32")),
    "gqa_repeat_interleave": (gqa_repeat_interleave, 2, dict(kv_groups=2)),
    "gqa_repeat_kv": (gqa_repeat_kv, 2, dict(kv_groups=2, causal=True)),
    "sdpa_enable_gqa": (sdpa_enable_gqa, 2, dict(kv_groups=2, scale=0.2)),
    "keys_permuted_early": (keys_permuted_early, H, dict(scale=D**-0.5)),
    "unbatched_single_head": (unbatched_single_head, H, dict(scale=D**-0.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_spelling(name):
    fn, h_kv, expected = CASES[name]
    q, k, v = _qkv(h_kv)
    report = Report()
    got, want = _compile(fn, report)(q, k, v), fn(q, k, v)
    (site,) = report.sites
    assert site.status == "rewritten", report
    tol = 2e-3 if name == "upcast_softmax" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for key, value in expected.items():
        actual = site.spec[key]
        if isinstance(value, float):
            assert actual == pytest.approx(value), (key, actual)
        else:
            assert actual == value, (key, actual)


class WhisperLike(nn.Module):
    """q scaled after its projection, then split into heads: the scale is found through the views."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q = (self.q(x) * 0.125).view(b, t, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, t, 4, 8).transpose(1, 2)
        v = self.v(x).view(b, t, 4, 8).transpose(1, 2)
        return (torch.softmax(q @ k.transpose(-2, -1), -1) @ v).transpose(1, 2).reshape(b, t, 32)


def test_scale_folded_into_q_through_views():
    model, x = WhisperLike().eval(), torch.randn(2, 8, 32)
    report = Report()
    torch.testing.assert_close(_compile(model, report)(x), model(x), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["scale"] == pytest.approx(0.125)


def soft_capped(q, k, v):  # Gemma-2: tanh(s / c) · c between the scaled scores and the softmax
    s = torch.tanh(q @ k.transpose(-2, -1) * D**-0.5 / 30.0) * 30.0
    return torch.softmax(s + torch.zeros(T, T).masked_fill(~_causal(), float("-inf")), -1) @ v


def three_d_scores_viewed(q, k, v):  # BLOOM: [B·H, T, T] scores viewed [B, H, T, T] for the mask, and back
    q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
    alibi = (torch.arange(T, dtype=q.dtype) * -0.1).expand(B * H, 1, T)
    s = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=1.0, alpha=D**-0.5).view(B, H, T, -1)
    p = torch.softmax(s.masked_fill(~_causal(), torch.finfo(s.dtype).min), -1, dtype=torch.float32)
    return torch.bmm(p.view(B * H, T, -1), v3).view(B, H, T, D)


SCORE_MOD_CASES = {
    # the division by the cap folds into the scale: mod(s) = tanh(s) · 30 with s = q·kᵀ · D^-½ / 30
    "soft_capped": (soft_capped, dict(causal=True, score_mod="tanh·mul", scale=D**-0.5 / 30.0)),
    "three_d_scores_viewed": (three_d_scores_viewed, dict(causal=True, bias=["add"], score_mod=None)),
}


@pytest.mark.parametrize("name", sorted(SCORE_MOD_CASES))
def test_score_modifications_and_views(name):
    fn, expected = SCORE_MOD_CASES[name]
    q, k, v = _qkv()
    report = Report()
    torch.testing.assert_close(_compile(fn, report)(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
    (site,) = report.sites
    assert site.status == "rewritten", report
    for key, value in expected.items():
        assert site.spec[key] == (pytest.approx(value) if isinstance(value, float) else value), (key, site.spec[key])


class SoftCappedBlock(nn.Module):
    """Soft-capping with the cap as a module attribute: under dynamic=True it becomes a SymFloat."""

    def __init__(self, cap=30.0):
        super().__init__()
        self.cap = cap

    def forward(self, q, k, v):
        s = torch.tanh((q @ k.transpose(-2, -1)) * D**-0.5 / self.cap) * self.cap
        return torch.softmax(s, -1) @ v


def test_score_modification_with_dynamic_shapes_compiles_once():
    model, report, graphs = SoftCappedBlock().eval(), Report(), []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return attnrewrite_backend(gm, example_inputs, options={"compiler": "eager"}, _report_sink=report.merge)

    compiled = torch.compile(model, backend=backend, dynamic=True)
    for t in (8, 11, 13):
        q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1, f"recompiled {len(graphs)} times"
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["score_mod"], report


class ThreeDScoresBlock(nn.Module):
    """BLOOM's layout with sizes read from the input: [B·H, T, T] scores viewed 4-D for the mask and back."""

    def forward(self, q, k, v):
        b, h, t, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, t, -1) * d**-0.5
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        return torch.bmm(torch.softmax(s, -1).view(b * h, t, -1), v3).view(b, h, t, d)


def test_viewed_scores_with_dynamic_shapes_compile_once():
    model, report, graphs = ThreeDScoresBlock(), Report(), []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return attnrewrite_backend(gm, example_inputs, options={"compiler": "eager"}, _report_sink=report.merge)

    compiled = torch.compile(model, backend=backend, dynamic=True)
    for b, t in ((2, 8), (3, 11), (4, 13)):  # (batch 1 would be specialised by dynamo itself)
        q, k, v = (torch.randn(b, H, t, D) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1, f"recompiled {len(graphs)} times"
    (site,) = report.sites
    assert site.status == "rewritten" and site.spec["causal"], report


def test_a_kind_that_cannot_apply_a_score_modification_skips_the_site(monkeypatch):
    """Kinds opt in to score modifications (Kind.score_mod); the others skip such sites, with the reason."""
    import functools

    from attnrewrite import kinds
    from attnrewrite.kinds import registry

    softmax = kinds.get("softmax")
    no_mods = kinds.Kind(name="no_mods", emit=softmax.emit, supports=softmax.supports)  # score_mod=False
    monkeypatch.setitem(registry._KINDS, "no_mods", no_mods)
    q, k, v = _qkv()
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"to": "no_mods", "compiler": "eager"},
                                _report_sink=report.merge)
    torch.testing.assert_close(torch.compile(soft_capped, backend=backend)(q, k, v), soft_capped(q, k, v))
    (site,) = report.sites
    assert site.status == "skipped" and "cannot apply the score modification tanh·mul" in site.reason, report
