"""Random spellings of attention, and near misses that are not attention: the matcher's fuzz targets.

:func:`draw_attention` writes one attention computation in a randomly chosen way — scale
placement and spelling, bool / additive / ``masked_fill`` / ``where`` masks, transposes and
permutes, ``einsum`` / ``matmul`` / ``bmm`` / ``baddbmm``, casts, grouped kv heads through
expand+reshape or ``repeat_interleave``, dropout with p = 0, batch-first or sequence-first
inputs, soft-capping, BLOOM-style 3-D scores, bool or integer tensors added to the scores, masks
built from the scores' shape only (``expand_as``, ``ones_like(s).triu(1)``), a query shared by the
batch, values on the left (``(vᵀ pᵀ)ᵀ``), Swin's 5-D view with a mask per window, rank-5 einsum,
a row max subtracted by hand before the softmax (its stabiliser), a second attention whose query is
the first one's output, or ``F.scaled_dot_product_attention`` —
and says what the matcher must find.  :func:`draw_near_miss` writes something that looks like
attention but is not (softmax over the wrong dim, the value product on the wrong side, scores
reused by a non-elementwise op, shapes that do not line up, learned memories, ...): it must
stay untouched.

Both take a ``choose(name, options) -> option`` callback, so the same generator serves
hypothesis (``data.draw(st.sampled_from(options))``, in ``tests/patterns/test_fuzz.py``) and a
plain seeded RNG (``bench/fuzz_matcher.py``).  Everything is parameter-free and tiny
(B = 2, T ≤ 7, D ≤ 8), so one example compiles in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Choose = Callable[[str, Sequence[Any]], Any]

BATCH = 2
SOFTCAP = 5.0


@dataclass
class Program:
    """One generated computation.

    Attributes:
        module: an ``nn.Module`` (eval mode) computing it from ``inputs``.
        inputs: positional tensors (float32 activations, a bool key-padding mask when used).
        attention: True when it is one attention site that must be rewritten, False for a near miss.
        choices: the choices made, by name (printed when an example fails).
        expect: for attention, spec fields the (first) site must have (``causal``, ``kv_groups``,
            ``has_bias``, ``score_mod``, and ``scale`` when it is predictable).
        sites: attention sites in it, all to be rewritten.
    """

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    attention: bool
    choices: dict[str, Any]
    expect: dict[str, Any] = field(default_factory=dict)
    sites: int = 1  # attention sites (a chained spelling has two)

    def __str__(self) -> str:
        kind = "attention" if self.attention else "near miss"
        return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in self.choices.items())


class _Fn(nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class _Recorder:
    """Calls ``choose`` and remembers every choice."""

    def __init__(self, choose: Choose):
        self.choose, self.choices = choose, {}

    def __call__(self, name: str, options: Sequence[Any]) -> Any:
        value = self.choose(name, list(options))
        self.choices[name] = value
        return value


# --------------------------------------------------------------------------- shapes and pieces


@dataclass
class _Dims:
    heads: int
    kv_heads: int
    dim: int
    t_q: int
    t_k: int
    seq_first: bool

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def _dims(c: _Recorder, allow_cross: bool = True) -> _Dims:
    heads = c("heads", [2, 4])
    kv_heads = c("kv_heads", [h for h in (heads, 2, 1) if h <= heads and heads % h == 0])
    t_q = c("t_q", [4, 6])
    t_k = c("t_k", [t_q, 5, 7]) if allow_cross else t_q
    return _Dims(heads, kv_heads, c("head_dim", [4, 8]), t_q, t_k, c("seq_first", [False, True]))


def _inputs(d: _Dims, padding: bool) -> tuple[torch.Tensor, ...]:
    def act(t, h):
        shape = (t, BATCH, h * d.dim) if d.seq_first else (BATCH, t, h * d.dim)
        return torch.randn(shape)

    tensors = (act(d.t_q, d.heads), act(d.t_k, d.kv_heads), act(d.t_k, d.kv_heads))
    if padding:
        keep = torch.ones(BATCH, d.t_k, dtype=torch.bool)
        keep[1, d.t_k - 2:] = False  # right padding: every query still sees a key
        tensors += (keep,)
    return tensors


def _split_heads(x: torch.Tensor, h: int, d: _Dims, spelling: str) -> torch.Tensor:
    """[B, T, h·D] (or [T, B, h·D]) → [B, h, T, D]; ``"bthd"`` keeps [B, T, h, D]."""
    if d.seq_first:
        x = x.transpose(0, 1) if spelling != "permute" else x.permute(1, 0, 2)
    b, t = x.shape[0], x.shape[1]
    if spelling == "bthd":
        return x.view(b, t, h, d.dim)
    if spelling == "permute":
        return x.view(b, t, h, d.dim).permute(0, 2, 1, 3)
    if spelling == "unflatten":
        return x.unflatten(-1, (h, d.dim)).transpose(1, 2)
    return x.reshape(b, t, h, d.dim).transpose(1, 2)


def _repeat_kv(x: torch.Tensor, n: int, spelling: str) -> torch.Tensor:
    if n == 1 or spelling in ("none", "broadcast", "enable_gqa"):
        return x
    if spelling == "repeat_interleave":
        return x.repeat_interleave(n, dim=1)
    b, h, t, dd = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, dd).reshape(b, h * n, t, dd)


def _transposed(k: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "transpose_23":
        return k.transpose(2, 3)
    if spelling == "permute":
        return k.permute(0, 1, 3, 2)
    if spelling == "mT":
        return k.mT
    return k.transpose(-2, -1)


def _scaled(x: torch.Tensor, c: float, spelling: str) -> torch.Tensor:
    """x · c, written one of several ways."""
    if spelling == "div_sqrt":
        return x / (1.0 / c)
    if spelling == "torch_mul":
        return torch.mul(x, c)
    if spelling == "method_div":
        return x.div(1.0 / c)
    if spelling == "rmul":
        return c * x
    return x * c


def _causal_keep(t_q: int, t_k: int) -> torch.Tensor:
    return torch.ones(t_q, t_k, dtype=torch.bool).tril()


def _apply_mask(s: torch.Tensor, mask: str, keep: torch.Tensor | None, t_q: int, t_k: int,
                heads_3d: int | None = None) -> torch.Tensor:
    """Mask the scores: [B, H, Tq, Tk], or [B·H, Tq, Tk] when ``heads_3d`` is H (masks are then
    built per batch and repeated over the heads, as 3-D attention code does)."""
    if mask == "none":
        return s

    def fit(m: torch.Tensor) -> torch.Tensor:
        if heads_3d is None or m.dim() < 4:
            return m
        return m.expand(m.shape[0], heads_3d, m.shape[2], m.shape[3]).reshape(-1, m.shape[2], m.shape[3])

    causal = _causal_keep(t_q, t_k)
    if mask == "causal_ones_like_triu":  # built from the scores' shape only
        return s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    if mask == "int_added":  # an integer relative-position bucket added: a bias
        return s + (torch.arange(t_k)[None, :] - torch.arange(t_q)[:, None]).clamp(-2, 2)
    if mask == "causal_bool_added":  # a bool triangle added: +1 below the diagonal, a bias (not a mask)
        return s + causal
    if mask == "causal_masked_fill":
        return s.masked_fill(~causal, float("-inf"))
    if mask == "causal_where":
        return torch.where(causal, s, torch.finfo(s.dtype).min)
    if mask == "causal_additive":
        return s + torch.zeros(t_q, t_k).masked_fill(~causal, float("-inf"))
    if mask == "causal_triu_fill":
        return s.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool).triu(1), -1e9)
    pad = keep[:, None, None, :]
    if mask == "padding_masked_fill":
        return s.masked_fill(fit(~pad), float("-inf"))
    if mask == "padding_additive":
        return s + fit((1.0 - pad.float()) * -1e9)
    if mask == "padding_where":
        return torch.where(fit(pad), s, float("-inf"))
    if mask == "padding_bool_added":
        return s + fit(pad)
    if mask == "padding_expand_as":  # DistilBERT: the mask expanded with expand_as(scores), a shape-only use
        return s.masked_fill(fit((keep == 0).view(keep.shape[0], 1, 1, t_k)).expand_as(s), float("-inf"))
    if mask == "causal_and_padding":  # HF style: one additive mask from causal & padding
        both = causal[None, None] & pad
        return s + fit(torch.where(both, 0.0, torch.finfo(s.dtype).min))
    raise ValueError(mask)


_CAUSAL = ("causal_masked_fill", "causal_where", "causal_additive", "causal_triu_fill", "causal_and_padding",
           "causal_ones_like_triu")
_PADDED = ("padding_masked_fill", "padding_additive", "padding_where", "causal_and_padding", "padding_bool_added",
           "padding_expand_as")
_BIASES = ("int_added", "causal_bool_added", "padding_bool_added")  # bool/int tensors added: biases, not masks


def _softmax(s: torch.Tensor, spelling: str, dim: int = -1) -> torch.Tensor:
    if spelling == "functional":
        return F.softmax(s, dim=dim)
    if spelling == "method":
        return s.softmax(dim)
    if spelling == "upcast_float":
        return torch.softmax(s.float(), dim=dim).type_as(s)
    if spelling == "dtype_f32":
        return F.softmax(s, dim=dim, dtype=torch.float32).to(s.dtype)
    if spelling == "positive_dim":
        return torch.softmax(s, dim=dim % s.dim())
    if spelling == "written_out":  # exp(s − row max) / Σ
        e = torch.exp(s - s.amax(dim=dim, keepdim=True))
        return e / e.sum(dim=dim, keepdim=True)
    if spelling == "log_softmax_exp":
        return F.log_softmax(s, dim=dim).exp()
    return torch.softmax(s, dim)


def _stabilised(s: torch.Tensor, spelling: str) -> torch.Tensor:
    """s minus its row max over the keys, subtracted by hand before the softmax (ViT/Swin variants, CogView's
    PB-relax, fp16 code): softmax(s − max s) is softmax(s), and the matcher reads the max as a stabiliser."""
    if spelling == "amax":
        return s - s.amax(-1, keepdim=True)
    if spelling == "max_values":
        return s - s.max(dim=-1, keepdim=True).values
    if spelling == "max_getitem_detached":
        return s - torch.max(s, -1, keepdim=True)[0].detach()
    if spelling == "amax_of_detached":
        return s - s.detach().amax(dim=-1, keepdim=True)
    if spelling == "max_unsqueezed":
        return s - s.max(-1)[0].unsqueeze(-1)
    if spelling == "upcast_both":  # each side cast on its own: two cast nodes of one tensor
        return s.float() - s.float().amax(-1, keepdim=True)
    return s


def _dropout(p: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "p0":
        return F.dropout(p, p=0.0, training=True)
    if spelling == "eval":
        return F.dropout(p, 0.1, training=False)
    return p


def _alibi(heads: int, t_k: int) -> torch.Tensor:
    """[1, H, 1, Tk]: a per-head linear bias over key positions (ALiBi-like)."""
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(heads)])
    return (slopes[:, None, None] * torch.arange(t_k, dtype=torch.float32)[None, None, :])[None]


def _merge_heads(out: torch.Tensor, d: _Dims, layout: str) -> torch.Tensor:
    if layout == "bthd":  # [B, T, H, D]
        return out.reshape(out.shape[0], out.shape[1], -1)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


# --------------------------------------------------------------------------- real attention


def draw_attention(choose: Choose) -> Program:
    """One attention site, spelled at random; the matcher must rewrite it with the expected spec."""
    c = _Recorder(choose)
    family = c("family", ["eager", "eager", "sdpa"])
    return _draw_sdpa(c) if family == "sdpa" else _draw_eager(c)


def _eager_choices(c: _Recorder, d: _Dims) -> dict[str, Any]:
    o: dict[str, Any] = {}
    o["product"] = c("product", ["at", "torch_matmul", "einsum", "bmm", "baddbmm"])
    three_d = o["product"] in ("bmm", "baddbmm")
    o["layout"] = c("bmm_layout", ["view4d", "stay3d"]) if three_d else "4d"
    gqa = ["none"] if d.groups == 1 else ["repeat_kv", "repeat_interleave"]
    if d.kv_heads == 1 and o["product"] in ("at", "torch_matmul"):
        gqa.append("broadcast")  # a single kv head broadcast by matmul: multi-query attention
    o["gqa"] = c("gqa", gqa)
    heads = ["transpose", "permute", "unflatten"] + (["bthd"] if o["product"] == "einsum" and d.groups == 1 else [])
    o["heads"] = c("heads_spelling", heads)
    o["key_t"] = c("key_t", ["transpose_m2m1", "transpose_23", "permute", "mT"])
    o["scale_at"] = c("scale_at", ["scores", "q", "q_before_heads", "qk_split", "none"]
                      + (["alpha"] if o["product"] == "baddbmm" else []))
    o["scale_spelling"] = c("scale_spelling", ["mul", "div_sqrt", "torch_mul", "method_div", "rmul"])
    causal_ok = d.t_q == d.t_k
    o["mask"] = c("mask", ["none", *(_CAUSAL if causal_ok else ()), "padding_masked_fill", "padding_additive",
                           "padding_where", "padding_bool_added", "padding_expand_as", "int_added",
                           *(("causal_bool_added",) if causal_ok else ())])
    o["softcap"] = c("softcap", [False, True])
    plain_4d = o["product"] in ("at", "torch_matmul") and o["layout"] == "4d"
    # a query shared by the batch ([H, Tq, D], a learned latent): matmul broadcasts it
    o["q_broadcast"] = c("q_broadcast", [False, True]) if plain_4d and o["scale_at"] != "q_before_heads" else False
    o["values_left"] = c("values_left", [False, True]) if plain_4d else False  # (vᵀ @ pᵀ)ᵀ, channels-first
    o["rank5"] = c("rank5", [False, True]) if o["product"] == "einsum" and o["heads"] != "bthd" else False
    o["window_view"] = (c("window_view", [False, True]) if o["layout"] == "4d" and not o["softcap"] and not o["rank5"]
                        else False)
    o["chain"] = c("chain", [False, True]) if plain_4d else False  # the output is the next attention's query
    o["alibi"] = c("alibi", [False, True])
    o["softmax"] = c("softmax", ["torch", "functional", "method", "upcast_float", "dtype_f32", "positive_dim",
                                 "written_out", "log_softmax_exp"])
    o["stabilise"] = c("stabilise", ["none", "amax", "max_values", "max_getitem_detached", "amax_of_detached",
                                     "max_unsqueezed", "upcast_both"])
    o["dropout"] = c("dropout", ["none", "p0", "eval"])
    o["merge"] = c("merge_heads", [True, False])
    return o


def _draw_eager(c: _Recorder) -> Program:
    d = _dims(c)
    o = _eager_choices(c, d)
    padded = o["mask"] in _PADDED
    scale = d.dim ** -0.5
    h, hk, g = d.heads, d.kv_heads, d.groups
    three_d = o["layout"] != "4d"
    bias_in_baddbmm = o["alibi"] and o["product"] == "baddbmm" and not o["softcap"]  # BLOOM

    def attention(q_in, k_in, v_in, keep=None):
        if o["scale_at"] == "q_before_heads":
            q_in = _scaled(q_in, scale, o["scale_spelling"])
        q = _split_heads(q_in, h, d, o["heads"])
        k = _split_heads(k_in, hk, d, o["heads"])
        v = _split_heads(v_in, hk, d, o["heads"])
        if o["q_broadcast"]:
            q = q[0]  # [H, Tq, D]
        if o["scale_at"] == "q":
            q = _scaled(q, scale, o["scale_spelling"])
        if o["scale_at"] == "qk_split":
            q, k = _scaled(q, scale ** 0.5, o["scale_spelling"]), _scaled(k, scale ** 0.5, o["scale_spelling"])
        k, v = _repeat_kv(k, g, o["gqa"]), _repeat_kv(v, g, o["gqa"])
        alpha = scale if o["scale_at"] == "alpha" else 1.0
        b = q.shape[0]
        alibi = _alibi(h, d.t_k)
        alibi_3d = alibi.expand(b, h, 1, d.t_k).reshape(b * h, 1, d.t_k)
        if o["heads"] == "bthd":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
        elif o["rank5"]:  # a grid of one cell: [1, B, H, T, D]
            s = torch.einsum("xbhqd,xbhkd->xbhqk", q.unsqueeze(0), k.unsqueeze(0))
        elif o["product"] == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif three_d:
            q3, k3 = q.reshape(b * h, d.t_q, d.dim), k.reshape(b * h, d.t_k, d.dim)
            kt = k3.transpose(1, 2)
            if o["product"] == "bmm":
                s = torch.bmm(q3, kt)
            elif bias_in_baddbmm:
                s = alibi_3d.baddbmm(batch1=q3, batch2=kt, beta=1.0, alpha=alpha)
            else:  # an empty input with beta=0: the product alone
                s = torch.baddbmm(torch.empty(b * h, d.t_q, d.t_k), q3, kt, beta=0.0, alpha=alpha)
        elif o["product"] == "torch_matmul":
            s = torch.matmul(q, _transposed(k, o["key_t"]))
        else:
            s = q @ _transposed(k, o["key_t"])
        if o["scale_at"] == "scores":
            s = _scaled(s, scale, o["scale_spelling"])
        if o["layout"] == "view4d":
            s = s.view(b, h, d.t_q, -1)
        if o["softcap"]:
            s = torch.tanh(s / SOFTCAP) * SOFTCAP
        if o["alibi"] and not bias_in_baddbmm:
            s = s + (alibi_3d if o["layout"] == "stay3d" else alibi)
        if o["window_view"]:  # Swin: the batch viewed as [images, windows], a mask per window, viewed back
            s = s.view(1, BATCH, h, d.t_q, d.t_k) + _window_mask(d.t_q, d.t_k).unsqueeze(1).unsqueeze(0)
            s = s.view(-1, h, d.t_q, d.t_k)
        s = _apply_mask(s, o["mask"], keep, d.t_q, d.t_k, h if o["layout"] == "stay3d" else None)
        p = _dropout(_softmax(_stabilised(s, o["stabilise"]), o["softmax"]), o["dropout"])
        if o["layout"] == "view4d":
            p = p.view(b * h, d.t_q, -1)
        if three_d:
            out = torch.bmm(p, v.reshape(b * h, d.t_k, d.dim)).view(b, h, d.t_q, d.dim)
        elif o["heads"] == "bthd":
            return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, d.t_q, -1)
        elif o["rank5"]:
            out = torch.einsum("xbhqk,xbhkd->xbhqd", p, v.unsqueeze(0)).squeeze(0)
        elif o["product"] == "einsum":
            out = torch.einsum("bhqk,bhkd->bhqd", p, v)
        elif o["values_left"]:
            out = (v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)
        else:
            out = torch.matmul(p, v) if o["product"] == "torch_matmul" else p @ v
        if o["chain"]:
            out = torch.softmax(out @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
        return _merge_heads(out, d, "bhtd") if o["merge"] else out

    expect = {
        # a combined causal & padding mask repeated over heads for 3-D scores is kept whole (exact, but
        # its causal part is not split out)
        "causal": o["mask"] in _CAUSAL and not (o["layout"] == "stay3d" and o["mask"] == "causal_and_padding"),
        "kv_groups": 1 if three_d or o["rank5"] else g,  # repeats inside 3-D (or rank-5) products stay repeated
        "has_bias": (padded or o["alibi"] or o["mask"] in _BIASES or o["window_view"]),
        "score_mod": o["softcap"],
        "scale": (1.0 if o["scale_at"] == "none" else scale) / (SOFTCAP if o["softcap"] else 1.0),
    }
    if (three_d or o["rank5"]) and g > 1 and o["scale_at"] == "qk_split":
        expect["scale"] /= scale ** 0.5  # k's share stays in the repeated k (exact, just not folded)
    return Program(_Fn(attention).eval(), _inputs(d, padded), True, c.choices, expect, sites=1 + o["chain"])


def _window_mask(t_q: int, t_k: int) -> torch.Tensor:
    """[BATCH, Tq, Tk]: a different additive mask per window, -100 off a band; every query keeps a key."""
    i, j = torch.arange(t_q)[:, None], torch.arange(t_k)[None, :]
    far = torch.stack([(i - j).abs() > w for w in range(1, BATCH + 1)])
    return torch.zeros(BATCH, t_q, t_k).masked_fill(far, -100.0)


def _draw_sdpa(c: _Recorder) -> Program:
    d = _dims(c)
    gqa = ["none"] if d.groups == 1 else ["repeat_kv", "repeat_interleave", "enable_gqa"]
    if d.kv_heads == 1 and d.groups > 1:
        gqa.append("broadcast")
    o = {"gqa": c("gqa", gqa), "heads": c("heads_spelling", ["transpose", "permute", "unflatten"]),
         "scale": c("sdpa_scale", ["default", "explicit"]),
         "mask": c("sdpa_mask", ["none", "padding_bool", "padding_additive"]
                   + (["is_causal", "causal_bool", "causal_additive", "causal_and_padding"] if d.t_q == d.t_k
                      else []))}
    padded = "padding" in o["mask"]
    h, hk, g = d.heads, d.kv_heads, d.groups

    def attention(q_in, k_in, v_in, keep=None):
        q, k, v = (_split_heads(x, n, d, o["heads"]) for x, n in ((q_in, h), (k_in, hk), (v_in, hk)))
        k, v = _repeat_kv(k, g, o["gqa"]), _repeat_kv(v, g, o["gqa"])
        mask, causal = None, o["mask"] == "is_causal"
        keep_causal = _causal_keep(d.t_q, d.t_k)
        if o["mask"] == "causal_bool":
            mask = keep_causal
        elif o["mask"] == "causal_additive":
            mask = torch.zeros(d.t_q, d.t_k).masked_fill(~keep_causal, float("-inf"))
        elif o["mask"] == "padding_bool":
            mask = keep[:, None, None, :]
        elif o["mask"] == "padding_additive":
            mask = (~keep[:, None, None, :]).float() * torch.finfo(torch.float32).min
        elif o["mask"] == "causal_and_padding":
            mask = keep_causal & keep[:, None, None, :]
        kwargs = {"enable_gqa": True} if o["gqa"] == "enable_gqa" else {}
        if o["scale"] == "explicit":
            kwargs["scale"] = 0.3
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=causal, **kwargs)
        return _merge_heads(out, d, "bhtd")

    expect = {"causal": "causal" in o["mask"], "kv_groups": g, "has_bias": padded, "score_mod": False,
              "scale": 0.3 if o["scale"] == "explicit" else None}
    return Program(_Fn(attention).eval(), _inputs(d, padded), True, c.choices, expect)


# --------------------------------------------------------------------------- near misses

NEAR_MISSES = ("softmax_dim", "values_left", "probs_transposed", "scores_reused_mean", "scores_reused_amax",
               "scores_times_own_norm", "probs_gated", "learned_memory", "shared_query", "values_2d",
               "masked_fill_zero", "mask_before_softcap", "log_softmax", "two_value_products",
               # shape-only looking uses that do read the scores' values; views and products of the new classes
               "bool_from_scores_added", "expand_as_of_score_values", "ones_like_or_scores", "windows_mixed",
               "einsum5_sums_over_queries",
               # a shift by a row statistic that is not the softmax's own stabiliser, max_{-1}(s) subtracted
               "stabiliser_scaled", "stabiliser_min", "stabiliser_added", "stabiliser_of_other_scores")


class _LearnedMemory(nn.Module):
    """softmax(q · Wᵀ) · V with parameters W, V: a learned memory, not attention over a sequence."""

    def __init__(self, d: _Dims, slots: int):
        super().__init__()
        self.d = d
        self.keys = nn.Parameter(torch.randn(1, d.heads, slots, d.dim))  # shaped like [B, H, T, D] keys
        self.values = nn.Parameter(torch.randn(1, d.heads, slots, d.dim))

    def forward(self, q_in, k_in, v_in):
        q = _split_heads(q_in, self.d.heads, self.d, "transpose")
        return torch.softmax(q @ self.keys.transpose(-2, -1) * self.d.dim ** -0.5, dim=-1) @ self.values


def draw_near_miss(choose: Choose) -> Program:
    """Something shaped like attention that is not: the matcher must leave it untouched."""
    c = _Recorder(choose)
    miss = c("near_miss", NEAR_MISSES)
    self_attention = miss in ("values_left", "probs_transposed", "einsum5_sums_over_queries")
    d = _dims(c, allow_cross=not self_attention)
    d.kv_heads = d.heads  # keep heads paired so that only the chosen flaw is wrong
    c.choices["kv_heads"] = d.heads
    if miss == "learned_memory":
        return Program(_LearnedMemory(d, c("slots", [3, 5])).eval(), _inputs(d, False), False, c.choices)
    product = c("product", ["at", "einsum", "torch_matmul"])
    softmax = c("softmax", ["torch", "functional", "method", "written_out"])
    dim = c("wrong_dim", [-2, 1]) if miss == "softmax_dim" else -1
    scale = d.dim ** -0.5

    def scores(q, k):
        if miss == "einsum5_sums_over_queries":
            return torch.einsum("xbhqd,xbhkd->xbhqk", q.unsqueeze(0), k.unsqueeze(0)) * scale
        if product == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
        kt = k.transpose(-2, -1)
        return (torch.matmul(q, kt) if product == "torch_matmul" else q @ kt) * scale

    def fn(q_in, k_in, v_in):
        q, k, v = (_split_heads(x, d.heads, d, "transpose") for x in (q_in, k_in, v_in))
        if miss == "shared_query":
            q = q.mean(dim=1, keepdim=True)  # one query for every head: heads do not pair up
        s = scores(q, k)
        if miss == "scores_reused_mean":
            s = s + s.mean(dim=-2, keepdim=True)
        elif miss == "scores_reused_amax":
            s = s - s.amax(dim=-2, keepdim=True)  # normalised over the queries, not elementwise
        elif miss == "stabiliser_scaled":
            s = s - 0.5 * s.amax(dim=-1, keepdim=True)
        elif miss == "stabiliser_min":
            s = s - s.amin(dim=-1, keepdim=True)
        elif miss == "stabiliser_added":
            s = s + s.amax(dim=-1, keepdim=True)
        elif miss == "stabiliser_of_other_scores":  # the max of s, subtracted from 2·s
            s = 2.0 * s - s.amax(dim=-1, keepdim=True)
        elif miss == "scores_times_own_norm":
            s = s * s.norm(dim=-1, keepdim=True)
        elif miss == "masked_fill_zero":
            s = s.masked_fill(~_causal_keep(d.t_q, d.t_k), 0.0)  # masked keys keep weight exp(0)
        elif miss == "mask_before_softcap":
            s = torch.tanh(s.masked_fill(~_causal_keep(d.t_q, d.t_k), float("-inf")) / SOFTCAP) * SOFTCAP
        elif miss == "bool_from_scores_added":
            s = s + (s > 0)
        elif miss == "expand_as_of_score_values":
            s = s.masked_fill((s < s.mean(-1, keepdim=True)).expand_as(s), float("-inf"))
        elif miss == "ones_like_or_scores":
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1) | (s < 0), -1e9)
        elif miss == "windows_mixed":  # a 5-D view of the scores transposed: batches and heads exchanged
            s = s.view(1, BATCH, d.heads, d.t_q, d.t_k).transpose(1, 2).reshape(-1, d.heads, d.t_q, d.t_k)
        if miss == "log_softmax":
            p = F.log_softmax(s, dim=-1)
        else:
            p = _softmax(s, softmax, dim)
        if miss == "values_left":
            return v.transpose(-2, -1) @ p  # [B, H, D, Tk]: the probabilities are the right operand
        if miss == "probs_transposed":
            return p.transpose(-2, -1) @ v  # weights over the queries, not the keys
        if miss == "probs_gated":
            return (p * torch.sigmoid(q.sum(-1, keepdim=True))) @ v
        if miss == "values_2d":
            return p @ v[0, 0]  # one [Tk, D] value table shared by every batch and head
        if miss == "two_value_products":
            return p @ v + p @ v.flip(-1)
        if miss == "einsum5_sums_over_queries":  # the value product contracts the query index
            return torch.einsum("xbhqk,xbhqd->xbhkd", p, v.unsqueeze(0))
        return p @ v

    return Program(_Fn(fn).eval(), _inputs(d, False), False, c.choices)


# --------------------------------------------------------------------------- checking one program


@dataclass
class Outcome:
    """What the backend did with one program: ``problems`` is empty when it did the right thing."""

    program: Program
    problems: list[str]
    reasons: list[str]  # the reasons of skipped anchors (near misses), for statistics


def check(program: Program, compiler: str = "eager") -> Outcome:
    """Compile ``program`` with the attnrewrite backend (exact kind) and check what it did.

    Attention: ``program.sites`` anchors, all rewritten, the first with the expected spec fields, the same output
    (rtol 1e-5, atol 1e-6, fp32).  Near miss: nothing rewritten, and the output bit for bit the
    original's.  Resets dynamo first, so every program is captured afresh.
    """
    import functools

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.report import Report

    torch._dynamo.reset()
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"compiler": compiler}, _report_sink=report.merge)
    with torch.no_grad():
        want = program.module(*program.inputs)
        got = torch.compile(program.module, backend=backend)(*program.inputs)
    problems: list[str] = []
    if program.attention:
        sites = report.attention_sites()
        if len(report.sites) != program.sites or len(sites) != program.sites or any(
                s.status != "rewritten" for s in sites):
            problems.append("not rewritten: " + "; ".join(f"{s.status} ({s.reason})" for s in report.sites))
        else:
            spec = sites[0].spec
            for key, value in program.expect.items():
                actual = spec["score_mod"] is not None if key == "score_mod" else spec[key]
                same = (isinstance(actual, float) and math.isclose(actual, value, rel_tol=1e-9)) if isinstance(
                    value, float) else actual == value
                if not same:
                    problems.append(f"spec {key} is {actual}, expected {value}")
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            problems.append(f"output differs by {float((got - want).abs().max()):.2e}")
    else:
        if report.rewritten:
            problems.append("FALSE POSITIVE: a near miss was rewritten")
        if not torch.equal(got, want):
            problems.append("a near miss's output changed")
    reasons = [s.reason or "" for s in report.skipped]
    return Outcome(program, problems, reasons)
