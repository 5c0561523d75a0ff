"""The summary Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the float64 reference:
the output and every gradient by name (q, k, v and the learned pooling queries), within the rule of
attnrewrite.testing.numerics (2 x plain torch's error at the same precision plus a rounding band).

Tiles of 16 rows are forced so that every case runs several query and key blocks: summaries and
window ranges that start and end inside blocks, causal diagonals, tails and padding all occur.
The interpreter is slow, so the shapes are tiny and the cases few; each is chosen to cover
something the others do not.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.summary import spaces, triton_op, tune
from attnrewrite.kernels.summary.reference import naive_summary_attention
from attnrewrite.testing.numerics import assert_within_budget

SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_op, "launch_config", lambda kernel, *args, **kwargs: dict(SMALL_TILES))


@dataclass(frozen=True)
class Case:
    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 1
    length: int = 37
    dim: int = 8
    dim_v: int = 6
    chunk: int = 4
    window: int = 1
    causal: bool = True
    learned: bool = False
    padding: bool = False


CASES = {
    # GQA, learned summaries, padding: a hole inside a chunk, a first chunk whose first tokens are
    # padding (rows that see nothing get 0), and right padding covering whole chunks (no summary)
    "causal_learned_gqa_padding": Case(heads_q=4, heads_kv=2, learned=True, padding=True),
    # bidirectional: summaries on both sides of the window, mean pooling over the valid tokens
    "bidirectional_mean_padding": Case(causal=False, chunk=2, padding=True),
    # more summaries than a key tile holds (19 chunks of 2), odd head dims (padded to the tile), no GQA
    "many_summaries_odd_dims": Case(batch=1, heads_kv=2, dim=24, dim_v=40, chunk=2, learned=True),
    # no window chunk before the current one
    "window_zero": Case(batch=1, length=33, chunk=5, window=0),
}


def _inputs(case: Case, name: str):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    b, t = case.batch, case.length
    q, k, v = make(b, case.heads_q, t, case.dim), make(b, case.heads_kv, t, case.dim), make(b, case.heads_kv, t, case.dim_v)
    p = make(case.heads_kv, case.dim) if case.learned else None
    valid = None
    if case.padding:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[1, :2] = False     # query 0 (and 1) of batch 1 see no key at all
        valid[1, 9:11] = False   # a hole inside a chunk
        valid[1, -13:] = False   # right padding, whole chunks included
    weights = make(b, case.heads_q, t, case.dim_v)
    return q, k, v, p, valid, weights


def _run(fn, case, q, k, v, p, valid, weights, dtype):
    xs = [None if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, p)]
    out = fn(*xs, valid)
    grads = torch.autograd.grad((out * weights.to(dtype)).sum(), [x for x in xs if x is not None])
    return [out, *grads]


def _names(case):
    return ["out", "dq", "dk", "dv"] + (["d_summary_query"] if case.learned else [])


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_match_the_reference(name, small_tiles):
    case = CASES[name]
    q, k, v, p, valid, weights = _inputs(case, name)
    kw = dict(is_causal=case.causal, chunk_size=case.chunk, window_chunks=case.window)

    def kernel(q, k, v, p, valid):
        mask = None if valid is None else valid[:, None, None]
        return ops.summary_attention(q, k, v, mask, enable_gqa=True, summary="learned" if p is not None else "mean",
                                     summary_query=p, impl="triton", **kw)

    def reference(q, k, v, p, valid):
        return naive_summary_attention(q, k, v, valid, summary_query=p, **kw)

    got = _run(kernel, case, q, k, v, p, valid, weights, torch.float32)
    plain = _run(reference, case, q, k, v, p, valid, weights, torch.float32)
    exact = _run(reference, case, q, k, v, p, valid, weights, torch.float64)
    for what, g, pl, ex in zip(_names(case), got, plain, exact):
        assert ex.abs().max() > 1e-3, what  # the quantity is not trivially zero
        assert_within_budget(g, pl, exact=ex, dtype=torch.float32, what=f"{name}: {what}")
    if case.padding and case.causal:  # rows that see nothing: 0, with finite gradients
        assert got[0][1, :, :2].abs().max() == 0
        assert all(torch.isfinite(g).all() for g in got)


def test_float16_output_within_budget(small_tiles):
    case = Case(heads_q=4, heads_kv=2, learned=True, padding=True)
    q, k, v, p, valid, _ = _inputs(case, "fp16")
    kw = dict(is_causal=True, chunk_size=4, window_chunks=1)
    low = [x.half() for x in (q, k, v)]
    got = ops.summary_attention(*low, valid[:, None, None], enable_gqa=True, summary="learned",
                                summary_query=p.float(), impl="triton", **kw)
    assert got.dtype == torch.float16
    plain = naive_summary_attention(*low, valid, summary_query=p.float(), **kw)
    exact = naive_summary_attention(q, k, v, valid, summary_query=p, **kw)
    assert_within_budget(got, plain, exact, torch.float16, "out")


def test_impl_choice(monkeypatch):
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match="impl must be"):
        ops.summary_attention(q, k, v, impl="kernels")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got torch.float64"):
        ops.summary_attention(q, k, v, impl="triton", chunk_size=2, window_chunks=1)
    # "auto" on the CPU and "torch" run the torch op, never the kernels
    monkeypatch.setattr(triton_op, "summary_attention_triton", lambda *a, **kw: pytest.fail("ran the kernels"))
    for impl in ("auto", "torch"):
        ops.summary_attention(q.float(), k.float(), v.float(), impl=impl, chunk_size=2, window_chunks=1)


def test_triton_path_checks_inputs_as_the_torch_op_does():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    with pytest.raises(ValueError, match="dropout"):
        ops.summary_attention(q, k, v, dropout_p=0.1, impl="triton")
    with pytest.raises(ValueError, match="summary_query"):
        ops.summary_attention(q, k, v, summary="learned", impl="triton")


# --------------------------------------------------------------------------- tuning declarations


def _shape(**changes):
    shape = {"D": 128, "DV": 128, "T": 32768, "window": 1032, "chunk": 8, "causal": 1, "dtype": "16bit"}
    shape.update(changes)
    return shape


@pytest.mark.parametrize("name", list(spaces.SPACES))
def test_space_defaults_fit_a_hopper_sm(name):
    head = int(name.rsplit("_d", 1)[1])
    space = spaces.SPACES[name]
    assert space.valid(dict(space.default), _shape(D=head, DV=head)), name


@pytest.mark.parametrize("shape", [_shape(T=20, window=20), _shape(dtype="fp32"), _shape(D=256, DV=200, T=1000)])
def test_fit_returns_a_valid_point(shape):
    for name, space in spaces.SPACES.items():
        if max(shape["D"], shape["DV"]) > int(name.rsplit("_d", 1)[1]):
            continue
        config = spaces.fit(space, space.default, shape)
        assert space.contains(config) and space.valid(config, shape), (name, shape, config)


def test_tune_workloads_cover_every_kernel():
    loads = list(tune.workloads(quick=True))
    assert {w.space.kernel for w in loads} == {f"{k}_d128" for k in spaces.KERNELS}
    for w in loads:
        assert w.space.valid(dict(w.space.default), w.shape)


# --------------------------------------------------------------------------- decode over SummaryCache


@pytest.mark.parametrize("padded", [False, True])
def test_decode_kernel_over_the_cache_equals_the_op(padded):
    """A prompt goes through a SummaryLayer, then one token: the kernel on the step's slice of the store
    (read in place, several splits, GQA 4/2, learned summaries) gives the op's last row."""
    from attnrewrite.decode.summary import SummaryLayer
    from attnrewrite.kernels.summary.triton_decode import summary_decode

    chunk, window, t = 3, 2, 40
    gen = torch.Generator().manual_seed(zlib.crc32(b"decode"))
    q, k, v = (torch.randn(2, h, t, 8, generator=gen) for h in (4, 2, 2))
    query = torch.randn(2, 8, generator=gen)
    valid = torch.ones(2, t, dtype=torch.bool)
    if padded:
        valid[1, :7] = False  # left padding, two whole chunks included (no summary for them)
        valid[0, 11] = False
    want = ops.summary_attention(q, k, v, valid[:, None, None], enable_gqa=True, chunk_size=chunk,
                                 window_chunks=window, summary="learned", summary_query=query)[:, :, -1:]
    layer = SummaryLayer(chunk, window, query, max_seq_len=t)
    layer.prepare(2, 4, 2, 8, torch.float32, "cpu")
    layer.step(k[:, :, :-1], v[:, :, :-1], valid[:, :-1] if padded else None)
    keys, values, visible = layer.step(k[:, :, -1:], v[:, :, -1:], valid[:, -1:] if padded else None)
    assert keys.data_ptr() == layer.key_store.data_ptr()  # the store itself, not a copy
    assert (visible is not None) == padded and keys.shape[2] > 16
    got = summary_decode(q[:, :, -1:], keys, values, visible, block_n=16, splits=3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
