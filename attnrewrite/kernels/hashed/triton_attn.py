"""Triton kernels for hashed attention over the selected keys: forward and backward.

One program handles one query row of one key/value head and all the query heads of its group (they
share the selection, so each gathered key and value row is read once for the group).  It walks the
row's slots of the selection [B, Hkv, Tq, S] (−1 = empty) BLOCK_S at a time, gathers those key and
value rows, and runs an online softmax in float32: out = softmax(mod(scale·q·k) + bias) · v over the
selected keys, 0 for a row with none (mod the score modification, if any: ``MOD_FN`` and the shared
:func:`~attnrewrite.kernels.triton_scaffold.modified_scores`, in natural units here; its derivative enters
dS in the backward).  The forward also stores each row's log-sum-exp.

The backward recomputes the probabilities from the log-sum-exp, writes dQ for its rows and adds the
selected keys' dK and dV contributions into float32 buffers with atomic adds (a key is selected by
many rows).  The order of those additions varies from run to run on a GPU, so dK and dV are not
bit-reproducible there (dQ and the forward are).

Mixed precision (``FAR`` > 0, the op's ``far_dtype``): a [B, Hkv, Tq, S] uint8 tensor flags the slots whose
key is far (neither a sink nor in the window, :func:`attnrewrite.kernels.hashed.sparse.far_slots`); their
gathered key and value rows are rounded through the far dtype (to it and back to float32) before use, in the
forward and the backward, and dK, dV flow straight through that rounding (reference step 5).

Learned hashes (``SOFT``, the op's ``hash="learned"``): the backward also gives the straight-through estimate
of :mod:`attnrewrite.kernels.hashed.sparse`.  Each selected key's logit is treated as if it held the soft
agreement Σ_b tanh(q·P_q,b)·tanh(k·P_k,b) / bits, so with dS the softmax's gradient at its input (before the
score modification's derivative) the soft codes get Σ_s dS·s̃_k / bits per query head (stored) and
Σ_g dS·s̃_q / bits per selected key (atomic adds).  The soft codes come in as float32 tensors; the
projections' gradients are taken from theirs in torch (:mod:`.triton_ops`).

The products are broadcast multiply-and-sum rather than ``tl.dot``: a group is 1–8 heads, below the
16 rows a tensor-core product needs, and each row has its own gathered keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrewrite.kernels.triton_scaffold import (broadcast_strides, empty_out_lse, group_program, head_strides,
                                                 mod_args, mod_kernel, modified_scores, slot_rows)


@triton.jit
def _load_group(base, stride_h, heads, g_ok, offs_d, d_ok, other):
    return tl.load(base + heads[:, None] * stride_h + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                   other=other).to(tl.float32)


@triton.jit
def _gather_rows(base, stride_t, rows, ok, offs_d, d_ok):
    return tl.load(base + rows[:, None] * stride_t + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0).to(tl.float32)


#: ``FAR`` codes of the kernels: the torch dtypes the far keys are rounded through.  Not float8_e4m3fn: the
#: interpreter's conversion differs from torch's, so it could not be checked here, and the GPU's saturates
#: where torch's gives nan
FAR_CODES = {torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_far(x, far_row, start, n_slots, BLOCK_S: tl.constexpr, FAR: tl.constexpr):
    """x [BLOCK_S, D] float32, the rows of the slots ``start …`` flagged far in ``far_row`` rounded through the
    far dtype (``FAR``: 0 none, 1 bfloat16, 2 float16)."""
    if FAR == 0:
        return x
    offs_s = start + tl.arange(0, BLOCK_S)
    far = tl.load(far_row + offs_s, mask=offs_s < n_slots, other=0) != 0
    if FAR == 1:  # to nearest, ties to even, by hand: Triton's interpreter truncates in x.to(tl.bfloat16)
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        rounded = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)                 # nan stays nan
    else:
        rounded = x.to(tl.float16).to(tl.float32)
    return tl.where(far[:, None], rounded, x)


@triton.jit
def _relative_at(rel_row, stride_rh, heads, g_ok, rows, ok):
    """[BLOCK_G, BLOCK_S] pointers into a relative bias table R [Hq, Tq + Tk − 1] (or its gradient) at column
    j − i + Tq − 1 of each query head's row (``rel_row`` already points at column Tq − 1 − i), and their mask."""
    return rel_row + heads[:, None] * stride_rh + rows[None, :], g_ok[:, None] & ok[None, :]


@triton.jit
def _scores(q, k, rows, ok, bias_row, stride_bias_j, rel_row, stride_rh, heads, g_ok, scale, mod_in_mul, mod_in_add,
            mod_out_mul, mod_out_add, mod_grad_mul, HAS_BIAS: tl.constexpr, MOD_FN: tl.constexpr,
            HAS_REL: tl.constexpr):
    """(mod(scale·q·k) (+ bias) (+ R[h, j − i + Tq − 1]) [BLOCK_G, BLOCK_S], −inf at empty slots; mod' at
    scale·q·k)."""
    s, d_mod = modified_scores(tl.sum(q[:, None, :] * k[None, :, :], axis=2), scale, None, mod_in_mul, mod_in_add,
                               mod_out_mul, mod_out_add, mod_grad_mul, MOD_FN)
    if HAS_BIAS:
        s += tl.load(bias_row + rows * stride_bias_j, mask=ok, other=0.0).to(tl.float32)[None, :]
    if HAS_REL:  # each query head its own row of R, each selected key by its distance
        at, at_ok = _relative_at(rel_row, stride_rh, heads, g_ok, rows, ok)
        s += tl.load(at, mask=at_ok, other=0.0).to(tl.float32)
    return tl.where(ok[None, :], s, float("-inf")), d_mod


@triton.jit
def hashed_attn_fwd_kernel(Q, K, V, Idx, Bias, Out, Lse, Far, Rel, heads_kv, n_slots, scale, rel_offset, stride_rh,
                           mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                           stride_qb, stride_qh, stride_qt,
                           stride_kb, stride_kh, stride_kt,
                           stride_vb, stride_vh, stride_vt,
                           stride_ib, stride_ih, stride_it,
                           stride_bias_b, stride_bias_i, stride_bias_j,
                           stride_ob, stride_oh, stride_ot,
                           stride_lb, stride_lh, stride_lt,
                           stride_fb, stride_fh, stride_ft,
                           G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                           HAS_BIAS: tl.constexpr, MOD_FN: tl.constexpr = -1, FAR: tl.constexpr = 0,
                           HAS_REL: tl.constexpr = False):
    i = tl.program_id(0)
    b, h, offs_g, g_ok, heads, offs_d, offs_dv, d_ok, dv_ok = group_program(tl.program_id(1), heads_kv, G, D, DV,
                                                                            BLOCK_G, BLOCK_D, BLOCK_DV)
    q = _load_group(Q + b * stride_qb + i * stride_qt, stride_qh, heads, g_ok, offs_d, d_ok, 0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    idx_row = Idx + b * stride_ib + h * stride_ih + i * stride_it
    bias_row = Bias + b * stride_bias_b + i * stride_bias_i
    far_row = Far + b * stride_fb + h * stride_fh + i * stride_ft
    rel_row = Rel + (rel_offset - i)                                                    # column Tq − 1 − i
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for start in range(0, n_slots, BLOCK_S):
        ok, rows = slot_rows(idx_row, start, n_slots, BLOCK_S)
        k = _round_far(_gather_rows(k_base, stride_kt, rows, ok, offs_d, d_ok), far_row, start, n_slots, BLOCK_S, FAR)
        s, _ = _scores(q, k, rows, ok, bias_row, stride_bias_j, rel_row, stride_rh, heads, g_ok, scale, mod_in_mul,
                       mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, HAS_BIAS, MOD_FN, HAS_REL)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _round_far(_gather_rows(v_base, stride_vt, rows, ok, offs_dv, dv_ok), far_row, start, n_slots, BLOCK_S,
                       FAR)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    seen = l > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("inf"))
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + i * stride_ot + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    tl.store(Lse + b * stride_lb + heads * stride_lh + i * stride_lt, lse, mask=g_ok)


@triton.jit
def hashed_attn_bwd_kernel(Q, K, V, Out, DOut, Lse, Idx, Bias, DQ, DK, DV, Far, SoftQ, SoftK, DSoftQ, DSoftK,
                           Rel, DRel, heads_kv, n_slots, scale, inv_bits, rel_offset, stride_rh,
                           mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul,
                           stride_qb, stride_qh, stride_qt,
                           stride_kb, stride_kh, stride_kt,
                           stride_vb, stride_vh, stride_vt,
                           stride_ob, stride_oh, stride_ot,
                           stride_dob, stride_doh, stride_dot,
                           stride_lb, stride_lh, stride_lt,
                           stride_ib, stride_ih, stride_it,
                           stride_bias_b, stride_bias_i, stride_bias_j,
                           stride_dqb, stride_dqh, stride_dqt,
                           stride_dkb, stride_dkh, stride_dkt,
                           stride_dvb, stride_dvh, stride_dvt,
                           stride_fb, stride_fh, stride_ft,
                           stride_sqb, stride_sqh, stride_sqt,
                           stride_skb, stride_skh, stride_skt,
                           G: tl.constexpr, D: tl.constexpr, DVAL: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                           HAS_BIAS: tl.constexpr, MOD_FN: tl.constexpr = -1, FAR: tl.constexpr = 0,
                           SOFT: tl.constexpr = False, BITS: tl.constexpr = 8, BLOCK_BITS: tl.constexpr = 8,
                           HAS_REL: tl.constexpr = False):
    i = tl.program_id(0)
    b, h, offs_g, g_ok, heads, offs_d, offs_dv, d_ok, dv_ok = group_program(tl.program_id(1), heads_kv, G, D, DVAL,
                                                                            BLOCK_G, BLOCK_D, BLOCK_DV)
    offs_c = tl.arange(0, BLOCK_BITS)
    c_ok = offs_c < BITS
    if SOFT:  # the group's soft query codes, and the soft codes' gradients (module docstring)
        soft_q = _load_group(SoftQ + b * stride_sqb + i * stride_sqt, stride_sqh, heads, g_ok, offs_c, c_ok, 0.0)
        sk_base = SoftK + b * stride_skb + h * stride_skh
        dsk_base = DSoftK + b * stride_skb + h * stride_skh
        d_soft_q = tl.zeros((BLOCK_G, BLOCK_BITS), dtype=tl.float32)
    q = _load_group(Q + b * stride_qb + i * stride_qt, stride_qh, heads, g_ok, offs_d, d_ok, 0.0)
    o = _load_group(Out + b * stride_ob + i * stride_ot, stride_oh, heads, g_ok, offs_dv, dv_ok, 0.0)
    do = _load_group(DOut + b * stride_dob + i * stride_dot, stride_doh, heads, g_ok, offs_dv, dv_ok, 0.0)
    lse = tl.load(Lse + b * stride_lb + heads * stride_lh + i * stride_lt, mask=g_ok, other=float("inf"))
    delta = tl.sum(do * o, axis=1)                                                     # [G]
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    idx_row = Idx + b * stride_ib + h * stride_ih + i * stride_it
    bias_row = Bias + b * stride_bias_b + i * stride_bias_i
    far_row = Far + b * stride_fb + h * stride_fh + i * stride_ft
    rel_row = Rel + (rel_offset - i)                                                    # column Tq − 1 − i
    drel_row = DRel + (rel_offset - i)
    dq = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(0, n_slots, BLOCK_S):
        ok, rows = slot_rows(idx_row, start, n_slots, BLOCK_S)
        k = _round_far(_gather_rows(k_base, stride_kt, rows, ok, offs_d, d_ok), far_row, start, n_slots, BLOCK_S, FAR)
        v = _round_far(_gather_rows(v_base, stride_vt, rows, ok, offs_dv, dv_ok), far_row, start, n_slots, BLOCK_S,
                       FAR)
        s, d_mod = _scores(q, k, rows, ok, bias_row, stride_bias_j, rel_row, stride_rh, heads, g_ok, scale,
                           mod_in_mul, mod_in_add, mod_out_mul, mod_out_add, mod_grad_mul, HAS_BIAS, MOD_FN, HAS_REL)
        p = tl.where(ok[None, :] & g_ok[:, None], tl.exp(s - lse[:, None]), 0.0)         # [G, S]
        dp = tl.sum(do[:, None, :] * v[None, :, :], axis=2)
        ds = p * (dp - delta[:, None])
        if SOFT:  # the straight-through estimate, from ds at the logit (before the modification's derivative)
            d_agree = ds * inv_bits                                                     # [G, S]
            soft_k = _gather_rows(sk_base, stride_skt, rows, ok, offs_c, c_ok)          # [S, BITS]
            d_soft_q += tl.sum(d_agree[:, :, None] * soft_k[None, :, :], axis=1)
            tl.atomic_add(dsk_base + rows[:, None] * stride_skt + offs_c[None, :],
                          tl.sum(d_agree[:, :, None] * soft_q[:, None, :], axis=0), mask=ok[:, None] & c_ok[None, :])
        if HAS_REL:  # dR: R enters the logit as it is; a distance is read by many rows (atomic adds)
            at, at_ok = _relative_at(drel_row, stride_rh, heads, g_ok, rows, ok)
            tl.atomic_add(at, ds, mask=at_ok)
        if MOD_FN >= 0:  # the gradient of the unmodified score
            ds = ds * d_mod
        dq += tl.sum(ds[:, :, None] * k[None, :, :], axis=1)
        dk = tl.sum(ds[:, :, None] * q[:, None, :], axis=0) * scale                    # [S, D]
        dv = tl.sum(p[:, :, None] * do[:, None, :], axis=0)                             # [S, DV]
        tl.atomic_add(dk_base + rows[:, None] * stride_dkt + offs_d[None, :], dk, mask=ok[:, None] & d_ok[None, :])
        tl.atomic_add(dv_base + rows[:, None] * stride_dvt + offs_dv[None, :], dv,
                      mask=ok[:, None] & dv_ok[None, :])
    tl.store(DQ + b * stride_dqb + heads[:, None] * stride_dqh + i * stride_dqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if SOFT:
        tl.store(DSoftQ + b * stride_sqb + heads[:, None] * stride_sqh + i * stride_sqt + offs_c[None, :], d_soft_q,
                 mask=g_ok[:, None] & c_ok[None, :])


def _blocks(q: torch.Tensor, v: torch.Tensor, heads_kv: int) -> dict:
    groups = q.shape[1] // heads_kv
    return dict(G=groups, BLOCK_G=triton.next_power_of_2(groups), BLOCK_D=triton.next_power_of_2(q.shape[-1]),
                BLOCK_DV=triton.next_power_of_2(v.shape[-1]))


def _far_args(far: torch.Tensor | None, far_dtype: torch.dtype | None, index: torch.Tensor) -> tuple:
    """(pointer, its three strides, FAR code): the far flags uint8 [B, Hkv, Tq, S] with their dtype's code, or
    the index as an unread pointer and 0 when ``far_dtype`` is None."""
    if far_dtype is None:
        return index, 0, 0, 0, 0
    if far is None or far.shape != index.shape:
        raise ValueError(f"far flags of the selection's shape {tuple(index.shape)} are needed with far_dtype")
    if far_dtype not in FAR_CODES:
        raise ValueError(f"the hashed kernels round far keys through {sorted(map(str, FAR_CODES))}, not {far_dtype}")
    return far, *head_strides(far), FAR_CODES[far_dtype]


def _rel_args(relative: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """(pointer, column offset Tq − 1, row stride) of a relative bias table R float32 [Hq, Tq + Tk − 1], or q as an
    unread pointer and zeros."""
    if relative is None:
        return q, 0, 0
    if relative.dtype != torch.float32 or relative.dim() != 2 or relative.shape[0] != q.shape[1] or \
            relative.stride(-1) != 1:
        raise ValueError(f"the hashed kernels read a float32 [Hq, Tq + Tk - 1] table with unit column stride, got "
                         f"{relative.dtype} {tuple(relative.shape)}")
    return relative, q.shape[2] - 1, relative.stride(0)


def attend_forward(q, k, v, index, bias, scale: float, config: dict | None = None, launch=lambda kernel: kernel,
                   program=None, far: torch.Tensor | None = None, far_dtype: torch.dtype | None = None,
                   relative: torch.Tensor | None = None):
    """(out [B, Hq, Tq, Dv] in q's dtype, lse float32 [B, Hq, Tq]) over the selected keys.

    ``index``: int32 [B, Hkv, Tq, S] (:func:`.triton_select.select_keys`); ``bias``: float [B|1, Tq|1, Tk]
    added to the selected scores, or None.  ``config``: {"BLOCK_S": ..., "num_warps": ...}.  ``program``: the
    score modification (:class:`~attnrewrite.kernels.score_mods.ScoreProgram`, or None), applied to scale·q·k
    before the bias.  ``far``/``far_dtype``: the far slots (uint8 [B, Hkv, Tq, S], nonzero = far) and the torch
    dtype their keys and values are rounded through, or None (module docstring).  ``relative``: a relative bias
    table R float32 [Hq, Tq + Tk − 1] (each selected key of query i gets R[h, j − i + Tq − 1]), or None.
    """
    batch, heads_q, len_q, dim = q.shape
    heads_kv = k.shape[1]
    config = config or {"BLOCK_S": 32, "num_warps": 4}
    out, lse = empty_out_lse(q, v.shape[-1])
    if out.numel() == 0:
        return out, lse
    mod, mod_fn = mod_args(program, float(scale), log2=False)
    far, *far_strides, far_code = _far_args(far, far_dtype, index)
    grid = (len_q, batch * heads_kv)
    launch(mod_kernel(hashed_attn_fwd_kernel, program))[grid](
        q, k, v, index, out if bias is None else bias, out, lse, far, *_rel_args(relative, q)[:1], heads_kv,
        index.shape[-1], float(scale), *_rel_args(relative, q)[1:], *mod,
        *head_strides(q, k, v, index), *broadcast_strides(bias), *head_strides(out, lse), *far_strides,
        D=dim, DV=v.shape[-1], BLOCK_S=config["BLOCK_S"], HAS_BIAS=bias is not None, MOD_FN=mod_fn,
        FAR=far_code, HAS_REL=relative is not None,
        num_warps=config["num_warps"], **_blocks(q, v, heads_kv))
    return out, lse


def _soft_args(soft, q: torch.Tensor, k: torch.Tensor):
    """(soft_q, soft_k, d_soft_q, d_soft_k), their six (batch, head, row) strides and the SOFT/BITS constexprs of
    the straight-through estimate; unread pointers and SOFT=False when ``soft`` is None."""
    if soft is None:
        return (q, q, q, q), (0,) * 6, dict(SOFT=False)
    soft_q, soft_k = (x.float().contiguous() for x in soft)
    bits = soft_q.shape[-1]
    expected = (tuple(q.shape[:3]) + (bits,), tuple(k.shape[:3]) + (bits,))
    if (tuple(soft_q.shape), tuple(soft_k.shape)) != expected:
        raise ValueError(f"soft codes must be [B, Hq, Tq, bits] and [B, Hkv, Tk, bits] = {expected}, got "
                         f"{tuple(soft_q.shape)} and {tuple(soft_k.shape)}")
    d_soft_q, d_soft_k = torch.zeros_like(soft_q), torch.zeros_like(soft_k)
    return (soft_q, soft_k, d_soft_q, d_soft_k), head_strides(soft_q, soft_k), dict(SOFT=True, BITS=bits,
                                                               BLOCK_BITS=triton.next_power_of_2(bits))


def attend_backward(q, k, v, out, grad, lse, index, bias, scale: float, config: dict | None = None,
                    launch=lambda kernel: kernel, program=None, far: torch.Tensor | None = None,
                    far_dtype: torch.dtype | None = None, soft=None, relative: torch.Tensor | None = None):
    """(dq, dk, dv) of :func:`attend_forward` (``program``, ``far``, ``far_dtype`` as there), in the inputs' dtypes
    (dK and dV summed in float32; straight through the far rounding).

    ``soft``: None, or the soft codes (tanh(q·P_q) [B, Hq, Tq, bits], tanh(k·P_k) [B, Hkv, Tk, bits]) of learned
    hashes; then (dq, dk, dv, d_soft_q, d_soft_k), the last two float32: the straight-through estimate's
    gradients of the soft codes (module docstring).  ``relative``: the forward's table R float32 [Hq, Tq + Tk − 1]
    or None; with it dR float32 [Hq, Tq + Tk − 1] comes last (summed by atomic adds: not bit-reproducible on a
    GPU)."""
    batch, _, len_q, dim = q.shape
    heads_kv = k.shape[1]
    config = config or {"BLOCK_S": 32, "num_warps": 4}
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    softs, soft_strides, soft_flags = _soft_args(soft, q, k)
    d_soft = () if soft is None else softs[2:]
    rel, rel_offset, stride_rh = _rel_args(relative, q)
    d_rel = () if relative is None else (torch.zeros(relative.shape, dtype=torch.float32, device=q.device),)
    if q.numel() == 0 or index.shape[-1] == 0:
        return (dq.zero_(), dk.to(k.dtype), dv.to(v.dtype), *d_soft, *d_rel)
    mod, mod_fn = mod_args(program, float(scale), log2=False)
    far, *far_strides, far_code = _far_args(far, far_dtype, index)
    grid = (len_q, batch * heads_kv)
    launch(mod_kernel(hashed_attn_bwd_kernel, program))[grid](
        q, k, v, out, grad, lse, index, q if bias is None else bias, dq, dk, dv, far, *softs, rel,
        d_rel[0] if d_rel else rel, heads_kv, index.shape[-1], float(scale), 1.0 / soft_flags.get("BITS", 8),
        rel_offset, stride_rh, *mod,
        *head_strides(q, k, v, out, grad, lse, index), *broadcast_strides(bias), *head_strides(dq, dk, dv),
        *far_strides, *soft_strides,
        D=dim, DVAL=v.shape[-1], BLOCK_S=config["BLOCK_S"], HAS_BIAS=bias is not None, MOD_FN=mod_fn, FAR=far_code,
        HAS_REL=relative is not None, num_warps=config["num_warps"], **soft_flags, **_blocks(q, v, heads_kv))
    return (dq, dk.to(k.dtype), dv.to(v.dtype), *d_soft, *d_rel)
