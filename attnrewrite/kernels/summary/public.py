"""The public summary op ``attnrewrite::summary_attention``: SDPA's signature plus the kind's options.

A ``CompositeImplicitAutograd`` operator with ``impl`` in its schema, so a rewritten model calling
``torch.ops.attnrewrite.summary_attention`` reaches the Triton kernels (:mod:`.triton_op`) on CUDA and
the torch path (``attnrewrite::summary_attention_torch``, :mod:`.op`) elsewhere; under ``torch.compile``
it decomposes into whichever it chose.  SDPA's autocast rule is registered on it
(:func:`attnrewrite.kernels._ops.sdpa_autocast`), so the path is chosen from the dtype the call runs in.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels._ops import call_dtype, composite_op, resolve_impl, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.summary import op as _op  # noqa: F401  (registers the ops)

try:  # the Triton path is optional: the torch path works wherever torch does
    from attnrewrite.kernels.summary import triton_op as _triton
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _triton = None

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def summary_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, *,
                      chunk_size: int = 8, window_chunks: int = 128, summary: str = "mean",
                      summary_query: torch.Tensor | None = None, impl: str = "auto",
                      score_mod: str | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Summary attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Query i in chunk c = i // chunk_size attends (exact softmax of scale·q·k) to the tokens of chunks
    c − window_chunks … c (j ≤ i) and to one summary key/value of each older chunk.  With
    ``is_causal=False`` it sees chunks c − window_chunks … c + window_chunks in full and the
    summaries of all other chunks.  Semantics in full: :mod:`attnrewrite.kernels.summary.reference`.

    Args:
        q: [B, Hq, T, D]; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] — one sequence (Tq == Tk); fp16, bf16,
            fp32 or fp64, one dtype and device.  Decoding goes through :class:`attnrewrite.SummaryCache`.
        attn_mask: None or a key-padding mask broadcastable from [B, 1, 1, T]: bool (True = real key)
            or float holding 0 / -inf.  Padded keys are left out of the window and of the summaries.
        dropout_p: must be 0.
        is_causal: True (default) for language models.
        scale: score scale, default 1/√D.
        enable_gqa: allow Hq to be a multiple of Hkv.
        chunk_size: tokens per chunk (C).
        window_chunks: full chunks seen before the current one (W); the window is W·C to W·C + C − 1 tokens.
        summary: ``"mean"``, or ``"learned"`` with ``summary_query`` [Hkv, D], the pooling queries
            (e.g. ``attention.attnrewrite_summary.query`` after :func:`attnrewrite.convert`).
        impl: ``"auto"`` runs the Triton kernels for float16/bfloat16 on CUDA and the torch path
            (``attnrewrite::summary_attention_torch``) otherwise; ``"triton"`` always runs the kernels (on
            the CPU only under ``TRITON_INTERPRET=1``; float16, bfloat16 or float32, head dims up to
            256) or raises, naming why; ``"torch"`` always runs the torch path.
        score_mod: a score modification program (:mod:`attnrewrite.kernels.score_mods`) applied to every
            score (window keys and summaries alike, as :mod:`~attnrewrite.kernels.summary.reference` defines
            it) before the mask and the softmax.  Both paths apply it, forward and backward; the kernels
            take programs with at most one nonlinear step (tanh, sigmoid, exp, abs, relu, erf, square)
            between affine ones, and any other program runs on the torch path (``"auto"``) or is refused
            by ``"triton"``, naming why.
        cu_seqlens: packed variable-length sequences: q/k/v [1, H, total, D] holding N sequences back
            to back, ``cu_seqlens`` int32 or int64 [N+1] their starts (0, …, total; non-decreasing, so
            empty sequences are allowed).  Each sequence is its own summary attention, its chunks
            counted from its own start (no chunk spans two sequences); no ``attn_mask`` beside it.
            Both paths take it (the kernels read each sequence's bounds on the device; an eager call reads
            ``cu_seqlens`` back once to check it, a traced call does not).

    Returns:
        [B, Hq, T, Dv] in q's dtype (inside ``torch.autocast``: the inputs are cast to the autocast
        dtype first, float64 excepted, as with SDPA, and the output has it).  Differentiable in q, k, v and ``summary_query``.
    """
    return torch.ops.attnrewrite.summary_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                   chunk_size=chunk_size, window_chunks=window_chunks,
                                                   summary=summary, summary_query=summary_query, impl=impl,
                                                   score_mod=score_mod, cu_seqlens=cu_seqlens)


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, chunk_size=8,
          window_chunks=128, summary="mean", summary_query=None, score_mod=None, cu_seqlens=None, impl="auto"):
    """The composite op's body (run with autocast off, the inputs in the dtype the call runs in)."""
    if _resolve_impl(impl, q, v, score_mod) == "triton":
        return _triton_path(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, chunk_size, window_chunks,
                            summary, summary_query, parse_score_mod(score_mod), cu_seqlens)
    return torch.ops.attnrewrite.summary_attention_torch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                         chunk_size=chunk_size, window_chunks=window_chunks,
                                                         summary=summary, summary_query=summary_query,
                                                         score_mod=score_mod, cu_seqlens=cu_seqlens)


def _resolve_impl(impl: str, q: torch.Tensor, v: torch.Tensor, score_mod: str | None = None) -> str:
    parse_score_mod(score_mod)  # a bad program is refused by name on either path; every good one compiles in
    return resolve_impl(impl, q.device, what=_op.WHAT, dtype=call_dtype(q), head_dims=(q.shape[-1], v.shape[-1]),
                        triton_dtypes=_TRITON_DTYPES, auto_dtypes=(torch.float16, torch.bfloat16),
                        available=_triton is not None, interpreter_active=lambda: _triton.interpreter_active())


def _triton_path(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, chunk_size, window_chunks, summary,
                 summary_query, program=None, cu_seqlens=None):
    """The kernels, after the torch op's checks."""
    _op.check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, chunk_size, window_chunks, summary,
                     summary_query)
    _op.check_cu_seqlens(cu_seqlens, q, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    key_valid = _op.key_valid_from_mask(attn_mask, q.shape[0], k.shape[-2])
    return _triton.summary_attention_triton(q, k, v, key_valid, summary_query, scale, is_causal, chunk_size,
                                            window_chunks, program, cu_seqlens)


composite_op("summary_attention", sdpa_schema('SymInt chunk_size=8, SymInt window_chunks=128, str summary="mean", '
                                              'Tensor? summary_query=None, str? score_mod=None, '
                                              'Tensor? cu_seqlens=None, str impl="auto"',
                                              is_causal=True), _impl)
sdpa_autocast("summary_attention")  # q/k in fp32 beside a bf16 v run in bf16, as SDPA does
