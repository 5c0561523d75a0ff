"""Input checks shared by the kinds' operators: a clear error naming the first problem.

Every kind raises one exception type per fault:

- ``TypeError`` — an argument has the wrong type: not a tensor where one is needed, or a tensor
  whose dtype that argument can never have (integer q/k/v, a float ``kv_lens``, an integer
  ``attn_mask``, a state that is not float32/float64, int64 ``cu_seqlens`` where int32 is required).
- ``ValueError`` — every argument is of an acceptable type but the call is not: shapes that do not
  pair up, tensors on different devices, option values out of range, a mask
  the kind cannot honour, or inputs the chosen implementation cannot take
  (:func:`attnrewrite.kernels._ops.resolve_impl`).

- :class:`DtypeMismatchError` (a ``RuntimeError`` and a ``ValueError``) — q, k, v of different dtypes:
  SDPA raises ``RuntimeError`` for it outside autocast (inside autocast the public ops cast, as SDPA
  does: :func:`attnrewrite.kernels._ops.sdpa_autocast`), so code written against SDPA catches ours.

Every message starts with the operation it comes from (``what``, e.g. ``"summary attention"``).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
from torch import Tensor

#: Float-mask entries at or below this exclude the key (−inf, ``finfo.min``, BERT's −1e4 in any float
#: dtype: −9984 in bfloat16): the rewriter's rule, :data:`attnrewrite.ir.spec.MASKED_SCORE`, which says why
#: −9000 (the floors keep the kernels from importing it; tests/kernels/test_masked_score.py keeps the two equal).
MASKED_SCORE = -9e3


class DtypeMismatchError(RuntimeError, ValueError):
    """q, k, v of different dtypes: SDPA's error type (``RuntimeError``), and a ``ValueError`` as
    every other inconsistent call here."""


def check_qkv(q: Tensor, k: Tensor, v: Tensor, what: str, *, enable_gqa: bool | None = None,
              dtypes: Sequence[torch.dtype] | None = None, any_leading_dims: bool = False) -> None:
    """q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]: floating-point tensors of one dtype and
    device whose shapes pair up.

    Args:
        what: the operation, at the head of every message.
        enable_gqa: when given, the head counts are checked too (:func:`check_heads`).
        dtypes: the dtypes the operation takes (default: any floating-point dtype).
        any_leading_dims: SDPA's layout [..., (H,) T, D] with any leading dims, instead of exactly 4-d;
            then only the dims every layout has are compared (head dims, number of keys, heads).

    Raises:
        TypeError: an input is not a tensor, not floating point, or of a dtype not in ``dtypes``.
        DtypeMismatchError: q, k, v differ in dtype (as SDPA, which refuses any mix outside autocast).
        ValueError: a rank, device or shape does not pair up.
    """
    named = (("q", q), ("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in named:
        if any_leading_dims and t.dim() < 2:
            raise ValueError(f"{what}: {name} must have at least 2 dims [..., T, D], got shape {tuple(t.shape)}")
        if not any_leading_dims and t.dim() != 4:
            raise ValueError(f"{what}: {name} must be 4-d [B, H, T, D], got shape {tuple(t.shape)}")
    for name, t in named:
        if not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DtypeMismatchError(f"{what}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if dtypes is not None and q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{what}: dtype {q.dtype} is not supported ({names})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not any_leading_dims and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{what}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{what}: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    # SDPA's layout compares the number of keys only; [B, H, T, D] pairs heads as well
    kv_dims = slice(-2, -1) if any_leading_dims else slice(0, 3)
    if k.shape[kv_dims] != v.shape[kv_dims]:
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and number of keys")
    if enable_gqa is not None and q.dim() >= 3 and k.dim() >= 3:
        check_heads(q, k, enable_gqa, what)


def check_heads(q: Tensor, k: Tensor, enable_gqa: bool, what: str) -> None:
    """The head counts of q [..., Hq, Tq, D] and k [..., Hkv, Tk, D] pair up: equal, or (with
    ``enable_gqa``, as in SDPA) Hq a multiple of Hkv.  Raises ValueError otherwise."""
    hq, hk = q.shape[-3], k.shape[-3]
    if hq == hk:
        return
    if not enable_gqa:
        raise ValueError(f"{what}: q has {hq} heads and k has {hk}: pass enable_gqa=True for grouped-query attention")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{what}: grouped-query attention needs query heads ({hq}) to be a multiple of "
                         f"key/value heads ({hk})")


def check_dropout(dropout_p: float, what: str, *, supported: bool) -> None:
    """``dropout_p`` lies in [0, 1) where the operation implements dropout, and is 0 where it does not."""
    if supported and not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{what}: dropout_p must lie in [0, 1), got {dropout_p}")
    if not supported and dropout_p != 0.0:
        raise ValueError(f"{what}: dropout_p must be 0 ({what} has no dropout on its weights), got {dropout_p}")


def check_mask_dtype(attn_mask: Any, what: str, *, like: Tensor | None = None) -> None:
    """``attn_mask`` is a bool (True = may attend) or floating-point (added to the scores) tensor.

    With ``like`` (q), a float mask must also have its dtype, for operators whose kernels add it as it is.

    Raises:
        TypeError: not a tensor, or neither bool nor floating point.
        ValueError: a float mask of another dtype than ``like``.
    """
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{what}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{what}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if like is not None and attn_mask.is_floating_point() and attn_mask.dtype != like.dtype:
        raise ValueError(f"{what}: a float attn_mask must have q's dtype ({like.dtype}), got {attn_mask.dtype}")


def key_padding_mask(attn_mask: Tensor, batch: int, len_k: int, what: str) -> Tensor:
    """The [B or 1, Tk or 1] view of a key-padding mask broadcastable from [B, 1, 1, Tk] (bool or float,
    as the caller reads it), for kinds that can honour no other mask.

    Raises:
        TypeError: see :func:`check_mask_dtype`.
        ValueError: the mask varies across heads or queries (or has more than 4 dims).
    """
    check_mask_dtype(attn_mask, what)
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if (attn_mask.dim() > 4 or shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch)
            or shape[3] not in (1, len_k)):
        raise ValueError(
            f"{what}: attn_mask of shape {tuple(attn_mask.shape)} is not a key-padding mask (broadcastable from "
            f"[B, 1, 1, Tk] = [{batch}, 1, 1, {len_k}]); {what} cannot honour a mask that varies across heads "
            "or queries (use is_causal for causal masking)")
    return attn_mask.reshape(shape)[:, 0, 0, :]


def check_kv_lens(kv_lens: Any, batch: int, what: str) -> None:
    """``kv_lens`` is an integer tensor [B]: the number of valid keys of each sequence."""
    if not isinstance(kv_lens, Tensor) or kv_lens.dtype.is_floating_point or kv_lens.dtype.is_complex \
            or kv_lens.dtype == torch.bool:
        got = kv_lens.dtype if isinstance(kv_lens, Tensor) else type(kv_lens).__name__
        raise TypeError(f"{what}: kv_lens must be an integer tensor [B], got {got}")
    if kv_lens.dim() != 1 or kv_lens.shape[0] != batch:
        raise ValueError(f"{what}: kv_lens must be [B] = [{batch}], got shape {tuple(kv_lens.shape)}")


_TORCH_CP_MODULE = "torch.distributed.tensor.experimental._context_parallel._attention"


def torch_context_parallel_active() -> bool:
    """Whether torch's own context-parallel manager is on (``torch.distributed.tensor.experimental
    .context_parallel``, or its module-wrapper API).

    torch 2.13 marks it in two places: the monkey-patching manager replaces
    ``F.scaled_dot_product_attention`` by a wrapper it records in ``_replaced_functions``, and both
    of its APIs install ``_sdpa_handler`` among DTensor's custom op handlers.  Nothing is imported
    here: when that module was never imported, the manager cannot be on.
    """
    import sys

    cp = sys.modules.get(_TORCH_CP_MODULE)
    if cp is None:
        return False
    import torch.nn.functional as F

    if F.scaled_dot_product_attention in getattr(cp, "_replaced_functions", {}):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    handler = getattr(cp, "_sdpa_handler", None)
    try:
        handlers = dtensor.DTensor._op_dispatcher._custom_op_handlers.values()
    except AttributeError:
        return False
    return handler is not None and any(h is handler for h in handlers)


def refuse_torch_context_parallel(what: str) -> None:
    """Raise inside torch's context-parallel manager: it shards the sequence but only knows SDPA, so
    one of our ops there would attend over this rank's shard alone — a wrong result, silently.  Also
    raise inside attnrewrite's own manager for a call that does not come through it
    (:func:`refuse_sharded_sequence`)."""
    refuse_sharded_sequence(what)
    if torch_context_parallel_active():
        raise RuntimeError(
            f"{what} was called inside torch.distributed.tensor.experimental.context_parallel, which shards "
            "the sequence but cannot run attnrewrite's ops (they would attend over this rank's shard only). "
            "Use attnrewrite.distributed.context_parallel(mesh, buffers=..., buffer_seq_dims=...) instead: "
            "the same signature and sharding, with every attnrewrite kind and SDPA made context-parallel.")


class _ShardedSequence(threading.local):
    """Set by :mod:`attnrewrite.distributed` while its context-parallel manager is on (``owner``) and
    while it runs an op on purpose (``depth``): any other call of a public op or of a forward kernel
    then sees only this rank's shard and must not run."""

    owner: str | None = None
    depth: int = 0


SHARDED_SEQUENCE = _ShardedSequence()


def refuse_sharded_sequence(what: str) -> None:
    """Raise when the sequence is sharded by attnrewrite's context-parallel manager and this call did
    not come through it (a compiled graph calling the op or its kernels: the manager sees eager calls)."""
    if SHARDED_SEQUENCE.owner is not None and SHARDED_SEQUENCE.depth == 0:
        raise RuntimeError(
            f"{what} was called inside {SHARDED_SEQUENCE.owner} without going through it (from a graph "
            "compiled by torch.compile, whose calls the manager cannot see): it would attend over this "
            "rank's shard only.  Run the model eagerly inside context_parallel (an attnrewrite-rewritten "
            "model: use attnrewrite.hf's attention functions or call attnrewrite.ops directly).")


#: the position biases (``position=``) the ops compute from the query and key indices i, j:
#: slope_h · (j − i) and slope_h · |j − i|
POSITIONS = ("j-i", "|j-i|")


#: ``position=`` of a relative position bias R[h, j − i] (T5's buckets), read from a table by distance
RELATIVE = "relative"


def _check_relative_table(table: Tensor | None, q: Tensor, heads_q: int, what: str) -> Tensor:
    """R as [Hq, Tq + Tk − 1] (float64 for float64 q, else float32; expanded from one head, not detached)."""
    length = None if not isinstance(table, torch.Tensor) or table.dim() != 2 else table.shape[1]
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        raise TypeError(f"{what}: position='relative' needs position_slopes, a float table R [Hq, Tq + Tk - 1], "
                        f"got {type(table).__name__ if not isinstance(table, torch.Tensor) else table.dtype}")
    if table.dim() != 2 or table.shape[0] not in (1, heads_q):
        raise ValueError(f"{what}: the relative bias table must be [Hq={heads_q} or 1, Tq + Tk - 1], got shape "
                         f"{tuple(table.shape)}")
    if table.device != q.device:
        raise ValueError(f"{what}: the relative bias table is on {table.device}, q on {q.device}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return table.to(dtype).expand(heads_q, length).contiguous()


def check_position_slopes(slopes: Tensor | None, position: str | None, q: Tensor, heads_q: int,
                          what: str, relative_ok: bool = False) -> Tensor | None:
    """A position bias's slopes (``position_slopes``, with ``position`` one of :data:`POSITIONS`) as a
    contiguous [Hq] float tensor (float64 for float64 q, else float32), or None without a position bias.

    Raises:
        TypeError: slopes missing or not a float tensor.
        ValueError: an unknown ``position``, neither Hq slopes nor one, on another device than q, or slopes
            that require grad (the ops compute no gradient for them).

    ``relative_ok`` (an op that reads relative biases): ``position="relative"`` takes ``slopes`` as the table
    R [Hq or 1, Tq + Tk − 1] (:func:`check_relative_table`), which may require grad.
    """
    if position is None and slopes is None:
        return None
    if position == RELATIVE and relative_ok:
        return _check_relative_table(slopes, q, heads_q, what)
    if position not in POSITIONS:
        raise ValueError(f"{what}: position must be one of {', '.join(map(repr, POSITIONS))} (with "
                         f"position_slopes), got {position!r}")
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"{what}: position={position!r} needs position_slopes, a tensor of {heads_q} "
                        f"slopes, got {type(slopes).__name__}")
    if not slopes.is_floating_point():
        raise TypeError(f"{what}: position_slopes must be a float tensor, got {slopes.dtype}")
    if slopes.numel() not in (1, heads_q):
        raise ValueError(f"{what}: position_slopes must hold one slope per query head ({heads_q}) or "
                         f"one, got shape {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"{what}: position_slopes is on {slopes.device}, q on {q.device}")
    if slopes.requires_grad:
        raise ValueError(f"{what}: position_slopes requires grad, but no gradient is computed for the "
                         "slopes; pass the bias as a float attn_mask instead")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return slopes.detach().to(dtype).reshape(-1).expand(heads_q).contiguous()
