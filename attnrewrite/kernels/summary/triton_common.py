"""Pieces shared by the summary kernels: which (query, key) pairs are visible, and the key and query
ranges a block of queries or keys has to visit.

The kernels see two kinds of key: the raw tokens of the sequence (``k``, ``v`` [B, Hkv, T, D]) and
one summary per chunk (``k̄``, ``v̄`` [B, Hkv, N, D], computed by the torch code of
:mod:`attnrewrite.kernels.summary.chunked` and passed in as extra key/value rows).  With C the chunk
size and W the window (in chunks), query i in chunk c = i // C sees

- raw key j (chunk j // C) when c − W ≤ j // C and (causal) j ≤ i, or (bidirectional) j // C ≤ c + W;
- summary m when m < c − W, or (bidirectional) m > c + W;

and only keys that exist: raw keys that are not padding, summaries of chunks with a valid token.
These are the rules of :mod:`attnrewrite.kernels.summary.reference`.  The block ranges below are the
smallest contiguous ranges that hold every visible pair of a block; inside them each tile is masked
by :func:`visible`.

Scores are kept in log2 units (z2 = log2(e) · mod(scale · q·k)) so that the softmax's exponentials are exp2.
A score modification (``MOD_FN`` ≥ 0, :func:`attnrewrite.kernels.triton_scaffold.modified_scores`) applies to
every score, the summaries' as well as the window keys', as in the reference.

Packed sequences (``VARLEN``): every kernel works in the coordinates of one sequence.  A program reads
which sequence and which block of it is its own from a block table (:func:`sequence_block`), moves its
base pointers to the sequence's first token and first summary, and from there runs the code above with
the sequence's own length and chunk count, so no window, summary or key crosses a sequence boundary.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The tile loaders and dtype helpers are the sigmoid kernels' (one copy of the scaffolding).
from attnrewrite.kernels.triton_scaffold import (LOG2E_HOST, dot_precision, load_row_pair, load_tile, mma,
                                                 modified_scores, padded_dim)

__all__ = ["LOG2E_HOST", "dot_precision", "key_block", "key_ok", "load_tile", "padded_dim", "raw_key_range", "raw_query_range",
           "sequence_block", "summary_query_range", "summary_range", "visible"]


@triton.jit
def visible(rows, keys, ok, chunk, window, CAUSAL: tl.constexpr, SUMMARY: tl.constexpr):
    """Whether query row ``rows`` sees key ``keys`` (a raw token index, or a chunk index when SUMMARY).

    ``rows`` and ``keys`` are index tensors that broadcast against each other ([M, 1] and [1, N], or
    transposed for the key-major backward tiles); ``ok`` (broadcast like the tile) says the key exists
    and the row is in bounds.
    """
    row_chunk = rows // chunk
    if SUMMARY:
        vis = keys < row_chunk - window
        if not CAUSAL:
            vis = vis | (keys > row_chunk + window)
    else:
        key_chunk = keys // chunk
        vis = key_chunk >= row_chunk - window
        if CAUSAL:
            vis = vis & (keys <= rows)
        else:
            vis = vis & (key_chunk <= row_chunk + window)
    return vis & ok


@triton.jit
def key_ok(flags_base, keys, n_keys, HAS_FLAGS: tl.constexpr):
    """In bounds and, when ``HAS_FLAGS``, flagged (uint8 != 0): the raw key is not padding / the summary exists."""
    ok = keys < n_keys
    if HAS_FLAGS:
        ok = ok & (tl.load(flags_base + keys, mask=ok, other=0) != 0)
    return ok


@triton.jit
def raw_key_range(m0, block_m, length, chunk, window, CAUSAL: tl.constexpr):
    """[lo, hi): the raw keys some query of rows [m0, m0 + block_m) sees."""
    last = tl.minimum(m0 + block_m, length) - 1
    lo = tl.maximum(m0 // chunk - window, 0) * chunk
    if CAUSAL:
        hi = last + 1
    else:
        hi = tl.minimum((last // chunk + window + 1) * chunk, length)
    return lo, hi


@triton.jit
def summary_range(m0, block_m, length, n_chunks, chunk, window, CAUSAL: tl.constexpr):
    """[0, hi): the summaries some query of rows [m0, m0 + block_m) may see."""
    last = tl.minimum(m0 + block_m, length) - 1
    if CAUSAL:
        hi = tl.minimum(tl.maximum(last // chunk - window, 0), n_chunks)
    else:
        hi = n_chunks + m0 * 0
    return hi


@triton.jit
def raw_query_range(n0, block_n, length, chunk, window, CAUSAL: tl.constexpr):
    """[lo, hi): the query rows that may see some raw key of [n0, n0 + block_n)."""
    last = tl.minimum(n0 + block_n, length) - 1
    hi = tl.minimum((last // chunk + window + 1) * chunk, length)
    if CAUSAL:
        lo = n0
    else:
        lo = tl.maximum(n0 // chunk - window, 0) * chunk
    return lo, hi


@triton.jit
def summary_query_range(n0, length, chunk, window, CAUSAL: tl.constexpr):
    """[lo, length): the query rows that may see some summary of chunks [n0, n0 + block)."""
    if CAUSAL:
        lo = tl.minimum((n0 + window + 1) * chunk, length)
    else:
        lo = n0 * 0
    return lo


@triton.jit
def key_block(q, k_base, v_base, flags_base, stride_kn, stride_vn, offs_m, offs_n, len_q, n_keys, chunk, window,
              scale_log2, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              CAUSAL: tl.constexpr, SUMMARY: tl.constexpr, HAS_FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
              MOD_FN: tl.constexpr):
    """One key block of a query block's pass (raw keys, or summaries with SUMMARY): (k, v, which scores the
    rows may see, the scores log2(e)·mod(scale·q·kᵀ), the modification's derivative) — the start of the
    forward's and the dQ kernel's step."""
    k, v = load_row_pair(k_base, stride_kn, v_base, stride_vn, offs_n, n_keys, D, DV, BLOCK_D, BLOCK_DV, True)
    ok = key_ok(flags_base, offs_n, n_keys, HAS_FLAGS)[None, :] & (offs_m < len_q)[:, None]
    vis = visible(offs_m[:, None], offs_n[None, :], ok, chunk, window, CAUSAL, SUMMARY)
    z2, d_mod = modified_scores(mma(q, tl.trans(k), None, DOT_PRECISION), scale_log2, None, mod_in_mul, mod_in_add,
                                mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
    return k, v, vis, z2, d_mod


@triton.jit
def sequence_block(pid, block, length, n_chunks, CuSeqlens, CuChunks, BlockSeq, BlockStart, VARLEN: tl.constexpr):
    """(first row or key of the program's block, its sequence's first token, length, first chunk and chunk
    count): without ``VARLEN`` block ``pid`` of the one sequence [0, ``length``); with it, the entry ``pid`` of
    the block table (``BlockSeq``, ``BlockStart`` int32) and the sequence's bounds in ``CuSeqlens`` and
    ``CuChunks`` (int32 [N + 2], the last entry repeated: the idle programs' empty sequence N)."""
    if VARLEN:
        seq = tl.load(BlockSeq + pid)
        first = tl.load(BlockStart + pid)
        tok0 = tl.load(CuSeqlens + seq)
        seq_len = tl.load(CuSeqlens + seq + 1) - tok0
        chunk0 = tl.load(CuChunks + seq)
        seq_chunks = tl.load(CuChunks + seq + 1) - chunk0
        tok0 = tok0.to(tl.int64)
        chunk0 = chunk0.to(tl.int64)
    else:
        first = pid * block
        tok0 = 0
        seq_len = length
        chunk0 = 0
        seq_chunks = n_chunks
    return first, tok0, seq_len, chunk0, seq_chunks
