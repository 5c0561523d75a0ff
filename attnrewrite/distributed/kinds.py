"""Each kind's attention for one rank's queries against the whole sequence's keys.

The manager (:mod:`.manager`) gathers the keys, values and key mask of every rank; this module
computes the rank's rows of the result from them.  Softmax and sigmoid normally go round the ring
instead (:mod:`.ring`); their forms here serve the calls the ring does not take (dropout; softmax off
the CPU or in another dtype).  It is plain torch over the kinds' public ops (no
process group), so a W-rank run can be checked in one process.

- softmax, sigmoid: each of the rank's two chunks attends to the keys up to its end.  Without a key
  mask: as two blocks, the keys before the chunk (unmasked) and the chunk's own keys (causal, a
  square block); softmax merges the blocks' partial outputs by their log-sum-exp (on the CPU, through
  torch's flash kernel), sigmoid simply adds them, with ``bias="auto"``'s b_i = −log(i + 1) as a
  [C, 1] row mask.  With a key mask (or dropout, or off the CPU for softmax): one call per chunk with
  the causal mask written for its global positions (the chunk starting at s sees key j iff j ≤ s + i),
  sigmoid's b_i = −log n_i counted over the visible keys and folded into that mask.
- linear: each chunk calls the op on the keys up to its end with ``is_causal=True``: the op aligns
  Tq < Tk bottom-right, which is exactly "the chunk's global positions".  Bidirectional: all keys.
- summary is not computed here (:mod:`.summary`); nor are hashed (4-d inputs: :mod:`.hashed`),
  sliding_window (no dropout: :mod:`.window`) and dual_triangle (where the softmax ring applies:
  :mod:`.dual`) when their forms apply.
- hashed, dual_triangle, sliding_window otherwise, and sigmoid with a position bias (``position_slopes``
  reads global positions): the rank's queries are scattered into a sequence of
  zeros at their global positions, the op runs over the whole sequence and the rank keeps its rows.
  Exact (a row depends on its own query only), but every rank computes all T rows: no saving in time
  or activation memory for these kinds yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.kernels.checks import check_mask_dtype
from attnrewrite.kernels.sigmoid.api import mask_keeps

#: The kinds whose context-parallel form does work proportional to the rank's share of the rows
#: (summary's is :mod:`.summary`, not here).
SHARDED_WORK = ("softmax_attention", "sigmoid_attention", "linear_attention", "summary_attention")
#: The kinds computed over every row on every rank (exact, without savings).
ALL_ROWS = ("hashed_attention", "dual_triangle_attention", "sliding_window_attention")
SUPPORTED = SHARDED_WORK + ALL_ROWS


def as_key_mask(attn_mask: Tensor | None, local_len: int, what: str) -> Tensor | None:
    """``attn_mask`` as a 4-d key mask [B|1, H|1, 1, T_local|1], or a ValueError naming the problem.

    A mask that varies over the queries cannot be context-parallel here: its query rows would be this
    rank's, its key columns everybody's.  Causality is given by ``is_causal``.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"context_parallel: {what}: attn_mask must be a tensor or None, "
                        f"got {type(attn_mask).__name__}")
    check_mask_dtype(attn_mask, f"context_parallel: {what}")
    if attn_mask.requires_grad:
        raise ValueError(f"context_parallel: {what}: an attn_mask that requires grad is not supported")
    if attn_mask.dim() > 4 or attn_mask.dim() == 0:
        raise ValueError(f"context_parallel: {what}: attn_mask must have 1 to 4 dims, got shape {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[-2] != 1 or mask.shape[-1] not in (1, local_len):
        raise ValueError(
            f"context_parallel: {what}: attn_mask of shape {tuple(attn_mask.shape)} is not a key mask; inside "
            f"context_parallel only masks broadcastable from [B, H, 1, T_local={local_len}] (one row for every "
            "query: key padding, a per-key bias) can be sharded; give causality by is_causal")
    return mask


def _causal(start: int, stop: int, device) -> Tensor:
    """[stop − start, stop] bool: query start + i sees key j iff j ≤ start + i."""
    return torch.ones(stop - start, stop, dtype=torch.bool, device=device).tril(diagonal=start)


def _with_causal(mask: Tensor | None, causal: Tensor) -> Tensor:
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def _prefix(mask: Tensor | None, stop: int) -> Tensor | None:
    return None if mask is None or mask.shape[-1] == 1 else mask[..., :stop]


def _per_chunk(q: Tensor, segments, run) -> Tensor:
    """``run(q_chunk, start, stop)`` for each of the rank's chunks, concatenated in local order."""
    outs, offset = [], 0
    for start, stop in segments:
        outs.append(run(q.narrow(-2, offset, stop - start), start, stop))
        offset += stop - start
    return torch.cat(outs, dim=-2)


class _MergedCausalSoftmax(torch.autograd.Function):
    """Softmax attention of one chunk of queries (global positions start … stop − 1) over keys
    [0, stop): the keys before the chunk unmasked and the chunk's own keys causally, two calls of
    torch's CPU flash kernel whose partial outputs are merged by their log-sum-exp.  The backward
    runs the kernel's backward per block with the merged output and log-sum-exp, which gives each
    block its exact share of the gradient (as ring attention does)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, start: int, scale: float | None) -> Tensor:
        blocks = ([(0, start, False)] if start > 0 else []) + [(start, k.shape[-2], True)]
        outs, lses = [], []
        for lo, hi, causal in blocks:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k[..., lo:hi, :].contiguous(), v[..., lo:hi, :].contiguous(), 0.0, causal, scale=scale)
            outs.append(out)
            lses.append(lse)
        lse = torch.logsumexp(torch.stack(lses), dim=0) if len(lses) > 1 else lses[0]
        out = sum(o * torch.exp(part - lse).unsqueeze(-1).to(o.dtype) for o, part in zip(outs, lses))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dks, dvs = torch.zeros_like(q), [], []
        for lo, hi, causal in ctx.blocks:
            dq_part, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, q, k[..., lo:hi, :].contiguous(), v[..., lo:hi, :].contiguous(), out, lse, 0.0, causal,
                scale=ctx.scale)
            dq += dq_part
            dks.append(dk)
            dvs.append(dv)
        return dq, torch.cat(dks, dim=-2), torch.cat(dvs, dim=-2), None, None


def _merged_path_applies(args: dict, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    q = args["q"]
    return (q.device.type == "cpu" and mask is None and args["dropout_p"] == 0.0 and q.dim() == 4
            and q.dtype in (torch.float32, torch.float64) and k.dtype == q.dtype
            and v.shape[-1] == q.shape[-1])  # torch's CPU flash kernel takes one head size


def _softmax(args: dict, k: Tensor, v: Tensor, mask: Tensor | None, segments) -> Tensor:
    common = dict(dropout_p=args["dropout_p"], scale=args["scale"], enable_gqa=args["enable_gqa"])
    if not args["is_causal"]:
        return torch.ops.attnrewrite.softmax_attention(args["q"], k, v, mask, is_causal=False, **common)
    if _merged_path_applies(args, k, v, mask):
        groups = args["q"].shape[-3] // k.shape[-3]
        if groups > 1:  # the flash kernel wants one key head per query head
            k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        return _per_chunk(args["q"], segments, lambda q, start, stop: _MergedCausalSoftmax.apply(
            q.contiguous(), k[..., :stop, :], v[..., :stop, :], start, args["scale"]))

    def run(q, start, stop):
        chunk_mask = _with_causal(_prefix(mask, stop), _causal(start, stop, q.device))
        return torch.ops.attnrewrite.softmax_attention(q, k[..., :stop, :], v[..., :stop, :], chunk_mask,
                                                       is_causal=False, **common)

    return _per_chunk(args["q"], segments, run)


def _sigmoid(args: dict, k: Tensor, v: Tensor, mask: Tensor | None, segments) -> Tensor:
    # a score modification acts on each score before the mask, so it commutes with the split into key ranges
    common = dict(dropout_p=args["dropout_p"], scale=args["scale"], enable_gqa=args["enable_gqa"],
                  score_mod=args.get("score_mod"))
    bias = args["bias"]
    if not args["is_causal"]:
        return torch.ops.attnrewrite.sigmoid_attention(args["q"], k, v, mask, is_causal=False, bias=bias, **common)

    if mask is None:  # the keys before the chunk unmasked, its own keys causally: partial outputs add
        def run_blocks(q, start, stop):
            rows = None if bias is not None else \
                -torch.log(torch.arange(start + 1, stop + 1, device=q.device, dtype=q.dtype)).unsqueeze(-1)
            number = 0.0 if bias is None else bias  # "auto": b_i = −log(i + 1) per row, a [C, 1] mask
            out = torch.ops.attnrewrite.sigmoid_attention(q, k[..., start:stop, :], v[..., start:stop, :], rows,
                                                          is_causal=True, bias=number, **common)
            if start > 0:
                out = out + torch.ops.attnrewrite.sigmoid_attention(q, k[..., :start, :], v[..., :start, :], rows,
                                                                    is_causal=False, bias=number, **common)
            return out

        return _per_chunk(args["q"], segments, run_blocks)

    def run(q, start, stop):
        keys = _prefix(mask, stop)
        visible = _causal(start, stop, q.device)
        if bias is not None:
            return torch.ops.attnrewrite.sigmoid_attention(q, k[..., :stop, :], v[..., :stop, :],
                                                           _with_causal(keys, visible), is_causal=False,
                                                           bias=bias, **common)
        # "auto": b_i = −log n_i, n_i the keys query i sees (the op's rule for what a mask excludes)
        if keys is not None:
            visible = visible & mask_keeps(keys)
        seen = visible.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        folded = torch.where(visible, -torch.log(seen), float("-inf")).to(q.dtype)
        if keys is not None and keys.dtype != torch.bool:
            folded = folded + keys
        return torch.ops.attnrewrite.sigmoid_attention(q, k[..., :stop, :], v[..., :stop, :], folded,
                                                       is_causal=False, bias=0.0, **common)

    return _per_chunk(args["q"], segments, run)


def _linear(args: dict, k: Tensor, v: Tensor, mask: Tensor | None, segments) -> Tensor:
    common = dict(dropout_p=args["dropout_p"], scale=args["scale"], enable_gqa=args["enable_gqa"],
                  feature_map=args["feature_map"], eps=args["eps"])
    if not args["is_causal"]:
        return torch.ops.attnrewrite.linear_attention(args["q"], k, v, mask, is_causal=False, **common)

    def run(q, start, stop):  # causal with Tq < Tk: the op puts the queries at the last Tq positions
        return torch.ops.attnrewrite.linear_attention(q, k[..., :stop, :], v[..., :stop, :], _prefix(mask, stop),
                                                      is_causal=True, **common)

    return _per_chunk(args["q"], segments, run)


def _all_rows(name: str, args: dict, k: Tensor, v: Tensor, mask: Tensor | None, segments) -> Tensor:
    q = args["q"]
    positions = torch.cat([torch.arange(a, b, device=q.device) for a, b in segments])
    whole = q.new_zeros(*q.shape[:-2], k.shape[-2], q.shape[-1]).index_copy(-2, positions, q)
    rest = {key: value for key, value in args.items() if key not in ("q", "k", "v", "attn_mask")}
    out = getattr(torch.ops.attnrewrite, name)(whole, k, v, mask, **rest)
    return out.index_select(-2, positions)


def attend(name: str, args: dict, k: Tensor, v: Tensor, mask: Tensor | None, segments) -> Tensor:
    """The rank's rows of attention kind ``name`` (``"softmax_attention"``, …).

    Args:
        name: the op's name in the ``attnrewrite`` namespace.
        args: the op's arguments by schema name; ``args["q"]`` is the rank's queries [..., T_local, D]
            in local order (its chunks one after the other).
        k, v: the whole sequence's keys and values [..., T, D|Dv] in natural order.
        mask: None or the whole sequence's key mask [B|1, H|1, 1, T|1] (:func:`as_key_mask`, gathered).
        segments: the (start, stop) global positions of the rank's chunks, in local order.

    Returns:
        [..., T_local, Dv]: the rank's rows, in local order.
    """
    if name == "softmax_attention":
        return _softmax(args, k, v, mask, segments)
    if name == "sigmoid_attention" and args.get("position_slopes") is None:
        return _sigmoid(args, k, v, mask, segments)
    if name == "sigmoid_attention":  # a position bias reads global positions: the whole sequence's rows
        return _all_rows(name, args, k, v, mask, segments)
    if name == "linear_attention":
        return _linear(args, k, v, mask, segments)
    if name in ALL_ROWS:
        return _all_rows(name, args, k, v, mask, segments)
    raise NotImplementedError(f"context_parallel: attnrewrite::{name} has no context-parallel form")
