"""Dual-triangle attention, context-parallel: two softmax rings, no rank holds the whole K/V.

Query heads h < ``past_heads`` attend to keys j ≤ i (causal softmax), the others to keys j ≥ i
(semantics: :mod:`attnrewrite.kernels.dual_triangle.reference`).  The past heads go round the causal
softmax ring (:mod:`.ring`).  The future heads are causal attention on the reversed sequence, and the
load-balanced layout is its own mirror image: reversing the whole sequence maps chunk g to chunk
2W − 1 − g, so rank r's reversed shard (its two chunks swapped and each reversed) is exactly rank r's
shard of the reversed sequence.  So each rank flips its future heads' q/k/v (and key mask) along its
local positions, runs the same causal ring, and flips the rows back.

Not distributed here (the manager all-gathers K/V for it): dropout, and calls the softmax ring does
not take (off the CPU, or other dtypes than float32/64: :func:`attnrewrite.distributed.ring.applies`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.distributed import ring
from attnrewrite.kernels.dual_triangle import public as dual_op


def applies(args: dict) -> bool:
    """Whether the two rings compute this call (else the manager all-gathers K/V for it): not with a score
    modification, which torch's flash kernel the rings run cannot apply."""
    return not args.get("score_mod") and ring.applies("softmax", args["q"], args["k"], args["v"], args["dropout_p"])


def _heads(x: Tensor | None, lo: int, hi: int, groups: int) -> Tensor | None:
    """Query heads [lo, hi) of x, or of x's key/value heads read by them (repeated when a group straddles
    the split)."""
    if x is None or x.shape[1] == 1:
        return x
    if groups == 1:
        return x[:, lo:hi]
    if lo % groups == 0 and hi % groups == 0:
        return x[:, lo // groups:hi // groups]
    return x.repeat_interleave(groups, dim=1)[:, lo:hi]


def attend(args: dict, mask: Tensor | None, rank: int, world: int, exchange) -> Tensor:
    """This rank's rows of ``attnrewrite::dual_triangle_attention`` [B, Hq, T_local, Dv], in local order.

    ``mask``: None or this rank's key mask [B|1, H|1, 1, T_local|1]; ``exchange``: the ring's exchange
    (:class:`attnrewrite.distributed.ring.P2PRing` or a stand-in with ``start``).
    """
    q, k, v = args["q"], args["k"], args["v"]
    dual_op._check(q, k, v, mask, args["dropout_p"], bool(args["is_causal"]), bool(args["enable_gqa"]))
    heads = q.shape[1]
    past = dual_op.resolve_past_heads(args.get("past_heads"), heads)
    groups = heads // k.shape[1]
    spec = ring.RingSpec("softmax", True, args["scale"], True, None, rank, world)
    outs = []
    if past > 0:
        head_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, :past]
        outs.append(ring.ring_attention(q[:, :past], _heads(k, 0, past, groups), _heads(v, 0, past, groups),
                                        head_mask, None, spec, exchange))
    if past < heads:
        flip = lambda x: None if x is None else (x if x.shape[-1] == 1 else x.flip(-1))
        head_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, past:]
        future = ring.ring_attention(q[:, past:].flip(-2), _heads(k, past, heads, groups).flip(-2),
                                     _heads(v, past, heads, groups).flip(-2), flip(head_mask), None, spec, exchange)
        outs.append(future.flip(-2))
    return torch.cat(outs, dim=1)
