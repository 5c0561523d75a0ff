"""torch.library registration of the Triton path of sigmoid attention.

Two operators, each made by :func:`attnrewrite.kernels._ops.triton_ops` in two forms with one schema:

- ``attnrewrite::sigmoid_attention_fwd`` / ``attnrewrite::sigmoid_attention_bwd`` for CUDA tensors,
  ``torch.library.triton_op`` s: under torch.compile, inductor traces into them and sees the
  kernels (``wrap_triton``) instead of an opaque call.
- ``attnrewrite::sigmoid_attention_fwd_interpreted`` / ``..._bwd_interpreted`` for CPU tensors,
  plain custom ops that launch the kernels under ``TRITON_INTERPRET=1`` (a ``triton_op`` cannot
  be compiled for the CPU).  They exist for tests.

Autograd is registered on both forward forms: the backward op returns dQ, dK, dV and, when the
float mask needs a gradient, the full score gradient dS, which is then summed over the mask's
broadcast dimensions; with a relative bias table R (``position="relative"``) also dR, summed along
the diagonals in the dQ kernel.  Kernel configurations come from :mod:`attnrewrite.kernels.tuning`
(table, then autotuning on a GPU, then the space's default); while a graph is being traced,
nothing can be timed, so only the table or default is used.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels import tuning
from attnrewrite.kernels._ops import traceable, triton_ops
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import spaces
from .triton_bwd import sigmoid_bwd
from .triton_fwd import sigmoid_fwd, sigmoid_fwd_kernel

Tensor = torch.Tensor


def interpreter_active() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (so they run on CPU tensors)."""
    return scaffold.interpreter_active(sigmoid_fwd_kernel)


def sigmoid_attention_triton(q, k, v, mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale: float, causal: int,
                             program=None, slopes=None, position: str | None = None):
    """Run the forward op for the tensors' device (arguments as for ``sigmoid_fwd``; ``program`` a
    :class:`~attnrewrite.kernels.score_mods.ScoreProgram` or None; ``slopes`` float32 [Hq] and ``position``
    the position bias, or None); differentiable in q, k, v, the mask and a relative bias table (``position=
    "relative"``, ``slopes`` float32 [Hq, Tq + Tk − 1]), not in ALiBi slopes."""
    return FWD.on(q.device)(q, k, v, mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, float(scale), int(causal),
                            "" if program is None else program.text(), slopes, position or "")


# --------------------------------------------------------------------------- configurations


def launch_config(kernel: str, q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: int, make_bench,
                  has_mod: bool = False) -> dict:
    """The configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for this call, fitted to its shape
    (:func:`attnrewrite.kernels.tuning.pick_config` over the space for these head dims)."""
    space = spaces.SPACES[spaces.space_name(kernel, q.shape[-1], v.shape[-1])]
    if has_mod:
        space = spaces.with_mod_default(space, kernel, spaces.head_class(q.shape[-1], v.shape[-1]))
    shape = spaces.shape_of(q, k, v, has_mask, causal, has_mod)
    config = tuning.pick_config(spaces.KIND, space, shape, q.device, make_bench, tensors=(q,))
    return spaces.fit(space, config, shape)


_unit_last_stride = scaffold.unit_last_stride


# --------------------------------------------------------------------------- the operators


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, bias: Tensor, kv_lens: Tensor | None,
             cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, scale: float, causal: int,
             score_mod: str = "", slopes: Tensor | None = None, position: str = "") -> Tensor:
    """Sigmoid attention forward; see ``triton_fwd.sigmoid_fwd`` for the arguments (``score_mod``: a score
    modification program as text, "" for none; ``slopes`` / ``position``: the position bias, "" for none)."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    args = (q, k, v, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale, causal)
    program = parse_score_mod(score_mod)
    extra = dict(program=program, slopes=slopes, position=position or None)
    config = launch_config("fwd", q, k, v, attn_mask is not None, causal,
                           lambda cfg: lambda: sigmoid_fwd(*args, config=cfg, **extra), program is not None)
    return sigmoid_fwd(*args, config=config, launch=traceable, **extra)


def _forward_fake(q, k, v, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale, causal, score_mod="",
                  slopes=None, position=""):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def _backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, attn_mask: Tensor | None, bias: Tensor,
              kv_lens: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, scale: float,
              causal: int, want_mask_grad: bool, score_mod: str = "", slopes: Tensor | None = None,
              position: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sigmoid attention backward: (dq, dk, dv, ds, dr); ds (the gradient of the scores the mask is added to)
    is empty unless ``want_mask_grad``, dr (of a relative bias table) unless ``position == "relative"``."""
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    args = (q, k, v, grad_out, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale, causal, want_mask_grad)
    program = parse_score_mod(score_mod)
    extra = dict(program=program, slopes=slopes, position=position or None)
    has_mask = attn_mask is not None
    config_dq = launch_config("bwd_dq", q, k, v, has_mask, causal,
                              lambda cfg: lambda: sigmoid_bwd(*args, cfg, cfg, kernels=("dq",), **extra),
                              program is not None)
    config_dkdv = launch_config("bwd_dkdv", q, k, v, has_mask, causal,
                                lambda cfg: lambda: sigmoid_bwd(*args, cfg, cfg, kernels=("dkdv",), **extra),
                                program is not None)
    return sigmoid_bwd(*args, config_dq, config_dkdv, launch=traceable, **extra)


def _backward_fake(q, k, v, grad_out, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale, causal,
                   want_mask_grad, score_mod="", slopes=None, position=""):
    ds_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if want_mask_grad else (0,)
    dr_shape = (q.shape[1], q.shape[2] + k.shape[2] - 1) if position == "relative" else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(ds_shape, dtype=torch.float32), q.new_empty(dr_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, scale, causal, score_mod, slopes, position = inputs
    ctx.save_for_backward(q, k, v, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, slopes)
    ctx.scale, ctx.causal, ctx.score_mod, ctx.position = scale, causal, score_mod, position


def _autograd(ctx, grad_out):
    q, k, v, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k, slopes = ctx.saved_tensors
    want_mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, ds, dr = BWD.on(q.device)(q, k, v, grad_out, attn_mask, bias, kv_lens, cu_seqlens_q, cu_seqlens_k,
                                      ctx.scale, ctx.causal, want_mask_grad, ctx.score_mod, slopes, ctx.position)
    dmask = _sum_to_shape(ds, attn_mask.shape).to(attn_mask.dtype) if want_mask_grad else None
    # a relative bias table gets dR; ALiBi slopes get no gradient (the dispatcher refuses slopes that require one)
    dtable = dr.to(slopes.dtype) if ctx.position == "relative" and ctx.needs_input_grad[11] else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, dtable, None


def _sum_to_shape(grad: Tensor, shape) -> Tensor:
    """Sum a [B, Hq, Tq, Tk] gradient over the dimensions a 4-d ``shape`` broadcasts."""
    dims = [d for d in range(4) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


BWD = triton_ops("sigmoid_attention_bwd", _backward, fake=_backward_fake)
FWD = triton_ops("sigmoid_attention_fwd", _forward, fake=_forward_fake, backward=_autograd,
                 setup_context=_setup_context)
