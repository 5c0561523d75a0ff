"""The compiled CPU loop of the causal summary forward (kernels/summary/native.py) against the float64 reference,
with tiles small enough that every case crosses row-tile, key-block, chunk and window edges; and the op takes it
where it applies (one torch thread, float32, causal, no padding) and keeps the split path elsewhere."""

import shutil

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.summary import native
from attnrewrite.kernels.summary.reference import naive_chunk_summaries, naive_summary_attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the summary forward keeps the split ATen path")


def _inputs(b, hq, hkv, t, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g, dtype=torch.float64) * 2, torch.randn(b, hkv, t, d, generator=g,
            dtype=torch.float64) * 2, torch.randn(b, hkv, t, dv, generator=g, dtype=torch.float64),
            torch.randn(hkv, d, generator=g, dtype=torch.float64))


# (B, Hq, Hkv, T, D, Dv, chunk, window, rows, block): W = 0, T not a multiple of C, a window past T, GQA 3/1,
# tiles of 1 row, blocks of 1 key, tiles larger than T, D ≠ Dv
CASES = {
    "gqa_many_tiles": (2, 4, 2, 61, 8, 8, 4, 2, 8, 16),
    "window_zero": (1, 2, 1, 45, 8, 8, 2, 0, 4, 8),
    "window_past_t": (1, 3, 1, 40, 16, 16, 4, 20, 12, 5),
    "ragged_last_chunk": (1, 2, 2, 37, 8, 8, 5, 3, 7, 9),
    "one_row_one_key": (1, 2, 1, 19, 4, 4, 3, 1, 1, 1),
    "big_tiles": (1, 2, 1, 30, 8, 8, 4, 2, 64, 512),
    "dv_differs": (1, 4, 2, 33, 8, 12, 4, 2, 6, 10),
    # for the panel loop (Dv a multiple of 8; its blocks are multiples of 32 keys, its row groups ≤ 3 rows):
    # groups of 2 rows, Dv = 40 (a 32-wide and an 8-wide slice of values), D ≠ Dv, D not a multiple of 8,
    # blocks of 32 and 64 keys crossing summaries and window
    "panels_two_rows_wide_v": (1, 4, 2, 150, 5, 40, 3, 4, 2, 40),
    "panels_many_blocks": (2, 2, 1, 300, 16, 8, 4, 6, 3, 64),
}
# the panel loop takes Dv in slices of 8
PANEL_CASES = [case for case, shape in CASES.items() if shape[5] % 8 == 0]


def _kernel_params():
    return ([pytest.param("sgemm", case) for case in CASES]
            + [pytest.param("panels", case) for case in PANEL_CASES])


@pytest.mark.parametrize(("kernel", "case"), _kernel_params())
@pytest.mark.parametrize("learned", [False, True])
def test_native_forward_equals_reference(kernel, case, learned, one_thread):
    b, hq, hkv, t, d, dv, chunk, window, rows, block = CASES[case]
    assert native.available(), "a C compiler is on the PATH, so the kernel must build"
    if kernel == "panels" and not native.panels_available():
        pytest.skip("the panel loop needs AVX2 and FMA")
    q, k, v, p = _inputs(b, hq, hkv, t, d, dv)
    want = naive_summary_attention(q, k, v, None, is_causal=True, chunk_size=chunk, window_chunks=window,
                                   summary_query=p if learned else None)
    k_sum, v_sum, _ = naive_chunk_summaries(k, v, None, chunk, p if learned else None)
    # q in the [B, T, H, D] memory layout a model's projections give (strided, not copied)
    q32 = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    got, lse = native.summary_forward(q32, k.float(), v.float(), k_sum.float(), v_sum.float(), d ** -0.5, chunk,
                                      window, want_lse=True, rows=rows, block=block, kernel=kernel)
    assert got.dtype == torch.float32 and want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-6)
    # the log-sum-exp of each row's visible scores (summaries and raw keys), against an explicit float64 one
    scores = torch.full((b, hq, t, k_sum.shape[2] + t), float("-inf"), dtype=torch.float64)
    group = hq // hkv
    for i in range(t):
        c = i // chunk
        n_sum = max(0, c - window)
        lo = max(0, (c - window) * chunk)
        kh = k.repeat_interleave(group, 1)
        sh = k_sum.repeat_interleave(group, 1)
        scores[:, :, i, :n_sum] = (q[:, :, i, None] * sh[:, :, :n_sum]).sum(-1) * d ** -0.5
        scores[:, :, i, k_sum.shape[2] + lo:k_sum.shape[2] + i + 1] = (q[:, :, i, None] * kh[:, :, lo:i + 1]).sum(-1) \
            * d ** -0.5
    # relative too: float32's rounding of a log-sum-exp of ~14 is itself ~1e-6
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=3e-6)


@pytest.mark.parametrize("kernel", ["sgemm", "panels"])
def test_extreme_scores_give_no_nan_and_the_row_max(kernel, one_thread):
    """Scores far apart (exponents below the kernel's −87 cut) and a late maximum that rescales the running sum."""
    if kernel == "panels" and not native.panels_available():
        pytest.skip("the panel loop needs AVX2 and FMA")
    q, k, v, _ = _inputs(1, 2, 1, 100, 8, 8, seed=4)
    q, k = q * 30, k * 30
    want = naive_summary_attention(q, k, v, None, is_causal=True, chunk_size=4, window_chunks=2)
    k_sum, v_sum, _ = naive_chunk_summaries(k, v, None, 4)
    got = native.summary_forward(q.float(), k.float(), v.float(), k_sum.float(), v_sum.float(), 8 ** -0.5, 4, 2,
                                 rows=3, block=4, kernel=kernel)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("learned", [False, True])
def test_op_takes_the_native_loop_on_one_thread(learned, one_thread, monkeypatch):
    taken = []
    forward = native.summary_forward
    monkeypatch.setattr(native, "summary_forward", lambda *a, **kw: taken.append(1) or forward(*a, **kw))
    q, k, v, p = _inputs(2, 4, 2, 50, 8, 8)
    kw = dict(is_causal=True, chunk_size=4, window_chunks=3, summary_query=p if learned else None)
    got = ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True,
                                summary="learned" if learned else "mean", **kw)
    assert taken, "one thread, float32, causal, no padding: the compiled loop must run"
    torch.testing.assert_close(got.double(), naive_summary_attention(q, k, v, None, **kw), rtol=0, atol=3e-6)
    taken.clear()
    monkeypatch.setenv("ATTNREWRITE_NATIVE", "0")  # switched off: the split path, the same result
    torch.testing.assert_close(ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True,
                                                     summary="learned" if learned else "mean", **kw), got,
                               rtol=0, atol=3e-6)
    assert not taken


def test_auto_takes_the_panels_where_they_apply(one_thread, monkeypatch):
    """kernel="auto" (what the op calls) runs the panel loop where it was compiled and Dv is a multiple of 8, and
    the sgemm loop otherwise; a bad kernel name or a Dv the panels cannot take is refused by name."""
    if not native.panels_available():
        pytest.skip("the panel loop needs AVX2 and FMA")
    lib = native._library.get()
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(native._library, "get", lambda: Spy())
    for dv, want in ((16, "summary_forward_panels"), (12, "summary_forward")):
        q, k, v, _ = _inputs(1, 2, 1, 20, 8, dv)
        k_sum, v_sum, _ = naive_chunk_summaries(k, v, None, 4)
        calls.clear()
        native.summary_forward(q.float(), k.float(), v.float(), k_sum.float(), v_sum.float(), 0.3, 4, 1)
        assert want in calls and not ({"summary_forward", "summary_forward_panels"} - {want}) & set(calls)
    with pytest.raises(ValueError, match="Dv a multiple of 8"):
        native.summary_forward(q.float(), k.float(), v.float(), k_sum.float(), v_sum.float(), 0.3, 4, 1,
                               kernel="panels")
    with pytest.raises(ValueError, match="kernel must be"):
        native.summary_forward(q.float(), k.float(), v.float(), k_sum.float(), v_sum.float(), 0.3, 4, 1,
                               kernel="blas")


def test_op_keeps_other_paths_where_the_loop_does_not_apply(one_thread, monkeypatch):
    taken = []
    forward = native.summary_forward
    monkeypatch.setattr(native, "summary_forward", lambda *a, **kw: taken.append(1) or forward(*a, **kw))
    q, k, v, _ = _inputs(2, 4, 2, 30, 8, 8)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, -6:] = False
    ops.summary_attention(q.float(), k.float(), v.float(), valid[:, None, None], enable_gqa=True, chunk_size=4,
                          window_chunks=1)                                                      # padding
    ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True, is_causal=False, chunk_size=4,
                          window_chunks=1)                                                      # bidirectional
    ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=4, window_chunks=1)              # float64
    torch.set_num_threads(2)
    ops.summary_attention(q.float(), k.float(), v.float(), enable_gqa=True, chunk_size=4, window_chunks=1)
    assert not taken


def test_backward_through_the_op_is_unchanged(one_thread):
    """The forward's loop keeps no activations: gradients still come from the block path, equal to the reference's."""
    q, k, v, _ = _inputs(1, 4, 2, 29, 8, 8)
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    out = ops.summary_attention(*leaves, enable_gqa=True, chunk_size=4, window_chunks=2)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = naive_summary_attention(*ref_leaves, None, is_causal=True, chunk_size=4, window_chunks=2)
    want_grads = torch.autograd.grad(want.square().sum(), ref_leaves)
    for name, got, exp in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")
