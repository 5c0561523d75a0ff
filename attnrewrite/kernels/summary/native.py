"""A compiled CPU loop for the causal summary forward: every row's summaries and window in one online softmax.

Why a kernel of our own (issue 14): the torch path (:func:`.chunked._split_forward`) runs ATen's fused flash
kernel twice per block of 128 rows (an unmasked call over the keys every row of the block sees, a masked call
over the staircase and the causal diagonal) and merges the two by their log-sum-exp.  ATen's kernel costs
~2.8 ns per score at head width 32 on an AVX2 core (as much per score as the exact rewrite's causal SDPA), the
masked call ~3.3–3.8 ns, and the masked tiles are half hidden; a row sees ~1,356 keys at T = 8k with the default
options against causal attention's 4,096, so the op could not be faster than ~3× SDPA, and issue 14's model
target needs a little more.  This loop skips what a row does not see at the level of each row (not of a tile):
per tile of query rows of one head (``ROWS`` × ``BLOCK`` keys), S = scale·q kᵀ by torch's own BLAS ``sgemm_`` (the
scale as its alpha), then per row only the scores of its visible keys (an interval of the tile's keys) go into the
online softmax's running max and sum, with ``exp`` by range reduction and a degree-5 polynomial (relative error
under 2e-7, as in the sigmoid and hashed kernels; 8 lanes of AVX2 where the CPU has it), the row's output is
rescaled, and out += P v by ``sgemm_``; no mask is read or built, no K/V is copied or concatenated, nothing is
merged afterwards.  Measured (bench/RESULTS.md, issue 14): 27 % less CPU time per call than the split path at 8k.
The loop runs on one thread, so :func:`applies` asks for one torch thread; the backward keeps the block path.

Semantics (:mod:`attnrewrite.kernels.summary.reference`, causal, no padding): the row at position i of chunk
c = i // C sees the raw keys j of chunks c − W … c with j ≤ i, and the summaries of chunks 0 … c − W − 1.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from attnrewrite.kernels.native_build import C_EXP, NativeLibrary, sgemm_address

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
""" + C_EXP + r"""

typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *,
                        const int *);

/* One row of a tile of scaled scores s[0 .. cols): the keys [lo, hi) are visible (lo < hi).  s := exp(s − m_new)
   there and 0 elsewhere, where m_new = max(*m, max of the visible scores); *l := *l e^(*m − m_new) + Σ s;
   returns e^(*m − m_new), the factor the row's output accumulated so far is to be multiplied by.  An exponent
   below −87 gives exactly 0. */
static inline float exp_or_zero(float c) {
    float e = exp_in_range(c < -87.0f ? -87.0f : c);
    return c < -87.0f ? 0.0f : e;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* exp_or_zero on 8 lanes, the same operations as exp_in_range */
static inline __m256 exp8_or_zero(__m256 c) {
    const __m256 low = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
    __m256 x = _mm256_max_ps(c, low);
    __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic), magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(0.0082917167f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.041915029f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16667663f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.49998900f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.99999964f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000001f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_and_ps(e, _mm256_cmp_ps(c, low, _CMP_GE_OQ));
}
#endif

static inline float softmax_row(float *restrict s, int64_t lo, int64_t hi, int64_t cols, float *restrict m,
                                float *restrict l) {
    float top = *m, total = 0.0f;
    int64_t j = lo;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 vtop = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= hi; j += 8) vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(s + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vtop);
    for (int u = 0; u < 8; ++u) top = lanes[u] > top ? lanes[u] : top;
#endif
    for (; j < hi; ++j) top = s[j] > top ? s[j] : top;
    float alpha = *m == -INFINITY ? 0.0f : exp_or_zero(*m - top);
    j = lo;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 vt = _mm256_set1_ps(top), vsum = _mm256_setzero_ps();
    for (; j + 8 <= hi; j += 8) {
        __m256 e = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j), vt));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, vsum);
    for (int u = 0; u < 8; ++u) total += lanes[u];
#endif
    for (; j < hi; ++j) {
        float e = exp_or_zero(s[j] - top);
        s[j] = e;
        total += e;
    }
    if (lo > 0) memset(s, 0, sizeof(float) * lo);
    if (hi < cols) memset(s + hi, 0, sizeof(float) * (cols - hi));
    *l = *l * alpha + total;
    *m = top;
    return alpha;
}

/* Keys per block when `span` keys are taken at most `block` at a time: as many blocks as needed, of even size
   (a multiple of 16), so that no block is a small remainder (a thin, slow sgemm). */
static inline int64_t even_block(int64_t span, int64_t block) {
    int64_t count = (span + block - 1) / block;
    int64_t size = count > 0 ? (span + count - 1) / count : block;
    size = (size + 15) / 16 * 16;
    return size > block ? block : (size > 0 ? size : 1);
}

/* Causal summary attention, forward.  q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] with the strides
   given (batch, head, position; the last dimension contiguous); ks [B, Hkv, N, D], vs [B, Hkv, N, Dv] the
   chunks' summaries, contiguous; out [B, Hq, T, Dv] contiguous, written; lse [B, Hq, T] (NULL: not wanted).
   work: rows * block + 2 * rows floats.  Query rows are taken `rows` at a time per query head (the kv head is
   h / (Hq / Hkv)), keys `block` at a time: first the summaries the tile's rows may see, then its raw keys. */
void summary_forward(const float *q, const float *k, const float *v, const float *ks, const float *vs, float *out,
                     float *lse, float *work, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t N, int64_t D,
                     int64_t Dv, const int64_t *qst, const int64_t *kst, const int64_t *vst, int64_t C, int64_t W,
                     int64_t rows, int64_t block, float scale, sgemm_t sgemm) {
    const float one = 1.0f, zero = 0.0f;
    const int d = (int)D, dv = (int)Dv, ldq = (int)qst[2], ldk = (int)kst[2], ldv = (int)vst[2];
    float *s = work, *mrow = work + rows * block, *lrow = mrow + rows;
    const int64_t G = Hq / Hkv;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h) {
            int64_t hk = h / G;
            const float *qh = q + b * qst[0] + h * qst[1];
            const float *kh = k + b * kst[0] + hk * kst[1], *vh = v + b * vst[0] + hk * vst[1];
            const float *ksh = ks + (b * Hkv + hk) * N * D, *vsh = vs + (b * Hkv + hk) * N * Dv;
            float *oh = out + (b * Hq + h) * T * Dv;
            for (int64_t i0 = 0; i0 < T; i0 += rows) {
                int64_t n = T - i0 < rows ? T - i0 : rows;
                int m = (int)n;
                const float *qt = qh + i0 * qst[2];
                float *ot = oh + i0 * Dv;
                memset(ot, 0, sizeof(float) * n * Dv);
                for (int64_t r = 0; r < n; ++r) { mrow[r] = -INFINITY; lrow[r] = 0.0f; }
                /* summaries: row i sees [0, c - W) */
                int64_t last_chunk = (i0 + n - 1) / C;
                int64_t n_sum = last_chunk - W > 0 ? last_chunk - W : 0;
                int64_t step = even_block(n_sum, block);
                for (int64_t k0 = 0; k0 < n_sum; k0 += step) {
                    int kb = (int)(n_sum - k0 < step ? n_sum - k0 : step);
                    sgemm("T", "N", &kb, &m, &d, &scale, ksh + k0 * D, &d, qt, &ldq, &zero, s, &kb);
                    for (int64_t r = 0; r < n; ++r) {
                        int64_t see = (i0 + r) / C - W - k0;
                        see = see < 0 ? 0 : (see > kb ? kb : see);
                        float *sr = s + r * kb;
                        if (see == 0) { memset(sr, 0, sizeof(float) * kb); continue; }
                        float alpha = softmax_row(sr, 0, see, kb, mrow + r, lrow + r);
                        if (alpha != 1.0f) for (int64_t e = 0; e < Dv; ++e) ot[r * Dv + e] *= alpha;
                    }
                    sgemm("N", "N", &dv, &m, &kb, &one, vsh + k0 * Dv, &dv, s, &kb, &one, ot, &dv);
                }
                /* raw keys: row i sees [(c - W) C, i] */
                int64_t first = (i0 / C - W) * C;
                first = first < 0 ? 0 : first;
                int64_t end = i0 + n;
                step = even_block(end - first, block);
                for (int64_t k0 = first; k0 < end; k0 += step) {
                    int kb = (int)(end - k0 < step ? end - k0 : step);
                    sgemm("T", "N", &kb, &m, &d, &scale, kh + k0 * kst[2], &ldk, qt, &ldq, &zero, s, &kb);
                    for (int64_t r = 0; r < n; ++r) {
                        int64_t i = i0 + r;
                        int64_t lo = (i / C - W) * C - k0, hi = i + 1 - k0;
                        lo = lo < 0 ? 0 : lo;
                        hi = hi > kb ? kb : hi;
                        float *sr = s + r * kb;
                        if (hi <= lo) { memset(sr, 0, sizeof(float) * kb); continue; }
                        float alpha = softmax_row(sr, lo, hi, kb, mrow + r, lrow + r);
                        if (alpha != 1.0f) for (int64_t e = 0; e < Dv; ++e) ot[r * Dv + e] *= alpha;
                    }
                    sgemm("N", "N", &dv, &m, &kb, &one, vh + k0 * vst[2], &ldv, s, &kb, &one, ot, &dv);
                }
                for (int64_t r = 0; r < n; ++r) {
                    float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
                    for (int64_t e = 0; e < Dv; ++e) ot[r * Dv + e] *= inv;
                    if (lse) lse[(b * Hq + h) * T + i0 + r] = lrow[r] > 0.0f ? mrow[r] + logf(lrow[r]) : -INFINITY;
                }
            }
        }
}
"""

#: Query rows and keys per tile of :func:`summary_forward` (a tile of scores is ROWS × BLOCK floats, 128 KiB).
ROWS = 64
BLOCK = 512


def _declare(lib: ctypes.CDLL) -> None:
    lib.summary_forward.restype = None
    lib.summary_forward.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 3
                                    + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_void_p])


_lock = threading.Lock()
_state: dict[str, object] = {}
_library = NativeLibrary("summary_forward", SOURCE, _declare)


def available() -> bool:
    """Whether :func:`summary_forward` can run here (the kernel built and torch's sgemm found)."""
    if _library.get() is None:
        return False
    with _lock:
        if "sgemm" not in _state:
            _state["sgemm"] = sgemm_address()
        return _state["sgemm"] is not None


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled loop takes a call the split forward would take (:func:`.chunked.split_applies`):
    one torch thread (the loop runs on one), every dimension within a BLAS int, and the kernel available."""
    return (torch.get_num_threads() == 1 and q.shape[-2] < 2 ** 31 // max(1, q.shape[-1])
            and all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v)) and available())


def summary_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_sum: torch.Tensor, v_sum: torch.Tensor,
                    scale: float, chunk_size: int, window_chunks: int, want_lse: bool = False,
                    rows: int | None = None, block: int | None = None):
    """Causal summary attention without padding in one compiled loop: q [B, Hq, T, D], k [B, Hkv, T, D],
    v [B, Hkv, T, Dv] float32 on the CPU (any strides with the last dimension contiguous), k_sum [B, Hkv, N, D],
    v_sum [B, Hkv, N, Dv] the chunks' summaries.  Returns out [B, Hq, T, Dv] (and lse [B, Hq, T] float32 when
    ``want_lse``); ``rows`` × ``block``: the tile (default :data:`ROWS` × :data:`BLOCK`).  Needs :func:`applies`."""
    rows, block = rows or ROWS, block or BLOCK
    assert available(), "the summary CPU kernel is not available here (see native.applies)"
    lib = _library.get()
    batch, heads_q, length, dim = q.shape
    heads_kv, dim_v = k.shape[1], v.shape[-1]
    k_sum, v_sum = k_sum.contiguous(), v_sum.contiguous()
    for t in (q, k, v, k_sum, v_sum):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and (t.stride(-1) == 1 or t.shape[-1] == 1)
    assert k.shape[:3] == (batch, heads_kv, length) and v.shape[:3] == (batch, heads_kv, length)
    assert heads_q % heads_kv == 0 and k.shape[-1] == dim
    n_sum = k_sum.shape[2]
    assert k_sum.shape == (batch, heads_kv, n_sum, dim) and v_sum.shape == (batch, heads_kv, n_sum, dim_v)
    # BLAS wants a leading dimension ≥ the row length even where a dimension has one element
    q, k, v = (t if t.stride(-2) >= t.shape[-1] else t.contiguous() for t in (q, k, v))
    out = torch.empty(batch, heads_q, length, dim_v, dtype=torch.float32)
    lse = torch.empty(batch, heads_q, length, dtype=torch.float32) if want_lse else None
    work = torch.empty(rows * block + 2 * rows, dtype=torch.float32)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    lib.summary_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_sum.data_ptr(), v_sum.data_ptr(), out.data_ptr(),
                        None if lse is None else lse.data_ptr(), work.data_ptr(), batch, heads_q, heads_kv, length,
                        n_sum, dim, dim_v, *(s.data_ptr() for s in strides), chunk_size, window_chunks, rows, block,
                        scale, _state["sgemm"])
    return (out, lse) if want_lse else out
