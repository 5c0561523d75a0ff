"""Summary attention, written to be read: the oracle the fast path and the cache are checked against.

The sequence is cut into chunks of C tokens (chunk m holds positions m·C … m·C + C − 1; the last
chunk may be shorter).  Each chunk m has one summary key and value,

    (k̄_m, v̄_m) = Σ_j a_j (k_j, v_j)  over the valid tokens j of chunk m,

with a_j = 1/n (``summary="mean"``) or a_j = softmax_j(p·k_j / √D) (``summary="learned"``, p a
pooling query per key/value head).  A chunk without a valid token has no summary.

Query i in chunk c sees, with W = ``window_chunks``:

- causal: the valid tokens j ≤ i of chunks c − W … c, and the summaries of chunks m < c − W;
- bidirectional: the valid tokens of chunks c − W … c + W, and the summaries of every other chunk;

and computes an exact softmax(scale·q·k) over that set.  A query that sees nothing gets 0.

Packed sequences (``cu_seqlens`` [N+1], q/k/v [1, H, total, D]): sequence s holds the rows
cu_seqlens[s] … cu_seqlens[s+1] − 1 and is its own summary attention, its chunks counted from its own
first row, so no chunk and no window reaches into another sequence.
Everything here loops over queries and builds each visible set explicitly: small inputs only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def naive_chunk_summaries(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, chunk_size: int,
                          summary_query: torch.Tensor | None = None):
    """Summaries of every chunk, one chunk at a time.

    Args:
        k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv]; key_valid: bool [B, T] or None (all valid).
        summary_query: None for mean pooling, or [Hkv, D] pooling queries.
    Returns:
        (k̄ [B, Hkv, N, D], v̄ [B, Hkv, N, Dv], exists bool [B, N]), N = ceil(T / C).
    """
    batch, heads, length, dim = k.shape
    chunks = math.ceil(length / chunk_size)
    k_sum = k.new_zeros(batch, heads, chunks, dim)
    v_sum = v.new_zeros(batch, heads, chunks, v.shape[-1])
    exists = torch.zeros(batch, chunks, dtype=torch.bool, device=k.device)
    for b in range(batch):
        for m in range(chunks):
            tokens = [j for j in range(m * chunk_size, min(length, (m + 1) * chunk_size))
                      if key_valid is None or bool(key_valid[b, j])]
            if not tokens:
                continue
            exists[b, m] = True
            for h in range(heads):
                keys, values = k[b, h, tokens], v[b, h, tokens]  # [n, D], [n, Dv]
                if summary_query is None:
                    weights = torch.full((len(tokens),), 1.0 / len(tokens), dtype=k.dtype, device=k.device)
                else:
                    weights = torch.softmax(keys @ summary_query[h].to(k.dtype) / math.sqrt(dim), dim=0)
                k_sum[b, h, m] = weights @ keys
                v_sum[b, h, m] = weights @ values
    return k_sum, v_sum, exists


def naive_summary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
                            is_causal: bool = True, scale: float | None = None, *, chunk_size: int = 8,
                            window_chunks: int = 128, summary_query: torch.Tensor | None = None,
                            score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Summary attention of q [B, Hq, T, D] over k [B, Hkv, T, D], v [B, Hkv, T, Dv] (Hq a multiple of Hkv).

    ``key_valid``: bool [B, T] (False = padding) or None; ``score_mod``: an elementwise function applied to
    every score scale·q·k (summaries' and window keys') before the softmax, or None; ``cu_seqlens``:
    None, or the starts [N+1] of N sequences packed along T (B = 1), each computed alone.  Returns
    [B, Hq, T, Dv] in q's dtype.
    """
    if cu_seqlens is not None:
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        starts = [int(x) for x in cu_seqlens]
        for s in range(len(starts) - 1):
            rows = slice(starts[s], starts[s + 1])
            if starts[s + 1] > starts[s]:
                out[:, :, rows] = naive_summary_attention(
                    q[:, :, rows], k[:, :, rows], v[:, :, rows], None if key_valid is None else key_valid[:, rows],
                    is_causal, scale, chunk_size=chunk_size, window_chunks=window_chunks,
                    summary_query=summary_query, score_mod=score_mod)
        return out
    batch, heads_q, length, dim = q.shape
    groups = heads_q // k.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k_sum, v_sum, exists = naive_chunk_summaries(k, v, key_valid, chunk_size, summary_query)
    out = q.new_zeros(batch, heads_q, length, v.shape[-1])
    for b in range(batch):
        for i in range(length):
            c = i // chunk_size
            raw, summaries = [], []
            for j in range(length):
                cj = j // chunk_size
                in_window = c - window_chunks <= cj <= (c if is_causal else c + window_chunks)
                if in_window and (not is_causal or j <= i) and (key_valid is None or bool(key_valid[b, j])):
                    raw.append(j)
            for m in range(exists.shape[1]):
                outside = m < c - window_chunks or (not is_causal and m > c + window_chunks)
                if outside and bool(exists[b, m]):
                    summaries.append(m)
            if not raw and not summaries:
                continue
            for h in range(heads_q):
                kv = h // groups
                keys = torch.cat([k_sum[b, kv, summaries], k[b, kv, raw]])      # [n, D]
                values = torch.cat([v_sum[b, kv, summaries], v[b, kv, raw]])    # [n, Dv]
                logits = (keys @ q[b, h, i]) * scale
                if score_mod is not None:
                    logits = score_mod(logits)
                probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0)
                out[b, h, i] = probs.to(values.dtype) @ values
    return out
