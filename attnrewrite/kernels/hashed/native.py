"""The hashed torch path's compiled CPU loop: the selection by code agreement and the attention over it.

Why a kernel of our own: the torch path (:mod:`.sparse`) scores every candidate key with a float matrix
product of ±1 signs, partitions the priorities with numpy and attends through sparse matrix products;
on one thread that is several times slower than exact attention with SDPA, although each query reads
only ``sinks + window + top_k`` keys.  Here, per (batch, key/value head) and query row, in plain C:

1. the row's visible keys (the mask's, and j ≤ i when causal), its first ``sinks`` and last ``window``;
2. the summed Hamming distance Σ_g popcount(code(q_g) XOR code(k_j)) over the group's query heads (the
   agreement is G·bits minus it) of every other visible key, 64 bits per XOR;
3. the ``top_k`` smallest distances by a histogram over the G·bits + 1 values (no sort): the threshold
   distance t is the first whose running count reaches ``top_k``; every key below t is taken, and of the
   keys at t the latest ones (the torch path's tie rule: the later key wins);
4. softmax(scale·q·k + bias) over the selected keys, with the row's max, for each query head of the group; the
   heads of a group two at a time, so that each selected key and value row is read once for both (and fetched
   ahead: the rows are random ones), the sums in the same order as for one head, so bit for bit the same.

The distances of two codes cost one popcount: popcount(q₀⊕k) + popcount(q₁⊕k) = popcount(q₀⊕q₁) +
2·popcount((q₀⊕k) ∧ ¬(q₀⊕q₁)), the first term a constant of the row.

The selection [B, Hkv, Tq, S] int32 (−1: empty slot) is kept for the backward, which recomputes the
probabilities of the selected keys only and accumulates dq, dk and dv.  The codes are the same bits as
the torch path's (``codes.pack``: x·P > 0 in float64), so the selected sets are the torch path's exactly.

Used for float32 on the CPU with ``hash="random"``, no ``score_mod`` and no ``far_dtype``, where torch runs on
one thread (the loop runs on one); built by :mod:`attnrewrite.kernels.native_build` (``ATTNREWRITE_NATIVE=0``
switches it off).
"""

from __future__ import annotations

import ctypes
import sys

import torch

from attnrewrite.kernels.checks import MASKED_SCORE
from attnrewrite.kernels.native_build import C_EXP, NativeLibrary

from .codes import project

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#define INLINE static inline __attribute__((always_inline))
""" + C_EXP + r"""
/* e^x for x <= 0 (exp_in_range, shared with the sigmoid kernel); below -87 (weights under 1.7e-38 of the
   row's largest) exactly 0. */
INLINE float exp_nonpositive(float x) {
    return x < -87.0f ? 0.0f : exp_in_range(x);
}

/* Fetch a row ahead of use: the selected rows of k and v are random rows, which the hardware prefetcher cannot
   guess (its first cache line only: measured at D = 32, the second one's prefetch cost more than it saved). */
INLINE void prefetch_row(const float *row) {
#ifdef HAVE_AVX2
    _mm_prefetch((const char *)row, _MM_HINT_T0);
#else
    (void)row;
#endif
}

/* a . b over n floats, in 8 partial sums */
INLINE float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int u = 0; u < 8; ++u) part[u] += a[d + u] * b[d + u];
    float total = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (; d < n; ++d) total += a[d] * b[d];
    return total;
}

/* out[s] = x . rows[index[s]] for s < n, rows of D floats (the logits of a row's selected keys). */
INLINE void dots(const float *restrict x, const float *restrict rows, const int32_t *restrict index, int64_t n,
                 float *restrict out, const int64_t D) {
    int64_t s = 0;
#ifdef HAVE_AVX2
    if (D % 8 == 0) {
        for (; s + 8 <= n; s += 8) {  /* eight keys at once, their eight partial vectors summed by a transpose */
            __m256 a[8];
            const float *r[8];
            for (int u = 0; u < 8; ++u) { r[u] = rows + (int64_t)index[s + u] * D; a[u] = _mm256_setzero_ps(); }
            for (int64_t d = 0; d < D; d += 8) {
                __m256 xv = _mm256_loadu_ps(x + d);
                for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r[u] + d), a[u]);
            }
            __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
            __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
            __m256 s03 = _mm256_hadd_ps(s01, s23), s47 = _mm256_hadd_ps(s45, s67);
            __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s03, s47, 0x20), _mm256_permute2f128_ps(s03, s47, 0x31));
            _mm256_storeu_ps(out + s, sum);
        }
    }
#endif
    for (; s < n; ++s) out[s] = dot(x, rows + (int64_t)index[s] * D, D);
}

/* dots for two query heads that share a selection (a group's): out0[s] = x0 . rows[index[s]], out1[s] = x1 . ...,
   each key row read once for both.  The same sums, in the same order, as dots() of each head alone (per key, per
   lane the FMA chain over d, then the same horizontal tree; the last n % 8 keys by dot()), so the logits are
   bit for bit those of two dots() calls. */
INLINE void dots2(const float *restrict x0, const float *restrict x1, const float *restrict rows,
                  const int32_t *restrict index, int64_t n, float *restrict out0, float *restrict out1,
                  const int64_t D) {
    int64_t s = 0;
#ifdef HAVE_AVX2
    if (D % 8 == 0) {
        for (; s + 4 <= (n / 8) * 8; s += 4) {  /* four keys, two heads: eight partial vectors, one transpose */
            __m256 a[8];
            const float *r[4];
            for (int u = 0; u < 4; ++u) r[u] = rows + (int64_t)index[s + u] * D;
            if (s + 12 <= n)  /* the rows two steps ahead */
                for (int u = 8; u < 12; ++u) prefetch_row(rows + (int64_t)index[s + u] * D);
            for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 xa = _mm256_loadu_ps(x0 + d), xb = _mm256_loadu_ps(x1 + d);
                for (int u = 0; u < 4; ++u) {
                    __m256 kv = _mm256_loadu_ps(r[u] + d);
                    a[u] = _mm256_fmadd_ps(xa, kv, a[u]);
                    a[4 + u] = _mm256_fmadd_ps(xb, kv, a[4 + u]);
                }
            }
            __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
            __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
            __m256 s03 = _mm256_hadd_ps(s01, s23), s47 = _mm256_hadd_ps(s45, s67);
            __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s03, s47, 0x20), _mm256_permute2f128_ps(s03, s47, 0x31));
            __m128 lo = _mm256_castps256_ps128(sum), hi = _mm256_extractf128_ps(sum, 1);
            _mm_storeu_ps(out0 + s, lo);
            _mm_storeu_ps(out1 + s, hi);
        }
    }
#endif
    for (; s < n; ++s) {
        out0[s] = dot(x0, rows + (int64_t)index[s] * D, D);
        out1[s] = dot(x1, rows + (int64_t)index[s] * D, D);
    }
}

/* p[s] = e^(p[s] - max) / sum over s < n (in place), from the logits p */
INLINE void softmax_row(float *restrict p, int64_t n) {
    float part[8];
    for (int u = 0; u < 8; ++u) part[u] = p[0];
    int64_t s = 0;
    for (; s + 8 <= n; s += 8)
        for (int u = 0; u < 8; ++u) part[u] = p[s + u] > part[u] ? p[s + u] : part[u];
    float m = part[0];
    for (int u = 1; u < 8; ++u) m = part[u] > m ? part[u] : m;
    for (; s < n; ++s) m = p[s] > m ? p[s] : m;
    for (s = 0; s < n; ++s) p[s] = exp_nonpositive(p[s] - m);
    float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (s = 0; s + 8 <= n; s += 8)
        for (int u = 0; u < 8; ++u) sums[u] += p[s + u];
    float total = ((sums[0] + sums[4]) + (sums[1] + sums[5])) + ((sums[2] + sums[6]) + (sums[3] + sums[7]));
    for (; s < n; ++s) total += p[s];
    float inv = 1.0f / total;
    for (s = 0; s < n; ++s) p[s] *= inv;
}

/* o = sum_s p[s] rows[index[s]] (rows of Dv floats) */
INLINE void weighted_sum(const float *restrict p, const float *restrict rows, const int32_t *restrict index, int64_t n,
                         float *restrict o, const int64_t Dv) {
#ifdef HAVE_AVX2
    if (Dv % 8 == 0 && Dv <= 128) {  /* the row's sum in registers */
        __m256 acc[16];
        for (int64_t d = 0; d < Dv / 8; ++d) acc[d] = _mm256_setzero_ps();
        for (int64_t s = 0; s < n; ++s) {
            const float *r = rows + (int64_t)index[s] * Dv;
            __m256 w = _mm256_set1_ps(p[s]);
            for (int64_t d = 0; d < Dv / 8; ++d) acc[d] = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 8 * d), acc[d]);
        }
        for (int64_t d = 0; d < Dv / 8; ++d) _mm256_storeu_ps(o + 8 * d, acc[d]);
        return;
    }
#endif
    for (int64_t d = 0; d < Dv; ++d) o[d] = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
        const float *r = rows + (int64_t)index[s] * Dv;
        float w = p[s];
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * r[d];
    }
}


/* weighted_sum for two heads over one selection: o0 = sum_s p0[s] rows[index[s]], o1 likewise, each value row read
   once; per head the same FMA chain, in the same order, as weighted_sum (so bit for bit its result). */
INLINE void weighted_sum2(const float *restrict p0, const float *restrict p1, const float *restrict rows,
                          const int32_t *restrict index, int64_t n, float *restrict o0, float *restrict o1,
                          const int64_t Dv) {
#ifdef HAVE_AVX2
    if (Dv % 8 == 0 && Dv <= 64) {  /* both rows' sums in registers */
        __m256 acc0[8], acc1[8];
        for (int64_t d = 0; d < Dv / 8; ++d) { acc0[d] = _mm256_setzero_ps(); acc1[d] = _mm256_setzero_ps(); }
        for (int64_t s = 0; s < n; ++s) {
            const float *r = rows + (int64_t)index[s] * Dv;
            if (s + 8 < n) prefetch_row(rows + (int64_t)index[s + 8] * Dv);
            __m256 w0 = _mm256_set1_ps(p0[s]), w1 = _mm256_set1_ps(p1[s]);
            for (int64_t d = 0; d < Dv / 8; ++d) {
                __m256 x = _mm256_loadu_ps(r + 8 * d);
                acc0[d] = _mm256_fmadd_ps(w0, x, acc0[d]);
                acc1[d] = _mm256_fmadd_ps(w1, x, acc1[d]);
            }
        }
        for (int64_t d = 0; d < Dv / 8; ++d) {
            _mm256_storeu_ps(o0 + 8 * d, acc0[d]);
            _mm256_storeu_ps(o1 + 8 * d, acc1[d]);
        }
        return;
    }
#endif
    weighted_sum(p0, rows, index, n, o0, Dv);
    weighted_sum(p1, rows, index, n, o1, Dv);
}

#ifdef HAVE_AVX2
/* key_order_lo/hi[m]: the lane mask m of a 16-key chunk's distance vector (lanes 0-7 / 8-15) as a mask over the
   chunk's keys; lane L of the vector holds key CHUNK_ORDER[L] (how vector_distances interleaves them) */
static const int CHUNK_ORDER[16] = {0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15};
static uint16_t key_order_lo[256], key_order_hi[256];

/* pack_table[m]: the positions of the set bits of the byte m, in increasing order, then zeros */
static int32_t pack_table[256][8] __attribute__((aligned(32)));
static int pack_table_ready = 0;

static void fill_pack_table(void) {
    for (int m = 0; m < 256; ++m) {
        int n = 0;
        for (int b = 0; b < 8; ++b) pack_table[m][b] = 0;
        for (int b = 0; b < 8; ++b)
            if (m >> b & 1) pack_table[m][n++] = b;
    }
    for (int m = 0; m < 256; ++m) {
        key_order_lo[m] = key_order_hi[m] = 0;
        for (int b = 0; b < 8; ++b)
            if (m >> b & 1) {
                key_order_lo[m] |= (uint16_t)(1u << CHUNK_ORDER[b]);
                key_order_hi[m] |= (uint16_t)(1u << CHUNK_ORDER[8 + b]);
            }
    }
    pack_table_ready = 1;  /* a second caller racing here writes the same values */
}

/* The summed distances of 16 keys kj[0 .. 16) to the group's G codes as 16 uint16 lanes, in the order CHUNK_ORDER.
   Two codes a pair (qa, same = ~(q0 ^ q1)) cost one popcount: popcount(q0 ^ k) + popcount(q1 ^ k) =
   popcount(q0 ^ q1) + 2 popcount((q0 ^ k) & same) (where q0 and q1 agree both differ from k or neither; where they
   differ exactly one does), the constant part `pairs_const` added at the end; an odd G's last code (qv) alone.
   Per-byte popcounts by a nibble table, summed over the group (G * 8 <= 255), then over each key's 8 bytes
   (psadbw) and interleaved into 16-bit lanes.  The same integers as summing G popcounts; for an even G the
   halved distances (d - popcount(q0 ^ q1) - ...) / 2 = the sum of the pairs' popcounts alone, which order the
   keys as d does (a row's constant and a factor 2 dropped) and take every integer level, not every other one. */
INLINE __m256i popcount_bytes(__m256i x) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(x, nibble)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble)));
}

INLINE __m256i vector_distances(const uint64_t *restrict kj, const __m256i *qa, const __m256i *same, __m256i qv,
                                __m256i pairs_const, const int64_t G) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i sums[4];
    for (int u = 0; u < 4; ++u) {
        __m256i keys = _mm256_loadu_si256((const __m256i *)(kj + 4 * u)), bytes = zero;
        for (int64_t m = 0; m < G / 2; ++m)
            bytes = _mm256_add_epi8(bytes, popcount_bytes(_mm256_and_si256(_mm256_xor_si256(keys, qa[m]), same[m])));
        if (G & 1) {
            bytes = _mm256_add_epi8(bytes, bytes);
            bytes = _mm256_add_epi8(bytes, popcount_bytes(_mm256_xor_si256(keys, qv)));
        }
        sums[u] = _mm256_sad_epu8(bytes, zero);            /* four 64-bit sums: keys 4u .. 4u + 3 */
    }
    __m256i ab = _mm256_or_si256(sums[0], _mm256_slli_epi64(sums[1], 32));
    __m256i cd = _mm256_or_si256(sums[2], _mm256_slli_epi64(sums[3], 32));
    __m256i lanes = _mm256_or_si256(ab, _mm256_slli_epi32(cd, 16));
    return G & 1 ? _mm256_add_epi16(lanes, pairs_const) : lanes;
}

INLINE uint32_t lane_mask(__m256i flags) {  /* one bit per 16-bit lane, lane order */
    return (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(flags), _mm256_extracti128_si256(flags, 1)));
}

INLINE uint32_t key_mask(uint32_t lanes) { return (uint32_t)key_order_lo[lanes & 0xFF] | key_order_hi[lanes >> 8]; }

/* How many levels around the previous row's threshold the distance pass counts (else a histogram pass); with the
   halved levels of an even G, 6 measured fastest (8: 2% slower, 4: 7%; T = 8k, G = 2, bits = 64). */
#define BANDS 6

/* The top_k candidates of a row without a mask, one 64-bit word per code, in vectors: kj = the nc candidate
   codes (positions s1 ..), written from sel[n]; *guess: the previous row's threshold, updated.  Returns the new n.
   dist holds the chunks' distances in CHUNK_ORDER, then the last nc % 16 in order (halved for an even G, see
   vector_distances: the threshold and *guess are in the same units). */
INLINE int64_t vector_candidates(const uint64_t *restrict qc, const uint64_t *restrict kj, int64_t s1, int64_t nc,
                                 const int64_t G, int64_t top_k, int32_t *restrict sel, int64_t n,
                                 uint16_t *restrict dist, int32_t *restrict hist, int64_t *guess) {
    __m256i qa[G / 2 + 1], same[G / 2 + 1];
    int64_t constant = 0;
    for (int64_t m = 0; m < G / 2; ++m) {
        qa[m] = _mm256_set1_epi64x((long long)qc[2 * m]);
        same[m] = _mm256_set1_epi64x((long long)~(qc[2 * m] ^ qc[2 * m + 1]));
        constant += __builtin_popcountll(qc[2 * m] ^ qc[2 * m + 1]);
    }
    const __m256i qv = _mm256_set1_epi64x((long long)qc[G - 1]), pairs_const = _mm256_set1_epi16((short)constant);
    int64_t chunks = nc / 16, top = chunks * 16;
    int64_t lo = *guess - BANDS / 2;
    lo = lo < 0 ? 0 : lo;
    const __m256i lov = _mm256_set1_epi16((short)lo);
    __m256i below = _mm256_setzero_si256(), at[BANDS];
    for (int l = 0; l < BANDS; ++l) at[l] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c) {
        __m256i d = vector_distances(kj + 16 * c, qa, same, qv, pairs_const, G);
        _mm256_storeu_si256((__m256i *)(dist + 16 * c), d);
        below = _mm256_sub_epi16(below, _mm256_cmpgt_epi16(lov, d));
        __m256i off = _mm256_sub_epi16(d, lov);
        for (int l = 0; l < BANDS; ++l) at[l] = _mm256_sub_epi16(at[l], _mm256_cmpeq_epi16(off, _mm256_set1_epi16(l)));
    }
    int64_t counts[BANDS + 1];  /* counts[0]: below lo; counts[1 + l]: at lo + l */
    const __m256i ones = _mm256_set1_epi16(1);
    for (int l = 0; l <= BANDS; ++l) {
        __m256i wide = _mm256_madd_epi16(l ? at[l - 1] : below, ones);
        __m128i half = _mm_add_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
        half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4E));
        half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0xB1));
        counts[l] = _mm_cvtsi128_si32(half);
    }
    for (int64_t j = top; j < nc; ++j) {
        uint32_t d = 0;
        for (int64_t g = 0; g < G; ++g) d += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j]);
        if (!(G & 1)) d = (d - (uint32_t)constant) >> 1;  /* the vectors' halved units */
        dist[j] = (uint16_t)d;
        if ((int64_t)d < lo) ++counts[0];
        else if ((int64_t)d < lo + BANDS) ++counts[1 + d - lo];
    }
    /* the threshold t and the count below it: from the bands, else from a histogram of every distance */
    int64_t t = -1, under = counts[0];
    if (under < top_k) {
        for (int l = 0; l < BANDS; ++l) {
            if (under + counts[1 + l] >= top_k) { t = lo + l; break; }
            under += counts[1 + l];
        }
    }
    if (t < 0) {
        const int64_t levels = G * 64 + 1;
        memset(hist, 0, sizeof(int32_t) * levels);
        for (int64_t j = 0; j < nc; ++j) ++hist[dist[j]];
        under = 0;
        t = 0;
        while (under + hist[t] < top_k) under += hist[t++];
    }
    *guess = t;
    int64_t quota = top_k - under, end = n + top_k;
    for (int64_t j = nc - 1; j >= top && n < end; --j) {  /* the last keys, in order */
        uint32_t d = dist[j];
        int here = d == (uint32_t)t && quota > 0;
        sel[n] = (int32_t)(s1 + j);
        n += (d < (uint32_t)t) | here;
        quota -= here;
    }
    const __m256i tv = _mm256_set1_epi16((short)t), eight = _mm256_set1_epi32(8);
    for (int64_t c = chunks - 1; c >= 0 && n < end; --c) {
        __m256i d = _mm256_loadu_si256((const __m256i *)(dist + 16 * c));
        uint32_t take = key_mask(lane_mask(_mm256_cmpgt_epi16(tv, d)));
        if (quota > 0) {
            uint32_t eq = key_mask(lane_mask(_mm256_cmpeq_epi16(tv, d)));
            int64_t at = __builtin_popcount(eq);
            if (at <= quota) { take |= eq; quota -= at; eq = 0; }  /* all of them: no branch per key */
            while (eq && quota > 0) {
                uint32_t key = 1u << (31 - __builtin_clz(eq));   /* the latest key at t */
                take |= key;
                eq &= ~key;
                --quota;
            }
        }
        __m256i base = _mm256_set1_epi32((int32_t)(s1 + 16 * c));
        uint32_t low = take & 0xFF, high = take >> 8;
        _mm256_storeu_si256((__m256i *)(sel + n), _mm256_add_epi32(base, _mm256_load_si256((const __m256i *)pack_table[low])));
        n += __builtin_popcount(low);
        _mm256_storeu_si256((__m256i *)(sel + n), _mm256_add_epi32(_mm256_add_epi32(base, eight),
                                                                  _mm256_load_si256((const __m256i *)pack_table[high])));
        n += __builtin_popcount(high);
    }
    return n;
}
#endif

/* The selection of one query row of one (batch, kv head) slice, written to sel[0 .. S) (-1 after the last).
   qc: the group's G query codes, W 64-bit words each; kc: the slice's key codes [Tk, W]; keep: the row's mask
   [Tk] (NULL: none); limit: keys j < limit may be visible (causal: i + 1); dist: work for Tk + 16 uint16;
   hist: work for 4 * (G * 64 * W + 2) int32.  Sinks: the first `sinks` visible keys; window: the last `window`;
   then the `top_k` other visible keys of the smallest summed distance, ties to the later key. */
INLINE void select_row(const uint64_t *restrict qc, const uint64_t *restrict kc, const uint8_t *restrict keep,
                       int64_t limit, const int64_t G, int64_t W, int64_t top_k, int64_t window, int64_t sinks, int64_t S,
                       int32_t *restrict sel, uint16_t *restrict dist, int32_t *restrict hist, int64_t *guess) {
    int64_t n = 0;
    /* sinks: visible keys from 0 until `sinks` are found; s1 is where the search stopped */
    int64_t s1 = 0, found = 0;
    while (s1 < limit && found < sinks) {
        if (!keep || keep[s1]) { sel[n++] = (int32_t)s1; ++found; }
        ++s1;
    }
    /* window: visible keys from limit - 1 down, not below s1; w0 is the lowest position it covers */
    int64_t w0 = limit;
    found = 0;
    while (w0 > s1 && found < window) {
        --w0;
        if (!keep || keep[w0]) { sel[n++] = (int32_t)w0; ++found; }
    }
    /* candidates: the visible keys in [s1, w0) */
    int64_t count = 0;
    if (top_k > 0 && w0 > s1) {
        if (keep) { for (int64_t j = s1; j < w0; ++j) count += keep[j] != 0; } else count = w0 - s1;
    }
    if (count > 0 && count <= top_k) {
        for (int64_t j = w0 - 1; j >= s1; --j)
            if (!keep || keep[j]) sel[n++] = (int32_t)j;
    } else if (count > top_k) {
#ifdef HAVE_AVX2
        if (W == 1 && !keep && G * 8 <= 255 && w0 - s1 < 16 * 32767) {
            n = vector_candidates(qc, kc + s1, s1, w0 - s1, G, top_k, sel, n, dist, hist, guess);
            for (int64_t s = n; s < S; ++s) sel[s] = -1;
            return;
        }
#endif
        /* summed distances and their histogram (four of them, by j mod 4, so that neighbours do not wait on
           the same counter); a key the mask hides gets the level `hidden`, past every distance */
        const int64_t levels = G * 64 * W + 2, hidden = levels - 1, nc = w0 - s1;
        memset(hist, 0, sizeof(int32_t) * 4 * levels);
        const uint64_t *kj = kc + s1 * W;
        if (W == 1 && !keep) {  /* the common case, four keys a step (G is a constant here, see below) */
            int32_t *h0 = hist, *h1 = hist + levels, *h2 = hist + 2 * levels, *h3 = hist + 3 * levels;
            int64_t j = 0;
            for (; j + 4 <= nc; j += 4) {
                uint32_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
                for (int64_t g = 0; g < G; ++g) {
                    d0 += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j]);
                    d1 += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j + 1]);
                    d2 += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j + 2]);
                    d3 += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j + 3]);
                }
                dist[j] = (uint16_t)d0; dist[j + 1] = (uint16_t)d1; dist[j + 2] = (uint16_t)d2; dist[j + 3] = (uint16_t)d3;
                ++h0[d0]; ++h1[d1]; ++h2[d2]; ++h3[d3];
            }
            for (; j < nc; ++j) {
                uint32_t d = 0;
                for (int64_t g = 0; g < G; ++g) d += (uint32_t)__builtin_popcountll(qc[g] ^ kj[j]);
                dist[j] = (uint16_t)d;
                ++h0[d];
            }
        } else {
            for (int64_t j = 0; j < nc; ++j) {
                uint32_t d = 0;
                for (int64_t g = 0; g < G; ++g)
                    for (int64_t w = 0; w < W; ++w) d += (uint32_t)__builtin_popcountll(qc[g * W + w] ^ kj[j * W + w]);
                if (keep) d = keep[s1 + j] ? d : (uint32_t)hidden;
                dist[j] = (uint16_t)d;
                ++hist[(j & 3) * levels + d];
            }
        }
        /* threshold t: keys at distance < t all go in, and `quota` of those at t, the latest */
        int64_t below = 0, t = 0;
        for (;;) {
            int64_t here = hist[t] + hist[levels + t] + hist[2 * levels + t] + hist[3 * levels + t];
            if (below + here >= top_k) break;
            below += here;
            ++t;
        }
        int64_t quota = top_k - below, end = n + top_k;
        int64_t j = nc;
#ifdef HAVE_AVX2
        /* sixteen distances at a time from the top: the lanes below t, and the highest `quota` lanes at t; the
           chosen lanes' positions are packed to the front of eight int32 (pack_table: the set bits' positions) and
           stored whole, n advancing by their count (sel has room for the overhang, see hashed_select) */
        const __m256i tv = _mm256_set1_epi16((short)t), eight = _mm256_set1_epi32(8);
        while (j >= 16 && n < end) {
            j -= 16;
            __m256i d = _mm256_loadu_si256((const __m256i *)(dist + j));
            __m256i lt16 = _mm256_cmpgt_epi16(tv, d), eq16 = _mm256_cmpeq_epi16(tv, d);
            uint32_t take = (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(lt16),
                                                                        _mm256_extracti128_si256(lt16, 1)));
            if (quota > 0) {
                uint32_t eq = (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(eq16),
                                                                          _mm256_extracti128_si256(eq16, 1)));
                int64_t at = __builtin_popcount(eq);
                if (at <= quota) { take |= eq; quota -= at; eq = 0; }  /* all of them: no branch per key */
                while (eq && quota > 0) {
                    uint32_t lane = 1u << (31 - __builtin_clz(eq));   /* the highest lane at t */
                    take |= lane;
                    eq &= ~lane;
                    --quota;
                }
            }
            __m256i base = _mm256_set1_epi32((int32_t)(s1 + j));
            uint32_t low = take & 0xFF, high = take >> 8;
            _mm256_storeu_si256((__m256i *)(sel + n),
                                _mm256_add_epi32(base, _mm256_load_si256((const __m256i *)pack_table[low])));
            n += __builtin_popcount(low);
            _mm256_storeu_si256((__m256i *)(sel + n), _mm256_add_epi32(_mm256_add_epi32(base, eight),
                                                                      _mm256_load_si256((const __m256i *)pack_table[high])));
            n += __builtin_popcount(high);
        }
#endif
        while (j > 0 && n < end) {
            --j;
            uint32_t d = dist[j];
            int at = d == (uint32_t)t && quota > 0;
            sel[n] = (int32_t)(s1 + j);
            n += (d < (uint32_t)t) | at;
            quota -= at;
        }
    }
    for (int64_t s = n; s < S; ++s) sel[s] = -1;
}

/* The selection of every row.  qc [F * G, Tq, W] (query head f * G + g of slice f), kc [F, Tk, W] int64 codes;
   keep: NULL or a uint8 mask row of Tk entries at keep + b * keep_b + i * keep_i for batch b = f / Hkv;
   causal: row i sees keys j <= row0 + i (row0: the global position of row 0, where the rows are a part of the
   sequence, as a context-parallel rank's are; else 0).  sel [F, Tq, S] int32; work: Tk + 16 uint16, 4 * (G * 64 * W + 2) int32 and
   S + 16 int32 (each part from a 64-byte boundary).  A row may write up to 15 entries past its S (the vector
   scan's stores): into the next rows, written after it, and for the last rows (those fewer than 16 entries from
   the end of sel: the last one, or more where S < 16) into work, copied from there. */
void hashed_select(const uint64_t *qc, const uint64_t *kc, const uint8_t *keep, int64_t keep_b, int64_t keep_i,
                   int32_t *sel, void *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tq, int64_t Tk, int64_t W,
                   int64_t causal, int64_t row0, int64_t top_k, int64_t window, int64_t sinks, int64_t S) {
#ifdef HAVE_AVX2
    if (!pack_table_ready) fill_pack_table();
#endif
    uint16_t *dist = (uint16_t *)work;
    int32_t *hist = (int32_t *)((char *)work + ((sizeof(uint16_t) * (Tk + 16) + 63) / 64) * 64);
    int32_t *last = hist + ((4 * (G * 64 * W + 2) + 15) / 16) * 16;
    uint64_t group[64];  /* the row's G * W query words (G * W <= 64, checked by the caller) */
    for (int64_t f = 0; f < F; ++f) {
        const uint64_t *kf = kc + f * Tk * W;
        const uint8_t *keep_f = keep ? keep + (f / Hkv) * keep_b : 0;
        int64_t guess = 0;  /* the previous row's threshold distance */
        for (int64_t i = 0; i < Tq; ++i) {
            for (int64_t g = 0; g < G; ++g)
                for (int64_t w = 0; w < W; ++w) group[g * W + w] = qc[((f * G + g) * Tq + i) * W + w];
            int64_t limit = causal ? (row0 + i + 1 < Tk ? row0 + i + 1 : Tk) : Tk;
            const uint8_t *keep_i_row = keep_f ? keep_f + i * keep_i : 0;
            /* the last rows, whose overhang would pass the end of sel (S < 16), into work */
            int32_t *out = (F * Tq - (f * Tq + i) - 1) * S < 16 ? last : sel + (f * Tq + i) * S;
            if (G == 1)  /* constant group sizes: the distance loop unrolled */
                select_row(group, kf, keep_i_row, limit, 1, W, top_k, window, sinks, S, out, dist, hist, &guess);
            else if (G == 2)
                select_row(group, kf, keep_i_row, limit, 2, W, top_k, window, sinks, S, out, dist, hist, &guess);
            else if (G == 4)
                select_row(group, kf, keep_i_row, limit, 4, W, top_k, window, sinks, S, out, dist, hist, &guess);
            else
                select_row(group, kf, keep_i_row, limit, G, W, top_k, window, sinks, S, out, dist, hist, &guess);
            if (out == last) memcpy(sel + (f * Tq + i) * S, last, sizeof(int32_t) * S);
        }
    }
}

/* Codes from sign bits: bits [N, nbits] (0 or 1 bytes) -> codes [N, W] 64-bit words, bit b of a code in bit
   b % 64 of word b / 64 (codes.pack's bits, read as little-endian words), the words zero-padded. */
void hashed_pack(const uint8_t *bits, int64_t N, int64_t nbits, uint64_t *codes, int64_t W) {
    for (int64_t r = 0; r < N; ++r) {
        const uint8_t *row = bits + r * nbits;
        for (int64_t w = 0; w < W; ++w) {
            uint64_t word = 0;
            int64_t stop = nbits - 64 * w < 64 ? nbits - 64 * w : 64;
            for (int64_t b = 0; b < stop; ++b) word |= (uint64_t)(row[64 * w + b] != 0) << b;
            codes[r * W + w] = word;
        }
    }
}

/* Codes from float32 products x.P [N, nbits] as hashed_pack packs sign bits (bit set where the product is > 0);
   unsure[r] = 1 where a product of row r is within bound = factor * xnorm[r] * pnorm[b] of 0 (its sign may be
   the rounding's), else 0. */
void hashed_pack_products(const float *products, int64_t N, int64_t nbits, const float *xnorm, const float *pnorm,
                          float factor, uint64_t *codes, int64_t W, uint8_t *unsure) {
    for (int64_t r = 0; r < N; ++r) {
        const float *row = products + r * nbits;
        float scale = factor * xnorm[r];
        int doubt = 0;
        for (int64_t w = 0; w < W; ++w) {
            uint64_t word = 0;
            int64_t stop = nbits - 64 * w < 64 ? nbits - 64 * w : 64, b = 0;
#ifdef HAVE_AVX2
            /* eight products a step: their sign bits by one movemask (the bound as below, up to its rounding: it
               only decides which rows are taken again in float64, where every sign is exact) */
            const __m256 zero = _mm256_setzero_ps(), scales = _mm256_set1_ps(scale), tiny = _mm256_set1_ps(1e-30f);
            for (; b + 8 <= stop; b += 8) {
                __m256 x = _mm256_loadu_ps(row + 64 * w + b);
                __m256 bound = _mm256_add_ps(_mm256_mul_ps(scales, _mm256_loadu_ps(pnorm + 64 * w + b)), tiny);
                word |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ)) << b;
                __m256 near = _mm256_and_ps(_mm256_cmp_ps(x, bound, _CMP_LE_OQ),
                                            _mm256_cmp_ps(x, _mm256_sub_ps(zero, bound), _CMP_GE_OQ));
                doubt |= _mm256_movemask_ps(near) != 0;
            }
#endif
            for (; b < stop; ++b) {
                float x = row[64 * w + b], bound = scale * pnorm[64 * w + b] + 1e-30f;
                word |= (uint64_t)(x > 0.0f) << b;
                doubt |= (x <= bound) & (x >= -bound);
            }
            codes[r * W + w] = word;
        }
        unsure[r] = (uint8_t)doubt;
    }
}

INLINE int64_t selected(const int32_t *row, int64_t S) {
    int64_t n = 0;
    while (n < S && row[n] >= 0) ++n;
    return n;
}

INLINE void add_bias(float *restrict p, const float *restrict brow, const int32_t *restrict row, int64_t n) {
    if (brow)
        for (int64_t s = 0; s < n; ++s) p[s] += brow[row[s]];
}

INLINE void attend(const float *q, const float *k, const float *v, const int32_t *sel, const float *bias,
                   int64_t bias_b, int64_t bias_i, float *out, float *work, int64_t F, int64_t Hkv, int64_t G,
                   int64_t Tq, int64_t Tk, const int64_t D, const int64_t Dv, int64_t S, float scale) {
    for (int64_t f = 0; f < F; ++f) {
        const float *kf = k + f * Tk * D, *vf = v + f * Tk * Dv;
        const float *bias_f = bias ? bias + (f / Hkv) * bias_b : 0;
        for (int64_t i = 0; i < Tq; ++i) {
            const int32_t *row = sel + (f * Tq + i) * S;
            int64_t n = selected(row, S);
            const float *brow = bias_f ? bias_f + i * bias_i : 0;
            int64_t g = 0;
            if (n > 0)  /* the group's heads in pairs: each selected key and value read once for two heads */
                for (; g + 2 <= G; g += 2) {
                    const float *q0 = q + ((f * G + g) * Tq + i) * D, *q1 = q + ((f * G + g + 1) * Tq + i) * D;
                    float *p0 = work, *p1 = work + S;
                    dots2(q0, q1, kf, row, n, p0, p1, D);
                    for (int64_t s = 0; s < n; ++s) { p0[s] *= scale; p1[s] *= scale; }
                    add_bias(p0, brow, row, n);
                    add_bias(p1, brow, row, n);
                    softmax_row(p0, n);
                    softmax_row(p1, n);
                    weighted_sum2(p0, p1, vf, row, n, out + ((f * G + g) * Tq + i) * Dv,
                                  out + ((f * G + g + 1) * Tq + i) * Dv, Dv);
                }
            for (; g < G; ++g) {
                const float *qi = q + ((f * G + g) * Tq + i) * D;
                float *o = out + ((f * G + g) * Tq + i) * Dv;
                if (n == 0) { memset(o, 0, sizeof(float) * Dv); continue; }
                dots(qi, kf, row, n, work, D);
                for (int64_t s = 0; s < n; ++s) work[s] *= scale;
                add_bias(work, brow, row, n);
                softmax_row(work, n);
                weighted_sum(work, vf, row, n, o, Dv);
            }
        }
    }
}

/* Softmax attention over the selected keys.  q [F * G, Tq, D], k [F, Tk, D], v [F, Tk, Dv], sel [F, Tq, S];
   bias: NULL or float rows of Tk at bias + b * bias_b + i * bias_i; out [F * G, Tq, Dv]; work: 2 * S floats.
   A row without a selected key gets 0.  (Head widths 32, 64 and 128 get code of their own.) */
void hashed_attend(const float *q, const float *k, const float *v, const int32_t *sel, const float *bias,
                   int64_t bias_b, int64_t bias_i, float *out, float *work, int64_t F, int64_t Hkv, int64_t G,
                   int64_t Tq, int64_t Tk, int64_t D, int64_t Dv, int64_t S, float scale) {
    if (D == 32 && Dv == 32)
        attend(q, k, v, sel, bias, bias_b, bias_i, out, work, F, Hkv, G, Tq, Tk, 32, 32, S, scale);
    else if (D == 64 && Dv == 64)
        attend(q, k, v, sel, bias, bias_b, bias_i, out, work, F, Hkv, G, Tq, Tk, 64, 64, S, scale);
    else if (D == 128 && Dv == 128)
        attend(q, k, v, sel, bias, bias_b, bias_i, out, work, F, Hkv, G, Tq, Tk, 128, 128, S, scale);
    else
        attend(q, k, v, sel, bias, bias_b, bias_i, out, work, F, Hkv, G, Tq, Tk, D, Dv, S, scale);
}

INLINE void attend_backward(const float *q, const float *k, const float *v, const int32_t *sel, const float *bias,
                            int64_t bias_b, int64_t bias_i, const float *grad, float *dq, float *dk, float *dv,
                            float *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tq, int64_t Tk, const int64_t D,
                            const int64_t Dv, int64_t S, float scale) {
    float *p = work, *dp = work + S;
    for (int64_t f = 0; f < F; ++f) {
        const float *kf = k + f * Tk * D, *vf = v + f * Tk * Dv;
        float *dkf = dk + f * Tk * D, *dvf = dv + f * Tk * Dv;
        const float *bias_f = bias ? bias + (f / Hkv) * bias_b : 0;
        for (int64_t i = 0; i < Tq; ++i) {
            const int32_t *row = sel + (f * Tq + i) * S;
            int64_t n = selected(row, S);
            const float *brow = bias_f ? bias_f + i * bias_i : 0;
            for (int64_t g = 0; g < G; ++g) {
                const float *qi = q + ((f * G + g) * Tq + i) * D, *go = grad + ((f * G + g) * Tq + i) * Dv;
                float *dqi = dq + ((f * G + g) * Tq + i) * D;
                float acc[D];
                for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
                if (n > 0) {
                    dots(qi, kf, row, n, p, D);
                    for (int64_t s = 0; s < n; ++s) p[s] *= scale;
                    add_bias(p, brow, row, n);
                    softmax_row(p, n);
                    dots(go, vf, row, n, dp, Dv);
                    float mean = dot(p, dp, n);  /* sum_s p[s] dp[s] */
                    for (int64_t s = 0; s < n; ++s) {
                        int64_t j = row[s];
                        float ds = p[s] * (dp[s] - mean) * scale, ps = p[s];
                        const float *kj = kf + j * D;
                        float *restrict dkj = dkf + j * D, *restrict dvj = dvf + j * Dv;
                        for (int64_t d = 0; d < D; ++d) { acc[d] += ds * kj[d]; dkj[d] += ds * qi[d]; }
                        for (int64_t d = 0; d < Dv; ++d) dvj[d] += ps * go[d];
                    }
                }
                for (int64_t d = 0; d < D; ++d) dqi[d] = acc[d];
            }
        }
    }
}

/* The backward of hashed_attend over the same selection.  grad [F * G, Tq, Dv]; dq [F * G, Tq, D] (written);
   dk [F, Tk, D] and dv [F, Tk, Dv] (accumulated: come in zeroed); work: 2 * S floats.  Per row and head:
   P = softmax(scale q k + bias) recomputed, dP_s = dO . v_s, dS_s = P_s (dP_s - sum_s P_s dP_s),
   dq = scale sum_s dS_s k_s, dk_s += scale dS_s q, dv_s += P_s dO. */
void hashed_backward(const float *q, const float *k, const float *v, const int32_t *sel, const float *bias,
                     int64_t bias_b, int64_t bias_i, const float *grad, float *dq, float *dk, float *dv, float *work,
                     int64_t F, int64_t Hkv, int64_t G, int64_t Tq, int64_t Tk, int64_t D, int64_t Dv, int64_t S,
                     float scale) {
    if (D == 32 && Dv == 32)
        attend_backward(q, k, v, sel, bias, bias_b, bias_i, grad, dq, dk, dv, work, F, Hkv, G, Tq, Tk, 32, 32, S, scale);
    else if (D == 64 && Dv == 64)
        attend_backward(q, k, v, sel, bias, bias_b, bias_i, grad, dq, dk, dv, work, F, Hkv, G, Tq, Tk, 64, 64, S, scale);
    else if (D == 128 && Dv == 128)
        attend_backward(q, k, v, sel, bias, bias_b, bias_i, grad, dq, dk, dv, work, F, Hkv, G, Tq, Tk, 128, 128, S,
                        scale);
    else
        attend_backward(q, k, v, sel, bias, bias_b, bias_i, grad, dq, dk, dv, work, F, Hkv, G, Tq, Tk, D, Dv, S, scale);
}
/* The context-parallel ring (attnrewrite.distributed.hashed): one block of a rank's query rows against the key/value
   block at hand (rank `owner`'s shard of L positions, load-balanced: local index x < L/2 is global position
   owner * L/2 + x, else (2 * world - 1 - owner) * L/2 + x - L/2).  Each row's selection is kept as indices in their
   owners' shards, index [F, n, S] (int16, or int32 where `wide`), its slots of this block from starts[owner] to
   starts[owner + 1] - 1 (starts [F, n, world + 1] int32).  This row's slots to li (and their key bias, read at the
   global positions, to pb); returns how many. */
INLINE int64_t ring_slots(const void *index, int64_t wide, int64_t r, int64_t S, const int32_t *starts, int64_t world,
                          int64_t owner, int64_t L, const float *bias_f, int32_t *restrict li, float *restrict pb) {
    const int32_t *st = starts + r * (world + 1);
    int64_t first = st[owner], n = st[owner + 1] - first, half = L / 2;
    for (int64_t s = 0; s < n; ++s) {
        int64_t x = wide ? ((const int32_t *)index)[r * S + first + s] : ((const int16_t *)index)[r * S + first + s];
        li[s] = (int32_t)x;
        pb[s] = bias_f ? bias_f[x < half ? owner * half + x : (2 * world - 1 - owner) * half + x - half] : 0.0f;
    }
    return n;
}

INLINE void ring_forward(const float *q, const float *k, const float *v, const void *index, int64_t wide,
                         const int32_t *starts, int64_t world, int64_t owner, const float *bias, int64_t bias_b,
                         float *out, float *lse, void *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tl,
                         int64_t row0, int64_t rows, int64_t L, const int64_t D, const int64_t Dv, int64_t S,
                         float scale) {
    int32_t *li = (int32_t *)work;
    float *pb = (float *)(li + S), *p = pb + S;
    float part[Dv];
    for (int64_t f = 0; f < F; ++f) {
        const float *kf = k + f * L * D, *vf = v + f * L * Dv;
        const float *bias_f = bias ? bias + (f / Hkv) * bias_b : 0;
        for (int64_t i = 0; i < rows; ++i) {
            int64_t n = ring_slots(index, wide, f * rows + i, S, starts, world, owner, L, bias_f, li, pb);
            if (n == 0) continue;
            for (int64_t g = 0; g < G; ++g) {
                int64_t h = (f * G + g) * Tl + row0 + i;
                dots(q + h * D, kf, li, n, p, D);
                float m = -INFINITY;
                for (int64_t s = 0; s < n; ++s) {
                    p[s] = p[s] * scale + pb[s];
                    m = p[s] > m ? p[s] : m;
                }
                float sum = 0.0f;
                for (int64_t s = 0; s < n; ++s) { p[s] = exp_nonpositive(p[s] - m); sum += p[s]; }
                weighted_sum(p, vf, li, n, part, Dv);                      /* unnormalised */
                float part_lse = m + logf(sum), old = lse[h], keep_old = 0.0f, take_new = 1.0f / sum, now = part_lse;
                if (old != -INFINITY) {
                    float top = old > part_lse ? old : part_lse;
                    now = top + logf(expf(old - top) + expf(part_lse - top));
                    keep_old = expf(old - now);
                    take_new = expf(part_lse - now) / sum;
                }
                float *o = out + h * Dv;
                for (int64_t d = 0; d < Dv; ++d) o[d] = o[d] * keep_old + part[d] * take_new;
                lse[h] = now;
            }
        }
    }
}

/* One ring step's forward: the rows row0 .. row0 + rows - 1 of q [F * G, Tl, D] against the block k [F, L, D],
   v [F, L, Dv] over their slots in it (ring_slots), merged by log-sum-exp into out [F * G, Tl, Dv] and lse [F * G, Tl]
   (float32; lse -inf and out 0 where no key was seen yet).  bias: NULL or float rows of T = world * L key biases at
   bias + b * bias_b.  work: S int32 + 2 S floats. */
void hashed_ring_forward(const float *q, const float *k, const float *v, const void *index, int64_t wide,
                         const int32_t *starts, int64_t world, int64_t owner, const float *bias, int64_t bias_b,
                         float *out, float *lse, void *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tl,
                         int64_t row0, int64_t rows, int64_t L, int64_t D, int64_t Dv, int64_t S, float scale) {
    if (D == 64 && Dv == 64)
        ring_forward(q, k, v, index, wide, starts, world, owner, bias, bias_b, out, lse, work, F, Hkv, G, Tl, row0,
                     rows, L, 64, 64, S, scale);
    else
        ring_forward(q, k, v, index, wide, starts, world, owner, bias, bias_b, out, lse, work, F, Hkv, G, Tl, row0,
                     rows, L, D, Dv, S, scale);
}

INLINE void ring_backward(const float *q, const float *k, const float *v, const void *index, int64_t wide,
                          const int32_t *starts, int64_t world, int64_t owner, const float *bias, int64_t bias_b,
                          const float *grad, const float *lse, const float *delta, float *dq, float *dk, float *dv,
                          void *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tl, int64_t row0, int64_t rows,
                          int64_t L, const int64_t D, const int64_t Dv, int64_t S, float scale) {
    int32_t *li = (int32_t *)work;
    float *pb = (float *)(li + S), *p = pb + S, *dp = p + S;
    for (int64_t f = 0; f < F; ++f) {
        const float *kf = k + f * L * D, *vf = v + f * L * Dv;
        float *dkf = dk + f * L * D, *dvf = dv + f * L * Dv;
        const float *bias_f = bias ? bias + (f / Hkv) * bias_b : 0;
        for (int64_t i = 0; i < rows; ++i) {
            int64_t n = ring_slots(index, wide, f * rows + i, S, starts, world, owner, L, bias_f, li, pb);
            if (n == 0) continue;
            for (int64_t g = 0; g < G; ++g) {
                int64_t h = (f * G + g) * Tl + row0 + i;
                const float *qi = q + h * D, *go = grad + h * Dv;
                float l = lse[h], mean = delta[h], acc[D];
                dots(qi, kf, li, n, p, D);
                dots(go, vf, li, n, dp, Dv);
                for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
                for (int64_t s = 0; s < n; ++s) {
                    float x = p[s] * scale + pb[s] - l;
                    float ps = exp_nonpositive(x < 0.0f ? x : 0.0f), ds = ps * (dp[s] - mean) * scale;
                    const float *kj = kf + (int64_t)li[s] * D;
                    float *restrict dkj = dkf + (int64_t)li[s] * D, *restrict dvj = dvf + (int64_t)li[s] * Dv;
                    for (int64_t d = 0; d < D; ++d) { acc[d] += ds * kj[d]; dkj[d] += ds * qi[d]; }
                    for (int64_t d = 0; d < Dv; ++d) dvj[d] += ps * go[d];
                }
                float *dqi = dq + h * D;
                for (int64_t d = 0; d < D; ++d) dqi[d] += acc[d];
            }
        }
    }
}

/* The backward of one ring step: with the merged lse and delta = sum_d dO * out [F * G, Tl] of the rows, P_s =
   e^(scale q k_s + bias_s - lse), dS_s = P_s (dO . v_s - delta) scale; dq [F * G, Tl, D] += sum_s dS_s k_s, and the
   block's accumulators dk [F, L, D] += dS_s q, dv [F, L, Dv] += P_s dO.  work: S int32 + 3 S floats. */
void hashed_ring_backward(const float *q, const float *k, const float *v, const void *index, int64_t wide,
                          const int32_t *starts, int64_t world, int64_t owner, const float *bias, int64_t bias_b,
                          const float *grad, const float *lse, const float *delta, float *dq, float *dk, float *dv,
                          void *work, int64_t F, int64_t Hkv, int64_t G, int64_t Tl, int64_t row0, int64_t rows,
                          int64_t L, int64_t D, int64_t Dv, int64_t S, float scale) {
    if (D == 64 && Dv == 64)
        ring_backward(q, k, v, index, wide, starts, world, owner, bias, bias_b, grad, lse, delta, dq, dk, dv, work,
                      F, Hkv, G, Tl, row0, rows, L, 64, 64, S, scale);
    else
        ring_backward(q, k, v, index, wide, starts, world, owner, bias, bias_b, grad, lse, delta, dq, dk, dv, work,
                      F, Hkv, G, Tl, row0, rows, L, D, Dv, S, scale);
}
/* The selection of R rows, sel [R, S] int32 global positions (-1: empty), as the context-parallel ring keeps it (the
   load-balanced layout of world ranks holding `local` positions each, see ring_slots): each row's slots ordered by
   their key's owner, stably (a counting sort), kept [R, S] (int16, or int32 where wide) the key's index in its
   owner's shard, -1 for the empty slots (last); starts [R, world + 1]: owner p's slots from starts[p] to
   starts[p + 1] - 1.  counts: work for world + 1 int64. */
void hashed_by_owner(const int32_t *sel, int64_t R, int64_t S, int64_t world, int64_t local, void *kept, int64_t wide,
                     int32_t *starts, int64_t *counts) {
    int64_t half = local / 2;
    for (int64_t r = 0; r < R; ++r) {
        const int32_t *row = sel + r * S;
        int32_t *st = starts + r * (world + 1);
        for (int64_t p = 0; p <= world; ++p) counts[p] = 0;
        for (int64_t s = 0; s < S; ++s) {
            int64_t x = row[s], c = x / half;
            ++counts[x < 0 ? world : (c < world ? c : 2 * world - 1 - c)];
        }
        st[0] = 0;
        for (int64_t p = 0; p < world; ++p) st[p + 1] = st[p] + (int32_t)counts[p];
        for (int64_t p = 0; p <= world; ++p) counts[p] = p < world ? st[p] : st[world];  /* next slot per owner */
        for (int64_t s = 0; s < S; ++s) {
            int64_t x = row[s], c = x / half, p = x < 0 ? world : (c < world ? c : 2 * world - 1 - c);
            int64_t index = x < 0 ? -1 : x - c * half + (c >= world ? half : 0), at = r * S + counts[p]++;
            if (wide) ((int32_t *)kept)[at] = (int32_t)index; else ((int16_t *)kept)[at] = (int16_t)index;
        }
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.hashed_pack.restype = None
    lib.hashed_pack.argtypes = [pointer, size, size, pointer, size]
    lib.hashed_pack_products.restype = None
    lib.hashed_pack_products.argtypes = [pointer, size, size, pointer, pointer, ctypes.c_float, pointer, size,
                                         pointer]
    lib.hashed_select.restype = None
    lib.hashed_select.argtypes = [pointer] * 3 + [size] * 2 + [pointer] * 2 + [size] * 12
    lib.hashed_attend.restype = None
    lib.hashed_attend.argtypes = [pointer] * 5 + [size] * 2 + [pointer] * 2 + [size] * 8 + [ctypes.c_float]
    lib.hashed_backward.restype = None
    lib.hashed_backward.argtypes = [pointer] * 5 + [size] * 2 + [pointer] * 5 + [size] * 8 + [ctypes.c_float]
    lib.hashed_by_owner.restype = None
    lib.hashed_by_owner.argtypes = [pointer] + [size] * 4 + [pointer, size, pointer, pointer]
    lib.hashed_ring_forward.restype = None
    lib.hashed_ring_forward.argtypes = ([pointer] * 4 + [size] + [pointer] + [size] * 2 + [pointer] + [size]
                                        + [pointer] * 3 + [size] * 10 + [ctypes.c_float])
    lib.hashed_ring_backward.restype = None
    lib.hashed_ring_backward.argtypes = ([pointer] * 4 + [size] + [pointer] + [size] * 2 + [pointer] + [size]
                                         + [pointer] * 7 + [size] * 10 + [ctypes.c_float])


_library = NativeLibrary("hashed_select", SOURCE, _declare, extra_x86=("-mpopcnt",))
#: the query words of one group the kernel holds on its stack (G · bits / 64)
MAX_GROUP_WORDS = 64
#: float32 products per block of :func:`_codes` (1 MB)
CODE_BLOCK_ELEMENTS = 1 << 18


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (the torch path runs then)."""
    return _library.get()


def covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, bits: int, hash: str,
           score_mod, far_dtype) -> bool:
    """Whether the compiled loop computes this call (checked inputs; the same answer while tracing and when
    run, thread count aside): float32 on the CPU, ``hash="random"``, no score modification, no ``far_dtype``,
    a group's codes within :data:`MAX_GROUP_WORDS` words, and the kernel built."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and hash == "random"
            and not score_mod and far_dtype is None):
        return False
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32):
        return False
    words = (bits + 63) // 64
    groups = q.shape[1] // k.shape[1]
    if groups * words > MAX_GROUP_WORDS:  # (then every summed distance also fits the kernel's int16 lanes)
        return False
    return library() is not None


def selection_width(t_k: int, top_k: int, window: int, sinks: int) -> int:
    """S, the slots of each row's selection: min(Tk, sinks + window + top_k)."""
    return min(t_k, sinks + window + top_k)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 [..., words] codes of bool bits [..., nbits] (``codes.pack``'s layout read as 64-bit words, zero-padded)."""
    bits = bits.contiguous()
    words = (bits.shape[-1] + 63) // 64
    codes = torch.empty(*bits.shape[:-1], words, dtype=torch.int64)
    library().hashed_pack(bits.data_ptr(), bits.numel() // max(1, bits.shape[-1]), bits.shape[-1], codes.data_ptr(),
                          words)
    return codes


def _codes(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """int64 [B, H, T, words]: the codes of x (bit b: x·P_b > 0 as ``codes.project`` decides it, in float64;
    ``codes.pack``'s bits read as 64-bit words, zero-padded).

    For float32 x and one projection [D, bits] the products are taken in float32 first: one farther from 0
    than (D + 4)·2⁻²³·‖x‖·‖P_b‖ (a bound on the float32 dot product's error and P's rounding to float32, with a
    margin) has the sign of the exact product; rows with a product inside the bound are taken again in float64."""
    if projection.dim() != 2 or x.dtype != torch.float32:
        return _pack_bits(project(x, projection) > 0)
    dim, bits = projection.shape
    flat = x.reshape(-1, dim)
    p32 = projection.to(torch.float32)
    x_norm, p_norm = flat.norm(dim=-1).contiguous(), p32.norm(dim=0).contiguous()
    words, count = (bits + 63) // 64, flat.shape[0]
    codes = torch.empty(count, words, dtype=torch.int64)
    unsure = torch.empty(count, dtype=torch.bool)
    # the products a block of rows at a time, packed while the block is in cache (all at once they are 16 MB for
    # q [1, 8, 8k, 32] at 64 bits, written and read back: the codes took twice as long)
    step = max(1, CODE_BLOCK_ELEMENTS // bits)
    products = torch.empty(min(count, step), bits, dtype=torch.float32)
    for r0 in range(0, count, step):
        n = min(count, r0 + step) - r0
        torch.matmul(flat[r0:r0 + n], p32, out=products[:n])
        library().hashed_pack_products(products.data_ptr(), n, bits, x_norm[r0:].data_ptr(), p_norm.data_ptr(),
                                       (dim + 4) * 2.0 ** -23, codes[r0:].data_ptr(), words, unsure[r0:].data_ptr())
    if bool(unsure.any()):
        codes[unsure] = _pack_bits(project(flat[unsure], projection) > 0)
    return codes.view(*x.shape[:-1], words)


def _mask_rows(attn_mask: torch.Tensor | None, batch: int, t_q: int, t_k: int):
    """(keep uint8, bias float32 or None, batch stride, row stride) of a mask broadcastable to [B, 1, Tq, Tk]:
    rows of Tk entries, the strides 0 where the mask broadcasts; (None, None, 0, 0) without a mask."""
    if attn_mask is None:
        return None, None, 0, 0
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))[:, 0]   # [B|1, Tq|1, Tk|1]
    mask = mask.expand(mask.shape[0], mask.shape[1], t_k)
    stride_b = mask.shape[1] * t_k if mask.shape[0] == batch and batch > 1 else 0
    stride_i = t_k if mask.shape[1] == t_q and t_q > 1 else 0
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8), None, stride_b, stride_i
    keep = mask > MASKED_SCORE
    bias = mask.masked_fill(~keep, 0.0).to(torch.float32).contiguous()
    return keep.contiguous().view(torch.uint8), bias, stride_b, stride_i


def select(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, bits: int, top_k: int,
           window: int, sinks: int, proj_q: torch.Tensor, proj_k: torch.Tensor) -> torch.Tensor:
    """The selection int32 [B, Hkv, Tq, S] (S = :func:`selection_width`; −1: empty slot, slots unordered) of
    checked inputs: the keys the torch path's :func:`.sparse.select` chooses."""
    keep, _, stride_b, stride_i = _mask_rows(attn_mask, q.shape[0], q.shape[2], k.shape[2])
    return _select_words(_codes(q, proj_q), _codes(k, proj_k), keep, stride_b, stride_i, is_causal, 0, top_k, window,
                         sinks)


def packed_words(packed: torch.Tensor) -> torch.Tensor:
    """int64 [..., words] codes from ``codes.pack``'s bytes [..., bits / 8] uint8: the codes :func:`codes_of`
    computes (bit b in bit b % 64 of word b // 64: the bytes zero-padded to whole words and read as
    little-endian 64-bit words; :func:`selects` checks the byte order)."""
    n_bytes = packed.shape[-1]
    words = (n_bytes + 7) // 8
    padded = torch.nn.functional.pad(packed, (0, 8 * words - n_bytes)) if 8 * words > n_bytes else packed
    return padded.contiguous().view(torch.int64)


def codes_of(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """int64 [B, H, T, words]: the codes of x [B, H, T, D] (bit b: x·P_b > 0, decided in float64 as
    ``codes.project`` does; P [D, bits] or one per head [H, D, bits]), as :func:`select_rows` reads them."""
    return _codes(x, projection)


def selects(q: torch.Tensor, heads_kv: int, bits: int) -> bool:
    """Whether :func:`select_rows` can choose the keys of queries like ``q`` (any float dtype, any hash: it
    reads codes only): on the CPU, a group's codes within :data:`MAX_GROUP_WORDS` words, a little-endian
    machine (:func:`packed_words`), and the kernel built."""
    if q.device.type != "cpu" or sys.byteorder != "little":
        return False
    if (q.shape[1] // heads_kv) * ((bits + 63) // 64) > MAX_GROUP_WORDS:
        return False
    return library() is not None


def select_rows(q_codes: torch.Tensor, k_codes: torch.Tensor, keep: torch.Tensor | None, is_causal: bool,
                first_row: int, top_k: int, window: int, sinks: int) -> torch.Tensor:
    """The selection int32 [B, Hkv, n, S] (−1: empty, slots unordered) of n query rows at global positions
    ``first_row`` … ``first_row`` + n − 1 of a sequence whose keys' codes are all given: the keys that
    :func:`select` chooses for those rows of the whole sequence (causal: row i sees keys j ≤ i).

    Args:
        q_codes: int64 [B, Hq, n, words] (:func:`codes_of`); k_codes: int64 [B, Hkv, Tk, words]
            (:func:`codes_of`, or :func:`packed_words` of ``codes.pack``'s bytes).
        keep: None or bool [B|1, Tk], the keys the mask lets every row see.
    """
    batch = q_codes.shape[0]
    stride_b = 0
    if keep is not None:
        stride_b = keep.shape[-1] if keep.shape[0] == batch and batch > 1 else 0
        keep = keep.contiguous().view(torch.uint8)
    return _select_words(q_codes, k_codes, keep, stride_b, 0, is_causal, first_row, top_k, window, sinks)


def _select_words(q_codes: torch.Tensor, k_codes: torch.Tensor, keep: torch.Tensor | None, stride_b: int,
                  stride_i: int, is_causal: bool, first_row: int, top_k: int, window: int,
                  sinks: int) -> torch.Tensor:
    """The kernel's selection int32 [B, Hkv, Tq, S] from int64 codes [B, Hq, Tq, words] and [B, Hkv, Tk, words];
    ``keep``: None or the uint8 mask rows at the strides (:func:`_mask_rows`); ``first_row``: the global position
    of query row 0 (causal)."""
    lib = library()
    q_codes, k_codes = q_codes.contiguous(), k_codes.contiguous()
    batch, heads_q, t_q, words = q_codes.shape
    heads_kv, t_k = k_codes.shape[1], k_codes.shape[2]
    groups = heads_q // heads_kv
    width = selection_width(t_k, top_k, window, sinks)
    selection = torch.empty(batch, heads_kv, t_q, width, dtype=torch.int32)
    work = torch.empty(2 * (t_k + 16) + 64 + 16 * (groups * 64 * words + 2) + 64 + 4 * (width + 16), dtype=torch.uint8)
    lib.hashed_select(q_codes.data_ptr(), k_codes.data_ptr(), None if keep is None else keep.data_ptr(), stride_b,
                      stride_i, selection.data_ptr(), work.data_ptr(), batch * heads_kv, heads_kv, groups, t_q, t_k,
                      words, int(is_causal), first_row, top_k, window, sinks, width)
    return selection


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
            scale: float, bits: int, top_k: int, window: int, sinks: int, proj_q: torch.Tensor,
            proj_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, Dv], selection int32 [B, Hkv, Tq, S]) of checked float32 CPU inputs (:func:`covers`)."""
    lib = library()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads_q, t_q, dim = q.shape
    heads_kv, t_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    groups = heads_q // heads_kv
    selection = select(q, k, attn_mask, is_causal, bits, top_k, window, sinks, proj_q, proj_k)
    width = selection.shape[-1]
    _, bias, stride_b, stride_i = _mask_rows(attn_mask, batch, t_q, t_k)
    out = torch.empty(batch, heads_q, t_q, dim_v, dtype=torch.float32)
    work = torch.empty(2 * max(width, 1), dtype=torch.float32)
    lib.hashed_attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), selection.data_ptr(),
                      None if bias is None else bias.data_ptr(), stride_b, stride_i, out.data_ptr(), work.data_ptr(),
                      batch * heads_kv, heads_kv, groups, t_q, t_k, dim, dim_v, width, scale)
    return out, selection


def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
             scale: float, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) float32 of :func:`forward` over its ``selection``; keys that were not selected get 0."""
    lib = library()
    grad, q, k, v = grad.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads_q, t_q, dim = q.shape
    heads_kv, t_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    width = selection.shape[-1]
    assert selection.dtype == torch.int32 and selection.shape == (batch, heads_kv, t_q, width)
    selection = selection.contiguous()
    _, bias, stride_b, stride_i = _mask_rows(attn_mask, batch, t_q, t_k)
    dq = torch.empty(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    work = torch.empty(2 * max(width, 1), dtype=torch.float32)
    lib.hashed_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), selection.data_ptr(),
                        None if bias is None else bias.data_ptr(), stride_b, stride_i, grad.data_ptr(), dq.data_ptr(),
                        dk.data_ptr(), dv.data_ptr(), work.data_ptr(), batch * heads_kv, heads_kv,
                        heads_q // heads_kv, t_q, t_k, dim, dim_v, width, scale)
    return dq, dk, dv


def ring_covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`ring_forward` / :func:`ring_backward` compute a context-parallel ring over these shards:
    float32 on the CPU and the kernel built (the caller excludes what it does not cover: score modifications,
    far keys' rounding, learned projections' gradients)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 and library() is not None)


def _ring_args(q, k_block, v_block, index, starts, owner, bias, rows):
    world = starts.shape[-1] - 1
    assert index.dtype in (torch.int16, torch.int32) and starts.dtype == torch.int32
    assert index.is_contiguous() and starts.is_contiguous() and q.is_contiguous()
    batch, heads_q, local, dim = q.shape
    heads_kv = k_block.shape[1]
    bias_b = 0 if bias is None or bias.shape[0] == 1 else bias.shape[-1]
    return ([q.data_ptr(), k_block.data_ptr(), v_block.data_ptr(), index.data_ptr(), int(index.dtype == torch.int32),
             starts.data_ptr(), world, owner, None if bias is None else bias.data_ptr(), bias_b],
            [batch * heads_kv, heads_kv, heads_q // heads_kv, local, rows.start, rows.stop - rows.start,
             k_block.shape[2], dim, v_block.shape[-1], index.shape[-1]])


def ring_forward(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, index: torch.Tensor,
                 starts: torch.Tensor, owner: int, bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                 rows: slice, scale: float) -> None:
    """One step of the hashed context-parallel ring (:mod:`attnrewrite.distributed.hashed`), in place: the local
    query rows ``rows`` of q [B, Hq, T_local, D] attend to their selected keys that lie in rank ``owner``'s block
    k_block [B, Hkv, T_local, D], v_block [B, Hkv, T_local, Dv] (the load-balanced layout's shard), merged by
    log-sum-exp into out [B, Hq, T_local, Dv] and lse [B, Hq, T_local] (float32; 0 and −inf before any key).

    ``index`` [B, Hkv, n, S] int16/int32 and ``starts`` [B, Hkv, n, W + 1] int32: the rows' selection as kept by
    ``by_owner`` (indices in the owners' shards, each row's slots of rank p from starts[p] to starts[p + 1] − 1);
    ``bias``: None or the key bias float32 [B|1, T] at global positions (contiguous)."""
    pointers, sizes = _ring_args(q, k_block, v_block, index, starts, owner, bias, rows)
    k_block, v_block = k_block.contiguous(), v_block.contiguous()
    pointers[1:3] = [k_block.data_ptr(), v_block.data_ptr()]
    work = torch.empty(3 * index.shape[-1] + 16, dtype=torch.float32)
    library().hashed_ring_forward(*pointers, out.data_ptr(), lse.data_ptr(), work.data_ptr(), *sizes, scale)


def ring_backward(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, index: torch.Tensor,
                  starts: torch.Tensor, owner: int, bias: torch.Tensor | None, grad: torch.Tensor, lse: torch.Tensor,
                  delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rows: slice,
                  scale: float) -> None:
    """The backward of :func:`ring_forward` for one step, accumulating in place: dq [B, Hq, T_local, D] of the rows
    and the block's dk [B, Hkv, T_local, D], dv [B, Hkv, T_local, Dv] (float32, contiguous), from grad (dO), the
    merged lse and delta = Σ dO·out [B, Hq, T_local]."""
    pointers, sizes = _ring_args(q, k_block, v_block, index, starts, owner, bias, rows)
    k_block, v_block = k_block.contiguous(), v_block.contiguous()
    pointers[1:3] = [k_block.data_ptr(), v_block.data_ptr()]
    assert dk.is_contiguous() and dv.is_contiguous() and dq.is_contiguous() and grad.is_contiguous()
    work = torch.empty(4 * index.shape[-1] + 16, dtype=torch.float32)
    library().hashed_ring_backward(*pointers, grad.data_ptr(), lse.data_ptr(), delta.data_ptr(), dq.data_ptr(),
                                   dk.data_ptr(), dv.data_ptr(), work.data_ptr(), *sizes, scale)


def by_owner(selection: torch.Tensor, world: int, local: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection int32 [..., S] of global positions (−1: empty) as the context-parallel ring keeps it
    (``attnrewrite.distributed.hashed.by_owner``, the same tensors): each key's index in its owner's shard in
    ``dtype`` (int16 or int32), each row's slots ordered by owner (stably), −1 empties last; and starts
    [..., W + 1] int32, rank p's slots of a row from starts[p] to starts[p + 1] − 1.  The load-balanced layout:
    rank r holds chunks r and 2W − 1 − r of 2W chunks of ``local / 2`` positions."""
    assert selection.dtype == torch.int32 and dtype in (torch.int16, torch.int32)
    selection = selection.contiguous()
    kept = torch.empty(selection.shape, dtype=dtype)
    starts = torch.empty(*selection.shape[:-1], world + 1, dtype=torch.int32)
    counts = torch.empty(world + 1, dtype=torch.int64)
    width = selection.shape[-1]
    library().hashed_by_owner(selection.data_ptr(), selection.numel() // max(1, width), width, world, local,
                              kept.data_ptr(), int(dtype == torch.int32), starts.data_ptr(), counts.data_ptr())
    return kept, starts
