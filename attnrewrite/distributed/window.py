"""Sliding-window attention, context-parallel: each rank fetches its window's raw rows and the sink
rows from their owners; no rank holds the whole sequence's keys and values.

Query p sees the keys p − window < j ≤ p (causal; |p − j| < window bidirectional) and the first
``sinks`` keys (semantics: :mod:`attnrewrite.kernels.sliding_window.reference`).  For each of its two
pieces [s0, s1) a rank needs the rows [s0 − window + 1, s1) (… s1 + window − 1 bidirectional) and
[0, sinks): :func:`attnrewrite.distributed.exchange.fetch` brings the ones other ranks hold (and sends
their gradients back).  The queries then attend block by block with the summary path's block
functions (:func:`attnrewrite.kernels.summary.chunked.block_attention`, exact softmax, a row that sees
nothing gives 0).

A float key mask (a key bias: −inf excludes the key, any other value is added to the score) and a
position bias (``position_slopes`` with ``position``, slopes[h]·(j − i) or slopes[h]·|j − i| from the
global positions) are added block by block after the score modification, as the op adds them; such
blocks are written out (:func:`_biased_block`) instead of the fused kernel's.

Not distributed here (the manager all-gathers K/V for it, exact, without the saving): dropout.  A
sharded form would have to draw, for every block, the dropout mask the whole op draws, and redraw it
in the backward; the all-gather form calls the op itself on the whole sequence, so its rows keep the
op's dropout (drawn from each rank's generator) and its own backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.distributed.exchange import fetch, plan_fetch
from attnrewrite.distributed.layout import segments
from attnrewrite.kernels.checks import check_position_slopes
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.sliding_window import public as window_op
from attnrewrite.kernels.summary import chunked

#: query rows per block
ROWS = 256


def applies(args: dict, mask: Tensor | None) -> bool:
    """Whether this form computes the call (else the manager all-gathers K/V for it)."""
    return args["dropout_p"] == 0.0 and args["q"].dim() == 4


def needed(start: int, stop: int, length: int, window: int, sinks: int, causal: bool) -> Tensor:
    """The sorted global positions the queries [start, stop) can see (their window and the sinks)."""
    first = max(0, start - window + 1)
    last = stop if causal else min(length, stop + window - 1)
    return torch.unique(torch.cat([torch.arange(min(sinks, length)), torch.arange(first, last)]))


def _visible(rows: Tensor, keys: Tensor, window: int, sinks: int, causal: bool) -> Tensor:
    """bool [n, K] from global positions (the reference's rule)."""
    p, j = rows[:, None], keys[None, :]
    if causal:
        return ((j <= p) & (j > p - window)) | ((j < sinks) & (j <= p))
    return ((j - p).abs() < window) | (j < sinks)


def _biased_block(q, keys, values, visible, bias, scale, score_mod, want_grad=False):
    """Softmax attention of q [B, Hq, n, D] over keys/values [B, Hkv, S, D|Dv] where ``visible`` [B|1, n, S]
    allows, with ``bias`` [B|1, Hq|1, n, S] added after the score modification: (probabilities
    [B, Hkv, g, n, S], mod' or None, q, keys and values grouped, in the work dtype).  Rows that see
    nothing get zero weights."""
    dtype = chunked.work_dtype(q.dtype)
    batch, heads_q, rows, dim = q.shape
    heads_kv = keys.shape[1]
    q5 = q.reshape(batch, heads_kv, heads_q // heads_kv, rows, dim).to(dtype)
    keys5, values5 = keys.to(dtype).unsqueeze(2), values.to(dtype).unsqueeze(2)      # [B, Hkv, 1, S, D]
    logits = (q5 @ keys5.transpose(-1, -2)) * scale
    mod_grad = None
    if score_mod is not None:
        logits, mod_grad = score_mod.with_grad(logits) if want_grad else (score_mod(logits), None)
    if bias is not None:
        bias = bias.to(dtype)
        logits = logits + bias.reshape(bias.shape[0], -1, heads_q // heads_kv if bias.shape[1] > 1 else 1,
                                       rows, bias.shape[-1])
    visible = visible[:, None, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0) * visible.any(-1, keepdim=True).to(dtype)
    return probs, mod_grad, q5, keys5, values5


def _biased_block_backward(grad, q, keys, values, visible, bias, scale, score_mod):
    """(dq, dkeys, dvalues) of :func:`_biased_block`'s attention, in the work dtype."""
    probs, mod_grad, q5, keys5, values5 = _biased_block(q, keys, values, visible, bias, scale, score_mod, True)
    d_out = grad.reshape(*probs.shape[:-1], -1).to(probs.dtype)
    d_probs = d_out @ values5.transpose(-1, -2)
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True)) * scale
    if mod_grad is not None:
        d_scores = d_scores * mod_grad
    dq = (d_scores @ keys5).reshape(q.shape)
    return dq, torch.einsum("bkgns,bkgnd->bksd", d_scores, q5), torch.einsum("bkgns,bkgnv->bksv", probs, d_out)


class _PieceWindow(torch.autograd.Function):
    """A piece's queries (global rows ``start`` …) over its fetched keys (global ``positions``)."""

    @staticmethod
    def forward(ctx, q, k_f, v_f, keep, key_bias, geometry):
        out = q.new_empty(*q.shape[:-1], v_f.shape[-1])
        scale, score_mod = geometry[-1], geometry[-2]
        for rows, cols, visible, bias in _blocks(q, keep, key_bias, geometry):
            if bias is None:
                out[:, :, rows] = chunked.block_attention(q[:, :, rows], k_f[:, :, cols], v_f[:, :, cols], visible,
                                                          scale, score_mod)
                continue
            probs, _, _, _, values5 = _biased_block(q[:, :, rows], k_f[:, :, cols], v_f[:, :, cols], visible, bias,
                                                    scale, score_mod)
            out[:, :, rows] = (probs @ values5).reshape(*q.shape[:2], -1, v_f.shape[-1]).to(q.dtype)
        ctx.save_for_backward(q, k_f, v_f, keep, key_bias)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_f, v_f, keep, key_bias = ctx.saved_tensors
        geometry = ctx.geometry
        scale, score_mod = geometry[-1], geometry[-2]
        dtype = chunked.work_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dk = torch.zeros(k_f.shape, dtype=dtype, device=q.device)
        dv = torch.zeros(v_f.shape, dtype=dtype, device=q.device)
        grad = grad.contiguous()
        for rows, cols, visible, bias in _blocks(q, keep, key_bias, geometry):
            if bias is None:
                dq_b, dk_b, dv_b = chunked.block_attention_backward(grad[:, :, rows], q[:, :, rows], k_f[:, :, cols],
                                                                    v_f[:, :, cols], visible, scale, score_mod)
            else:
                dq_b, dk_b, dv_b = _biased_block_backward(grad[:, :, rows], q[:, :, rows], k_f[:, :, cols],
                                                          v_f[:, :, cols], visible, bias, scale, score_mod)
            dq[:, :, rows] = dq_b
            dk[:, :, cols] += dk_b
            dv[:, :, cols] += dv_b
        return dq.to(q.dtype), dk.to(k_f.dtype), dv.to(v_f.dtype), None, None, None


def _blocks(q, keep, key_bias, geometry):
    """(local rows, fetched columns, visible [B|1, n, K'], additive bias [B|1, Hq|1, n, K'] or None) per
    block of query rows; the bias holds the key bias and the position bias (None without either)."""
    start, positions, window, sinks, causal, slopes, position, _, _ = geometry
    n_rows = q.shape[-2]
    for i0 in range(0, n_rows, ROWS):
        i1 = min(n_rows, i0 + ROWS)
        rows = torch.arange(start + i0, start + i1)
        lo = max(0, start + i0 - window + 1)
        hi = start + i1 if causal else start + i1 + window - 1
        cols = ((positions < sinks) | ((positions >= lo) & (positions < hi))).nonzero().flatten()
        visible = _visible(rows, positions[cols], window, sinks, causal).to(q.device)[None]
        if keep is not None:
            visible = visible & keep[:, None, cols.to(keep.device)]
        bias = None
        if key_bias is not None:                                                     # [B|1, 1, 1, K']
            bias = key_bias[:, None, None, cols.to(key_bias.device)].expand(-1, -1, i1 - i0, -1)
        if slopes is not None:                                                       # [1, Hq|1, n, K']
            distance = (positions[cols][None, :] - rows[:, None]).to(q.device, slopes.dtype)
            distance = distance.abs() if position == "|j-i|" else distance
            term = slopes.view(1, -1, 1, 1) * distance
            bias = term if bias is None else bias + term
        yield slice(i0, i1), cols.to(q.device), visible, bias


def attend(args: dict, mask: Tensor | None, rank: int, world: int, comm) -> Tensor:
    """This rank's rows of ``attnrewrite::sliding_window_attention`` [B, Hq, T_local, Dv], in local order.

    ``mask``: None or this rank's key mask [B|1, 1, 1, T_local|1], bool or float (a key bias, −inf
    excluding the key).
    """
    q, k, v = args["q"], args["k"], args["v"]
    window, sinks, causal = args["window"], args["sinks"], bool(args["is_causal"])
    window_op._check(q, k, v, mask, args["dropout_p"], bool(args["enable_gqa"]), window, sinks)
    local = q.shape[-2]
    length, piece = local * world, local // 2
    scale = q.shape[-1] ** -0.5 if args["scale"] is None else args["scale"]
    score_mod = parse_score_mod(args.get("score_mod"))
    slopes, position = args.get("position_slopes"), args.get("position")
    if slopes is not None or position is not None:
        slopes = check_position_slopes(slopes, position, q, q.shape[1], "context_parallel: sliding-window attention")
    keep = key_bias = None
    if mask is not None:  # [B|1, T_local] bool, the same for every head
        if mask.shape[1] != 1:
            raise ValueError("context_parallel: sliding-window attention takes a key mask that is the same for every "
                             f"head ([B, 1, 1, T]), got {tuple(mask.shape)}")
        keep = mask.reshape(mask.shape[0], mask.shape[-1]).expand(mask.shape[0], local)
        if keep.dtype != torch.bool:  # a key bias: −inf excludes the key, other values are added
            key_bias = keep
            keep = key_bias > float("-inf")
            key_bias = key_bias.masked_fill(~keep, 0.0)
            if bool((key_bias == 0).all()):  # 0 / −inf: only a key mask
                key_bias = None
    pieces = segments(rank, world, length)
    wanted = [torch.cat([needed(a, b, length, window, sinks, causal) for a, b in segments(r, world, length)])
              for r in range(world)]
    plan = plan_fetch(wanted, rank, world, local)
    if k.shape[:-1] == v.shape[:-1] and k.dtype == v.dtype:
        k_f, v_f = fetch(torch.cat([k, v], dim=-1), plan, comm).split([k.shape[-1], v.shape[-1]], dim=-1)
    else:
        k_f, v_f = fetch(k, plan, comm), fetch(v, plan, comm)
    keep_f = None if keep is None else fetch(keep.to(torch.uint8)[:, :, None], plan, comm)[:, :, 0].bool()
    bias_f = None if key_bias is None else fetch(key_bias.contiguous()[:, :, None], plan, comm)[:, :, 0]
    outs, offset = [], 0
    for (start, stop), rows in zip(pieces, (slice(0, piece), slice(piece, local))):
        positions = needed(start, stop, length, window, sinks, causal)
        cols = slice(offset, offset + positions.numel())
        offset += positions.numel()
        geometry = (start, positions, window, sinks, causal, slopes, position, score_mod, scale)
        outs.append(_PieceWindow.apply(q[:, :, rows], k_f[:, :, cols], v_f[:, :, cols],
                                       None if keep_f is None else keep_f[:, cols],
                                       None if bias_f is None else bias_f[:, cols], geometry))
    return torch.cat(outs, dim=2)
