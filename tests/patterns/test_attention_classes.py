"""Classes of attention the matcher once left alone, in our own spellings: each is rewritten, certified
and exact with the softmax kind, and with the sigmoid kind equals the sigmoid op called by hand on the
q, k, v, scale and mask it means.  Beside each class, near misses that look like it and are not
attention: they must stay untouched."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrewrite.ops import sigmoid_attention
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report

B, H, T, D = 2, 2, 5, 8


def _g(name: str) -> torch.Generator:
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _qkv(name, shape=(B, H, T, D)):
    g = _g(name)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def _keep(t=T):
    keep = torch.ones(B, t, dtype=torch.bool)
    keep[1, t - 2:] = False  # right padding: every query still sees a key
    return keep


def _compile(fn, to, dynamic=None):
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": "eager"},
                                _report_sink=report.merge)
    return torch.compile(fn, backend=backend, dynamic=dynamic), report


@dataclass
class Case:
    fn: Callable
    inputs: tuple
    sigmoid: Callable | None = None  # the sigmoid op called by hand on the same inputs
    sites: int = 1
    dynamic: bool = False
    expect: dict | None = None  # spec fields of the (first) site


# --------------------------------------------------------------------------------- (a) bool / int added


def bool_padding_added(q, k, v, keep):  # +1 on the keys a sequence has, 0 on its padding
    return torch.softmax(q @ k.mT * D ** -0.5 + keep[:, None, None, :], -1) @ v


def bool_triangle_added(q, k, v):
    return torch.softmax(q @ k.mT / 3.0 + torch.ones(T, T, dtype=torch.bool).tril(), -1) @ v


def int_relative_bucket_added(q, k, v):  # an integer relative-position bias, clamped to 5 buckets
    i = torch.arange(T)
    bucket = (i[None, :] - i[:, None]).clamp(-2, 2)  # int64
    return F.softmax(bucket + q @ k.transpose(2, 3) * 0.25, dim=-1) @ v


def _bucket():
    i = torch.arange(T)
    return (i[None, :] - i[:, None]).clamp(-2, 2).float()


# --------------------------------------------------------------------------------- (b) shape-only uses


def distilbert_expand_as(q, k, v, keep):
    scores = q @ k.transpose(-2, -1) / D ** 0.5
    mask = (keep == 0).view(scores.size(0), 1, 1, scores.size(-1)).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v


def ones_like_triu(q, k, v):
    scores = q @ k.transpose(-2, -1) * 0.3
    causal_drop = torch.ones_like(scores, dtype=torch.bool).triu(1)
    return scores.masked_fill(causal_drop, torch.finfo(scores.dtype).min).softmax(-1) @ v


def mask_from_scores_shape(q, k, v, keep):
    scores = q @ k.transpose(-2, -1) * 0.3
    bias = scores.new_zeros(scores.shape[0], 1, 1, scores.shape[-1]).masked_fill(~keep[:, None, None, :], -1e9)
    return (scores + bias).softmax(-1) @ v


# --------------------------------------------------------------------------------- (d) chained sites


def chained_query(q, k, v):  # the first site's output is directly the second's query
    a = torch.softmax((q @ k.mT) * 0.3, -1) @ v
    return torch.softmax((a @ k.mT) * 0.2, -1) @ v


def chained_keys_and_values(q, k, v):  # ... and three deep, the output as keys and values too
    a = torch.softmax((q @ k.mT) * 0.3, -1) @ v
    b = torch.softmax((q @ a.mT) * 0.2, -1) @ a
    return torch.softmax((b @ a.mT) * 0.1, -1) @ b


def _sig(q, k, v, mask=None, scale=None):
    return sigmoid_attention(q, k, v, mask, scale=scale)


# --------------------------------------------------------------------------------- (e) broadcast over batch


class LatentPooling(nn.Module):
    """Perceiver / Set Transformer PMA: learned latent queries [H, L, D] attend to each input."""

    def __init__(self):
        super().__init__()
        g = _g("latent")
        self.latent = nn.Parameter(torch.randn(H, 3, D, generator=g))
        self.kv = nn.Linear(H * D, 2 * H * D)

    def heads(self, x):
        b, t, _ = x.shape
        return self.kv(x).view(b, t, 2, H, D).permute(2, 0, 3, 1, 4)  # [2, B, H, T, D]

    def forward(self, x, keep):
        k, v = self.heads(x)
        s = (self.latent @ k.transpose(-2, -1)) * D ** -0.5
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        return s.softmax(-1) @ v  # [B, H, 3, D]


class PooledQuery(nn.Module):
    """Attention pooling: one learned [1, D] query against 3-D keys [B, T, D]."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, D, generator=_g("pool")))

    def forward(self, x, keep):
        return torch.softmax(self.query @ x.transpose(1, 2) / 2.0, -1) @ x  # [B, 1, D]


def shared_context(q, ctx):  # keys and values from one context [1, H, T, D] shared by the batch
    return torch.softmax(q @ ctx.transpose(-2, -1) * 0.3, -1) @ ctx


# --------------------------------------------------------------------------------- (f) shifted windows

NW, N = 2, 4  # windows per image, tokens per window


class ShiftedWindow(nn.Module):
    """Swin: scores of [B·nW, H, N, N] viewed [B, nW, H, N, N] to add a per-window mask, viewed back."""

    def __init__(self, bias_first: bool):
        super().__init__()
        g = _g("swin")
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.rel = nn.Parameter(torch.randn(H, N, N, generator=g))
        self.register_buffer("mask", torch.zeros(NW, N, N).masked_fill(torch.rand(NW, N, N, generator=g) > 0.6, -100.0))
        self.bias_first = bias_first

    def qkv_heads(self, x):
        b_, n, _ = x.shape
        return self.qkv(x).reshape(b_, n, 3, H, D).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        b_, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        attn = (q * D ** -0.5) @ k.transpose(-2, -1)
        if self.bias_first:
            attn = attn + self.rel.unsqueeze(0)
        attn = attn.view(b_ // NW, NW, H, n, n) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = F.softmax(attn.view(-1, H, n, n), dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b_, n, c)

    def sigmoid_reference(self, x):
        q, k, v = self.qkv_heads(x)
        mask = self.mask.repeat(x.shape[0] // NW, 1, 1).unsqueeze(1)  # window w of image b at row b·nW + w
        if self.bias_first:
            mask = mask + self.rel
        out = sigmoid_attention(q, k, v, mask, scale=D ** -0.5)
        return out.transpose(1, 2).reshape(x.shape)


# --------------------------------------------------------------------------------- (g) values on the left


def channels_first(x):  # x [B, C, h, w]: heads of d channels, tokens = pixels, values [B, nh, d, N]
    b, c, hh, ww = x.shape
    f = x.view(b, H, c // H, hh * ww)
    attn = ((f.transpose(-2, -1) @ f) * (c // H) ** -0.5).softmax(-1)
    return (f @ attn.transpose(-2, -1)).view(b, c, hh, ww)


def sagan_bmm(x):  # SAGAN: bmm(values [B, C, N], attentionᵀ) with the transpose spelled as a permute
    b, c, n = x.shape
    attn = torch.softmax(torch.bmm(x.permute(0, 2, 1), x) / 3.0, dim=-1)  # [B, N, N]
    return torch.bmm(x, attn.permute(0, 2, 1))


def _channels_first_sigmoid(x):
    b, c, hh, ww = x.shape
    f = x.view(b, H, c // H, hh * ww).transpose(-2, -1)
    return sigmoid_attention(f, f, f, scale=(c // H) ** -0.5).transpose(-2, -1).reshape(x.shape)


def _sagan_sigmoid(x):
    f = x.transpose(1, 2)[:, None]
    return sigmoid_attention(f, f, f, scale=1 / 3.0)[:, 0].transpose(1, 2)


# --------------------------------------------------------------------------------- (h) rank-5 einsum


def grid_einsum(q, k, v, bias):  # [B, H, W, N, D]: attention inside each of W grid cells
    s = torch.einsum("bhwid,bhwjd->bhwij", q, k) * 0.3 + bias
    return torch.einsum("bhwij,bhwjd->bhwid", s.softmax(-1), v)


def block_einsum(q, k, v):  # [B, W, N, H, D] blocks, heads after the tokens
    s = torch.einsum("bwihd,bwjhd->bwhij", q, k) * 0.3
    return torch.einsum("bwhij,bwjhd->bwihd", s.softmax(-1), v)


def _grid_sigmoid(q, k, v, bias):
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    return sigmoid_attention(flat(q), flat(k), flat(v), bias, scale=0.3).unflatten(0, q.shape[:2])


def _block_sigmoid(q, k, v):
    lay = lambda x: x.permute(0, 1, 3, 2, 4).flatten(0, 1)  # noqa: E731  [B·W, H, N, D]
    out = sigmoid_attention(lay(q), lay(k), lay(v), scale=0.3)
    return out.unflatten(0, q.shape[:2]).permute(0, 1, 3, 2, 4)


# --------------------------------------------------------------------------------- (j) a floor at the masked value


def xglm_max_floor(q, k, v, keep):  # [B·H] bmm, the mask added on a 4-d view, torch.max(s, finfo.min)
    b, h, t, d = q.shape
    s = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, t, d).transpose(1, 2)) * 0.3
    mask = torch.zeros(b, 1, t, t).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    s = s.view(b, h, t, t) + mask
    s = torch.max(s, torch.full((), torch.finfo(s.dtype).min)).view(b * h, t, t)
    return torch.bmm(F.softmax(s, dim=-1), v.reshape(b * h, t, d)).view(b, h, t, d)


def clamp_floor_before_mask(q, k, v, keep):  # clamp(min=−1e4) on the scores, then the padding as −inf
    s = (q @ k.mT * 0.3).clamp(min=-1e4)
    return s.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1) @ v


# --------------------------------------------------------------------------------- (i) softmax written out


def written_out_row_max(q, k, v, keep):  # exp(s − max) / Σ, padding by masked_fill
    s = (q @ k.mT * 0.3).masked_fill(~keep[:, None, None, :], float("-inf"))
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def written_out_max_values(q, k, v):  # .max(...).values, the sum unsqueezed, a causal triangle
    s = q @ k.mT * 0.3 + torch.full((T, T), float("-inf")).triu(1)
    e = (s - s.max(-1, keepdim=True).values.detach()).exp()
    return e / e.sum(-1).unsqueeze(-1) @ v


def written_out_unshifted_reciprocal(q, k, v):  # exp(s) · (Σ exp(s))⁻¹ of scores upcast to float32
    e = torch.exp((q @ k.mT).float() * 0.25)
    return (e * torch.reciprocal(torch.sum(e, -1, keepdim=True))).to(v.dtype) @ v


def written_out_logsumexp(q, k, v):  # exp(s − logsumexp(s))
    s = q @ k.mT * 0.3
    return torch.exp(s - torch.logsumexp(s, -1, keepdim=True)) @ v


def written_out_log_softmax(q, k, v):  # log_softmax(s).exp(), one over the other in a chain
    a = F.log_softmax(q @ k.mT * 0.3, dim=-1).exp() @ v
    e = (a @ k.mT * 0.2).exp()
    return e * (1 / e.sum(-1, keepdim=True)) @ v


# --------------------------------------------------------------------------------- the cases

_x5 = lambda name, shape: tuple(torch.randn(shape, generator=_g(name)) for _ in range(3))  # noqa: E731


# --------------------------------------------------------------------------------- (k) sink logits


def sink_logits(q, k, v, sinks):  # gpt-oss: a learned logit per head joins the scores, then is dropped
    s = q @ k.mT * 0.3
    combined = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[-2], -1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1)[..., :-1] @ v


def sink_logits_first(q, k, v, keep, sinks):  # the sink column first, sliced off with [..., 1:]; a padding mask
    s = (q @ k.mT * D ** -0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
    column = sinks[None, :, None, None].expand(B, H, T, 1)
    return torch.softmax(torch.cat([column, s], dim=-1), dim=-1)[..., 1:] @ v


def _cases() -> dict[str, Case]:
    q, k, v = _qkv("main")
    keep = _keep()
    latent, pooled = LatentPooling().eval(), PooledQuery().eval()
    x = torch.randn(B, T, H * D, generator=_g("x"))
    ctx = torch.randn(1, H, 7, D, generator=_g("ctx"))
    swin, swin_rel = ShiftedWindow(False).eval(), ShiftedWindow(True).eval()
    xw = torch.randn(B * NW, N, H * D, generator=_g("xw"))
    img = torch.randn(B, H * D, 3, 2, generator=_g("img"))
    seq = torch.randn(B, D, 6, generator=_g("seq"))
    g5, b5 = _x5("grid", (B, H, 3, 4, D)), _x5("block", (B, 3, 4, H, D))
    bias5 = torch.randn(3, 4, 4, generator=_g("bias5"))
    ones = torch.ones(T, T, dtype=torch.bool).tril()
    sinks = torch.randn(H, generator=_g("sink logits"))
    with torch.no_grad():
        k_lat, v_lat = latent.heads(x)
    return {
        "a_bool_padding_added": Case(bool_padding_added, (q, k, v, keep),
                                     lambda q, k, v, m: _sig(q, k, v, m[:, None, None, :].float(), D ** -0.5),
                                     expect={"bias": ["add"]}),
        "a_bool_triangle_added": Case(bool_triangle_added, (q, k, v),
                                      lambda q, k, v: _sig(q, k, v, ones.float(), 1 / 3.0), expect={"causal": False}),
        "a_int_bucket_added": Case(int_relative_bucket_added, (q, k, v),
                                   lambda q, k, v: _sig(q, k, v, _bucket(), 0.25)),
        "b_distilbert_expand_as": Case(distilbert_expand_as, (q, k, v, keep),
                                       lambda q, k, v, m: _sig(q, k, v, m[:, None, None, :], D ** -0.5)),
        "b_distilbert_expand_as_dynamic": Case(distilbert_expand_as, (q, k, v, keep), dynamic=True),
        "b_ones_like_triu": Case(ones_like_triu, (q, k, v), lambda q, k, v: sigmoid_attention(
            q, k, v, is_causal=True, scale=0.3), expect={"causal": True, "has_bias": False}),
        "b_mask_from_scores_shape_dynamic": Case(mask_from_scores_shape, (q, k, v, keep), dynamic=True),
        "d_chained_query": Case(chained_query, (q, k, v), lambda q, k, v: _sig(_sig(q, k, v, None, 0.3), k, v,
                                                                               None, 0.2), sites=2),
        "d_chained_keys_values": Case(chained_keys_and_values, (q, k, v), sites=3),
        "e_latent_pooling": Case(latent, (x, keep), lambda x, m: _sig(
            latent.latent.expand(B, -1, -1, -1), k_lat, v_lat, m[:, None, None, :], D ** -0.5)),
        "e_latent_pooling_dynamic": Case(latent, (x, keep), dynamic=True),
        "e_pooled_query_3d": Case(pooled, (x[..., :D], keep), lambda x, m: _sig(
            pooled.query.expand(B, 1, D)[:, None], x[:, None], x[:, None], None, 0.5)[:, 0]),
        "e_shared_context": Case(shared_context, (q, ctx), lambda q, c: _sig(q, c.expand(B, -1, -1, -1),
                                                                             c.expand(B, -1, -1, -1), None, 0.3)),
        "f_swin_window_mask": Case(swin, (xw,), swin.sigmoid_reference),
        "f_swin_relative_bias_and_mask": Case(swin_rel, (xw,), swin_rel.sigmoid_reference),
        "f_swin_dynamic": Case(swin_rel, (xw,), dynamic=True),
        "g_channels_first": Case(channels_first, (img,), _channels_first_sigmoid),
        "g_sagan_bmm_permute": Case(sagan_bmm, (seq,), _sagan_sigmoid),
        "h_grid_einsum": Case(grid_einsum, g5 + (bias5,), _grid_sigmoid),
        "h_block_einsum": Case(block_einsum, b5, _block_sigmoid),
        "h_grid_einsum_dynamic": Case(grid_einsum, g5 + (bias5,), dynamic=True),
        "j_xglm_max_floor": Case(xglm_max_floor, (q, k, v, keep),
                                 lambda q, k, v, m: _sig(q, k, v, m[:, None, None, :], 0.3)),
        "j_clamp_floor_before_mask": Case(clamp_floor_before_mask, (q, k, v, keep),
                                          lambda q, k, v, m: _sig(q, k, v, m[:, None, None, :], 0.3)),
        "i_written_out_row_max": Case(written_out_row_max, (q, k, v, keep),
                                      lambda q, k, v, m: _sig(q, k, v, m[:, None, None, :], 0.3)),
        "i_written_out_row_max_dynamic": Case(written_out_row_max, (q, k, v, keep), dynamic=True),
        "i_written_out_max_values": Case(written_out_max_values, (q, k, v), lambda q, k, v: sigmoid_attention(
            q, k, v, is_causal=True, scale=0.3), expect={"causal": True}),
        "i_written_out_unshifted_reciprocal": Case(written_out_unshifted_reciprocal, (q, k, v),
                                                   lambda q, k, v: _sig(q, k, v, None, 0.25)),
        "i_written_out_logsumexp": Case(written_out_logsumexp, (q, k, v), lambda q, k, v: _sig(q, k, v, None, 0.3)),
        "i_written_out_log_softmax": Case(written_out_log_softmax, (q, k, v), lambda q, k, v: _sig(
            _sig(q, k, v, None, 0.3), k, v, None, 0.2), sites=2),
        # sigmoid drops the sink logits (a key of value 0 adds nothing to a sigmoid row): the op without them
        "k_sink_logits": Case(sink_logits, (q, k, v, sinks), lambda q, k, v, s: _sig(q, k, v, None, 0.3),
                              expect={"sink_logits": True}),
        "k_sink_logits_first": Case(sink_logits_first, (q, k, v, keep, sinks),
                                    lambda q, k, v, m, s: _sig(q, k, v, m[:, None, None, :], D ** -0.5),
                                    expect={"sink_logits": True, "bias": ["keep"]}),
        "k_sink_logits_dynamic": Case(sink_logits, (q, k, v, sinks), dynamic=True, expect={"sink_logits": True}),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_class_is_rewritten_exactly(name):
    case = CASES[name]
    compiled, report = _compile(case.fn, "softmax", case.dynamic)
    with torch.no_grad():
        got, want = compiled(*case.inputs), case.fn(*case.inputs)
    sites = report.attention_sites()
    assert len(sites) == case.sites and all(s.status == "rewritten" for s in sites), report
    assert all(any(n.startswith("certified") for n in s.notes) for s in sites), report
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for key, value in (case.expect or {}).items():
        assert sites[0].spec[key] == value, (key, sites[0].spec)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.sigmoid is not None))
def test_class_rewritten_to_sigmoid_means_what_it_says(name):
    case = CASES[name]
    compiled, report = _compile(case.fn, "sigmoid")
    with torch.no_grad():
        got, want = compiled(*case.inputs), case.sigmoid(*case.inputs)
    sites = report.attention_sites()
    assert len(sites) == case.sites and all(s.status == "rewritten" for s in sites), report
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- near misses


def nm_bool_from_scores_added(q, k, v):  # (a) the added bool reads the scores' values
    s = q @ k.mT * 0.3
    return torch.softmax(s + (s > 0), -1) @ v


def nm_expand_as_of_score_values(q, k, v):  # (b) looks shape-only, but the mask is made from the scores
    s = q @ k.mT * 0.3
    return s.masked_fill((s < s.mean(-1, keepdim=True)).expand_as(s), float("-inf")).softmax(-1) @ v


def nm_ones_like_or_scores(q, k, v):  # (b) ones_like(s) is shape-only; "| (s < 0)" is not
    s = q @ k.mT * 0.3
    return s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1) | (s < 0), -1e9).softmax(-1) @ v


def nm_chained_second_over_queries(q, k, v):  # (d) chained, the second softmax over the queries
    a = torch.softmax((q @ k.mT) * 0.3, -1) @ v
    return torch.softmax((a @ k.mT) * 0.2, -2) @ v


def nm_query_shared_by_heads(q, k, v):  # (e) a query [B, 1, T, D] broadcast over the heads
    return torch.softmax(q.mean(1, keepdim=True) @ k.mT * 0.3, -1) @ v


class NmLatentMemory(nn.Module):  # (e) latent queries against learned keys and values: no sequence
    def __init__(self):
        super().__init__()
        self.latent, self.keys, self.values = (nn.Parameter(torch.randn(H, s, D, generator=_g(f"m{s}")))
                                               for s in (3, 4, 5))

    def forward(self, x):
        return torch.softmax(self.latent @ self.keys[:, :3].mT, -1) @ self.values[:, :3] + x.mean()


def nm_windows_mixed(x):  # (f) the 5-D view transposed: probabilities of one window meet another's values
    q = k = v = x  # [B·nW, H, N, D]
    attn = (q @ k.mT * 0.3).view(B, NW, H, N, N).transpose(0, 1).reshape(-1, H, N, N)
    return attn.softmax(-1) @ v


def nm_softmax_within_key_blocks(x):  # (f) a 5-D view that splits the keys: softmax over half of them
    s = (x @ x.mT * 0.3).view(B * NW, H, N, 2, N // 2)
    return s.softmax(-1).view(B * NW, H, N, N) @ x


def nm_values_right_untransposed(x):  # (g) the probabilities on the right without a transpose
    b, c, hh, ww = x.shape
    f = x.view(b, H, c // H, hh * ww)
    return f @ ((f.transpose(-2, -1) @ f) * 0.3).softmax(-1)


def nm_einsum5_sums_over_queries(q, k, v):  # (h) the value einsum contracts the query index
    s = torch.einsum("bhwid,bhwjd->bhwij", q, k) * 0.3
    return torch.einsum("bhwij,bhwid->bhwjd", s.softmax(-1), v)


def nm_written_out_with_eps(q, k, v):  # (i) e / (Σ e + 1): not a softmax
    s = q @ k.mT * 0.3
    e = (s - s.amax(-1, keepdim=True)).exp()
    return e / (e.sum(-1, keepdim=True) + 1.0) @ v


def nm_written_out_over_queries(q, k, v):  # (i) exp normalised over the queries
    e = (q @ k.mT * 0.3).exp()
    return e / e.sum(-2, keepdim=True) @ v


def nm_written_out_other_sum(q, k, v):  # (i) exp(s) over the sum of another exp
    s = q @ k.mT * 0.3
    e, f = s.exp(), (s * 0.5).exp()
    return e / f.sum(-1, keepdim=True) @ v


def nm_written_out_log_softmax_of_queries(q, k, v):  # (i) log_softmax over the queries, then exp
    return F.log_softmax(q @ k.mT * 0.3, dim=-2).exp() @ v


def nm_floor_from_data(q, k, v):  # (j) max(s, another product): a floor read from the data, not a mask value
    return torch.max(q @ k.mT * 0.3, q @ q.mT * 0.2).softmax(-1) @ v


NEAR_MISSES = {
    "j_floor_from_data": (nm_floor_from_data, lambda: _qkv("nm")),
    "i_written_out_with_eps": (nm_written_out_with_eps, lambda: _qkv("nm")),
    "i_written_out_over_queries": (nm_written_out_over_queries, lambda: _qkv("nm")),
    "i_written_out_other_sum": (nm_written_out_other_sum, lambda: _qkv("nm")),
    "i_written_out_log_softmax_of_queries": (nm_written_out_log_softmax_of_queries, lambda: _qkv("nm")),
    "a_bool_from_scores_added": (nm_bool_from_scores_added, lambda: _qkv("nm")),
    "b_expand_as_of_score_values": (nm_expand_as_of_score_values, lambda: _qkv("nm")),
    "b_ones_like_or_scores": (nm_ones_like_or_scores, lambda: _qkv("nm")),
    "e_query_shared_by_heads": (nm_query_shared_by_heads, lambda: _qkv("nm")),
    "e_latent_memory": (NmLatentMemory().eval(), lambda: (torch.randn(B, T),)),
    "f_windows_mixed": (nm_windows_mixed, lambda: (torch.randn(B * NW, H, N, D, generator=_g("w")),)),
    "f_softmax_within_key_blocks": (nm_softmax_within_key_blocks,
                                    lambda: (torch.randn(B * NW, H, N, D, generator=_g("w")),)),
    "g_values_right_untransposed": (nm_values_right_untransposed,
                                    lambda: (torch.randn(B, H * D, 3, 2, generator=_g("img")),)),
    "h_einsum5_sums_over_queries": (nm_einsum5_sums_over_queries, lambda: _x5("grid", (B, H, 3, 4, D))),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_miss_stays_untouched(name):
    fn, inputs = NEAR_MISSES[name]
    inputs = inputs()
    compiled, report = _compile(fn, "softmax")
    with torch.no_grad():
        got, want = compiled(*inputs), fn(*inputs)
    assert not report.rewritten, f"FALSE POSITIVE:\n{report}"
    assert torch.equal(got, want)


def test_a_chain_with_a_near_miss_rewrites_only_the_attention():
    q, k, v = _qkv("chain")
    compiled, report = _compile(nm_chained_second_over_queries, "softmax")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), nm_chained_second_over_queries(q, k, v), rtol=1e-5, atol=1e-6)
    assert len(report.rewritten) == 1 and len(report.sites) == 2, report


# --------------------------------------------------------------------------------- (i) module paths


class _Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v


class ReadThroughDict(nn.Module):
    """Blocks reached through the module's ``__dict__`` (as code that walks ``vars(module)`` does)."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Attn(), _Attn()])

    def forward(self, q, k, v):
        for block in vars(self)["_modules"]["transformer_blocks"]:
            q = block(q, k, v)
        return q


def test_module_paths_read_as_the_user_names_them():
    q, k, v = _qkv("paths")
    compiled, report = _compile(ReadThroughDict(), "softmax")
    compiled(q, k, v)
    assert [s.module for s in report.sites] == ["transformer_blocks.0", "transformer_blocks.1"], report
    assert all(s.status == "rewritten" for s in report.sites), report


# --------------------------------------------------------------------------------- (f) windows of an unspelled batch
# timm's WindowAttention views the scores as ``attn.view(-1, nW, H, N, N)``: the number of images is left to -1,
# so the window mask, which broadcasts over it, is expanded to sizes read from the scores' own operands.


class InferredBatchWindows(nn.Module):
    """Shifted windows whose 5-D view of the scores leaves the image count to -1; ``spelling`` picks how the
    per-window mask [nW, N, N] meets the view: ``unsqueeze`` (timm), ``rank`` (a [nW, 1, N, N] mask aligned by
    rank alone), ``bool`` (a bool keep-mask through ``masked_fill`` on a ``reshape``)."""

    def __init__(self, spelling: str):
        super().__init__()
        g = _g(f"inferred-{spelling}")
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.rel = nn.Parameter(torch.randn(H, N, N, generator=g))
        self.register_buffer("blocked", torch.rand(NW, N, N, generator=g) > 0.6)
        self.blocked[:, :, 0] = False  # every query keeps a key
        self.spelling = spelling

    def window_mask(self) -> torch.Tensor:
        return torch.zeros(NW, N, N).masked_fill(self.blocked, -100.0)

    def qkv_heads(self, x):
        b_, n, _ = x.shape
        return self.qkv(x).reshape(b_, n, 3, H, D).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        b_, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        attn = (q @ k.transpose(-2, -1)) * D ** -0.5 + self.rel.unsqueeze(0)
        if self.spelling == "unsqueeze":
            attn = attn.view(-1, NW, H, n, n) + self.window_mask().unsqueeze(1).unsqueeze(0)
        elif self.spelling == "rank":
            attn = attn.view(-1, NW, H, n, n) + self.window_mask()[:, None]
        else:
            attn = attn.reshape(-1, NW, H, n, n).masked_fill(self.blocked[:, None], float("-inf"))
        attn = attn.view(-1, H, n, n).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b_, n, c)

    def sigmoid_reference(self, x):
        q, k, v = self.qkv_heads(x)
        images = x.shape[0] // NW
        if self.spelling == "bool":
            mask = torch.zeros(NW, N, N).masked_fill(self.blocked, float("-inf"))
        else:
            mask = self.window_mask()
        mask = mask.repeat(images, 1, 1).unsqueeze(1) + self.rel  # window w of image b at row b·nW + w
        out = sigmoid_attention(q, k, v, mask, scale=D ** -0.5)
        return out.transpose(1, 2).reshape(x.shape)


def _windows(images: int, name: str = "xw-inferred") -> torch.Tensor:
    return torch.randn(images * NW, N, H * D, generator=_g(f"{name}-{images}"))


@pytest.mark.parametrize("spelling", ["unsqueeze", "rank", "bool"])
def test_windows_of_an_unspelled_batch_are_rewritten_exactly(spelling):
    model = InferredBatchWindows(spelling).eval()
    x = _windows(B)
    compiled, report = _compile(model, "softmax")
    with torch.no_grad():
        got, want = compiled(x), model(x)
    sites = report.attention_sites()
    assert len(sites) == 1 and sites[0].status == "rewritten", report
    assert any(n.startswith("certified") for n in sites[0].notes), report
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["unsqueeze", "bool"])
def test_windows_of_an_unspelled_batch_mean_what_they_say(spelling):
    """Rewritten to sigmoid attention, the site equals sigmoid attention with each window's own mask: the
    expanded mask is regrouped as the scores are (window w of image b at row b·nW + w), not just broadcast."""
    model = InferredBatchWindows(spelling).eval()
    x = _windows(3)  # three images: a mask regrouped in the wrong order would be caught
    compiled, report = _compile(model, "sigmoid")
    with torch.no_grad():
        got, want = compiled(x), model.sigmoid_reference(x)
    assert len(report.rewritten) == 1, report
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_windows_of_an_unspelled_batch_stay_dynamic():
    """Under ``dynamic=True`` the image count stays symbolic: a second batch size reuses the rewritten graph
    (no recompilation, no guard on the batch) and is exact too."""
    model = InferredBatchWindows("unsqueeze").eval()
    report = Report()
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return attnrewrite_backend(gm, example_inputs, options={"to": "softmax", "compiler": "eager"},
                                   _report_sink=report.merge)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for images in (3, 5):  # (not 2: 2·nW would equal N, and duck sizing would tie them)
            x = _windows(images, "dyn")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1, f"recompiled for a second batch size ({len(calls)} graphs)"
    sites = report.attention_sites()
    assert len(sites) == 1 and sites[0].status == "rewritten", report
    assert any(n.startswith("certified") for n in sites[0].notes), report


def per_image_key_mask(x, pad):
    """Windows x [B·nW, H, N, D] viewed ``(B, -1, H, N, N)`` (the window count left to -1) to add a per-image
    key mask [B, N]: it broadcasts over the windows, a dim the view does not spell out."""
    s = (x @ x.mT * 0.3).view(pad.shape[0], -1, H, N, N) + pad[:, None, None, None, :]
    return s.view(-1, H, N, N).softmax(-1) @ x


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_per_image_mask_over_unspelled_windows_is_rewritten_exactly(dynamic):
    compiled, report = _compile(per_image_key_mask, "softmax", dynamic)
    with torch.no_grad():
        for images in ((3, 5) if dynamic else (3,)):
            x = torch.randn(images * NW, H, N, D, generator=_g(f"per-image-{images}"))
            pad = torch.zeros(images, N)
            pad[1, -1] = -100.0  # image 1 pads its last key in every window
            torch.testing.assert_close(compiled(x, pad), per_image_key_mask(x, pad), rtol=1e-5, atol=1e-5)
    sites = report.attention_sites()
    assert sites and all(s.status == "rewritten" for s in sites), report
    assert all(any(n.startswith("certified") for n in s.notes) for s in sites), report


def nm_window_mask_widens_the_scores(x):
    """The mask [2, 1, nW, 1, N, N] broadcasts the viewed scores to one more dim (two masked copies of each
    window, then folded into the batch by the -1 view back): not a mask of the scores, so not rewritten."""
    s = (x @ x.mT * 0.3).view(-1, NW, H, N, N)
    widen = torch.zeros(2, 1, NW, 1, N, N)
    widen[1, ..., -1] = -100.0
    s = (s + widen).view(-1, H, N, N)
    return s.softmax(-1) @ x.repeat(2, 1, 1, 1)


def test_a_window_mask_that_widens_the_scores_stays_skipped():
    x = torch.randn(B * NW, H, N, D, generator=_g("widen"))
    compiled, report = _compile(nm_window_mask_widens_the_scores, "softmax")
    with torch.no_grad():
        got, want = compiled(x), nm_window_mask_widens_the_scores(x)
    assert not report.rewritten, f"FALSE POSITIVE:\n{report}"
    assert [s.status for s in report.sites] == ["skipped"], report
    assert "larger shape" in report.sites[0].reason, report
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------- attention not read


def two_null_key_columns(q, k, v, nulls):  # two extra score columns (null keys): not one sink logit per head
    s = q @ k.mT * 0.3
    combined = torch.cat([s, nulls.reshape(1, -1, 1, 2).expand(s.shape[0], -1, s.shape[-2], -1)], dim=-1)
    return F.softmax(combined, dim=-1)[..., :-2] @ v


def softmax_of_concatenated_features(x, y, v):  # not scores: no product before the concatenation
    return torch.softmax(torch.cat([x, y], dim=-1), dim=-1)[..., :T] @ v


def test_attention_with_extra_score_columns_is_reported_as_left_as_it_was():
    """A form the matcher does not read must never be silent: a warning names it, strict raises.  (One column of
    sink logits per head is read: the k_sink_logits cases above.)"""
    from attnrewrite.rewriter.failures import RewriteFailed, RewriteWarning

    q, k, v = _qkv("sinks")
    nulls = torch.randn(H, 2, generator=_g("null keys"))
    compiled, report = _compile(two_null_key_columns, "softmax")
    with pytest.warns(RewriteWarning, match="2 extra score columns"):
        got = compiled(q, k, v, nulls)
    assert torch.equal(got, two_null_key_columns(q, k, v, nulls))
    assert [s.attention_left_as_it_was for s in report.sites] == [True], report
    torch._dynamo.reset()
    backend = functools.partial(attnrewrite_backend, options={"to": "sigmoid", "compiler": "eager", "strict": True})
    with pytest.raises(RewriteFailed, match="one column of sink logits"):
        torch.compile(two_null_key_columns, backend=backend)(q, k, v, nulls)


def test_a_softmax_of_concatenated_features_is_no_attention_left_behind():
    x, y, v = _qkv("features")
    compiled, report = _compile(softmax_of_concatenated_features, "softmax")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compiled(x, y, v)
    assert torch.equal(got, softmax_of_concatenated_features(x, y, v))
    assert not any(s.attention_left_as_it_was for s in report.sites), report


def clamped_after_mask(q, k, v, keep):  # a clamp on both sides after the mask: masked keys become visible
    s = (q @ k.mT * 0.3).masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.clamp(min=-5.0, max=5.0).softmax(-1) @ v


def test_attention_whose_score_ops_are_not_read_is_reported():
    """Scores from q·kᵀ whose probabilities meet the values are attention: when an op between them cannot be
    read (here a clamp that un-masks the padding), the site is left with a warning, never silently."""
    from attnrewrite.rewriter.failures import RewriteWarning

    q, k, v = _qkv("clamped")
    keep = _keep()
    compiled, report = _compile(clamped_after_mask, "sigmoid")
    with pytest.warns(RewriteWarning, match="does not rewrite"):
        got = compiled(q, k, v, keep)
    assert torch.equal(got, clamped_after_mask(q, k, v, keep))
    assert [s.attention_left_as_it_was for s in report.sites] == [True], report


W = 2  # half window of the banded spelling below


def banded_into_a_buffer(q, k, v):
    """Sliding-window attention written as Longformer writes it: the scores of each query against its 2W+1
    neighbours are computed by one product of shifted key copies, written into a zero buffer (in place),
    masked at the edges, soft-maxed, and met with the values the same way."""
    kp = F.pad(k, (0, 0, W, W))
    vp = F.pad(v, (0, 0, W, W))
    keys = kp.unfold(2, 2 * W + 1, 1).transpose(-1, -2)  # [B, H, T, 2W+1, D]
    banded = torch.einsum("bhtd,bhtwd->bhtw", q, keys) * 0.3
    scores = torch.zeros(B, H, T, 2 * W + 1)  # no data edge from the product: only the write below
    scores[...] = banded
    pos = torch.arange(T)[:, None] + torch.arange(2 * W + 1)[None, :] - W
    scores = scores.masked_fill((pos < 0) | (pos >= T), float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhtw,bhtwd->bhtd", probs, vp.unfold(2, 2 * W + 1, 1).transpose(-1, -2))


def rolled_scores(q, k, v):  # an op the matcher does not read (a roll of the key axis) between the products
    return torch.roll(q @ k.mT * 0.3, 1, dims=-1).softmax(-1) @ v


@pytest.mark.parametrize("fn", [banded_into_a_buffer, rolled_scores])
def test_attention_the_matcher_cannot_follow_is_reported(fn):
    """Attention the matcher cannot walk (in-place writes into a buffer, unfold, ops it does not read): a
    product of two activations reaches the softmax and the probabilities meet another product, so the site
    is reported as attention left as it was — a warning naming the products, RewriteFailed under strict —
    never a silent near miss."""
    from attnrewrite.rewriter.failures import RewriteFailed, RewriteWarning

    q, k, v = _qkv(fn.__name__)
    compiled, report = _compile(fn, "sigmoid")
    with pytest.warns(RewriteWarning, match="product of two activations"):
        got = compiled(q, k, v)
    assert torch.equal(got, fn(q, k, v))
    assert [s.attention_left_as_it_was for s in report.sites] == [True], report
    torch._dynamo.reset()
    backend = functools.partial(attnrewrite_backend, options={"to": "sigmoid", "compiler": "eager", "strict": True})
    with pytest.raises(RewriteFailed, match="product of two activations"):
        torch.compile(fn, backend=backend)(q, k, v)


class RouterAndPooling(nn.Module):
    """Softmaxes that are not attention though a product is near: a router's probabilities mix expert
    outputs by a product (its logits come from a projection), attention pooling (scores from one learned
    query, a weight), and similarity logits that no second product meets."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, 3)
        self.experts = nn.Linear(D, 3 * D)
        self.query = nn.Parameter(torch.randn(D, 1))

    def forward(self, x):  # x [B, T, D]
        route = self.gate(x).softmax(-1)  # [B, T, 3]
        mixed = (route.unsqueeze(-2) @ self.experts(x).view(B, T, 3, D)).squeeze(-2)
        pooled = (x @ self.query).mT.softmax(-1) @ x  # [B, 1, D]
        similar = torch.roll(mixed @ x.mT, 1, dims=-1).softmax(-1).sum(-1)
        return mixed + pooled + similar[..., None]


def test_routers_pooling_and_lone_similarities_are_not_reported_as_attention():
    model = RouterAndPooling()
    x = torch.randn(B, T, D, generator=_g("router"))
    compiled, report = _compile(model, "sigmoid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            got = compiled(x)
    with torch.no_grad():
        assert torch.equal(got, model(x))
    assert not report.rewritten, f"FALSE POSITIVE:\n{report}"
    assert not any(s.attention_left_as_it_was for s in report.sites), report
