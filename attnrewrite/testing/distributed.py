"""Distributed checks on the CPU: processes with gloo on loopback, many cases per group.

Starting a process group is the slow part (a process importing torch and attnrewrite: the ranks are forked
from a forkserver that imported them once, see :func:`_start_method`), so a *suite* is a list of named cases
run one after another in the same processes; :func:`run_suite` returns each case's outcome ("ok" or the
traceback, per rank).  Every case compares the distributed run with the
single-process run of the same seeded inputs, computed in the same process.

Suites: ``"context_parallel"`` (every kind through :func:`attnrewrite.distributed.context_parallel`,
forward and backward, the refusals and bad input, 3 training steps of a small model) and
``"data_parallel"`` (DDP and FSDP2 × every kind, converted kinds with learned states: the first step's outputs
and gradients by parameter name, and the parameters after 3 optimizer steps).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import socket
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import attnrewrite
from attnrewrite import ops
from attnrewrite.distributed import context_parallel
from attnrewrite.distributed.layout import shard

Case = Callable[["torch.distributed.device_mesh.DeviceMesh"], None]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


# ---------------------------------------------------------------------------------------------
# context parallel: every kind, forward and backward


T, B, HQ, HKV, D = 16, 2, 4, 2, 8

#: ALiBi-like slopes, one per query head, for the position-bias cases
SLOPES = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64)

#: kind → (call(q, k, v, mask, causal), causal settings, mask settings: False (none), True (key padding,
#: bool) or "bias" (a float key bias, −inf on the padding))
KIND_CALLS: dict[str, tuple[Callable, tuple[bool, ...], tuple[bool, ...]]] = {
    "sdpa": (lambda q, k, v, m, c: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c, enable_gqa=True),
             (True, False), (False, True)),
    "softmax": (lambda q, k, v, m, c: ops.softmax_attention(q, k, v, m, is_causal=c, enable_gqa=True),
                (True, False), (False, True)),
    "sigmoid": (lambda q, k, v, m, c: ops.sigmoid_attention(q, k, v, m, is_causal=c, enable_gqa=True),
                (True, False), (False, True)),
    "sigmoid_bias": (lambda q, k, v, m, c: ops.sigmoid_attention(q, k, v, m, is_causal=c, enable_gqa=True, bias=-1.0),
                     (True, False), (True,)),
    "linear": (lambda q, k, v, m, c: ops.linear_attention(q, k, v, m, is_causal=c, enable_gqa=True),
               (True, False), (False, True)),
    "summary": (lambda q, k, v, m, c: ops.summary_attention(q, k, v, m, is_causal=c, enable_gqa=True, chunk_size=2,
                                                            window_chunks=1),
                (True, False), (True,)),
    "hashed": (lambda q, k, v, m, c: ops.hashed_attention(q, k, v, m, is_causal=c, enable_gqa=True, bits=16, top_k=3,
                                                          window=2, sinks=1),
               (True, False), (True,)),
    "dual_triangle": (lambda q, k, v, m, c: ops.dual_triangle_attention(q, k, v, m, is_causal=c, enable_gqa=True),
                      (False,), (True,)),
    "sliding_window": (lambda q, k, v, m, c: ops.sliding_window_attention(q, k, v, m, is_causal=c, enable_gqa=True,
                                                                          window=3),
                       (True, False), (True,)),
    # the options whose context-parallel forms came last (each once against the whole op, no K/V all-gather)
    "sigmoid_alibi": (lambda q, k, v, m, c: ops.sigmoid_attention(q, k, v, m, is_causal=c, enable_gqa=True,
                                                                  position_slopes=SLOPES, position="j-i"),
                      (True,), ("bias",)),
    "sigmoid_symmetric_alibi": (lambda q, k, v, m, c: ops.sigmoid_attention(
        q, k, v, m, is_causal=c, enable_gqa=True, position_slopes=-SLOPES.abs(), position="|j-i|"), (False,), (True,)),
    "sliding_window_bias_alibi": (lambda q, k, v, m, c: ops.sliding_window_attention(
        q, k, v, m, is_causal=c, enable_gqa=True, window=3, sinks=1, position_slopes=SLOPES,
        position="j-i" if c else "|j-i|"), (True, False), ("bias",)),
    "hashed_softcap_far": (lambda q, k, v, m, c: ops.hashed_attention(
        q, k, v, m, is_causal=c, enable_gqa=True, bits=16, top_k=3, window=2, sinks=1, score_mod="div 2.0; tanh; mul 2.0",
        far_dtype="bfloat16"), (True,), ("bias",)),
}


def _qkv(name: str, mask_kind=True):
    g = torch.Generator().manual_seed(_seed(name))
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, T, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, T - 3:] = False  # right padding in one row: every causal query still sees a key
    mask = valid[:, None, None, :]
    if mask_kind == "bias":  # a float key bias, the padding at −inf
        mask = torch.randn(B, 1, 1, T, generator=g, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return q, k, v, grad, mask


@contextlib.contextmanager
def _no_kv_all_gather():
    """Inside, the manager's fallback (every rank gathering the whole K/V, :mod:`attnrewrite.distributed.kinds`)
    fails: the case must take its kind's sharded form."""
    from attnrewrite.distributed import manager

    def refuse(name, *args, **kwargs):
        raise AssertionError(f"{name}: the manager all-gathered K/V (its fallback) instead of the sharded form")

    original = manager.kinds.attend
    manager.kinds.attend = refuse
    try:
        yield
    finally:
        manager.kinds.attend = original


def _kind_case(name: str, call, causal: bool, masked: bool) -> Case:
    def case(mesh):
        rank, world = mesh.get_local_rank(), mesh.size()
        q, k, v, grad, mask = _qkv(name, masked)
        mask = mask if masked else None
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = call(*leaves, mask, causal)
        ref.backward(grad)
        buffers = [q.clone(), k.clone(), v.clone(), grad.clone()] + ([mask.clone()] if masked else [])
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2, 3][:len(buffers)]), \
                _no_kv_all_gather():
            local = [b.clone().requires_grad_() for b in buffers[:3]]
            out = call(*local, buffers[4] if masked else None, causal)
            out.backward(buffers[3])
        assert_close(out, shard(ref.detach(), 2, rank, world))
        for tensor_name, mine, full in zip("qkv", local, leaves):
            assert_close(mine.grad, shard(full.grad, 2, rank, world), msg=lambda m, t=tensor_name: f"d{t}: {m}")
        assert torch.equal(buffers[0], q) and torch.equal(buffers[3], grad), "buffers not restored on exit"

    return case


def _value_head_size_case(mesh):
    """Softmax (SDPA, softmax_attention, dual_triangle) with a value head size other than q/k's: torch's CPU
    flash kernel, which the ring runs, takes one head size, so these take the all-gather of K/V (with a
    warning naming the head sizes) and equal the whole op, forward and backward."""
    import warnings

    from attnrewrite.distributed import AllGatherFallback

    rank, world = mesh.get_local_rank(), mesh.size()
    q, k, v, grad, mask = _qkv("value-head-size")
    v, grad = v[..., : D // 2].contiguous(), grad[..., : D // 2].contiguous()
    calls = [("sdpa", True, None), ("softmax", True, mask), ("softmax", False, mask), ("dual_triangle", False, mask)]
    for kind, causal, m in calls:
        call = KIND_CALLS[kind][0]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = call(*leaves, m, causal)
        ref.backward(grad)
        buffers = [q.clone(), k.clone(), v.clone(), grad.clone(), mask.clone()]
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2, 3]), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            local = [b.clone().requires_grad_() for b in buffers[:3]]
            out = call(*local, None if m is None else buffers[4], causal)
            out.backward(buffers[3])
        said = [str(w.message) for w in caught if issubclass(w.category, AllGatherFallback)]
        assert said and "head sizes q/k/v 8/8/4" in said[0], (kind, said)
        assert_close(out, shard(ref.detach(), 2, rank, world), msg=lambda msg, n=kind: f"{n}: {msg}")
        for tensor_name, mine, full in zip("qkv", local, leaves):
            assert_close(mine.grad, shard(full.grad, 2, rank, world),
                         msg=lambda msg, t=tensor_name, n=kind: f"{n} d{t}: {msg}")


def _learned_summary_case(mesh):
    """A learned state (the summary pooling queries): each rank's gradient is its share; summed they
    are the single-process gradient."""
    q, k, v, grad, mask = _qkv("learned-summary")
    query = torch.randn(HKV, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def call(q, k, v, m, s):
        return ops.summary_attention(q, k, v, m, enable_gqa=True, chunk_size=2, window_chunks=1, summary="learned",
                                     summary_query=s)

    ref_query = query.clone().requires_grad_()
    call(q, k, v, mask, ref_query).backward(grad)
    buffers = [q.clone(), k.clone(), v.clone(), grad.clone(), mask.clone()]
    mine = query.clone().requires_grad_()
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2, 3]):
        call(*buffers[:3], buffers[4], mine).backward(buffers[3])
    dist.all_reduce(mine.grad, group=mesh.get_group())
    assert_close(mine.grad, ref_query.grad)


def _learned_hash_case(mesh):
    """hashed_attention with a learned hash: outputs and q/k/v gradients as the whole op's, and the projections'
    gradients (each rank's share) summed over the ranks equal the whole op's; no K/V all-gather."""
    rank, world = mesh.get_local_rank(), mesh.size()
    q, k, v, grad, mask = _qkv("learned-hash", "bias")
    g = torch.Generator().manual_seed(_seed("learned-hash-projections"))
    projections = (torch.randn(HQ, D, 16, generator=g, dtype=torch.float64),
                   torch.randn(HKV, D, 16, generator=g, dtype=torch.float64))

    def call(q, k, v, m, p):
        return ops.hashed_attention(q, k, v, m, is_causal=True, enable_gqa=True, bits=16, top_k=3, window=2, sinks=1,
                                    hash="learned", projections=p)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_projections = tuple(p.clone().requires_grad_() for p in projections)
    ref = call(*leaves, mask, ref_projections)
    ref.backward(grad)
    buffers = [q.clone(), k.clone(), v.clone(), grad.clone(), mask.clone()]
    mine = tuple(p.clone().requires_grad_() for p in projections)
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2, 3]), _no_kv_all_gather():
        local = [b.clone().requires_grad_() for b in buffers[:3]]
        out = call(*local, buffers[4], mine)
        out.backward(buffers[3])
    assert_close(out, shard(ref.detach(), 2, rank, world))
    for tensor_name, got, full in zip("qkv", local, leaves):
        assert_close(got.grad, shard(full.grad, 2, rank, world), msg=lambda m, t=tensor_name: f"d{t}: {m}")
    for name, got, full in zip(("P_q", "P_k"), mine, ref_projections):
        dist.all_reduce(got.grad, group=mesh.get_group())
        assert full.grad.abs().max() > 0
        assert_close(got.grad, full.grad, msg=lambda m, n=name: f"d{n}: {m}")


def _summary_traffic_case(mesh):
    """Summary attention on gloo: the rows equal the whole op's, and the bytes this rank received (its
    window's raw rows, the other rank's chunk summaries, and backward their gradients) stay below one
    copy of the whole sequence's keys and values, which the all-gather of K/V received forward alone."""
    from attnrewrite.distributed import manager

    rank, world, length = mesh.get_local_rank(), mesh.size(), 128
    g = torch.Generator().manual_seed(_seed("summary-traffic"))
    q, k, v = (torch.randn(B, h, length, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64)

    def call(q, k, v):
        return ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=8, window_chunks=1)

    ref = call(q, k, v)
    buffers = [q.clone(), k.clone(), v.clone(), grad.clone()]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
        local = [b.clone().requires_grad_() for b in buffers[:3]]
        out = call(*local)
        out.backward(buffers[3])
        received = manager._active[-1]._comm.received_bytes
    assert_close(out, shard(ref, 2, rank, world))
    whole_kv = 2 * k.numel() * k.element_size()
    assert 0 < received < whole_kv / 2, (received, whole_kv)


class TinyLM(nn.Module):
    """Embeddings, one causal attention block calling an attnrewrite op directly, a head."""

    def __init__(self, attention: Callable, vocab: int = 32, dim: int = 16, heads: int = 2, length: int = T):
        super().__init__()
        self.attention, self.heads = attention, heads
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.qkv, self.out, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)

    def forward(self, tokens, positions):
        x = self.embed(tokens) + self.position(positions)                               # [B, T, C]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, D]
        y = self.attention(q, k, v).transpose(1, 2).flatten(2)                            # [B, T, C]
        return self.head(x + self.out(y))


class LearnedStateAttention(nn.Module):
    """A kind's op with the learned state :func:`attnrewrite.convert` attaches as this module's parameters:
    ``"hashed"`` the learned hash's projections P_q [H, D, bits] and P_k, ``"summary"`` the pooling query
    [H, D] (TinyLM: 2 heads of 8)."""

    def __init__(self, kind: str, heads: int = 2, dim: int = 8, bits: int = 16):
        super().__init__()
        self.kind = kind
        if kind == "hashed":
            self.q_projection = nn.Parameter(torch.randn(heads, dim, bits))
            self.k_projection = nn.Parameter(torch.randn(heads, dim, bits))
        else:
            self.summary_query = nn.Parameter(torch.randn(heads, dim))

    def forward(self, q, k, v):
        if self.kind == "hashed":
            return ops.hashed_attention(q, k, v, is_causal=True, bits=self.q_projection.shape[-1], top_k=3, window=2,
                                        sinks=1, hash="learned", projections=(self.q_projection, self.k_projection))
        return ops.summary_attention(q, k, v, chunk_size=2, window_chunks=1, summary="learned",
                                     summary_query=self.summary_query)


def _training_case(attention: Callable | None, name: str, learned: str | None = None) -> Case:
    """3 SGD steps with the sequence sharded (gradients all-reduced over the mesh) against one process;
    ``learned``: the attention is :class:`LearnedStateAttention` of that kind, its state trained with the rest."""
    def case(mesh):
        torch.manual_seed(_seed(name))
        model = TinyLM(attention if learned is None else LearnedStateAttention(learned)).double()
        reference = copy.deepcopy(model)
        start = copy.deepcopy(model)
        g = torch.Generator().manual_seed(_seed(name) + 1)
        batches = [torch.randint(0, 32, (B, T + 1), generator=g) for _ in range(3)]
        positions = torch.arange(T).expand(B, T)
        for model_, sharded in ((reference, False), (model, True)):
            optimizer = torch.optim.SGD(model_.parameters(), lr=0.5)
            for batch in batches:
                x, y, pos = batch[:, :-1].clone(), batch[:, 1:].clone(), positions.clone()
                optimizer.zero_grad()
                if sharded:
                    with context_parallel(mesh, buffers=[x, y, pos], buffer_seq_dims=[1, 1, 1]):
                        loss = F.cross_entropy(model_(x, pos).flatten(0, 1), y.flatten(), reduction="sum") / (B * T)
                        loss.backward()
                    for p in model_.parameters():
                        dist.all_reduce(p.grad, group=mesh.get_group())
                else:
                    F.cross_entropy(model_(x, pos).flatten(0, 1), y.flatten()).backward()
                optimizer.step()
        for (pname, mine), theirs, before in zip(model.named_parameters(), reference.parameters(), start.parameters()):
            assert_close(mine, theirs, msg=lambda m, n=pname: f"{n} after 3 steps: {m}")
            if pname.startswith("attention."):  # the learned state trained (its gradient is not zero)
                assert not torch.equal(theirs, before), f"{pname} did not move in 3 steps"

    return case


def _compiled_case(compiler: str) -> Case:
    """A model rewritten by attnrewrite (torch.compile, compiled outside first) run inside the manager: Dynamo compiles
    it again there (its guard on the torch-function mode stack fails), through the manager's mode, and the backend
    routes the new graph's attention through the manager: logits and gradients against the whole run.  A graph
    compiled inside by another backend refuses to attend over the shard."""
    return lambda mesh: _run_compiled(mesh, compiler)


def _run_compiled(mesh, compiler: str):
    torch._dynamo.reset()
    torch.manual_seed(_seed("compiled"))
    rank, world = mesh.get_local_rank(), mesh.size()
    model = TinyLM(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)).double()
    compiled = torch.compile(model, backend="attnrewrite", options={"to": "sigmoid", "compiler": compiler,
                                                                    "strict": True})
    x = torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(T).expand(B, T).clone()
    whole = compiled(x, positions)
    assert attnrewrite.recent_reports()[-1].rewritten, "the model's attention was not rewritten"
    whole.square().sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    xs, ps = x.clone(), positions.clone()
    seen = len(attnrewrite.recent_reports())
    with context_parallel(mesh, buffers=[xs, ps], buffer_seq_dims=[1, 1]):
        local = compiled(xs, ps)
        local.square().sum().backward()
    inside = attnrewrite.recent_reports()[seen:]
    assert len(inside) == 1 and len(inside[0].rewritten) == 1, inside
    for p in model.parameters():
        dist.all_reduce(p.grad, group=mesh.get_group())
    assert_close(local, shard(whole.detach(), 1, rank, world))
    for name, p in model.named_parameters():
        assert_close(p.grad, want[name], msg=lambda m, n=name: f"d{n}: {m}")
    other = torch.compile(model, backend="eager")  # Dynamo's own backend: nothing routes its attention
    xs, ps = x.clone(), positions.clone()
    with context_parallel(mesh, buffers=[xs, ps], buffer_seq_dims=[1, 1]):
        _raises(RuntimeError, "other than attnrewrite", lambda: other(xs, ps))


# ---------------------------------------------------------------------------------------------
# context parallel: refusals and bad input


def _raises(kind: type, match: str | tuple[str, ...], fn: Callable) -> None:
    """``fn()`` raises ``kind`` with (one of) ``match`` in its message."""
    try:
        fn()
    except kind as error:
        matches = (match,) if isinstance(match, str) else match
        assert any(m in str(error) for m in matches), f"{kind.__name__} without {match!r}: {error}"
        return
    raise AssertionError(f"no {kind.__name__} ({match!r})")


def _torch_manager_case(mesh):
    """Inside torch's own manager attnrewrite's ops raise (they would see a shard), and ours refuses to nest."""
    from torch.distributed.tensor.experimental import (
        context_parallel as torch_context_parallel,
    )

    q, k, v, _, _ = _qkv("torch-manager")
    buffers = [q.clone(), k.clone(), v.clone()]
    with torch_context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        for call in (KIND_CALLS["sigmoid"][0], KIND_CALLS["linear"][0], KIND_CALLS["summary"][0],
                     KIND_CALLS["hashed"][0], KIND_CALLS["softmax"][0], KIND_CALLS["sliding_window"][0],
                     KIND_CALLS["dual_triangle"][0]):
            _raises(RuntimeError, "Use attnrewrite.distributed.context_parallel(mesh",
                    lambda call=call: call(*buffers, None, True))
        _raises(RuntimeError, "cannot run inside torch.distributed.tensor.experimental.context_parallel",
                lambda: context_parallel(mesh).__enter__())
    ops.sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True)  # outside it, the ops run again


def _bad_input_case(mesh):
    from torch.distributed.device_mesh import init_device_mesh

    rank = mesh.get_local_rank()
    x = torch.zeros(2, 18)
    _raises(ValueError, "not divisible by 2 × world size = 4", lambda: context_parallel(
        mesh, buffers=[x], buffer_seq_dims=[1]).__enter__())
    assert x.shape == (2, 18)
    mesh_2d = init_device_mesh("cpu", (1, mesh.size()))
    _raises(ValueError, "the mesh must be 1-d", lambda: context_parallel(mesh_2d).__enter__())
    _raises(ValueError, "buffer_seq_dims must have one entry per buffer",
            lambda: context_parallel(mesh, buffers=[x], buffer_seq_dims=[]).__enter__())
    # ranks that disagree on the sequence length fail together, before any attention
    uneven = torch.zeros(2, 16 if rank == 0 else 24)
    _raises(ValueError, "hold different sequence lengths", lambda: context_parallel(
        mesh, buffers=[uneven], buffer_seq_dims=[1]).__enter__())
    q, k, v, _, _ = _qkv("bad-input")
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
        local = q.shape[-2]
        query_mask = torch.ones(local, local, dtype=torch.bool).tril()
        _raises(ValueError, "is not a key mask", lambda: ops.sigmoid_attention(q, k, v, query_mask, enable_gqa=True))
        _raises(ValueError, "must be self-attention over this rank's shard",
                lambda: F.scaled_dot_product_attention(q[..., :2, :], k, v, enable_gqa=True))
        _raises(NotImplementedError, "has no context-parallel form", lambda: torch.ops.aten.
                _scaled_dot_product_flash_attention_for_cpu(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
        _raises(RuntimeError, "does not nest", lambda: context_parallel(mesh).__enter__())
        # a tensor on another device than the mesh's (a model on one device, the mesh of another)
        _raises(ValueError, "use a mesh of the device the model runs on",
                lambda: ops.sigmoid_attention(q.to("meta"), k.to("meta"), v.to("meta"), enable_gqa=True))
        # an option that cannot be context-parallel is refused by name
        _raises(NotImplementedError, "packed sequences (cu_seqlens)", lambda: ops.summary_attention(
            q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1,
            cu_seqlens=torch.tensor([0, local], dtype=torch.int32)))
        # a call that goes around the manager (as a compiled graph's would) is refused by the op itself
        with torch._C.DisableTorchFunction():
            _raises(RuntimeError, "without going through it", lambda: ops.sigmoid_attention(q, k, v, enable_gqa=True))
            _raises(RuntimeError, "without going through it", lambda: ops.hashed_attention(q, k, v, enable_gqa=True))
        _raises(ValueError, "linear attention", lambda: ops.linear_attention(q, k, v, dropout_p=0.1, enable_gqa=True))
        # a call without a sharded form says so (and why) when it falls back to the all-gather of K/V
        import warnings

        from attnrewrite.distributed import AllGatherFallback

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ops.sliding_window_attention(q, k, v, dropout_p=0.5, enable_gqa=True, window=3)
        said = [str(w.message) for w in caught if issubclass(w.category, AllGatherFallback)]
        assert said and "dropout_p > 0" in said[0], [str(w.message) for w in caught]


def context_parallel_cases() -> list[tuple[str, Case]]:
    cases = []
    for kind, (call, causals, masks) in KIND_CALLS.items():
        for causal in causals:
            for masked in masks:
                if kind == "sdpa" and causal and masked:
                    continue  # SDPA itself refuses a mask with is_causal
                masking = "biased" if masked == "bias" else "padded" if masked else "nomask"
                name = f"{kind}-{'causal' if causal else 'bidirectional'}-{masking}"
                cases.append((name, _kind_case(name, call, causal, masked)))
    cases.append(("softmax-value-head-size", _value_head_size_case))
    cases.append(("summary-learned-state", _learned_summary_case))
    cases.append(("hashed-learned-hash", _learned_hash_case))
    cases.append(("summary-traffic", _summary_traffic_case))
    cases.append(("train-sigmoid", _training_case(lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True),
                                                  "train-sigmoid")))
    cases.append(("train-sdpa", _training_case(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "train-sdpa")))
    cases.append(("train-linear", _training_case(lambda q, k, v: ops.linear_attention(q, k, v, is_causal=True),
                                                 "train-linear")))
    cases.append(("train-summary", _training_case(
        lambda q, k, v: ops.summary_attention(q, k, v, chunk_size=2, window_chunks=2), "train-summary")))
    cases.append(("train-hashed", _training_case(
        lambda q, k, v: ops.hashed_attention(q, k, v, is_causal=True, top_k=3, window=2, sinks=1), "train-hashed")))
    cases.append(("train-hashed-learned-hash", _training_case(None, "train-hashed-learned-hash", "hashed")))
    cases.append(("train-summary-learned-query", _training_case(None, "train-summary-learned-query", "summary")))
    cases.append(("compiled-inside", _compiled_case("eager")))
    cases.append(("torch-manager-refused", _torch_manager_case))
    cases.append(("bad-input", _bad_input_case))
    return cases


# ---------------------------------------------------------------------------------------------
# data parallel: DDP and FSDP2 of a model rewritten to each kind


class HandWrittenLM(nn.Module):
    """A small causal LM whose attention is hand-written (matmul, mask, softmax): attnrewrite's to rewrite."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, length: int = T):
        super().__init__()
        self.heads = heads
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.qkv, self.out, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).tril(), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position.weight[:t]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return self.head(x + self.out(y))


#: kind → options of the data-parallel matrix: every kind, and the converted kinds with learned states (sigmoid's
#: head temperature and bias, hedgehog feature maps, learned summary queries, learned hash projections), with
#: sizes small enough that T = 16 tokens use the kind's structure (several summary chunks, a real selection).
DATA_PARALLEL_KINDS: dict[str, tuple[str, dict, bool]] = {  # label → (kind, options, converted)
    "softmax": ("softmax", {}, False),
    "sigmoid": ("sigmoid", {}, False),
    "sigmoid-learned": ("sigmoid", {"learned": True}, True),
    "linear-hedgehog": ("linear", {"feature_map": "hedgehog"}, True),
    "summary-learned": ("summary", {"summary": "learned", "chunk_size": 4, "window_chunks": 1}, True),
    "hashed-learned": ("hashed", {"hash": "learned", "top_k": 3, "window": 2, "sinks": 1}, True),
}


def _rewritten(seed_name: str, kind: str = "sigmoid", options: dict | None = None, converted: bool = False
               ) -> nn.Module:
    """The hand-written LM, seeded by name, converted (per-site learned states attached) and rewritten in place."""
    options = options or {}
    torch.manual_seed(_seed(seed_name))
    model = HandWrittenLM().double()
    if converted:
        attnrewrite.convert(model, kind, (torch.zeros(1, T, dtype=torch.long),), **options)
        # the learned states start where their kind starts them; move them off it so a state the wrapped model
        # drops (runs without it) shows in the outputs and its gradient is not zero by symmetry
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "attnrewrite_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(_seed(name)),
                                              dtype=p.dtype))
    return attnrewrite.rewrite(model, to=kind, compiler="eager", strict=True, **options)


@dataclass
class _OneProcessRun:
    """The single-process run of one label of the data-parallel matrix on the whole batches: the first step's
    logits [2·world, T, vocab] and gradients by parameter name, and the parameters by name after 3 AdamW steps."""

    batches: list[torch.Tensor]
    logits: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    params: dict[str, torch.Tensor]


#: (label, world) → its single-process run, made once per process: the DDP and FSDP2 cells of a label compare
#: with the same run (each cell used to compile, convert and train a reference of its own)
_ONE_PROCESS_RUNS: dict[tuple[str, int], _OneProcessRun] = {}


def _one_process_run(label: str, world: int) -> _OneProcessRun:
    if (label, world) not in _ONE_PROCESS_RUNS:
        kind, options, converted = DATA_PARALLEL_KINDS[label]
        g = torch.Generator().manual_seed(_seed(f"data-parallel-{label}"))
        batches = [torch.randint(0, 32, (2 * world, T + 1), generator=g) for _ in range(3)]
        reference = _rewritten("data-parallel", kind, options, converted)
        optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        for step, batch in enumerate(batches):
            optimizer.zero_grad()
            logits = reference(batch[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
            if step == 0:
                first_logits = logits.detach().clone()
                grads = {name: None if p.grad is None else p.grad.clone() for name, p in reference.named_parameters()}
            optimizer.step()
        params = {name: p.detach().clone() for name, p in reference.named_parameters()}
        _ONE_PROCESS_RUNS[label, world] = _OneProcessRun(batches, first_logits, grads, params)
    return _ONE_PROCESS_RUNS[label, world]


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter or gradient as one tensor: FSDP2's shards (DTensor) gathered, others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _compare(mismatches: list[str], what: str, got: torch.Tensor | None, want: torch.Tensor) -> None:
    """``assert_close(got, want)`` (its default tolerance for the dtype), a failure noted in ``mismatches``."""
    try:
        assert got is not None, "no tensor (no gradient)"
        assert_close(got, want)
    except AssertionError as error:
        mismatches.append(f"{what}: {error}")


def _data_parallel_case(wrap: str, label: str = "sigmoid") -> Case:
    """One cell: ``wrap`` ("ddp" or "fsdp2") of the model rewritten to ``label``'s kind, each rank on half of each
    batch, against one process on the whole batch: the first step's logits (this rank's rows) and gradients (by
    parameter name, FSDP2's gathered), then the parameters after 3 AdamW steps."""
    kind, options, converted = DATA_PARALLEL_KINDS[label]

    def case(mesh):
        # every case compiles HandWrittenLM.forward again: without a reset, twelve cases reach Dynamo's
        # recompile limit for that one code object and strict=True rightly raises
        torch._dynamo.reset()
        rank, world = mesh.get_local_rank(), mesh.size()
        reference = _one_process_run(label, world)
        torch._dynamo.reset()
        for name, grad in reference.grads.items():  # never compare on zeros: every parameter has a gradient
            assert grad is not None and grad.abs().max() > 0, f"{label}: {name} has no gradient in one process"
        model = _rewritten("data-parallel", kind, options, converted)
        states = sorted(name for name, _ in model.named_parameters() if "attnrewrite_" in name)
        assert bool(states) == converted, (label, states)
        if wrap == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model, process_group=mesh.get_group())
        else:
            from torch.distributed.fsdp import fully_shard
            wrapped = fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        # a comparison that fails on one rank only must not stop that rank before the collectives the other
        # rank then waits in (FSDP2's gathers, the next step's): that hangs instead of naming the cell
        mismatches: list[str] = []
        for step, batch in enumerate(reference.batches):
            mine = batch[2 * rank:2 * rank + 2]
            optimizer.zero_grad()
            logits = wrapped(mine[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten()).backward()
            if step == 0:
                _compare(mismatches, f"{wrap} {label}: this rank's logits of the first step", logits,
                         reference.logits[2 * rank:2 * rank + 2])
                grads = {name: _whole(p.grad) for name, p in model.named_parameters()}
                assert sorted(grads) == sorted(reference.grads), (label, sorted(grads), sorted(reference.grads))
                for name, grad in grads.items():
                    _compare(mismatches, f"{wrap} {label}: gradient of {name} in the first step", grad,
                             reference.grads[name])
            optimizer.step()
        report = attnrewrite.recent_reports()[-1]
        assert report.rewritten and not report.skipped, report
        moved = []
        for name, p in model.named_parameters():
            _compare(mismatches, f"{wrap} {label}: {name} after 3 AdamW steps", _whole(p), reference.params[name])
            if "attnrewrite_" in name:
                moved.append(name)
        assert not mismatches, "\n".join(mismatches)
        assert sorted(moved) == states, (label, moved, states)  # the learned states trained in both runs

    return case


def data_parallel_cases() -> list[tuple[str, Case]]:
    """DDP and FSDP2 × every kind (converted kinds with their learned states) vs one process: the first step's
    outputs and gradients, and the parameters after 3 AdamW steps.  The two cells of a label follow each other
    (they share its single-process run)."""
    return [(f"{wrap}-{label}", _data_parallel_case(wrap, label))
            for label in DATA_PARALLEL_KINDS for wrap in ("ddp", "fsdp2")]


SUITES: dict[str, Callable[[], list[tuple[str, Case]]]] = {
    "context_parallel": context_parallel_cases,
    "data_parallel": data_parallel_cases,
}


# ---------------------------------------------------------------------------------------------
# running a suite


def _suite_cases(suite: str) -> list[tuple[str, Case]]:
    """The cases of a suite named in :data:`SUITES`, or of ``"module:function"`` (a suite kept in its own module)."""
    if suite in SUITES:
        return SUITES[suite]()
    import importlib

    module, _, function = suite.partition(":")
    return getattr(importlib.import_module(module), function)()


def _worker(rank: int, world: int, port: int, suite: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    try:
        for name, case in _suite_cases(suite):
            started = time.perf_counter()
            try:
                case(mesh)
                results[name] = {"ok": True, "seconds": time.perf_counter() - started}
            except Exception:  # one case's failure is reported, the others still run
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _start_method() -> str:
    """``"forkserver"`` where the platform has it, its server importing torch and this module once per test process:
    every rank of every suite is then forked from it, where ``"spawn"`` imports them again in each rank (about
    5 CPU-s each, most of a small suite's start-up).  The server is started before any rank runs, single-threaded,
    so what is forked holds no process group, thread or compiled state."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])  # no effect once it runs
    return "forkserver"


def run_suite(suite: str, world: int = 2, timeout_s: float = 240.0) -> dict[str, dict]:
    """Run ``suite`` in ``world`` new processes; {case: {"ok": bool, "errors": {rank: traceback}}}."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, free_port(), suite, out_dir), nprocs=world, join=False,
                                     start_method=_start_method())
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the {suite!r} suite did not finish within {timeout_s:.0f} s")
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    merged = {}
    for name in per_rank[0]:
        errors = {r: per_rank[r][name]["error"] for r in range(world) if not per_rank[r][name]["ok"]}
        merged[name] = {"ok": not errors, "errors": errors,
                        "seconds": max(per_rank[r][name].get("seconds", 0.0) for r in range(world))}
    return merged
