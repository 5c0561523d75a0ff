"""Chunked linear attention in plain torch: the CPU path (and ``impl="torch"`` anywhere).

Causal: the sequence is cut into chunks of C tokens; inside a chunk the masked quadratic form,
across chunks the running state, all chunks at once as batched matmuls (no Python loop over
chunks), so memory grows linearly in T (the largest intermediates are the per-chunk weights
[T·C] and the per-chunk states [T/C·Dk·Dv] per head) and autograd gives every gradient,
``initial_state`` included.  Bidirectional: one reduction φ(K)ᵀV per sequence, or, when the caller
does not want the state and the sequence is short for the features (hedgehog's 2·F ≫ Dv, T ≲ 2·Dv),
the quadratic form φ(Q)φ(K)ᵀV, which then takes fewer multiply-adds.

Everything is computed in float32 (float64 stays float64) whatever the input dtype; the output is
cast back to the input dtype and the state stays in the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .feature_maps import apply_feature_map

DEFAULT_CHUNK = 64


def _features(q, k, v, *, feature_map, scale, key_mask):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # φ's input is made contiguous (the copy the chunked reshapes below would make anyway): the
    # gradient reaching φ is contiguous, and with a transposed input (q/k as [B, T, H, D] views, as
    # every HF model passes them) PyTorch's fake aten.elu_backward takes the input's strides where the
    # real kernel takes the gradient's, so a compiled backward traced on fakes (aot_eager, inductor)
    # would view a contiguous gradient as a transposed one and fail.  (``.contiguous()``, not
    # ``.to(memory_format=...)``: traced, the latter is dropped when the dtype already matches.)
    q_feat = apply_feature_map(q.to(dtype).contiguous() * scale, feature_map)
    k_feat = apply_feature_map(k.to(dtype).contiguous(), feature_map)
    if key_mask is not None:  # padded keys must contribute nothing: φ(0) is 1 for elu, so zero after φ
        k_feat = k_feat * key_mask[:, None, :, None].to(dtype)
    return q_feat, k_feat, v.to(dtype)


def _group_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G·T, D]: the G query heads of one kv head stacked along rows,
    so one matmul against that kv head's keys serves the whole group without repeating K/V."""
    b, hq, t, d = x.shape
    return x.reshape(b, kv_heads, (hq // kv_heads) * t, d)


def _pairs_cheaper(rows, keys, dk, dv) -> bool:
    """Whether the quadratic form (weights φ(q)·φ(k)ᵀ of every query-key pair, then weights·v) takes fewer
    multiply-adds than the linear one (φ(k)ᵀv and Σφ(k), then φ(q)·S and φ(q)·z) for ``rows`` queries (per kv
    head) against ``keys`` keys: short sequences with many features (hedgehog's 2·F ≫ Dv), e.g. T ≤ 64 at
    Dk = 512, Dv = 32.  Only for concrete sizes: a traced graph with symbolic lengths keeps the linear form."""
    if not all(isinstance(n, int) for n in (rows, keys, dk, dv)):
        return False
    return rows * keys * (dk + dv + 1) <= keys * dk * dv + rows * dk * (dv + 1)


def _bidirectional(q_feat, k_feat, v, s0, z0, eps, final_state=True):
    """Bidirectional linear attention on features; without ``final_state`` (and no initial state) the
    quadratic form when it is cheaper (:func:`_pairs_cheaper`), which returns no state (None, None): the same
    sums in another order, equal up to float rounding."""
    b, hq, tq, _ = q_feat.shape
    kv_heads = k_feat.shape[1]
    if not final_state and s0 is None and _pairs_cheaper(hq // kv_heads * tq, k_feat.shape[2], k_feat.shape[-1],
                                                         v.shape[-1]):
        rows = _group_queries(q_feat, kv_heads)  # [B, Hkv, G·Tq, Dk]
        weights = rows @ k_feat.transpose(-1, -2)  # [B, Hkv, G·Tq, Tk]
        out = (weights @ v) / (weights.sum(-1, keepdim=True) + eps)
        return out.reshape(b, hq, tq, v.shape[-1]), None, None
    state = k_feat.transpose(-1, -2) @ v  # [B, Hkv, Dk, Dv]
    normaliser = k_feat.sum(-2)  # [B, Hkv, Dk]
    if s0 is not None:
        state, normaliser = state + s0, normaliser + z0
    rows = _group_queries(q_feat, kv_heads)  # [B, Hkv, G·Tq, Dk]
    out = (rows @ state) / ((rows @ normaliser[..., None]) + eps)
    return out.reshape(b, hq, tq, v.shape[-1]), state, normaliser


def pad_time(x: torch.Tensor, pad) -> torch.Tensor:
    """``x`` [B, H, T, ...] with ``pad`` zero steps appended along T.

    Written as a concatenation rather than ``F.pad``: under a fake-tensor mode with symbolic
    shapes (when a compiled graph is given example values) ``F.pad`` refuses a symbolic width.
    """
    return torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)


def _exclusive_prefix(x: torch.Tensor, start: torch.Tensor | None, reverse: bool = False) -> torch.Tensor:
    """out[:, :, c] = start + Σ x[:, :, c'] over c' < c (over c' > c when ``reverse``), along dim 2.

    Two levels of Python loops over blocks of √N chunks: on the CPU torch.cumsum along a middle dim
    is ~7× slower (it scans with a stride instead of vectorising over the trailing dims), and one
    loop step per chunk spends its time in op overhead.  Traced graphs get the cumsum instead.
    """
    if reverse:
        return _exclusive_prefix(x.flip(2), start).flip(2)
    if torch.compiler.is_compiling():
        out = F.pad(x.cumsum(2), (0, 0) * (x.dim() - 3) + (1, 0))[:, :, :-1]
        return out if start is None else out + start.unsqueeze(2)
    n = x.shape[2]
    block = max(1, math.isqrt(n))
    pad = (-n) % block
    blocks = pad_time(x, pad) if pad else x
    blocks = blocks.reshape(*x.shape[:2], -1, block, *x.shape[3:])  # [B, H, N/b, b, ...]
    inner = torch.empty_like(blocks)
    running = torch.zeros_like(blocks[:, :, :, 0])
    for c in range(block):  # exclusive prefix inside every block at once
        inner[:, :, :, c] = running
        running += blocks[:, :, :, c]
    offset = torch.zeros_like(running[:, :, 0]) if start is None else start.to(x.dtype).clone()
    for c in range(blocks.shape[2]):  # running is now each block's total
        inner[:, :, c] += offset.unsqueeze(2)
        offset += running[:, :, c]
    return inner.reshape(*x.shape[:2], -1, *x.shape[3:])[:, :, :n]


class _ChunkedCausal(torch.autograd.Function):
    """Causal linear attention on features, chunk by chunk, with a hand-written backward.

    Inputs are already feature-mapped: q̃ [B, Hkv, N, G·C, Dk] (the G query heads of each kv head
    stacked per chunk), k̃ [B, Hkv, N, C, Dk], and v₁ = [v | 1] [B, Hkv, N, C, Dv+1]; autograd
    handles φ, the scale and the padding mask around it.  The ones column carries the normaliser
    through the same matmuls as the values (k̃ᵀv₁ = [S | z], weights·v₁ = [num | den]), and the
    hand-written backward (the kernels' formulas) uses one masked pair matrix for dq̃ and dk̃ and
    makes no full-size temporaries for the division: together about 2× faster than autograd on
    the CPU.

    Second-order gradients: a backward run with ``create_graph=True`` recomputes the forward with
    autograd and differentiates that (:meth:`_backward_by_autograd`), so double backward is exact;
    the hand-written formulas serve first-order gradients only.
    """

    @staticmethod
    def _forward(q, k, v1, s0, eps: float):
        """(out, state, weights, state_before, inv_den, mask) from differentiable torch ops."""
        chunk, rows = k.shape[3], q.shape[3]
        mask = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril().repeat(rows // chunk, 1)
        chunk_state = k.transpose(-1, -2) @ v1  # [B, Hkv, N, Dk, Dv+1] = [Σk̃ᵀv | Σk̃]
        state_before = _exclusive_prefix(chunk_state, s0)
        weights = (q @ k.transpose(-1, -2)).mul_(mask)  # [B, Hkv, N, G·C, C]
        num = weights @ v1
        num += q @ state_before  # [B, Hkv, N, G·C, Dv+1]: [numerator | denominator - eps]
        inv_den = 1.0 / (num[..., -1] + eps)
        out = num[..., :-1] * inv_den.unsqueeze(-1)
        state = state_before[:, :, -1] + chunk_state[:, :, -1]
        return out, state, weights, state_before, inv_den, mask

    @staticmethod
    def forward(ctx, q, k, v1, s0, eps: float):
        out, state, weights, state_before, inv_den, mask = _ChunkedCausal._forward(q, k, v1, s0, eps)
        ctx.save_for_backward(q, k, v1, s0, weights, state_before, inv_den, out, mask)
        ctx.has_s0 = s0 is not None
        ctx.eps = eps
        return out, state

    @staticmethod
    def _backward_by_autograd(ctx, d_out, d_state):
        """The gradients as a differentiable graph of q, k, v1, s0 and the incoming gradients: the
        saved intermediates carry no history (they were made inside ``forward``), so the forward is
        run again under autograd and differentiated with ``create_graph``."""
        q, k, v1, s0 = ctx.saved_tensors[:4]
        inputs = [q, k, v1] + ([s0] if ctx.has_s0 else [])
        # a saved input that needs no gradient still has to be a graph leaf for autograd.grad
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        with torch.enable_grad():
            out, state = _ChunkedCausal._forward(*leaves[:3], leaves[3] if ctx.has_s0 else None, ctx.eps)[:2]
            outputs, grads = [out], [d_out]
            if d_state is not None:
                outputs.append(state)
                grads.append(d_state)
            found = torch.autograd.grad(outputs, leaves, grads, create_graph=True, allow_unused=True)
        dq, dk, dv1 = found[:3]
        return dq, dk, dv1, (found[3] if ctx.has_s0 else None), None

    @staticmethod
    def backward(ctx, d_out, d_state):
        # computed in the inputs' dtype (float32/float64) as the forward is: a compiled backward is
        # traced under the forward's autocast state, which would run these matmuls in bfloat16
        # (the device is read from a gradient: saved tensors may be unpacked only once under
        # activation checkpointing, and _backward unpacks them)
        device = (d_out if d_out is not None else d_state).device.type
        with torch.autocast(device, enabled=False):
            return _ChunkedCausal._backward(ctx, d_out, d_state)

    @staticmethod
    def _backward(ctx, d_out, d_state):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            return _ChunkedCausal._backward_by_autograd(ctx, d_out, d_state)
        q, k, v1, _s0, weights, state_before, inv_den, out, mask = ctx.saved_tensors
        g = d_out * inv_den.unsqueeze(-1)  # dO / den
        gamma = -(g * out).sum(-1, keepdim=True)  # what the normaliser takes back, per row
        g1 = torch.cat([g, gamma], dim=-1)  # gradient of [num | den]
        pair = (g1 @ v1.transpose(-1, -2)).mul_(mask)  # (g·vᵀ + γ) on seen pairs: [B, Hkv, N, G·C, C]
        dq = pair @ k
        dq += g1 @ state_before.transpose(-1, -2)
        dk = pair.transpose(-1, -2) @ q
        dv1 = weights.transpose(-1, -2) @ g1
        # gradient reaching the state after chunk c: every later chunk's queries, plus the final state's
        d_state_before = q.transpose(-1, -2) @ g1  # [B, Hkv, N, Dk, Dv+1]
        d_final = torch.zeros_like(state_before[:, :, 0]) if d_state is None else d_state
        d_chunk_state = _exclusive_prefix(d_state_before, d_final, reverse=True)
        dk += v1 @ d_chunk_state.transpose(-1, -2)
        dv1 += k @ d_chunk_state
        d_s0 = d_chunk_state[:, :, 0] + d_state_before[:, :, 0] if ctx.has_s0 else None
        return dq, dk, dv1, d_s0, None


def _causal(q_feat, k_feat, v, s0, z0, eps, chunk):
    b, hq, t, dk = q_feat.shape
    kv_heads, dv = k_feat.shape[1], v.shape[-1]
    groups = hq // kv_heads
    if t == 0:  # an empty packed sequence: nothing to read, the state passes through
        state = v.new_zeros(b, kv_heads, dk, dv) if s0 is None else s0
        norm = v.new_zeros(b, kv_heads, dk) if z0 is None else z0
        return v.new_zeros(b, hq, 0, dv), state, norm
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:  # zero features past the end: they add nothing to any state or weight
        q_feat, k_feat, v = (pad_time(x, pad) for x in (q_feat, k_feat, v))
    n = (t + pad) // chunk
    # [B, Hkv, N, G·C, Dk]: row g·C + i is query head g of the group at position i of the chunk
    q_chunks = q_feat.reshape(b, kv_heads, groups, n, chunk, dk).transpose(2, 3).reshape(b, kv_heads, n, groups * chunk, dk)
    k_chunks = k_feat.reshape(b, kv_heads, n, chunk, dk)
    v_chunks = v.reshape(b, kv_heads, n, chunk, dv)
    v1 = torch.cat([v_chunks, torch.ones_like(v_chunks[..., :1])], dim=-1)
    s1 = None
    if s0 is not None:
        s1 = torch.cat([s0, z0.unsqueeze(-1)], dim=-1)
    out, state1 = _ChunkedCausal.apply(q_chunks, k_chunks, v1, s1, float(eps))
    state, norm = state1[..., :-1], state1[..., -1]
    out = out.reshape(b, kv_heads, n, groups, chunk, dv).transpose(2, 3).reshape(b, hq, n * chunk, dv)
    return out[:, :, :t], state, norm


def _dense(q, k, v, *, causal, feature_map, scale, eps, key_mask, initial_state, chunk, final_state=True):
    q_feat, k_feat, v_c = _features(q, k, v, feature_map=feature_map, scale=scale, key_mask=key_mask)
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (x.to(q_feat.dtype) for x in initial_state)
    if causal:
        out, state, normaliser = _causal(q_feat, k_feat, v_c, s0, z0, eps, chunk)
    else:
        out, state, normaliser = _bidirectional(q_feat, k_feat, v_c, s0, z0, eps, final_state)
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
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention with torch ops only (inputs already validated by the public API).

    Args:
        q: [B, Hq, Tq, Dk]; k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv]; or, with ``cu_seqlens``
            (int [N+1]), the packed layout [1, H, total_T, D] holding N sequences.
        key_mask: optional bool [B, Tk], True for real keys.
        initial_state: optional (S0 [B or N, Hkv, Dk, Dv], z0 [B or N, Hkv, Dk]).
        final_state: False when the caller does not read S and z: bidirectional attention without
            ``initial_state`` or ``cu_seqlens`` may then take the quadratic form where it is cheaper
            (short sequences, many features) and return None for both.

    Returns:
        out [B, Hq, Tq, Dv] in q's dtype, final S [B or N, Hkv, Dk, Dv] and z [B or N, Hkv, Dk]
        in float32 (float64 for float64 inputs).
    """
    kwargs = dict(causal=causal, feature_map=feature_map, scale=scale, eps=eps, chunk=chunk_size)
    if cu_seqlens is None:
        return _dense(q, k, v, key_mask=key_mask, initial_state=initial_state, final_state=final_state, **kwargs)
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
