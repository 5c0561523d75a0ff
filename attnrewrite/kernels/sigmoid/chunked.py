"""The torch path: sigmoid attention in query chunks, with a backward that recomputes the weights.

Memory stays O(chunk x Tk) per head instead of O(Tq x Tk): the forward saves only its
inputs, and the backward recomputes P = sigmoid(S) chunk by chunk (sigmoid needs no
row statistics, so nothing else has to be kept).  Scores and weights are computed in
float32 (float64 for float64 inputs, so the path can be gradchecked).  Grouped-query heads are folded into the rows of each
chunk, so K/V are never repeated.  Dropout is applied to the weights, as SDPA does; its
random mask is regenerated in the backward from a per-chunk seed.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels._ops import kernel_op

# Elements of one [B, Hq, chunk, Tk] float32 temporary (64 MiB); the backward holds a few.
CHUNK_ELEMENTS = 1 << 24


def chunk_sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive_mask: torch.Tensor | None,
    bias: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    scale: float,
    causal: int,
    dropout_p: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sigmoid attention on validated inputs (see ``sigmoid_attention_dispatch`` for the semantics).

    Args:
        q, k, v: [B, Hq, Tq, D], [B, Hkv, Tk, D], [B, Hkv, Tk, Dv] (B = 1 when packed).
        additive_mask: float mask broadcastable to [B, Hq, Tq, Tk] (4-d), -inf excludes a key; or None.
        bias: float32 [Z, Hq], the b of each sequence and head (Z = B, or N when packed), or [Z|1, Hq, Tq]
            one b per query row (Tq = total_q when packed).
        kv_lens: int [B] valid key counts, or None.
        cu_seqlens_q, cu_seqlens_k: int32 [N+1] for packed sequences, or None.
        scale: the score scale.
        causal: 0 none, 1 top-left (j <= i), 2 bottom-right (j <= i + n_k - Tq).
        dropout_p: probability of dropping each weight.
        chunk_size: query rows per chunk (default: as many as fit CHUNK_ELEMENTS).
    Returns:
        [B, Hq, Tq, Dv] in q's dtype.
    """
    if cu_seqlens_q is not None:  # packed sequences: eager only (the bounds are read on the host)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for s in range(len(bounds_q) - 1):
            q0, q1, k0, k1 = bounds_q[s], bounds_q[s + 1], bounds_k[s], bounds_k[s + 1]
            # a per-row bias [1, Hq, total_q] is sliced to the sequence's rows; a per-sequence one to its row
            seq_bias = bias[:, :, q0:q1] if bias.dim() == 3 else bias[s:s + 1]
            outs.append(_sigmoid_chunked(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], None, seq_bias,
                                         None, scale, causal, dropout_p, chunk_size))
        return torch.cat(outs, dim=2)
    return _sigmoid_chunked(q, k, v, additive_mask, bias, kv_lens, scale, causal, dropout_p, chunk_size)


def _sigmoid_chunked(q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, chunk_size):
    # The seed of the dropout masks is a tensor drawn here, so that a traced graph draws a new one
    # each call, and the backward regenerates the same masks from it.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.attnrewrite.sigmoid_chunked_fwd(q, k, v, mask, bias, kv_lens, float(scale), int(causal),
                                                     float(dropout_p), seed, int(chunk_size or 0))


# The chunked path as opaque ops with fake implementations: tracing (torch.compile, the rewriter's
# example values) never runs the Python loop over query chunks, so the sequence length stays
# symbolic under dynamic shapes instead of being specialised to the example's.


def _chunked_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor,
                 kv_lens: torch.Tensor | None, scale: float, causal: int, dropout_p: float,
                 seed: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    batch, heads_q, len_q, _ = q.shape
    dim_v = v.shape[3]
    chunk = _chunk_rows(q, k, chunk_size)
    seed_value = int(seed) if seed is not None else 0
    geometry = _Geometry(q, k, mask, bias, kv_lens, scale, causal)
    v32 = v.to(geometry.dtype)
    out = torch.empty(batch, heads_q, len_q, dim_v, dtype=q.dtype, device=q.device)
    for index, start in enumerate(range(0, len_q, chunk)):
        stop = min(start + chunk, len_q)
        weights = geometry.weights(q, start, stop)  # [B, Hkv, G*C, Tk]
        if dropout_p > 0:
            weights = weights * _keep_scale(weights, dropout_p, seed_value, index)
        out[:, :, start:stop] = (weights @ v32).view(batch, heads_q, stop - start, dim_v).to(q.dtype)
    return out


def _chunked_fwd_fake(q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


def _chunked_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor, kv_lens: torch.Tensor | None, scale: float,
                 causal: int, dropout_p: float, seed: torch.Tensor | None, chunk_size: int,
                 want_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask); dmask is empty unless ``want_mask``."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    chunk = _chunk_rows(q, k, chunk_size)
    seed_value = int(seed) if seed is not None else 0
    geometry = _Geometry(q, k, mask, bias, kv_lens, scale, causal)
    k32, v32 = geometry.k32, v.to(geometry.dtype)
    dtype = geometry.dtype
    dq = torch.empty(batch, heads_q, len_q, dim, dtype=dtype, device=q.device)
    dk = torch.zeros(batch, heads_kv, len_k, dim, dtype=dtype, device=q.device)
    dv = torch.zeros(batch, heads_kv, len_k, dim_v, dtype=dtype, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=dtype, device=q.device) if want_mask else None
    for index, start in enumerate(range(0, len_q, chunk)):
        stop = min(start + chunk, len_q)
        rows = stop - start
        weights = geometry.weights(q, start, stop)  # P, [B, Hkv, G*C, Tk]
        grad_rows = geometry.fold(grad_out[:, :, start:stop].to(dtype))  # [B, Hkv, G*C, Dv]
        grad_weights = grad_rows @ v32.transpose(-1, -2)  # dP
        kept = weights
        if dropout_p > 0:
            keep = _keep_scale(weights, dropout_p, seed_value, index)
            kept, grad_weights = weights * keep, grad_weights * keep
        dv += kept.transpose(-1, -2) @ grad_rows
        grad_scores = weights * (1.0 - weights) * grad_weights  # dS = P(1-P) dP
        dq[:, :, start:stop] = (grad_scores @ k32).view(batch, heads_q, rows, dim)
        dk += grad_scores.transpose(-1, -2) @ geometry.fold(q[:, :, start:stop].to(dtype))
        if want_mask:
            _accumulate_mask_grad(dmask, grad_scores.view(batch, heads_q, rows, len_k), start, stop)
    grad_mask = dmask.to(mask.dtype) if want_mask else q.new_empty(0)
    return (dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype), grad_mask


def _chunked_bwd_fake(grad_out, q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, want_mask):
    # contiguous, as _chunked_bwd allocates them: empty_like would copy a transposed q's strides, and
    # inductor, trusting the fake, would then read the real (contiguous) gradients wrongly
    grad_mask = mask.new_empty(mask.shape) if want_mask else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_mask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size = inputs
    ctx.save_for_backward(q, k, v, mask, bias, kv_lens, seed)
    ctx.args = (scale, causal, dropout_p, chunk_size)


def _autograd(ctx, grad_out):
    q, k, v, mask, bias, kv_lens, seed = ctx.saved_tensors
    scale, causal, dropout_p, chunk_size = ctx.args
    want_mask = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = torch.ops.attnrewrite.sigmoid_chunked_bwd(
        grad_out.contiguous(), q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, want_mask)
    return dq, dk, dv, (dmask if want_mask else None), None, None, None, None, None, None, None


kernel_op("sigmoid_chunked_fwd", _chunked_fwd, fake=_chunked_fwd_fake, backward=_autograd,
          setup_context=_setup_context)
kernel_op("sigmoid_chunked_bwd", _chunked_bwd, fake=_chunked_bwd_fake)


def _chunk_rows(q: torch.Tensor, k: torch.Tensor, chunk_size: int) -> int:
    """Query rows per chunk: ``chunk_size``, or as many as keep one temporary under CHUNK_ELEMENTS."""
    batch, heads_q, len_q = q.shape[:3]
    return chunk_size or max(1, min(len_q, CHUNK_ELEMENTS // max(1, batch * heads_q * k.shape[2])))


class _Geometry:
    """Everything needed to recompute the weights of a chunk of query rows."""

    def __init__(self, q, k, mask, bias, kv_lens, scale, causal):
        self.batch, self.heads_q, self.len_q, _ = q.shape
        self.heads_kv, self.len_k = k.shape[1], k.shape[2]
        self.group = self.heads_q // self.heads_kv
        self.dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.k32 = k.to(self.dtype)
        self.mask = mask
        # [Z, Hkv, G, 1, 1], or [Z, Hkv, G, Tq, 1] with one b per query row (sliced per chunk)
        rows = bias.shape[2] if bias.dim() == 3 else 1
        self.bias = bias.reshape(bias.shape[0], self.heads_kv, self.group, rows, 1)
        self.scale = scale
        self.causal = causal
        device = q.device
        self.key_index = torch.arange(self.len_k, device=device)
        n_keys = (torch.full((self.batch,), self.len_k, device=device) if kv_lens is None
                  else kv_lens.long().clamp(0, self.len_k))
        self.key_valid = (self.key_index < n_keys.view(-1, 1)).view(self.batch, 1, 1, 1, self.len_k)
        # causal: key j visible to row i iff j <= i + shift (shift = 0 top-left, n_k - Tq bottom-right)
        self.shift = (torch.zeros_like(n_keys) if causal == 1 else n_keys - self.len_q).view(-1, 1, 1, 1, 1)

    def fold(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, Hq, C, X] -> [B, Hkv, G*C, X]: the query heads of a group become rows of one matmul."""
        return rows.reshape(self.batch, self.heads_kv, -1, rows.shape[-1])

    def weights(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """P = sigmoid(S) for query rows start:stop, exactly 0 where a key is not visible. [B, Hkv, G*C, Tk]"""
        rows = stop - start
        scores = (self.fold(q[:, :, start:stop].to(self.dtype)) @ self.k32.transpose(-1, -2)) * self.scale
        bias = self.bias if self.bias.shape[3] == 1 else self.bias[:, :, :, start:stop]
        scores = scores.view(self.batch, self.heads_kv, self.group, rows, self.len_k) + bias
        if self.mask is not None:
            chunk_mask = self.mask[:, :, start:stop] if self.mask.shape[2] != 1 else self.mask
            chunk_mask = chunk_mask.expand(self.batch, self.heads_q, rows, self.len_k)
            scores = scores + chunk_mask.reshape(self.batch, self.heads_kv, self.group, rows, self.len_k)
        visible = self.key_valid
        if self.causal:
            query_index = torch.arange(start, stop, device=q.device).view(1, 1, 1, rows, 1)
            visible = visible & (self.key_index <= query_index + self.shift)
        weights = torch.where(visible, torch.sigmoid(scores), torch.zeros((), dtype=self.dtype, device=q.device))
        return weights.view(self.batch, self.heads_kv, self.group * rows, self.len_k)


def _keep_scale(weights: torch.Tensor, dropout_p: float, seed: int, index: int) -> torch.Tensor:
    """The dropout factor of one chunk (0 or 1/(1-p)), identical in forward and backward."""
    generator = torch.Generator(device=weights.device)
    generator.manual_seed(seed + index)
    keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
    return keep.to(weights.dtype) / (1.0 - dropout_p)


def _accumulate_mask_grad(dmask: torch.Tensor, grad_scores: torch.Tensor, start: int, stop: int) -> None:
    """Add dS of rows start:stop ([B, Hq, C, Tk]) into dmask, summing over dims the mask broadcasts."""
    reduce = [d for d in (0, 1, 3) if dmask.shape[d] == 1 and grad_scores.shape[d] != 1]
    if reduce:
        grad_scores = grad_scores.sum(dim=reduce, keepdim=True)
    if dmask.shape[2] == 1:
        dmask += grad_scores.sum(dim=2, keepdim=True)
    else:
        dmask[:, :, start:stop] += grad_scores
