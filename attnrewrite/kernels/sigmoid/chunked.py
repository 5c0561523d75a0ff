"""The torch path: sigmoid attention in tiles of query rows x keys, with a backward that recomputes the weights.

Memory stays O(tile) per call instead of O(Tq x Tk) per head: the forward saves only its inputs,
and the backward recomputes P = sigmoid(S) tile by tile (sigmoid needs no row statistics, so
nothing else has to be kept).  Sigmoid attention needs no normalisation either, so the output of
a chunk of query rows is a plain sum over its key blocks, accumulated with ``baddbmm_``.  Key
blocks no row of the chunk can see are never computed: above the causal diagonal, beyond the
longest ``kv_lens``.  Tiles are small enough (``CHUNK_ELEMENTS``) to stay in the CPU's cache
between the matmul that writes the scores, the in-place sigmoid and the matmul that reads them,
and their buffers are allocated once per call.

On the CPU with one torch thread, float32 and no score modification, the compiled code of
:mod:`.native` takes over: the whole forward and backward of a call without dropout whose mask, if
any, is one additive value per key (a padding mask [B|1, 1, 1, Tk], as HF encoders write it) run in
one C loop (torch's sgemm and a fused scale + bias + key mask + sigmoid + causal/padding pass, no
Python per tile; a gradient for such a mask takes the loop below), and other masked or dropout calls
keep this loop in Python but use the fused pass for their sigmoid.

Scores and weights are computed in float32 (float64 for float64 inputs, so the path can be
gradchecked; float32 inputs are not copied).  Grouped-query heads are folded into the rows of each
tile, so K/V are never repeated.  Dropout is applied to the weights, as SDPA does; its random mask
is regenerated in the backward from a per-tile seed.
"""

from __future__ import annotations

import torch

from attnrewrite.kernels._ops import kernel_op
from attnrewrite.kernels.checks import MASKED_SCORE
from attnrewrite.kernels.score_mods import parse as parse_score_mod

from . import native

# Elements of one [B*Hkv, G*rows, keys] score tile (1 MiB in float32); a call holds a few.
CHUNK_ELEMENTS = 1 << 18
# Keys per tile (at most): with CHUNK_ELEMENTS, the rows of a chunk follow.
KEY_BLOCK = 256
# The compiled forward's tiles (native.py): folded rows (query positions x G) x keys, one (batch, kv head) at a
# time; 128 x 256 float32 is 128 KiB, inside an L2 cache.
NATIVE_ROWS, NATIVE_BLOCK = 128, 256


def chunk_sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive_mask: torch.Tensor | None,
    bias: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    scale: float,
    causal: int,
    dropout_p: float = 0.0,
    chunk_size: int | None = None,
    score_mod: str | None = None,
    slopes: torch.Tensor | None = None,
    position: str | None = None,
) -> torch.Tensor:
    """Sigmoid attention on validated inputs (see ``sigmoid_attention_dispatch`` for the semantics).

    Args:
        q, k, v: [B, Hq, Tq, D], [B, Hkv, Tk, D], [B, Hkv, Tk, Dv] (B = 1 when packed).
        additive_mask: float mask broadcastable to [B, Hq, Tq, Tk] (4-d), -inf excludes a key; or None.
        bias: float32 [Z, Hq], the b of each sequence and head (Z = B, or N when packed), or [Z|1, Hq, Tq]
            one b per query row (Tq = total_q when packed).
        kv_lens: int [B] valid key counts, or None.
        cu_seqlens_q, cu_seqlens_k: int32 [N+1] for packed sequences, or None.
        scale: the score scale.
        causal: 0 none, 1 top-left (j <= i), 2 bottom-right (j <= i + n_k - Tq).
        dropout_p: probability of dropping each weight.
        chunk_size: query rows per chunk (default: as many as keep a tile of KEY_BLOCK keys under CHUNK_ELEMENTS).
        score_mod: a score modification program (:mod:`attnrewrite.kernels.score_mods`) applied to
            scale · q kᵀ before the bias and the mask, tile by tile; None or "" for none.
        slopes, position: the position bias ``slopes[h] · (j − i)`` (``position="j-i"``) or
            ``slopes[h] · |j − i|`` (``"|j-i|"``), slopes float [Hq], computed tile by tile (i, j the
            positions in the sequence); None for none.
    Returns:
        [B, Hq, Tq, Dv] in q's dtype.
    """
    if cu_seqlens_q is not None:  # packed sequences: eager only (the bounds are read on the host)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for s in range(len(bounds_q) - 1):
            q0, q1, k0, k1 = bounds_q[s], bounds_q[s + 1], bounds_k[s], bounds_k[s + 1]
            # a per-row bias [1, Hq, total_q] is sliced to the sequence's rows; a per-sequence one to its row
            seq_bias = bias[:, :, q0:q1] if bias.dim() == 3 else bias[s:s + 1]
            outs.append(_sigmoid_chunked(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], None, seq_bias,
                                         None, scale, causal, dropout_p, chunk_size, score_mod, slopes, position))
        return torch.cat(outs, dim=2)
    return _sigmoid_chunked(q, k, v, additive_mask, bias, kv_lens, scale, causal, dropout_p, chunk_size, score_mod,
                            slopes, position)


def _sigmoid_chunked(q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, chunk_size, score_mod=None,
                     slopes=None, position=None):
    # The seed of the dropout masks is a tensor drawn here, so that a traced graph draws a new one
    # each call, and the backward regenerates the same masks from it.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.attnrewrite.sigmoid_chunked_fwd(q, k, v, mask, bias, kv_lens, float(scale), int(causal),
                                                     float(dropout_p), seed, int(chunk_size or 0), score_mod or "",
                                                     slopes, position or "")


# The chunked path as opaque ops with fake implementations: tracing (torch.compile, the rewriter's
# example values) never runs the Python loop over query chunks, so the sequence length stays
# symbolic under dynamic shapes instead of being specialised to the example's.


def _chunked_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor,
                 kv_lens: torch.Tensor | None, scale: float, causal: int, dropout_p: float,
                 seed: torch.Tensor | None, chunk_size: int, score_mod: str = "", slopes: torch.Tensor | None = None,
                 position: str = "") -> torch.Tensor:
    batch, heads_q, len_q, _ = q.shape
    dim_v = v.shape[3]
    seed_value = int(seed) if seed is not None else 0
    geometry = _Geometry(q, k, v, mask, bias, kv_lens, scale, causal, chunk_size, score_mod, slopes, position)
    if geometry.native_loop(dropout_p):
        return geometry.native_forward(q)
    out = torch.empty(batch, heads_q, len_q, dim_v, dtype=q.dtype, device=q.device)
    scores = geometry.buffer()
    rows_out = geometry.buffer(dim_v)
    for chunk in geometry.chunks(q):
        acc = _view(rows_out, (geometry.flat, chunk.flat_rows, dim_v))
        if not chunk.blocks:  # no key visible: these rows are 0
            out[:, :, chunk.start:chunk.stop] = 0
            continue
        for index, key_start, key_stop in chunk.blocks:
            weights, _ = geometry.weights(chunk, key_start, key_stop, scores)  # [B*Hkv, G*C, Kb]
            if dropout_p > 0:
                weights.mul_(_keep_scale(weights, dropout_p, seed_value, index))
            values = geometry.v[:, key_start:key_stop]
            if key_start == 0:
                torch.bmm(weights, values, out=acc)
            else:
                acc.baddbmm_(weights, values)
        out[:, :, chunk.start:chunk.stop] = acc.view(batch, heads_q, chunk.stop - chunk.start, dim_v)
    return out


def _chunked_fwd_fake(q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, score_mod="",
                      slopes=None, position=""):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


def _chunked_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor, kv_lens: torch.Tensor | None, scale: float,
                 causal: int, dropout_p: float, seed: torch.Tensor | None, chunk_size: int,
                 want_mask: bool, score_mod: str = "", slopes: torch.Tensor | None = None,
                 position: str = "", want_table: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask, dtable); dmask is empty unless ``want_mask``, dtable (the gradient of a relative
    bias table R, ``position="relative"``: dS summed along each diagonal j − i, tile by tile) unless
    ``want_table``."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    seed_value = int(seed) if seed is not None else 0
    geometry = _Geometry(q, k, v, mask, bias, kv_lens, scale, causal, chunk_size, score_mod, slopes, position)
    dtype, flat = geometry.dtype, geometry.flat
    if geometry.native_loop(dropout_p) and not want_mask:
        dq, dk, dv = geometry.native_backward(grad_out, q)
        # the scale in place: no second dQ/dK beside the loop's (a third of the backward's peak)
        return (dq.mul_(scale).to(q.dtype), dk.mul_(scale).view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
                q.new_empty(0), q.new_empty(0))
    dq = torch.empty(batch, heads_q, len_q, dim, dtype=dtype, device=q.device)
    dk = torch.zeros(flat, len_k, dim, dtype=dtype, device=q.device)
    dv = torch.zeros(flat, len_k, dim_v, dtype=dtype, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=dtype, device=q.device) if want_mask else None
    want_table = want_table and geometry.table is not None
    dtable = torch.zeros(geometry.table.shape, dtype=dtype, device=q.device) if want_table else None
    scores, grad_weights, grad_scores = geometry.buffer(), geometry.buffer(), geometry.buffer()
    rows_dq = geometry.buffer(dim)
    for chunk in geometry.chunks(q):
        rows = chunk.stop - chunk.start
        if not chunk.blocks:  # no key visible: no gradient from these rows
            dq[:, :, chunk.start:chunk.stop] = 0
            continue
        grad_rows = geometry.fold(grad_out, chunk.start, chunk.stop)  # [B*Hkv, G*C, Dv]
        acc = _view(rows_dq, (flat, chunk.flat_rows, dim))
        for index, key_start, key_stop in chunk.blocks:
            weights, mod_grad = geometry.weights(chunk, key_start, key_stop, scores, want_grad=True)  # P
            shape = weights.shape
            values, keys = geometry.v[:, key_start:key_stop], geometry.k[:, key_start:key_stop]
            d_weights = torch.bmm(grad_rows, values.transpose(1, 2), out=_view(grad_weights, shape))  # dP
            if dropout_p > 0:
                keep = _keep_scale(weights, dropout_p, seed_value, index)
                dv[:, key_start:key_stop].baddbmm_((weights * keep).transpose(1, 2), grad_rows)
                d_weights.mul_(keep)
            else:
                dv[:, key_start:key_stop].baddbmm_(weights.transpose(1, 2), grad_rows)
            # dS = P (1 - P) dP in one pass; 0 wherever P is (hidden keys)
            d_scores = torch.ops.aten.sigmoid_backward.grad_input(d_weights, weights,
                                                                  grad_input=_view(grad_scores, shape))
            if want_mask:  # the mask is added after the modification: its gradient is dS itself
                _accumulate_mask_grad(dmask, d_scores.view(batch, heads_q, rows, key_stop - key_start),
                                      chunk.start, chunk.stop, key_start)
            if want_table:  # R is added after the modification too: dR[h, d] = sum of dS over the diagonal d
                index = geometry.table_index(chunk, key_start, key_stop).flatten()
                per_head = d_scores.view(batch, heads_q, rows * (key_stop - key_start)).sum(0)
                dtable.index_add_(1, index, per_head)
            if mod_grad is not None:  # through the modification: dS_raw = dS · mod'(scale·q·kᵀ)
                d_scores.mul_(mod_grad)
            if key_start == 0:
                torch.bmm(d_scores, keys, out=acc)
            else:
                acc.baddbmm_(d_scores, keys)
            dk[:, key_start:key_stop].baddbmm_(d_scores.transpose(1, 2), chunk.q)
        dq[:, :, chunk.start:chunk.stop] = acc.view(batch, heads_q, rows, dim)
    grad_mask = dmask.to(mask.dtype) if want_mask else q.new_empty(0)
    dk = dk.view(batch, heads_kv, len_k, dim)
    dv = dv.view(batch, heads_kv, len_k, dim_v)
    grad_table = dtable.to(slopes.dtype) if want_table else q.new_empty(0)
    return dq.mul_(scale).to(q.dtype), dk.mul_(scale).to(k.dtype), dv.to(v.dtype), grad_mask, grad_table


def _chunked_bwd_fake(grad_out, q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, want_mask,
                      score_mod="", slopes=None, position="", want_table=False):
    # contiguous, as _chunked_bwd allocates them: empty_like would copy a transposed q's strides, and
    # inductor, trusting the fake, would then read the real (contiguous) gradients wrongly
    grad_mask = mask.new_empty(mask.shape) if want_mask else q.new_empty(0)
    grad_table = slopes.new_empty(slopes.shape) if want_table and slopes is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_mask, grad_table


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, score_mod, slopes, position = inputs
    ctx.save_for_backward(q, k, v, mask, bias, kv_lens, seed, slopes)
    ctx.args = (scale, causal, dropout_p, chunk_size, score_mod, position)


def _autograd(ctx, grad_out):
    q, k, v, mask, bias, kv_lens, seed, slopes = ctx.saved_tensors
    scale, causal, dropout_p, chunk_size, score_mod, position = ctx.args
    want_mask = mask is not None and ctx.needs_input_grad[3]
    want_table = position == "relative" and ctx.needs_input_grad[12]  # (ALiBi slopes never require grad)
    dq, dk, dv, dmask, dtable = torch.ops.attnrewrite.sigmoid_chunked_bwd(
        grad_out.contiguous(), q, k, v, mask, bias, kv_lens, scale, causal, dropout_p, seed, chunk_size, want_mask,
        score_mod, slopes, position, want_table)
    return (dq, dk, dv, (dmask if want_mask else None), None, None, None, None, None, None, None, None,
            (dtable if want_table else None), None)


kernel_op("sigmoid_chunked_fwd", _chunked_fwd, fake=_chunked_fwd_fake, backward=_autograd,
          setup_context=_setup_context)
kernel_op("sigmoid_chunked_bwd", _chunked_bwd, fake=_chunked_bwd_fake)


def _view(buffer: torch.Tensor, shape) -> torch.Tensor:
    """The first elements of a flat buffer as a contiguous tensor of ``shape``."""
    return buffer[:shape[0] * shape[1] * shape[2]].view(shape)


class _Chunk:
    """Query rows start:stop: their folded q [B*Hkv, G*C, D], their bias rows [B*Hkv, G*C, 1], the
    key blocks they read ((tile index, key_start, key_stop), in order from key 0), and ``full``: every
    row sees the keys before it (up to masks), so only later keys need the visibility mask.  On the
    compiled kernel's path, ``limit`` holds each folded row's count of visible keys (int64 [B*Hkv*G*C],
    keys j < limit; None when every row sees all the keys it reads)."""

    def __init__(self, start, stop, q, bias, full, blocks, limit=None):
        self.start, self.stop, self.q, self.bias, self.full, self.blocks = start, stop, q, bias, full, blocks
        self.limit = limit
        self.flat_rows = q.shape[1]


class _Geometry:
    """Everything needed to recompute the weights of a tile of query rows x keys.

    K and V are kept as [B*Hkv, Tk, X] in the compute dtype, and a chunk's query rows are folded
    to [B*Hkv, G*C, D] (the G query heads of a kv head stacked), so each tile is a few batched
    matmuls over all heads.  The visible keys are worked out on the host per chunk: keys every
    row of the chunk sees (no mask needed), keys some row sees (a small mask), and keys no row
    sees, which are never read: causal chunks stop at the diagonal and padded chunks at the
    longest kv_lens.
    """

    def __init__(self, q, k, v, mask, bias, kv_lens, scale, causal, chunk_size, score_mod="", slopes=None,
                 position=""):
        self.batch, self.heads_q, self.len_q, self.dim = q.shape
        self.heads_kv, self.len_k = k.shape[1], k.shape[2]
        self.group = self.heads_q // self.heads_kv
        self.flat = self.batch * self.heads_kv
        self.dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.device = q.device
        self.k = k.to(self.dtype).reshape(self.flat, self.len_k, k.shape[3])
        self.v = v.to(self.dtype).reshape(self.flat, self.len_k, v.shape[3])
        self.mask = mask
        # [Z, Hkv, G, 1], or [Z, Hkv, G, Tq] with one b per query row (sliced per chunk)
        self.bias = bias.to(self.dtype).reshape(bias.shape[0], self.heads_kv, self.group, -1)
        self.scale = scale
        self.causal = causal
        self.score_mod = parse_score_mod(score_mod)
        # the position bias: slopes [1, Hkv, G, 1, 1] against the grid, and its form ("j-i" or "|j-i|"); or
        # a relative bias: the table R [Hq, Tq + Tk - 1], read by distance tile by tile
        relative = slopes is not None and position == "relative"
        self.table = slopes.to(self.dtype) if relative else None
        self.slopes = (None if slopes is None or not position or relative
                       else slopes.to(self.dtype).view(1, self.heads_kv, self.group, 1, 1))
        self.position = position
        # each sequence's key count and causal shift, on the host: they decide which keys a chunk reads
        self.n_keys = ([self.len_k] * self.batch if kv_lens is None
                       else [min(max(int(n), 0), self.len_k) for n in kv_lens.tolist()])
        # causal: key j visible to row i iff j <= i + shift (shift = 0 top-left, n_k - Tq bottom-right)
        self.shifts = [0 if causal == 1 else n - self.len_q for n in self.n_keys]
        self.n_keys_t = torch.tensor(self.n_keys, device=self.device).view(-1, 1, 1, 1, 1)
        self.shifts_t = torch.tensor(self.shifts, device=self.device).view(-1, 1, 1, 1, 1)
        self.key_block = max(1, min(KEY_BLOCK, self.len_k))
        # the compiled code (native.py: the whole loop without mask or dropout, else the elementwise pass of each
        # tile) for float32 without a score modification or position bias; it runs on one thread, so it is used
        # only where torch does too (ATen's ops spread over all of them)
        self.native = (native.library() if self.dtype == torch.float32 and self.score_mod is None
                       and self.slopes is None and self.table is None and self.device.type == "cpu" and torch.get_num_threads() == 1
                       else None)
        self.rows = max(1, min(self.len_q, chunk_size or CHUNK_ELEMENTS // (self.batch * self.heads_q * self.key_block)))

    def buffer(self, columns: int | None = None) -> torch.Tensor:
        """A flat buffer for one score tile, or for a chunk's rows of ``columns`` values."""
        size = self.flat * self.group * self.rows * (columns or self.key_block)
        return torch.empty(size, dtype=self.dtype, device=self.device)

    def fold(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of [B, Hq, T, X] as [B*Hkv, G*C, X] in the compute dtype."""
        return x[:, :, start:stop].to(self.dtype).reshape(self.flat, -1, x.shape[-1])

    def key_range(self, start: int, stop: int) -> tuple[int, int]:
        """(full, width): every row of start:stop sees keys < full (up to masks); none sees keys >= width."""
        if self.causal:
            width = max(min(stop + s, n) for s, n in zip(self.shifts, self.n_keys))
            full = min(min(start + s + 1, n) for s, n in zip(self.shifts, self.n_keys))
        else:
            width, full = max(self.n_keys), min(self.n_keys)
        width = max(width, 0)
        return min(max(full, 0), width), width

    def chunks(self, q: torch.Tensor):
        """The chunks of query rows, in order; tile indices (the dropout seeds) count across chunks."""
        index = 0
        for start in range(0, self.len_q, self.rows):
            stop = min(start + self.rows, self.len_q)
            full, width = self.key_range(start, stop)
            blocks = []
            for key_start in range(0, width, self.key_block):
                blocks.append((index, key_start, min(key_start + self.key_block, width)))
                index += 1
            if not blocks:
                yield _Chunk(start, stop, q[:, :, :0].reshape(self.flat, 0, q.shape[3]), None, full, blocks)
                continue
            bias = self.bias[..., start:stop] if self.bias.shape[3] != 1 else self.bias
            bias = bias.expand(self.batch, self.heads_kv, self.group, stop - start)
            limit = None
            if self.native is not None:
                bias = bias.contiguous()
                if full < width:
                    limit = self.row_limits(start, stop)
            yield _Chunk(start, stop, self.fold(q, start, stop), bias.reshape(self.flat, -1, 1), full, blocks, limit)

    def fold_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hq, Tq, X] as contiguous float32 [B*Hkv, Tq*G, X]: the G query heads of each kv head interleaved
        per position, so that a chunk of the compiled loop's rows is contiguous."""
        shape = (self.batch, self.heads_kv, self.group, self.len_q, x.shape[-1])
        rows = self.len_q * self.group
        return x.to(self.dtype).reshape(shape).transpose(2, 3).contiguous().view(self.flat, rows, x.shape[-1])

    def unfold_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`fold_rows`: [B*Hkv, Tq*G, X] back to a contiguous [B, Hq, Tq, X] (as the
        fake implementations promise)."""
        x = x.view(self.batch, self.heads_kv, self.len_q, self.group, x.shape[-1]).transpose(2, 3)
        return x.reshape(self.batch, self.heads_q, self.len_q, x.shape[-1]).contiguous()

    def native_loop(self, dropout_p: float) -> bool:
        """Whether the whole call runs in the compiled loop: float32 on one thread (``self.native``), no dropout,
        and no mask or a per-key one (:meth:`key_bias`)."""
        if self.native is None or dropout_p != 0 or not native.forward_available():
            return False
        mask = self.mask
        return mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.is_floating_point())

    def key_bias(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key_bias, n_last): a per-key mask [B|1, 1, 1, Tk|1] as contiguous float32 [B, Tk] for the compiled
        loop, and int64 [B, 1], one past the last key each batch row does not exclude (at most MASKED_SCORE:
        the keys ``bias="auto"`` does not count, whose weight is 0), so that
        the trailing padding is never read; (None, None) without a mask."""
        if self.mask is None:
            return None, None
        mask = self.mask.reshape(self.mask.shape[0], self.mask.shape[3]).expand(self.batch, self.len_k)
        kept = mask > MASKED_SCORE
        positions = torch.arange(1, self.len_k + 1, device=self.device)
        n_last = torch.where(kept, positions, 0).amax(dim=1, keepdim=True) if self.len_k else kept.new_zeros(
            self.batch, 1, dtype=torch.int64)
        return mask.to(torch.float32).contiguous(), n_last

    def native_args(self) -> tuple:
        """(k, v, bias, limit, scale, chunk rows, key block, key_bias) of the compiled loop, in its folded row
        order; limit None when every row sees every key, key_bias None without a mask."""
        batch, heads_kv, group, len_q = self.batch, self.heads_kv, self.group, self.len_q
        folded = (batch, heads_kv, len_q, group)
        rows = len_q * group
        bias = self.bias.expand(batch, heads_kv, group, len_q).transpose(2, 3).contiguous().view(self.flat, rows)
        key_bias, n_last = self.key_bias()
        limit = None
        if self.causal or min(self.n_keys) < self.len_k or (n_last is not None and bool((n_last < self.len_k).any())):
            limit = self.n_keys_t.view(batch, 1)
            if n_last is not None:  # the trailing keys the mask hides are never read
                limit = torch.minimum(limit, n_last)
            if self.causal:  # key j visible to row i iff j <= i + shift
                positions = torch.arange(1, len_q + 1, device=self.device).view(1, -1)
                limit = torch.minimum(limit, positions + self.shifts_t.view(batch, 1))
            limit = limit.expand(batch, len_q).view(batch, 1, len_q, 1).expand(folded).contiguous().view(self.flat, rows)
        chunk = max(1, min(NATIVE_ROWS, rows))
        return self.k.contiguous(), self.v.contiguous(), bias, limit, self.scale, chunk, NATIVE_BLOCK, key_bias

    def native_forward(self, q: torch.Tensor) -> torch.Tensor:
        """The whole forward in the compiled loop (:func:`native.sigmoid_forward`; see :meth:`native_loop`)."""
        return self.unfold_rows(native.sigmoid_forward(self.fold_rows(q), *self.native_args())).to(q.dtype)

    def native_backward(self, grad_out: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """(dq, dk, dv) in the compiled loop (:func:`native.sigmoid_backward`), dq and dk without the scale."""
        dq, dk, dv = native.sigmoid_backward(self.fold_rows(grad_out), self.fold_rows(q), *self.native_args())
        return self.unfold_rows(dq), dk, dv

    def row_limits(self, start: int, stop: int) -> torch.Tensor:
        """The number of keys each folded row of start:stop sees (keys j < limit), int64 [B*Hkv*G*C]."""
        limit = self.n_keys_t.view(self.batch, 1)
        if self.causal:  # key j visible to row i iff j <= i + shift
            rows = torch.arange(start + 1, stop + 1, device=self.device).view(1, -1)
            limit = torch.minimum(limit, rows + self.shifts_t.view(self.batch, 1))
        limit = limit.expand(self.batch, stop - start).view(self.batch, 1, 1, stop - start)
        return limit.expand(self.batch, self.heads_kv, self.group, stop - start).contiguous().view(-1)

    def weights(self, chunk: _Chunk, key_start: int, key_stop: int, buffer: torch.Tensor,
                want_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(P, mod') of the chunk's rows against keys key_start:key_stop: P = sigmoid(S), [B*Hkv, G*C, Kb] (in
        ``buffer``), exactly 0 where a key is not visible; mod' the derivative of the score modification at
        scale·q·kᵀ when ``want_grad`` and there is one, else None."""
        rows, width = chunk.stop - chunk.start, key_stop - key_start
        scores = _view(buffer, (self.flat, chunk.flat_rows, width))
        if self.native is not None:
            return self._native_weights(chunk, key_start, key_stop, scores), None
        mod_grad = None
        if self.score_mod is None:
            # S = b + scale * q k^T, the bias broadcast over keys by baddbmm
            torch.baddbmm(chunk.bias, chunk.q, self.k[:, key_start:key_stop].transpose(1, 2), alpha=self.scale,
                          out=scores)
        else:  # S = mod(scale * q k^T) + b
            torch.bmm(chunk.q, self.k[:, key_start:key_stop].transpose(1, 2), out=scores).mul_(self.scale)
            if want_grad:
                modified, mod_grad = self.score_mod.with_grad(scores)
            else:
                modified = self.score_mod(scores)
            torch.add(modified, chunk.bias, out=scores)
        grid = scores.view(self.batch, self.heads_kv, self.group, rows, width)
        if self.mask is not None:
            grid.add_(self.tile_mask(chunk, key_start, key_stop))
        if self.slopes is not None:  # slopes[h] · (j − i) or · |j − i|, computed for this tile only
            keys = torch.arange(key_start, key_stop, device=self.device, dtype=self.dtype)
            rows_at = torch.arange(chunk.start, chunk.stop, device=self.device, dtype=self.dtype)
            distance = keys.view(1, -1) - rows_at.view(-1, 1)
            grid.add_(self.slopes * (distance.abs() if self.position == "|j-i|" else distance))
        if self.table is not None:  # R[h, j - i + Tq - 1]: [Hq, C, Kb] gathered for this tile only
            grid.add_(self.table[:, self.table_index(chunk, key_start, key_stop)].view(
                1, self.heads_kv, self.group, rows, width))
        scores.sigmoid_()
        first = max(chunk.full, key_start)
        if first < key_stop:  # keys only some rows see: hide them from the others
            keys = torch.arange(first, key_stop, device=self.device)
            hidden = keys >= self.n_keys_t
            if self.causal:
                query_index = torch.arange(chunk.start, chunk.stop, device=self.device).view(1, 1, 1, rows, 1)
                hidden = hidden | (keys > query_index + self.shifts_t)
            grid[..., first - key_start:].masked_fill_(hidden, 0.0)
        return scores, mod_grad

    def table_index(self, chunk: _Chunk, key_start: int, key_stop: int) -> torch.Tensor:
        """[C, Kb] int64: the column of R holding the bias of the chunk's rows against keys key_start:key_stop."""
        keys = torch.arange(key_start, key_stop, device=self.device)
        rows_at = torch.arange(chunk.start, chunk.stop, device=self.device)
        return keys.view(1, -1) - rows_at.view(-1, 1) + (self.len_q - 1)

    def tile_mask(self, chunk: _Chunk, key_start: int, key_stop: int) -> torch.Tensor:
        """The additive mask of the chunk's rows against keys key_start:key_stop, shaped to broadcast
        against a tile viewed as [B, Hkv, G, C, Kb]."""
        tile_mask = self.mask[:, :, chunk.start:chunk.stop] if self.mask.shape[2] != 1 else self.mask
        tile_mask = tile_mask[..., key_start:key_stop] if tile_mask.shape[3] != 1 else tile_mask
        # [Bm, Hm, C|1, Kb|1] -> [Bm, Hkv|1, G|1, C|1, Kb|1]
        return (tile_mask.unflatten(1, (self.heads_kv, self.group)) if tile_mask.shape[1] != 1
                else tile_mask.unsqueeze(1))

    def _native_weights(self, chunk: _Chunk, key_start: int, key_stop: int, scores: torch.Tensor) -> torch.Tensor:
        """``weights`` through the compiled pass: q kᵀ by bmm, then scale, bias, sigmoid and the row limits
        in one pass over the tile (the additive mask, if any, is added to the scaled scores first)."""
        torch.bmm(chunk.q, self.k[:, key_start:key_stop].transpose(1, 2), out=scores)
        scale = self.scale
        if self.mask is not None:
            scores.mul_(scale)
            scores.view(self.batch, self.heads_kv, self.group, chunk.stop - chunk.start, key_stop - key_start).add_(
                self.tile_mask(chunk, key_start, key_stop))
            scale = 1.0
        limit = chunk.limit if max(chunk.full, key_start) < key_stop else None
        return native.sigmoid_tile_(scores, chunk.bias, limit, key_start, scale)


def _keep_scale(weights: torch.Tensor, dropout_p: float, seed: int, index: int) -> torch.Tensor:
    """The dropout factor of one chunk (0 or 1/(1-p)), identical in forward and backward."""
    generator = torch.Generator(device=weights.device)
    generator.manual_seed(seed + index)
    keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
    return keep.to(weights.dtype) / (1.0 - dropout_p)


def _accumulate_mask_grad(dmask: torch.Tensor, grad_scores: torch.Tensor, start: int, stop: int,
                          key_start: int) -> None:
    """Add dS of rows start:stop against keys key_start:key_start+Kb ([B, Hq, C, Kb]) into dmask, summing
    over the dims the mask broadcasts (keys no tile reads have no gradient)."""
    reduce = [d for d in (0, 1, 3) if dmask.shape[d] == 1 and grad_scores.shape[d] != 1]
    if reduce:
        grad_scores = grad_scores.sum(dim=reduce, keepdim=True)
    target = dmask if dmask.shape[3] == 1 else dmask[..., key_start:key_start + grad_scores.shape[3]]
    if dmask.shape[2] == 1:
        target += grad_scores.sum(dim=2, keepdim=True)
    else:
        target[:, :, start:stop] += grad_scores
