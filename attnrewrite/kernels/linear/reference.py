"""Linear attention, written to be read: the oracles every fast path is checked against.

Per head, with φ the feature map, q̃_i = φ(scale·q_i) and k̃_j = φ(k_j):

    S_i = S0 + Σ_j k̃_jᵀ v_j        z_i = z0 + Σ_j k̃_j        out_i = q̃_i·S_i / (q̃_i·z_i + eps)

where j runs over the valid keys with j ≤ i when causal, and over all valid keys otherwise.

Two spellings of the same function live here, and the tests hold them to each other:

- :func:`naive_quadratic_linear_attn` builds the [Tq, Tk] weight matrix q̃·k̃ᵀ, masks it and
  normalises by its row sums (quadratic in T: small inputs only);
- :func:`naive_recurrent_linear_attn` walks the keys one at a time, carrying the state (S, z),
  exactly as decoding does.

Nothing here is fast and nothing imports the fast paths.
"""

from __future__ import annotations

import torch

from .feature_maps import apply_feature_map


def _compute_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _features(q, k, *, feature_map, scale, key_mask, dtype):
    """φ(scale·q) and φ(k) in ``dtype``, with padded keys' features set to zero."""
    q_feat = apply_feature_map(q.to(dtype) * scale, feature_map)
    k_feat = apply_feature_map(k.to(dtype), feature_map)
    if key_mask is not None:  # [B, Tk] bool, True = keep
        k_feat = k_feat * key_mask[:, None, :, None].to(dtype)
    return q_feat, k_feat


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv·groups, T, D]; query head h reads kv head h // groups."""
    return x.repeat_interleave(groups, dim=1)


def naive_quadratic_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "elu",
    scale: float = 1.0,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked quadratic form of linear attention.

    Args:
        q: [B, Hq, Tq, Dk]; k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv], Hq a multiple of Hkv.
        causal: key j is seen by query i only when j ≤ i (needs Tq == Tk).
        key_mask: optional bool [B, Tk], True where the key is real (padding is False).
        initial_state: optional (S0 [B, Hkv, Dk, Dv], z0 [B, Hkv, Dk]) seen by every query.
        compute_dtype: precision of every step (default float32; float64 inputs stay float64).

    Returns:
        out [B, Hq, Tq, Dv], S [B, Hkv, Dk, Dv], z [B, Hkv, Dk], all in the compute dtype;
        (S, z) is the state after every valid key.
    """
    dtype = _compute_dtype(q, compute_dtype)
    groups = q.shape[1] // k.shape[1]
    q_feat, k_feat = _features(q, k, feature_map=feature_map, scale=scale, key_mask=key_mask, dtype=dtype)
    v = v.to(dtype)
    weights = q_feat @ _repeat_kv(k_feat, groups).transpose(-1, -2)  # [B, Hq, Tq, Tk]
    if causal:
        tq, tk = weights.shape[-2:]
        weights = weights.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(), 0.0)
    numerator = weights @ _repeat_kv(v, groups)  # [B, Hq, Tq, Dv]
    denominator = weights.sum(-1)  # [B, Hq, Tq]
    state = k_feat.transpose(-1, -2) @ v  # [B, Hkv, Dk, Dv]
    normaliser = k_feat.sum(-2)  # [B, Hkv, Dk]
    if initial_state is not None:
        s0, z0 = (t.to(dtype) for t in initial_state)
        numerator = numerator + q_feat @ _repeat_kv(s0, groups)
        denominator = denominator + (q_feat * _repeat_kv(z0[:, :, None, :], groups)).sum(-1)
        state, normaliser = state + s0, normaliser + z0
    out = numerator / (denominator + eps)[..., None]
    return out, state, normaliser


def naive_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "elu",
    scale: float = 1.0,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recurrent form: carry (S, z) over the keys one at a time. Same arguments and results as
    :func:`naive_quadratic_linear_attn`; causal queries read the state right after their own key,
    bidirectional queries the state after the last key."""
    dtype = _compute_dtype(q, compute_dtype)
    batch, kv_heads, tk, dk = k.shape
    groups = q.shape[1] // kv_heads
    q_feat, k_feat = _features(q, k, feature_map=feature_map, scale=scale, key_mask=key_mask, dtype=dtype)
    v = v.to(dtype)
    if initial_state is not None:
        state, normaliser = (t.to(dtype).clone() for t in initial_state)
    else:
        state = q.new_zeros(batch, kv_heads, dk, v.shape[-1], dtype=dtype)
        normaliser = q.new_zeros(batch, kv_heads, dk, dtype=dtype)

    def read(i: int) -> torch.Tensor:  # output of query i against the current state: [B, Hq, Dv]
        qi = q_feat[:, :, i]  # [B, Hq, Dk]
        num = (qi[..., None] * _repeat_kv(state, groups)).sum(-2)
        den = (qi * _repeat_kv(normaliser, groups)).sum(-1)
        return num / (den + eps)[..., None]

    outs = []
    for j in range(tk):
        state = state + k_feat[:, :, j, :, None] * v[:, :, j, None, :]
        normaliser = normaliser + k_feat[:, :, j]
        if causal:
            outs.append(read(j))
    if not causal:
        outs = [read(i) for i in range(q.shape[2])]
    if not outs:  # no queries
        return q.new_zeros(batch, q.shape[1], 0, v.shape[-1], dtype=dtype), state, normaliser
    return torch.stack(outs, dim=2), state, normaliser
