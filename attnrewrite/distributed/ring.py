"""Ring attention for softmax and sigmoid: key/value blocks travel rank to rank, nothing is all-gathered.

Each rank keeps its own queries and, at step s of W, attends to the key/value block of rank
``rank − s`` (mod W) while that block's successor is already on its way (send to the next rank,
receive from the previous one).  Per rank the live memory is its own shard plus one block in flight:
O(T / W) instead of the O(T) of an all-gather.

- sigmoid: the partial outputs of the blocks simply add (no row statistics); ``bias="auto"``'s
  b_i = −log n_i is known before the ring from the key mask alone (n_i counts the keys query i sees)
  and is folded into each block's mask as a per-row term.  In float32 on one CPU thread without a key
  mask, score modification or position bias, each pair runs the op's compiled loop
  (:mod:`attnrewrite.kernels.sigmoid.native`) one (batch, kv head) at a time, added into the ring's
  output and gradient buffers in place (:class:`_CompiledSigmoid`): a pair then holds a head's rows
  besides the ring's buffers, not the pair's output, gradients and recomputed forward.
- softmax: every block yields a partial output and its log-sum-exp; they are merged by a running
  log-sum-exp.  The blocks run torch's CPU flash kernel (memory O(block), not O(block²)).

Both run the ring one key/value head (with its GQA query heads) after the other (:func:`_head_groups`), so the
block at hand, the one arriving and a pair's parts are an H_kv-th of a shard each: a rank holds about its
output, dQ, dK, dV (the single ops hold those, softmax one more whole tensor), not two more K/V shards.

Causal attention uses the load-balanced layout (:mod:`.layout`): a (query chunk, key chunk) pair is
skipped when the keys are entirely in the queries' future, computed causally on the diagonal and
fully before it, so every rank does the same work at every step.

The backward is a ring too: the key/value blocks make the same trip again and each rank adds its
share of dK/dV to an accumulator that travels with the block; after W steps the accumulator is back
at the block's owner.  Softmax's block gradients use the merged output and log-sum-exp (each block
gets its exact share, as in ring attention); sigmoid's recompute each block's forward.

Communication goes through a *ring* object (:class:`P2PRing` on a process group); the computation
never calls torch.distributed itself, so W ranks can be simulated by threads in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from attnrewrite.distributed.layout import segments
from attnrewrite.kernels.checks import SHARDED_SEQUENCE
from attnrewrite.kernels.sigmoid import native as sigmoid_native
from attnrewrite.kernels.sigmoid.api import mask_keeps
from attnrewrite.kernels.sigmoid.chunked import NATIVE_BLOCK, NATIVE_ROWS

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class P2PRing:
    """Point-to-point exchange on a process group: send to the next rank, receive from the previous.

    ``start(tensors, channel)`` posts the sends and receives and returns a function that waits for
    them and returns the received tensors (same shapes and dtypes).  ``channel`` separates exchanges
    that are in flight at the same time (distinct tags).
    """

    _CHANNELS = {"kv": 0, "grad": 8}

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def start(self, tensors: list[Tensor], channel: str) -> Callable[[], list[Tensor]]:
        base = self._CHANNELS[channel]
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        works = []
        for index, (mine, theirs) in enumerate(zip(tensors, received)):
            works.append(dist.isend(mine, self.next, group=self.group, tag=base + index))
            works.append(dist.irecv(theirs, self.prev, group=self.group, tag=base + index))

        def wait() -> list[Tensor]:
            for work in works:
                work.wait()
            return received

        return wait


@dataclass(frozen=True)
class RingSpec:
    """What the ring computes: ``kind`` ("softmax" or "sigmoid"), causality, the scale, GQA, and
    sigmoid's bias (a number; ``None`` when the per-row ``rows`` term carries it) and score modification
    (a program of :mod:`attnrewrite.kernels.score_mods`: it acts on each score before the mask, so it
    commutes with the split into key blocks)."""

    kind: str
    causal: bool
    scale: float | None
    enable_gqa: bool
    bias: float | None
    rank: int
    world: int
    score_mod: str | None = None
    #: sigmoid's position bias: slopes [Hq] or [1] (``position_slopes``) and ``position`` ("j-i" or "|j-i|")
    slopes: Tensor | None = None
    position: str | None = None


def applies(kind: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether the ring computes this call (else the manager all-gathers the keys and values)."""
    if dropout_p != 0.0 or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False  # dropout: the recomputing backward would draw other masks
    if kind == "sigmoid":
        return True
    return (kind == "softmax" and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape[-1] == q.shape[-1] == v.shape[-1])  # torch's CPU flash kernel takes one head size


def additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool or float key mask as an additive float mask (0 / −inf for bool)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def sigmoid_rows(whole_mask: Tensor | None, length: int, positions: Tensor, causal: bool,
                 dtype: torch.dtype) -> Tensor:
    """``bias="auto"``'s b_i = −log n_i for the queries at ``positions`` [T_local] as [B|1, H|1, T_local, 1].

    n_i is the number of keys query i sees: causally the keys up to its position, else all ``length``
    keys; a key mask (the whole sequence's, [B|1, H|1, 1, T|1]) removes the keys it excludes from the
    count (False, or −inf / the dtype's lowest value in a float mask: the op's rule,
    :func:`~attnrewrite.kernels.sigmoid.api.mask_keeps`); n = 0 counts as 1 (as the op does).
    """
    device = positions.device
    if whole_mask is not None:
        valid = mask_keeps(whole_mask).expand(*whole_mask.shape[:-1], length).to(torch.int64)  # [B|1, H|1, 1, T]
        counts = valid.cumsum(-1) if causal else valid.sum(-1, keepdim=True).expand_as(valid)
        seen = counts.squeeze(-2).index_select(-1, positions).unsqueeze(-1)            # [B|1, H|1, Tl, 1]
    elif causal:
        seen = (positions + 1).view(1, 1, -1, 1)
    else:
        seen = torch.full((1, 1, positions.numel(), 1), length, device=device)
    return -torch.log(seen.clamp(min=1).to(dtype))


def _pairs(rank: int, src: int, world: int, chunk: int, causal: bool):
    """(query rows, key rows, diagonal, offset) of the blocks rank ``rank`` computes against rank ``src``'s
    keys; ``offset`` is the key chunk's global start minus the query chunk's (0 on the diagonal)."""
    mine = [index // chunk for index, _ in segments(rank, world, 2 * world * chunk)]
    theirs = [index // chunk for index, _ in segments(src, world, 2 * world * chunk)]
    for qi, q_chunk in enumerate(mine):
        for ki, k_chunk in enumerate(theirs):
            if causal and k_chunk > q_chunk:
                continue  # keys entirely in the queries' future
            yield (slice(qi * chunk, (qi + 1) * chunk), slice(ki * chunk, (ki + 1) * chunk),
                   causal and k_chunk == q_chunk, (k_chunk - q_chunk) * chunk)


def _keys(mask: Tensor | None, rows: slice) -> Tensor | None:
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., rows]


def _gqa_groups(heads: int, heads_kv: int, enable_gqa: bool) -> int:
    """The query heads per key/value head of softmax attention (a clear error when they do not match)."""
    groups = heads // heads_kv if heads_kv else 0
    if groups * heads_kv != heads or (groups > 1 and not enable_gqa):
        raise ValueError(f"context_parallel: softmax attention: q has {heads} heads and k/v {heads_kv}; "
                         "different head counts need enable_gqa=True and a multiple")
    return groups


def _repeat_kv(k: Tensor, v: Tensor, heads: int, enable_gqa: bool) -> tuple[Tensor, Tensor, int]:
    groups = _gqa_groups(heads, k.shape[-3], enable_gqa)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    return k, v, groups


def _row_seen(add: Tensor, diagonal: bool) -> Tensor:
    """[B|1, H|1, Tq|1]: whether each query row sees at least one key of the block under ``add``."""
    visible = add > float("-inf")                                  # [B|1, H|1, 1, Tk]
    if diagonal:
        return visible.cumsum(-1).squeeze(-2) > 0                  # row i sees keys 0..i
    return visible.any(-1)                                          # [B|1, H|1, 1]


def _softmax_block(q, k, v, mask, diagonal, spec):
    """(out, lse) of one block; rows that see no key of the block get lse = −inf."""
    k, v, _ = _repeat_kv(k, v, q.shape[-3], spec.enable_gqa)
    add = additive(mask, q.dtype)
    # the CPU flash kernels take strided slices as they are: no copies of the blocks
    out, lse = _FLASH(q, k, v, 0.0, diagonal, attn_mask=add, scale=spec.scale)
    if add is not None:  # the kernel reports lse 0 (and output 0) for a row with no visible key
        lse = lse.masked_fill(~_row_seen(add, diagonal).expand_as(lse), float("-inf"))
    return out, lse


def _softmax_block_backward(grad, q, k, v, mask, out, lse, diagonal, spec):
    heads_kv = k.shape[-3]
    k, v, groups = _repeat_kv(k, v, q.shape[-3], spec.enable_gqa)
    dq, dk, dv = _FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, diagonal, attn_mask=additive(mask, q.dtype),
                                 scale=spec.scale)
    if groups > 1:
        dk = dk.unflatten(-3, (heads_kv, groups)).sum(-3)
        dv = dv.unflatten(-3, (heads_kv, groups)).sum(-3)
    return dq, dk, dv


def _position_terms(spec, offset: int, dtype) -> tuple[dict, Tensor | None]:
    """The block's position bias: (the op's ``position_slopes``/``position`` arguments, a per-head constant
    [1, Hq|1, 1, 1] to add to its mask, or None).

    The block's op sees local positions a, b (query, key) where the global ones are a + s_q, b + s_k:
    j − i = (b − a) + offset with offset = s_k − s_q.  So "j-i" is the op's own bias plus the constant
    slopes·offset.  "|j-i|": on the diagonal (offset 0) the op's own; off it the two chunks are disjoint,
    so j − i has one sign σ in the whole block and |j − i| = σ(b − a) + σ·offset, "j-i" with slopes σ·slopes.
    """
    if spec.slopes is None:
        return {}, None
    if offset == 0:
        return dict(position_slopes=spec.slopes, position=spec.position), None
    slopes = spec.slopes if spec.position == "j-i" else spec.slopes * (1.0 if offset > 0 else -1.0)
    constant = (slopes.to(dtype) * offset).view(1, -1, 1, 1)
    return dict(position_slopes=slopes, position="j-i"), constant


def _sigmoid_block(q, k, v, mask, rows, diagonal, spec, offset=0):
    common = dict(dropout_p=0.0, is_causal=diagonal, scale=spec.scale, enable_gqa=spec.enable_gqa,
                  score_mod=spec.score_mod)
    position, constant = _position_terms(spec, offset, q.dtype)
    common.update(position)
    if constant is not None:  # added after the score modification, as the position bias is
        mask = constant if mask is None else additive(mask, q.dtype) + constant
    if rows is None:
        return torch.ops.attnrewrite.sigmoid_attention(q, k, v, mask, bias=spec.bias, **common)
    folded = rows if mask is None else rows + additive(mask, rows.dtype)
    return torch.ops.attnrewrite.sigmoid_attention(q, k, v, folded, bias=0.0, **common)


def _sigmoid_block_backward(grad, q, k, v, mask, rows, diagonal, spec, offset=0):
    """(dq, dk, dv) of one block, its forward recomputed (a sigmoid block needs no row statistics)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(_sigmoid_block(*leaves, mask, rows, diagonal, spec, offset), leaves, grad)


def compiled_sigmoid_applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, rows: Tensor | None,
                              spec: RingSpec) -> bool:
    """Whether the sigmoid pairs run the compiled loop (:class:`_CompiledSigmoid`): float32 on the CPU with one
    torch thread (the loop is single-threaded: the chunked op's own rule), no key mask, score modification or
    position bias, shapes the op would accept (else the op runs and raises its own error)."""
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    return (spec.kind == "sigmoid" and mask is None and spec.score_mod is None and spec.slopes is None
            and (rows is not None or spec.bias is not None)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v))
            and q.shape[0] == k.shape[0] == v.shape[0] and k.shape[:-1] == v.shape[:-1]
            and q.shape[-1] == k.shape[-1] and heads_q % heads_kv == 0 and (heads_q == heads_kv or spec.enable_gqa)
            and torch.get_num_threads() == 1 and sigmoid_native.forward_available())


class _CompiledSigmoid:
    """A rank's sigmoid pairs through the op's compiled loop (:func:`~attnrewrite.kernels.sigmoid.native.
    sigmoid_forward` / ``sigmoid_backward``), one (batch, kv head) at a time.

    The loop takes a kv head's query rows with its G query heads interleaved per position ([1, C·G, D]), one
    bias per row (b, or ``rows``' b_i) and, on a causal diagonal, each row's key limit (row i sees keys 0..i).
    Its results — a head's output rows, or its dQ / dK / dV parts, each [C·G or C, D] — are added into the
    ring's buffers at once (dQ and dK with the factor ``scale`` the loop leaves out), so nothing the size of
    a pair outlives the head that made it.
    """

    def __init__(self, q: Tensor, k: Tensor, rows: Tensor | None, spec: RingSpec, chunk: int):
        self.groups = q.shape[-3] // k.shape[-3]
        self.scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
        self.rows, self.bias = rows, spec.bias
        # on the diagonal, folded row t·G + g (position t) sees keys j < t + 1
        self.limit = torch.arange(1, chunk + 1).repeat_interleave(self.groups).view(1, -1)
        self.loop = dict(chunk=max(1, min(NATIVE_ROWS, chunk * self.groups)), block=NATIVE_BLOCK)

    def _fold(self, x: Tensor, b: int, h: int, rows: slice) -> Tensor:
        """The G query heads of kv head h, rows ``rows``, as a contiguous [1, C·G, X] (a view when G = 1)."""
        g = self.groups
        return x[b, h * g:(h + 1) * g, rows].transpose(0, 1).reshape(1, -1, x.shape[-1]).contiguous()

    def _add_unfolded(self, target: Tensor, b: int, h: int, rows: slice, folded: Tensor, alpha: float = 1.0):
        g = self.groups
        target[b, h * g:(h + 1) * g, rows].add_(folded.view(-1, g, folded.shape[-1]).transpose(0, 1), alpha=alpha)

    def _head(self, k: Tensor, v: Tensor, b: int, h: int, q_rows: slice, k_rows: slice, diagonal: bool):
        """(k, v, bias, limit) of the loop for kv head h of batch b."""
        g, length = self.groups, q_rows.stop - q_rows.start
        if self.rows is None:
            bias = torch.full((1, length * g), float(self.bias))
        else:  # [B|1, H|1, Tl, 1] -> this head group's rows, interleaved
            r = self.rows[min(b, self.rows.shape[0] - 1)]
            r = r[h * g:(h + 1) * g] if r.shape[0] > 1 else r.expand(g, *r.shape[1:])
            bias = r[:, q_rows, 0].transpose(0, 1).reshape(1, -1).to(torch.float32).contiguous()
        keys = k[b, h, k_rows].unsqueeze(0).contiguous()
        values = v[b, h, k_rows].unsqueeze(0).contiguous()
        return keys, values, bias, (self.limit if diagonal else None)

    def forward(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_rows: slice, k_rows: slice, diagonal: bool):
        """out[..., q_rows, :] += the pair's sigmoid attention."""
        for b in range(q.shape[0]):
            for h in range(k.shape[-3]):
                keys, values, bias, limit = self._head(k, v, b, h, q_rows, k_rows, diagonal)
                part = sigmoid_native.sigmoid_forward(self._fold(q, b, h, q_rows), keys, values, bias, limit,
                                                      self.scale, **self.loop)
                self._add_unfolded(out, b, h, q_rows, part)

    def backward(self, dq: Tensor, dk: Tensor, dv: Tensor, grad: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 q_rows: slice, k_rows: slice, diagonal: bool):
        """dq[..., q_rows, :], dk[..., k_rows, :], dv[..., k_rows, :] += the pair's gradient parts."""
        for b in range(q.shape[0]):
            for h in range(k.shape[-3]):
                keys, values, bias, limit = self._head(k, v, b, h, q_rows, k_rows, diagonal)
                dq_part, dk_part, dv_part = sigmoid_native.sigmoid_backward(
                    self._fold(grad, b, h, q_rows), self._fold(q, b, h, q_rows), keys, values, bias, limit,
                    self.scale, **self.loop)
                self._add_unfolded(dq, b, h, q_rows, dq_part, alpha=self.scale)
                dk[b, h, k_rows].add_(dk_part[0], alpha=self.scale)
                dv[b, h, k_rows].add_(dv_part[0])
                dq_part = dk_part = dv_part = None


def _merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge a softmax partial (``out``, ``lse``) of the same rows into (``acc_out``, ``acc_lse``), in place
    (``out`` is scratch)."""
    total = torch.logaddexp(acc_lse, lse)
    empty = total == float("-inf")
    safe = torch.where(empty, 0.0, total)
    weight_acc = torch.where(empty, 0.0, torch.exp(acc_lse - safe)).unsqueeze(-1)
    weight_new = torch.where(empty, 0.0, torch.exp(lse - safe)).unsqueeze(-1)
    acc_out.mul_(weight_acc.to(acc_out.dtype)).add_(out.mul_(weight_new.to(out.dtype)))
    acc_lse.copy_(total)


def _head_groups(q: Tensor, k: Tensor, mask: Tensor | None, rows: Tensor | None, spec: RingSpec):
    """The head groups the ring runs one after the other: (query heads, key/value heads, and the mask, ``rows`` and
    spec of those heads).

    The ring runs one key/value head (with its GQA query heads) at a time: then the key/value block at hand and the
    one arriving, and a pair's parts, are an H_kv-th of a shard each, while the rank's output, LSE and gradients
    (whole shards, as the single op holds them) are written through views.  Sigmoid with head counts the op would
    refuse runs all heads at once (the op raises its own error).
    """
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if spec.kind == "softmax":
        groups = _gqa_groups(heads_q, heads_kv, spec.enable_gqa)
    elif heads_kv and heads_q % heads_kv == 0 and (heads_q == heads_kv or spec.enable_gqa):
        groups = heads_q // heads_kv
    else:
        return [(slice(None), slice(None), mask, rows, spec)]

    def heads(x, qh):  # a per-head tensor [B|1, H|1, ...]: these heads' part of it
        return x if x is None or x.shape[1] == 1 else x[:, qh]

    result = []
    for h in range(heads_kv):
        qh = slice(h * groups, (h + 1) * groups)
        spec_h = spec
        if spec.slopes is not None and spec.slopes.numel() > 1:
            spec_h = replace(spec, slopes=spec.slopes[qh])
        result.append((qh, slice(h, h + 1), heads(mask, qh), heads(rows, qh), spec_h))
    return result


def _forward(q, k, v, mask, rows, spec: RingSpec, ring):
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    lse = q.new_full(q.shape[:-1], float("-inf")) if spec.kind == "softmax" else None
    for qh, kh, mask_h, rows_h, spec_h in _head_groups(q, k, mask, rows, spec):
        _forward_heads(q[:, qh], k[:, kh], v[:, kh], mask_h, rows_h, out[:, qh], None if lse is None else lse[:, qh],
                       spec_h, ring)
    return out, lse


def _forward_heads(q, k, v, mask, rows, out, lse, spec: RingSpec, ring):
    """The ring over these heads: their rows of ``out`` (and ``lse``) written in place."""
    chunk = q.shape[-2] // 2
    compiled = (_CompiledSigmoid(q, k, rows, spec, chunk) if compiled_sigmoid_applies(q, k, v, mask, rows, spec)
                else None)
    block = [k, v] + ([mask] if mask is not None else [])
    for step in range(spec.world):
        src = (spec.rank - step) % spec.world
        pending = ring.start(block, "kv") if step < spec.world - 1 else None
        bk, bv, bmask = block[0], block[1], block[2] if mask is not None else None
        for q_rows, k_rows, diagonal, offset in _pairs(spec.rank, src, spec.world, chunk, spec.causal):
            if compiled is not None:
                compiled.forward(out, q, bk, bv, q_rows, k_rows, diagonal)
                continue
            qb, kb, vb, mb = q[..., q_rows, :], bk[..., k_rows, :], bv[..., k_rows, :], _keys(bmask, k_rows)
            if spec.kind == "softmax":
                o, l = _softmax_block(qb, kb, vb, mb, diagonal, spec)
                _merge_into(out[..., q_rows, :], lse[..., q_rows], o, l)
                o = l = None
            else:
                r = None if rows is None else rows[..., q_rows, :]
                out[..., q_rows, :] += _sigmoid_block(qb, kb, vb, mb, r, diagonal, spec, offset)
        block = bk = bv = bmask = qb = kb = vb = mb = None  # done with this block before the next arrives
        if pending is not None:
            block = pending()


def _backward(grad, q, k, v, mask, rows, out, lse, spec: RingSpec, ring):
    dq = torch.zeros_like(q)
    dk, dv = k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous: they travel in place, piece by piece
    if lse is not None:  # a row that sees no key at all: every weight exp(s − lse) must be 0
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    for qh, kh, mask_h, rows_h, spec_h in _head_groups(q, k, mask, rows, spec):
        _backward_heads(grad[:, qh], q[:, qh], k[:, kh], v[:, kh], mask_h, rows_h,
                        None if out is None else out[:, qh], None if lse is None else lse[:, qh],
                        dq[:, qh], dk[:, kh], dv[:, kh], spec_h, ring)
    return dq, dk, dv


def _backward_heads(grad, q, k, v, mask, rows, out, lse, dq, dk, dv, spec: RingSpec, ring):
    """The backward ring over these heads: their dQ, dK, dV accumulated in place (dK/dV back at home at the end)."""
    chunk = q.shape[-2] // 2
    compiled = (_CompiledSigmoid(q, k, rows, spec, chunk) if compiled_sigmoid_applies(q, k, v, mask, rows, spec)
                else None)
    block = [k, v] + ([mask] if mask is not None else [])
    for step in range(spec.world):
        src = (spec.rank - step) % spec.world
        pending = ring.start(block, "kv") if step < spec.world - 1 else None
        bk, bv, bmask = block[0], block[1], block[2] if mask is not None else None
        for q_rows, k_rows, diagonal, offset in _pairs(spec.rank, src, spec.world, chunk, spec.causal):
            if compiled is not None:
                compiled.backward(dq, dk, dv, grad, q, bk, bv, q_rows, k_rows, diagonal)
                continue
            qb, kb, vb, mb = q[..., q_rows, :], bk[..., k_rows, :], bv[..., k_rows, :], _keys(bmask, k_rows)
            gb = grad[..., q_rows, :]
            if spec.kind == "softmax":
                dqb, dkb, dvb = _softmax_block_backward(gb, qb, kb, vb, mb, out[..., q_rows, :], lse[..., q_rows],
                                                        diagonal, spec)
            else:
                r = None if rows is None else rows[..., q_rows, :]
                dqb, dkb, dvb = _sigmoid_block_backward(gb, qb, kb, vb, mb, r, diagonal, spec, offset)
            dq[..., q_rows, :] += dqb
            dk[..., k_rows, :] += dkb
            dv[..., k_rows, :] += dvb
            dqb = dkb = dvb = None  # added in: not alive while the next pair computes its own
        # this block is done: let it go before its gradients travel (one block fewer alive at the peak)
        block = bk = bv = bmask = qb = kb = vb = mb = None
        # the accumulated dK/dV of this block go on with it; after the last step they reach their owner
        _travel_in_place(dk, ring)
        _travel_in_place(dv, ring)
        if pending is not None:
            block = pending()


#: Pieces a travelling dK or dV is sent in: while a piece travels, its incoming copy is the only extra memory.
TRAVEL_PIECES = 8


def _travel_in_place(tensor: Tensor, ring) -> None:
    """Send ``tensor`` to the next rank and replace it, in place, by the previous rank's, one piece after the other:
    a piece is overwritten only once it has left, so the exchange holds one piece more than the tensor (two when
    ``tensor`` is a strided view, a head group's slice: a piece is sent as a contiguous copy), not a second tensor."""
    if tensor.is_contiguous():
        flat = tensor.view(-1)
        pieces = flat.chunk(min(TRAVEL_PIECES, max(1, flat.numel())))
    else:  # pieces along the sequence
        pieces = tensor.chunk(min(TRAVEL_PIECES, max(1, tensor.shape[-2])), dim=-2)
    for piece in pieces:
        arrived, = ring.start([piece], "grad")()
        piece.copy_(arrived)
        arrived = None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, rows, spec, ring):
        with torch.no_grad():
            out, lse = _forward(q, k, v, mask, rows, spec, ring)
        # sigmoid's backward does not read the output (it recomputes each pair's weights)
        ctx.save_for_backward(q, k, v, mask, rows, out if spec.kind == "softmax" else None, lse)
        ctx.spec, ctx.ring = spec, ring
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, rows, out, lse = ctx.saved_tensors
        # the blocks' ops run on shards on purpose: past the manager's guard (SHARDED_SEQUENCE) and
        # around its torch-function mode, which would route them back into the ring
        SHARDED_SEQUENCE.depth += 1
        try:
            with torch._C.DisableTorchFunction():
                dq, dk, dv = _backward(grad, q, k, v, mask, rows, out, lse, ctx.spec, ctx.ring)
        finally:
            SHARDED_SEQUENCE.depth -= 1
        return dq, dk, dv, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, rows: Tensor | None, spec: RingSpec,
                   ring) -> Tensor:
    """This rank's rows of softmax or sigmoid attention over the whole sequence, by the ring.

    Args:
        q, k, v: the rank's shard [B, H|Hkv, T_local, D|Dv] in local order (its two chunks).
        mask: None or the rank's key mask [B|1, H|1, 1, T_local|1] (bool or float; not differentiated).
        rows: sigmoid ``bias="auto"`` only: :func:`sigmoid_rows` for the rank's queries (else None).
        spec: what to compute and where this rank is in the ring.
        ring: the exchange (:class:`P2PRing`, or a stand-in with the same ``start``).
    """
    if q.shape[-2] % 2 or k.shape[-2] != q.shape[-2] or v.shape[-2] != q.shape[-2]:
        raise ValueError(f"ring attention: q/k/v must hold the rank's two equal chunks, got {q.shape[-2]}, "
                         f"{k.shape[-2]}, {v.shape[-2]} positions")
    if mask is not None and mask.requires_grad:
        raise ValueError("context_parallel: an attn_mask that requires grad is not supported")
    return _RingAttention.apply(q, k, v, mask, rows, spec, ring)
