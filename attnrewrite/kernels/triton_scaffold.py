"""The scaffolding the Triton kernels of the summary, hashed and sliding-window kinds share, in one place.

Device side (``@triton.jit``, inlined into each kernel, so the compiled code is what the kernels wrote
out before):

- :func:`mma` (the product every kernel takes instead of ``tl.dot``, right under the interpreter in
  bfloat16), :func:`load_tile`, :data:`LOG2E`; :func:`load_rows` — a [rows, cols] tile of a row-major
  head (rows at ``stride_row``, unit last stride), masked only on the bounds asked for; :func:`load_row_pair` —
  the same rows of two heads read together (k and v, q and dO); :func:`row_ptrs` /
  :func:`row_mask` — the pointers of such a tile and its bounds (the kernels' output and gradient stores);
- :func:`score_mod_fn` and :func:`modified_scores` — a score modification (a program of
  :mod:`attnrewrite.kernels.score_mods` in the form ``post_mul · f(pre_mul · s + pre_add) + post_add``,
  f a constexpr ``MOD_FN`` of a fixed table, or ``MOD_FN = GENERATED``: any other core, generated as Triton
  source by :mod:`attnrewrite.kernels.triton_score_mods` into the kernel's specialisation) and its
  derivative, the one copy the sigmoid, sliding-window, summary and hashed kernels all compile in;
  :func:`mod_args` gives the runtime floats and MOD_FN for a program, :func:`mod_kernel` the kernel to
  launch for it;
- :func:`head_position`, :func:`position_scores`, :func:`relative_bias_grad` — a position bias computed in the
  kernels: ALiBi from a head's slope, or the relative bias table R read by diagonal per tile and its gradient
  dR summed with atomics (the sigmoid and sliding-window kernels' one copy);
- :func:`program_heads` — the (batch, query head, key/value head) of a program over ``batch · heads``,
  as int64 (offsets may pass 2³¹ elements);
- :func:`online_softmax_step` — one key block of the flash forward (running max, sum and output in
  log2 units); :func:`softmax_dq_step`, :func:`softmax_dkdv_step` — one block of its backward (with
  the score modification's derivative when there is one), :func:`softmax_score_grad` — its dS;
- :func:`group_program` / :func:`slot_rows` — the head group and the gathered rows of the hashed
  kernels' programs.

Host side: :func:`interpreter_active`, :func:`unit_last_stride`, :func:`mask_strides`, :func:`head_strides`
(the launches' per-head strides), :func:`broadcast_strides`, :func:`empty_out_lse`, and the configuration
fitting every kind's ``spaces.py`` does the same way
(:func:`head_class`, :func:`length_bucket`, :func:`pow2`, :func:`fit_config`, :func:`launch_config`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnrewrite.kernels import triton_score_mods, tuning

# --------------------------------------------------------------------------- device side

LOG2E_HOST = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_HOST)  # kernels may only read constexpr globals


@triton.jit
def _probe():
    pass


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


#: whether the kernels run under TRITON_INTERPRET=1 (then every kernel is an InterpretedFunction)
INTERPRETED = tl.constexpr(_interpreted())


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)``.  Under the interpreter, bfloat16 operands are widened to float32 first: its
    dot multiplies the raw 16-bit patterns of bfloat16 as integers (Triton 3.6 to 3.9 alike; products
    near 1e9), while float32 holds every bfloat16 product exactly.  Compiled kernels take the plain dot."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [R, C] tile, masking (with zeros) only the bounds the caller asks to check."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


#: POSITION of the kernels, by the ops' ``position`` argument: no position bias, slope_h · (j − i), slope_h · |j − i|
#: (ALiBi computed from the query and key indices instead of read from a mask), R[h, j − i + Tq − 1] (a relative
#: bias read from the table R [Hq, Tq + Tk − 1] by distance: T5; the sigmoid and sliding-window kernels)
POSITION_CODES = {None: 0, "j-i": 1, "|j-i|": 2, "relative": 3}


@triton.jit
def head_position(Slopes, head, len_q, len_k, POSITION: tl.constexpr):
    """The position-bias argument of query head ``head`` (int64) that :func:`position_scores` reads: its slope
    in log2 units, loaded from ``Slopes`` [Hq] (POSITION = 1, 2); the pointer to its row of the relative bias
    table R [Hq, Tq + Tk − 1] (POSITION = 3, ``Slopes`` the table; also the row of dR when given dR); 0.0
    without a position bias (POSITION = 0, ``Slopes`` not read)."""
    if POSITION == 3:
        arg = Slopes + head * (len_q + len_k - 1)
    elif POSITION != 0:
        arg = tl.load(Slopes + head) * LOG2E
    else:
        arg = 0.0
    return arg


@triton.jit
def position_scores(s, q_idx, k_idx, q_len, k_len, pos, POSITION: tl.constexpr):
    """The score tile ``s`` (log2 units) plus the position bias, ``q_idx`` / ``k_idx`` the query and key
    indices (broadcast tiles, either orientation): ``pos`` · (j − i) (POSITION = 1) or ``pos`` · |j − i| (2),
    ``pos`` the head's slope in log2 units; R[h, j − i + Tq − 1] (3), ``pos`` the head's row of R (natural
    units; :func:`head_position`), gathered by diagonal for the in-bounds entries (i < q_len, j < k_len; the
    others add 0 and must be hidden by the caller); ``s`` itself for POSITION = 0.  The one copy the sigmoid
    and sliding-window kernels compile in."""
    if POSITION == 1 or POSITION == 2:
        distance = (k_idx - q_idx).to(tl.float32)
        if POSITION == 2:
            distance = tl.abs(distance)
        s += pos * distance
    if POSITION == 3:
        rel = tl.load(pos + (k_idx - q_idx + q_len - 1), mask=(q_idx < q_len) & (k_idx < k_len), other=0.0)
        s += rel * LOG2E
    return s


@triton.jit
def relative_bias_grad(dr_row, ds, offs_m, offs_n, q_len, k_len):
    """dR[h, j − i + Tq − 1] += dS for a [queries, keys] tile of score gradients ``ds`` (the gradient of the
    scores R is added to: before the score modification's derivative), ``dr_row`` the head's row of dR
    (:func:`head_position` on dR), ``offs_m`` / ``offs_n`` the tile's query and key indices (1-D; entries
    with i ≥ q_len or j ≥ k_len add nothing).  Atomics: a diagonal's entries come from many tiles and
    programs (float32 additions in no fixed order)."""
    tl.atomic_add(dr_row + (offs_n[None, :] - offs_m[:, None] + q_len - 1), ds,
                  mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :])


#: MOD_FN of the kernels: no score modification; otherwise a code of ``score_mods.KERNEL_FUNCTIONS`` (0: affine),
#: or GENERATED: a generated ``score_mod_fn`` replaces this one in the kernel's specialisation (:func:`mod_kernel`)
NO_MOD = -1
GENERATED = 8


@triton.jit
def score_mod_fn(u, MOD_FN: tl.constexpr):
    """(f(u), f'(u)) for the score modification's nonlinear step f (codes of ``score_mods.KERNEL_FUNCTIONS``;
    0 is the identity).  tanh and sigmoid are written with exp so that they compile and interpret alike."""
    if MOD_FN == 1:  # tanh u = 1 − 2 / (e^(2u) + 1): ±1 at the ends (e^(2u) = inf or 0), no NaN
        f = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        d = 1.0 - f * f
    elif MOD_FN == 2:  # sigmoid
        f = 1.0 / (1.0 + tl.exp(-u))
        d = f * (1.0 - f)
    elif MOD_FN == 3:  # exp
        f = tl.exp(u)
        d = f
    elif MOD_FN == 4:  # abs
        f = tl.abs(u)
        d = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    elif MOD_FN == 5:  # relu
        f = tl.maximum(u, 0.0)
        d = tl.where(u > 0, 1.0, 0.0)
    elif MOD_FN == 6:  # erf
        f = tl.math.erf(u)
        d = 1.1283791670955126 * tl.exp(-u * u)
    elif MOD_FN == 7:  # square
        f = u * u
        d = 2.0 * u
    else:  # affine only
        tl.static_assert(MOD_FN == 0, "MOD_FN = GENERATED needs the kernel specialised by mod_kernel()")
        f = u
        d = u * 0.0 + 1.0
    return f, d


@triton.jit
def modified_scores(x, scale_log2, offset, mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                    MOD_FN: tl.constexpr):
    """(z2, mod'): the scores in log2 units, z2 = log2(e) · mod(scale · x) + offset, of a tile of raw
    products ``x`` = q·kᵀ (either orientation: the mod is elementwise), and the derivative d mod/ds at
    s = scale · x (``z2`` itself, unused, when MOD_FN = NO_MOD: then z2 = scale_log2 · x + offset).  A
    kernel in natural units (hashed) passes ``scale`` as ``scale_log2`` and ``mod_args(..., log2=False)``.

    The modification's runtime floats come from :func:`mod_args`: mod_in_mul = pre_mul · scale,
    mod_in_add = pre_add, mod_out_mul / mod_out_add = post_mul / post_add times log2(e), mod_grad_mul =
    pre_mul · post_mul.  ``offset`` (log2 units) is added after the modification: None for nothing, a
    scalar, or a tile broadcasting against x (sigmoid's b); it is folded into post_add's addition so the
    modified tile costs one fused multiply-add after f.
    """
    if MOD_FN < 0:
        if offset is None:
            z2 = x * scale_log2
        else:
            z2 = x * scale_log2 + offset
        d = z2
    else:
        f, d = score_mod_fn(x * mod_in_mul + mod_in_add, MOD_FN)
        if offset is None:
            z2 = f * mod_out_mul + mod_out_add
        else:
            z2 = f * mod_out_mul + (mod_out_add + offset)
        d = d * mod_grad_mul
    return z2, d



@triton.jit
def load_rows(base, offs_rows, stride_row, n_rows, offs_cols, n_cols, CHECK_ROWS: tl.constexpr,
              CHECK_COLS: tl.constexpr):
    """The tile ``base[offs_rows, offs_cols]`` of a head with rows ``stride_row`` apart (zeros outside the
    bounds checked: rows below ``n_rows``, columns below ``n_cols``)."""
    return load_tile(row_ptrs(base, offs_rows, stride_row, offs_cols), offs_rows, n_rows, offs_cols, n_cols,
                     CHECK_ROWS, CHECK_COLS)


@triton.jit
def load_row_pair(a_base, stride_a, b_base, stride_b, offs_rows, n_rows, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """(a, b): the rows ``offs_rows`` of two heads that are read together, a [rows, BLOCK_D] tile of a head of
    dim ``D`` (k, or q) and a [rows, BLOCK_DV] tile of a head of dim ``DV`` (v, or dO), each with
    :func:`load_rows` (columns checked when the head dim is padded, rows below ``n_rows`` when CHECK_ROWS)."""
    a = load_rows(a_base, offs_rows, stride_a, n_rows, tl.arange(0, BLOCK_D), D, CHECK_ROWS, BLOCK_D != D)
    b = load_rows(b_base, offs_rows, stride_b, n_rows, tl.arange(0, BLOCK_DV), DV, CHECK_ROWS, BLOCK_DV != DV)
    return a, b


@triton.jit
def row_ptrs(base, offs_rows, stride_row, offs_cols):
    """The pointers ``base[offs_rows, offs_cols]`` of a [rows, cols] tile of a head with rows ``stride_row``
    apart and a unit last stride (:func:`load_rows` reads them; every kernel's output, dQ, dK and dV stores
    write them, with :func:`row_mask`)."""
    return base + offs_rows[:, None] * stride_row + offs_cols[None, :]


@triton.jit
def row_mask(offs_rows, n_rows, offs_cols, n_cols):
    """The in-bounds entries of a [rows, cols] tile: rows below ``n_rows`` and columns below ``n_cols`` (the
    mask of the stores at :func:`row_ptrs`; written as ``tl.store(row_ptrs(...), value, mask=row_mask(...))``
    so that the pointers, the value and the mask are computed in the order the kernels always had)."""
    return (offs_rows < n_rows)[:, None] & (offs_cols < n_cols)[None, :]


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
def softmax_score_grad(p, do, v, delta, DOT_PRECISION: tl.constexpr):
    """dS = P ⊙ (dO·Vᵀ − Δ) [queries, keys], the gradient of a softmax's scores after the score modification
    (what a bias added to them, such as R, receives); P the probabilities (0 where hidden), Δ = rowsum(dO ⊙ O)."""
    dp = mma(do, tl.trans(v), None, DOT_PRECISION)
    return p * (dp - delta[:, None])


@triton.jit
def softmax_dq_step(dq, p, do, k, v, delta, d_mod, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr):
    """dQ += dS·K for one key block of a softmax backward: dS = P ⊙ (dO·Vᵀ − Δ) ⊙ mod', P [queries, keys]
    the probabilities (0 where hidden), Δ = rowsum(dO ⊙ O), ``d_mod`` the score modification's derivative
    from :func:`modified_scores` (not read when MOD_FN = NO_MOD); the scale is applied by the caller."""
    ds = softmax_score_grad(p, do, v, delta, DOT_PRECISION)
    if MOD_FN >= 0:
        ds = ds * d_mod
    return mma(ds.to(k.dtype), k, dq, DOT_PRECISION)


@triton.jit
def softmax_dkdv_step(dk, dv, pt, q, do, v, delta, d_mod, DOT_PRECISION: tl.constexpr, MOD_FN: tl.constexpr):
    """dV += Pᵀ·dO and dK += dSᵀ·Q for one query block, on key-major tiles (``pt`` [keys, queries], so no
    accumulated operand is transposed); dSᵀ = Pᵀ ⊙ (V·dOᵀ − Δ) ⊙ mod'ᵀ (``d_mod`` key-major as well)."""
    dv = mma(pt.to(do.dtype), do, dv, DOT_PRECISION)
    dpt = mma(v, tl.trans(do), None, DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    if MOD_FN >= 0:
        dst = dst * d_mod
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

def padded_dim(d: int) -> int:
    """The power-of-two block a head dim is computed in (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands are multiplied in full precision (as torch does by default), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def mod_args(program, scale: float, log2: bool = True) -> tuple[tuple[float, float, float, float, float], int]:
    """The kernels' score-modification arguments for a :class:`~attnrewrite.kernels.score_mods.ScoreProgram`
    (or None): (mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul) and MOD_FN (see
    :func:`modified_scores`); no program gives NO_MOD (and floats that are never read).  ``log2=False``:
    for kernels that keep scores in natural units (mod_out_mul / mod_out_add without the log2(e) factor).
    A program outside the fixed table (``ScoreProgram.affine_form`` is None) gives its
    :meth:`~attnrewrite.kernels.score_mods.ScoreProgram.split` ends and GENERATED: launch
    :func:`mod_kernel`'s specialisation with them.
    """
    if program is None:
        return (1.0, 0.0, 1.0, 0.0, 1.0), NO_MOD
    form = program.affine_form()
    if form is None:
        pre_mul, pre_add, _, post_mul, post_add = program.split()
        function = GENERATED
    else:
        pre_mul, pre_add, function, post_mul, post_add = form
    unit = LOG2E_HOST if log2 else 1.0
    return (pre_mul * scale, pre_add, post_mul * unit, post_add * unit, pre_mul * post_mul), function


def mod_kernel(kernel, program):
    """The kernel to launch with :func:`mod_args` (``program``): ``kernel`` itself without a program or with
    one of the fixed table, else its specialisation with the program's generated core
    (:func:`attnrewrite.kernels.triton_score_mods.kernel_for`, cached per kernel and program)."""
    return triton_score_mods.kernel_for(kernel, program)


def interpreter_active(kernel) -> bool:
    """Whether ``kernel`` was defined under TRITON_INTERPRET=1 (so the kernels run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def mask_strides(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, tuple]:
    """(the 4-d additive mask expanded to ``shape`` = [B, Hq, Tq, Tk], its strides: 0 on broadcast dims), or
    (None, zeros) without a mask: what the kernels that read a float mask (sigmoid, sliding window) launch with."""
    if mask is None:
        return None, (0, 0, 0, 0)
    mask = mask.expand(*shape)
    return mask, mask.stride()


def head_strides(*tensors: torch.Tensor) -> tuple:
    """The batch, head and row strides of each [B, H, T, D] tensor in turn (stride(0), stride(1), stride(2)):
    what a kernel launch passes for every head it indexes (the last stride is 1, :func:`unit_last_stride`;
    a [B, H, T] row statistic such as the log-sum-exp passes its three strides the same way)."""
    return tuple(s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2)))


def broadcast_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """The strides of the first three dims of a tensor that broadcasts over them ([B|1, Tq|1, Tk], a bias or a
    keep mask), 0 on a dim of size 1 (every row reads the same entries), and zeros for None."""
    if t is None:
        return 0, 0, 0
    return tuple(t.stride(d) if t.shape[d] > 1 else 0 for d in range(3))


def empty_out_lse(q: torch.Tensor, dim_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, Dv] in q's dtype, lse float32 [B, Hq, Tq]), uninitialised: what the softmax-family
    forward kernels (sliding window, summary, hashed) write."""
    batch, heads_q, len_q = q.shape[:3]
    return (torch.empty(batch, heads_q, len_q, dim_v, dtype=q.dtype, device=q.device),
            torch.empty(batch, heads_q, len_q, dtype=torch.float32, device=q.device))


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


__all__ = ["GENERATED", "INTERPRETED", "LOG2E", "LOG2E_HOST", "NO_MOD", "POSITION_CODES", "broadcast_strides", "dot_precision",
           "empty_out_lse", "fit_config",
           "group_program", "head_class", "head_position", "head_strides", "interpreter_active", "launch_config", "length_bucket",
           "load_row_pair", "load_rows", "load_tile", "mask_strides", "mma", "mod_args", "mod_kernel", "modified_scores", "online_softmax_step", "padded_dim",
           "position_scores", "pow2", "program_heads", "relative_bias_grad", "score_mod_fn", "seeded_bf16",
           "softmax_dkdv_step", "softmax_dq_step", "row_mask", "row_ptrs", "slot_rows", "tile_space", "unit_last_stride"]
