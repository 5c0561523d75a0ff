"""The context-parallel layout and each kind's rank-local computation, in one process.

The layout must be torch's (a buffer sharded by us and by torch's manager is the same shard), and
for every kind the rows each of W simulated ranks computes from the whole sequence's keys, put
back in order, must equal the op on the whole sequence — outputs and q/k/v gradients (summed over
the ranks, as the all-gather's backward sums them).
"""

import re

import pytest
import torch

from attnrewrite.distributed import kinds, layout

T = 24


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_is_torchs_head_tail_layout(world):
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
        _HeadTailLoadBalancer,
    )

    theirs = _HeadTailLoadBalancer(T, world, "cpu")._generate_indices()[0].long()
    assert torch.equal(layout.shard_indices(T, world), theirs)
    assert torch.equal(layout.restore_indices(T, world), torch.argsort(theirs))
    x = torch.randn(2, T, 3)
    shards = torch.cat([layout.shard(x, 1, r, world) for r in range(world)], dim=1)
    assert torch.equal(layout.unshard(shards, 1, world), x)


def test_length_not_divisible_is_refused():
    with pytest.raises(ValueError, match="not divisible by 2 × world size = 6"):
        layout.segments(0, 3, 16)


# summary's context-parallel form fetches pieces instead of taking the gathered K/V: tests/distributed/test_summary_cp.py
OPTIONS = {
    "softmax_attention": {},
    "sigmoid_attention": {"bias": None},
    "linear_attention": {"feature_map": "elu", "eps": 1e-6},
    "hashed_attention": {"bits": 16, "top_k": 4, "window": 3, "sinks": 1},
    "sliding_window_attention": {"window": 5},
}
CELLS = [(name, causal, world) for name in OPTIONS for causal in (True, False) for world in (2, 3)]
CELLS += [("sigmoid_attention-bias", causal, 2) for causal in (True, False)]
CELLS += [("dual_triangle_attention", False, 3)]
# a score modification (soft-capping) travels with the rank's calls
CELLS += [(name, causal, 2) for name in ("sigmoid_attention-softcap", "sliding_window_attention-softcap")
          for causal in (True, False)]
CELLS = [(name, causal, world, True) for name, causal, world in CELLS]
# no key mask: softmax and sigmoid take their blockwise paths (log-sum-exp merge / plain sum)
CELLS += [(name, True, world, False) for name in ("softmax_attention", "sigmoid_attention", "sigmoid_attention-bias",
                                                  "sigmoid_attention-softcap") for world in (1, 2, 3)]


def _args(op, q, options, causal):
    args = dict(q=q, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=None, enable_gqa=True, **options)
    for argument in op.default._schema.arguments:
        if argument.name not in args and argument.name not in ("k", "v") and argument.has_default_value():
            args[argument.name] = argument.default_value
    return args


@pytest.mark.parametrize("name,causal,world,padded", CELLS)
def test_ranks_together_compute_the_whole_op(name, causal, world, padded):
    options = dict(OPTIONS.get(name, {}))
    if name == "sigmoid_attention-bias":
        name, options = "sigmoid_attention", {"bias": -1.5}
    elif name.endswith("-softcap"):
        name = name.removesuffix("-softcap")
        options = {**OPTIONS[name], "score_mod": "div 0.5; tanh; mul 0.5"}
    op = getattr(torch.ops.attnrewrite, name)
    g = torch.Generator().manual_seed(world + 10 * causal)
    q, k, v = (torch.randn(2, h, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, -5:] = False
    mask = valid[:, None, None, :] if padded else None
    ref = op(q, k, v, mask, **{k_: v_ for k_, v_ in _args(op, None, options, causal).items()
                               if k_ not in ("q", "attn_mask")})
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out)
    rows, grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(world):
        positions = layout.local_positions(rank, world, T)
        out = kinds.attend(name, _args(op, q.index_select(2, positions), options, causal), k, v, mask,
                           layout.segments(rank, world, T))
        for total, part in zip(grads, torch.autograd.grad(out, (q, k, v), grad_out.index_select(2, positions))):
            total += part
        rows.append(out)
    torch.testing.assert_close(layout.unshard(torch.cat(rows, 2), 2, world), ref)
    for tensor_name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got, want, msg=lambda m, t=tensor_name: f"d{t}: {m}")


@pytest.mark.parametrize("shape", [(2, 1, 12, 12), (12, 12)])
def test_a_mask_over_queries_is_refused(shape):
    with pytest.raises(ValueError, match="is not a key mask"):
        kinds.as_key_mask(torch.ones(shape, dtype=torch.bool), 12, "sigmoid attention")


def test_the_ops_know_torchs_manager_is_off():
    from attnrewrite.kernels.checks import torch_context_parallel_active

    assert not torch_context_parallel_active()


class _Mesh:
    """What the manager's buffer checks read of a mesh."""

    device_type = "cpu"

    def size(self):
        return 2


def test_buffers_that_are_views_of_one_batch_are_refused():
    """The buffers are sharded in place: views of one tensor would overwrite each other's memory."""
    from attnrewrite.distributed.manager import _check_buffers

    batch = torch.arange(2 * 17).view(2, 17)
    with pytest.raises(ValueError, match="is not contiguous"):
        _check_buffers(_Mesh(), [batch[:, :-1], batch[:, 1:]], [1, 1], set())
    whole = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="buffers 0 and 1 share memory"):
        _check_buffers(_Mesh(), [whole[0], whole[0].view(2, 8)], [1, 1], set())
    assert _check_buffers(_Mesh(), [whole[0], whole[1]], [1, 1], set()) == 8  # apart: fine
    assert _check_buffers(_Mesh(), [batch[:, :-1].clone(), batch[:, 1:].clone()], [1, 1], set()) == 16


@pytest.mark.parametrize("buffers,dims,no_restore,error,match", [
    ([torch.zeros(2, 16), torch.zeros(2, 8)], [1, 1], (), ValueError, "the buffers' sequence lengths differ: [8, 16]"),
    ([torch.nn.Parameter(torch.zeros(2, 16))], [1], (), TypeError, "buffer 0 must be a tensor and not a Parameter"),
    ([torch.zeros(2, 16)], [2], (), ValueError, "buffer 0 of shape (2, 16) has no dim 2"),
    ([torch.zeros(2, 16, device="meta")], [1], (), ValueError, "buffer 0 is on meta, the mesh is a 'cpu' mesh"),
    ([torch.zeros(2, 16)], [1], (torch.zeros(2, 16),), ValueError, "no_restore_buffers must be a subset of buffers"),
])
def test_buffers_the_manager_cannot_shard_are_refused_by_name(buffers, dims, no_restore, error, match):
    from attnrewrite.distributed.manager import _check_buffers

    with pytest.raises(error, match=re.escape(match)):
        _check_buffers(_Mesh(), buffers, dims, set(no_restore) if no_restore else set())


def test_a_mesh_that_is_not_a_device_mesh_is_refused():
    from attnrewrite.distributed.manager import _check_mesh

    with pytest.raises(TypeError, match="mesh must be a torch.distributed.device_mesh.DeviceMesh, got _Mesh"):
        _check_mesh(_Mesh())
