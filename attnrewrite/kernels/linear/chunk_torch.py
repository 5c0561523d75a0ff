"""Chunked linear attention in plain torch: the CPU path (and ``impl="torch"`` anywhere).

Causal: the sequence is cut into chunks of C tokens; inside a chunk the masked quadratic form,
across chunks the running state, all chunks at once as batched matmuls (no Python loop over
chunks), so memory grows linearly in T (the largest intermediates are the per-chunk weights
[T·C] and the per-chunk states [T/C·Dk·Dv] per head) and autograd gives every gradient,
``initial_state`` included.  Bidirectional: one reduction φ(K)ᵀV per sequence.

Everything is computed in float32 (float64 stays float64) whatever the input dtype; the output is
cast back to the input dtype and the state stays in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .feature_maps import apply_feature_map

DEFAULT_CHUNK = 64


def _features(q, k, v, *, feature_map, scale, key_mask):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_feat = apply_feature_map(q.to(dtype) * scale, feature_map)
    k_feat = apply_feature_map(k.to(dtype), feature_map)
    if key_mask is not None:  # padded keys must contribute nothing: φ(0) is 1 for elu, so zero after φ
        k_feat = k_feat * key_mask[:, None, :, None].to(dtype)
    return q_feat, k_feat, v.to(dtype)


def _group_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G·T, D]: the G query heads of one kv head stacked along rows,
    so one matmul against that kv head's keys serves the whole group without repeating K/V."""
    b, hq, t, d = x.shape
    return x.reshape(b, kv_heads, (hq // kv_heads) * t, d)


def _bidirectional(q_feat, k_feat, v, s0, z0, eps):
    b, hq, tq, _ = q_feat.shape
    kv_heads = k_feat.shape[1]
    state = k_feat.transpose(-1, -2) @ v  # [B, Hkv, Dk, Dv]
    normaliser = k_feat.sum(-2)  # [B, Hkv, Dk]
    if s0 is not None:
        state, normaliser = state + s0, normaliser + z0
    rows = _group_queries(q_feat, kv_heads)  # [B, Hkv, G·Tq, Dk]
    out = (rows @ state) / ((rows @ normaliser[..., None]) + eps)
    return out.reshape(b, hq, tq, -1), state, normaliser


def _causal(q_feat, k_feat, v, s0, z0, eps, chunk):
    b, hq, t, dk = q_feat.shape
    kv_heads, dv = k_feat.shape[1], v.shape[-1]
    groups = hq // kv_heads
    pad = (-t) % chunk
    if pad:  # zero features past the end: they add nothing to any state or weight
        q_feat, k_feat, v = (F.pad(x, (0, 0, 0, pad)) for x in (q_feat, k_feat, v))
    n = (t + pad) // chunk
    # [B, Hkv, N, G·C, Dk]: row g·C + i is query head g of the group at position i of the chunk
    q_chunks = q_feat.reshape(b, kv_heads, groups, n, chunk, dk).transpose(2, 3).reshape(b, kv_heads, n, groups * chunk, dk)
    k_chunks = k_feat.reshape(b, kv_heads, n, chunk, dk)
    v_chunks = v.reshape(b, kv_heads, n, chunk, dv)

    chunk_state = k_chunks.transpose(-1, -2) @ v_chunks  # [B, Hkv, N, Dk, Dv]
    chunk_norm = k_chunks.sum(-2)  # [B, Hkv, N, Dk]
    # state seen by chunk c: everything before it (exclusive prefix sum over chunks)
    state_before = F.pad(chunk_state.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :-1]
    norm_before = F.pad(chunk_norm.cumsum(2), (0, 0, 1, 0))[:, :, :-1]
    if s0 is not None:
        state_before = state_before + s0[:, :, None]
        norm_before = norm_before + z0[:, :, None]

    causal_mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q_feat.device).tril().repeat(groups, 1)
    weights = (q_chunks @ k_chunks.transpose(-1, -2)) * causal_mask  # [B, Hkv, N, G·C, C]
    numerator = weights @ v_chunks + q_chunks @ state_before
    denominator = weights.sum(-1, keepdim=True) + q_chunks @ norm_before[..., None] + eps
    out = (numerator / denominator).reshape(b, kv_heads, n, groups, chunk, dv).transpose(2, 3)
    out = out.reshape(b, hq, n * chunk, dv)[:, :, :t]

    state = state_before[:, :, -1] + chunk_state[:, :, -1]
    normaliser = norm_before[:, :, -1] + chunk_norm[:, :, -1]
    return out, state, normaliser


def _dense(q, k, v, *, causal, feature_map, scale, eps, key_mask, initial_state, chunk):
    q_feat, k_feat, v_c = _features(q, k, v, feature_map=feature_map, scale=scale, key_mask=key_mask)
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (x.to(q_feat.dtype) for x in initial_state)
    if causal:
        out, state, normaliser = _causal(q_feat, k_feat, v_c, s0, z0, eps, chunk)
    else:
        out, state, normaliser = _bidirectional(q_feat, k_feat, v_c, s0, z0, eps)
    return out.to(q.dtype), state, normaliser


def chunk_linear_attn_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "elu",
    scale: float = 1.0,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention with torch ops only (inputs already validated by the public API).

    Args:
        q: [B, Hq, Tq, Dk]; k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv]; or, with ``cu_seqlens``
            (int [N+1]), the packed layout [1, H, total_T, D] holding N sequences.
        key_mask: optional bool [B, Tk], True for real keys.
        initial_state: optional (S0 [B or N, Hkv, Dk, Dv], z0 [B or N, Hkv, Dk]).

    Returns:
        out [B, Hq, Tq, Dv] in q's dtype, final S [B or N, Hkv, Dk, Dv] and z [B or N, Hkv, Dk]
        in float32 (float64 for float64 inputs).
    """
    kwargs = dict(causal=causal, feature_map=feature_map, scale=scale, eps=eps, chunk=chunk_size)
    if cu_seqlens is None:
        return _dense(q, k, v, key_mask=key_mask, initial_state=initial_state, **kwargs)
    bounds = cu_seqlens.tolist()
    outs, states, norms = [], [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else (initial_state[0][i : i + 1], initial_state[1][i : i + 1])
        out, state, norm = _dense(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                  key_mask=None, initial_state=init, **kwargs)
        outs.append(out)
        states.append(state)
        norms.append(norm)
    return torch.cat(outs, dim=2), torch.cat(states), torch.cat(norms)


def recurrent_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    normaliser: torch.Tensor,
    *,
    feature_map: str,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode T new tokens (usually one) against a carried state, in torch; causal.

    q: [B, Hq, T, Dk]; k: [B, Hkv, T, Dk]; v: [B, Hkv, T, Dv]; state [B, Hkv, Dk, Dv];
    normaliser [B, Hkv, Dk].  Returns out [B, Hq, T, Dv] and the new (state, normaliser).
    """
    out, new_state, new_norm = _dense(q, k, v, causal=True, feature_map=feature_map, scale=scale, eps=eps,
                                      key_mask=None, initial_state=(state, normaliser), chunk=max(1, q.shape[2]))
    return out, new_state, new_norm
