"""Context-parallel hashed attention (:mod:`attnrewrite.distributed.hashed`), W ranks as threads.

The ranks select from the all-gathered packed codes and attend over a ring of key/value blocks; their
rows, put back in order, and the q/k/v gradients (dK/dV having travelled back to their owners) must
equal the single-process op.  And no rank ever holds more than two foreign blocks of K/V at once.
"""

from __future__ import annotations

import weakref
import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.distributed import hashed, layout
from attnrewrite.testing.threads import ThreadComm, run_ranks

B, HQ, HKV, D = 2, 4, 2, 8
OPTIONS = dict(bits=16, top_k=5, window=3, sinks=2)


def _inputs(name: str, length: int, mask_kind: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(B, h, length, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, length - 7:] = False
    valid[0, 3] = False
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = valid[:, None, None, :]
    else:  # a float key bias with padding at -inf
        mask = torch.randn(B, 1, 1, length, generator=g, dtype=torch.float64).masked_fill(~valid[:, None, None, :],
                                                                                         float("-inf"))
    return q, k, v, grad, mask


def _args(q, k, v, causal, options):
    return dict(q=q, k=k, v=v, dropout_p=0.0, is_causal=causal, scale=None, enable_gqa=True, hash="random",
                q_projection=None, k_projection=None, seed=3, score_mod=None, far_dtype=None, **options)


def _distributed(world, q, k, v, grad, mask, causal, options, backward=True):
    length = q.shape[-2]

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        local_mask = None if mask is None else mask.index_select(3, positions)
        out = hashed.attend(_args(*local, causal, options), local_mask, rank, world, comm)
        if backward:
            out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local], comm

    results = run_ranks(world, rank_main)
    out = layout.unshard(torch.cat([r[0] for r in results], 2), 2, world)
    grads = None
    if backward:
        grads = [layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, world) for i in range(3)]
    return out, grads, [r[2] for r in results]


CELLS = [(causal, mask_kind, world, 24 * world // 2 if world == 3 else 24, OPTIONS)
         for causal in (True, False) for mask_kind in ("none", "bool", "float") for world in (2, 3)]
CELLS += [(True, "bool", 4, 32, OPTIONS), (True, "none", 1, 24, OPTIONS),
          (True, "none", 2, 24, dict(bits=8, top_k=40, window=0, sinks=0)),   # top_k beyond the visible keys
          (False, "bool", 4, 32, dict(bits=24, top_k=2, window=1, sinks=0))]


@pytest.mark.parametrize("causal,mask_kind,world,length,options", CELLS)
def test_hashed_cp_equals_the_whole_op(causal, mask_kind, world, length, options):
    q, k, v, grad, mask = _inputs(f"hashed{causal}{mask_kind}{world}{length}{options}", length, mask_kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.hashed_attention(*leaves, mask, is_causal=causal, enable_gqa=True, seed=3, **options)
    ref.backward(grad)
    out, grads, _ = _distributed(world, q, k, v, grad, mask, causal, options)
    torch.testing.assert_close(out, ref.detach())
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")


def test_the_selection_is_the_single_process_ops():
    """select_rows on all-gathered packed codes chooses the keys the op's own selection chooses."""
    from attnrewrite.kernels.hashed import codes, sparse

    q, k, _, _, mask = _inputs("selection", 40, "bool")
    proj = codes.random_hyperplanes(D, 16, 3)
    keep = mask[:, 0, 0]
    for causal in (True, False):
        rows = slice(12, 20)
        visible = sparse.visible_keys(keep[:, None].expand(B, 8, 40), rows, 40, 0 if causal else None, q.device)
        want = sparse.select(codes.signs(q[:, :, rows], proj), codes.signs(k, proj), visible, 16, 5, 3, 2)
        key_signs = hashed.unpack_signs(codes.pack(k, proj), 16).to(torch.int8)
        got = hashed.select_rows(q[:, :, rows], rows, key_signs, keep, causal, 16, 5, 3, 2, proj, HKV)
        as_sets = lambda index: [sorted(x for x in row if x >= 0) for row in index.reshape(-1, index.shape[-1]).tolist()]
        assert as_sets(got) == as_sets(want)


FLOAT32_CELLS = [(causal, mask_kind, world) for causal in (True, False) for mask_kind in ("none", "bool", "float")
                 for world in (2, 3)] + [(True, "bool", 4)]


@pytest.mark.parametrize("native_ring,one_row_blocks", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("causal,mask_kind,world", FLOAT32_CELLS)
def test_hashed_cp_in_float32_at_one_thread_equals_the_whole_op(causal, mask_kind, world, native_ring, one_row_blocks,
                                                                one_thread, monkeypatch):
    """float32 at one torch thread, where the single-process op runs its compiled loop and the ring its compiled
    steps (``NATIVE_RING``, in blocks of all of a piece's rows or of one row; off: the ring's torch ops): the
    ranks' rows and q/k/v gradients equal the op's."""
    from attnrewrite.kernels.hashed import native

    if native_ring and native.library() is None:
        pytest.skip("the compiled loop is not built here (no C compiler)")
    monkeypatch.setattr(hashed, "NATIVE_RING", native_ring)
    if one_row_blocks:
        monkeypatch.setattr(hashed, "NATIVE_ELEMENTS", 1)
    length = 24 if world != 3 else 36
    q, k, v, grad, mask = (None if t is None else t.to(torch.float32)
                           for t in _inputs(f"f32{causal}{mask_kind}{world}", length, mask_kind))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.hashed_attention(*leaves, mask, is_causal=causal, enable_gqa=True, seed=3, **OPTIONS)
    ref.backward(grad)
    out, grads, _ = _distributed(world, q, k, v, grad, mask, causal, OPTIONS)
    torch.testing.assert_close(out, ref.detach())
    for tensor_name, got, leaf in zip("qkv", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")


def _rank_selection(q, k, mask, causal, options, rank, world):
    """{(b, kv head, global row): sorted global key positions} that rank ``rank`` of ``world`` selects for its
    queries (the load-balanced layout), read back from the ring's kept form block by block and owner by owner."""
    from attnrewrite.kernels.hashed import codes

    length = q.shape[-2]
    local = length // world
    proj = codes.random_hyperplanes(D, options["bits"], 3)
    positions = layout.local_positions(rank, world, length)
    keep = None if mask is None else (mask[:, 0, 0] if mask.dtype == torch.bool else mask[:, 0, 0] > -9000)
    blocks = hashed.select_blocks(q.index_select(2, positions), codes.pack(k, proj), keep, rank, world, causal,
                                  options["bits"], options["top_k"], options["window"], options["sinks"], proj, HKV)
    got = {}
    for rows, kept, starts in blocks:
        for owner in range(world):
            found = hashed._in_block(kept, starts, owner, world, local)
            if found is None:
                continue
            for (b, h, i), row in zip(((b, h, i) for b in range(B) for h in range(HKV) for i in range(rows.start,
                                                                                                    rows.stop)),
                                      found[0].reshape(-1, found[0].shape[-1]).tolist()):
                got.setdefault((b, h, int(positions[i])), []).extend(x for x in row if x >= 0)
    return {key: sorted(value) for key, value in got.items()}


SELECTION_CELLS = [(world, causal, mask_kind, dtype) for world in (2, 3) for causal in (True, False)
                   for mask_kind in ("none", "bool", "float") for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("native_selection", [True, False])
@pytest.mark.parametrize("world,causal,mask_kind,dtype", SELECTION_CELLS)
def test_every_rank_selects_the_single_process_ops_keys(world, causal, mask_kind, dtype, native_selection,
                                                        monkeypatch):
    """Each rank's selection, block by block of one row (every row's causal offset in the load-balanced layout:
    a rank's two pieces lie apart), is the single-process op's, row for row: 8-bit codes and repeated keys give
    ties (the later key wins), GQA sums the group's agreements, padding hides keys.  Both forms: the compiled
    selection (native) and the torch one."""
    from attnrewrite.kernels.hashed import codes, native, sparse

    if native_selection and not native.selects(torch.empty(1, HQ, 1, D), HKV, 8):
        pytest.skip("the compiled selection is not built here (no C compiler)")
    monkeypatch.setattr(hashed, "NATIVE_SELECTION", native_selection)
    monkeypatch.setattr(hashed, "RING_ELEMENTS", 1)  # one row per block
    options = dict(bits=8, top_k=4, window=2, sinks=1)
    length = 12 * world
    q, k, _, _, mask = _inputs(f"every-rank{world}{causal}{mask_kind}", length, mask_kind)
    q, k = q.to(dtype), k.to(dtype)
    k[:, :, 9:14] = k[:, :, 4:5]  # identical keys: equal agreement
    proj = codes.random_hyperplanes(D, 8, 3)
    want = {}
    for rows, _, index, _ in sparse.hashed_blocks(q, k, mask, causal, 8, options["top_k"], options["window"],
                                                  options["sinks"], proj, proj):
        for (b, h, i), row in zip(((b, h, i) for b in range(B) for h in range(HKV) for i in range(rows.start,
                                                                                                rows.stop)),
                                  index.reshape(-1, index.shape[-1]).tolist()):
            want[(b, h, i)] = sorted(x for x in row if x >= 0)
    got = {}
    for rank in range(world):
        got.update(_rank_selection(q, k, mask, causal, options, rank, world))
    for key, keys in want.items():
        assert got.get(key, []) == keys, key


class _CountingComm(ThreadComm):
    """Keeps a weak reference to every received floating-point tensor: at each receive, how many bytes
    of them are still alive on this rank."""

    def _take(self, peer):
        tensor = super()._take(peer)
        if tensor.is_floating_point():
            self.alive = [ref for ref in getattr(self, "alive", []) if ref() is not None] + [weakref.ref(tensor)]
            held = sum(ref().numel() * ref().element_size() for ref in self.alive if ref() is not None)
            self.peak_alive = max(getattr(self, "peak_alive", 0), held)
        return tensor


def test_a_rank_never_holds_more_than_one_foreign_block_and_the_next(monkeypatch):
    """With 4 ranks, the forward's received K/V alive at once on a rank is at most two shards (the
    block being used and the one arriving), where an all-gather of K/V would hold three."""
    from attnrewrite.testing import threads

    monkeypatch.setattr(threads, "ThreadComm", _CountingComm)
    world, length = 4, 64
    q, k, v, grad, _ = _inputs("probe", length, "none")
    _, _, comms = _distributed(world, q, k, v, grad, None, True, OPTIONS, backward=False)
    shard_kv = B * HKV * (length // world) * 2 * D * 8
    for comm in comms:
        assert 0 < comm.peak_alive <= 2 * shard_kv, (comm.peak_alive, shard_kv)


@pytest.mark.parametrize("causal", [True, False])
def test_selection_in_single_rows_gives_the_same_result(causal, monkeypatch):
    """The selection runs a few rows at a time (parts padded to one width): one row at a time, the
    ranks' rows and gradients still equal the op's."""
    monkeypatch.setattr(hashed, "SELECT_ELEMENTS", 1)
    q, k, v, grad, mask = _inputs(f"single-rows{causal}", 24, "bool")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.hashed_attention(*leaves, mask, is_causal=causal, enable_gqa=True, seed=3, **OPTIONS)
    ref.backward(grad)
    out, grads, _ = _distributed(2, q, k, v, grad, mask, causal, OPTIONS)
    torch.testing.assert_close(out, ref.detach())
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


# the op's options: a learned hash (the projections' straight-through gradient), a score modification, far keys
# rounded through a narrower dtype; each as the whole op computes it, without the K/V all-gather
SOFTCAP = "div 2.0; tanh; mul 2.0"
OPTION_CELLS = [
    ("learned", True, "bool", 2), ("learned", False, "float", 3), ("learned", True, "none", 4),
    ("score_mod", True, "float", 2), ("score_mod", False, "none", 3),
    ("far", True, "bool", 2), ("far", False, "float", 3), ("far", True, "none", 3),
    ("all", True, "float", 2),
]


def _option_kwargs(which: str, projections=None) -> dict:
    extra = {}
    if which in ("learned", "all"):
        extra.update(hash="learned")
    if which in ("score_mod", "all"):
        extra.update(score_mod=SOFTCAP)
    if which in ("far", "all"):
        extra.update(far_dtype="bfloat16")
    return extra


@pytest.mark.parametrize("which,causal,mask_kind,world", OPTION_CELLS)
def test_hashed_options_cp_equal_the_whole_op(which, causal, mask_kind, world):
    length = 12 * world
    name = f"hashed-options{which}{causal}{mask_kind}{world}"
    q, k, v, grad, mask = _inputs(name, length, mask_kind)
    extra = _option_kwargs(which)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-projections".encode()))
    learned = extra.get("hash") == "learned"
    pq = torch.randn(HQ, D, OPTIONS["bits"], generator=g, dtype=torch.float64) if learned else None
    pk = torch.randn(HKV, D, OPTIONS["bits"], generator=g, dtype=torch.float64) if learned else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_proj = (pq.clone().requires_grad_(), pk.clone().requires_grad_()) if learned else None
    ref = ops.hashed_attention(*leaves, mask, is_causal=causal, enable_gqa=True, seed=3, projections=ref_proj,
                               **extra, **OPTIONS)
    ref.backward(grad)

    def rank_main(rank, comm):
        positions = layout.local_positions(rank, world, length)
        local = [t.index_select(2, positions).clone().requires_grad_() for t in (q, k, v)]
        proj = (pq.clone().requires_grad_(), pk.clone().requires_grad_()) if learned else (None, None)
        args = dict(_args(*local, causal, OPTIONS), **extra)
        args.update(q_projection=proj[0], k_projection=proj[1])
        out = hashed.attend(args, None if mask is None else mask.index_select(3, positions), rank, world, comm)
        out.backward(grad.index_select(2, positions))
        return out.detach(), [t.grad for t in local], [None if p is None else p.grad for p in proj]

    results = run_ranks(world, rank_main)
    out = layout.unshard(torch.cat([r[0] for r in results], 2), 2, world)
    torch.testing.assert_close(out, ref.detach())
    for i, (tensor_name, leaf) in enumerate(zip("qkv", leaves)):
        got = layout.unshard(torch.cat([r[1][i] for r in results], 2), 2, world)
        torch.testing.assert_close(got, leaf.grad, msg=lambda m, n=tensor_name: f"d{n}: {m}")
    if learned:  # each rank's projection gradients are its share: summed, the op's
        for i, (proj_name, leaf) in enumerate(zip(("P_q", "P_k"), ref_proj)):
            total = sum(r[2][i] for r in results)
            assert leaf.grad.abs().max() > 0
            torch.testing.assert_close(total, leaf.grad, msg=lambda m, n=proj_name: f"d{n}: {m}")


@pytest.mark.parametrize("local", [32768, 32770])
def test_the_kept_selection_gives_back_every_key_at_the_int16_boundary(local):
    """The ring keeps each selected key as its index in its owner's shard (with the slots ordered by owner): int16
    while a shard holds at most 32768 positions, int32 past that.  Every selected key — the first and last of every
    chunk among them — comes back from each owner's block at its global position and shard index."""
    from attnrewrite.distributed.exchange import owner

    world = 2
    length, chunk = local * world, local // 2
    g = torch.Generator().manual_seed(local)
    edges = torch.tensor([c * chunk + o for c in range(2 * world) for o in (0, chunk - 1)]).expand(1, 2, 3, -1)
    index = torch.cat([torch.randint(0, length, (1, 2, 3, 20), generator=g), edges,
                       torch.full((1, 2, 3, 2), -1)], -1).to(hashed.index_dtype(length))
    kept, starts = hashed.by_owner(index, world, local)
    assert kept.dtype == (torch.int16 if local <= 32768 else torch.int32)
    flat = index.long().reshape(-1, index.shape[-1])
    ranks, _ = owner(flat.clamp(min=0), world, local)
    for p in range(world):
        positions, slots = hashed._in_block(kept, starts, p, world, local)
        mine = layout.local_positions(p, world, length)
        for row, (got, got_slots) in enumerate(zip(positions.reshape(-1, positions.shape[-1]).tolist(),
                                                   slots.reshape(-1, slots.shape[-1]).tolist())):
            want = sorted(x for x, r in zip(flat[row].tolist(), ranks[row].tolist()) if x >= 0 and r == p)
            assert sorted(x for x in got if x >= 0) == want, (p, row)
            assert all(mine[s] == x for x, s in zip(got, got_slots) if x >= 0), (p, row)


@pytest.mark.parametrize("world,local", [(2, 32768), (2, 32770), (3, 12), (4, 8)])
def test_the_compiled_kept_selection_is_by_owners(world, local):
    """The compiled form of :func:`hashed.by_owner` (the native selection's path) gives the same tensors: indices in
    the owners' shards in the same order (by owner, stably), the same starts, int16 up to 32768 positions a shard."""
    from attnrewrite.kernels.hashed import native

    if native.library() is None:
        pytest.skip("the compiled loop is not built here (no C compiler)")
    length = local * world
    g = torch.Generator().manual_seed(local + world)
    index = torch.randint(0, length, (2, 3, 5, 17), generator=g)
    index[..., -3:] = -1
    index[0, 0, 0, :2 * world] = torch.arange(2 * world) * (local // 2)  # the first position of every chunk
    want = hashed.by_owner(index.to(hashed.index_dtype(length)), world, local)
    got = native.by_owner(index.to(torch.int32), world, local, hashed.local_index_dtype(local))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
