"""Pieces shared by the sliding-window forward and backward kernels: which keys a query sees, and which
key (query) blocks a query (key) block has to visit.

Positions: query row i sits at position p = i + shift, shift = Tk − Tq (the queries are the last Tq
positions, as in :mod:`.reference`); key j at position j.  Key padding (``kv_lens``) hides keys
j >= kv_lens[b] without moving the queries.  Visible (``band_visible``):

    causal      p − window < j <= p,   or  j < sinks and j <= p
    symmetric   |p − j| < window,       or  j < sinks

Every program visits the key blocks its band reaches plus the sink blocks in front of the band, and
nothing else (block skipping).  Blocks that every row sees in full (the inside of the band) run
without the visibility mask and bounds checks; the band's two edges, the sinks and the end of the
keys run masked.  Scores are kept in log2 units (s2 = log2(e) · (mod(scale · q·k) + mask + position bias)).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import LOG2E, position_scores


@triton.jit
def band_visible(p, j, k_len, window, sinks, CAUSAL: tl.constexpr):
    """bool tile: key position ``j`` visible from query position ``p`` (broadcast tiles) and not padding."""
    if CAUSAL:
        seen = (j <= p) & ((j > p - window) | (j < sinks))
    else:
        seen = ((j - p < window) & (p - j < window)) | (j < sinks)
    return seen & (j < k_len)


@triton.jit
def key_blocks(m0, shift, q_len, k_len, window, sinks, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The key blocks the query block starting at row ``m0`` visits, as four bounds (multiples of
    BLOCK_N, or ``hi``): sinks [0, sink_end) masked; band [band_lo, full_lo) masked,
    [full_lo, full_hi) unmasked (every row sees every key), [full_hi, hi) masked.  Returns
    (sink_end, band_lo, full_lo, full_hi, hi)."""
    last_row = tl.minimum(m0 + BLOCK_M, q_len) - 1
    p0 = m0 + shift                     # position of the block's first row
    p1 = last_row + shift               # ... and of its last real row
    lo = tl.maximum(p0 - window + 1, 0)
    if CAUSAL:
        hi = tl.minimum(p1 + 1, k_len)
    else:
        hi = tl.minimum(p1 + window, k_len)
    hi = tl.maximum(hi, 0)
    band_lo = tl.minimum(lo // BLOCK_N * BLOCK_N, hi)
    sink_keys = tl.minimum(sinks, k_len)
    if CAUSAL:
        sink_keys = tl.minimum(sink_keys, tl.maximum(p1 + 1, 0))
    sink_end = tl.minimum(tl.cdiv(sink_keys, BLOCK_N) * BLOCK_N, band_lo)
    # full blocks: n >= p1 − window + 1 (the last row still reaches the block's first key) and
    # n + BLOCK_N − 1 <= p0 (causal) or < p0 + window (symmetric), inside the real keys
    p_last = m0 + BLOCK_M - 1 + shift   # the tile's last row, real or not: full blocks hold for all rows
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N, band_lo), hi)
    if CAUSAL:
        full_end = tl.maximum(p0 + 1, 0)
    else:
        full_end = tl.maximum(p0 + window, 0)
    full_hi = tl.minimum(full_end // BLOCK_N * BLOCK_N, k_len // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return sink_end, band_lo, full_lo, full_hi, hi


@triton.jit
def query_blocks(n0, shift, q_len, k_len, window, sinks, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The query blocks that see some key of the key block starting at ``n0`` (for dK/dV), as
    (m_lo, full_lo, full_hi, m_hi), multiples of BLOCK_M: [m_lo, full_lo) masked,
    [full_lo, full_hi) unmasked, [full_hi, m_hi) masked.  A block of padding keys visits nothing."""
    n1 = n0 + BLOCK_N - 1
    q_blocks_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    # positions that reach the block through the band
    if CAUSAL:
        p_lo = n0
    else:
        p_lo = n0 - window + 1
    p_hi = n1 + window - 1
    m_lo = tl.maximum(p_lo - shift, 0) // BLOCK_M * BLOCK_M
    m_hi = tl.cdiv(tl.minimum(tl.maximum(p_hi - shift + 1, 0), q_len), BLOCK_M) * BLOCK_M
    if n0 < sinks:  # sink keys: every (later, if causal) query sees them
        if CAUSAL:
            m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        else:
            m_lo = m_lo * 0
        m_hi = q_blocks_end
    m_hi = tl.where(n0 < k_len, m_hi, 0)
    m_lo = tl.minimum(m_lo, m_hi)
    # full query blocks: rows m .. m+BLOCK_M−1 all see keys n0 .. n1 through the band
    if CAUSAL:
        first = n1 - shift
    else:
        first = n1 - window + 1 - shift
    full_lo = tl.cdiv(tl.maximum(first, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.maximum(n0 + window - shift, 0) // BLOCK_M * BLOCK_M
    full_hi = tl.minimum(full_hi, q_len // BLOCK_M * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    full_hi = tl.where(n0 + BLOCK_N <= k_len, tl.maximum(tl.minimum(full_hi, m_hi), full_lo), full_lo)
    return m_lo, full_lo, full_hi, m_hi


@triton.jit
def sequence_lengths(batch, len_q, len_k, KvLens, HAS_KV_LENS: tl.constexpr):
    """(q_len, k_len, shift) of a program's sequence: ``kv_lens`` cuts the keys it may see, while the
    positions (query i sits at i + shift) come from the tensors' lengths."""
    q_len = len_q + batch * 0
    k_len = len_k + batch * 0
    if HAS_KV_LENS:
        k_len = tl.minimum(tl.maximum(tl.load(KvLens + batch), 0), len_k)
    return q_len, k_len, len_k - len_q


@triton.jit
def program_sequence(heads, len_q, len_k, KvLens, GROUP: tl.constexpr, HAS_KV_LENS: tl.constexpr):
    """(block, batch, head, head_kv, q_len, k_len, shift) of this program, of a grid (blocks, batch · heads):
    its block, its batch and head (int64; ``GROUP`` heads per key/value head ``head_kv``: a query-head
    grid, or GROUP = 1 over key/value heads) and its sequence's :func:`sequence_lengths`."""
    block = tl.program_id(0)
    pid_zh = tl.program_id(1)
    batch = pid_zh // heads
    head = pid_zh % heads
    head_kv = head // GROUP
    q_len, k_len, shift = sequence_lengths(batch, len_q, len_k, KvLens, HAS_KV_LENS)
    return block, batch.to(tl.int64), head.to(tl.int64), head_kv.to(tl.int64), q_len, k_len, shift


@triton.jit
def band_scores(s, mask_base, stride_mm, stride_mn, offs_m, offs_n, shift, q_len, k_len, window, sinks,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr, pos_log2,
                POSITION: tl.constexpr):
    """The [queries, keys] score tile ``s`` (log2 units) with the caller's mask and the position bias added
    (:func:`~attnrewrite.kernels.triton_scaffold.position_scores`: ALiBi, or R read by diagonal) and, on
    MASKED tiles, −inf outside the band, the sinks and the key bounds (the forward and dQ kernels' tile)."""
    if HAS_MASK:
        extra = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                        mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :], other=0.0)
        s += extra.to(tl.float32) * LOG2E
    s = position_scores(s, offs_m[:, None], offs_n[None, :], q_len, k_len, pos_log2, POSITION)
    if MASKED:
        seen = band_visible((offs_m + shift)[:, None], offs_n[None, :], k_len, window, sinks, CAUSAL)
        s = tl.where(seen, s, float("-inf"))
    return s
