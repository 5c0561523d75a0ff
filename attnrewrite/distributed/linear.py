"""Linear attention over a sharded sequence: an exclusive prefix of per-chunk states, no K/V gathered.

Linear attention reads the keys only through the state (S, z) = (Σ φ(k_j)ᵀ v_j, Σ φ(k_j)) of the keys
a query sees.  Each rank computes the state of each of its two chunks ([B, Hkv, Dk, Dv + 1], with z
as the last column), the ranks all-gather these 2·W small states (differentiably: the backward sums
their gradients over the ranks), and each chunk then runs the op on its own keys with
``initial_state`` = the sum of the states of the chunks before it (causal) or of every other chunk
(bidirectional).  Per rank: O(T / W) activations plus 2·W states of D² numbers each.

The two halves are plain functions of tensors (no process group), so W ranks can be simulated in one
process: :func:`chunk_states` on each rank's shard, concatenated in rank order, then
:func:`attend_with_states` per rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.distributed.layout import restore_indices, segments
from attnrewrite.kernels.linear.api import linear_attention_dispatch
from attnrewrite.kernels.linear.feature_maps import apply_feature_map


def compute_dtype(q: Tensor) -> torch.dtype:
    """The states' dtype: the op's compute dtype (float64 for float64 inputs, else float32)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _keep(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """bool [B, T] (True = key kept) from a key mask [B|1, 1, 1, T|1] (bool, or 0 / −inf)."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask == 0
    return keep.reshape(keep.shape[0], keep.shape[-1]).expand(batch, length)


def chunk_states(k: Tensor, v: Tensor, mask: Tensor | None, feature_map: str, compute: torch.dtype) -> Tensor:
    """[2, B, Hkv, Dk, Dv + 1]: (S | z) of each of the rank's two chunks, in local order."""
    keep = _keep(mask, k.shape[0], k.shape[-2])
    # contiguous before φ, as the op's own paths do (elu's backward strides)
    features = apply_feature_map(k.to(compute).contiguous(), feature_map)
    if keep is not None:  # φ(0) ≠ 0 for elu: padded keys are zeroed after φ
        features = features * keep[:, None, :, None].to(compute)
    states = []
    for part_k, part_v in zip(features.chunk(2, dim=-2), v.to(compute).chunk(2, dim=-2)):
        states.append(torch.cat([part_k.transpose(-1, -2) @ part_v, part_k.sum(-2).unsqueeze(-1)], dim=-1))
    return torch.stack(states)


def attend_with_states(args: dict, k: Tensor, v: Tensor, mask: Tensor | None, gathered: Tensor, rank: int,
                       world: int) -> Tensor:
    """The rank's rows of linear attention, from its shard and every chunk's state.

    Args:
        args: the op's arguments by schema name (``q``: the rank's queries, local order).
        k, v, mask: the rank's keys, values and key mask (local order).
        gathered: [2·W, B, Hkv, Dk, Dv + 1]: every rank's :func:`chunk_states`, in rank order.
    """
    q = args["q"]
    by_chunk = gathered.index_select(0, restore_indices(2 * world, world, gathered.device))  # chunk order
    chunk = q.shape[-2] // 2
    mine = [start // chunk for start, _ in segments(rank, world, 2 * world * chunk)]
    common = dict(scale=args["scale"], enable_gqa=args["enable_gqa"], feature_map=args["feature_map"],
                  eps=args["eps"])

    def initial(index_set: list[int]):
        if not index_set:
            return None
        total = by_chunk[index_set].sum(0)
        return total[..., :-1], total[..., -1]

    if not args["is_causal"]:
        others = [c for c in range(2 * world) if c not in mine]
        return linear_attention_dispatch(q, k, v, mask, args["dropout_p"], False,
                                         initial_state=initial(others), **common)
    outs = []
    for local, chunk_id in enumerate(mine):
        rows = slice(local * chunk, (local + 1) * chunk)
        chunk_mask = mask if mask is None or mask.shape[-1] == 1 else mask[..., rows]
        outs.append(linear_attention_dispatch(q[..., rows, :], k[..., rows, :], v[..., rows, :], chunk_mask,
                                              args["dropout_p"], True, initial_state=initial(list(range(chunk_id))),
                                              **common))
    return torch.cat(outs, dim=-2)


def applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the state prefix computes this call (4-d q/k/v, a key mask without a head dim)."""
    return q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and (mask is None or mask.shape[-3] == 1)
