"""The kernel-level entry points of the linear kind: SDPA's signature plus the kind's options.

:func:`linear_attention_dispatch` checks the input and dispatches to a path (the Triton kernels or the
chunked torch path); :func:`linear_attention_decode` continues a sequence token by token from the
state a causal prefill returned.  Not to be confused with :func:`attnrewrite.ops.linear_attention`,
the public operator with SDPA's signature, which calls the dispatcher: the dispatcher also takes the
options an operator schema cannot carry (``kv_lens``, packed ``cu_seqlens``, ``initial_state``,
``output_final_state``, ``impl``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from attnrewrite.kernels._ops import resolve_impl
from attnrewrite.kernels.checks import check_dropout, check_kv_lens, check_qkv, key_padding_mask

from .chunk_torch import chunk_linear_attn_torch, recurrent_step_torch
from .feature_maps import apply_feature_map, check_feature_map

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256  # the chunk kernels keep a [Dk, BLOCK_V] fp32 state in registers
WHAT = "linear attention"


class LinearState(NamedTuple):
    """The recurrent state of causal linear attention after a prefix, per kv head.

    S: fp32 [B, Hkv, Dk, Dv] = Σ φ(k_j)ᵀ v_j;  z: fp32 [B, Hkv, Dk] = Σ φ(k_j)  (float64 when the
    torch path runs on float64 inputs).  With packed sequences B is the number of sequences.
    """

    S: Tensor
    z: Tensor


# --------------------------------------------------------------------------- validation


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _key_mask_from_attn_mask(attn_mask: Tensor, batch: int, tk: int, device: torch.device) -> Tensor:
    """bool [B, Tk] (True = keep) from a key-padding mask broadcastable from [B, 1, 1, Tk]."""
    mask = key_padding_mask(attn_mask, batch, tk, WHAT)
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not _is_compiling():
            dropped = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min)
            if not bool((keep | dropped).all()):
                raise ValueError(f"{WHAT}: an additive attn_mask must hold only 0 (keep) and -inf (drop): a linear "
                                 "kind cannot honour an additive bias on the attention scores")
    return keep.to(device).expand(batch, tk)


def _key_mask_from_lens(kv_lens: Tensor, batch: int, tk: int, device: torch.device) -> Tensor:
    check_kv_lens(kv_lens, batch, WHAT)
    return torch.arange(tk, device=device)[None, :] < kv_lens.to(device)[:, None]


def _check_cu_seqlens(cu_seqlens: Tensor, q: Tensor, k: Tensor) -> Tensor:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{WHAT}: cu_seqlens must be an int32 (or int64) tensor [N+1] of sequence starts")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, sequences are packed along T: batch must be 1, got {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError("with cu_seqlens, queries and keys must be the same packed tokens (Tq == Tk)")
    if not _is_compiling():
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != q.shape[2] or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[2]}, got {bounds}")
    return cu_seqlens.to(device=q.device, dtype=torch.int32)


def _check_state(state, num_seqs: int, heads_kv: int, dk: int, dv: int, device: torch.device, what: str):
    if not isinstance(state, (tuple, list)) or len(state) != 2 or not all(isinstance(t, Tensor) for t in state):
        raise TypeError(f"{what} must be a LinearState(S, z) (or a pair of tensors)")
    S, z = state
    if tuple(S.shape) != (num_seqs, heads_kv, dk, dv) or tuple(z.shape) != (num_seqs, heads_kv, dk):
        raise ValueError(f"{what} must be S [{num_seqs}, {heads_kv}, {dk}, {dv}] and z [{num_seqs}, {heads_kv}, {dk}] "
                         f"(per kv head), got {tuple(S.shape)} and {tuple(z.shape)}")
    if S.device != device or z.device != device:
        raise ValueError(f"{what} must be on {device}, got {S.device} and {z.device}")
    if S.dtype not in (torch.float32, torch.float64) or z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{what} must be float32 (float64 only on the torch path), got {S.dtype}, {z.dtype}")
    if z.dtype != S.dtype:
        raise ValueError(f"{what}: S and z must share a dtype, got {S.dtype}, {z.dtype}")
    return LinearState(S, z)


def _resolve_impl(impl: str, q: Tensor, head_dims: tuple[int, int]) -> str:
    """"triton" or "torch" for these inputs; raises when "triton" cannot run them."""
    # the kernels are defined when first used, so the variable decides whether they are interpreted
    return resolve_impl(impl, q.device, what=WHAT, dtype=q.dtype, head_dims=head_dims,
                        triton_dtypes=TRITON_DTYPES, max_head_dim=TRITON_MAX_HEAD_DIM,
                        interpreter_active=lambda: os.environ.get("TRITON_INTERPRET") == "1")


def _unit_stride(x: Tensor) -> Tensor:
    """The kernels take any strides but a unit one on the head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bottom_right(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, initial_state: LinearState | None,
                  feature_map: str) -> tuple[Tensor, Tensor, Tensor | None, LinearState]:
    """Causal with Tq < Tk: the queries are the last Tq positions (a decoding step, or a chunk of
    prefill, against a KV cache; flash-attention's bottom-right alignment).  The first Tk − Tq keys are
    seen by every query, so they fold into the initial state (S0 + Σ φ(k_j)ᵀ v_j, z0 + Σ φ(k_j), in
    the compute dtype, differentiable) and the rest is ordinary causal attention with Tq == Tk.

    Returns (k, v, key_mask, initial_state) for the last Tq keys.
    """
    prefix = k.shape[2] - q.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # contiguous before φ: see chunk_torch._features (fake and real elu_backward strides differ otherwise)
    k_feat = apply_feature_map(k[:, :, :prefix].to(dtype).contiguous(), feature_map)
    if key_mask is not None:  # φ(0) ≠ 0 for elu: padded keys are zeroed after φ, as in the paths
        k_feat = k_feat * key_mask[:, None, :prefix, None].to(dtype)
    S = k_feat.transpose(-1, -2) @ v[:, :, :prefix].to(dtype)
    z = k_feat.sum(dim=2)
    if initial_state is not None:
        S, z = S + initial_state.S.to(dtype), z + initial_state.z.to(dtype)
    rest = None if key_mask is None else key_mask[:, prefix:]
    return k[:, :, prefix:], v[:, :, prefix:], rest, LinearState(S, z)


def _num_splits(q: Tensor, num_seqs: int, dv: int) -> int:
    from .triton_common import default_num_splits

    return default_num_splits(q.device, num_seqs * q.shape[1] * max(1, -(-dv // 64)))


# --------------------------------------------------------------------------- public functions


def linear_attention_dispatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    feature_map: str = "elu",
    eps: float = 1e-6,
    kv_lens: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: LinearState | tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, LinearState]:
    """Linear attention (Katharopoulos et al., 2020) with the signature of ``F.scaled_dot_product_attention``.

    Per head, with φ the feature map, q̃_i = φ(scale·q_i) and k̃_j = φ(k_j)::

        out_i = q̃_i·S_i / (q̃_i·z_i + eps),   S_i = S0 + Σ_j k̃_jᵀ v_j,   z_i = z0 + Σ_j k̃_j

    where j runs over the valid keys with j ≤ i when ``is_causal``, over all valid keys otherwise,
    and (S0, z0) is ``initial_state`` (zero by default).  Cost is O(T·D²) time and memory linear in T.

    Args:
        q: [B, Hq, Tq, Dk]; k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv]; float16, bfloat16 or float32
            (float64 on the torch path).  Hq must be a multiple of Hkv and, when they differ,
            ``enable_gqa=True`` (as in SDPA); K/V are never repeated.  Causal needs Tq ≤ Tk; with
            Tq < Tk the queries are the last Tq positions (bottom-right, as flash-attention aligns a
            step against a KV cache): query i sees keys j ≤ i + Tk − Tq.
        attn_mask: only a key-padding mask is accepted: bool (True = keep) or additive (0 keep,
            -inf drop), broadcastable from [B, 1, 1, Tk].  Padded keys contribute nothing; every
            query still gets an output.  Any other mask raises ValueError: a linear kind cannot
            honour it.  It may be combined with ``is_causal=True`` (unlike SDPA).
        dropout_p: must be 0 (there are no attention probabilities to drop).
        is_causal: query i sees keys j ≤ i (+ Tk − Tq when there are fewer queries than keys).
        scale: multiplies q before φ.  None means 1.0 — unlike SDPA, no 1/sqrt(D): with elu+1
            features a 1/sqrt(D) scale pulls every φ(q)·φ(k) towards the same value and flattens
            the attention weights; models that want a scale pass it explicitly.
        feature_map: ``"elu"`` (elu(x)+1), ``"relu"`` or ``"identity"``, fused into the kernels.
            Learned or random maps (favor, hedgehog) are applied to q and k in torch by the caller,
            which then passes ``"identity"`` (the normaliser then needs positive features).
        eps: added to the normaliser q̃·z.
        kv_lens: int [B]: keys j ≥ kv_lens[b] are padding (an alternative to ``attn_mask``).
        cu_seqlens: int32 [N+1] for N packed sequences in q/k/v of shape [1, H, total_T, D]
            (FlashAttention's varlen layout); each sequence attends only within itself.
        initial_state: a :class:`LinearState` (S0 fp32 [B or N, Hkv, Dk, Dv], z0 fp32 [B or N, Hkv, Dk])
            to continue from, e.g. the state a previous call returned; it receives a gradient.
        output_final_state: also return the state after all keys (causal: the state to continue
            decoding from; bidirectional: the state every query saw).  Gradients flow back through it.
        impl: ``"auto"`` (Triton kernels on CUDA, the chunked torch path elsewhere), ``"triton"``
            (the kernels; on the CPU only under TRITON_INTERPRET=1) or ``"torch"`` (chunked torch
            ops, memory linear in T, autograd).

    Returns:
        out [B, Hq, Tq, Dv] in q's dtype, or (out, LinearState) when ``output_final_state``.
        Gradients reach q, k, v and ``initial_state``.
    """
    feature_map = check_feature_map(feature_map)
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa)
    check_dropout(dropout_p, WHAT, supported=False)
    batch, heads_q, tq, dk = q.shape
    heads_kv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if is_causal and tq > tk:
        raise ValueError(f"is_causal needs at least as many keys as queries, got Tq={tq}, Tk={tk} (with fewer "
                         "queries, they are the last Tq positions)")
    if attn_mask is not None and kv_lens is not None:
        raise ValueError("pass either attn_mask or kv_lens, not both")
    key_mask = None
    if attn_mask is not None:
        key_mask = _key_mask_from_attn_mask(attn_mask, batch, tk, q.device)
    elif kv_lens is not None:
        key_mask = _key_mask_from_lens(kv_lens, batch, tk, q.device)
    num_seqs = batch
    if cu_seqlens is not None:
        if key_mask is not None:
            raise ValueError("packed sequences (cu_seqlens) have no padding: attn_mask / kv_lens must be None")
        cu_seqlens = _check_cu_seqlens(cu_seqlens, q, k)
        num_seqs = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        initial_state = _check_state(initial_state, num_seqs, heads_kv, dk, dv, q.device, "initial_state")
    scale = 1.0 if scale is None else float(scale)
    if is_causal and tq < tk:  # (cu_seqlens needs Tq == Tk: checked above)
        k, v, key_mask, initial_state = _bottom_right(q, k, v, key_mask, initial_state, feature_map)

    if _resolve_impl(impl, q, (dk, dv)) == "torch":
        out, S, z = chunk_linear_attn_torch(q, k, v, causal=is_causal, feature_map=feature_map, scale=scale,
                                            eps=eps, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                            initial_state=initial_state, final_state=output_final_state)
    else:
        from .op import ops_for

        fwd = ops_for(q.device)[0]
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        init_S = init_z = None
        if initial_state is not None:
            init_S, init_z = (t.to(torch.float32).contiguous() for t in initial_state)
        mask_i8 = None if key_mask is None else key_mask.to(torch.int8).contiguous()
        out, _, S, z, _, _ = fwd(q, k, v, mask_i8, cu_seqlens, init_S, init_z, bool(is_causal), feature_map, scale,
                                 float(eps), _num_splits(q, num_seqs, dv))
    return (out, LinearState(S, z)) if output_final_state else out


def linear_attention_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: LinearState | tuple[Tensor, Tensor],
    *,
    feature_map: str = "elu",
    scale: float | None = None,
    eps: float = 1e-6,
    impl: str = "auto",
) -> tuple[Tensor, LinearState]:
    """Continue causal linear attention from ``state`` with T new tokens (usually T = 1).

    Same semantics as ``linear_attention_dispatch(q, k, v, is_causal=True, initial_state=state,
    output_final_state=True)``: each new token's key joins the state before its query reads it.
    One token costs O(Dk·Dv) per head whatever the length of the prefix.

    Args:
        q: [B, Hq, T, Dk]; k: [B, Hkv, T, Dk]; v: [B, Hkv, T, Dv] (Hq a multiple of Hkv).
        state: :class:`LinearState` with S fp32 [B, Hkv, Dk, Dv] and z fp32 [B, Hkv, Dk], e.g. from
            a causal ``linear_attention_dispatch(..., output_final_state=True)`` prefill.  Not modified.
        feature_map, scale, eps, impl: as in :func:`linear_attention_dispatch` (use the prefill's values).

    Returns:
        out [B, Hq, T, Dv] in q's dtype and the new :class:`LinearState`.  When gradients are
        needed the call runs through the differentiable chunked op instead of the decode kernel.
    """
    feature_map = check_feature_map(feature_map)
    check_qkv(q, k, v, WHAT, enable_gqa=True)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"decode takes as many new queries as new keys, got {q.shape[2]} and {k.shape[2]}")
    batch, heads_q, _, dk = q.shape
    heads_kv, dv = k.shape[1], v.shape[-1]
    state = _check_state(state, batch, heads_kv, dk, dv, q.device, "state")
    scale = 1.0 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *state))
    use = _resolve_impl(impl, q, (dk, dv))
    if needs_grad and use == "triton":
        out, new_state = linear_attention_dispatch(q, k, v, is_causal=True, scale=scale, enable_gqa=True,
                                                   feature_map=feature_map, eps=eps, initial_state=state,
                                                   output_final_state=True, impl=impl)
        return out, new_state
    if use == "torch":
        out, S, z = recurrent_step_torch(q, k, v, state.S, state.z, feature_map=feature_map, scale=scale, eps=eps)
        return out, LinearState(S, z)
    from .op import ops_for

    q, k, v = (_unit_stride(x) for x in (q, k, v))
    S, z = state.S.to(torch.float32).contiguous(), state.z.to(torch.float32).contiguous()
    if q.is_cuda and type(q) is Tensor and not _is_compiling():
        # plain eager tensors: launch directly; the custom-op dispatch would cost more than the
        # kernel itself (a decode step is a few microseconds of GPU time)
        from .feature_maps import FEATURE_MAP_IDS
        from .fused_recurrent import fused_recurrent_linear_attn
        from .triton_common import direct_launches

        with direct_launches():
            out, S, z = fused_recurrent_linear_attn(q, k, v, S, z, feature_map_id=FEATURE_MAP_IDS[feature_map],
                                                    scale=scale, eps=float(eps))
        return out, LinearState(S, z)
    out, S, z = ops_for(q.device)[2](q, k, v, S, z, feature_map, scale, float(eps))
    return out, LinearState(S, z)
