"""A small compiled CPU kernel for the chunked path's elementwise pass: P = sigmoid(scale * S + b), masked.

Why a kernel of our own: on the CPU, ATen's ``sigmoid_`` evaluates ``exp`` to 1 ulp (Sleef) and costs
about 0.9 ns per element on an AVX2 core, a third of the chunked path's time; the bias added by
``baddbmm`` with a broadcast ``self`` costs a copy of each score tile on top; and the causal
diagonal tiles were hidden by a separate boolean mask.  One pass of plain C (``exp`` by range
reduction and a degree-5 polynomial, relative error under 2e-7, auto-vectorised by the C
compiler) does scale, bias, sigmoid and the visibility limit of each row in ~0.5 ns per element.
Inductor cannot generate this: its vectorised ``exp`` is the same 1-ulp Sleef call as ATen's.

The C source is compiled once per machine with the system's C compiler and loaded with ctypes
(:mod:`attnrewrite.kernels.native_build`); compiling takes well under a second.  Where there is no
compiler, compiling fails, or ``ATTNREWRITE_NATIVE=0`` is set, :func:`library` returns None and the
caller keeps the ATen ops (the same results up to float32 rounding).

Semantics of ``sigmoid_tile`` (float32, a contiguous [rows, cols] tile ``s``, in place):
``s[i, j] = sigmoid(scale * s[i, j] + bias[i] + key_bias[j])`` (``key_bias`` the tile's keys' additive values,
or NULL for none) for ``j < limit[i] - key_start`` (clamped to
[0, cols]; every ``j`` when ``limit`` is NULL), and exactly 0 for the others; -inf in ``s`` gives
exactly 0, NaN stays NaN.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from attnrewrite.kernels.native_build import C_EXP, NativeLibrary, sgemm_address

SOURCE = r"""
#include <stdint.h>
#include <string.h>
""" + C_EXP + r"""

/* sigmoid(x) = 1 / (1 + e^-x).  e^t: t = n ln2 + r with n = round(t / ln2) (by adding and subtracting
   1.5 * 2^23), ln2 split in two parts (Cody and Waite) so r is exact, e^r by a degree-5 polynomial fitted on
   [-ln2/2, ln2/2] (relative error 8e-8), 2^n built in the exponent bits.  t is clamped to [-87, 88], inside
   float's range; t > 88 means x < -88, where the weight is below 1e-38 and set to exactly 0. */
static inline float sigmoid_one(float x) {
    float t = -x;
    float c = t < -87.0f ? -87.0f : t;
    c = c > 88.0f ? 88.0f : c;
    float y = 1.0f / (1.0f + exp_in_range(c));
    return t > 88.0f ? 0.0f : y;
}

void sigmoid_tile(float *restrict s, const float *restrict bias, const int64_t *restrict limit,
                  const float *restrict key_bias, int64_t key_start, float scale, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        float b = bias[i];
        float *restrict row = s + i * cols;
        int64_t visible = cols;
        if (limit) {
            visible = limit[i] - key_start;
            visible = visible < 0 ? 0 : (visible > cols ? cols : visible);
        }
        /* two loops, so that each vectorises: with a per-key additive bias (a padding mask) and without */
        if (key_bias)
            for (int64_t j = 0; j < visible; ++j) row[j] = sigmoid_one(row[j] * scale + b + key_bias[j]);
        else
            for (int64_t j = 0; j < visible; ++j) row[j] = sigmoid_one(row[j] * scale + b);
        for (int64_t j = visible; j < cols; ++j) row[j] = 0.0f;
    }
}

/* The keys rows r0 .. r0 + rows - 1 read: up to the largest of their limits (every key when limit is NULL). */
static inline int64_t chunk_width(const int64_t *limit, int64_t r0, int64_t rows, int64_t Tk) {
    if (!limit) return Tk;
    int64_t width = 0;
    for (int64_t r = r0; r < r0 + rows; ++r) width = limit[r] > width ? limit[r] : width;
    return width > Tk ? Tk : width;
}

/* BLAS sgemm (Fortran calling convention, column-major), passed in by the caller: torch's own. */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *,
                        const int *);

/* The whole forward of sigmoid attention, one (batch, kv head) slice f after another.  Row-major, contiguous:
   q [F, R, D] (R = Tq * G folded rows, the G query heads of a kv head interleaved per position), k [F, Tk, D],
   v [F, Tk, Dv], bias [F, R], limit [F, R] (row r sees keys j < limit[r]; NULL: all), key_bias [F / heads_kv,
   Tk] (one additive value per batch and key, added to every row's scaled scores: a padding mask, -inf or a
   very negative value hiding a key; NULL: none), out [F, R, Dv]; work holds chunk * block floats.  Rows are
   taken chunk at a time, keys block at a time up to the chunk's largest limit:  S = q kT (sgemm),
   P = sigmoid(scale S + key_bias + b) masked (sigmoid_tile), out += P v (sgemm). */
void sigmoid_forward(const float *q, const float *k, const float *v, const float *bias, const int64_t *limit,
                     const float *key_bias, int64_t heads_kv, float *out, float *work, int64_t F, int64_t R,
                     int64_t Tk, int64_t D, int64_t Dv, int64_t chunk, int64_t block, float scale, sgemm_t sgemm) {
    const float one = 1.0f, zero = 0.0f;
    const int d = (int)D, dv = (int)Dv;
    for (int64_t f = 0; f < F; ++f) {
        const float *qf = q + f * R * D, *kf = k + f * Tk * D, *vf = v + f * Tk * Dv, *bf = bias + f * R;
        const int64_t *lf = limit ? limit + f * R : 0;
        const float *kbf = key_bias ? key_bias + (f / heads_kv) * Tk : 0;
        float *of = out + f * R * Dv;
        for (int64_t r0 = 0; r0 < R; r0 += chunk) {
            int64_t rows = R - r0 < chunk ? R - r0 : chunk;
            int64_t width = chunk_width(lf, r0, rows, Tk);
            if (width <= 0) {
                memset(of + r0 * Dv, 0, sizeof(float) * rows * Dv);
                continue;
            }
            int m = (int)rows;
            for (int64_t k0 = 0; k0 < width; k0 += block) {
                int kb = (int)(width - k0 < block ? width - k0 : block);
                /* S (rows x kb, row-major) is ST (kb x rows) column-major = k_blk q_chunkT */
                sgemm("T", "N", &kb, &m, &d, &one, kf + k0 * D, &d, qf + r0 * D, &d, &zero, work, &kb);
                sigmoid_tile(work, bf + r0, lf ? lf + r0 : 0, kbf ? kbf + k0 : 0, k0, scale, rows, kb);
                /* out (rows x Dv) += P v:  outT = vT PT column-major */
                sgemm("N", "N", &dv, &m, &kb, &one, vf + k0 * Dv, &dv, work, &kb, k0 ? &one : &zero,
                      of + r0 * Dv, &dv);
            }
        }
    }
}

/* The matching backward, recomputing P tile by tile.  Arguments as for sigmoid_forward, plus grad_out [F, R, Dv]
   (folded like q) and the gradients dq [F, R, D], dk [F, Tk, D], dv [F, Tk, Dv]; dk and dv must come in zeroed,
   and dq and dk come out without the factor scale.  work holds 2 * chunk * block floats.  Per tile:
   dv += PT dO, dP = dO vT, dS = P (1 - P) dP, dq += dS k, dk += dST q. */
void sigmoid_backward(const float *q, const float *k, const float *v, const float *bias, const int64_t *limit,
                      const float *key_bias, int64_t heads_kv, const float *grad_out, float *dq, float *dk,
                      float *dv, float *work, int64_t F, int64_t R, int64_t Tk, int64_t D, int64_t Dv, int64_t chunk,
                      int64_t block, float scale, sgemm_t sgemm) {
    const float one = 1.0f, zero = 0.0f;
    const int d = (int)D, dvi = (int)Dv;
    float *p = work, *ds = work + chunk * block;
    for (int64_t f = 0; f < F; ++f) {
        const float *qf = q + f * R * D, *kf = k + f * Tk * D, *vf = v + f * Tk * Dv, *bf = bias + f * R;
        const float *gf = grad_out + f * R * Dv;
        const int64_t *lf = limit ? limit + f * R : 0;
        const float *kbf = key_bias ? key_bias + (f / heads_kv) * Tk : 0;
        float *dqf = dq + f * R * D, *dkf = dk + f * Tk * D, *dvf = dv + f * Tk * Dv;
        for (int64_t r0 = 0; r0 < R; r0 += chunk) {
            int64_t rows = R - r0 < chunk ? R - r0 : chunk;
            int64_t width = chunk_width(lf, r0, rows, Tk);
            if (width <= 0) {
                memset(dqf + r0 * D, 0, sizeof(float) * rows * D);
                continue;
            }
            int m = (int)rows;
            const float *qc = qf + r0 * D, *gc = gf + r0 * Dv;
            for (int64_t k0 = 0; k0 < width; k0 += block) {
                int kb = (int)(width - k0 < block ? width - k0 : block);
                sgemm("T", "N", &kb, &m, &d, &one, kf + k0 * D, &d, qc, &d, &zero, p, &kb);
                sigmoid_tile(p, bf + r0, lf ? lf + r0 : 0, kbf ? kbf + k0 : 0, k0, scale, rows, kb);
                sgemm("N", "T", &dvi, &kb, &m, &one, gc, &dvi, p, &kb, &one, dvf + k0 * Dv, &dvi);
                sgemm("T", "N", &kb, &m, &dvi, &one, vf + k0 * Dv, &dvi, gc, &dvi, &zero, ds, &kb);
                int64_t n = (int64_t)m * kb;
                for (int64_t i = 0; i < n; ++i) ds[i] = ds[i] * p[i] * (1.0f - p[i]);
                sgemm("N", "N", &d, &m, &kb, &one, kf + k0 * D, &d, ds, &kb, k0 ? &one : &zero, dqf + r0 * D, &d);
                sgemm("N", "T", &d, &kb, &m, &one, qc, &d, ds, &kb, &one, dkf + k0 * D, &d);
            }
        }
    }
}
"""

def _declare(lib: ctypes.CDLL) -> None:
    lib.sigmoid_tile.restype = None
    lib.sigmoid_tile.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
    lib.sigmoid_forward.restype = None
    lib.sigmoid_forward.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
                                    + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_void_p])
    lib.sigmoid_backward.restype = None
    lib.sigmoid_backward.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] + [ctypes.c_void_p] * 5
                                     + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_void_p])


_lock = threading.Lock()
_state: dict[str, object] = {}
_library = NativeLibrary("sigmoid_tile", SOURCE, _declare)


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (the caller then uses ATen ops)."""
    return _library.get()


def forward_available() -> bool:
    """Whether :func:`sigmoid_forward` can run here (the kernel built and torch's sgemm found)."""
    if library() is None:
        return False
    with _lock:
        if "sgemm" not in _state:
            _state["sgemm"] = sgemm_address()
        return _state["sgemm"] is not None


def _check_key_bias(key_bias: torch.Tensor | None, flat: int, len_k: int) -> int:
    """The kv heads per batch row of ``key_bias`` ([B, Tk] float32, contiguous; F = B · Hkv), 1 without one."""
    if key_bias is None:
        return 1
    assert key_bias.dtype == torch.float32 and key_bias.is_contiguous() and key_bias.dim() == 2
    assert key_bias.shape[1] == len_k and key_bias.shape[0] > 0 and flat % key_bias.shape[0] == 0
    return flat // key_bias.shape[0]


def sigmoid_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    limit: torch.Tensor | None, scale: float, chunk: int, block: int,
                    key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The forward in one compiled loop: q [F, R, D], k [F, Tk, D], v [F, Tk, Dv], bias [F, R] float32, limit
    [F, R] int64 (row r sees keys j < limit; None: all) and key_bias [B, Tk] float32 (F = B · Hkv: one additive
    value per batch and key, a padding mask; None: none), all contiguous on the CPU; returns out [F, R, Dv] =
    sigmoid(scale · q kᵀ + key_bias + bias) v over the visible keys, ``chunk`` rows x ``block`` keys at a time.
    Needs :func:`forward_available`."""
    lib = library()
    flat, rows, dim = q.shape
    len_k, dim_v = k.shape[1], v.shape[2]
    for t in (q, k, v, bias):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    assert limit is None or (limit.dtype == torch.int64 and limit.is_contiguous() and limit.shape == bias.shape)
    assert bias.numel() == flat * rows and k.shape[0] == v.shape[0] == flat and k.shape[2] == dim
    heads_kv = _check_key_bias(key_bias, flat, len_k)
    out = torch.empty(flat, rows, dim_v, dtype=torch.float32)
    work = torch.empty(chunk * block, dtype=torch.float32)
    lib.sigmoid_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), bias.data_ptr(),
                        None if limit is None else limit.data_ptr(),
                        None if key_bias is None else key_bias.data_ptr(), heads_kv, out.data_ptr(), work.data_ptr(),
                        flat, rows, len_k, dim, dim_v, chunk, block, scale, _state["sgemm"])
    return out


def sigmoid_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     limit: torch.Tensor | None, scale: float, chunk: int, block: int,
                     key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`sigmoid_forward` in one compiled loop (P recomputed tile by tile): grad_out
    [F, R, Dv] folded like q, the other arguments as there; returns (dq, dk, dv), float32, dq and dk still to be
    multiplied by ``scale``."""
    lib = library()
    flat, rows, dim = q.shape
    len_k, dim_v = k.shape[1], v.shape[2]
    for t in (grad_out, q, k, v, bias):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    assert limit is None or (limit.dtype == torch.int64 and limit.is_contiguous() and limit.shape == bias.shape)
    assert grad_out.shape == (flat, rows, dim_v) and bias.numel() == flat * rows
    heads_kv = _check_key_bias(key_bias, flat, len_k)
    dq = torch.empty(flat, rows, dim)
    dk = torch.zeros(flat, len_k, dim)
    dv = torch.zeros(flat, len_k, dim_v)
    work = torch.empty(2 * chunk * block, dtype=torch.float32)
    lib.sigmoid_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), bias.data_ptr(),
                         None if limit is None else limit.data_ptr(),
                         None if key_bias is None else key_bias.data_ptr(), heads_kv, grad_out.data_ptr(),
                         dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), work.data_ptr(), flat, rows, len_k, dim, dim_v, chunk, block,
                         scale, _state["sgemm"])
    return dq, dk, dv


def sigmoid_tile_(scores: torch.Tensor, bias: torch.Tensor, limit: torch.Tensor | None, key_start: int,
                  scale: float) -> torch.Tensor:
    """``scores`` ([..., cols], contiguous float32 on the CPU) := sigmoid(scale * scores + bias[row]) where
    key ``key_start + j`` is below the row's ``limit``, else 0; ``bias`` float32 and ``limit`` int64 hold
    one contiguous value per row.  Needs :func:`library` to be available."""
    lib = library()
    cols = scores.shape[-1]
    rows = scores.numel() // cols if cols else 0
    assert scores.dtype == torch.float32 and scores.is_contiguous() and bias.numel() == rows
    assert bias.dtype == torch.float32 and bias.is_contiguous()
    assert limit is None or (limit.dtype == torch.int64 and limit.is_contiguous() and limit.numel() == rows)
    lib.sigmoid_tile(scores.data_ptr(), bias.data_ptr(), None if limit is None else limit.data_ptr(), None,
                     key_start, scale, rows, cols)
    return scores
