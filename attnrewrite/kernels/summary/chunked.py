"""The torch path of summary attention: query blocks over a contiguous key range, and a backward
that recomputes block by block.

Each block holds whole chunks of queries.  Its raw keys are one contiguous slice of k (the chunks
from W before the block to the block's end, or W past it when bidirectional) and its summaries are
a prefix of the summary sequence (causal) or all of it, so a block costs O(rows × (W·C + T/C))
and nothing of size T × T is ever built.  Each block is one ``scaled_dot_product_attention`` call with
an additive mask (the fused CPU kernel), the query heads of a group stacked as rows of their key/value
head.  The forward keeps no activations; the backward recomputes the summaries and runs each block's
fused flash-attention forward and backward on the CPU (the explicit softmax-attention gradient formulas,
in float32 or float64, elsewhere or when Dv ≠ D), then goes through the pooling of the summaries.

A causal float32 forward without padding or score modification on one torch thread runs in the compiled loop
of :mod:`.native` (per-row visibility inside each tile, no mask, no merge); with more threads, without a C
compiler or with ``ATTNREWRITE_NATIVE=0`` it takes :func:`_split_forward` (two fused ATen calls per block).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from . import native

# Query rows per block are chosen so that one block's [B, Hq, rows, keys] scores stay near this size.
BLOCK_ELEMENTS = 1 << 21


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def hide_padding(x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """x [B, H, T, D] with the padded tokens (``key_valid`` bool [B, T] False) set to 0.

    A padded key or value must not reach a score or a sum, and a model may leave nan or inf there
    (a padded row that saw nothing): a zero weight or a −inf score alone would still give 0·nan = nan.
    The gradients at padded tokens are then 0, as they must be for tokens that do not contribute.
    """
    if key_valid is None:
        return x
    return x.masked_fill(~key_valid.to(x.device)[:, None, :, None], 0)


def _chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, H, T, D] → [B, H, N, C, D] in the work dtype, the last chunk padded with zeros."""
    batch, heads, length, dim = x.shape
    chunks = math.ceil(length / chunk_size)
    padded = F.pad(x, (0, 0, 0, chunks * chunk_size - length)).to(work_dtype(x.dtype))
    return padded.view(batch, heads, chunks, chunk_size, dim)


def _pooling_weights(k_chunks: torch.Tensor, key_valid: torch.Tensor | None, length: int,
                     summary_query: torch.Tensor | None):
    """(weights [B, 1 or Hkv, N, C] in the work dtype, exists bool [B, N]) of each token in its chunk's summary."""
    batch, _, chunks, chunk_size, dim = k_chunks.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=k_chunks.device) if key_valid is None else key_valid
    valid = F.pad(valid, (0, chunks * chunk_size - length), value=False).view(batch, 1, chunks, chunk_size)
    return pooling_weights(k_chunks, valid, summary_query)


def pooling_weights(k_chunks: torch.Tensor, valid: torch.Tensor, summary_query: torch.Tensor | None):
    """(weights [B, 1 or Hkv, N, C] in k_chunks' dtype, exists bool [B, N]) from the chunks' keys
    k_chunks [B, Hkv, N, C, D] and which of their slots hold a real token, ``valid`` bool [B, 1, N, C]."""
    dim = k_chunks.shape[-1]
    exists = valid.any(-1)                                                         # [B, 1, N]
    dtype = k_chunks.dtype
    if summary_query is None:
        return valid.to(dtype) / valid.sum(-1, keepdim=True).clamp(min=1).to(dtype), exists[:, 0]
    scores = torch.einsum("bkncd,kd->bknc", k_chunks, summary_query.to(dtype)) / math.sqrt(dim)
    scores = scores.masked_fill(~valid, torch.finfo(dtype).min)
    return torch.softmax(scores, dim=-1) * exists.unsqueeze(-1).to(dtype), exists[:, 0]


def pooling_backward(dk_sum: torch.Tensor, dv_sum: torch.Tensor, k_chunks: torch.Tensor, v_chunks: torch.Tensor,
                     weights: torch.Tensor, summary_query: torch.Tensor | None):
    """(dk_chunks [B, Hkv, N, C, D], dv_chunks, d_summary_query or None) in the chunks' dtype: the pooling's
    backward from the summaries' gradients dk_sum [B, Hkv, N, D], dv_sum, given the chunks and their
    :func:`pooling_weights` (expanded to [B, Hkv, N, C])."""
    dk_sum, dv_sum = dk_sum.to(k_chunks.dtype), dv_sum.to(k_chunks.dtype)
    dk_chunks = weights.unsqueeze(-1) * dk_sum.unsqueeze(-2)                        # [B, Hkv, N, C, D]
    dv_chunks = weights.unsqueeze(-1) * dv_sum.unsqueeze(-2)
    d_query = None
    if summary_query is not None:  # through the softmax weights: ds = w ⊙ (dw − Σ w·dw)
        dim = k_chunks.shape[-1]
        d_weights = (torch.einsum("bknd,bkncd->bknc", dk_sum, k_chunks)
                     + torch.einsum("bknd,bkncd->bknc", dv_sum, v_chunks))
        d_scores = weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True)) / math.sqrt(dim)
        dk_chunks = dk_chunks + d_scores.unsqueeze(-1) * summary_query.to(k_chunks.dtype)[None, :, None, None]
        d_query = torch.einsum("bknc,bkncd->kd", d_scores, k_chunks)
    return dk_chunks, dv_chunks, d_query


def chunk_summaries(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, chunk_size: int,
                    summary_query: torch.Tensor | None = None):
    """One summary key and value per chunk of ``chunk_size`` tokens.

    Args:
        k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv]; key_valid: bool [B, T] or None.
        summary_query: None for the mean of the chunk's valid tokens, or [Hkv, D]: attention pooling
            with weights softmax_j(p·k_j / √D) over the chunk's valid tokens.
    Returns:
        k̄ [B, Hkv, N, D] and v̄ [B, Hkv, N, Dv] in k's dtype, exists bool [B, N] (the chunk has a
        valid token), N = ceil(T / chunk_size).
    """
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)
    k_chunks, v_chunks = _chunks(k, chunk_size), _chunks(v, chunk_size)
    weights, exists = _pooling_weights(k_chunks, key_valid, k.shape[-2], summary_query)
    k_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(k_chunks.shape[:-1]), k_chunks)
    v_sum = torch.einsum("bknc,bkncd->bknd", weights.expand(v_chunks.shape[:-1]), v_chunks)
    return k_sum.to(k.dtype), v_sum.to(v.dtype), exists


def chunk_summaries_backward(dk_sum: torch.Tensor, dv_sum: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_valid: torch.Tensor | None, chunk_size: int, summary_query: torch.Tensor | None):
    """(dk, dv, d_summary_query or None), work dtype, from the gradients of :func:`chunk_summaries`' outputs."""
    length = k.shape[-2]
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)
    k_chunks, v_chunks = _chunks(k, chunk_size), _chunks(v, chunk_size)
    weights, _ = _pooling_weights(k_chunks, key_valid, length, summary_query)
    dk_chunks, dv_chunks, d_query = pooling_backward(dk_sum, dv_sum, k_chunks, v_chunks,
                                                     weights.expand(k_chunks.shape[:-1]), summary_query)
    batch, heads = k.shape[:2]
    dk = dk_chunks.reshape(batch, heads, -1, k.shape[-1])[:, :, :length]
    dv = dv_chunks.reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    return dk, dv, d_query


def blocks(length: int, chunk_size: int, window_chunks: int, causal: bool, rows_per_block: int
           ) -> Iterator[tuple[int, int, int, int, int]]:
    """(i0, i1, r0, r1, n_sum): query rows [i0, i1), raw keys [r0, r1), summaries [0, n_sum)."""
    chunks = math.ceil(length / chunk_size)
    per_block = max(1, rows_per_block // chunk_size)
    for c0 in range(0, chunks, per_block):
        c1 = min(chunks, c0 + per_block)
        r0 = max(0, c0 - window_chunks) * chunk_size
        if causal:
            r1, n_sum = min(length, c1 * chunk_size), max(0, c1 - 1 - window_chunks)
        else:
            r1, n_sum = min(length, (c1 + window_chunks) * chunk_size), chunks
        yield c0 * chunk_size, min(length, c1 * chunk_size), r0, r1, n_sum


def visibility(i0: int, i1: int, r0: int, r1: int, n_sum: int, chunk_size: int, window_chunks: int, causal: bool,
               key_valid: torch.Tensor | None, exists: torch.Tensor, device) -> torch.Tensor:
    """bool [B or 1, rows, n_sum + raw keys]: which summaries and raw keys each query of the block sees."""
    rows = torch.arange(i0, i1, device=device)
    row_chunk = (rows // chunk_size)[:, None]
    keys = torch.arange(r0, r1, device=device)
    key_chunk = (keys // chunk_size)[None, :]
    raw = key_chunk >= row_chunk - window_chunks
    raw = raw & (keys[None, :] <= rows[:, None] if causal else key_chunk <= row_chunk + window_chunks)
    summaries = torch.arange(n_sum, device=device)[None, :]
    older = summaries < row_chunk - window_chunks
    outside = older if causal else older | (summaries > row_chunk + window_chunks)
    raw = raw[None] if key_valid is None else raw[None] & key_valid[:, None, r0:r1]
    outside = outside[None] & exists[:, None, :n_sum]
    batch = max(raw.shape[0], outside.shape[0])
    return torch.cat([outside.expand(batch, -1, -1), raw.expand(batch, -1, -1)], dim=-1)


def _grouped(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """[B, Hq, n, D] → [B, Hkv, g·n, D]: the query heads of a group stacked as rows of their key/value head."""
    batch, heads_q, rows, dim = x.shape
    return x.reshape(batch, heads_kv, (heads_q // heads_kv) * rows, dim)


def _ungrouped(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """The inverse of :func:`_grouped`: [B, Hkv, g·n, D] → [B, Hq, n, D]."""
    batch, heads_kv, grouped_rows, dim = x.shape
    return x.reshape(batch, heads_q, grouped_rows * heads_kv // heads_q, dim)


def block_mask(visible: torch.Tensor, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive mask [B|1, 1, g·n, S] of 0 / −inf in ``dtype``, seen bool [B|1, 1, g·n, 1]) from ``visible``
    [B|1, n, S].  A row that sees nothing has only −inf scores: its output and gradient are zeroed
    through ``seen`` (tested: no nan reaches the other rows' gradients)."""
    seen = visible.any(-1, keepdim=True)                                              # [B|1, n, 1]
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    batch, rows, keys = mask.shape
    mask = mask[:, None].expand(batch, groups, rows, keys).reshape(batch, 1, groups * rows, keys)
    seen = seen[:, None].expand(batch, groups, rows, 1).reshape(batch, 1, groups * rows, 1)
    return mask, seen


def block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                    scale: float, score_mod=None) -> torch.Tensor:
    """Softmax attention of q [B, Hq, n, D] over keys [B, Hkv, S, D] where ``visible`` [B|1, n, S] allows.

    Query heads are stacked as rows of their key/value head (no repeat of K/V), and the block is one
    ``scaled_dot_product_attention`` call with an additive mask (the fused CPU kernel; scores in
    float32 for 16-bit inputs, as SDPA does).  Rows that see nothing give 0.  With a score modification
    (a :class:`~attnrewrite.kernels.score_mods.ScoreProgram`, applied to the window's and the summaries'
    scores alike) the block is written out instead (:func:`_modified_block`).
    """
    if score_mod is not None:
        probs, _, _, values5, shape = _modified_block(q, keys, values, visible, scale, score_mod, want_grad=False)
        return (probs @ values5).reshape(*shape, values.shape[-1]).to(q.dtype)
    heads_q, heads_kv = q.shape[1], keys.shape[1]
    mask, seen = block_mask(visible, heads_q // heads_kv, q.dtype)
    out = F.scaled_dot_product_attention(_grouped(q, heads_kv), keys, values, attn_mask=mask, scale=scale)
    return _ungrouped(torch.where(seen, out, 0.0), heads_q)


def _rows_per_block(q: torch.Tensor, keys_per_row: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * keys_per_row))


def _keys_per_row(length: int, chunk_size: int, window_chunks: int, causal: bool) -> int:
    window = (window_chunks + 1 if causal else 2 * window_chunks + 1) * chunk_size
    return min(length, window) + math.ceil(length / chunk_size)


def _block_operands(q, k, v, k_sum, v_sum, exists, key_valid, is_causal: bool, chunk_size: int, window_chunks: int):
    """What both passes walk, block of query rows by block: (i0, i1, r0, r1, n_sum, visible, keys, values) — the
    rows [i0, i1), the raw keys [r0, r1) and the n_sum first summaries they may see, which they see
    (:func:`visibility`), and those keys and values, summaries first ([B, Hkv, n_sum + r1 − r0, D|Dv])."""
    length = q.shape[-2]
    rows = _rows_per_block(q, _keys_per_row(length, chunk_size, window_chunks, is_causal))
    for i0, i1, r0, r1, n_sum in blocks(length, chunk_size, window_chunks, is_causal, rows):
        visible = visibility(i0, i1, r0, r1, n_sum, chunk_size, window_chunks, is_causal, key_valid, exists,
                             q.device)
        keys = torch.cat([k_sum[:, :, :n_sum], k[:, :, r0:r1]], dim=2)
        values = torch.cat([v_sum[:, :, :n_sum], v[:, :, r0:r1]], dim=2)
        yield i0, i1, r0, r1, n_sum, visible, keys, values


def summary_attention_forward(q, k, v, key_valid, is_causal: bool, scale: float, chunk_size: int,
                              window_chunks: int, summary_query=None, score_mod=None) -> torch.Tensor:
    """Summary attention on validated inputs; q [B, Hq, T, D], k/v [B, Hkv, T, D|Dv] → [B, Hq, T, Dv].

    ``key_valid``: bool [B, T] or None; ``score_mod``: a parsed score modification or None.  Semantics:
    :mod:`attnrewrite.kernels.summary.reference`.
    """
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)
    k_sum, v_sum, exists = chunk_summaries(k, v, key_valid, chunk_size, summary_query)
    if split_applies(q, v, key_valid, is_causal, score_mod):
        if native.applies(q, k, v):  # the compiled loop: per-row visibility, no mask, no merge (native.py)
            return native.summary_forward(q, k, v, k_sum, v_sum, scale, chunk_size, window_chunks)
        return _split_forward(q, k, v, k_sum, v_sum, scale, chunk_size, window_chunks)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i0, i1, _, _, _, visible, keys, values in _block_operands(q, k, v, k_sum, v_sum, exists, key_valid, is_causal,
                                                                  chunk_size, window_chunks):
        out[:, :, i0:i1] = block_attention(q[:, :, i0:i1], keys, values, visible, scale, score_mod)
    return out


#: Query rows per block of the split forward (:func:`_split_forward`).
SPLIT_ROWS = 128


def split_applies(q, v, key_valid, is_causal: bool, score_mod) -> bool:
    """Whether :func:`summary_attention_forward` takes the split path: causal, no key padding, no score
    modification, equal head widths, float32 on the CPU (the fused kernel that returns the log-sum-exp, in
    float32: merging float64 outputs by it would lose their precision)."""
    return (is_causal and key_valid is None and score_mod is None and q.device.type == "cpu"
            and q.shape[-1] == v.shape[-1] and q.dtype == torch.float32)


def _fused_with_lse(q, keys, values, mask, scale: float):
    """(out [B, H, n, D] in q's dtype, lse [B, H, n] float32) of softmax attention, the fused CPU kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), keys.contiguous(), values.contiguous(), attn_mask=mask, scale=scale)
    return out, lse


def _split_forward(q, k, v, k_sum, v_sum, scale: float, chunk_size: int, window_chunks: int) -> torch.Tensor:
    """Causal summary attention without padding: each block of query chunks [c0, c1) in two fused calls.

    The keys every row of the block sees (the summaries of chunks before c0 − W, and the raw keys from
    chunk c1 − 1 − W to the block's first row) go through the fused kernel without a mask, so no tile is
    masked; the rest (the summaries and raw chunks of the staircase [c0 − W, c1 − 1 − W), where a row sees
    a chunk's summary exactly when it does not see its raw keys, and the block's own causal diagonal) go
    through one small masked call.  The two are merged by their log-sum-exp, which is exact: softmax over
    a union of disjoint key sets is the two partial softmaxes weighted by their shares of the normaliser.
    """
    batch, heads_q, length, dim = q.shape
    heads_kv = k.shape[1]
    groups = heads_q // heads_kv
    chunks = math.ceil(length / chunk_size)
    per_block = max(1, min(window_chunks + 1, SPLIT_ROWS // chunk_size))
    out = q.new_empty(q.shape)
    # the edge mask depends only on the block's shape relative to c0 (every block past the first W chunks has
    # the same one): built once per shape
    masks: dict[tuple, torch.Tensor] = {}
    for c0 in range(0, chunks, per_block):
        c1 = min(chunks, c0 + per_block)
        i0, i1 = c0 * chunk_size, min(length, c1 * chunk_size)
        s0, s1 = max(0, c0 - window_chunks), max(0, c1 - 1 - window_chunks)   # staircase chunks [s0, s1)
        rows = _grouped(q[:, :, i0:i1], heads_kv)
        edge_keys = torch.cat([k_sum[:, :, s0:s1], k[:, :, s0 * chunk_size:s1 * chunk_size], k[:, :, i0:i1]], 2)
        edge_values = torch.cat([v_sum[:, :, s0:s1], v[:, :, s0 * chunk_size:s1 * chunk_size], v[:, :, i0:i1]], 2)
        shape = (c1 - c0, i1 - i0, s0 - c0, s1 - c0)
        if shape not in masks:
            masks[shape] = _edge_mask(c0, c1, i0, i1, s0, s1, chunk_size, window_chunks, groups, q.dtype, q.device)
        mask = masks[shape]
        o_edge, l_edge = _fused_with_lse(rows, edge_keys, edge_values, mask, scale)
        full_raw = (s1 * chunk_size, i0)
        if s0 == 0 and full_raw[0] >= full_raw[1]:
            block = o_edge
        else:
            keys = torch.cat([k_sum[:, :, :s0], k[:, :, full_raw[0]:full_raw[1]]], 2)
            values = torch.cat([v_sum[:, :, :s0], v[:, :, full_raw[0]:full_raw[1]]], 2)
            o_full, l_full = _fused_with_lse(rows, keys, values, None, scale)
            top = torch.maximum(l_edge, l_full)
            w_edge, w_full = torch.exp(l_edge - top).unsqueeze(-1), torch.exp(l_full - top).unsqueeze(-1)
            block = ((o_edge.float() * w_edge + o_full.float() * w_full) / (w_edge + w_full)).to(q.dtype)
        out[:, :, i0:i1] = _ungrouped(block, heads_q)
    return out


def _edge_mask(c0: int, c1: int, i0: int, i1: int, s0: int, s1: int, chunk_size: int, window_chunks: int,
               groups: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, g·n, keys] of :func:`_split_forward`'s masked call: summaries [s0, s1), raw keys of
    chunks [s0, s1), raw keys [i0, i1)."""
    rows = torch.arange(i0, i1, device=device)
    row_chunk = (rows // chunk_size)[:, None]
    summaries = torch.arange(s0, s1, device=device)[None, :] < row_chunk - window_chunks
    stair = torch.arange(s0 * chunk_size, s1 * chunk_size, device=device)[None, :] // chunk_size
    stair = stair >= row_chunk - window_chunks
    diagonal = torch.arange(i0, i1, device=device)[None, :] <= rows[:, None]
    visible = torch.cat([summaries, stair, diagonal], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return mask.repeat(groups, 1)[None, None]


def _modified_block(q, keys, values, visible, scale: float, score_mod, want_grad: bool):
    """(probs [B, Hkv, g, n, S], mod' or None, keys5, values5, (B, Hq, n)) of softmax(mod(scale·q·kᵀ)) over the
    visible keys, in the work dtype; rows that see nothing have zero probabilities."""
    batch, heads_q, rows, dim = q.shape
    heads_kv = keys.shape[1]
    dtype = work_dtype(q.dtype)
    q5 = q.reshape(batch, heads_kv, heads_q // heads_kv, rows, dim).to(dtype)
    keys5, values5 = keys.to(dtype).unsqueeze(2), values.to(dtype).unsqueeze(2)   # [B, Hkv, 1, S, D]
    visible = visible[:, None, None]
    scores = (q5 @ keys5.transpose(-1, -2)) * scale
    scores, mod_grad = score_mod.with_grad(scores) if want_grad else (score_mod(scores), None)
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total > 0, total, torch.ones_like(total))
    return probs, mod_grad, keys5, values5, (batch, heads_q, rows)


def block_attention_backward(grad: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             visible: torch.Tensor, scale: float, score_mod=None):
    """(dq, dkeys, dvalues) of :func:`block_attention`.

    On the CPU with equal head widths of q and v: the fused flash-attention forward (for its log-sum-exp)
    and backward of the block, in the inputs' dtype; otherwise :func:`block_attention_backward_unfused`
    (the formulas in the work dtype), which is also the path of a score modification.
    """
    if score_mod is not None or q.device.type != "cpu" or q.shape[-1] != values.shape[-1]:
        return block_attention_backward_unfused(grad, q, keys, values, visible, scale, score_mod)
    heads_q, heads_kv = q.shape[1], keys.shape[1]
    mask, seen = block_mask(visible, heads_q // heads_kv, q.dtype)
    q_rows = _grouped(q, heads_kv).contiguous()
    d_out = torch.where(seen, _grouped(grad, heads_kv), 0.0).contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_rows, keys, values, attn_mask=mask,
                                                                           scale=scale)
    dq, dkeys, dvalues = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q_rows, keys, values, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    return _ungrouped(dq, heads_q), dkeys, dvalues


def block_attention_backward_unfused(grad: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     visible: torch.Tensor, scale: float, score_mod=None):
    """(dq, dkeys, dvalues) of :func:`block_attention`, in the work dtype, from its recomputed weights
    (through the score modification's derivative when there is one)."""
    if score_mod is not None:
        probs, mod_grad, keys5, values5, (batch, heads_q, rows) = _modified_block(q, keys, values, visible, scale,
                                                                                 score_mod, want_grad=True)
        d_out = grad.reshape(*probs.shape[:-1], -1).to(probs.dtype)
        d_probs = d_out @ values5.transpose(-1, -2)
        d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True)) * mod_grad * scale
        q5 = q.reshape(*probs.shape[:-1], q.shape[-1]).to(probs.dtype)
        dq = (d_scores @ keys5).reshape(batch, heads_q, rows, q.shape[-1])
        return dq, torch.einsum("bkgns,bkgnd->bksd", d_scores, q5), torch.einsum("bkgns,bkgnv->bksv", probs, d_out)
    batch, heads_q, rows, dim = q.shape
    heads_kv = keys.shape[1]
    groups = heads_q // heads_kv
    dtype = work_dtype(q.dtype)
    q5 = q.reshape(batch, heads_kv, groups, rows, dim).to(dtype)
    keys, values = keys.to(dtype).unsqueeze(2), values.to(dtype).unsqueeze(2)      # [B, Hkv, 1, S, D]
    visible = visible[:, None, None]
    logits = (q5 @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, torch.finfo(dtype).min)
    probs = torch.softmax(logits, dim=-1) * visible.any(-1, keepdim=True).to(dtype)  # [B, Hkv, g, n, S]
    d_out = grad.reshape(batch, heads_kv, groups, rows, -1).to(dtype)
    d_probs = d_out @ values.transpose(-1, -2)
    d_logits = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True)) * scale
    dq = (d_logits @ keys).reshape(batch, heads_q, rows, dim)
    dkeys = torch.einsum("bkgns,bkgnd->bksd", d_logits, q5)
    dvalues = torch.einsum("bkgns,bkgnv->bksv", probs, d_out)
    return dq, dkeys, dvalues


def summary_attention_backward(grad, q, k, v, key_valid, is_causal: bool, scale: float, chunk_size: int,
                               window_chunks: int, summary_query=None, score_mod=None):
    """(dq, dk, dv, d_summary_query or None) of :func:`summary_attention_forward`, block by block."""
    dtype = work_dtype(q.dtype)
    k, v = hide_padding(k, key_valid), hide_padding(v, key_valid)
    k_sum, v_sum, exists = chunk_summaries(k, v, key_valid, chunk_size, summary_query)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    dk_sum = torch.zeros(k_sum.shape, dtype=dtype, device=q.device)
    dv_sum = torch.zeros(v_sum.shape, dtype=dtype, device=q.device)
    for i0, i1, r0, r1, n_sum, visible, keys, values in _block_operands(q, k, v, k_sum, v_sum, exists, key_valid,
                                                                        is_causal, chunk_size, window_chunks):
        dq_b, dkeys, dvalues = block_attention_backward(grad[:, :, i0:i1], q[:, :, i0:i1], keys, values, visible,
                                                        scale, score_mod)
        dq[:, :, i0:i1] = dq_b
        dk_sum[:, :, :n_sum] += dkeys[:, :, :n_sum]
        dv_sum[:, :, :n_sum] += dvalues[:, :, :n_sum]
        dk[:, :, r0:r1] += dkeys[:, :, n_sum:]
        dv[:, :, r0:r1] += dvalues[:, :, n_sum:]
    dk_through, dv_through, d_query = chunk_summaries_backward(dk_sum, dv_sum, k, v, key_valid, chunk_size,
                                                               summary_query)
    dk, dv = dk + dk_through, dv + dv_through
    if d_query is not None:
        d_query = d_query.to(summary_query.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_query
