"""Triton decode step of hashed attention over a cache's packed key codes (:class:`attnrewrite.HashedCache`'s
layout: keys, values [B, Hkv, T, D] and codes [B, Hkv, T, bits / 8] uint8, T the stored length).

A decoding query sees every stored key, so the selection is that of the prefill kernel
(:mod:`.triton_select`) for one row, but the row is long (32k–128k keys) and there are only B·Hkv of
them: one program per row would leave the GPU idle.  The keys are split into ``SPLIT`` -key pieces,
each scored by its own program:

1. (only with padding) each piece counts its valid keys; a cumulative sum gives each piece the rank
   of its first key among the valid ones (sinks and window are ranks);
2. each piece computes its keys' agreements (XOR/popcount of the codes, summed over the group's
   query heads), marks its sinks and window keys, writes a per-key code (−1 invisible, the agreement
   of a candidate, ``SPECIAL`` for sinks/window) and its histogram of the candidates' agreements;
3. a few torch ops over the [B, Hkv, pieces, bins] histograms give the threshold a* of the top_k
   (as in the prefill kernel: everything above a*, and of the keys at a* the latest ones), how many
   keys each piece takes and where its output slots start;
4. each piece writes its chosen key indices (ascending);
5. the attention kernel of the prefill (:func:`.triton_attn.attend_forward`) reads the selected keys.

The set equals the op's with ``is_causal=False`` and a key mask of the valid keys (tested against
:func:`attnrewrite.kernels.hashed.reference.naive_hashed_attention`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import spaces
from .triton_attn import attend_forward
from .triton_codes import pack_codes
from .triton_select import agreement_block, group_codes


@triton.jit
def decode_count_kernel(Valid, Counts, length, stride_vb, n_splits, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Counts [B, pieces]: the valid keys of each piece."""
    piece = tl.program_id(0)
    b = tl.program_id(1)
    total = 0
    for start in range(piece * SPLIT, tl.minimum(length, piece * SPLIT + SPLIT), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = offs_n < tl.minimum(length, piece * SPLIT + SPLIT)
        total += tl.sum((tl.load(Valid + b * stride_vb + offs_n, mask=ok, other=0) != 0).to(tl.int32))
    tl.store(Counts + b * n_splits + piece, total)


@triton.jit
def decode_score_kernel(QC, KC, Valid, Before, Total, Code, Hist, Special, length, heads_kv, n_splits, sinks, window,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, N_BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                        BITS: tl.constexpr, N_BINS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_VALID: tl.constexpr):
    piece = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, g_ok, offs_byte, byte_ok, qc = group_codes(QC, 0, stride_qb, stride_qh, pid_bh, heads_kv, G, BLOCK_G,
                                                     N_BYTES, BLOCK_BYTES)
    kc_base = KC + b * stride_kb + h * stride_kh
    end = tl.minimum(length, piece * SPLIT + SPLIT)
    if HAS_VALID:
        before = tl.load(Before + b * n_splits + piece)
        count = tl.load(Total + b)
    else:
        before = piece * SPLIT
        count = length
    hist = tl.zeros((N_BINS,), dtype=tl.int32)
    specials = 0
    for start in range(piece * SPLIT, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_piece = offs_n < end
        visible = in_piece
        if HAS_VALID:
            visible = visible & (tl.load(Valid + b * stride_vb + offs_n, mask=in_piece, other=0) != 0)
        rank = before + tl.cumsum(visible.to(tl.int32), 0)
        special = visible & ((rank <= sinks) | (rank > count - window))
        candidate = visible & (~special)
        agree = agreement_block(qc, kc_base, stride_kt, offs_n, in_piece, offs_byte, byte_ok, g_ok, G * BITS)
        hist += tl.histogram(agree, N_BINS, mask=candidate)
        code = tl.where(special, G * BITS + 1, tl.where(candidate, agree, -1))
        tl.store(Code + pid_bh * length + offs_n, code, mask=in_piece)
        specials += tl.sum(special.to(tl.int32))
        before += tl.sum(visible.to(tl.int32))
    tl.store(Hist + (pid_bh * n_splits + piece) * N_BINS + tl.arange(0, N_BINS), hist)
    tl.store(Special + pid_bh * n_splits + piece, specials)


@triton.jit
def decode_take_kernel(Code, Threshold, NeedEqual, EqualAfter, Offset, Idx, length, n_splits, stride_ib, stride_ih,
                       heads_kv, SPECIAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the piece's chosen keys, ascending, from its output offset (later keys win the ties)."""
    piece = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_kv).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % heads_kv
    threshold = tl.load(Threshold + pid_bh)
    need_equal = tl.load(NeedEqual + pid_bh)
    # ties equal to the threshold in this piece and later ones that come after a key (1 = the latest overall)
    equal_after = tl.load(EqualAfter + pid_bh * n_splits + piece)
    written = tl.load(Offset + pid_bh * n_splits + piece)
    end = tl.minimum(length, piece * SPLIT + SPLIT)
    equal_in_piece = 0
    for start in range(piece * SPLIT, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        code = tl.load(Code + pid_bh * length + offs_n, mask=offs_n < end, other=-1)
        equal_in_piece += tl.sum((code == threshold).to(tl.int32))
    seen_equal = 0
    for start in range(piece * SPLIT, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        code = tl.load(Code + pid_bh * length + offs_n, mask=offs_n < end, other=-1)
        equal = (code == threshold) & (code >= 0)
        # rank from the end of all keys: later pieces' ties, then this piece's ties at or after the key
        from_end = equal_after + equal_in_piece - seen_equal - tl.cumsum(equal.to(tl.int32), 0) + 1
        take = (code == SPECIAL) | ((code > threshold) & (code >= 0)) | (equal & (from_end <= need_equal))
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(Idx + b * stride_ib + h * stride_ih + slot, offs_n, mask=take)
        written += tl.sum(take.to(tl.int32))
        seen_equal += tl.sum(equal.to(tl.int32))


def decode_select(q_codes: torch.Tensor, k_codes: torch.Tensor, valid: torch.Tensor | None, top_k: int, window: int,
                  sinks: int, config: dict | None = None, launch=lambda kernel: kernel) -> torch.Tensor:
    """Selected key indices int32 [B, Hkv, 1, S] (ascending, −1 after the last), S = min(T, sinks + window + top_k).

    Args:
        q_codes: [B, Hq, 1, bits / 8] uint8, the step's query codes; k_codes: [B, Hkv, T, bits / 8] uint8
            (a cache's code store up to its length; the last dimension contiguous).
        valid: bool [B, T] (False = padding, never selected) or None.
        config: {"SPLIT": keys per piece, "BLOCK_N": keys per step, "num_warps"} (default 1024, 256, 4).
        launch: wraps each kernel before its launch (``traceable``, or a compile-only launcher).
    """
    batch, heads_q, _, n_bytes = q_codes.shape
    heads_kv, length = k_codes.shape[1], k_codes.shape[2]
    groups, bits = heads_q // heads_kv, 8 * n_bytes
    slots = min(length, sinks + window + top_k)
    config = config or {"SPLIT": 1024, "BLOCK_N": 256, "num_warps": 4}
    split, block = config["SPLIT"], min(config["BLOCK_N"], config["SPLIT"])
    device = q_codes.device
    index = torch.full((batch, heads_kv, 1, slots), -1, dtype=torch.int32, device=device)
    if index.numel() == 0:
        return index
    pieces = triton.cdiv(length, split)
    n_bins = triton.next_power_of_2(groups * bits + 2)
    special = groups * bits + 1
    rows = batch * heads_kv
    before = total = valid_u8 = None
    if valid is not None:
        valid_u8 = valid.to(torch.uint8).contiguous()
        counts = torch.empty(batch, pieces, dtype=torch.int32, device=device)
        launch(decode_count_kernel)[(pieces, batch)](valid_u8, counts, length, valid_u8.stride(0), pieces, SPLIT=split,
                                             BLOCK_N=block, num_warps=config["num_warps"])
        total = counts.sum(1, dtype=torch.int32)
        before = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()
    code = torch.empty(batch, heads_kv, length, dtype=torch.int32, device=device)
    hist = torch.empty(batch, heads_kv, pieces, n_bins, dtype=torch.int32, device=device)
    specials = torch.empty(batch, heads_kv, pieces, dtype=torch.int32, device=device)
    placeholder = code
    launch(decode_score_kernel)[(pieces, rows)](
        q_codes, k_codes, placeholder if valid_u8 is None else valid_u8, placeholder if before is None else before,
        placeholder if total is None else total, code, hist, specials, length, heads_kv, pieces, sinks, window,
        q_codes.stride(0), q_codes.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        0 if valid_u8 is None else valid_u8.stride(0),
        G=groups, BLOCK_G=triton.next_power_of_2(groups), N_BYTES=n_bytes,
        BLOCK_BYTES=triton.next_power_of_2(n_bytes), BITS=bits, N_BINS=n_bins, SPLIT=split, BLOCK_N=block,
        HAS_VALID=valid is not None, num_warps=config["num_warps"])

    # the threshold and each piece's share, from the histograms (as the prefill kernel, over pieces)
    bins = torch.arange(n_bins, device=device)
    per_bin = hist.sum(2)                                                                  # [B, Hkv, bins]
    at_or_above = per_bin.flip(-1).cumsum(-1).flip(-1)
    threshold = torch.where(at_or_above >= top_k, bins, -1).amax(-1)                       # [B, Hkv]
    above_bins = bins > threshold[..., None]                                               # [B, Hkv, bins]
    need_equal = top_k - (per_bin * above_bins).sum(-1)
    equal = hist.gather(-1, threshold.clamp(min=0)[..., None, None].expand(-1, -1, pieces, 1))[..., 0]
    equal = torch.where(threshold[..., None] >= 0, equal, 0)                               # [B, Hkv, pieces]
    equal_after = equal.flip(-1).cumsum(-1).flip(-1) - equal
    taken_equal = (need_equal[..., None] - equal_after).clamp(min=0).minimum(equal)
    above = (hist * above_bins[:, :, None, :]).sum(-1)
    taken = specials + above + taken_equal
    offset = taken.cumsum(-1) - taken
    launch(decode_take_kernel)[(pieces, rows)](
        code, threshold.to(torch.int32).contiguous(), need_equal.to(torch.int32).contiguous(),
        equal_after.to(torch.int32).contiguous(), offset.to(torch.int32).contiguous(), index, length, pieces,
        index.stride(0), index.stride(1), heads_kv, SPECIAL=special, SPLIT=split, BLOCK_N=block,
        num_warps=config["num_warps"])
    return index


def hashed_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_codes: torch.Tensor,
                  proj_q: torch.Tensor, scale: float, top_k: int, window: int, sinks: int,
                  valid: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """One decode step: q [B, Hq, 1, D] against a cache's keys/values [B, Hkv, T, D|Dv] and key codes
    [B, Hkv, T, bits / 8] → [B, Hq, 1, Dv] (exact softmax over the selected keys; 0 for a row with none).

    ``proj_q``: the float64 query projection [D, bits] or [Hq, D, bits]; ``valid``: bool [B, T] or None;
    ``config``: the selection's (default: :mod:`.spaces`, a device's table or the default).
    The views may be a cache's stores sliced to its length (strided); their last dimension must be contiguous.
    """
    shape = spaces.shape_of(q, keys, values, 8 * k_codes.shape[-1])
    configs = {kernel: spaces.config_for(kernel, shape, q.device, tensors=(q,)) for kernel in ("codes", "fwd")}
    config = config or spaces.config_for("decode", shape, q.device, tensors=(q,))
    index = decode_select(pack_codes(q, proj_q, configs["codes"]), k_codes, valid, top_k, window, sinks, config)
    out, _ = attend_forward(q, keys, values, index, None, scale, configs["fwd"])
    return out
