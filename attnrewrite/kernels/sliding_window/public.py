"""``attnrewrite::sliding_window_attention``, the public sliding-window op: SDPA's signature plus ``window``
and ``sinks``, and its blockwise torch path.

Exact softmax attention restricted to a band of positions: causal, key j is visible from query i when
i − window < j ≤ i (the last ``window`` keys, itself included); not causal, when |i − j| < window.
The first ``sinks`` keys stay visible as well (StreamingLLM's attention sinks; causally, only once
they are in the past).  ``attn_mask`` restricts this further, so a site whose own mask is already a
narrower window keeps its own.

Paths (``impl``): the Triton kernels (:mod:`.op`, :mod:`.triton_fwd`, :mod:`.triton_bwd`: flash-style,
visiting only the band's and the sinks' key blocks), taken by ``"auto"`` on CUDA for 16-bit inputs; and
the torch paths below, everywhere else.

The torch path (:func:`blockwise_sliding_window`) never builds a [Tq, Tk] matrix: queries are cut into
blocks of ``block`` rows, and each block is scored against the contiguous run of keys its band can
reach (a strided view of the keys, ``unfold``) plus the sink keys — O(Tq · (block + band)) memory and
time.  A sequence at most twice as long as the band runs as SDPA with the band as a dense mask
(:func:`dense_sliding_window`): that mask is then no larger than O(Tq · band) either.  The op is ``CompositeImplicitAutograd`` over it, so autograd, fake tensors and inductor see
plain torch ops.
"""

from __future__ import annotations

import concurrent.futures
import math

import torch
import torch.nn.functional as F

from attnrewrite.kernels._ops import composite_op, kernel_op, resolve_impl, sdpa_autocast, sdpa_schema
from attnrewrite.kernels.checks import RELATIVE, check_dropout, check_mask_dtype, check_position_slopes, check_qkv
from attnrewrite.kernels.score_mods import parse as parse_score_mod

try:  # the Triton path is optional: the torch paths work wherever torch does
    from . import op as _op
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _op = None

WHAT = "sliding-window attention"
#: query rows per block: blocks near the window's size keep both the score band and the strided
#: copies of the keys O(T·window)
MAX_BLOCK, MIN_BLOCK = 1024, 16


def _int_option(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{WHAT}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{WHAT}: {name} must be >= {minimum}, got {value}")


def _check(q, k, v, attn_mask, dropout_p, enable_gqa, window, sinks) -> None:
    check_qkv(q, k, v, WHAT, enable_gqa=enable_gqa)
    check_dropout(dropout_p, WHAT, supported=True)
    _int_option("window", window, 1)
    _int_option("sinks", sinks, 0)
    if attn_mask is not None:
        check_mask_dtype(attn_mask, WHAT)
        if attn_mask.device != q.device:
            raise ValueError(f"{WHAT}: attn_mask is on {attn_mask.device}, q on {q.device}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(padded, target)):
            raise ValueError(f"{WHAT}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, Hq, Tq, Tk] = {list(target)}")


def _pad(x: torch.Tensor, dim: int, before: int, after: int, value) -> torch.Tensor:
    """``x`` with ``before``/``after`` entries of ``value`` added along ``dim`` (any dtype, bool included)."""
    if before <= 0 and after <= 0:
        return x
    parts = []
    for count in (before, after):
        shape = list(x.shape)
        shape[dim] = max(count, 0)
        parts.append(x.new_full(shape, value))
    return torch.cat([parts[0], x, parts[1]], dim=dim)


def _softmax_or_zero(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; a row whose entries are all −inf gives zeros (and zero gradients)."""
    top = scores.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _split_heads(x: torch.Tensor, heads_kv: int, groups: int) -> torch.Tensor:
    """[Bm, Hm, ...] with Hm ∈ {1, Hkv·groups} as [Bm, Hkv|1, groups|1, ...]."""
    if x.shape[1] == 1:
        return x.unsqueeze(2)
    return x.reshape(x.shape[0], heads_kv, groups, *x.shape[2:])


def blockwise_sliding_window(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale: float | None,
                             window: int, sinks: int, block: int | None = None, score_mod=None, slopes=None,
                             position: str | None = None, dropout_generator: torch.Generator | None = None
                             ) -> torch.Tensor:
    """Sliding-window attention, block by block (see the module docstring); arguments as the op's
    (inputs already checked), ``block`` the query rows per block (default: the window, within
    :data:`MIN_BLOCK` … :data:`MAX_BLOCK`), ``score_mod`` a parsed score modification
    (:class:`~attnrewrite.kernels.score_mods.ScoreProgram`) applied to the band's and the sinks' scores
    before the mask, or None; ``slopes`` ([Hq], checked) and ``position`` the position bias, computed for
    the band's and the sinks' scores only; ``dropout_generator`` draws the dropout mask (None: the default
    generator, as ``F.dropout``): the same generator state gives the same mask, which is how the opaque op's
    backward recomputes the forward's.  Returns [B, Hq, Tq, Dv] in q's dtype."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    groups = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    form = position  # (the name is taken by the query positions below)
    compute = torch.promote_types(q.dtype, torch.float32)
    offset = len_k - len_q                          # query i sits at position i + offset (bottom-right)
    left = window - 1                               # the band reaches `left` keys before the query ...
    right = 0 if is_causal else window - 1          # ... and `right` after it
    rows = block or max(MIN_BLOCK, min(window, MAX_BLOCK))
    if isinstance(len_q, int) and isinstance(len_k, int):
        # known sizes: no band wider than the sequence, no block taller than it.  Symbolic sizes
        # (torch.compile(dynamic=True)) keep the constants, so that no size is specialised on.
        left, right, rows = min(left, len_k - 1), min(right, len_q - 1), min(rows, len_q)
    blocks = -(-len_q // rows)
    span = rows + left + right                      # keys one block can reach

    # block b, column c reads key j = b·rows + first + c
    first = offset - left
    pad_before = max(0, -first)
    pad_after = max(0, (blocks - 1) * rows + first + span - len_k)
    start = first + pad_before                      # column 0 of block 0 in the padded keys
    length = (blocks - 1) * rows + span

    def band(x):  # [B, Hkv, Tk, E] -> [B, Hkv, 1, blocks, span, E], a strided view of the padded keys
        x = _pad(x, 2, pad_before, pad_after, 0)[:, :, start:start + length]
        return x.unfold(2, span, rows).transpose(-1, -2).unsqueeze(2)

    q_blocks = _pad(q, 2, 0, blocks * rows - len_q, 0).reshape(batch, heads_kv, groups, blocks, rows, dim)
    scores = (q_blocks @ band(k).transpose(-1, -2)).to(compute) * scale       # [B, Hkv, g, blocks, rows, span]

    device = q.device
    r = torch.arange(rows, device=device).view(rows, 1)
    c = torch.arange(span, device=device).view(1, span)
    rel = c - left - r                              # key position − query position, the same in every block
    in_band = (rel <= right) & (rel > -window) & (rel < window)
    key = (torch.arange(blocks, device=device) * rows + first).view(blocks, 1) + c     # [blocks, span]
    keep = in_band & ((key >= 0) & (key < len_k)).view(blocks, 1, span)                # [blocks, rows, span]

    n_sinks = min(sinks, len_k)
    position = (torch.arange(blocks, device=device) * rows).view(blocks, 1) + r.view(1, rows) + offset  # [blocks, rows]
    j = torch.arange(n_sinks, device=device)
    p = position.unsqueeze(-1)
    near = (j - p).abs() < window if not is_causal else (j <= p) & (j > p - window)
    keep_sinks = ~near & ((j <= p) if is_causal else torch.ones_like(near))            # [blocks, rows, sinks]
    sink_scores = (q_blocks @ k[:, :, :n_sinks].transpose(-1, -2).unsqueeze(2).unsqueeze(3)).to(compute) * scale
    if score_mod is not None:  # elementwise, so per block as on the whole matrix; autograd differentiates it
        scores, sink_scores = score_mod(scores), score_mod(sink_scores)
    if slopes is not None and form == "relative":  # R[h, j − i + Tq − 1], gathered on the band and the sinks
        last = slopes.shape[-1] - 1  # (indices outside the table are masked entries: clamped, then hidden)
        band_index = (rel + offset + (len_q - 1)).clamp(0, last)                     # [rows, span]
        sink_index = (j - (p - offset) + (len_q - 1)).clamp(0, last)                 # [blocks, rows, sinks]
        table = slopes.to(compute)
        scores = scores + table[:, band_index].view(1, heads_kv, groups, 1, rows, span)
        sink_scores = sink_scores + table[:, sink_index].view(1, heads_kv, groups, blocks, rows, n_sinks)
    elif slopes is not None:  # slopes[h] · d(i, j) on the band (the same in every block) and on the sinks
        per_head = slopes.to(compute).view(1, heads_kv, groups, 1, 1, 1)
        band_distance = (rel + offset).to(compute)                                   # [rows, span]: j − i
        sink_distance = (j - (p - offset)).to(compute)                               # [blocks, rows, sinks]
        if form == "|j-i|":
            band_distance, sink_distance = band_distance.abs(), sink_distance.abs()
        scores, sink_scores = scores + per_head * band_distance, sink_scores + per_head * sink_distance

    if attn_mask is not None:
        band_mask, sink_mask = _mask_blocks(attn_mask, heads_kv, groups, len_q, len_k, rows, blocks, span,
                                            pad_before, pad_after, start, n_sinks)
        if attn_mask.dtype == torch.bool:
            keep, keep_sinks = keep & band_mask, keep_sinks & sink_mask
        else:
            scores, sink_scores = scores + band_mask.to(compute), sink_scores + sink_mask.to(compute)
    minus_inf = torch.full((), float("-inf"), dtype=compute, device=device)
    scores = torch.where(keep, scores, minus_inf)
    sink_scores = torch.where(keep_sinks, sink_scores, minus_inf)

    probs = _softmax_or_zero(torch.cat([sink_scores, scores], dim=-1))
    if dropout_p > 0 and dropout_generator is not None:
        keep_drawn = torch.rand(probs.shape, generator=dropout_generator, device=device) >= dropout_p
        probs = probs * keep_drawn / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    probs = probs.to(v.dtype)
    out = probs[..., n_sinks:] @ band(v)                                            # [B, Hkv, g, blocks, rows, Dv]
    if n_sinks:
        out = out + probs[..., :n_sinks] @ v[:, :, :n_sinks].unsqueeze(2).unsqueeze(3)
    return out.reshape(batch, heads_q, blocks * rows, dim_v)[:, :, :len_q]


def _mask_blocks(attn_mask, heads_kv, groups, len_q, len_k, rows, blocks, span, pad_before, pad_after, start,
                 n_sinks):
    """The caller's mask read in block form: (band [Bm, Hkv|1, g|1, blocks, rows|1, span],
    sinks [Bm, Hkv|1, g|1, blocks|1, rows|1, n_sinks]); padding entries hide their key."""
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    mask = mask.expand(*mask.shape[:3], len_k)
    fill = False if mask.dtype == torch.bool else float("-inf")
    sink_mask = mask[..., :n_sinks]
    padded = _pad(mask, 3, pad_before, pad_after, fill)
    if mask.shape[2] == 1:  # the same for every query (key padding): one row per block
        band = padded[:, :, 0, start:start + (blocks - 1) * rows + span].unfold(-1, span, rows).unsqueeze(-2)
        sink_mask = sink_mask.unsqueeze(2)                                          # [Bm, Hm, 1, 1, sinks]
    else:
        padded = _pad(padded, 2, 0, blocks * rows - len_q, fill)
        padded = padded.reshape(*padded.shape[:2], blocks, rows, padded.shape[-1])
        column = (torch.arange(blocks, device=mask.device) * rows + start).view(blocks, 1) + torch.arange(
            span, device=mask.device)
        index = column.view(1, 1, blocks, 1, span).expand(*padded.shape[:2], blocks, rows, span)
        band = padded.gather(-1, index)
        sink_mask = _pad(sink_mask, 2, 0, blocks * rows - len_q, fill).reshape(
            *sink_mask.shape[:2], blocks, rows, n_sinks)
    return _split_heads(band, heads_kv, groups), _split_heads(sink_mask, heads_kv, groups)


def dense_sliding_window(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale: float | None,
                         window: int, sinks: int, slopes=None, position: str | None = None) -> torch.Tensor:
    """Sliding-window attention as SDPA with the [Tq, Tk] band as a bool mask: for sequences not much longer
    than the band, where the mask is no larger than the blockwise path's scores and SDPA's fused kernel
    is faster.  Arguments as :func:`blockwise_sliding_window` (a position bias joins the mask: [Hq, Tq, Tk]
    is as small as the band here)."""
    len_q, len_k = q.shape[-2], k.shape[-2]
    p = torch.arange(len_q, device=q.device).view(len_q, 1) + (len_k - len_q)
    j = torch.arange(len_k, device=q.device).view(1, len_k)
    near = ((j <= p) & (j > p - window)) if is_causal else (j - p).abs() < window
    visible = near | ((j < sinks) & (j <= p)) if is_causal else near | (j < sinks)
    if slopes is not None:
        if position == "relative":  # R[h, j − i + Tq − 1]
            bias = slopes.to(q.dtype)[:, j - (p - (len_k - len_q)) + (len_q - 1)]    # [Hq, Tq, Tk]
        else:
            distance = (j - (p - (len_k - len_q))).to(q.dtype)
            distance = distance.abs() if position == "|j-i|" else distance
            bias = slopes.to(q.dtype).view(-1, 1, 1) * distance                      # [Hq, Tq, Tk]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        elif attn_mask is not None:
            bias = bias + attn_mask.to(q.dtype)
        attn_mask = bias
    if attn_mask is None:
        mask = visible
    elif attn_mask.dtype == torch.bool:
        mask = attn_mask & visible
    else:
        mask = torch.where(visible, attn_mask.to(q.dtype), torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    # enable_gqa=True also holds for equal head counts (one query head per kv head); comparing the head
    # counts instead gives a SymBool under dynamic shapes, which SDPA refuses
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=True)


def _band_covers_the_sequence(len_q, len_k, is_causal: bool, window: int) -> bool:
    """Known sizes whose dense [Tq, Tk] mask holds at most twice the band's Tq·(keys per query)."""
    if not (isinstance(len_q, int) and isinstance(len_k, int)):
        return False  # symbolic sizes: one path for every length, no guard on T
    return len_k <= 2 * (window if is_causal else 2 * window - 1)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_refusal(dropout_p: float, attn_mask) -> str | None:
    """Why the kernels cannot run a call, or None (every score modification compiles in: fixed or generated)."""
    if dropout_p > 0.0:
        return "the Triton kernels do not implement dropout (dropout_p > 0)"
    if attn_mask is not None and attn_mask.requires_grad:
        return "the Triton kernels do not compute the gradient of a float attn_mask that requires grad"
    return None


def _triton_path(q, k, v, attn_mask, is_causal: bool, scale: float | None, window: int, sinks: int,
                 program=None, slopes=None, position: str | None = None) -> torch.Tensor:
    """The call on the kernels: a bool mask becomes 0 / −inf in q's dtype (a float one is read as it is)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        elif mask.dtype not in _FLOAT_DTYPES:
            mask = mask.float()
    return _op.sliding_window_triton(q, k, v, mask, None, scale, is_causal, window, sinks, program,
                                     None if slopes is None else slopes.float(), position)


def _impl(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False, window=256, sinks=0,
          impl="auto", score_mod=None, position_slopes=None, position=None):
    _check(q, k, v, attn_mask, dropout_p, enable_gqa, window, sinks)
    program = parse_score_mod(score_mod)
    slopes = check_position_slopes(position_slopes, position, q, q.shape[1], WHAT, True)  # (relative_ok)
    position = position if slopes is not None else None
    if position == RELATIVE and slopes.shape[1] != q.shape[-2] + k.shape[-2] - 1:
        raise ValueError(f"{WHAT}: the relative bias table must hold Tq + Tk - 1 = {q.shape[-2] + k.shape[-2] - 1} "
                         f"distances, got {slopes.shape[1]}")
    path = resolve_impl(impl, q.device, what=WHAT, dtype=q.dtype, head_dims=(q.shape[-1], v.shape[-1]),
                        triton_dtypes=_FLOAT_DTYPES, auto_dtypes=(torch.float16, torch.bfloat16),
                        refusal=_kernel_refusal(dropout_p, attn_mask), available=_op is not None,
                        interpreter_active=lambda: _op.interpreter_active())
    if path == "triton":
        return _triton_path(q, k, v, attn_mask, is_causal, scale, window, sinks, program, slopes, position)
    if program is None and _band_covers_the_sequence(q.shape[-2], k.shape[-2], is_causal, window):
        return dense_sliding_window(q, k, v, attn_mask, dropout_p, is_causal, scale, window, sinks, slopes, position)
    if not all(isinstance(n, int) for n in (q.shape[-2], k.shape[-2])):
        # symbolic lengths (torch.compile(dynamic=True)): one opaque op, whose backward recomputes the blockwise
        # path eagerly.  Traced through, inductor (torch 2.13, CPU) compiles the blockwise backward with symbolic
        # lengths into code that reads out of bounds: wrong gradients (tests/kernels/sliding_window/
        # test_sliding_window_compiled.py), with or without dropout.  Dropout: a seed drawn here from the default
        # generator (so torch.manual_seed governs it, as F.dropout) seeds the op's own generator, and the backward
        # redraws the forward's mask from it
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
        return torch.ops.attnrewrite.sliding_window_blockwise(q, k, v, attn_mask, is_causal, scale, window, sinks,
                                                               score_mod, slopes, position, dropout_p, seed)
    # (SDPA cannot apply a score modification: such calls take the blockwise path at every length)
    return blockwise_sliding_window(q, k, v, attn_mask, dropout_p, is_causal, scale, window, sinks,
                                    score_mod=program, slopes=slopes, position=position)


def _dropout_generator(dropout_p: float, seed, device: torch.device) -> torch.Generator | None:
    """The generator that draws the opaque op's dropout mask: seeded by the int64 scalar ``seed`` (on the CPU),
    so that the forward and the backward's recomputation draw the same mask; None without dropout."""
    if dropout_p == 0.0:
        return None
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"{WHAT}: dropout_p = {dropout_p} > 0 needs seed, an int64 scalar tensor, got "
                         f"{None if seed is None else (seed.dtype, tuple(seed.shape))}")
    return torch.Generator(device=device).manual_seed(int(seed.item()))


def _blockwise(q, k, v, attn_mask, is_causal, scale, window, sinks, score_mod, slopes, position, dropout_p=0.0,
               seed=None):
    check_dropout(dropout_p, WHAT, supported=True)
    return blockwise_sliding_window(q, k, v, attn_mask, dropout_p, is_causal, scale, window, sinks,
                                    score_mod=parse_score_mod(score_mod), slopes=slopes, position=position,
                                    dropout_generator=_dropout_generator(dropout_p, seed, q.device)).contiguous()


_BLOCKWISE_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float? scale, int window, "
                   "int sinks, str? score_mod, Tensor? slopes, str? position, float dropout_p=0.0, Tensor? seed=None")
#: the forward op's differentiable inputs, by position: q, k, v, attn_mask, slopes (a relative table R)
_DIFFERENTIABLE = (0, 1, 2, 3, 9)


def _blockwise_backward(grad, q, k, v, attn_mask, slopes, seed, is_causal, scale, window, sinks, score_mod, position,
                        dropout_p, needs):
    """The gradients of q, k, v, attn_mask and slopes (``needs``: which are wanted; an empty tensor for the
    others), the blockwise path recomputed under autograd, eagerly (with dropout, from the forward's ``seed``:
    the forward's mask).

    An op's implementation runs below autograd (the dispatcher excludes its keys in this thread), and
    torch.func's wrappers cannot pass a TorchDispatchMode (opcheck's, FlopCounterMode: "Cannot access storage of
    TensorWrapper"), so the recomputation runs in a worker thread, whose thread-local state is the default one:
    autograd on, no mode, no autocast (the inputs arrive cast already)."""
    inputs = [q, k, v, attn_mask, slopes]

    def recompute():
        leaves = [x.detach().requires_grad_() if need else x for x, need in zip(inputs, needs)]
        out = _blockwise(*leaves[:4], is_causal, scale, window, sinks, score_mod, leaves[4], position, dropout_p,
                         seed)
        wanted = [x for x, need in zip(leaves, needs) if need]
        return torch.autograd.grad(out, wanted, grad) if wanted else ()

    def on_the_callers_stream():  # (a worker starts on its device's default stream)
        if not q.is_cuda:
            return recompute()
        with torch.cuda.device(q.device), torch.cuda.stream(stream):
            return recompute()

    stream = torch.cuda.current_stream(q.device) if q.is_cuda else None
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        found = iter(worker.submit(on_the_callers_stream).result())
    return [next(found).contiguous() if need else q.new_empty(0) for need in needs]


def _blockwise_backward_fake(grad, q, k, v, attn_mask, slopes, seed, is_causal, scale, window, sinks, score_mod,
                             position, dropout_p, needs):
    return [t.new_empty(t.shape) if need else q.new_empty(0) for t, need in zip([q, k, v, attn_mask, slopes], needs)]


_backward_op = kernel_op("sliding_window_blockwise_backward", _blockwise_backward, fake=_blockwise_backward_fake,
                         schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? slopes, "
                                "Tensor? seed, bool is_causal, float? scale, int window, int sinks, str? score_mod, "
                                "str? position, float dropout_p, bool[] needs) -> Tensor[]")


def _setup_blockwise(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, window, sinks, score_mod, slopes, position, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, attn_mask, slopes, seed)
    ctx.options = (is_causal, scale, window, sinks, score_mod, position, dropout_p)


def _backward_blockwise(ctx, grad):
    q, k, v, attn_mask, slopes, seed = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _DIFFERENTIABLE]
    grads = _backward_op(grad.contiguous(), q, k, v, attn_mask, slopes, seed, *ctx.options, needs)
    result = [None] * 13
    for position, g, need in zip(_DIFFERENTIABLE, grads, needs):
        result[position] = g if need else None
    return tuple(result)


# the blockwise path as one opaque op with symbolic lengths (see _impl)
kernel_op("sliding_window_blockwise", _blockwise,
          fake=lambda q, k, v, *args: q.new_empty((*q.shape[:-1], v.shape[-1])),
          schema=f"({_BLOCKWISE_ARGS}) -> Tensor", backward=_backward_blockwise, setup_context=_setup_blockwise)


composite_op("sliding_window_attention",
             sdpa_schema('int window=256, int sinks=0, str impl="auto", str? score_mod=None, '
                         'Tensor? position_slopes=None, str? position=None', is_causal=True), _impl)
sdpa_autocast("sliding_window_attention")


def sliding_window_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False,
                             *, window: int = 256, sinks: int = 0, impl: str = "auto",
                             score_mod: str | None = None, position_slopes: torch.Tensor | None = None,
                             position: str | None = None) -> torch.Tensor:
    """Sliding-window attention with the signature of ``F.scaled_dot_product_attention``, layout [B, H, T, D].

    Exact softmax over the keys in each query's window.  Query i sits at position p = i + Tk − Tq (with
    Tq < Tk the queries are the last positions, as for a decoding step against a cache).

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; fp16, bf16, fp32 or fp64, one dtype.
        attn_mask: bool (True = may attend) or additive float, broadcastable to [B, Hq, Tq, Tk]: it
            restricts the window further (padding, a site's own narrower window).
        dropout_p: dropout on the probabilities, as SDPA (applied whenever > 0).
        is_causal: True: key j visible when p − window < j ≤ p, or j < sinks and j ≤ p.  False
            (encoders): when |p − j| < window, or j < sinks.
        scale: defaults to 1/√D.
        enable_gqa: Hq may be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
        window: keys per side of the band, the query's own position included (≥ 1).
        sinks: the first keys every query may also see (≥ 0).
        impl: ``"auto"`` runs the Triton kernels (:mod:`.triton_fwd`, :mod:`.triton_bwd`: flash-style,
            visiting only the band's and the sinks' key blocks) on CUDA for float16/bfloat16 inputs
            with head dims up to 256, no dropout and no float mask that needs a gradient, and the
            torch paths otherwise; ``"triton"`` always runs the kernels or raises naming why (on the
            CPU only under ``TRITON_INTERPRET=1``); ``"torch"`` the torch paths (blockwise in
            O(T · window), or SDPA with the band as a mask for short sequences).
        score_mod: a score modification program (:mod:`attnrewrite.kernels.score_mods`, e.g. soft-capping
            ``"div 50.0; tanh; mul 50.0"``) applied to scale·q·kᵀ before ``attn_mask`` and the softmax;
            None for none.  Both paths apply it, forward and backward; the kernels take programs with at
            most one nonlinear step (tanh, sigmoid, exp, abs, relu, erf, square) between affine ones
            (as sigmoid's), and any other program runs on the torch path (``"auto"``) or is refused by
            ``"triton"``, naming why.
        position_slopes, position: a bias computed from the query and key indices i, j (i counted from the
            first query, as in the sigmoid op): ``position="j-i"`` adds position_slopes[h]·(j − i) (ALiBi),
            ``"|j-i|"`` adds position_slopes[h]·|j − i|; Hq floats that do not require grad.  Every path
            computes it for the visible scores only.  ``position="relative"``: position_slopes is a table R
            [Hq or 1, Tq + Tk − 1] (T5's relative bias) and the op adds R[h, j − i + Tq − 1], read on the band
            and the sinks only; R may require grad.  Every path reads it: the torch paths gather it on the band
            and the sinks, the Triton kernels by diagonal per tile (dR summed with atomics in the dQ kernel).

    Returns:
        [B, Hq, Tq, Dv] in q's dtype (a row that sees no key gives 0).  Inside ``torch.autocast`` the
        floating-point inputs (float64 excepted) are cast to the autocast dtype first, as with SDPA.
    """
    return torch.ops.attnrewrite.sliding_window_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                                          enable_gqa, window=window, sinks=sinks, impl=impl,
                                                          score_mod=score_mod, position_slopes=position_slopes,
                                                          position=position)
