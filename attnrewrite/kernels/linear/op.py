"""The Triton path of linear attention as ``torch.library`` ops, with fake implementations and autograd.

Ops (namespace ``attnrewrite``):

- ``linear_attn_fwd(q, k, v, key_mask, cu_seqlens, initial_S, initial_z, causal, feature_map, scale,
  eps, num_splits) -> (out, inv_den, final_S, final_z, seg_S, seg_z)`` — forward, autograd
  registered (gradients for q, k, v and the initial state; the final state's gradient flows back);
- ``linear_attn_bwd(...)`` — its backward, itself an op so compiled graphs keep it whole;
- ``linear_attn_decode(q, k, v, S, z, feature_map, scale, eps) -> (out, S, z)`` — recurrent decode,
  inference only (the public API sends decoding that needs gradients through ``linear_attn_fwd``).

Each is made by :func:`attnrewrite.kernels._ops.triton_ops`: on CUDA a ``torch.library.triton_op``,
so torch.compile and inductor see the kernel launches inside it; ``triton_op`` cannot run through
torch.compile on the CPU, so each op has a twin, ``<name>_interpreted``, a plain custom op launching
the same kernels under TRITON_INTERPRET=1 (the CPU path of ``impl="triton"``, used for testing).  Inputs are validated by the public API
(:mod:`.api`), not here; ``key_mask`` is int8 [B, Tk] (1 = real key), ``cu_seqlens`` int32 [N+1].

``inv_den`` (1/normaliser per query, fp32) and the per-segment start states ``seg_S``/``seg_z``
(causal; empty along the split axis when bidirectional) are outputs only so that the backward can
use them; they carry no gradient.
"""

from typing import Optional

import torch
from torch import Tensor

from attnrewrite.kernels._ops import triton_ops

from .feature_maps import FEATURE_MAP_IDS

FwdOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
BwdOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _num_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
         initial_S: Optional[Tensor], initial_z: Optional[Tensor], causal: bool, feature_map: str, scale: float,
         eps: float, num_splits: int) -> FwdOut:
    kw = dict(feature_map_id=FEATURE_MAP_IDS[feature_map], scale=scale, eps=eps, num_splits=num_splits,
              key_mask=key_mask, cu_seqlens=cu_seqlens, initial_S=initial_S, initial_z=initial_z)
    if causal:
        from .chunk_fwd import chunk_linear_attn_fwd

        return chunk_linear_attn_fwd(q, k, v, **kw)
    from .bidirectional import bidirectional_linear_attn_fwd

    out, inv_den, S, z = bidirectional_linear_attn_fwd(q, k, v, **kw)
    n, h, dk, dv = S.shape
    return out, inv_den, S, z, S.new_empty(n, h, 0, dk, dv), z.new_empty(n, h, 0, dk)


def _bwd(grad_out: Tensor, grad_S: Optional[Tensor], grad_z: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
         out: Tensor, inv_den: Tensor, final_S: Tensor, final_z: Tensor, seg_S: Tensor, seg_z: Tensor,
         key_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], causal: bool, feature_map: str, scale: float,
         has_initial: bool, num_splits: int) -> BwdOut:
    kw = dict(feature_map_id=FEATURE_MAP_IDS[feature_map], scale=scale, d_final_S=grad_S, d_final_z=grad_z,
              key_mask=key_mask, cu_seqlens=cu_seqlens)
    if causal:
        from .chunk_bwd import chunk_linear_attn_bwd

        return chunk_linear_attn_bwd(grad_out, q, k, v, out, inv_den, seg_S, seg_z,
                                     has_start=has_initial or num_splits > 1, **kw)
    from .bidirectional import bidirectional_linear_attn_bwd

    return bidirectional_linear_attn_bwd(grad_out, q, k, v, out, inv_den, final_S, final_z, num_splits=num_splits, **kw)


def _decode(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, feature_map: str, scale: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from .fused_recurrent import fused_recurrent_linear_attn

    return fused_recurrent_linear_attn(q, k, v, S, z, feature_map_id=FEATURE_MAP_IDS[feature_map], scale=scale, eps=eps)


# --------------------------------------------------------------------------- fake (shape-only) versions


def _fwd_fake(q, k, v, key_mask, cu_seqlens, initial_S, initial_z, causal, feature_map, scale, eps, num_splits) -> FwdOut:
    n, h, dk, dv = _num_seqs(q, cu_seqlens), k.shape[1], q.shape[-1], v.shape[-1]
    splits = num_splits if causal else 0
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(*q.shape[:-1], dv), q.new_empty(q.shape[:-1], **f32), q.new_empty(n, h, dk, dv, **f32),
            q.new_empty(n, h, dk, **f32), q.new_empty(n, h, splits, dk, dv, **f32), q.new_empty(n, h, splits, dk, **f32))


def _bwd_fake(grad_out, grad_S, grad_z, q, k, v, out, inv_den, final_S, final_z, seg_S, seg_z, key_mask, cu_seqlens,
              causal, feature_map, scale, has_initial, num_splits) -> BwdOut:
    return (torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(final_S), torch.empty_like(final_z))


def _decode_fake(q, k, v, S, z, feature_map, scale, eps) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty_like(S), torch.empty_like(z)


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, cu_seqlens, initial_S, initial_z, causal, feature_map, scale, eps, num_splits = inputs
    out, inv_den, final_S, final_z, seg_S, seg_z = output
    ctx.save_for_backward(q, k, v, out, inv_den, final_S, final_z, seg_S, seg_z, key_mask, cu_seqlens)
    ctx.options = (causal, feature_map, scale, initial_S is not None, num_splits)


def _autograd(ctx, grad_out, _grad_inv_den, grad_S, grad_z, _grad_seg_S, _grad_seg_z):
    q, k, v, out, inv_den, final_S, final_z, seg_S, seg_z, key_mask, cu_seqlens = ctx.saved_tensors
    causal, feature_map, scale, has_initial, num_splits = ctx.options
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    dq, dk, dv, d_initial_S, d_initial_z = BWD.on(q.device)(
        grad_out, grad_S, grad_z, q, k, v, out, inv_den, final_S, final_z, seg_S, seg_z, key_mask, cu_seqlens,
        causal, feature_map, scale, has_initial, num_splits)
    if not has_initial:
        d_initial_S = d_initial_z = None
    return dq, dk, dv, None, None, d_initial_S, d_initial_z, None, None, None, None, None


# --------------------------------------------------------------------------- registration

# schemas are inferred from the annotations of the implementations
BWD = triton_ops("linear_attn_bwd", _bwd, fake=_bwd_fake)
FWD = triton_ops("linear_attn_fwd", _fwd, fake=_fwd_fake, backward=_autograd, setup_context=_setup_context)
DECODE = triton_ops("linear_attn_decode", _decode, fake=_decode_fake)


def ops_for(device: torch.device):
    """(fwd, bwd, decode) ops for tensors on ``device``: the triton_op versions on CUDA, the
    interpreter twins elsewhere (the caller checks that TRITON_INTERPRET=1)."""
    return FWD.on(device), BWD.on(device), DECODE.on(device)
