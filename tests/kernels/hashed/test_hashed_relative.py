"""A relative position bias R[h, j − i] in hashed attention (``position="relative"``, the table R [Hq, Tq + Tk − 1]):
the torch path (sparse products and gathers) and the gathered-attention Triton kernels (under TRITON_INTERPRET=1)
against the float64 reference by name — the output and the gradients of q, k, v and R — with grouped-query heads,
key padding and a float mask beside the table; ALiBi slopes read as the table slope_h · d; bad tables refused."""

from __future__ import annotations

import zlib

import pytest
import torch

import attnrewrite.kernels.hashed.sparse as sparse
from attnrewrite import ops
from attnrewrite.kernels.hashed.codes import random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention

SOFTCAP = ("div 2.0; tanh; mul 2.0", lambda s: torch.tanh(s / 2.0) * 2.0)
OPTIONS = dict(top_k=3, window=3, sinks=1)


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(name, t=17, heads_q=4, heads_kv=2, t_q=None, dtype=torch.float64):
    g = _gen(name)
    t_q = t if t_q is None else t_q
    q = torch.randn(2, heads_q, t_q, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, heads_kv, t, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, heads_kv, t, 8, generator=g, dtype=torch.float64)
    table = torch.randn(heads_q, t_q + t - 1, generator=g, dtype=torch.float64) * 2
    return [x.to(dtype).requires_grad_() for x in (q, k, v, table)]


def _mask(kind, t, t_q=None, name="mask"):
    t_q = t if t_q is None else t_q
    if kind is None:
        return None
    if kind == "padding":  # key padding: the second row's last three keys, and its second key
        keep = torch.ones(2, 1, 1, t, dtype=torch.bool)
        keep[1, 0, 0, -3:] = False
        keep[1, 0, 0, 1] = False
        return keep
    return torch.randn(2, 1, t_q, t, generator=_gen(name), dtype=torch.float64)  # a float bias, the same per head


def _compare(out, want, leaves, exact, tol, grad_seed="grad"):
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol, msg=lambda m: f"out: {m}")
    grad = torch.randn(want.shape, generator=_gen(grad_seed), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    expected = torch.autograd.grad(want, exact, grad)
    for name, g, w in zip(("dq", "dk", "dv", "dR"), got, expected):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("csr", [True, False], ids=["sparse_products", "gathers"])
@pytest.mark.parametrize("causal, mask", [(True, None), (True, "padding"), (True, "float"), (False, "padding")])
def test_torch_path_reads_the_table(causal, mask, csr, monkeypatch):
    monkeypatch.setattr(sparse, "USE_CSR", csr)
    q, k, v, table = _inputs(f"torch{causal}{mask}")
    attn_mask = _mask(mask, 17)
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=causal, **OPTIONS)
    out = ops.hashed_attention(q, k, v, attn_mask, enable_gqa=True, bits=16, impl="torch", position_slopes=table,
                               position="relative", **kw)
    want, _ = naive_hashed_attention(q, k, v, attn_mask, proj_q=plane, proj_k=plane, relative=table, **kw)
    _compare(out, want, (q, k, v, table), (q, k, v, table), 1e-10)
    plain, _ = naive_hashed_attention(q, k, v, attn_mask, proj_q=plane, proj_k=plane, **kw)
    assert (plain - want).abs().max() > 1e-2  # the table matters


def test_torch_path_with_a_modification_decode_rows_and_one_head_table():
    """Queries after every key (Tq < Tk, not causal: a decoding chunk), a soft-cap before R, R of one head."""
    q, k, v, _ = _inputs("decode", t=15, t_q=3)
    table = torch.randn(1, 3 + 15 - 1, generator=_gen("one head"), dtype=torch.float64).requires_grad_()
    plane = random_hyperplanes(8, 16, 0)
    out = ops.hashed_attention(q, k, v, enable_gqa=True, bits=16, impl="torch", position_slopes=table,
                               position="relative", score_mod=SOFTCAP[0], **OPTIONS)
    want, _ = naive_hashed_attention(q, k, v, proj_q=plane, proj_k=plane, relative=table.expand(4, -1),
                                     score_mod=SOFTCAP[1], **OPTIONS)
    _compare(out, want, (q, k, v, table), (q, k, v, table), 1e-10)


def test_float32_at_one_thread_leaves_the_compiled_loop_for_the_torch_path(one_thread):
    """float32 CPU calls go to the compiled C loop (:mod:`.native`), which reads no table: with R they run on the
    torch path, which gives the reference's output and gradients."""
    q, k, v, table = _inputs("float32", dtype=torch.float32)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v, table)]
    plane = random_hyperplanes(8, 16, 0)
    out = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=16, impl="auto",
                               position_slopes=table, position="relative", **OPTIONS)
    want, _ = naive_hashed_attention(*exact[:3], is_causal=True, proj_q=plane, proj_k=plane, relative=exact[3],
                                     **OPTIONS)
    _compare(out, want, (q, k, v, table), exact, 1e-4)


@pytest.mark.parametrize("form", ["j-i", "|j-i|"])
def test_alibi_slopes_are_read_as_the_table_slope_times_distance(form):
    q, k, v, _ = _inputs(f"alibi{form}")
    slopes = torch.tensor([0.5, -0.25, 1.0, 0.125], dtype=torch.float64)
    distance = torch.arange(-16, 17, dtype=torch.float64)
    table = slopes[:, None] * (distance.abs() if form == "|j-i|" else distance)
    plane = random_hyperplanes(8, 16, 0)
    out = ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=16, impl="torch",
                               position_slopes=slopes, position=form, **OPTIONS)
    want, _ = naive_hashed_attention(q, k, v, is_causal=True, proj_q=plane, proj_k=plane, relative=table, **OPTIONS)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("table, error, match", [
    (torch.zeros(4, 32), ValueError, "must hold Tq \\+ Tk - 1 = 33"),
    (torch.zeros(3, 33), ValueError, "must be \\[Hq=4 or 1, Tq \\+ Tk - 1\\]"),
    (torch.zeros(4, 33, dtype=torch.long), TypeError, "a float table R"),
])
def test_a_bad_table_is_refused_by_name(table, error, match):
    q, k, v, _ = _inputs("bad")
    with pytest.raises(error, match=match):
        ops.hashed_attention(q.detach(), k.detach(), v.detach(), is_causal=True, enable_gqa=True, bits=16,
                             impl="torch", position_slopes=table, position="relative", **OPTIONS)


@pytest.mark.parametrize("causal, mask, heads_kv", [(True, "padding", 2), (True, "float", 4), (False, None, 1)],
                         ids=["gqa_padding", "mha_float_mask", "mqa_bidirectional"])
def test_triton_kernels_read_the_table(causal, mask, heads_kv):
    triton_ops = pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")
    if not triton_ops.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    exact = _inputs(f"triton{causal}{mask}{heads_kv}", t=12, heads_kv=heads_kv)
    leaves = [x.detach().float().requires_grad_() for x in exact]
    exact = [x.detach().double().requires_grad_() for x in leaves]  # the same values, so the same codes
    attn_mask = _mask(mask, 12)
    plane = random_hyperplanes(8, 16, 0)
    kw = dict(is_causal=causal, **OPTIONS)
    out = ops.hashed_attention(*leaves[:3], None if attn_mask is None else attn_mask.to(torch.float32)
                               if attn_mask.is_floating_point() else attn_mask, enable_gqa=True, bits=16,
                               impl="triton", position_slopes=leaves[3], position="relative", **kw)
    want, _ = naive_hashed_attention(*exact[:3], attn_mask, proj_q=plane, proj_k=plane, relative=exact[3], **kw)
    _compare(out, want, leaves, exact, 1e-4)
