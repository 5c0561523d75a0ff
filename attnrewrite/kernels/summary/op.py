"""``attnrewrite::summary_attention_torch`` (the torch path of ``attnrewrite::summary_attention``) and
its backward as ``torch.library`` custom ops.

Both are opaque to torch.compile (inductor keeps each as one call, whatever the sequence length:
the block loops stay inside), with fake implementations for tracing and the backward registered
as the forward's autograd.  Inputs are checked here, in the fake implementation as well, so a
bad call fails while tracing with the same message as when run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnrewrite.kernels._ops import kernel_op, sdpa_schema
from attnrewrite.kernels.checks import (MASKED_SCORE, check_dropout, check_qkv, key_padding_mask,
                                       refuse_torch_context_parallel)
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.tuning import is_traced

from .chunked import summary_attention_backward, summary_attention_forward

SUMMARIES = ("mean", "learned")
WHAT = "summary attention"


def check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                 enable_gqa: bool, chunk_size: int, window_chunks: int, summary: str,
                 summary_query: Optional[Tensor]) -> None:
    """Raise an error naming the first problem with a summary-attention call (the types as in
    :mod:`attnrewrite.kernels.checks`)."""
    refuse_torch_context_parallel(WHAT)
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"summary attention is self-attention over one sequence (Tq == Tk), got Tq={q.shape[-2]} "
                         f"and Tk={k.shape[-2]}; decode one token at a time through attnrewrite.SummaryCache")
    check_dropout(dropout_p, WHAT, supported=False)
    if chunk_size < 1 or window_chunks < 0:
        raise ValueError(f"need chunk_size >= 1 and window_chunks >= 0, got {chunk_size} and {window_chunks}")
    if summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {SUMMARIES}, got {summary!r}")
    if (summary == "learned") != (summary_query is not None):
        raise ValueError("summary='learned' takes summary_query [Hkv, D] (the pooling queries that "
                         "attnrewrite.convert attaches), and summary='mean' takes none")
    if summary_query is not None and tuple(summary_query.shape) != (k.shape[1], k.shape[-1]):
        raise ValueError(f"summary_query must be [Hkv, D] = {(k.shape[1], k.shape[-1])}, "
                         f"got {tuple(summary_query.shape)}")
    if attn_mask is not None:
        key_padding_mask(attn_mask, q.shape[0], k.shape[-2], WHAT)


def check_cu_seqlens(cu_seqlens: Optional[Tensor], q: Tensor, attn_mask: Optional[Tensor]) -> None:
    """Raise an error naming the problem with packed sequences' ``cu_seqlens`` (nothing when it is None).

    It must be an int32 or int64 tensor [N+1] on q's device, q/k/v packed as [1, H, total, D], no
    ``attn_mask`` beside it, and (checked where the values exist, not while tracing) its values must
    start at 0, never decrease and end at ``total``.  Empty sequences are allowed.
    """
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{WHAT}: cu_seqlens must be an int32 or int64 tensor [N+1] of sequence starts, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{WHAT}: cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{WHAT}: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"{WHAT}: packed sequences (cu_seqlens) need batch 1: q [1, H, total, D], "
                         f"got q {tuple(q.shape)}")
    if attn_mask is not None:
        raise ValueError(f"{WHAT}: attn_mask cannot be combined with cu_seqlens (pack only the real tokens)")
    if not is_traced(cu_seqlens):
        bounds = cu_seqlens.tolist()
        total = q.shape[-2]
        if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{WHAT}: cu_seqlens must start at 0, never decrease and end at the packed length "
                             f"{total}, got {bounds}")


def key_valid_from_mask(attn_mask: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
    """bool [B, T] (True = a real key) from a checked key-padding mask; float masks must hold 0 or
    masked values (−inf, or ≤ MASKED_SCORE = −9000 as the rewriter counts them)."""
    if attn_mask is None:
        return None
    flat = key_padding_mask(attn_mask, batch, length, WHAT)
    if attn_mask.dtype == torch.bool:
        valid = flat
    else:
        valid = flat > MASKED_SCORE
        # a data-dependent check: made where the values exist (the torch path's op runs it on real
        # tensors; the kernels' path, traced by torch.compile, is reached from rewritten sites whose
        # masks the rewriter proved to be padding)
        if not is_traced(flat) and bool((flat[valid] != 0).any()):
            raise ValueError("summary attention cannot add a float bias to its scores: a float attn_mask must "
                             "hold 0 (keep) or -inf (padding) only")
    return valid.expand(batch, length).to(device=attn_mask.device).contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
             is_causal: bool = True, scale: Optional[float] = None, enable_gqa: bool = False, chunk_size: int = 8,
             window_chunks: int = 128, summary: str = "mean", summary_query: Optional[Tensor] = None,
             score_mod: Optional[str] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, chunk_size, window_chunks, summary,
                 summary_query)
    check_cu_seqlens(cu_seqlens, q, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _packed_forward(q, k, v, cu_seqlens, is_causal, scale, chunk_size, window_chunks, summary_query,
                               parse_score_mod(score_mod))
    key_valid = key_valid_from_mask(attn_mask, q.shape[0], k.shape[-2])
    return summary_attention_forward(q, k, v, None if key_valid is None else key_valid.to(q.device), is_causal,
                                     scale, chunk_size, window_chunks, summary_query, parse_score_mod(score_mod))


def _forward_fake(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, chunk_size=8,
                  window_chunks=128, summary="mean", summary_query=None, score_mod=None, cu_seqlens=None):
    parse_score_mod(score_mod)  # a bad program fails while tracing, as when run
    check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, chunk_size, window_chunks, summary,
                 summary_query)
    check_cu_seqlens(cu_seqlens, q, attn_mask)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
              scale: Optional[float], chunk_size: int, window_chunks: int,
              summary_query: Optional[Tensor], score_mod: str = "",
              cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _packed_backward(grad.contiguous(), q, k, v, cu_seqlens, is_causal, scale, chunk_size, window_chunks,
                                summary_query, parse_score_mod(score_mod))
    key_valid = key_valid_from_mask(attn_mask, q.shape[0], k.shape[-2])
    dq, dk, dv, d_query = summary_attention_backward(
        grad.contiguous(), q, k, v, None if key_valid is None else key_valid.to(q.device), is_causal, scale,
        chunk_size, window_chunks, summary_query, parse_score_mod(score_mod))
    d_query = d_query.contiguous() if d_query is not None else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), d_query


def _packed_bounds(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """(start, end) of each non-empty packed sequence (cu_seqlens checked by :func:`check_cu_seqlens`)."""
    starts = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(starts, starts[1:]) if b > a]


def _packed_forward(q, k, v, cu_seqlens, is_causal, scale, chunk_size, window_chunks, summary_query, score_mod):
    """Packed sequences [1, H, total, D]: each sequence run alone through the block path (its chunks
    counted from its own start), written into its rows; an empty sequence has no rows."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for a, b in _packed_bounds(cu_seqlens):
        out[:, :, a:b] = summary_attention_forward(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal, scale,
                                                   chunk_size, window_chunks, summary_query, score_mod)
    return out


def _packed_backward(grad, q, k, v, cu_seqlens, is_causal, scale, chunk_size, window_chunks, summary_query,
                     score_mod):
    """(dq, dk, dv, d_summary_query) of :func:`_packed_forward`, sequence by sequence (the pooling queries'
    gradient summed over the sequences)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_query = None if summary_query is None else torch.zeros_like(summary_query)
    for a, b in _packed_bounds(cu_seqlens):
        dq_s, dk_s, dv_s, dquery_s = summary_attention_backward(
            grad[:, :, a:b], q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal, scale, chunk_size,
            window_chunks, summary_query, score_mod)
        dq[:, :, a:b], dk[:, :, a:b], dv[:, :, a:b] = dq_s, dk_s, dv_s
        if d_query is not None:
            d_query += dquery_s
    d_query = d_query.contiguous() if d_query is not None else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), d_query


def _backward_fake(grad, q, k, v, attn_mask, is_causal, scale, chunk_size, window_chunks, summary_query, score_mod="",
                   cu_seqlens=None):
    d_query = q.new_empty(0) if summary_query is None else summary_query.new_empty(summary_query.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_query


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, _dropout, is_causal, scale, _gqa, chunk_size, window_chunks, _summary, summary_query,
     score_mod, cu_seqlens) = inputs
    ctx.save_for_backward(q, k, v, attn_mask, summary_query, cu_seqlens)
    ctx.options = (is_causal, scale, chunk_size, window_chunks)
    ctx.score_mod = score_mod or ""


def _autograd(ctx, grad):
    q, k, v, attn_mask, summary_query, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, d_query = torch.ops.attnrewrite.summary_attention_backward(grad, q, k, v, attn_mask, *ctx.options,
                                                                           summary_query, ctx.score_mod, cu_seqlens)
    return (dq, dk, dv, None, None, None, None, None, None, None, None,
            (d_query if summary_query is not None else None), None, None)


# SymInt, not int: the schema custom_op infers from ``int`` annotations, kept as it was.  The public op
# ``attnrewrite::summary_attention`` (:mod:`.public`, with SDPA's autocast rule) chooses this or the kernels.
summary_attention_op = kernel_op(
    "summary_attention_torch", _forward, fake=_forward_fake, backward=_autograd, setup_context=_setup_context,
    schema=sdpa_schema('SymInt chunk_size=8, SymInt window_chunks=128, str summary="mean", '
                       "Tensor? summary_query=None, str? score_mod=None, Tensor? cu_seqlens=None", is_causal=True))
summary_attention_backward_op = kernel_op("summary_attention_backward", _backward, fake=_backward_fake)
