"""Linear attention by the state prefix (:mod:`attnrewrite.distributed.linear`), W ranks in one process.

Each simulated rank computes the states of its two chunks from its shard; their rank-ordered
concatenation stands for the all-gather (whose backward sums the ranks' gradients, as one autograd
graph over all ranks does here).  The ranks' rows, put back in order, and the q/k/v gradients must
equal the op on the whole sequence.
"""

import pytest
import torch

from attnrewrite.distributed import layout, linear

T, B, HQ, HKV, D = 24, 2, 4, 2, 8


def _args(q, causal, feature_map):
    return dict(q=q, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=0.5, enable_gqa=True,
                feature_map=feature_map, eps=1e-6)


CELLS = [(causal, mask_kind, world, "elu") for causal in (True, False) for mask_kind in ("none", "bool")
         for world in (2, 4)]
CELLS += [(True, "float", 3, "elu"), (False, "float", 3, "elu"), (True, "bool", 3, "relu"), (True, "none", 1, "elu")]


@pytest.mark.parametrize("causal,mask_kind,world,feature_map", CELLS)
def test_state_prefix_equals_the_whole_op(causal, mask_kind, world, feature_map):
    g = torch.Generator().manual_seed(world * 7 + causal + len(mask_kind))
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (HQ, HKV, HKV))
    valid = torch.ones(B, 1, 1, T, dtype=torch.bool)
    valid[1, ..., T - 7:] = False
    mask = {"none": None, "bool": valid,
            "float": torch.zeros(B, 1, 1, T, dtype=torch.float64).masked_fill(~valid, float("-inf"))}[mask_kind]
    ref = torch.ops.attnrewrite.linear_attention(q, k, v, mask, 0.0, causal, 0.5, True, feature_map=feature_map)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, (q, k, v), grad)

    shards = []
    for rank in range(world):
        positions = layout.local_positions(rank, world, T)
        shards.append([t.index_select(2, positions) for t in (q, k, v)]
                      + [None if mask is None else mask.index_select(3, positions)])
    gathered = torch.cat([linear.chunk_states(k_, v_, m_, feature_map, torch.float64) for _, k_, v_, m_ in shards])
    rows = [linear.attend_with_states(_args(q_, causal, feature_map), k_, v_, m_, gathered, rank, world)
            for rank, (q_, k_, v_, m_) in enumerate(shards)]
    out = layout.unshard(torch.cat(rows, 2), 2, world)
    torch.testing.assert_close(out, ref)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), expected):
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"d{n}: {m}")
