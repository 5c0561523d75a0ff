"""Score probes for the sites that are not a softmax or SDPA the model wrote: FlexAttention and the fused
nn.MultiheadAttention / TransformerEncoderLayer ops.

A kind that is not shift-invariant (sigmoid) sees a constant added to one query's scores, softmax does not
(``tests/rewriter/test_certifier_scores.py``).  For FlexAttention the scores are what its ``score_mod`` makes
of q·kᵀ·scale (−∞ where the ``mask_mod`` is False): ``hops.certify_flex`` compares them, normalised by elu + 1,
with the spec's.  For MHA the scores are q·kᵀ/√d plus the float masks as passed: the written-out form that
unfusing puts in the graph is checked against torch's own ``F.multi_head_attention_forward`` with its softmax
and SDPA replaced by elu + 1 (the fused encoder layer, a C++ op: against its slow path, that function).

Unplanted spellings with per-query terms are rewritten to sigmoid and equal sigmoid written by hand on the true
scores; planted bugs (the score_mod's bias read off by a constant per query; MHA's masks written out off by one)
pass the output probes and are refused on the scores, the model running as it was.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.patterns import multihead
from attnrewrite.rewriter import hops
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten

B, H, T, D = 2, 4, 8, 8
E = H * D
BIAS = -2.0  # sigmoid's b


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _sigmoid_by_hand(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigmoid(s + b) on the visible keys (−∞ scores: weight 0), · v."""
    return torch.sigmoid(scores + BIAS).masked_fill(scores.isneginf(), 0.0) @ v


# --------------------------------------------------------------------------- FlexAttention

_ROWS = torch.arange(T, dtype=torch.float32)


def _per_query(score, b, h, q_idx, kv_idx):
    return score + 0.3 * q_idx


def _alibi_plus_query(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * (h + 1) * 0.25 + 0.5 * q_idx


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


#: name: (score_mod, mask_mod or None, the scores FlexAttention normalises from s = q·kᵀ/√d, [H, T, T] terms)
FLEX = {
    "query_constant": (_per_query, None, lambda s: s + 0.3 * _ROWS[:, None]),
    "alibi_plus_query": (_alibi_plus_query, None, lambda s: s + (
        (_ROWS[None, :] - _ROWS[:, None]) * 0.25 * torch.arange(1, H + 1.0)[:, None, None] + 0.5 * _ROWS[:, None])),
    "causal_query_constant": (_per_query, _causal_mask_mod, lambda s: (s + 0.3 * _ROWS[:, None]).masked_fill(
        _ROWS[None, :] > _ROWS[:, None], float("-inf"))),
}


def _flex_fn(score_mod, mask_mod):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def f(q, k, v):
        block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, T, T, device="cpu")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return f


def _qkv(name: str):
    return [torch.randn(B, H, T, D, generator=_gen(f"{name}{n}")) for n in "qkv"]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("spelling", sorted(FLEX))
def test_flex_score_mod_with_a_per_query_term_reaches_sigmoid_as_flex_scores_it(spelling):
    """The rewritten site's output is sigmoid's on FlexAttention's own scores (no gradients: FlexAttention refuses
    inputs that require them on CPU, before the pass sees the graph)."""
    score_mod, mask_mod, scores = FLEX[spelling]
    torch._dynamo.reset()
    report = Report(to="sigmoid")
    compiled = compile_rewritten(_flex_fn(score_mod, mask_mod), report, to="sigmoid", strict=True, bias=BIAS)
    q, k, v = _qkv(spelling)
    got = compiled(q, k, v)
    want = _sigmoid_by_hand(scores(q @ k.transpose(-2, -1) * D**-0.5), v)
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.pattern == "flex_attention", report
    assert_close_rel(got, want, 1e-5, f"{spelling}: output")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("spelling", ["query_constant", "causal_query_constant"])
def test_flex_bias_read_off_by_a_constant_per_query_is_refused_for_sigmoid(monkeypatch, spelling):
    """The planted bug: the score_mod's bias read less its mean over the keys (softmax cannot see it).  The exact
    kind rewrites the site and reproduces FlexAttention; sigmoid refuses it on the score probes."""
    real = hops._additive_bias

    def planted(score_mod, shape):
        bias = real(score_mod, shape)
        return bias - bias.mean(-1, keepdim=True)

    monkeypatch.setattr(hops, "_additive_bias", planted)
    score_mod, mask_mod, _ = FLEX[spelling]
    fn = _flex_fn(score_mod, mask_mod)
    q, k, v = _qkv(f"planted{spelling}")
    for kind in ("softmax", "sigmoid"):
        torch._dynamo.reset()
        report = Report(to=kind)
        got = compile_rewritten(fn, report, to=kind, **({"bias": BIAS} if kind == "sigmoid" else {}))(q, k, v)
        assert_close_rel(got, fn(q, k, v), 1e-5, f"{kind}: output")
        (site,) = report.attention_sites()
        if kind == "softmax":
            assert site.status == "rewritten", f"the exact kind refused a spec right for it:\n{report}"
        else:
            assert site.status == "skipped" and "not its scores" in site.reason, report


# --------------------------------------------------------------------------- nn.MultiheadAttention


def _row_mask(name: str) -> torch.Tensor:
    """A float attn_mask [T, T] with a different constant per query row (and a masked corner)."""
    mask = torch.randn(T, T, generator=_gen(name)) + 0.7 * _ROWS[:, None]
    mask[0, -1] = float("-inf")
    return mask


def _padding(name: str) -> torch.Tensor:
    """A float key_padding_mask [B, T]: the last two keys of batch 1 at −∞, small biases elsewhere."""
    pad = 0.2 * torch.randn(B, T, generator=_gen(name))
    pad[1, -2:] = float("-inf")
    return pad


def _mha_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor, attn_mask, key_padding_mask) -> torch.Tensor:
    """Sigmoid attention with ``mha``'s weights on MHA's scores, q·kᵀ/√d + attn_mask + key_padding_mask;
    x [B, T, E] (batch first)."""
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) * D**-0.5 + attn_mask
    if key_padding_mask is not None:
        scores = scores + key_padding_mask[:, None, None, :]
    return mha.out_proj(_sigmoid_by_hand(scores, v).transpose(1, 2).reshape(B, T, E))


class _Mha(nn.Module):
    def __init__(self, padded: bool):
        super().__init__()
        self.attn, self.padded = nn.MultiheadAttention(E, H, batch_first=True), padded

    def forward(self, x, attn_mask, key_padding_mask):
        return self.attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask if self.padded else None,
                         need_weights=False)[0]


@pytest.mark.parametrize("padded", [False, True], ids=["attn_mask", "attn_mask_and_padding"])
def test_mha_float_masks_with_per_row_biases_reach_sigmoid_as_mha_adds_them(padded):
    torch._dynamo.reset()
    torch.manual_seed(zlib.crc32(f"mha{padded}".encode()))
    model = _Mha(padded)
    x, mask, pad = torch.randn(B, T, E, generator=_gen("mha x")), _row_mask("mha"), _padding("mha pad")
    report = Report(to="sigmoid")
    got = compile_rewritten(model, report, to="sigmoid", strict=True, bias=BIAS)(x, mask, pad)
    want = _mha_by_hand(model.attn, x, mask, pad if padded else None)
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.pattern == "multihead", report
    assert_close_rel(got, want, 1e-5, "output")
    params = list(model.parameters())
    for (label, _), g, w in zip(model.named_parameters(), torch.autograd.grad(got.square().sum(), params),
                                torch.autograd.grad(want.square().sum(), params), strict=True):
        assert_close_rel(g, w, 1e-4, f"gradient of {label}")


def _layer_by_hand(layer: nn.TransformerEncoderLayer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    scores_mask = torch.zeros(T, T).masked_fill(~keep, float("-inf"))
    h = layer.norm1(x + _mha_by_hand(layer.self_attn, x, scores_mask, None))
    return layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))


def _keep() -> torch.Tensor:
    keep = torch.rand(T, T, generator=_gen("keep")) > 0.3
    keep.diagonal().fill_(True)
    return keep


def test_fused_encoder_layer_is_checked_on_its_slow_paths_scores_and_reaches_sigmoid():
    """eval + no_grad: Dynamo sees the fused ``torch._transformer_encoder_layer_fwd`` (a C++ op); its written-out
    form is checked against the layer's slow path (torch's MHA function) with elu + 1, and the rewrite is sigmoid
    on the scores that path normalises."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True).eval()
    x, keep = torch.randn(B, T, E, generator=_gen("layer x")), _keep()
    report = Report(to="sigmoid")
    with torch.no_grad():
        got = compile_rewritten(layer, report, to="sigmoid", strict=True, bias=BIAS)(x, src_mask=~keep)
        want = _layer_by_hand(layer, x, keep)
    (site,) = report.attention_sites()
    assert site.status == "rewritten" and site.pattern == "multihead", report
    assert_close_rel(got, want, 1e-5, "output")


def test_fused_encoder_layer_with_a_float_mask_is_left_as_it_is_not_finite():
    """torch's fused encoder layer returns NaN for a float src_mask on CPU (its slow path does not): the unfused
    form would not reproduce it, so the site is skipped with that reason, never rewritten into other numbers."""
    torch._dynamo.reset()
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True).eval()
    x, mask = torch.randn(B, T, E, generator=_gen("nan x")), _row_mask("nan")
    report = Report(to="softmax")
    with torch.no_grad():
        compile_rewritten(layer, report, to="softmax")(x, src_mask=mask)
    (site,) = report.sites
    assert site.status == "skipped" and "not finite" in site.reason, report


@pytest.mark.parametrize("fused", [False, True], ids=["mha", "encoder_layer"])
def test_mha_masks_written_out_off_by_a_constant_per_row_are_refused(monkeypatch, fused):
    """The planted bug: unfusing adds 0.25 · i to the float mask (MHA's merged mask; the encoder layer's in its
    written-out SDPA, not in the slow path the check compares with).  The fused op's outputs cannot tell
    (softmax), its scores can: the site is not unfused, with that reason, and the model runs as it was."""
    def shifted(mask):  # (recorded into the graph: the row index from the mask itself, 1 … T)
        return mask + 0.25 * torch.ones_like(mask).cumsum(-2)

    real_combine, real_layer = multihead._combine, multihead.encoder_layer_written_out

    def combine(parts, dtype):
        mask = real_combine(parts, dtype)
        return mask if mask is None or all(is_bool for _, is_bool in parts) else shifted(mask)

    def layer(*args, mha=None, **kw):  # (the layer's bool src_mask reaches the fused op as 0 / −∞ floats)
        args = list(args)
        if mha is None and args[18] is not None and not kw["mask_is_bool"]:
            args[18] = shifted(args[18])
        return real_layer(*args, mha=mha, **kw)

    monkeypatch.setattr(multihead, "_combine", combine)
    monkeypatch.setattr(multihead, "encoder_layer_written_out", layer)
    torch._dynamo.reset()
    torch.manual_seed(11)
    x, mask = torch.randn(B, T, E, generator=_gen("planted x")), _row_mask("planted")
    if fused:
        model = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True).eval()
        run = lambda m: m(x, src_mask=~_keep())  # noqa: E731
    else:
        model = _Mha(padded=False)
        run = lambda m: m(x, mask, None)  # noqa: E731
    report = Report(to="sigmoid")
    with torch.no_grad():
        got = run(compile_rewritten(model, report, to="sigmoid", bias=BIAS))
        assert_close_rel(got, run(model), 1e-5, "output")
    (site,) = report.sites
    assert site.status == "skipped" and "fused op scores" in site.reason, report
