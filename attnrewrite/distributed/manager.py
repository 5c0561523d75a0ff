"""``context_parallel``: shard the sequence over a device mesh and make attention context-parallel.

The manager has the signature and the sharding of torch's
``torch.distributed.tensor.experimental.context_parallel``: the ``buffers`` are cut in place along
their ``buffer_seq_dims`` into the load-balanced layout (:mod:`.layout`) and put back on exit (except
``no_restore_buffers``).  Inside it, a ``TorchFunctionMode`` catches every call of
``F.scaled_dot_product_attention`` and of attnrewrite's attention ops and computes the rank's rows.
Softmax (SDPA; on the CPU in float32/64) and sigmoid go round a ring (:mod:`.ring`): key/value blocks
pass from rank to rank, forward and backward, and no rank ever holds more than two shards of K/V.
Linear all-gathers only each chunk's (S, z) state and starts each chunk from the states before it
(:mod:`.linear`).  Summary all-gathers the chunk summaries and fetches only its windows' raw rows
(:mod:`.summary`), hashed all-gathers the packed key codes and passes K/V round a ring (:mod:`.hashed`),
sliding window fetches only its windows' and sinks' rows (:mod:`.window`), all through
:mod:`.exchange`; dual_triangle runs two causal softmax rings, one on the mirrored sequence
(:mod:`.dual`).  Every option of these kinds takes its sharded form (sigmoid's and sliding window's position
bias, hashed's learned hash, score modification and far_dtype, a key bias), except the calls listed by
:class:`AllGatherFallback` (dropout; softmax and dual_triangle off the CPU or in 16-bit; 3-d inputs; a
linear key mask with a head dimension): those warn, then all-gather the keys, values and key mask of the
mesh's ranks (differentiably: the backward sums key/value gradients over the ranks) and compute the rank's rows from them (:mod:`.kinds`).  Parameters' gradients are each rank's share, as under
torch's manager: reduce them over the mesh (DDP/FSDP over the same ranks, or an ``all_reduce``).

A model compiled by ``torch.compile(backend="attnrewrite")`` runs here too, converted ones with their learned
states: Dynamo guards on the torch-function mode stack, so it compiles the model again inside, tracing through the
mode, which marks each attention call it sees; the backend rewrites that graph and routes its attention calls back
to the manager when they run (:func:`route_graph`), and runs it uncompiled (the exchanges between the ranks cannot
be traced by AOTAutograd).  A graph compiled inside by any other backend raises when it reaches attention.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from attnrewrite.distributed import dual, hashed, kinds, linear, ring, summary, window
from attnrewrite.distributed.collectives import gather_ranks, gather_sequence
from attnrewrite.distributed.exchange import GroupComm
from attnrewrite.distributed.layout import check_divisible, local_positions, segments, shard
from attnrewrite.kernels.checks import SHARDED_SEQUENCE, check_position_slopes, torch_context_parallel_active
from attnrewrite.kernels.sigmoid.api import mask_keeps

_SDPA_NAMES = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_SDPA_KWARG_NAMES = {"query": "q", "key": "k", "value": "v"}

_active: list["_ContextParallelMode"] = []


def _bind_sdpa(args, kwargs) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_NAMES, args))
    bound.update({_SDPA_KWARG_NAMES.get(key, key): value for key, value in kwargs.items()})
    return bound


def _bind_schema(schema, args, kwargs) -> dict:
    bound = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(args):
            bound[argument.name] = args[index]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _qualified_name(func) -> tuple[str, str]:
    """("attnrewrite", "sigmoid_attention") for an op overload or packet, ("", "") for anything else."""
    if isinstance(func, torch._ops.OpOverloadPacket):
        namespace, _, name = func._qualified_op_name.partition("::")
        return namespace, name
    if isinstance(func, torch._ops.OpOverload):
        namespace, _, name = func.name().partition("::")
        return namespace, name
    return "", ""


def _attention_op_name(func) -> str | None:
    """``"softmax_attention"`` for SDPA, the op's name for an attnrewrite ``*_attention`` op, the name
    of another attention op torch has (refused), else None."""
    if func is torch._C._nn.scaled_dot_product_attention:
        return "softmax_attention"
    namespace, name = _qualified_name(func)
    if namespace:
        if namespace == "attnrewrite" and name.endswith("_attention"):
            return name
        if namespace == "aten" and name.split(".")[0] == "scaled_dot_product_attention":
            return "softmax_attention"
        if namespace == "aten" and name.startswith("_scaled_dot_product"):
            return name
    if func is torch._native_multi_head_attention:
        return "_native_multi_head_attention"
    return None


class _ContextParallelMode(TorchFunctionMode):
    """Routes the attention calls made while it is on to their context-parallel form."""

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self._ring = None
        self._comm = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _attention_op_name(func)
        if torch.compiler.is_compiling():  # Dynamo is tracing this method into a graph (see _traced)
            return _traced(func, name, args, kwargs)
        if name is None:
            return func(*args, **kwargs)
        if name not in kinds.SUPPORTED:
            raise _no_form(name)
        if _qualified_name(func)[0] == "attnrewrite":
            packet = func if isinstance(func, torch._ops.OpOverloadPacket) else func.overloadpacket
            bound = _bind_schema(packet.default._schema, args, kwargs)
        else:  # F.scaled_dot_product_attention or aten's
            bound = _bind_sdpa(args, kwargs)
        return self.attend(name, bound)

    def attend(self, name: str, bound: dict) -> Tensor:
        q, k, v = bound["q"], bound["k"], bound["v"]
        what = f"F.scaled_dot_product_attention / attnrewrite {name}"
        for tensor_name, tensor in (("q", q), ("k", k), ("v", v)):
            if not isinstance(tensor, Tensor) or tensor.dim() < 2:
                raise TypeError(f"context_parallel: {what}: {tensor_name} must be a tensor [..., T, D]")
            if tensor.device.type != self.mesh.device_type:
                raise ValueError(f"context_parallel: {what}: {tensor_name} is on {tensor.device}, but the mesh is a "
                                 f"{self.mesh.device_type!r} mesh: use a mesh of the device the model runs on")
        local = q.shape[-2]
        if k.shape[-2] != local or v.shape[-2] != local:
            raise ValueError(
                f"context_parallel: {what}: q has {local} positions and k/v {k.shape[-2]}/{v.shape[-2]}; inside "
                "context_parallel attention must be self-attention over this rank's shard (Tq == Tk)")
        check_divisible(local * self.world, self.world, f"{what}'s q (T = {local} per rank × {self.world} ranks)")
        mask = kinds.as_key_mask(bound["attn_mask"], local, what)
        ring_kind = _RING_KINDS.get(name)
        if ring_kind is not None and ring.applies(ring_kind, q, k, v, bound["dropout_p"]):
            return self.attend_ring(ring_kind, bound, mask)
        if name == "linear_attention" and linear.applies(q, k, v, mask):
            SHARDED_SEQUENCE.depth += 1
            try:  # each chunk's (S, z) state, all-gathered: O(D²) per chunk, no K/V
                states = linear.chunk_states(k, v, mask, bound["feature_map"], linear.compute_dtype(q))
                gathered = gather_ranks(states, 0, self.group)
                return linear.attend_with_states(bound, k, v, mask, gathered, self.rank, self.world)
            finally:
                SHARDED_SEQUENCE.depth -= 1
        if name == "dual_triangle_attention" and dual.applies(bound):
            if self._ring is None:
                self._ring = ring.P2PRing(self.group)
            SHARDED_SEQUENCE.depth += 1
            try:  # two causal softmax rings, the future heads on the mirrored sequence
                return dual.attend(bound, mask, self.rank, self.world, self._ring)
            finally:
                SHARDED_SEQUENCE.depth -= 1
        form = _exchange_form(name, bound, mask)
        if form is not None:
            if self._comm is None:
                self._comm = GroupComm(self.group)
            SHARDED_SEQUENCE.depth += 1
            try:  # summary: the window's raw rows from the neighbours and the chunk summaries from everyone;
                # hashed: the packed codes from everyone, then a ring of K/V blocks; sliding window: the
                # window's and the sinks' rows from their owners.  No K/V gather.
                return form.attend(bound, mask, self.rank, self.world, self._comm)
            finally:
                SHARDED_SEQUENCE.depth -= 1
        warnings.warn(f"context_parallel: {name}: {_why_all_gather(name, bound, mask)}; every rank all-gathers the "
                      "whole sequence's keys and values for this call (exact, but no memory saving)",
                      AllGatherFallback, stacklevel=3)
        if mask is not None and mask.shape[-1] == local:
            mask = gather_sequence(mask, -1, self.group)
        if k.shape[:-1] == v.shape[:-1] and k.dtype == v.dtype:
            kv = gather_sequence(torch.cat([k, v], dim=-1), -2, self.group)
            k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
        else:
            k_all, v_all = gather_sequence(k, -2, self.group), gather_sequence(v, -2, self.group)
        chunks = segments(self.rank, self.world, local * self.world)
        SHARDED_SEQUENCE.depth += 1
        try:
            return kinds.attend(name, bound, k_all, v_all, mask, chunks)
        finally:
            SHARDED_SEQUENCE.depth -= 1

    def attend_ring(self, kind: str, bound: dict, mask: Tensor | None) -> Tensor:
        """Softmax or sigmoid by the ring (:mod:`.ring`): no rank holds more than two shards of K/V."""
        q = bound["q"]
        bias = bound.get("bias") if kind == "sigmoid" else None
        rows = None
        if kind == "sigmoid" and bias is None:  # "auto": b_i = −log n_i needs the key mask's counts
            local = q.shape[-2]
            whole = mask
            if mask is not None and mask.shape[-1] == local:  # bools, O(T): the counts need every key
                whole = gather_sequence(mask_keeps(mask), -1, self.group)  # (a float mask's −inf keys too)
            positions = local_positions(self.rank, self.world, local * self.world, q.device)
            rows = ring.sigmoid_rows(whole, local * self.world, positions, bool(bound["is_causal"]), q.dtype)
        slopes = bound.get("position_slopes") if kind == "sigmoid" else None
        if slopes is not None or (kind == "sigmoid" and bound.get("position") is not None):
            slopes = check_position_slopes(slopes, bound.get("position"), q, q.shape[-3], "context_parallel: "
                                           "sigmoid attention")
        spec = ring.RingSpec(kind, bool(bound["is_causal"]), bound["scale"], bool(bound["enable_gqa"]), bias,
                             self.rank, self.world, bound.get("score_mod") if kind == "sigmoid" else None,
                             slopes, bound.get("position") if slopes is not None else None)
        if self._ring is None:
            self._ring = ring.P2PRing(self.group)
        SHARDED_SEQUENCE.depth += 1
        try:
            return ring.ring_attention(q, bound["k"], bound["v"], mask, rows, spec, self._ring)
        finally:
            SHARDED_SEQUENCE.depth -= 1


    def routed(self, func, args: tuple, kwargs: dict) -> Tensor:
        """``func(*args, **kwargs)``, an attention call of a graph compiled inside this manager, made context-parallel
        as an eager call would be (with this mode off the torch-function stack, as when it dispatches)."""
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is self:
            with torch.overrides._pop_mode_temporarily():
                return self.__torch_function__(func, (), args, kwargs)
        return self.__torch_function__(func, (), args, kwargs)


# ------------------------------------------------------------------------------ compiled graphs inside the manager
#
# Dynamo guards on the torch-function mode stack, so a graph compiled outside the manager is compiled again inside
# it, tracing through _ContextParallelMode.__torch_function__.  Traced there, each attention call is followed by a
# marker (``attnrewrite_cp::sharded_attention``, an identity at trace time): attnrewrite's backend removes the
# markers, rewrites the graph, and routes every attention call of the rewritten graph back to the manager at run
# time (:func:`route_graph`); a graph compiled by any other backend keeps the markers, and running one raises.

_CP_LIB = torch.library.Library("attnrewrite_cp", "DEF")
_CP_LIB.define("sharded_attention(Tensor out, str name) -> Tensor")


def _unrouted(out: Tensor, name: str) -> Tensor:
    raise RuntimeError(
        f"context_parallel: a graph compiled inside attnrewrite.distributed.context_parallel by a torch.compile backend "
        f"other than attnrewrite calls {name}, which would attend over this rank's shard of the sequence only: compile "
        "with backend='attnrewrite' (it routes the graph's attention through the manager) or run the model eagerly")


_CP_LIB.impl("sharded_attention", _unrouted, "CompositeExplicitAutograd")
_CP_LIB.impl("sharded_attention", lambda out, name: torch.empty_like(out), "Meta")
SHARDED_MARKER = torch.ops.attnrewrite_cp.sharded_attention.default


def _no_form(name: str) -> NotImplementedError:
    """The error for an attention call the manager cannot shard."""
    return NotImplementedError(
        f"context_parallel: {name} has no context-parallel form (supported: F.scaled_dot_product_attention and "
        f"attnrewrite's {', '.join(kinds.SUPPORTED)}); inside context_parallel it would attend over this rank's "
        "shard of the sequence only")


def _traced(func, name: str | None, args: tuple, kwargs: dict):
    """What the mode does while Dynamo traces it: the call itself, and after an attention call the marker."""
    if name is None:
        method = getattr(func, "__name__", None)
        if args and isinstance(args[0], Tensor) and method and getattr(Tensor, method, None) is func:
            # a Tensor method written in Python (unflatten, split, …): called as a method, which Dynamo records as
            # one node; traced as the function it calls super(), which Dynamo cannot trace (a graph break)
            return getattr(args[0], method)(*args[1:], **kwargs)
        return func(*args, **kwargs)
    if name not in kinds.SUPPORTED:
        raise _no_form(name)
    out = func(*args, **kwargs)
    if not isinstance(out, Tensor):
        raise NotImplementedError(f"context_parallel: compiling {name} returning {type(out).__name__} inside "
                                  "context_parallel is not supported: run it eagerly")
    return SHARDED_MARKER(out, name)


def compiling_inside() -> _ContextParallelMode | None:
    """The manager a graph is being compiled in (Dynamo calls the backend inside the ``with``), or None."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def not_on_the_shard() -> Iterator[None]:
    """Inside, attnrewrite's ops and kernels run although the manager is on: for the pass's own evaluations while it
    compiles a graph (certification, probes), on tensors of its own, never on a rank's shard."""
    SHARDED_SEQUENCE.depth += 1
    try:
        yield
    finally:
        SHARDED_SEQUENCE.depth -= 1


def strip_markers(gm: torch.fx.GraphModule) -> int:
    """Remove the markers :func:`_traced` put after the attention calls of ``gm``; how many there were."""
    found = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (SHARDED_MARKER, torch.ops.attnrewrite_cp.sharded_attention)]
    for node in found:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return len(found)


def _router(func, name: str):
    def routed(*args, **kwargs):
        mode = compiling_inside()
        if mode is None:
            raise RuntimeError(f"context_parallel: a graph compiled inside attnrewrite.distributed.context_parallel "
                               f"called {name} outside it (Dynamo's guard on the torch-function mode stack should "
                               "have compiled another graph)")
        return mode.routed(func, args, kwargs)

    routed.__name__ = f"context_parallel_{name}"
    routed.__qualname__ = routed.__name__
    return routed


def route_graph(gm: torch.fx.GraphModule) -> list[str]:
    """Make every attention call of the rewritten ``gm`` (SDPA, attnrewrite's ops) a call through the manager that is
    on when it runs, which computes this rank's rows over the whole sequence; the names of the calls routed."""
    routed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        name = _attention_op_name(node.target)
        if name is None:
            continue
        if name not in kinds.SUPPORTED:
            raise NotImplementedError(
                f"context_parallel: {name} has no context-parallel form (supported: F.scaled_dot_product_attention "
                f"and attnrewrite's {', '.join(kinds.SUPPORTED)}); inside context_parallel it would attend over this "
                "rank's shard of the sequence only")
        node.target = _router(node.target, name)
        routed.append(name)
    gm.recompile()
    return routed


class AllGatherFallback(UserWarning):
    """A call inside :func:`context_parallel` that has no sharded form (dropout, softmax off the CPU or in
    16-bit, 3-d inputs, a linear key mask with a head dimension): it is computed exactly from the
    all-gathered keys and values, so each rank holds the whole sequence's K/V for it."""


def _why_all_gather(name: str, bound: dict, mask: Tensor | None) -> str:
    """Why ``name`` has no sharded form for this call (the reason the manager all-gathers K/V)."""
    q, k, v = bound["q"], bound["k"], bound["v"]
    if bound.get("dropout_p", 0.0) != 0.0:
        return ("dropout_p > 0 (the sharded forms recompute blocks in the backward and would redraw the dropout; "
                "the op itself, on the gathered sequence, keeps its own)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q/k/v of {q.dim()}/{k.dim()}/{v.dim()} dims (the sharded forms take [B, H, T, D])"
    if name in ("softmax_attention", "dual_triangle_attention"):
        if bound.get("score_mod"):
            return "a score modification (the ring runs torch's CPU flash kernel, which cannot apply it)"
        if q.device.type != "cpu":
            return f"softmax on {q.device.type} (the ring runs torch's CPU flash kernel)"
        if not k.shape[-1] == q.shape[-1] == v.shape[-1]:
            return (f"softmax with head sizes q/k/v {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} (the ring runs torch's "
                    "CPU flash kernel, which takes one head size)")
        return f"softmax in {q.dtype} / {k.dtype} / {v.dtype} (the ring runs float32 and float64, one dtype)"
    if name == "linear_attention" and mask is not None:
        return f"a key mask with a head dimension ({tuple(mask.shape)}; the state prefix takes [B|1, 1, 1, T])"
    return "no sharded form for these arguments"


def _exchange_form(name: str, bound: dict, mask: Tensor | None):
    """The module computing this call by point-to-point exchanges (:mod:`.exchange`), or None."""
    if name == "summary_attention":
        return summary
    if name == "hashed_attention" and hashed.applies(bound):
        return hashed
    if name == "sliding_window_attention" and window.applies(bound, mask):
        return window
    return None


#: The kinds computed by the ring pass when :func:`ring.applies` (else by the all-gather of K/V).
_RING_KINDS = {"softmax_attention": "softmax", "sigmoid_attention": "sigmoid"}


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"context_parallel: mesh must be a torch.distributed.device_mesh.DeviceMesh, "
                        f"got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"context_parallel: the mesh must be 1-d (the context-parallel dimension), got a "
                         f"{mesh.ndim}-d mesh of shape {tuple(mesh.shape)}; pass mesh[<cp dim name>]")
    if mesh.get_coordinate() is None:
        raise ValueError(f"context_parallel: rank {dist.get_rank()} is not in the mesh {mesh}")


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two contiguous tensors' bytes overlap."""
    a_start, b_start = a.data_ptr(), b.data_ptr()
    return a_start < b_start + b.numel() * b.element_size() and b_start < a_start + a.numel() * a.element_size()


def _check_buffers(mesh, buffers, buffer_seq_dims, no_restore_buffers) -> int | None:
    if len(buffers) != len(buffer_seq_dims):
        raise ValueError(f"context_parallel: buffer_seq_dims must have one entry per buffer: {len(buffers)} "
                         f"buffers, {len(buffer_seq_dims)} seq dims")
    for buffer in no_restore_buffers:
        if not any(buffer is b for b in buffers):
            raise ValueError("context_parallel: no_restore_buffers must be a subset of buffers")
    lengths = set()
    for index, (buffer, dim) in enumerate(zip(buffers, buffer_seq_dims)):
        if not isinstance(buffer, Tensor) or isinstance(buffer, torch.nn.Parameter):
            raise TypeError(f"context_parallel: buffer {index} must be a tensor and not a Parameter, "
                            f"got {type(buffer).__name__}")
        if buffer.device.type != mesh.device_type:
            raise ValueError(f"context_parallel: buffer {index} is on {buffer.device}, the mesh is a "
                             f"{mesh.device_type!r} mesh")
        if not -buffer.dim() <= dim < buffer.dim():
            raise ValueError(f"context_parallel: buffer {index} of shape {tuple(buffer.shape)} has no dim {dim}")
        check_divisible(buffer.shape[dim], mesh.size(), f"buffer {index} of shape {tuple(buffer.shape)} (dim {dim})")
        if not buffer.is_contiguous():
            raise ValueError(f"context_parallel: buffer {index} of shape {tuple(buffer.shape)} is not contiguous (a "
                             "view, e.g. a slice of a batch); it is sharded in place, which would write over the "
                             "memory around it: pass .contiguous() copies (and keep those)")
        for other_index, other in enumerate(buffers[:index]):
            if _overlap(buffer, other):
                raise ValueError(f"context_parallel: buffers {other_index} and {index} share memory (views of one "
                                 "tensor); each is sharded in place, so they would overwrite each other: pass copies")
        lengths.add(buffer.shape[dim])
    if len(lengths) > 1:
        raise ValueError(f"context_parallel: the buffers' sequence lengths differ: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def _check_same_length_everywhere(mesh, length: int | None) -> None:
    """One small all_gather, so that ranks with different sequence lengths fail here, not in a collective."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    mine = torch.tensor([-1 if length is None else length], device=device)
    everyone = [torch.empty_like(mine) for _ in range(mesh.size())]
    dist.all_gather(everyone, mine, group=mesh.get_group())
    seen = sorted({int(t.item()) for t in everyone})
    if len(seen) > 1:
        raise ValueError(f"context_parallel: the ranks of the mesh hold different sequence lengths {seen} "
                         "(-1: no buffers); every rank must pass the same buffers")


@contextlib.contextmanager
def context_parallel(mesh: DeviceMesh, *, buffers: list[Tensor] | None = None,
                     buffer_seq_dims: list[int] | None = None,
                     no_restore_buffers: set[Tensor] | None = None) -> Iterator[None]:
    """Context parallelism for SDPA and every attnrewrite kind, with torch's signature and sharding.

    Args:
        mesh: a 1-d :class:`~torch.distributed.device_mesh.DeviceMesh` (gloo on the CPU, NCCL on CUDA).
        buffers: tensors with a sequence dimension (input ids, labels, positions, a key-padding mask),
            sharded in place: rank r keeps chunks r and 2W − 1 − r of 2W equal chunks.  Every buffer's
            sequence length must be the same and divisible by 2W.  Not Parameters.
        buffer_seq_dims: the sequence dimension of each buffer.
        no_restore_buffers: buffers (a subset of ``buffers``) left sharded on exit.

    Inside, ``F.scaled_dot_product_attention`` and ``attnrewrite.ops.*_attention`` (and the
    ``torch.ops.attnrewrite`` ops a rewritten graph calls) compute this rank's rows of attention over
    the whole sequence, forward and backward, causal (on the global positions) or not, GQA, and an
    ``attn_mask`` that is a key mask (key padding, a per-key bias), itself sharded like the keys.
    Attention must be self-attention over the shard (Tq == Tk == T / W).  A model compiled with
    ``torch.compile(model, backend="attnrewrite", options=...)`` — a converted one (``attnrewrite.convert``,
    learned per-site states) included — runs here: Dynamo compiles it again inside (its guard on the
    torch-function mode stack), the backend rewrites that graph with the states and routes its attention
    calls through this manager, and the graph runs uncompiled (compiler ``eager``, with a warning when
    another was asked for).  Every attention site of such a graph must be rewritten (a skipped one
    raises).  A graph compiled inside by another backend raises when it reaches attention.  Eagerly, a
    converted model's attention modules may instead call ``attnrewrite.converted_attention``.

    Raises:
        TypeError, ValueError: a bad mesh or buffer, lengths not divisible by 2W, lengths that differ
            between the ranks.
        RuntimeError: entered inside torch's own context_parallel, or inside another one of these.
        NotImplementedError (inside): attention this manager cannot make context-parallel.
    """
    buffers = [] if buffers is None else list(buffers)
    buffer_seq_dims = [] if buffer_seq_dims is None else list(buffer_seq_dims)
    no_restore_buffers = set() if no_restore_buffers is None else no_restore_buffers
    _check_mesh(mesh)
    if torch_context_parallel_active():
        raise RuntimeError("attnrewrite.distributed.context_parallel cannot run inside "
                           "torch.distributed.tensor.experimental.context_parallel: use one of them")
    if _active:
        raise RuntimeError("attnrewrite.distributed.context_parallel is already on (for the mesh "
                           f"{_active[-1].mesh}); it does not nest")
    length = _check_buffers(mesh, buffers, buffer_seq_dims, no_restore_buffers)
    _check_same_length_everywhere(mesh, length)
    world, rank = mesh.size(), mesh.get_local_rank()
    with torch.no_grad():
        originals = [None if any(b is kept for kept in no_restore_buffers) else b.clone() for b in buffers]
        for buffer, dim in zip(buffers, buffer_seq_dims):
            local = shard(buffer, dim, rank, world).clone()
            buffer.resize_(local.shape)
            buffer.copy_(local)
    mode = _ContextParallelMode(mesh)
    _active.append(mode)
    SHARDED_SEQUENCE.owner = "attnrewrite.distributed.context_parallel"
    try:
        # a graph compiled before does not run here (Dynamo guards on the mode stack): it is compiled again, through
        # the mode, and attnrewrite's backend routes the new graph's attention calls back to it (route_graph)
        with mode:
            yield
    finally:
        SHARDED_SEQUENCE.owner = None
        _active.pop()
        with torch.no_grad():
            for buffer, original in zip(buffers, originals):
                if original is not None:
                    buffer.resize_(original.shape)
                    buffer.copy_(original)


@torch.no_grad()
def context_parallel_unshard(mesh: DeviceMesh, buffers: list[Tensor], seq_dims: list[int]) -> list[Tensor]:
    """The whole sequences from each rank's shard (an all_gather, then back to natural order)."""
    _check_mesh(mesh)
    return [gather_sequence(b, dim, mesh.get_group()) for b, dim in zip(buffers, seq_dims)]
