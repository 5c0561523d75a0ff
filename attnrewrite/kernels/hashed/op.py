"""``attnrewrite::hashed_attention_torch`` (the torch path of ``attnrewrite::hashed_attention``) and its
backward as ``torch.library`` custom ops.

Opaque to torch.compile (the selection, a ``topk`` over integer priorities, and the block loops stay
inside), with fake implementations and the backward registered as the forward's autograd.
``hash="random"`` draws its hyperplanes inside the op from ``seed`` (the same draw on every call
and device), so the random variant needs no state; ``hash="learned"`` takes the projections as
tensors (attached to the model by :func:`attnrewrite.convert`) and returns their gradients.

Float32 CPU calls with ``hash="random"``, no ``score_mod``, no ``far_dtype`` and no relative bias table run the compiled loop of
:mod:`.native` where torch runs on one thread (``ATTNREWRITE_NATIVE=0``, a missing C compiler or more
threads: the torch path of :mod:`.sparse`); the forward op then also returns its selection, which the
backward reuses instead of selecting again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnrewrite.kernels._ops import kernel_op, sdpa_schema
from attnrewrite.kernels.checks import check_dropout, check_mask_dtype, check_qkv, refuse_torch_context_parallel
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import native
from .codes import projections, random_hyperplanes
from .sparse import hashed_attention_backward, hashed_attention_forward

HASHES = ("random", "learned")
WHAT = "hashed attention"
#: the names ``far_dtype`` takes: float8_e4m3fn where this torch has it
FAR_DTYPES = ("bfloat16", "float16") + (("float8_e4m3fn",) if hasattr(torch, "float8_e4m3fn") else ())
#: the ``far_dtype`` names the Triton kernels implement (:mod:`.triton_attn`; ``impl="triton"`` refuses the others)
TRITON_FAR_DTYPES = ("bfloat16", "float16")


def far_dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype ``far_dtype`` names (None: off), or a ValueError naming the accepted names."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in FAR_DTYPES:
        raise ValueError(f"far_dtype must be None or one of {FAR_DTYPES}, got {name!r}")
    return getattr(torch, name)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                 enable_gqa: bool, bits: int, top_k: int, window: int, sinks: int, hash: str,
                 q_projection: Optional[Tensor], k_projection: Optional[Tensor]) -> None:
    """Raise an error naming the first problem with a hashed-attention call (the types as in
    :mod:`attnrewrite.kernels.checks`)."""
    refuse_torch_context_parallel(WHAT)
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa)
    if is_causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"is_causal needs Tq == Tk (got {q.shape[-2]} and {k.shape[-2]}); queries that come after "
                         "all the keys (decoding) see every key: pass is_causal=False")
    check_dropout(dropout_p, WHAT, supported=False)
    if bits < 8 or bits % 8:
        raise ValueError(f"bits must be a positive multiple of 8 (codes are stored as bytes), got {bits}")
    if top_k < 0 or window < 0 or sinks < 0:
        raise ValueError(f"top_k, window and sinks must be >= 0, got {top_k}, {window}, {sinks}")
    if hash not in HASHES:
        raise ValueError(f"hash must be one of {HASHES}, got {hash!r}")
    if (hash == "learned") != (q_projection is not None and k_projection is not None):
        raise ValueError("hash='learned' takes q_projection [Hq, D, bits] and k_projection [Hkv, D, bits] (attached "
                         "by attnrewrite.convert); hash='random' takes none")
    if hash == "learned":
        want = ((q.shape[1], q.shape[-1], bits), (k.shape[1], k.shape[-1], bits))
        got = (tuple(q_projection.shape), tuple(k_projection.shape))
        if got != want:
            raise ValueError(f"projections must be [Hq, D, bits] and [Hkv, D, bits] = {want}, got {got}")
    if attn_mask is not None:
        check_mask_dtype(attn_mask, WHAT, like=q)  # the selection adds a float mask as it is
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if (attn_mask.dim() > 4 or shape[1] != 1 or shape[0] not in (1, q.shape[0]) or shape[2] not in (1, q.shape[-2])
                or shape[3] not in (1, k.shape[-2])):
            raise ValueError("hashed attention selects keys per key/value head group: attn_mask must be "
                             f"broadcastable to [B, 1, Tq, Tk] (the same for every head), got {tuple(attn_mask.shape)}")


def check_relative(relative: Optional[Tensor], q: Tensor, k: Tensor) -> None:
    """Raise an error naming the problem with a relative bias table R (``relative``), unless it is None or a float
    tensor [Hq, Tq + Tk − 1] on q's device (the public op expands one head's table to Hq)."""
    if relative is None:
        return
    want = (q.shape[1], q.shape[-2] + k.shape[-2] - 1)
    if not relative.is_floating_point() or tuple(relative.shape) != want or relative.device != q.device:
        raise ValueError(f"{WHAT}: the relative bias table must be a float tensor [Hq, Tq + Tk - 1] = {list(want)} on "
                         f"{q.device}, got {relative.dtype} {tuple(relative.shape)} on {relative.device}")


def _resolve(q, k, attn_mask, scale, bits, seed, q_projection, k_projection):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    proj_q, proj_k = projections(q_projection, k_projection, q.shape[-1], bits, seed, q.device)
    mask = None if attn_mask is None else attn_mask.to(q.device)
    return scale, proj_q, proj_k, mask


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, bits: int = 64,
             top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
             q_projection: Optional[Tensor] = None, k_projection: Optional[Tensor] = None, seed: int = 0,
             score_mod: Optional[str] = None, far_dtype: Optional[str] = None,
             relative: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    far = far_dtype_of(far_dtype)
    check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, bits, top_k, window, sinks, hash,
                 q_projection, k_projection)
    check_relative(relative, q, k)
    scale, proj_q, proj_k, mask = _resolve(q, k, attn_mask, scale, bits, seed, q_projection, k_projection)
    if relative is not None:  # the compiled loop reads no table: the torch path gathers R per selected key
        out = hashed_attention_forward(q, k, v, mask, is_causal, scale, bits, top_k, window, sinks, proj_q, proj_k,
                                       parse_score_mod(score_mod), far, relative)
        return out, q.new_empty(0, dtype=torch.int32)
    if native.covers(q, k, v, mask, bits, hash, score_mod, far):
        if torch.get_num_threads() == 1:  # the compiled loop runs on one thread: used where torch does too
            return native.forward(q, k, v, mask, is_causal, scale, bits, top_k, window, sinks, proj_q, proj_k)
        out = hashed_attention_forward(q, k, v, mask, is_causal, scale, bits, top_k, window, sinks, proj_q, proj_k)
        return out, _no_selection(q, k, top_k, window, sinks)
    out = hashed_attention_forward(q, k, v, mask, is_causal, scale, bits, top_k, window, sinks, proj_q, proj_k,
                                   parse_score_mod(score_mod), far)
    return out, q.new_empty(0, dtype=torch.int32)


#: the first entry of a selection the forward did not compute (the torch path ran): the backward recomputes
NOT_SELECTED = -2


def _selection_shape(q: Tensor, k: Tensor, top_k: int, window: int, sinks: int) -> tuple:
    return (q.shape[0], k.shape[1], q.shape[2], native.selection_width(k.shape[2], top_k, window, sinks))


def _no_selection(q: Tensor, k: Tensor, top_k: int, window: int, sinks: int) -> Tensor:
    """The selection output of a call the compiled loop covers that ran on the torch path (more threads)."""
    # filled, not empty: the output must be the same on every run (torch.compile's checks compare it)
    return torch.full(_selection_shape(q, k, top_k, window, sinks), NOT_SELECTED, dtype=torch.int32)


def _has_selection(selection: Optional[Tensor]) -> bool:
    return selection is not None and selection.numel() > 0 and int(selection.view(-1)[0]) != NOT_SELECTED


def _forward_fake(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, bits=64,
                  top_k=256, window=64, sinks=4, hash="random", q_projection=None, k_projection=None, seed=0,
                  score_mod=None, far_dtype=None, relative=None):
    parse_score_mod(score_mod)  # a bad program fails while tracing, as when run
    far_dtype_of(far_dtype)
    check_inputs(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, bits, top_k, window, sinks, hash,
                 q_projection, k_projection)
    check_relative(relative, q, k)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if relative is None and native.covers(q, k, v, attn_mask, bits, hash, score_mod, far_dtype_of(far_dtype)):
        return out, q.new_empty(_selection_shape(q, k, top_k, window, sinks), dtype=torch.int32)
    return out, q.new_empty(0, dtype=torch.int32)


def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
              scale: Optional[float], bits: int, top_k: int, window: int, sinks: int,
              q_projection: Optional[Tensor], k_projection: Optional[Tensor],
              seed: int, score_mod: str = "", far_dtype: str = "", selection: Optional[Tensor] = None,
              relative: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    scale, proj_q, proj_k, mask = _resolve(q, k, attn_mask, scale, bits, seed, q_projection, k_projection)
    learned = q_projection is not None
    if _has_selection(selection) and torch.get_num_threads() == 1 and native.library() is not None:
        dq, dk, dv = native.backward(grad, q, k, v, mask, scale, selection)  # over the forward's selection
        return dq, dk, dv, q.new_empty(0), q.new_empty(0), q.new_empty(0)
    dq, dk, dv, d_pq, d_pk, d_rel = hashed_attention_backward(
        grad.contiguous(), q, k, v, mask, is_causal, scale, bits, top_k, window, sinks, proj_q, proj_k, learned,
        parse_score_mod(score_mod), far_dtype_of(far_dtype or None), relative)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    d_rel = q.new_empty(0) if d_rel is None else d_rel.contiguous()
    if not learned:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0), d_rel
    return dq, dk, dv, d_pq.to(q_projection.dtype).contiguous(), d_pk.to(k_projection.dtype).contiguous(), d_rel


def _backward_fake(grad, q, k, v, attn_mask, is_causal, scale, bits, top_k, window, sinks, q_projection, k_projection,
                   seed, score_mod="", far_dtype="", selection=None, relative=None):
    d_pq = q.new_empty(0) if q_projection is None else q_projection.new_empty(q_projection.shape)
    d_pk = q.new_empty(0) if k_projection is None else k_projection.new_empty(k_projection.shape)
    d_rel = q.new_empty(0) if relative is None else relative.new_empty(relative.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_pq, d_pk, d_rel


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, _dropout, is_causal, scale, _gqa, bits, top_k, window, sinks, _hash, q_projection,
     k_projection, seed, score_mod, far_dtype, relative) = inputs
    _out, selection = output
    ctx.save_for_backward(q, k, v, attn_mask, q_projection, k_projection, selection, relative)
    ctx.options = (is_causal, scale, bits, top_k, window, sinks)
    ctx.seed, ctx.score_mod, ctx.far_dtype = seed, score_mod or "", far_dtype or ""


def _autograd(ctx, grad, _grad_selection):
    q, k, v, attn_mask, q_projection, k_projection, selection, relative = ctx.saved_tensors
    dq, dk, dv, d_pq, d_pk, d_rel = torch.ops.attnrewrite.hashed_attention_backward(
        grad, q, k, v, attn_mask, *ctx.options, q_projection, k_projection, ctx.seed, ctx.score_mod, ctx.far_dtype,
        selection, relative)
    learned = q_projection is not None
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None,
            d_pq if learned else None, d_pk if learned else None, None, None, None,
            d_rel if relative is not None else None)


# SymInt, not int: the schema custom_op infers from ``int`` annotations, kept as it was.  The public op
# ``attnrewrite::hashed_attention`` (:mod:`.public`, with SDPA's autocast rule) chooses this or the kernels.
# It returns (out, selection): the selection int32 [B, Hkv, Tq, S] of the compiled CPU loop (:mod:`.native`),
# which its backward reuses, where that loop covers the call (first entry NOT_SELECTED where the torch path
# ran instead, on more than one thread), else an empty tensor.
hashed_attention_op = kernel_op(
    "hashed_attention_torch", _forward, fake=_forward_fake, backward=_autograd, setup_context=_setup_context,
    schema=sdpa_schema('SymInt bits=64, SymInt top_k=256, SymInt window=64, SymInt sinks=4, str hash="random", '
                       "Tensor? q_projection=None, Tensor? k_projection=None, SymInt seed=0, str? score_mod=None, "
                       "str? far_dtype=None, Tensor? relative=None", returns="(Tensor, Tensor)"))
hashed_attention_backward_op = kernel_op("hashed_attention_backward", _backward, fake=_backward_fake)


def _hyperplanes(head_dim: int, bits: int, seed: int, device: torch.device) -> Tensor:
    return random_hyperplanes(head_dim, bits, seed, device).clone()


def _hyperplanes_fake(head_dim, bits, seed, device):
    return torch.empty(head_dim, bits, dtype=torch.float64, device=device)


#: ``hash="random"``'s hyperplanes [D, bits] float64 as an opaque op, for the kernels' path: drawn from the
#: seed when the graph runs (a traced graph cannot hold the generator's draw, and drawing it while tracing
#: would cache a fake tensor)
hashed_hyperplanes_op = kernel_op("hashed_hyperplanes", _hyperplanes, fake=_hyperplanes_fake)
