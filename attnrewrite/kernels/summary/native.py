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

Where the CPU has AVX2 and FMA and Dv is a multiple of 8, the same loop runs with kernels of its own instead of
sgemm (``summary_forward_panels``, session 14): the kv head's keys packed in panels of 32 keys × D (8 keys a vector)
and its values in contiguous rows, groups of 3 query rows, S for 3 rows × 32 keys with 12 accumulators, only the
panels some row of the group sees, S kept in the L1 cache, the softmax in whole masked vectors, P v for 3 rows ×
32 values.  MKL's sgemm reached ~55 GFLOP/s on these thin shapes (q kᵀ has an inner dimension of D = 32) and the
strided value rows of the model's [B, T, H, D] layout slowed P v; ~20 % less CPU time per call at 8k.

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
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic), n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(0.0082917167f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.041915029f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16667663f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.49998900f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.99999964f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000001f));
    /* 2^n from t's bits: t = 1.5 · 2^23 + n holds n in its low mantissa bits, and the shift drops the rest */
    __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
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
   (a multiple of `unit`), so that no block is a small remainder (a thin, slow sgemm or kernel call). */
static inline int64_t even_block(int64_t span, int64_t block, int64_t unit) {
    int64_t count = (span + block - 1) / block;
    int64_t size = count > 0 ? (span + count - 1) / count : block;
    size = (size + unit - 1) / unit * unit;
    return size > block ? block : (size > 0 ? size : 1);
}

/* The same forward with kernels of its own in place of sgemm (AVX2 and FMA only; summary_forward_panels returns 0
   without them, and the caller takes summary_forward).  The keys and summaries of a kv head are first packed into
   panels of 32 keys, [panel][D][32] (zeros past the last key), so that q kᵀ is 8 keys a vector; then per query head
   and group of up to 3 rows (the row tile): per block of up to `block` keys (a multiple of 32) of what the group
   sees, S = scale·q kᵀ for 3 rows × 32 keys a step (12 accumulators), each row's visible interval into the online
   softmax (softmax_row), and out = alpha·out + P v for 3 rows × 32 values a step.  Only the panels of the keys
   some row of the group sees are computed (at most 31 keys' waste on each side); S stays in the L1 cache. */
#if defined(__AVX2__) && defined(__FMA__)
#define PANEL 32
static void pack_panels(const float *src, int64_t ld, int64_t n, int64_t D, float *dst) {
    int64_t panels = (n + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; ++p) {
        float *to = dst + p * D * PANEL;
        for (int64_t t = 0; t < PANEL; ++t) {
            int64_t j = p * PANEL + t;
            if (j < n) for (int64_t d = 0; d < D; ++d) to[d * PANEL + t] = src[j * ld + d];
            else for (int64_t d = 0; d < D; ++d) to[d * PANEL + t] = 0.0f;
        }
    }
}

/* s[r][0 .. 32) = scale · q_r · (the panel's 32 keys), r < NR */
static inline __attribute__((always_inline)) void qk_panel(const int NR, const float *restrict qr, int64_t ldq,
                                                           const float *restrict panel, int64_t D, __m256 vscale,
                                                           float *restrict s, int64_t lds) {
    __m256 c[3][4];
    for (int r = 0; r < NR; ++r) for (int u = 0; u < 4; ++u) c[r][u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const float *b = panel + d * PANEL;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), b2 = _mm256_loadu_ps(b + 16),
               b3 = _mm256_loadu_ps(b + 24);
        for (int r = 0; r < NR; ++r) {
            __m256 a = _mm256_broadcast_ss(qr + r * ldq + d);
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
            c[r][2] = _mm256_fmadd_ps(a, b2, c[r][2]);
            c[r][3] = _mm256_fmadd_ps(a, b3, c[r][3]);
        }
    }
    for (int r = 0; r < NR; ++r) for (int u = 0; u < 4; ++u) _mm256_storeu_ps(s + r * lds + 8 * u,
                                                                              _mm256_mul_ps(c[r][u], vscale));
}

/* o_r[0 .. 8 NV) := alpha_r o_r + Σ_{j0 ≤ j < j1} s_r[j] v_j[0 .. 8 NV), r < NR */
static inline __attribute__((always_inline)) void pv_rows(const int NR, const int NV, const float *restrict s,
                                                          int64_t lds, int64_t j0, int64_t j1, const float *restrict v,
                                                          int64_t ldv, float *restrict o, int64_t ldo,
                                                          const float *restrict alpha) {
    __m256 c[3][4];
    for (int r = 0; r < NR; ++r)
        for (int u = 0; u < NV; ++u) c[r][u] = _mm256_mul_ps(_mm256_loadu_ps(o + r * ldo + 8 * u),
                                                             _mm256_set1_ps(alpha[r]));
    for (int64_t j = j0; j < j1; ++j) {
        __m256 b[4];
        for (int u = 0; u < NV; ++u) b[u] = _mm256_loadu_ps(v + j * ldv + 8 * u);
        for (int r = 0; r < NR; ++r) {
            __m256 a = _mm256_broadcast_ss(s + r * lds + j);
            for (int u = 0; u < NV; ++u) c[r][u] = _mm256_fmadd_ps(a, b[u], c[r][u]);
        }
    }
    for (int r = 0; r < NR; ++r) for (int u = 0; u < NV; ++u) _mm256_storeu_ps(o + r * ldo + 8 * u, c[r][u]);
}

/* Lanes j .. j + 8 that lie in [a, b), as a float mask */
static inline __m256 lane_mask(int64_t j, int64_t a, int64_t b) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32((int)a - 1)), lt = _mm256_cmpgt_epi32(
        _mm256_set1_epi32((int)b), idx);
    return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
}

/* softmax_row for the panel loop: the same online softmax over the visible scores s[a .. b) (a < b), in whole
   vectors of 8 (the partial first and last ones masked, no scalar remainder; the full ones four at a time, which
   keeps more independent work in the scheduler than one chain of exp's polynomial at a time); s := 0 on the rest
   of [0, width) (width a multiple of 8, ≥ b).  Returns alpha. */
static inline float softmax_span(float *restrict s, int64_t a, int64_t b, int64_t width, float *restrict m,
                                 float *restrict l) {
    const int64_t va = a / 8 * 8, vb = (b + 7) / 8 * 8;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 vtop = ninf, vtop2 = ninf;
    int64_t j = va;
    for (; j < vb && (j < a || j + 8 > b); j += 8)
        vtop = _mm256_max_ps(vtop, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), lane_mask(j, a, b)));
    const int64_t full = j;
    for (; j + 16 <= b; j += 16) {
        vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(s + j));
        vtop2 = _mm256_max_ps(vtop2, _mm256_loadu_ps(s + j + 8));
    }
    for (; j + 8 <= b; j += 8) vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(s + j));
    const int64_t tail = j;
    if (j < vb) vtop = _mm256_max_ps(vtop, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), lane_mask(j, a, b)));
    vtop = _mm256_max_ps(vtop, vtop2);
    float lanes[8], top = *m, total = 0.0f;
    _mm256_storeu_ps(lanes, vtop);
    for (int u = 0; u < 8; ++u) top = lanes[u] > top ? lanes[u] : top;
    float alpha = *m == -INFINITY ? 0.0f : exp_or_zero(*m - top);
    const __m256 vt = _mm256_set1_ps(top);
    __m256 vsum = _mm256_setzero_ps(), vsum2 = _mm256_setzero_ps();
    for (j = va; j < full; j += 8) {  /* partial vectors at the start (two where [a, b) lies across one edge) */
        __m256 e = _mm256_and_ps(exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j), vt)), lane_mask(j, a, b));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    for (; j + 32 <= tail; j += 32) {
        __m256 e0 = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j), vt));
        __m256 e1 = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vt));
        __m256 e2 = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j + 16), vt));
        __m256 e3 = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j + 24), vt));
        _mm256_storeu_ps(s + j, e0);
        _mm256_storeu_ps(s + j + 8, e1);
        _mm256_storeu_ps(s + j + 16, e2);
        _mm256_storeu_ps(s + j + 24, e3);
        vsum = _mm256_add_ps(vsum, _mm256_add_ps(e0, e1));
        vsum2 = _mm256_add_ps(vsum2, _mm256_add_ps(e2, e3));
    }
    for (; j < tail; j += 8) {
        __m256 e = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + j), vt));
        _mm256_storeu_ps(s + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (tail < vb) {  /* a partial last vector */
        __m256 e = _mm256_and_ps(exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(s + tail), vt)), lane_mask(tail, a, b));
        _mm256_storeu_ps(s + tail, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, _mm256_add_ps(vsum, vsum2));
    for (int u = 0; u < 8; ++u) total += lanes[u];
    for (j = 0; j < va; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    for (j = vb; j < width; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    *l = *l * alpha + total;
    *m = top;
    return alpha;
}

/* pv_rows with NR and NV known to the compiler (NR ≤ 3, NV ≤ 4) */
static void pv_any(int nr, int nv, const float *s, int64_t lds, int64_t j0, int64_t j1, const float *v, int64_t ldv,
                   float *o, int64_t ldo, const float *alpha) {
#define PV_NV(NR)                                                                                                  \
    if (nv == 4) pv_rows(NR, 4, s, lds, j0, j1, v, ldv, o, ldo, alpha);                                            \
    else if (nv == 3) pv_rows(NR, 3, s, lds, j0, j1, v, ldv, o, ldo, alpha);                                       \
    else if (nv == 2) pv_rows(NR, 2, s, lds, j0, j1, v, ldv, o, ldo, alpha);                                       \
    else pv_rows(NR, 1, s, lds, j0, j1, v, ldv, o, ldo, alpha);
    if (nr == 3) { PV_NV(3) } else if (nr == 2) { PV_NV(2) } else { PV_NV(1) }
#undef PV_NV
}

/* One block of keys [k0, k0 + cols) for a group of nr rows whose visible keys are [lo_r, hi_r) (absolute; k0 a
   multiple of PANEL): scores, the online softmax, and the output rows o (ldo floats apart, Dv a multiple of 8). */
static void group_block(int nr, const float *qr, int64_t ldq, const float *panels, const float *v, int64_t ldv,
                        int64_t D, int64_t Dv, int64_t k0, int64_t cols, const int64_t *lo, const int64_t *hi,
                        float scale, float *s, int64_t lds, float *m, float *l, float *o, int64_t ldo) {
    const __m256 vscale = _mm256_set1_ps(scale);
    int64_t npan = (cols + PANEL - 1) / PANEL, j0 = cols, width = (cols + 7) / 8 * 8;
    const float *first = panels + (k0 / PANEL) * D * PANEL;
    for (int64_t p = 0; p < npan; ++p) {
        const float *panel = first + p * D * PANEL;
        if (nr == 3) qk_panel(3, qr, ldq, panel, D, vscale, s + p * PANEL, lds);
        else if (nr == 2) qk_panel(2, qr, ldq, panel, D, vscale, s + p * PANEL, lds);
        else qk_panel(1, qr, ldq, panel, D, vscale, s + p * PANEL, lds);
    }
    float alpha[3];
    for (int r = 0; r < nr; ++r) {
        int64_t a = lo[r] - k0, b = hi[r] - k0;
        a = a < 0 ? 0 : a;
        b = b > cols ? cols : b;
        float *sr = s + r * lds;
        if (b <= a) { memset(sr, 0, sizeof(float) * width); alpha[r] = 1.0f; continue; }
        alpha[r] = softmax_span(sr, a, b, width, m + r, l + r);
        j0 = a < j0 ? a : j0;
    }
    if (j0 >= cols) return;
    for (int64_t e0 = 0; e0 < Dv; e0 += 32) {
        int nv = (int)((Dv - e0) / 8 < 4 ? (Dv - e0) / 8 : 4);
        pv_any(nr, nv, s, lds, j0, cols, v + k0 * ldv + e0, ldv, o + e0, ldo, alpha);
    }
}

/* Causal summary attention, forward, with the kernels above; arguments as summary_forward's, but `rows` (≤ 3) is
   the row group and `block` (a multiple of PANEL) the keys per block; Dv a multiple of 8.  panels: room for
   ceil(T / PANEL) + ceil(N / PANEL) panels of D × PANEL floats and T × Dv floats; work: 3 · block floats.  Returns 1 (done). */
int summary_forward_panels(const float *q, const float *k, const float *v, const float *ks, const float *vs,
                           float *out, float *lse, float *work, float *panels, int64_t B, int64_t Hq, int64_t Hkv,
                           int64_t T, int64_t N, int64_t D, int64_t Dv, const int64_t *qst, const int64_t *kst,
                           const int64_t *vst, int64_t C, int64_t W, int64_t rows, int64_t block, float scale) {
    const int64_t G = Hq / Hkv, ldq = qst[2];
    float *kp = panels, *ksp = panels + (T + PANEL - 1) / PANEL * D * PANEL, *s = work;
    float *vp = ksp + (N + PANEL - 1) / PANEL * D * PANEL;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t hk = 0; hk < Hkv; ++hk) {
            const float *kh = k + b * kst[0] + hk * kst[1], *vh = v + b * vst[0] + hk * vst[1];
            const float *vsh = vs + (b * Hkv + hk) * N * Dv;
            /* the kv head's keys and summaries as panels, its values as contiguous rows (strided rows of a model's
               [B, T, H, D] layout made the P v kernel ~2.5x slower) */
            pack_panels(kh, kst[2], T, D, kp);
            pack_panels(ks + (b * Hkv + hk) * N * D, D, N, D, ksp);
            for (int64_t j = 0; j < T; ++j) memcpy(vp + j * Dv, vh + j * vst[2], sizeof(float) * Dv);
            for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
                const float *qh = q + b * qst[0] + h * qst[1];
                float *oh = out + (b * Hq + h) * T * Dv;
                for (int64_t i0 = 0; i0 < T; i0 += rows) {
                    int nr = (int)(T - i0 < rows ? T - i0 : rows);
                    float m[3], l[3], *o = oh + i0 * Dv;
                    int64_t lo[3], hi[3];
                    memset(o, 0, sizeof(float) * nr * Dv);
                    for (int r = 0; r < nr; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
                    /* summaries: row i sees [0, c - W); then the raw keys [(c - W) C, i] */
                    for (int phase = 0; phase < 2; ++phase) {
                        int64_t start = INT64_MAX, end = 0;
                        for (int r = 0; r < nr; ++r) {
                            int64_t i = i0 + r, c = i / C - W;
                            lo[r] = phase ? (c > 0 ? c * C : 0) : 0;
                            hi[r] = phase ? i + 1 : (c > 0 ? c : 0);
                            if (hi[r] > lo[r]) {
                                start = lo[r] < start ? lo[r] : start;
                                end = hi[r] > end ? hi[r] : end;
                            }
                        }
                        if (end <= start) continue;
                        start = start / PANEL * PANEL;
                        int64_t step = even_block(end - start, block, PANEL);
                        for (int64_t k0 = start; k0 < end; k0 += step)
                            group_block(nr, qh + i0 * ldq, ldq, phase ? kp : ksp, phase ? vp : vsh, Dv, D, Dv, k0, end - k0 < step ? end - k0 : step, lo, hi,
                                        scale, s, block, m, l, o, Dv);
                    }
                    for (int r = 0; r < nr; ++r) {
                        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                        for (int64_t e = 0; e < Dv; ++e) o[r * Dv + e] *= inv;
                        if (lse) lse[(b * Hq + h) * T + i0 + r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
                    }
                }
            }
        }
    return 1;
}
int summary_panels_available(void) { return 1; }
#else
int summary_forward_panels(void) { return 0; }
int summary_panels_available(void) { return 0; }
#endif

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
                int64_t step = even_block(n_sum, block, 16);
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
                step = even_block(end - first, block, 16);
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

#: Query rows and keys per tile of the sgemm loop (a tile of scores is ROWS × BLOCK floats, 128 KiB).
ROWS = 64
BLOCK = 512
#: Query rows per group (at most 3) and keys per block of the panel loop (``summary_forward_panels``); PANEL keys
#: per panel of packed keys.
PANEL_ROWS = 3
PANEL_BLOCK = 2048
PANEL = 32


def _declare(lib: ctypes.CDLL) -> None:
    lib.summary_forward.restype = None
    lib.summary_forward.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 3
                                    + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_void_p])
    lib.summary_panels_available.restype = ctypes.c_int
    lib.summary_panels_available.argtypes = []
    lib.summary_forward_panels.restype = ctypes.c_int
    lib.summary_forward_panels.argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 3
                                           + [ctypes.c_int64] * 4 + [ctypes.c_float])


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


def panels_available() -> bool:
    """Whether the panel loop (own AVX2 kernels instead of sgemm) was compiled here."""
    lib = _library.get()
    return lib is not None and bool(lib.summary_panels_available())


def summary_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_sum: torch.Tensor, v_sum: torch.Tensor,
                    scale: float, chunk_size: int, window_chunks: int, want_lse: bool = False,
                    rows: int | None = None, block: int | None = None, kernel: str = "auto"):
    """Causal summary attention without padding in one compiled loop: q [B, Hq, T, D], k [B, Hkv, T, D],
    v [B, Hkv, T, Dv] float32 on the CPU (any strides with the last dimension contiguous), k_sum [B, Hkv, N, D],
    v_sum [B, Hkv, N, Dv] the chunks' summaries.  Returns out [B, Hq, T, Dv] (and lse [B, Hq, T] float32 when
    ``want_lse``).  Needs :func:`applies`.

    ``kernel``: ``"panels"`` (the loop with its own AVX2 kernels: groups of ``rows`` ≤ 3 query rows, ``block`` keys
    rounded up to a multiple of :data:`PANEL`; default :data:`PANEL_ROWS`, :data:`PANEL_BLOCK`), ``"sgemm"`` (tiles
    of ``rows`` × ``block`` scores by BLAS; default :data:`ROWS` × :data:`BLOCK`), or ``"auto"``: the panels where
    they were compiled (AVX2 and FMA) and Dv is a multiple of 8, else sgemm."""
    if kernel not in ("auto", "panels", "sgemm"):
        raise ValueError(f"kernel must be 'auto', 'panels' or 'sgemm', got {kernel!r}")
    assert available(), "the summary CPU kernel is not available here (see native.applies)"
    lib = _library.get()
    batch, heads_q, length, dim = q.shape
    heads_kv, dim_v = k.shape[1], v.shape[-1]
    if kernel == "auto":
        kernel = "panels" if dim_v % 8 == 0 and panels_available() else "sgemm"
    if kernel == "panels" and not (dim_v % 8 == 0 and panels_available()):
        raise ValueError(f"the panel loop needs AVX2/FMA and Dv a multiple of 8 (Dv = {dim_v})")
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
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    lse_ptr = None if lse is None else lse.data_ptr()
    if kernel == "panels":
        rows = min(rows or PANEL_ROWS, 3)
        block = -(-(block or PANEL_BLOCK) // PANEL) * PANEL
        work = torch.empty(3 * block, dtype=torch.float32)
        panels = torch.empty((-(-length // PANEL) + -(-n_sum // PANEL)) * dim * PANEL + length * dim_v,
                             dtype=torch.float32)
        lib.summary_forward_panels(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_sum.data_ptr(), v_sum.data_ptr(),
                                   out.data_ptr(), lse_ptr, work.data_ptr(), panels.data_ptr(), batch, heads_q,
                                   heads_kv, length, n_sum, dim, dim_v, *(s.data_ptr() for s in strides), chunk_size,
                                   window_chunks, rows, block, scale)
    else:
        rows, block = rows or ROWS, block or BLOCK
        work = torch.empty(rows * block + 2 * rows, dtype=torch.float32)
        lib.summary_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_sum.data_ptr(), v_sum.data_ptr(),
                            out.data_ptr(), lse_ptr, work.data_ptr(), batch, heads_q, heads_kv, length, n_sum, dim,
                            dim_v, *(s.data_ptr() for s in strides), chunk_size, window_chunks, rows, block, scale,
                            _state["sgemm"])
    return (out, lse) if want_lse else out
