"""torch.library registration of the Triton path of sliding-window attention.

Two operators, each made by :func:`attnrewrite.kernels._ops.triton_ops` in two forms (a ``triton_op``
for CUDA, which inductor traces into, and an ``_interpreted`` twin for CPU tensors under
``TRITON_INTERPRET=1``, for tests):

- ``attnrewrite::sliding_window_attention_fwd`` -> (out, lse), differentiable in q, k, v and a relative bias
  table R (``position="relative"``);
- ``attnrewrite::sliding_window_attention_bwd`` -> (dq, dk, dv, dr), from the saved out and lse (dr empty
  without R).

Kernel configurations come from :mod:`attnrewrite.kernels.tuning` (table, then autotuning on a GPU, then
the space's default, fitted to the shape by :func:`.spaces.fit`).
"""

from __future__ import annotations

import torch

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels import tuning
from attnrewrite.kernels._ops import traceable, triton_ops
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import spaces
from .triton_bwd import sliding_window_bwd
from .triton_fwd import sliding_window_fwd, sliding_window_fwd_kernel

Tensor = torch.Tensor


def interpreter_active() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (so they run on CPU tensors)."""
    return scaffold.interpreter_active(sliding_window_fwd_kernel)


def sliding_window_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kv_lens: Tensor | None,
                          scale: float, causal: bool, window: int, sinks: int, program=None, slopes=None,
                          position: str | None = None) -> Tensor:
    """Sliding-window attention on the kernels (arguments as for ``triton_fwd.sliding_window_fwd``; ``program``
    a :class:`~attnrewrite.kernels.score_mods.ScoreProgram` or None; ``slopes`` float32 [Hq] and ``position``
    the position bias, or None; or ``position="relative"`` with ``slopes`` the table R float32 [Hq, Tq + Tk − 1]);
    differentiable in q, k, v and R (not in ALiBi slopes).  Returns out [B, Hq, Tq, Dv]."""
    out, _ = FWD.on(q.device)(q, k, v, mask, kv_lens, float(scale), bool(causal), int(window), int(sinks),
                              "" if program is None else program.text(), slopes, position or "")
    return out


def launch_config(kernel: str, q: Tensor, k: Tensor, v: Tensor, has_mask: bool, causal: bool, window: int,
                  sinks: int, make_bench, has_mod: bool = False) -> dict:
    """The configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for this call, fitted to its shape; with a
    score modification (``has_mod``) from its own bucket, starting from :data:`.spaces.MOD_DEFAULTS`."""
    shape = spaces.shape_of(q, k, v, has_mask, causal, window, sinks, has_mod)
    if not has_mod:
        return scaffold.launch_config(spaces, kernel, q, v, shape, make_bench)
    space = spaces.with_mod_default(spaces.SPACES[spaces.space_name(kernel, q.shape[-1], v.shape[-1])], kernel,
                                    spaces.head_class(q.shape[-1], v.shape[-1]))
    config = tuning.pick_config(spaces.KIND, space, shape, q.device, make_bench, tensors=(q,))
    return spaces.fit(space, config, shape)


_unit_last_stride = scaffold.unit_last_stride


def _extra_tile(extra: dict) -> bool:
    """Whether a call holds a tile beyond the plain kernels' — a score modification's derivative or a position
    bias's distances — and so starts from the modification defaults (:data:`.spaces.MOD_DEFAULTS`): at the
    plain d128 default the dK/dV kernel spills 456 B with ALiBi on sm_90, none at the modification default
    (bench/RESULTS.md)."""
    return extra["program"] is not None or extra["position"] is not None


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kv_lens: Tensor | None, scale: float,
             causal: bool, window: int, sinks: int, score_mod: str = "", slopes: Tensor | None = None,
             position: str = "") -> tuple[Tensor, Tensor]:
    """Sliding-window attention forward: (out, lse); see ``triton_fwd.sliding_window_fwd`` (``score_mod``: the
    score modification program as text, "" for none)."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    args = (q, k, v, mask, kv_lens, scale, causal, window, sinks)
    extra = dict(program=parse_score_mod(score_mod), slopes=slopes, position=position or None)
    config = launch_config("fwd", q, k, v, mask is not None, causal, window, sinks,
                           lambda cfg: lambda: sliding_window_fwd(*args, config=cfg, **extra), _extra_tile(extra))
    return sliding_window_fwd(*args, config=config, launch=traceable, **extra)


def _forward_fake(q, k, v, mask, kv_lens, scale, causal, window, sinks, score_mod="", slopes=None, position=""):
    return (q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3]),
            q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, mask: Tensor | None,
              kv_lens: Tensor | None, scale: float, causal: bool, window: int,
              sinks: int, score_mod: str = "", slopes: Tensor | None = None,
              position: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sliding-window attention backward: (dq, dk, dv, dr); dr (of a relative bias table) is empty unless
    ``position == "relative"``."""
    q, k, v, out, grad_out = (_unit_last_stride(t) for t in (q, k, v, out, grad_out))
    args = (q, k, v, out, lse, grad_out, mask, kv_lens, scale, causal, window, sinks)
    extra = dict(program=parse_score_mod(score_mod), slopes=slopes, position=position or None)
    has_mask, has_mod = mask is not None, _extra_tile(extra)
    config_dq = launch_config("bwd_dq", q, k, v, has_mask, causal, window, sinks,
                              lambda cfg: lambda: sliding_window_bwd(*args, cfg, cfg, kernels=("dq",), **extra),
                              has_mod)
    config_dkdv = launch_config("bwd_dkdv", q, k, v, has_mask, causal, window, sinks,
                                lambda cfg: lambda: sliding_window_bwd(*args, cfg, cfg, kernels=("dkdv",), **extra),
                                has_mod)
    return sliding_window_bwd(*args, config_dq, config_dkdv, launch=traceable, **extra)


def _backward_fake(q, k, v, out, lse, grad_out, mask, kv_lens, scale, causal, window, sinks, score_mod="", slopes=None,
                   position=""):
    dr_shape = (q.shape[1], q.shape[2] + k.shape[2] - 1) if position == "relative" else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(dr_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, kv_lens, scale, causal, window, sinks, score_mod, slopes, position = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, kv_lens, slopes)
    ctx.options = (scale, causal, window, sinks, score_mod)
    ctx.position = position


def _autograd(ctx, grad_out, grad_lse):
    # lse is an internal output (never returned by the public op): its gradient is not taken
    q, k, v, out, lse, mask, kv_lens, slopes = ctx.saved_tensors
    dq, dk, dv, dr = BWD.on(q.device)(q, k, v, out, lse, grad_out, mask, kv_lens, *ctx.options, slopes,
                                      ctx.position)
    # a relative bias table gets dR; ALiBi slopes get none (the public op refuses slopes that require one)
    dtable = dr.to(slopes.dtype) if ctx.position == "relative" and ctx.needs_input_grad[10] else None
    return dq, dk, dv, None, None, None, None, None, None, None, dtable, None


BWD = triton_ops("sliding_window_attention_bwd", _backward, fake=_backward_fake)
FWD = triton_ops("sliding_window_attention_fwd", _forward, fake=_forward_fake, backward=_autograd,
                 setup_context=_setup_context)
