"""``attnrewrite::hashed_attention``, the public hashed op: SDPA's signature, the kind's options and ``impl``.

Composite (``CompositeImplicitAutograd``) like the summary, sigmoid and sliding-window ops: the call
chooses the Triton kernels (:mod:`.triton_ops`) or the torch path (``attnrewrite::hashed_attention_torch``)
from the dtype it runs in, after SDPA's autocast rule, and a traced graph keeps the one it chose.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels._ops import call_dtype, composite_op, empty_output, resolve_impl, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.checks import RELATIVE, check_position_slopes
from attnrewrite.kernels.score_mods import parse as parse_score_mod
from attnrewrite.kernels.hashed import op as _op  # noqa: F401  (registers the ops)

try:  # the Triton path is optional: the torch path works wherever torch does
    from attnrewrite.kernels.hashed import triton_ops as _triton
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _triton = None

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def hashed_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
                     projections: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                     impl: str = "auto", score_mod: str | None = None, far_dtype: str | None = None,
                     position_slopes: torch.Tensor | None = None, position: str | None = None) -> torch.Tensor:
    """Hashed attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Each query attends (exact softmax of scale·q·k + bias) to its first ``sinks`` and last ``window``
    visible keys and to the ``top_k`` other visible keys whose binary codes agree best with its own;
    the query heads of a grouped-query group share one selection (agreement summed over the group).
    Semantics in full: :mod:`attnrewrite.kernels.hashed.reference`.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; fp16, bf16, fp32 or fp64.
        attn_mask: bool (True = may attend) or float (added to the scores; entries ≤ −9000 (MASKED_SCORE) exclude a
            key), broadcastable to [B, 1, Tq, Tk]: one mask for every head.
        dropout_p: must be 0.
        is_causal: key j ≤ query i (needs Tq == Tk).  A decoding query comes after every key: False.
        scale: score scale, default 1/√D.
        enable_gqa: allow Hq to be a multiple of Hkv.
        bits: code length, a multiple of 8.
        top_k, window, sinks: how many keys are chosen by their codes, how many recent ones and how
            many first ones are always kept.
        hash: ``"random"`` — Gaussian hyperplanes drawn from ``seed``, the same for queries and keys
            (no training) — or ``"learned"`` with ``projections=(P_q [Hq, D, bits], P_k [Hkv, D, bits])``.
        impl: ``"auto"`` runs the Triton kernels (:mod:`attnrewrite.kernels.hashed.triton_ops`) on CUDA
            for float16, bfloat16 and float32 (random and learned hashes) and the torch path otherwise;
            ``"triton"`` always runs the kernels (on the CPU only under ``TRITON_INTERPRET=1``) or
            raises, naming why; ``"torch"`` runs the torch path (``attnrewrite::hashed_attention_torch``).
            Both select the same keys.
        score_mod: a score modification program (:mod:`attnrewrite.kernels.score_mods`) applied to
            scale·q·k of the selected keys before the mask and the softmax (the selection reads codes,
            not scores).  Both paths apply it, forward and backward; the kernels take programs with at
            most one nonlinear step (tanh, sigmoid, exp, abs, relu, erf, square) between affine ones,
            and any other program runs on the torch path (``"auto"``) or is refused by ``"triton"``.
        far_dtype: None (off, the default) or ``"bfloat16"``, ``"float16"``, ``"float8_e4m3fn"`` (where torch
            has it): mixed precision after DASH-KV.  The selected keys and values that are neither sinks nor
            in the window (the far keys) are used as x.to(far_dtype).to(compute dtype), the compute dtype
            being float32 for 16-bit inputs (else the input's); sinks and window keep full precision.  The
            gradient passes straight through the rounding (identity).  The Triton kernels round
            ``"bfloat16"`` and ``"float16"`` in the kernel (the far flags come from a torch pass over the
            [B, Tq, Tk] visible keys); ``"float8_e4m3fn"`` runs on the torch path only (``"auto"`` takes it,
            ``"triton"`` raises).
        position_slopes, position: a position bias added to the selected keys' scores with the mask's bias,
            after the modification (the selection reads codes, not scores; the bias never excludes a key).
            ``position="relative"``: ``position_slopes`` is a table R [Hq or 1, Tq + Tk − 1] (T5's relative
            bias) and key j of query i gets R[h, j − i + Tq − 1], gathered per selected key (never a [Tq, Tk]
            tensor) on both paths, forward and backward (R gets its gradient, summed per distance; the Triton
            kernels add it with atomics).  ``position="j-i"`` or ``"|j-i|"``: ALiBi, ``position_slopes`` [Hq] or
            [1] (no gradient), read as the table slope_h · d.  The compiled CPU loop reads no table: such
            calls run on the torch path.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype.  Inside ``torch.autocast`` the floating-point inputs (float64
        excepted) are cast to the autocast dtype first and the output has it, as with SDPA.  Gradients reach q, the selected keys and their values (and the
        projections, by a straight-through estimate, when learned).
    """
    q_projection, k_projection = projections if projections is not None else (None, None)
    return torch.ops.attnrewrite.hashed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                  bits=bits, top_k=top_k, window=window, sinks=sinks, hash=hash,
                                                  q_projection=q_projection, k_projection=k_projection, seed=seed,
                                                  score_mod=score_mod, far_dtype=far_dtype, impl=impl,
                                                  position_slopes=position_slopes, position=position)


def relative_table(position_slopes, position, q, k) -> torch.Tensor | None:
    """The table R [Hq, Tq + Tk − 1] the paths read (float64 for float64 q, else float32; differentiable in a
    relative table), or None without a position bias: a relative table checked, ALiBi slopes written as
    slope_h · d over the distances d = j − i (or |j − i|) from −(Tq − 1) to Tk − 1."""
    table = check_position_slopes(position_slopes, position, q, q.shape[1], _op.WHAT, relative_ok=True)
    if table is None:
        return None
    length = q.shape[-2] + k.shape[-2] - 1
    if position == RELATIVE:
        if table.shape[-1] != length:
            raise ValueError(f"{_op.WHAT}: the relative bias table must hold Tq + Tk - 1 = {length} distances, got "
                             f"{table.shape[-1]}")
        return table
    distance = torch.arange(-(q.shape[-2] - 1), k.shape[-2], device=q.device, dtype=table.dtype)
    return table[:, None] * (distance.abs() if position == "|j-i|" else distance)


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, bits=64, top_k=256,
          window=64, sinks=4, hash="random", q_projection=None, k_projection=None, seed=0, score_mod=None,
          far_dtype=None, impl="auto", position_slopes=None, position=None):
    """The composite op's body (run with autocast off, the inputs in the dtype the call runs in)."""
    table = relative_table(position_slopes, position, q, k)
    if k.shape[-2] == 0:  # no keys: every query sees none and gets 0 (the selection has nothing to rank)
        _op.check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, bits, top_k, window, sinks, hash,
                         q_projection, k_projection)
        return empty_output(q, k, v, no_keys=True)
    if _path(impl, q, v, hash, score_mod, far_dtype) == "triton":
        return _run_triton(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits, top_k, window,
                           sinks, hash, seed, parse_score_mod(score_mod), far_dtype, q_projection, k_projection, table)
    return torch.ops.attnrewrite.hashed_attention_torch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                        bits=bits, top_k=top_k, window=window, sinks=sinks,
                                                        hash=hash, q_projection=q_projection,
                                                        k_projection=k_projection, seed=seed, score_mod=score_mod,
                                                        far_dtype=far_dtype, relative=table)[0]


def _path(impl: str, q, v, hash: str, score_mod: str | None = None, far_dtype: str | None = None) -> str:
    refusal = None
    parse_score_mod(score_mod)  # a bad program is refused by name on either path; every good one compiles in
    if far_dtype is not None:
        _op.far_dtype_of(far_dtype)  # a bad name is refused by name on either path
        if far_dtype not in _op.TRITON_FAR_DTYPES:
            refusal = (f"the Triton kernels round far keys through {_op.TRITON_FAR_DTYPES} only, "
                       f"not far_dtype={far_dtype!r}")
    return resolve_impl(
        impl, q.device, what=_op.WHAT, dtype=call_dtype(q), head_dims=(q.shape[-1], v.shape[-1]),
        triton_dtypes=_TRITON_DTYPES,
        refusal=refusal,
        available=_triton is not None, interpreter_active=lambda: _triton.interpreter_active())


def _run_triton(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits, top_k, window, sinks, hash, seed,
                program=None, far_dtype=None, q_projection=None, k_projection=None, table=None):
    _op.check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, bits, top_k, window, sinks, hash,
                     q_projection, k_projection)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if hash == "learned":  # float64 as the torch path projects; the cast passes the projections' gradient on
        proj_q, proj_k = (p.to(q.device, torch.float64) for p in (q_projection, k_projection))
    else:
        proj_q = proj_k = torch.ops.attnrewrite.hashed_hyperplanes(q.shape[-1], bits, seed, q.device)
    mask = None if attn_mask is None else attn_mask.to(q.device)
    return _triton.hashed_attention_triton(q, k, v, mask, proj_q, proj_k, is_causal, scale, top_k, window,
                                           sinks, program, far_dtype, table)


composite_op("hashed_attention", sdpa_schema('SymInt bits=64, SymInt top_k=256, SymInt window=64, SymInt sinks=4, '
                                             'str hash="random", Tensor? q_projection=None, '
                                             'Tensor? k_projection=None, SymInt seed=0, str? score_mod=None, '
                                             'str? far_dtype=None, str impl="auto", Tensor? position_slopes=None, '
                                             'str? position=None'), _impl)
sdpa_autocast("hashed_attention")  # q/k in fp32 beside a bf16 v run in bf16, as SDPA does
