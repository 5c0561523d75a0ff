"""A relative position bias read by distance in the sliding-window Triton kernels (``position="relative"``,
``position_slopes`` the table R [Hq or 1, Tq + Tk − 1], T5's bias), under TRITON_INTERPRET=1 with 16-row tiles
(sink blocks, the band's masked edges, unmasked blocks inside a wide band, the end of the keys): the output and
every gradient by name — dq, dk, dv and dR, the table's — against the float64 reference
(``reference.naive_sliding_window_attention(..., relative_bias=R)``), within the numerics rule (2 × plain
torch's error in float32 plus a rounding band)."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite.kernels.sliding_window import op
from attnrewrite.kernels.sliding_window import public as window_public
from attnrewrite.kernels.sliding_window.reference import naive_sliding_window_attention
from attnrewrite.kernels.sliding_window.triton_bwd import sliding_window_bwd
from attnrewrite.kernels.sliding_window.triton_fwd import sliding_window_fwd
from attnrewrite.ops import sliding_window_attention
from attnrewrite.testing.numerics import assert_within_budget, rounding_band

if not op.interpreter_active():
    pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1", allow_module_level=True)

TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
SOFTCAP = ("div 3.0; tanh; mul 3.0", lambda s: torch.tanh(s / 3.0) * 3.0)

# name: (batch, heads_q, heads_kv, Tq, Tk, causal, window, sinks, padded keys of the last batch, one-head table, mod)
CASES = {
    # GQA, sinks, the band's masked edges and unmasked blocks inside it (window 40 over 16-row tiles)
    "causal_wide_band_sinks_gqa": (1, 4, 2, 64, 64, True, 40, 3, 0, False, None),
    # bidirectional="symmetric": the band on both sides of the query, sinks, key padding (a bool mask)
    "symmetric_sinks_padding": (2, 2, 1, 40, 40, False, 9, 2, 11, False, None),
    # a soft-cap before R (dR takes dS before mod'), key padding, one table row for every head (R [1, L])
    "causal_softcap_padding_one_row": (2, 4, 2, 40, 40, True, 12, 1, 9, True, SOFTCAP),
    # fewer queries than keys (the last 20 positions, as against a cache): i counts from the first query while
    # the band is at i + Tk − Tq; sinks spanning two key blocks
    "decode_shaped": (1, 2, 1, 20, 48, True, 12, 17, 0, False, None),
}


def _inputs(name, batch, heads_q, heads_kv, len_q, len_k, one_row, dim=8):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = make(batch, heads_q, len_q, dim), make(batch, heads_kv, len_k, dim), make(batch, heads_kv, len_k, dim)
    table = make(1 if one_row else heads_q, len_q + len_k - 1) * 2
    do = make(batch, heads_q, len_q, dim)
    return q, k, v, table, do


def _reference(q, k, v, table, do, mask, causal, window, sinks, mod):
    """(out, dq, dk, dv, dR) of the reference at the inputs' dtype (float64: exact; float32: plain torch)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, table)]
    out = naive_sliding_window_attention(*leaves[:3], mask, causal, 0.3, window, sinks, score_mod=mod,
                                         relative_bias=leaves[3])
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


def _band(what, exact, terms):
    """The rounding band: the default, except for dR, a float32 running sum (atomics, in no fixed order) of up
    to ``terms`` = B · Hq · Tq entries per diagonal (the numerics rule's band for such sums)."""
    return rounding_band(torch.float32, exact, length=terms) if what == "dR" else None


def _padding(batch, len_k, padded):
    """bool [B, 1, 1, Tk]: the last batch's final ``padded`` keys hidden (None without padding)."""
    if not padded:
        return None
    keep = torch.ones(batch, 1, 1, len_k, dtype=torch.bool)
    keep[-1, ..., len_k - padded:] = False
    return keep


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_read_the_relative_bias(name, monkeypatch):
    batch, heads_q, heads_kv, len_q, len_k, causal, window, sinks, padded, one_row, mod = CASES[name]
    monkeypatch.setattr(op, "launch_config", lambda *a, **kw: dict(TILES))
    text, fn = mod if mod is not None else (None, None)
    q, k, v, table, do = _inputs(name, batch, heads_q, heads_kv, len_q, len_k, one_row)
    mask = _padding(batch, len_k, padded)
    exact = _reference(q, k, v, table, do, mask, causal, window, sinks, fn)
    plain = _reference(*(x.float() for x in (q, k, v, table, do)), mask, causal, window, sinks, fn)
    leaves = [x.float().requires_grad_() for x in (q, k, v, table)]
    out = sliding_window_attention(*leaves[:3], mask, is_causal=causal, scale=0.3, enable_gqa=True, window=window,
                                   sinks=sinks, impl="triton", score_mod=text, position_slopes=leaves[3],
                                   position="relative")
    got = [out, *torch.autograd.grad(out, leaves, do.float())]
    for what, g, p, e in zip(("out", "dq", "dk", "dv", "dR"), got, plain, exact):
        assert g.shape == e.shape, f"{what}: shape {tuple(g.shape)}, want {tuple(e.shape)}"
        assert e.abs().max() > 0.01, f"{what} is (nearly) zero: it proves nothing"
        assert_within_budget(g, p, e, torch.float32, f"{name}: {what}", _band(what, e, batch * heads_q * len_q))
    # the bias mattered: without it the output differs
    without = naive_sliding_window_attention(q, k, v, mask, causal, 0.3, window, sinks, score_mod=fn)
    assert (without - exact[0]).abs().max() > 0.1


def test_kernels_with_kv_lens_read_and_sum_only_the_real_keys():
    """The launchers directly, with ``kv_lens`` (keys past a batch's length hidden without moving the queries):
    the padding keys' diagonals get no dR from that batch, and dR sums over the batches."""
    len_q = len_k = 40
    q, k, v, table, do = _inputs("kv_lens", 2, 2, 1, len_q, len_k, False)
    kv_lens = torch.tensor([len_k, len_k - 13], dtype=torch.int32)
    mask = torch.arange(len_k).view(1, 1, 1, len_k) < kv_lens.view(-1, 1, 1, 1)
    exact = _reference(q, k, v, table, do, mask, True, 10, 2, None)
    plain = _reference(*(x.float() for x in (q, k, v, table, do)), mask, True, 10, 2, None)
    f32 = [x.float() for x in (q, k, v, do)]
    extra = dict(slopes=table.float().contiguous(), position="relative")
    out, lse = sliding_window_fwd(*f32[:3], None, kv_lens, 0.3, True, 10, 2, TILES, **extra)
    dq, dk, dv, dr = sliding_window_bwd(*f32[:3], out, lse, f32[3], None, kv_lens, 0.3, True, 10, 2, TILES, TILES,
                                        **extra)
    # (dk, dv of the padding keys are 0 in both: the reference's are compared on every row)
    for what, g, p, e in zip(("out", "dq", "dk", "dv", "dR"), (out, dq, dk, dv, dr), plain, exact):
        assert_within_budget(g, p, e, torch.float32, f"kv_lens: {what}", _band(what, e, 2 * 2 * len_q))


def test_auto_takes_the_kernels_with_a_relative_bias(monkeypatch):
    """The kernels no longer refuse R: ``impl="auto"`` is offered no refusal for it (on CUDA it then takes the
    kernels, as without R), and ``impl="triton"`` runs them."""
    q, k, v, table, _ = (x.float() for x in _inputs("auto", 1, 2, 2, 20, 20, False))
    asked = []
    original = window_public.resolve_impl

    def resolve(impl, *args, **kwargs):
        asked.append((impl, kwargs["refusal"]))
        return original(impl, *args, **kwargs)

    monkeypatch.setattr(window_public, "resolve_impl", resolve)
    calls = []
    monkeypatch.setattr(op, "launch_config", lambda *a, **kw: dict(TILES))
    triton_path = op.sliding_window_triton
    monkeypatch.setattr(op, "sliding_window_triton", lambda *a: calls.append(a) or triton_path(*a))
    for impl in ("auto", "triton"):
        sliding_window_attention(q, k, v, window=4, impl=impl, position_slopes=table, position="relative")
    assert asked == [("auto", None), ("triton", None)]
    assert len(calls) == 1  # "auto" on the CPU is the torch path; "triton" ran the kernels
