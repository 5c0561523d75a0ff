"""The kernel-level entry point of the sigmoid kind, :func:`sigmoid_attention_dispatch`: checks the input,
resolves the bias and dispatches to a path (the Triton kernels or the chunked torch path).

Not to be confused with :func:`attnrewrite.ops.sigmoid_attention`, the public operator with SDPA's
signature, which calls it: the dispatcher also takes the options an operator schema cannot carry
or the rewriter never needs (``kv_lens``, packed ``cu_seqlens``, ``causal_align``, ``impl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnrewrite.kernels._ops import resolve_impl
from attnrewrite.kernels.checks import (MASKED_SCORE, RELATIVE, check_dropout, check_kv_lens, check_mask_dtype,
                                        check_position_slopes, check_qkv)
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from .chunked import chunk_sigmoid_attention

try:  # the Triton path is optional: the torch path works wherever torch does
    from . import op as _op
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _op = None

CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
WHAT = "sigmoid attention"


@dataclass(frozen=True)
class Problem:
    """Sizes of one call, read off validated inputs."""

    batch: int  # B, or the number of packed sequences N under cu_seqlens
    heads_q: int
    heads_kv: int
    len_q: int  # Tq (total_q when packed)
    len_k: int
    dim: int
    dim_v: int
    scale: float
    causal: int  # CAUSAL_NONE / CAUSAL_TOP_LEFT / CAUSAL_BOTTOM_RIGHT
    varlen: bool


def sigmoid_attention_dispatch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    bias: str | float = "auto",
    kv_lens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    causal_align: str = "top_left",
    impl: str = "auto",
    score_mod: str | None = None,
    position_slopes: torch.Tensor | None = None,
    position: str | None = None,
) -> torch.Tensor:
    """Sigmoid attention: ``out_i = sum_j sigmoid(scale * q_i.k_j + attn_mask_ij + b) * v_j`` over visible keys.

    The signature is that of ``F.scaled_dot_product_attention`` plus keyword options.

    Shapes and dtypes:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; float16, bfloat16 or float32
        (float64 too on the torch path), all of one dtype and on one device.  Hq must be a
        multiple of Hkv, and Hq != Hkv needs ``enable_gqa=True`` (as in SDPA); K/V are never
        repeated.  Tq != Tk is allowed (decode against a KV cache).  Returns [B, Hq, Tq, Dv]
        in q's dtype.  The Triton path takes D, Dv <= 256.

    Which keys query i sees (all conditions must hold; everything else contributes exactly 0,
    and a query that sees no key gets 0):
        - ``kv_lens`` (int tensor [B]): keys j >= kv_lens[b] are padding.
        - ``attn_mask`` bool, broadcastable to [B, Hq, Tq, Tk]: True = may attend.
        - ``is_causal``: j <= i (``causal_align="top_left"``, SDPA's convention) or
          j <= i + (n_k - Tq) (``"bottom_right"``, decode against a cache), where n_k is the
          sequence's key count: kv_lens[b] when given, the sequence's length under cu_seqlens,
          else Tk.  Blocks above the diagonal are skipped by the kernels, not iterated.
        A float ``attn_mask`` broadcastable to [B, Hq, Tq, Tk] is added to the scores instead
        (ALiBi, relative position bias, T5 bias; -inf entries exclude keys).

    The bias b:
        ``bias="auto"``: each query row i has its own b_i = -log(n_i), n_i = the number of keys
        row i sees: keys j < kv_lens[b] (or < Tk, or the sequence's key length under cu_seqlens),
        causally visible in a causal call, and not excluded by ``attn_mask`` — False in a bool
        mask, or, in a float mask, any value at or below ``MASKED_SCORE`` = -9000: -inf, the dtype's
        lowest finite value (HF's masks), BERT's -10000 (-9984 in bfloat16), all of weight exactly 0
        (:func:`mask_keeps`).  So a causal mask passed as a mask gives the same b_i
        as ``is_causal=True``, a padding mask the same as ``kv_lens``, and a token's output does
        not depend on how many tokens follow it (a causal prefill's row i equals a decoding step
        of that token against the same keys).  n = 0 counts as 1.  A number sets b for every row.

    Packed variable-length batches: ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 [N+1], cumulative
    lengths starting at 0) with q [1, Hq, total_q, D], k [1, Hkv, total_k, D], v [1, Hkv, total_k, Dv];
    sequence s uses rows cu_seqlens[s]:cu_seqlens[s+1] and attends only to its own keys.
    ``attn_mask`` and ``kv_lens`` cannot be combined with it.

    Gradients flow to q, k, v, and to a float ``attn_mask`` that requires grad (reduced over its
    broadcast dimensions; on the Triton path this materialises a [B, Hq, Tq, Tk] float32 buffer).

    ``dropout_p`` drops attention weights as SDPA does; only the torch path implements it.

    ``score_mod``: a score modification program (:mod:`attnrewrite.kernels.score_mods`, e.g. Gemma-2's
    soft-capping ``"div 50.0; tanh; mul 50.0"``) applied to scale·q_i·k_j before ``attn_mask`` and b:
    out_i = Σ_j sigmoid(mod(scale·q_i·k_j) + attn_mask_ij + b)·v_j.  Both paths apply it in forward and
    backward; the Triton kernels take every program: one nonlinear step (tanh, sigmoid, exp, abs, relu, erf,
    square) between affine ones from a fixed table, any other chain as a generated Triton function
    (:mod:`attnrewrite.kernels.triton_score_mods`), so ``impl="auto"`` takes modified calls as unmodified ones.

    ``position`` with ``position_slopes``: a bias computed from the positions, added with ``attn_mask``:
    ``"j-i"`` adds slopes[h]·(j − i) (ALiBi), ``"|j-i|"`` adds slopes[h]·|j − i| (symmetric ALiBi with
    negative slopes), i and j the query and key positions (0-based, in their sequence when packed).
    ``position_slopes`` is a float tensor of Hq values (or one), on q's device, that does not require
    grad (no gradient is computed for it: pass such a bias as ``attn_mask``).  Both paths compute the
    bias tile by tile; no [Tq, Tk] tensor is made.

    ``position="relative"`` with ``position_slopes`` = R, a float table [Hq or 1, Tq + Tk − 1]: a relative
    position bias R[h, j − i + Tq − 1] (T5's bucketed bias), added with ``attn_mask``.  R may require grad:
    its gradient is dS summed along each diagonal.  Both paths read R tile by tile (no [Tq, Tk] tensor);
    the Triton dQ kernel sums dR with atomics.  Not with ``cu_seqlens``.

    ``impl``: ``"auto"`` runs the Triton kernels on CUDA for float16/bfloat16 (the torch path when
    dropout_p > 0, for float32, whose exact products the kernels can only do on the FMA pipes, and
    for head dims over 256) and the torch path elsewhere; ``"triton"`` always runs the kernels (on the CPU only under
    TRITON_INTERPRET=1); ``"torch"`` runs a chunked torch implementation with autograd that
    never materialises the full Tq x Tk matrix.  Both compute in float32.
    """
    problem = _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                        bias, kv_lens, cu_seqlens_q, cu_seqlens_k, causal_align)
    program = parse_score_mod(score_mod)
    slopes = check_position_slopes(position_slopes, position, q, problem.heads_q, WHAT, relative_ok=True)
    if position == RELATIVE:
        _check_relative(slopes, problem)
    path = _resolve_impl(impl, q, dropout_p, problem)

    if attn_mask is not None:
        attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    bias_per_head = resolve_bias(bias, problem, attn_mask, kv_lens, cu_seqlens_k, q.device,
                                 torch.float64 if q.dtype == torch.float64 else torch.float32, cu_seqlens_q)
    additive_mask = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        additive_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~attn_mask, float("-inf"))
    elif attn_mask is not None:
        # the kernels read 16- and 32-bit floats; the torch path adds any float mask as it is
        additive_mask = attn_mask if attn_mask.dtype in _FLOAT_DTYPES or path == "torch" else attn_mask.float()
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32)

    if path == "triton":
        return _op.sigmoid_attention_triton(
            q, k, v, additive_mask, bias_per_head, kv_lens, cu_seqlens_q, cu_seqlens_k,
            problem.scale, problem.causal, program, slopes, position if slopes is not None else None)
    return chunk_sigmoid_attention(
        q, k, v, additive_mask, bias_per_head, kv_lens, cu_seqlens_q, cu_seqlens_k,
        problem.scale, problem.causal, dropout_p, score_mod=None if program is None else program.text(),
        slopes=slopes, position=position if slopes is not None else None)



def _check_relative(table: torch.Tensor, problem: Problem) -> None:
    if problem.varlen:
        raise ValueError(f"{WHAT}: a relative position bias (position='relative') cannot be combined with cu_seqlens")
    if table.shape[1] != problem.len_q + problem.len_k - 1:
        raise ValueError(f"{WHAT}: the relative bias table must hold Tq + Tk - 1 = {problem.len_q + problem.len_k - 1} "
                         f"distances, got {table.shape[1]}")


def mask_keeps(attn_mask: torch.Tensor) -> torch.Tensor:
    """bool, the shape of ``attn_mask``: True where a key is not excluded from ``bias="auto"``'s count.

    A bool mask is its own answer; a float (additive) mask excludes a key where it is at most
    :data:`~attnrewrite.kernels.checks.MASKED_SCORE` (-9000): -inf, ``torch.finfo(dtype).min`` (what HF's
    attention masks hold for a masked key), BERT's ``(1 - m) · -10000`` in any dtype.  The rewriter reads
    the same values as masked, so a rewritten site hands its mask over as it is, without a copy turning
    them into -inf.  Such a key's weight is exactly 0 (sigmoid(s - 9000) underflows in every float
    dtype), so the rule decides only the count; any higher value is a bias and the key is counted.
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():  # an integer bias has no -inf: it excludes no key
        return torch.ones_like(attn_mask, dtype=torch.bool)
    return attn_mask > MASKED_SCORE


def resolve_bias(
    bias: str | float,
    problem: Problem,
    attn_mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cu_seqlens_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bias b as ``dtype``: [Z, Hq] (Z = B, or N when packed), one b per sequence and query head, or,
    for ``bias="auto"`` when the count differs between query rows (causal, or a mask that varies along the
    queries), [Z|1, Hq, Tq] (Tq = total_q when packed), one per query row.

    ``attn_mask`` is the 4-d view of the user's mask (see :func:`mask_keeps` for what it excludes).
    """
    shape = (problem.batch, problem.heads_q)
    if bias != "auto":
        return torch.full((1, 1), float(bias), dtype=dtype, device=device).expand(shape)
    if problem.causal != CAUSAL_NONE or (attn_mask is not None and attn_mask.shape[2] > 1):
        n_visible = _visible_per_row(problem, attn_mask, kv_lens, cu_seqlens_q, cu_seqlens_k, device)
        n_visible = n_visible.to(dtype).clamp_(min=1.0)
        return (-torch.log(n_visible)).expand(n_visible.shape[0], problem.heads_q, n_visible.shape[2])
    if cu_seqlens_k is not None:
        n_valid = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).view(-1, 1)
    else:
        n_valid = torch.full((1, 1), problem.len_k, device=device)
        if kv_lens is not None:
            n_valid = kv_lens.view(-1, 1).clamp(0, problem.len_k)
        if attn_mask is not None:  # one row of keys for every query: [Bm, Hm, 1, Tk]
            seen = mask_keeps(attn_mask).expand(*attn_mask.shape[:3], problem.len_k)[:, :, 0]
            if kv_lens is not None:
                key_index = torch.arange(problem.len_k, device=seen.device)
                seen = seen & (key_index < kv_lens.view(-1, 1, 1))
            n_valid = seen.sum(dim=-1)
    n_valid = n_valid.to(dtype).clamp_(min=1.0)
    return (-torch.log(n_valid)).expand(shape)


def _visible_per_row(problem: Problem, attn_mask: torch.Tensor | None, kv_lens: torch.Tensor | None,
                     cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """n_i, int [Z|1, Hm, Tq]: the keys query row i sees — causal (top-left or bottom-right) in a causal
    call, within kv_lens / its packed sequence, and not excluded by the mask (:func:`mask_keeps`).

    Packed (``cu_seqlens``, causal only): [1, 1, total_q], counted from each row's place in its sequence.
    Without a mask the count is arithmetic (min(i + shift + 1, n_k)); with one it is a sum over the mask.
    """
    rows = torch.arange(problem.len_q, device=device)
    causal = problem.causal != CAUSAL_NONE
    if cu_seqlens_k is not None:
        cu_q = cu_seqlens_q
        seq = torch.searchsorted(cu_q[1:].long(), rows, right=True)  # the sequence of each packed row
        local = rows - cu_q[seq].long()
        len_q_s = (cu_q[1:] - cu_q[:-1]).long()[seq]
        len_k_s = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[seq]
        shift = torch.zeros_like(local) if problem.causal == CAUSAL_TOP_LEFT else len_k_s - len_q_s
        return torch.minimum(local + shift + 1, len_k_s).clamp(min=0).view(1, 1, -1)
    n_k = torch.full((1,), problem.len_k, device=device) if kv_lens is None else kv_lens.long().clamp(0, problem.len_k)
    shift = torch.zeros_like(n_k) if problem.causal == CAUSAL_TOP_LEFT else n_k - problem.len_q  # [B|1]
    if attn_mask is None:  # causal here (a call without a mask nor causality has one count per sequence)
        last = rows.view(1, -1) + shift.view(-1, 1)  # the last key each row may see
        return torch.minimum(last + 1, n_k.view(-1, 1)).clamp(min=0).unsqueeze(1)  # [B|1, 1, Tq]
    keys = torch.arange(problem.len_k, device=device)
    seen = (keys < n_k.view(-1, 1, 1)).expand(-1, problem.len_q, -1)  # [B|1, Tq, Tk]
    if causal:
        seen = seen & (keys.view(1, 1, -1) <= rows.view(1, -1, 1) + shift.view(-1, 1, 1))
    return (mask_keeps(attn_mask) & seen.unsqueeze(1)).sum(dim=-1)  # [B|Bm, Hm, Tq]


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
              bias, kv_lens, cu_seqlens_q, cu_seqlens_k, causal_align) -> Problem:
    """The sizes of a checked call; ``impl`` is checked by :func:`_resolve_impl`."""
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa, dtypes=_FLOAT_DTYPES + (torch.float64,))
    check_dropout(dropout_p, WHAT, supported=True)
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(f"sigmoid attention: causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    if not (bias == "auto" or (isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias))):
        raise ValueError(f"sigmoid attention: bias must be 'auto' or a finite number, got {bias!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"sigmoid attention: scale must be a finite number or None, got {scale!r}")

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, attn_mask, kv_lens)
        batch = cu_seqlens_q.shape[0] - 1
    if attn_mask is not None:
        _check_mask(attn_mask, q, batch, heads_q, len_q, len_k)
    if kv_lens is not None:
        check_kv_lens(kv_lens, batch, WHAT)
        if kv_lens.device != q.device:
            raise ValueError(f"sigmoid attention: kv_lens is on {kv_lens.device}, q on {q.device}")
    causal = CAUSAL_NONE if not is_causal else CAUSAL_TOP_LEFT if causal_align == "top_left" else CAUSAL_BOTTOM_RIGHT
    return Problem(batch, heads_q, heads_kv, len_q, len_k, dim, v.shape[3],
                   1.0 / math.sqrt(dim) if scale is None else float(scale), causal, varlen)


def _check_mask(attn_mask, q, batch, heads_q, len_q, len_k):
    check_mask_dtype(attn_mask, WHAT)
    if attn_mask.device != q.device:
        raise ValueError(f"sigmoid attention: attn_mask is on {attn_mask.device}, q on {q.device}")
    target = (batch, heads_q, len_q, len_k)
    padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(padded, target)):
        raise ValueError(f"sigmoid attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"[B, Hq, Tq, Tk] = {list(target)}")


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, attn_mask, kv_lens):
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("sigmoid attention: cu_seqlens_q and cu_seqlens_k must be given together")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"sigmoid attention: {name} must be 1-d [N+1] with N >= 1, got shape {tuple(cu.shape)}")
        if cu.dtype != torch.int32:
            raise TypeError(f"sigmoid attention: {name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"sigmoid attention: {name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"sigmoid attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must describe the same number of sequences")
    if q.shape[0] != 1:
        raise ValueError(f"sigmoid attention: packed sequences (cu_seqlens) need batch 1: q [1, H, total_q, D], "
                         f"got q {tuple(q.shape)}")
    if attn_mask is not None or kv_lens is not None:
        raise ValueError("sigmoid attention: attn_mask and kv_lens cannot be combined with cu_seqlens")


def _resolve_impl(impl: str, q: torch.Tensor, dropout_p: float, problem: Problem) -> str:
    # "auto" sends only 16-bit inputs to the kernels: exact float32 products run on the FMA pipes there
    # every score modification compiles in (a fixed function or a generated one): none is a refusal
    refusal = "the Triton kernels do not implement dropout (dropout_p > 0)" if dropout_p > 0.0 else None
    return resolve_impl(
        impl, q.device, what=WHAT, dtype=q.dtype, head_dims=(problem.dim, problem.dim_v),
        triton_dtypes=_FLOAT_DTYPES, auto_dtypes=(torch.float16, torch.bfloat16), max_head_dim=_MAX_HEAD_DIM,
        refusal=refusal,
        available=_op is not None, interpreter_active=lambda: _op.interpreter_active())
