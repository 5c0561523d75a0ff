"""The compiled CPU loop of the hashed torch path (kernels/hashed/native.py): its selection is the torch path's,
set for set (ties, GQA, causal or not, masks, padding); its codes are codes.pack's bits; outputs and gradients
by name match the float64 oracle as closely as the torch path does; the op keeps the selection for the backward
and falls back to the torch path where the loop does not apply."""

import shutil

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed import native, op as hashed_op, sparse
from attnrewrite.kernels.hashed.codes import pack, random_hyperplanes
from attnrewrite.kernels.hashed.reference import naive_hashed_attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the hashed CPU path keeps its torch ops")


def _torch_selection(q, k, mask, causal, bits, top_k, window, sinks, plane) -> torch.Tensor:
    """The torch path's selection [B, Hkv, Tq, width], each row's keys sorted, empty slots = Tk at the end."""
    t_k = k.shape[2]
    rows = []
    for _, _, index, _ in sparse.hashed_blocks(q, k, mask, causal, bits, top_k, window, sinks, plane, plane):
        rows.append(torch.where(index >= 0, index, t_k))
    width = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=t_k) for r in rows]
    return torch.cat(rows, dim=2).sort(-1).values


def _sorted(selection: torch.Tensor, t_k: int, width: int) -> torch.Tensor:
    s = torch.where(selection >= 0, selection.long(), t_k).sort(-1).values
    return torch.nn.functional.pad(s, (0, max(0, width - s.shape[-1])), value=t_k)[..., :max(width, s.shape[-1])]


def _masks(b, tq, tk, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, tq, tk, generator=g) > 0.3
    padding = torch.ones(b, 1, 1, tk, dtype=torch.bool)
    padding[-1, ..., :7] = False
    bias = torch.randn(b, 1, tq, tk, generator=g)
    return {"none": None, "bool": keep, "padding": padding, "additive": bias.masked_fill(~keep, float("-inf")),
            "min-fill": bias.masked_fill(~keep, -1e9)}


SELECTION_CASES = [  # (bits, Hq, Hkv, T, top_k, window, sinks): bits=8 and repeated keys give many ties
    (8, 4, 2, 150, 20, 6, 2),
    (64, 4, 2, 150, 20, 6, 2),
    (64, 2, 2, 130, 40, 0, 0),
    (16, 6, 2, 120, 9, 33, 3),
    (128, 8, 2, 90, 12, 4, 1),
    (64, 4, 2, 40, 100, 3, 2),     # top_k beyond the keys
    (64, 4, 2, 60, 0, 5, 2),       # no top_k
    (16, 4, 2, 150, 2, 1, 0),      # S = 3 < 16: the last rows' vector stores would pass the end of the selection
]


@pytest.mark.parametrize("case", SELECTION_CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "padding", "additive"])
def test_selection_is_the_torch_paths(case, causal, mask, one_thread):
    assert native.library() is not None, "a C compiler is on the PATH, so the kernel must build"
    bits, hq, hkv, t, top_k, window, sinks = case
    g = torch.Generator().manual_seed(bits * 1000 + t)
    q, k = torch.randn(2, hq, t, 8, generator=g), torch.randn(2, hkv, t, 8, generator=g)
    k[:, :, 60:75] = k[:, :, 30:31]  # identical keys: equal agreement, the later one must win
    attn_mask = _masks(2, t, t, seed=t)[mask]
    plane = random_hyperplanes(8, bits, 0)
    want = _torch_selection(q, k, attn_mask, causal, bits, top_k, window, sinks, plane)
    got = native.select(q, k, attn_mask, causal, bits, top_k, window, sinks, plane, plane)
    assert got.shape[-1] == min(t, sinks + window + top_k)
    width = max(want.shape[-1], got.shape[-1])
    assert torch.equal(_sorted(got, t, width), torch.nn.functional.pad(want, (0, width - want.shape[-1]), value=t))


@pytest.mark.parametrize("groups", [2, 1, 3, 4])
def test_selection_of_long_rows_without_a_mask(groups, one_thread):
    """Rows with thousands of candidates: the vector pass, its threshold guess and its fallback all run (an even
    group in halved distance units, an odd one in whole units)."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2 * groups, 1500, 16, generator=g), torch.randn(1, 2, 1500, 16, generator=g)
    q[:, :, 700:710] = k[:, :1, 50:60].repeat(1, 2 * groups, 1, 1)  # rows whose threshold jumps far from the last
    plane = random_hyperplanes(16, 64, 0)
    for causal in (True, False):
        want = _torch_selection(q, k, None, causal, 64, 64, 16, 4, plane)
        got = native.select(q, k, None, causal, 64, 64, 16, 4, plane, plane)
        assert torch.equal(_sorted(got, 1500, want.shape[-1]), want)


@pytest.mark.parametrize("block_rows", [None, 7])  # the products in one block, or in blocks of 7 rows (a last partial one)
def test_codes_are_packs_bits_even_near_zero_products(block_rows, one_thread, monkeypatch):
    g = torch.Generator().manual_seed(5)
    for bits in (8, 64, 72, 128):
        if block_rows:
            monkeypatch.setattr(native, "CODE_BLOCK_ELEMENTS", block_rows * bits)
        plane = random_hyperplanes(32, bits, 0)
        x = torch.randn(2, 3, 50, 32, generator=g)
        x[0, 0, :5] = 0  # products exactly 0: bit clear
        v = torch.randn(32, dtype=torch.float64, generator=g)
        x[1, 2, 7] = (v - (v @ plane[:, 0]) / (plane[:, 0] @ plane[:, 0]) * plane[:, 0]).float()  # ~orthogonal
        want = pack(x, plane)
        want = torch.nn.functional.pad(want, (0, -want.shape[-1] % 8)).contiguous().view(torch.int64)
        assert torch.equal(native._codes(x, plane), want)


def _inputs(b, hq, hkv, t, d, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    return make(b, hq, t, d), make(b, hkv, t, d), make(b, hkv, t, d)


def _error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask", ["none", "padding", "additive"])
@pytest.mark.parametrize("dim", [32, 12])  # a specialised head width and a generic one
def test_outputs_and_gradients_match_the_oracle_like_the_torch_path(causal, mask, dim, one_thread, monkeypatch):
    b, hq, hkv, t = 2, 4, 2, 70
    q, k, v = _inputs(b, hq, hkv, t, dim, seed=dim + causal)
    attn_mask = _masks(b, t, t, seed=3)[mask]
    kw = dict(is_causal=causal, enable_gqa=True, bits=64, top_k=9, window=5, sinks=2)
    weights = torch.randn(b, hq, t, dim, generator=torch.Generator().manual_seed(9))

    def run():
        out = ops.hashed_attention(q, k, v, attn_mask, **kw)
        return (out,) + torch.autograd.grad((out * weights).sum(), (q, k, v))

    native_run = run()
    selection = torch.ops.attnrewrite.hashed_attention_torch(q, k, v, attn_mask, **kw)[1]
    assert selection.shape == (b, hkv, t, 16) and int(selection.min()) >= -1, "the compiled loop must have run"
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")
    torch_run = run()
    plane = random_hyperplanes(dim, 64, 0)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out, _ = naive_hashed_attention(q64, k64, v64, mask64, is_causal=causal, top_k=9, window=5, sinks=2,
                                    proj_q=plane, proj_k=plane)
    oracle = (out,) + torch.autograd.grad((out * weights.double()).sum(), (q64, k64, v64))
    for name, mine, theirs, want in zip(("out", "dq", "dk", "dv"), native_run, torch_run, oracle):
        assert _error(mine, want) <= 4 * _error(theirs, want) + 2e-6, name
    for name, mine, want in zip(("dk", "dv"), native_run[2:], oracle[2:]):  # keys never selected: exactly 0
        assert torch.equal(mine == 0, want == 0) or _error(mine, want) < 1e-5, name


def test_more_threads_run_the_torch_path_and_its_backward(monkeypatch):
    """Covered calls on more threads: the torch path, a selection marked NOT_SELECTED, the torch backward."""
    monkeypatch.delenv("ATTNREWRITE_NATIVE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = _inputs(1, 4, 2, 40, 8, seed=4)
        kw = dict(is_causal=True, enable_gqa=True, bits=16, top_k=5, window=3, sinks=1)
        out, selection = torch.ops.attnrewrite.hashed_attention_torch(q, k, v, None, **kw)
        assert int(selection.view(-1)[0]) == hashed_op.NOT_SELECTED
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        torch.set_num_threads(1)
        out1 = ops.hashed_attention(q, k, v, **kw)
        grads1 = torch.autograd.grad(out1.sum(), (q, k, v))
        torch.testing.assert_close(out1, out, rtol=1e-5, atol=1e-6)
        for g2, g1 in zip(grads, grads1):
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_uncovered_calls_keep_the_torch_path(one_thread, monkeypatch):
    q, k, v = _inputs(1, 2, 2, 20, 8, seed=1, grad=False)
    kw = dict(is_causal=True, bits=16, top_k=3, window=2, sinks=1)
    for call in (dict(q=q.double(), k=k.double(), v=v.double()), dict(q=q, k=k, v=v, score_mod="div 2.0; tanh; mul 2.0"),
                 dict(q=q, k=k, v=v, far_dtype="bfloat16")):
        _, selection = torch.ops.attnrewrite.hashed_attention_torch(**call, **kw)
        assert selection.numel() == 0
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")
    assert native.library() is None
    assert torch.ops.attnrewrite.hashed_attention_torch(q, k, v, **kw)[1].numel() == 0


def test_opcheck_of_the_compiled_path(one_thread):
    q, k, v = _inputs(1, 4, 2, 24, 8, seed=2)
    mask = torch.ones(1, 1, 1, 24, dtype=torch.bool)
    mask[..., :3] = False
    args = (q, k, v, mask, 0.0, True, None, True)
    torch.library.opcheck(torch.ops.attnrewrite.hashed_attention_torch.default, args,
                          dict(bits=16, top_k=4, window=3, sinks=1))
