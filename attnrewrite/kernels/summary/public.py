"""The public summary op: SDPA's signature plus the kind's options (``attnrewrite::summary_attention``)."""

from __future__ import annotations

import torch

from attnrewrite.kernels.summary import op as _op  # noqa: F401  (registers the ops)


def summary_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, *,
                      chunk_size: int = 8, window_chunks: int = 128, summary: str = "mean",
                      summary_query: torch.Tensor | None = None) -> torch.Tensor:
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

    Returns:
        [B, Hq, T, Dv] in q's dtype (inside ``torch.autocast``: the inputs are cast to the autocast
        dtype first, float64 excepted, as with SDPA, and the output has it).  Differentiable in q, k, v and ``summary_query``.
    """
    return torch.ops.attnrewrite.summary_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                   chunk_size=chunk_size, window_chunks=window_chunks,
                                                   summary=summary, summary_query=summary_query)
