"""torch.library registration of the Triton path of hashed attention.

Two operators, each made by :func:`attnrewrite.kernels._ops.triton_ops` in two forms (a ``triton_op``
for CUDA, ``<name>_interpreted`` for CPU tensors under ``TRITON_INTERPRET=1``):

- ``attnrewrite::hashed_attention_fwd`` — codes (:mod:`.triton_codes`), selection
  (:mod:`.triton_select`) and attention over the selected keys (:mod:`.triton_attn`); returns
  (out, log-sum-exp, selection), the last two saved for the backward;
- ``attnrewrite::hashed_attention_bwd`` — dQ, dK, dV over the saved selection, and with learned hashes the
  projections' straight-through gradients (those of :func:`attnrewrite.kernels.hashed.sparse.hashed_attention_backward`:
  the kernel gives the soft codes' gradients, torch takes them through tanh and the projections).

The projections come in as float64 tensors (:func:`attnrewrite.kernels.hashed.codes.projections`),
so the random hyperplanes are drawn outside the traced operator; learned projections [H, D, bits] come in as
the model's parameters cast to float64, and their gradient flows back through that cast.  Kernel configurations come from
:mod:`.spaces` (a device's table, else the defaults).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels._ops import traceable, triton_ops
from attnrewrite.kernels.checks import MASKED_SCORE
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import spaces
from .codes import project
from .op import far_dtype_of
from .sparse import far_slots, work_dtype
from .triton_attn import attend_backward, attend_forward
from .triton_codes import hashed_codes_kernel, pack_codes
from .triton_select import select_keys



def interpreter_active() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (so they run on CPU tensors)."""
    return scaffold.interpreter_active(hashed_codes_kernel)


def mask_views(attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(keep uint8 [B|1, Tq|1, Tk|1] or None, additive bias [B|1, Tq|1, Tk|1] or None) of a mask
    broadcastable to [B, 1, Tq, Tk]: a bool mask keeps its True entries; a float one keeps the entries
    above MASKED_SCORE (−9000) and adds them (the excluded ones become 0 in the bias)."""
    if attn_mask is None:
        return None, None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))[:, 0]
    if mask.dtype == torch.bool:
        return mask.to(torch.uint8), None
    keep = mask > MASKED_SCORE
    return keep.to(torch.uint8), mask.masked_fill(~keep, 0.0)


_unit_last_stride = scaffold.unit_last_stride


def _slots(k: Tensor, top_k: int, window: int, sinks: int):
    return min(k.shape[2], sinks + window + top_k)


def far_flags(index: Tensor, attn_mask: Optional[Tensor], is_causal: bool, len_k: int, sinks: int, window: int,
              far_dtype: str) -> Optional[Tensor]:
    """uint8 [B, Hkv, Tq, S]: 1 at the selection's far slots (neither sink nor window,
    :func:`.sparse.far_slots`), or None when ``far_dtype`` is "" (off).  Computed in torch from the row's
    visible keys ([B|1, Tq, Tk] booleans: memory the size of a dense mask)."""
    if not far_dtype:
        return None
    rows = slice(0, index.shape[2])
    return far_slots(index.long(), attn_mask, rows, is_causal, index.shape[2], len_k, sinks, window).to(torch.uint8)


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], proj_q: Tensor, proj_k: Tensor,
             is_causal: bool, scale: float, top_k: int, window: int, sinks: int,
             score_mod: str = "", far_dtype: str = "",
             relative: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, Hq, Tq, Dv], lse float32 [B, Hq, Tq], selection int32 [B, Hkv, Tq, S]) on checked inputs;
    ``score_mod`` a score modification program as text ("" for none), applied to the selected keys' scores
    (the selection reads codes, not scores); ``far_dtype`` a name from ``FAR_DTYPES`` or "" (off): the far keys
    and values rounded through it (reference step 5); ``relative`` a relative bias table R float32
    [Hq, Tq + Tk − 1] added to the selected keys' scores by distance, or None."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    shape = spaces.shape_of(q, k, v, proj_q.shape[-1])

    def config(kernel):
        return spaces.config_for(kernel, shape, q.device, tensors=(q,))

    keep, bias = mask_views(attn_mask)
    q_codes = pack_codes(q, proj_q, config("codes"), launch=traceable)
    k_codes = pack_codes(k, proj_k, config("codes"), launch=traceable)
    index = select_keys(q_codes, k_codes, keep, is_causal, top_k, window, sinks, config("select"), launch=traceable)
    far = far_flags(index, attn_mask, is_causal, k.shape[2], sinks, window, far_dtype)
    out, lse = attend_forward(q, k, v, index, bias, scale, config("fwd"), launch=traceable,
                              program=parse_score_mod(score_mod), far=far, far_dtype=far_dtype_of(far_dtype or None),
                              relative=relative)
    return out, lse, index


def _forward_fake(q, k, v, attn_mask, proj_q, proj_k, is_causal, scale, top_k, window, sinks, score_mod="",
                  far_dtype="", relative=None):
    batch, heads_q, len_q, _ = q.shape
    return (q.new_empty(batch, heads_q, len_q, v.shape[-1]), q.new_empty(batch, heads_q, len_q, dtype=torch.float32),
            q.new_empty(batch, k.shape[1], len_q, _slots(k, top_k, window, sinks), dtype=torch.int32))


def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, index: Tensor,
              attn_mask: Optional[Tensor], scale: float, score_mod: str = "", far_dtype: str = "",
              is_causal: bool = False, window: int = 0, sinks: int = 0, proj_q: Optional[Tensor] = None,
              proj_k: Optional[Tensor] = None,
              relative: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_proj_q, d_proj_k, d_relative) of :func:`_forward` over its saved selection and log-sum-exp
    (``is_causal``, ``window`` and ``sinks`` as the forward's: they place the far slots when ``far_dtype`` is
    set).  ``proj_q``/``proj_k``: the learned projections (float64 [H, D, bits]) whose straight-through
    gradients are wanted, or None (then d_proj_q and d_proj_k are empty).  ``relative``: the forward's table R,
    or None (then d_relative is empty)."""
    q, k, v, out, grad = (_unit_last_stride(t) for t in (q, k, v, out, grad))
    _, bias = mask_views(attn_mask)
    config = spaces.config_for("bwd", spaces.shape_of(q, k, v, 8), q.device, tensors=(q,))
    far = far_flags(index, attn_mask, is_causal, k.shape[2], sinks, window, far_dtype)
    soft = None
    if proj_q is not None:  # the soft codes of the straight-through estimate, in the torch path's work dtype
        dtype = work_dtype(q.dtype)
        soft = (torch.tanh(project(q, proj_q).to(dtype)), torch.tanh(project(k, proj_k).to(dtype)))
    grads = attend_backward(q, k, v, out, grad, lse, index, bias, scale, config, launch=traceable,
                            program=parse_score_mod(score_mod), far=far, far_dtype=far_dtype_of(far_dtype or None),
                            soft=soft, relative=relative)
    d_rel = grads[-1] if relative is not None else q.new_empty(0)
    grads = grads[:-1] if relative is not None else grads
    if soft is None:
        return (*grads, q.new_empty(0), q.new_empty(0), d_rel)
    dq, dk, dv, d_soft_q, d_soft_k = grads
    d_projections = []
    for x, s, d_s, projection in ((q, soft[0], d_soft_q, proj_q), (k, soft[1], d_soft_k, proj_k)):
        d_pre = d_s.to(s.dtype) * (1 - s.square())                                   # through tanh
        d_projections.append(torch.einsum("bhtd,bhtn->hdn", x.to(s.dtype), d_pre).to(projection.dtype).contiguous())
    return dq, dk, dv, *d_projections, d_rel


def _backward_fake(grad, q, k, v, out, lse, index, attn_mask, scale, score_mod="", far_dtype="", is_causal=False,
                   window=0, sinks=0, proj_q=None, proj_k=None, relative=None):
    d_proj = (q.new_empty(0), q.new_empty(0)) if proj_q is None else (proj_q.new_empty(proj_q.shape),
                                                                      proj_k.new_empty(proj_k.shape))
    d_rel = q.new_empty(0) if relative is None else relative.new_empty(relative.shape)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format), *d_proj, d_rel


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, proj_q, proj_k, causal, scale, _top_k, window, sinks, score_mod, far_dtype, relative = inputs
    out, lse, index = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, index, proj_q, proj_k, relative)
    ctx.scale, ctx.score_mod, ctx.far = scale, score_mod, (far_dtype, causal, window, sinks)


def _autograd(ctx, grad_out, _grad_lse, _grad_index):
    q, k, v, attn_mask, out, lse, index, proj_q, proj_k, relative = ctx.saved_tensors
    learned = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]  # learned projections that want a gradient
    dq, dk, dv, d_pq, d_pk, d_rel = BWD.on(q.device)(grad_out, q, k, v, out, lse, index, attn_mask, ctx.scale,
                                                     ctx.score_mod, *ctx.far, proj_q if learned else None,
                                                     proj_k if learned else None, relative)
    return (dq, dk, dv, None, d_pq if learned else None, d_pk if learned else None, None, None, None, None, None,
            None, None, d_rel if relative is not None else None)


BWD = triton_ops("hashed_attention_bwd", _backward, fake=_backward_fake)
FWD = triton_ops("hashed_attention_fwd", _forward, fake=_forward_fake, backward=_autograd,
                 setup_context=_setup_context)


def hashed_attention_triton(q, k, v, attn_mask, proj_q, proj_k, is_causal: bool, scale: float, top_k: int,
                            window: int, sinks: int, program=None, far_dtype: str | None = None,
                            relative: Tensor | None = None) -> Tensor:
    """Hashed attention on the kernels, for the tensors' device; differentiable in q, k and v, and in
    ``proj_q``/``proj_k`` (float64, [D, bits] or [H, D, bits]) by the straight-through estimate when they
    require a gradient (learned hashes).  ``program``: a
    :class:`~attnrewrite.kernels.score_mods.ScoreProgram` applied to the selected keys' scores, or None;
    ``far_dtype``: None or a name from ``FAR_DTYPES`` (the far keys and values rounded through it);
    ``relative``: a relative bias table R [Hq, Tq + Tk − 1] (read in float32, differentiable), or None."""
    if relative is not None:
        relative = relative.to(torch.float32).contiguous()
    out, _, _ = FWD.on(q.device)(q, k, v, attn_mask, proj_q, proj_k, bool(is_causal), float(scale), int(top_k),
                                 int(window), int(sinks), "" if program is None else program.text(), far_dtype or "",
                                 relative)
    return out
