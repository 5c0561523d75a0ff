"""The scaffolding the Triton kernels of the summary, hashed and sliding-window kinds share, in one place.

Device side (``@triton.jit``, inlined into each kernel, so the compiled code is what the kernels wrote
out before):

- :func:`mma` (the product every kernel takes instead of ``tl.dot``, right under the interpreter in
  bfloat16), :func:`load_tile`, :data:`LOG2E` — the sigmoid kernels' own pieces, imported from
  :mod:`attnrewrite.kernels.sigmoid.triton_common` where they are defined;
- :func:`load_rows` — a [rows, cols] tile of a row-major head (rows at ``stride_row``, unit last stride),
  masked only on the bounds asked for;
- :func:`program_heads` — the (batch, query head, key/value head) of a program over ``batch · heads``,
  as int64 (offsets may pass 2³¹ elements);
- :func:`online_softmax_step` — one key block of the flash forward (running max, sum and output in
  log2 units); :func:`softmax_dq_step`, :func:`softmax_dkdv_step` — one block of its backward;
- :func:`group_program` / :func:`slot_rows` — the head group and the gathered rows of the hashed
  kernels' programs.

Host side: :func:`interpreter_active`, :func:`unit_last_stride`, and the configuration fitting every
kind's ``spaces.py`` does the same way (:func:`head_class`, :func:`length_bucket`, :func:`pow2`,
:func:`fit_config`, :func:`launch_config`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid.triton_common import (LOG2E, LOG2E_HOST, dot_precision, load_tile, mma,
                                                       padded_dim)

# --------------------------------------------------------------------------- device side


@triton.jit
def load_rows(base, offs_rows, stride_row, n_rows, offs_cols, n_cols, CHECK_ROWS: tl.constexpr,
              CHECK_COLS: tl.constexpr):
    """The tile ``base[offs_rows, offs_cols]`` of a head with rows ``stride_row`` apart (zeros outside the
    bounds checked: rows below ``n_rows``, columns below ``n_cols``)."""
    return load_tile(base + offs_rows[:, None] * stride_row + offs_cols[None, :], offs_rows, n_rows, offs_cols,
                     n_cols, CHECK_ROWS, CHECK_COLS)


@triton.jit
def program_heads(pid_zh, heads, GROUP: tl.constexpr):
    """(batch, head, head_kv), int64, of program ``pid_zh`` of a grid over ``batch · heads`` query heads,
    ``GROUP`` query heads per key/value head."""
    batch = (pid_zh // heads).to(tl.int64)
    head = pid_zh % heads
    head_kv = (head // GROUP).to(tl.int64)
    return batch, head.to(tl.int64), head_kv


@triton.jit
def online_softmax_step(acc, m_i, l_i, z2, v, DOT_PRECISION: tl.constexpr):
    """Fold one block of scores ``z2`` (log2 units, −inf where hidden) and its values ``v`` into the running
    row maximum ``m_i``, sum ``l_i`` and output ``acc``; a row that has seen no key yet stays at 0."""
    m_new = tl.maximum(m_i, tl.max(z2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(z2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def softmax_dq_step(dq, p, do, k, v, delta, DOT_PRECISION: tl.constexpr):
    """dQ += dS·K for one key block of a softmax backward: dS = P ⊙ (dO·Vᵀ − Δ), P [queries, keys] the
    probabilities (0 where hidden), Δ = rowsum(dO ⊙ O); the scale is applied by the caller."""
    dp = mma(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return mma(ds.to(k.dtype), k, dq, DOT_PRECISION)


@triton.jit
def softmax_dkdv_step(dk, dv, pt, q, do, v, delta, DOT_PRECISION: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q for one query block, on key-major tiles (``pt`` [keys, queries], so no
    accumulated operand is transposed); dSᵀ = Pᵀ ⊙ (V·dOᵀ − Δ)."""
    dv = mma(pt.to(do.dtype), do, dv, DOT_PRECISION)
    dpt = mma(v, tl.trans(do), None, DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = mma(dst.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def group_program(pid_bh, heads_kv, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A hashed program's group: (b int64, h, offs_g, g_ok, heads, offs_d, offs_dv, d_ok, dv_ok) — the
    ``G`` query heads ``heads`` of key/value head ``h`` in batch ``b``, and the head-dim offsets."""
    b = (pid_bh // heads_kv).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % heads_kv
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    heads = h * G + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return b, h, offs_g, g_ok, heads, offs_d, offs_dv, offs_d < D, offs_dv < DV


@triton.jit
def slot_rows(idx_row, start, n_slots, BLOCK_S: tl.constexpr):
    """(ok, rows) of the selection slots ``start … start + BLOCK_S``: which hold a key (index ≥ 0) and the
    key rows to gather (0 at empty slots)."""
    offs_s = start + tl.arange(0, BLOCK_S)
    index = tl.load(idx_row + offs_s, mask=offs_s < n_slots, other=-1)
    ok = index >= 0
    return ok, tl.where(ok, index, 0)


# --------------------------------------------------------------------------- host side


def interpreter_active(kernel) -> bool:
    """Whether ``kernel`` was defined under TRITON_INTERPRET=1 (so the kernels run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with a unit last stride (the kernels index the head dim as contiguous); None stays None."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def seeded_bf16(device):
    """``rnd(*shape)``: standard-normal bfloat16 tensors on ``device`` drawn from one generator seeded 0 (the
    tuning workloads' inputs: the same on every run)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return lambda *shape: torch.randn(*shape, device=device, generator=gen).to(torch.bfloat16)


def head_class(dim: int, dim_v: int, classes: tuple[int, ...]) -> int:
    """The smallest of ``classes`` holding both head dims, or a ValueError."""
    largest = max(dim, dim_v)
    for c in classes:
        if largest <= c:
            return c
    raise ValueError(f"head dims up to {classes[-1]} are supported, got D={dim}, Dv={dim_v}")


def length_bucket(n: int) -> str:
    """The tuning bucket of a length: the first of 16, 64, … 16384 holding it, else ``"big"``."""
    for edge in (16, 64, 256, 1024, 4096, 16384):
        if n <= edge:
            return str(edge)
    return "big"


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fit_config(space: tuning.SearchSpace, config, shape) -> dict:
    """``config`` if it is valid for ``shape``, else the valid point nearest to it: the largest tiles,
    the deepest pipeline, the fewest warps (the smallest tiles when nothing is valid)."""
    config = dict(config)
    if space.valid is None or space.valid(config, shape):
        return config
    candidates = space.configs(shape)
    if not candidates:
        return {**{name: min(values) for name, values in space.axes.items()}, "num_warps": 4}
    return dict(min(candidates, key=lambda c: (-c["BLOCK_M"] * c["BLOCK_N"], -c["num_stages"], c["num_warps"])))


def tile_space(kernel: str, head: int, default: tuple[int, int, int, int], stages: tuple[int, ...], bucket,
               valid) -> tuning.SearchSpace:
    """The search space ``<kernel>_d<head>`` of a flash-style kernel: BLOCK_M and BLOCK_N in 16 … 128, 4 or 8
    warps, the pipeline depths ``stages``; ``default`` = (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    bm, bn, warps, num_stages = default
    return tuning.SearchSpace(
        kernel=f"{kernel}_d{head}",
        axes={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (4, 8),
              "num_stages": stages},
        default={"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": num_stages},
        bucket=bucket,
        valid=valid,
    )


def launch_config(spaces, kernel: str, q: torch.Tensor, v: torch.Tensor, shape: dict, make_bench) -> dict:
    """The configuration of ``kernel`` for a call of tuning shape ``shape``, from a kind's ``spaces`` module
    (its ``SPACES``, ``space_name``, ``KIND`` and ``fit``): the tuning table, else autotuning on a GPU,
    else the space's default (:func:`attnrewrite.kernels.tuning.pick_config`), fitted to the shape."""
    space = spaces.SPACES[spaces.space_name(kernel, q.shape[-1], v.shape[-1])]
    config = tuning.pick_config(spaces.KIND, space, shape, q.device, make_bench, tensors=(q,))
    return spaces.fit(space, config, shape)


__all__ = ["LOG2E", "LOG2E_HOST", "dot_precision", "fit_config", "group_program", "head_class", "interpreter_active",
           "launch_config", "length_bucket", "load_rows", "load_tile", "mma", "online_softmax_step", "padded_dim",
           "pow2", "program_heads", "seeded_bf16", "softmax_dkdv_step", "softmax_dq_step", "slot_rows", "tile_space", "unit_last_stride"]
