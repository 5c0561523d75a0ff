"""torch.library registration of the Triton path of summary attention.

Two operators, each made by :func:`attnrewrite.kernels._ops.triton_ops` in two forms with one schema:

- ``attnrewrite::summary_attention_fwd`` / ``attnrewrite::summary_attention_bwd`` for CUDA tensors
  (``triton_op`` s: inductor traces into them and sees the kernel launches);
- ``..._fwd_interpreted`` / ``..._bwd_interpreted``, plain custom ops launching the same kernels on
  CPU tensors under ``TRITON_INTERPRET=1`` (for tests).

The forward computes the chunk summaries with the torch code of
:func:`~attnrewrite.kernels.summary.chunked.chunk_summaries` (mean or learned pooling), then runs the
block-sparse kernel over them and the window; it returns the output and the per-row log-sum-exp the
backward needs.  The backward recomputes the summaries, runs the dQ kernel and the dK/dV kernel over
the raw keys and over the summaries, and sends the summaries' gradients back through the pooling
(:func:`~attnrewrite.kernels.summary.chunked.chunk_summaries_backward`), which also gives the learned
pooling queries their gradient.  Configurations come from :mod:`attnrewrite.kernels.tuning`.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels import triton_scaffold as scaffold
from attnrewrite.kernels._ops import traceable, triton_ops
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import spaces
from .chunked import chunk_summaries, chunk_summaries_backward
from .packed import Packing, packed_chunk_summaries, packed_chunk_summaries_backward, packing
from .triton_bwd import summary_bwd
from .triton_fwd import summary_fwd, summary_fwd_kernel

Tensor = torch.Tensor


def interpreter_active() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (so they run on CPU tensors)."""
    return scaffold.interpreter_active(summary_fwd_kernel)


def launch_config(kernel: str, q: Tensor, v: Tensor, chunk_size: int, window_chunks: int, causal: bool,
                  make_bench) -> dict:
    """The configuration of ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv") for this call, fitted to its shape."""
    return scaffold.launch_config(spaces, kernel, q, v, spaces.shape_of(q, v, chunk_size, window_chunks, causal),
                                  make_bench)


_unit_last_stride = scaffold.unit_last_stride


def _summaries(k: Tensor, v: Tensor, key_valid: Tensor | None, summary_query: Tensor | None, chunk_size: int,
               pack: Packing | None):
    """(k̄, v̄ contiguous, exists) of one sequence per batch row, or of every packed sequence (``pack``)."""
    if pack is None:
        k_sum, v_sum, exists = chunk_summaries(k, v, key_valid, chunk_size, summary_query)
    else:
        k_sum, v_sum, exists = packed_chunk_summaries(k, v, pack, chunk_size, summary_query)
    return k_sum.contiguous(), v_sum.contiguous(), exists


def _packing(q: Tensor, cu_seqlens: Tensor | None, chunk_size: int) -> Packing | None:
    return None if cu_seqlens is None else packing(cu_seqlens, q.shape[2], chunk_size)


def _forward(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, summary_query: Tensor | None, scale: float,
             causal: bool, chunk_size: int, window_chunks: int, score_mod: str = "",
             cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, T, Dv], lse float32 [B, Hq, T]) of summary attention on checked inputs; ``key_valid``
    bool [B, T] or None, ``summary_query`` [Hkv, D] (learned pooling) or None (mean), ``score_mod`` a score
    modification program as text ("" for none), applied to every score; ``cu_seqlens`` [N+1] the starts of
    packed sequences (B = 1, no ``key_valid``) or None."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    pack = _packing(q, cu_seqlens, chunk_size)
    k_sum, v_sum, exists = _summaries(k, v, key_valid, summary_query, chunk_size, pack)
    args = (q, k, v, k_sum, v_sum, exists, key_valid, scale, causal, chunk_size, window_chunks)
    program = parse_score_mod(score_mod)
    config = launch_config("fwd", q, v, chunk_size, window_chunks, causal,
                           lambda cfg: lambda: summary_fwd(*args, config=cfg, program=program, pack=pack))
    return summary_fwd(*args, config=config, launch=traceable, program=program, pack=pack)


def _forward_fake(q, k, v, key_valid, summary_query, scale, causal, chunk_size, window_chunks, score_mod="",
                  cu_seqlens=None):
    return (q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3]),
            q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, key_valid: Tensor | None,
              summary_query: Tensor | None, scale: float, causal: bool, chunk_size: int,
              window_chunks: int, score_mod: str = "",
              cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_summary_query) — the last empty without a summary query."""
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    pack = _packing(q, cu_seqlens, chunk_size)
    k_sum, v_sum, exists = _summaries(k, v, key_valid, summary_query, chunk_size, pack)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    args = (q, k, v, k_sum, v_sum, exists, key_valid, grad_out, lse.contiguous(), delta, scale, causal, chunk_size,
            window_chunks)
    program = parse_score_mod(score_mod)
    config_dq = launch_config("bwd_dq", q, v, chunk_size, window_chunks, causal,
                              lambda cfg: lambda: summary_bwd(*args, cfg, cfg, kernels=("dq",), program=program,
                                                                  pack=pack))
    config_dkdv = launch_config("bwd_dkdv", q, v, chunk_size, window_chunks, causal,
                                lambda cfg: lambda: summary_bwd(*args, cfg, cfg, kernels=("dkdv",), program=program,
                                                                    pack=pack))
    dq, dk, dv, dk_sum, dv_sum = summary_bwd(*args, config_dq, config_dkdv, launch=traceable, program=program,
                                             pack=pack)
    if pack is None:
        dk_through, dv_through, d_query = chunk_summaries_backward(dk_sum, dv_sum, k, v, key_valid, chunk_size,
                                                                   summary_query)
    else:
        dk_through, dv_through, d_query = packed_chunk_summaries_backward(dk_sum, dv_sum, k, v, pack, chunk_size,
                                                                          summary_query)
    dk = (dk + dk_through).to(k.dtype)
    dv = (dv + dv_through).to(v.dtype)
    d_query = q.new_empty(0) if d_query is None else d_query.to(summary_query.dtype).contiguous()
    return dq, dk, dv, d_query


def _backward_fake(q, k, v, out, lse, grad_out, key_valid, summary_query, scale, causal, chunk_size, window_chunks,
                   score_mod="", cu_seqlens=None):
    # the real op's layouts: dq like q (with a unit last stride), the rest freshly computed (contiguous)
    d_query = q.new_empty(0) if summary_query is None else summary_query.new_empty(summary_query.shape)
    return torch.empty_like(_unit_last_stride(q)), k.new_empty(k.shape), v.new_empty(v.shape), d_query


def _setup_context(ctx, inputs, output):
    q, k, v, key_valid, summary_query, scale, causal, chunk_size, window_chunks, score_mod, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_valid, summary_query, cu_seqlens)
    ctx.options = (scale, causal, chunk_size, window_chunks, score_mod)


def _autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_valid, summary_query, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, d_query = BWD.on(q.device)(q, k, v, out, lse, grad_out, key_valid, summary_query, *ctx.options,
                                           cu_seqlens)
    return dq, dk, dv, None, (d_query if summary_query is not None else None), None, None, None, None, None, None


BWD = triton_ops("summary_attention_bwd", _backward, fake=_backward_fake)
FWD = triton_ops("summary_attention_fwd", _forward, fake=_forward_fake, backward=_autograd,
                 setup_context=_setup_context)


def summary_attention_triton(q, k, v, key_valid, summary_query, scale: float, causal: bool, chunk_size: int,
                             window_chunks: int, program=None, cu_seqlens=None) -> Tensor:
    """The output of the forward op for the tensors' device; differentiable in q, k, v and ``summary_query``.
    ``program``: a :class:`~attnrewrite.kernels.score_mods.ScoreProgram` (every score) or None;
    ``cu_seqlens``: the starts [N+1] of packed sequences (checked; B = 1, ``key_valid`` None) or None."""
    out, _lse = FWD.on(q.device)(q, k, v, key_valid, summary_query, float(scale), bool(causal), int(chunk_size),
                                 int(window_chunks), "" if program is None else program.text(), cu_seqlens)
    return out
