"""Context-parallel dual-triangle attention (:mod:`attnrewrite.distributed.dual`), W ranks as threads:
the past heads by the causal softmax ring, the future heads by the same ring on the mirrored sequence;
the ranks' rows and q/k/v gradients must equal the single-process op."""

from __future__ import annotations

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.distributed import dual, layout
from attnrewrite.testing.threads import run_ranks

B, D, T = 2, 8, 24


@pytest.mark.parametrize("world,heads_q,heads_kv,past,mask_kind", [
    (2, 4, 2, None, "bool"), (3, 4, 2, None, "none"), (4, 4, 4, 1, "float"), (3, 6, 2, 3, "bool"), (1, 4, 2, 0, "none"),
    (2, 4, 2, 1, "bool")])  # the last: a key/value head read by a past and a future head
def test_dual_cp_equals_the_whole_op(world, heads_q, heads_kv, past, mask_kind):
    g = torch.Generator().manual_seed(zlib.crc32(f"dual{world}{heads_q}{heads_kv}{past}{mask_kind}".encode()))
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (heads_q, heads_kv, heads_kv))
    grad = torch.randn(B, heads_q, T, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, T - 5:] = False
    valid[0, 0] = False
    mask = {"none": None, "bool": valid[:, None, None, :],
            "float": torch.randn(B, 1, 1, T, generator=g, dtype=torch.float64)}[mask_kind]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.dual_triangle_attention(*leaves, mask, enable_gqa=True, past_heads=past)
    ref.backward(grad)

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, world, T)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        args = dict(q=local[0], k=local[1], v=local[2], dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=True, past_heads=past)
        out = dual.attend(args, None if mask is None else mask.index_select(3, positions), rank, world, comm)
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local]

    results = run_ranks(world, rank_main)
    out = layout.unshard(torch.cat([r[0] for r in results], 2), 2, world)
    torch.testing.assert_close(out, ref.detach())
    for i, leaf in enumerate(leaves):
        got = layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, world)
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n="qkv"[i]: f"d{n}: {m}")


def test_a_score_modification_leaves_the_rings_for_the_all_gather():
    """The rings run torch's flash kernel, which cannot apply a score modification: such a call is not theirs, and
    the manager's all-gather fallback (the op itself on the gathered sequence, which applies it) says why."""
    from attnrewrite.distributed.manager import _why_all_gather

    g = torch.Generator().manual_seed(zlib.crc32(b"dual score_mod"))
    q, k, v = (torch.randn(B, 4, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    args = dict(q=q, k=k, v=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                past_heads=None, score_mod="div 2.0; tanh; mul 2.0")
    assert dual.applies({**args, "score_mod": None}), "the rings should take this call without the modification"
    assert not dual.applies(args)
    assert "score modification" in _why_all_gather("dual_triangle_attention", args, None)
