"""The public hashed op: SDPA's signature plus the kind's options (``attnrewrite::hashed_attention``)."""

from __future__ import annotations

import torch

from attnrewrite.kernels.hashed import op as _op  # noqa: F401  (registers the ops)


def hashed_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
                     projections: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
    """Hashed attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Each query attends (exact softmax of scale·q·k + bias) to its first ``sinks`` and last ``window``
    visible keys and to the ``top_k`` other visible keys whose binary codes agree best with its own;
    the query heads of a grouped-query group share one selection (agreement summed over the group).
    Semantics in full: :mod:`attnrewrite.kernels.hashed.reference`.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; fp16, bf16, fp32 or fp64.
        attn_mask: bool (True = may attend) or float (added to the scores; entries ≤ −10⁴ exclude a
            key), broadcastable to [B, 1, Tq, Tk]: one mask for every head.
        dropout_p: must be 0.
        is_causal: key j ≤ query i (needs Tq == Tk).  A decoding query comes after every key: False.
        scale: score scale, default 1/√D.
        enable_gqa: allow Hq to be a multiple of Hkv.
        bits: code length, a multiple of 8.
        top_k, window, sinks: how many keys are chosen by their codes, how many recent ones and how
            many first ones are always kept.
        hash: ``"random"`` — Gaussian hyperplanes drawn from ``seed``, the same for queries and keys
            (no training) — or ``"learned"`` with ``projections=(P_q [Hq, D, bits], P_k [Hkv, D, bits])``.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.  Inside ``torch.autocast`` the floating-point inputs (float64
        excepted) are cast to the autocast dtype first and the output has it, as with SDPA.  Gradients reach q, the selected keys and their values (and the
        projections, by a straight-through estimate, when learned).
    """
    q_projection, k_projection = projections if projections is not None else (None, None)
    return torch.ops.attnrewrite.hashed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                  bits=bits, top_k=top_k, window=window, sinks=sinks, hash=hash,
                                                  q_projection=q_projection, k_projection=k_projection, seed=seed)
