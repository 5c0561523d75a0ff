"""Triton kernel for hashed attention's selection: XOR/popcount of packed codes, top-k by a histogram.

One program selects the keys of one query row for one key/value head (the group's query heads share
the selection).  Agreement of key j = Σ over the group's heads of (bits − popcount(q_code XOR k_code)),
an integer in [0, G·bits], computed byte by byte from the packed codes (bit-parallel popcount).
The rule is that of :mod:`attnrewrite.kernels.hashed.reference`, exactly:

1. visible keys: j < Tk, the key mask, and j ≤ i when causal;
2. the first ``sinks`` and the last ``window`` visible keys are taken (ranks among the visible keys);
3. of the other visible keys (candidates), the ``top_k`` with the highest agreement, ties to the
   later key.

A sort over Tk keys does not fit a program, so step 3 counts instead: a histogram of the candidates'
agreements gives the threshold a* (the largest a with at least top_k candidates at or above it),
every candidate above a* is taken, and of those equal to a* the last top_k − #(above a*) — the
later keys, as the tie rule says.  Passes over the keys: count the visible keys (only with a mask;
causal or not, the count is arithmetic otherwise), the histogram, then a walk from the last key
block to the first that writes the chosen indices.  Slots are filled in decreasing key order; the
unused ones keep −1 (the caller fills the output with −1 first).  The torch path
(:func:`attnrewrite.kernels.hashed.sparse.select`) gives the same set in another slot order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import broadcast_strides, head_strides


@triton.jit
def popcount8(x):
    """Set bits of each int32 in [0, 255] (bit-parallel: pairs, nibbles, byte)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def agreement_block(qc, kc_base, stride_kt, offs_n, n_ok, offs_byte, byte_ok, g_ok, G_BITS: tl.constexpr):
    """Agreement [BLOCK_N] of the keys ``offs_n`` with the group's query codes ``qc`` [BLOCK_G, BLOCK_BYTES]."""
    kc = tl.load(kc_base + offs_n[:, None] * stride_kt + offs_byte[None, :],
                 mask=n_ok[:, None] & byte_ok[None, :], other=0).to(tl.int32)          # [N, BYTES]
    distance = popcount8(qc[:, None, :] ^ kc[None, :, :])                             # [G, N, BYTES]
    distance = tl.where(g_ok[:, None, None], distance, 0)
    return G_BITS - tl.sum(tl.sum(distance, axis=2), axis=0)


@triton.jit
def group_codes(QC, row_offset, stride_qb, stride_qh, pid_bh, heads_kv, G: tl.constexpr, BLOCK_G: tl.constexpr,
                N_BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """A selection program's group: (b int64, h, g_ok, offs_byte, byte_ok, qc) — the packed codes ``qc`` int32
    [BLOCK_G, BLOCK_BYTES] of the ``G`` query heads of key/value head ``h`` in batch ``b`` at ``row_offset``
    (the query's row; zeros outside the group and the code)."""
    b = (pid_bh // heads_kv).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % heads_kv
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    offs_byte = tl.arange(0, BLOCK_BYTES)
    byte_ok = offs_byte < N_BYTES
    qc = tl.load(QC + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + row_offset + offs_byte[None, :],
                 mask=g_ok[:, None] & byte_ok[None, :], other=0).to(tl.int32)           # [G, BYTES]
    return b, h, g_ok, offs_byte, byte_ok, qc


@triton.jit
def visible_block(keep_row, stride_keep_j, offs_n, i, len_k, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    """bool [BLOCK_N]: which keys ``offs_n`` query ``i`` may see."""
    visible = offs_n < len_k
    if CAUSAL:
        visible = visible & (offs_n <= i)
    if HAS_KEEP:
        keep = tl.load(keep_row + offs_n * stride_keep_j, mask=offs_n < len_k, other=0)
        visible = visible & (keep != 0)
    return visible


@triton.jit
def hashed_select_kernel(QC, KC, Keep, Idx, len_k, heads_kv, sinks, window, top_k,
                         stride_qb, stride_qh, stride_qt,
                         stride_kb, stride_kh, stride_kt,
                         stride_keep_b, stride_keep_i, stride_keep_j,
                         stride_ib, stride_ih, stride_it,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, N_BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                         BITS: tl.constexpr, N_BINS: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, g_ok, offs_byte, byte_ok, qc = group_codes(QC, i * stride_qt, stride_qb, stride_qh, pid_bh, heads_kv, G,
                                                     BLOCK_G, N_BYTES, BLOCK_BYTES)
    kc_base = KC + b * stride_kb + h * stride_kh
    keep_row = Keep + b * stride_keep_b + i * stride_keep_i
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, i + 1)

    # 1. the number of visible keys
    if HAS_KEEP:
        count = 0
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            count += tl.sum(visible_block(keep_row, stride_keep_j, offs_n, i, len_k, CAUSAL, HAS_KEEP).to(tl.int32))
    else:
        count = hi

    # 2. the histogram of the candidates' agreements
    hist = tl.zeros((N_BINS,), dtype=tl.int32)
    before = 0  # visible keys in the blocks already seen
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = visible_block(keep_row, stride_keep_j, offs_n, i, len_k, CAUSAL, HAS_KEEP)
        rank = before + tl.cumsum(visible.to(tl.int32), 0)                          # 1-based among visible
        special = visible & ((rank <= sinks) | (rank > count - window))
        candidate = visible & (~special)
        agree = agreement_block(qc, kc_base, stride_kt, offs_n, offs_n < hi, offs_byte, byte_ok, g_ok, G * BITS)
        hist += tl.histogram(agree, N_BINS, mask=candidate)
        before += tl.sum(visible.to(tl.int32))

    # the threshold: the largest a with at least top_k candidates at or above it (−1: take them all)
    bins = tl.arange(0, N_BINS)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    threshold = tl.max(tl.where(at_or_above >= top_k, bins, -1), 0)
    need_equal = top_k - tl.sum(tl.where(bins > threshold, hist, 0), 0)

    # 3. from the last key block to the first: write the chosen keys
    out_row = Idx + b * stride_ib + h * stride_ih + i * stride_it
    written = 0
    equal_after = 0    # candidates equal to the threshold in later blocks
    visible_after = 0  # visible keys in later blocks
    n_blocks = tl.cdiv(hi, BLOCK_N)
    for step in range(0, n_blocks):
        start = (n_blocks - 1 - step) * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = visible_block(keep_row, stride_keep_j, offs_n, i, len_k, CAUSAL, HAS_KEEP)
        rank = count - visible_after - tl.cumsum(visible.to(tl.int32), 0, reverse=True) + 1
        special = visible & ((rank <= sinks) | (rank > count - window))
        candidate = visible & (~special)
        agree = agreement_block(qc, kc_base, stride_kt, offs_n, offs_n < hi, offs_byte, byte_ok, g_ok, G * BITS)
        equal = candidate & (agree == threshold)
        equal_rank = equal_after + tl.cumsum(equal.to(tl.int32), 0, reverse=True)  # 1 = the latest
        take = special | (candidate & (agree > threshold)) | (equal & (equal_rank <= need_equal))
        slot = written + tl.cumsum(take.to(tl.int32), 0, reverse=True) - 1
        tl.store(out_row + slot, offs_n, mask=take)
        written += tl.sum(take.to(tl.int32))
        equal_after += tl.sum(equal.to(tl.int32))
        visible_after += tl.sum(visible.to(tl.int32))


def select_keys(q_codes: torch.Tensor, k_codes: torch.Tensor, keep: torch.Tensor | None, causal: bool, top_k: int,
                window: int, sinks: int, config: dict | None = None, launch=lambda kernel: kernel) -> torch.Tensor:
    """Selected key indices int32 [B, Hkv, Tq, S] (−1: empty slot), S = min(Tk, sinks + window + top_k).

    Args:
        q_codes: [B, Hq, Tq, bits / 8] uint8; k_codes: [B, Hkv, Tk, bits / 8] uint8 (:mod:`.triton_codes`).
        keep: uint8 [B|1, Tq|1, Tk|1] (1 = may attend; broadcast dimensions may have stride 0), or None.
        causal: key j ≤ query i (Tq == Tk).
        config: {"BLOCK_N": ..., "num_warps": ...} (default 64 keys, 4 warps).
    """
    batch, heads_q, len_q, n_bytes = q_codes.shape
    heads_kv, len_k = k_codes.shape[1], k_codes.shape[2]
    groups = heads_q // heads_kv
    slots = min(len_k, sinks + window + top_k)
    config = config or {"BLOCK_N": 64, "num_warps": 4}
    index = torch.full((batch, heads_kv, len_q, slots), -1, dtype=torch.int32, device=q_codes.device)
    if index.numel() == 0:
        return index
    grid = (len_q, batch * heads_kv)
    launch(hashed_select_kernel)[grid](
        q_codes, k_codes, index if keep is None else keep, index, len_k, heads_kv, sinks, window, top_k,
        *head_strides(q_codes, k_codes), *broadcast_strides(keep), *head_strides(index),
        G=groups, BLOCK_G=triton.next_power_of_2(groups), N_BYTES=n_bytes,
        BLOCK_BYTES=triton.next_power_of_2(n_bytes), BITS=8 * n_bytes,
        N_BINS=triton.next_power_of_2(groups * 8 * n_bytes + 1), BLOCK_N=config["BLOCK_N"],
        CAUSAL=causal, HAS_KEEP=keep is not None, num_warps=config["num_warps"])
    return index
