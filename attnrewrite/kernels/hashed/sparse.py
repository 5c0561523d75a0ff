"""The torch path of hashed attention: select keys by code agreement, then exact softmax over them.

Queries run in blocks.  For each block the codes of its queries are scored against every key's
code with one matrix product of ±1 signs (exact integers), the selection is one partition (numpy
``argpartition`` on the CPU, ``topk`` elsewhere) over a priority that puts the sinks and the window
first, then the best agreement, ties to the more recent key, and the attention reads only the selected
keys and values (on the CPU through sparse matrix products, elsewhere by gathering them).  Without a
mask the sinks and the window are fixed ranges of positions and only the keys between them, before
the block's last row, are scored.  The backward recomputes the selection (it is deterministic) and applies the softmax-attention gradient formulas to the
selected keys, scattering their gradients back; keys that were not selected get none.

On the CPU, float32 calls with ``hash="random"``, no ``score_mod``, no ``far_dtype`` and no relative bias table
at one torch thread do not come here: :mod:`.native` selects the same keys and attends to them in a compiled loop (the op,
:mod:`.op`, chooses).

With ``hash="learned"`` the selection is a step function of the projections, so their gradient
is a straight-through estimate: the backward treats each selected key's logit as if it also held
the soft agreement ã_ij = Σ_b tanh(q_i·P_q,b)·tanh(k_j·P_k,b) / bits (which adds exactly 0 to the
forward), so a key that the loss wants weighted up pulls the two codes together.  That gradient
reaches the projections only; q, k and v get the exact gradient of the attention they computed.
"""

from __future__ import annotations

import warnings

import torch

from attnrewrite.kernels.checks import MASKED_SCORE

from .codes import project, signs

# Query rows per block are chosen so that a block's gathered [B, Hkv, rows, selected, D] keys stay near this size.
BLOCK_ELEMENTS = 1 << 22
USE_CSR = True  # the CPU forward attends through sparse matrix products (tests switch it off to cover the gathers)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def mask_parts(attn_mask: torch.Tensor | None, rows: slice, t_q: int, t_k: int):
    """(keep bool [B|1, n, Tk] or None, additive bias [B|1, n, Tk] or None) of the query rows ``rows``
    from a mask broadcastable to [B, 1, Tq, Tk]."""
    if attn_mask is None:
        return None, None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))[:, 0]   # [B|1, Tq|1, Tk|1]
    mask = mask[:, rows] if mask.shape[1] == t_q else mask
    mask = mask.expand(mask.shape[0], rows.stop - rows.start, t_k)
    if mask.dtype == torch.bool:
        return mask, None
    keep = mask > MASKED_SCORE
    return keep, mask.masked_fill(~keep, 0.0)


def visible_keys(keep: torch.Tensor | None, rows: slice, t_k: int, causal_offset: int | None, device) -> torch.Tensor:
    """bool [B|1, n, Tk]: the keys each query row may see (mask and, when ``causal_offset`` is not None,
    key j ≤ row + causal_offset)."""
    n = rows.stop - rows.start
    visible = torch.ones(1, n, t_k, dtype=torch.bool, device=device)
    if causal_offset is not None:
        row = torch.arange(rows.start, rows.stop, device=device)[:, None] + causal_offset
        visible = visible & (torch.arange(t_k, device=device)[None, :] <= row)
    return visible if keep is None else visible & keep


def _priority_dtype(groups: int, bits: int, t_k: int) -> torch.dtype:
    """float32 where agreement·Tk + position is an exact integer in it (below 2²⁴), else float64."""
    return torch.float32 if (groups * bits + 2) * (t_k + 1) < 2 ** 24 else torch.float64


def _agreement_cost(q_signs: torch.Tensor, k_signs: torch.Tensor, bits: int, t_k: int) -> torch.Tensor:
    """−(agreement·Tk + j) [B, Hkv, n, Tk'] (exact integers ≤ 0, float32 or float64) of the block's queries
    against the keys k_signs [B, Hkv, Tk', bits] (Tk' ≤ Tk), agreement summed over each group's query heads:
    the lower, the better (the selection is a partition for the smallest).

    On ±1 signs the summed agreement is (g·bits + s_q·s_k) / 2, so the cost is one batched matrix
    product with the position added in its epilogue: −(Tk/2)·(s_q·s_k) − (g·bits·Tk/2 + j).
    """
    batch, heads_q, rows, _ = q_signs.shape
    heads_kv, keys = k_signs.shape[1], k_signs.shape[2]
    groups = heads_q // heads_kv
    dtype = _priority_dtype(groups, bits, t_k)
    grouped = q_signs.to(dtype).reshape(batch, heads_kv, groups, rows, bits).sum(2)    # [B, Hkv, n, bits]
    offset = -(torch.arange(keys, dtype=dtype, device=q_signs.device) + groups * bits * t_k / 2)
    product = torch.baddbmm(offset.expand(batch * heads_kv, rows, keys), grouped.reshape(-1, rows, bits),
                            k_signs.to(dtype).reshape(-1, keys, bits).transpose(-1, -2), alpha=-t_k / 2)
    return product.view(batch, heads_kv, rows, keys)


def top_indices(cost: torch.Tensor, count: int, check: bool = True) -> torch.Tensor:
    """int64 [..., count]: the positions of the ``count`` smallest entries of each row of ``cost``
    [..., N] (distinct values), in no particular order; a slot whose entry is positive (not a
    candidate) holds −1 (with ``check=False`` the caller finds those slots itself).

    On the CPU a numpy ``argpartition`` (a selection, about three times faster than ``torch.topk``);
    elsewhere ``topk``.
    """
    width = cost.shape[-1]
    if count >= width:
        index = torch.arange(width, device=cost.device).expand(cost.shape)
    elif cost.device.type == "cpu":
        flat = cost.reshape(-1, width).numpy()
        index = torch.from_numpy(flat.argpartition(count - 1, axis=-1)[:, :count]).view(*cost.shape[:-1], count)
    else:
        index = cost.topk(count, dim=-1, largest=False, sorted=False).indices
    return torch.where(cost.gather(-1, index) <= 0, index, -1) if check else index


def select(q_signs: torch.Tensor, k_signs: torch.Tensor, visible: torch.Tensor, bits: int, top_k: int, window: int,
           sinks: int) -> torch.Tensor:
    """Selected key indices int64 [B, Hkv, n, S] (−1 marks an empty slot, slots in no particular order),
    S = min(Tk, sinks + window + top_k).

    Args:
        q_signs: ±1 codes of the block's queries [B, Hq, n, bits]; k_signs: of all keys [B, Hkv, Tk, bits].
        visible: bool [B|1, n, Tk], the same for every head.
    Per row: the first ``sinks`` and the last ``window`` visible keys, and the ``top_k`` other visible
    keys with the highest agreement summed over the group's query heads (ties: the later key).
    """
    heads_q, heads_kv, t_k = q_signs.shape[1], k_signs.shape[1], k_signs.shape[2]
    groups = heads_q // heads_kv
    cost = _agreement_cost(q_signs, k_signs, bits, t_k)                              # [B, Hkv, n, Tk]
    visible = visible[:, None]                                                        # [B|1, 1, n, Tk]
    rank = visible.long().cumsum(-1)
    count = rank[..., -1:]
    special = visible & ((rank <= sinks) | (rank > count - window))
    cost = cost.masked_fill(special, -(groups * bits + 1) * t_k).masked_fill(~visible, 1)
    return top_indices(cost, min(t_k, sinks + window + top_k))


def select_unmasked(q_signs: torch.Tensor, k_signs: torch.Tensor, rows: slice, causal: bool, bits: int, top_k: int,
                    window: int, sinks: int) -> torch.Tensor:
    """:func:`select` without a mask, for the query rows ``rows`` (causal: row i sees keys 0 … i; else all):
    int64 [B, Hkv, n, sinks + window + top_k'] with −1 for empty slots (top_k' ≤ top_k).

    The sinks and the window are the same ranges of positions for every head, so only the keys between
    them are scored: for causal rows, only those before the block's last row.
    """
    device = q_signs.device
    t_k = k_signs.shape[2]
    batch, heads_kv = q_signs.shape[0], k_signs.shape[1]
    n = rows.stop - rows.start
    row = torch.arange(rows.start, rows.stop, device=device)[:, None]                # [n, 1]
    count = row + 1 if causal else torch.full_like(row, t_k)                           # visible keys per row
    first = count.clamp(max=sinks)                                                     # sinks: [0, first)
    slots = torch.arange(sinks, device=device)
    chosen = [torch.where(slots < first, slots, -1)]
    slots = count - window + torch.arange(window, device=device)                      # window: [count − window, count)
    chosen.append(torch.where(slots >= first, slots, -1))
    last = (rows.stop if causal else t_k) - window                                    # candidates: [sinks, last)
    if top_k and last > sinks:
        cost = _agreement_cost(q_signs, k_signs[:, :, sinks:last], bits, t_k)          # [B, Hkv, n, last − sinks]
        if causal:  # row i's candidates end at i − window: only the last n columns hold others
            tail = min(n, last - sinks)
            column = torch.arange(last - tail, last, device=device)
            cost[..., -tail:].masked_fill_(column >= count - window, 1)
        picked = top_indices(cost, top_k, check=False) + sinks
        chosen.append(torch.where(picked < count - window, picked, -1))              # not a candidate: empty
    parts = [c.expand(batch, heads_kv, n, c.shape[-1]) for c in chosen]
    return torch.cat(parts, dim=-1)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] at index [B, H, n, S] (−1 read as 0) → [B, H, n, S, D] (one ``index_select`` of rows)."""
    batch, heads, length, dim = x.shape
    offsets = (torch.arange(batch * heads, device=x.device) * length).view(batch, heads, 1, 1)
    flat = (index.clamp(min=0) + offsets).reshape(-1)
    return x.reshape(batch * heads * length, dim).index_select(0, flat).view(*index.shape, dim)


def scatter_add(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """target [B, H, T, D] += values [B, H, n, S, D] at index [B, H, n, S] (slots with −1 skipped)."""
    batch, heads, length, dim = target.shape
    offsets = (torch.arange(batch * heads, device=target.device) * length).view(batch, heads, 1, 1)
    flat = (index.clamp(min=0) + offsets).reshape(-1)
    values = (values * (index >= 0).unsqueeze(-1).to(values.dtype)).reshape(-1, dim)
    target.view(batch * heads * length, dim).index_add_(0, flat, values.to(target.dtype))


def relative_slots(index: torch.Tensor, rows: slice, t_q: int, length: int) -> torch.Tensor:
    """int64 [B, Hkv, n, S]: the column d + Tq − 1 (d = j − i) of a relative bias table R [Hq, Tq + Tk − 1] that
    each selected slot of ``index`` (the block's selection for the query rows ``rows``; −1 empty, read as key
    0) reads, clamped into the table's ``length`` columns (an empty slot is masked by its caller)."""
    row = torch.arange(rows.start, rows.stop, device=index.device).view(1, 1, -1, 1)
    return (index.clamp(min=0) - row + (t_q - 1)).clamp(0, length - 1)


def gather_relative(table: torch.Tensor, slots: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, g, n, S]: R [Hq, L] read at ``slots`` [B, Hkv, n, S] (:func:`relative_slots`) for every query
    head of each group (query head h·g + g' reads its own row of R at its group's selection)."""
    batch, heads_kv, n, s = slots.shape
    rows = table.view(1, heads_kv, groups, 1, table.shape[-1]).expand(batch, heads_kv, groups, n, table.shape[-1])
    return rows.gather(-1, slots[:, :, None].expand(batch, heads_kv, groups, n, s))


def scatter_relative(d_table: torch.Tensor, slots: torch.Tensor, index: torch.Tensor, d_logits: torch.Tensor) -> None:
    """d_table [Hq, L] += the gradient at the logits d_logits [B, Hkv, g, n, S] summed per column of R it read
    (:func:`gather_relative` backwards; empty slots of ``index`` add nothing)."""
    batch, heads_kv, groups, n, s = d_logits.shape
    values = d_logits * (index >= 0)[:, :, None].to(d_logits.dtype)
    columns = slots[:, :, None].expand(batch, heads_kv, groups, n, s)
    flat = (columns + (torch.arange(heads_kv * groups, device=slots.device) * d_table.shape[-1]).view(
        1, heads_kv, groups, 1, 1)).reshape(-1)
    d_table.view(-1).index_add_(0, flat, values.reshape(-1).to(d_table.dtype))


def _block_probs(q, k_sel, index, bias, scale, score_mod=None, want_grad=False, relative=None):
    """(q grouped [B, Hkv, g, n, D], probabilities [B, Hkv, g, n, S], mod') in the work dtype; mod' is the
    derivative of the score modification (a ``ScoreProgram``, applied to scale·q·k before the bias) at
    the selected entries when ``want_grad`` and there is one, else None.  ``relative``: the block's relative
    bias R[h, j − i] at the selected entries [B, Hkv, g, n, S] (:func:`gather_relative`), added with the bias."""
    batch, heads_q, rows, dim = q.shape
    heads_kv = k_sel.shape[1]
    dtype = work_dtype(q.dtype)
    q5 = q.reshape(batch, heads_kv, heads_q // heads_kv, rows, dim)
    # the backward passes k_sel already in the work dtype: q follows it (a 16-bit q would not mix)
    logits = torch.einsum("bkgnd,bknsd->bkgns", q5.to(k_sel.dtype), k_sel).to(dtype) * scale
    mod_grad = None
    if score_mod is not None:
        logits, mod_grad = score_mod.with_grad(logits) if want_grad else (score_mod(logits), None)
    if bias is not None:  # [B|1, n, Tk] → the selected entries
        bias = bias.to(dtype)[:, None].expand(batch, heads_kv, rows, bias.shape[-1]).gather(-1, index.clamp(min=0))
        logits = logits + bias[:, :, None]
    if relative is not None:
        logits = logits + relative.to(dtype)
    valid = (index >= 0)[:, :, None]                                                    # [B, Hkv, 1, n, S]
    logits = logits.masked_fill(~valid, torch.finfo(dtype).min)
    probs = torch.softmax(logits, dim=-1) * valid.any(-1, keepdim=True).to(dtype)
    return q5.to(dtype), probs, mod_grad


def _rows_per_block(q: torch.Tensor, k: torch.Tensor, selected: int) -> int:
    per_row = q.shape[0] * max(q.shape[1] * k.shape[-2], k.shape[1] * selected * k.shape[-1])
    return max(1, BLOCK_ELEMENTS // max(1, per_row))


def hashed_blocks(q, k, attn_mask, is_causal, bits, top_k, window, sinks, proj_q, proj_k):
    """Yield (rows, q rows, selected index [B, Hkv, n, S], additive bias or None) block by block."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    k_signs = signs(k, proj_k)
    selected = min(t_k, sinks + window + top_k)
    step = _rows_per_block(q, k, selected)
    for i0 in range(0, t_q, step):
        rows = slice(i0, min(t_q, i0 + step))
        q_rows = q[:, :, rows]
        if attn_mask is None:
            yield rows, q_rows, select_unmasked(signs(q_rows, proj_q), k_signs, rows, is_causal, bits, top_k, window,
                                                sinks), None
            continue
        keep, bias = mask_parts(attn_mask, rows, t_q, t_k)
        visible = visible_keys(keep, rows, t_k, 0 if is_causal else None, q.device)
        index = select(signs(q_rows, proj_q), k_signs, visible, bits, top_k, window, sinks)
        yield rows, q_rows, index, bias


def far_slots(index: torch.Tensor, attn_mask, rows: slice, is_causal: bool, t_q: int, t_k: int, sinks: int,
              window: int) -> torch.Tensor:
    """bool [B, Hkv, n, S]: the selected slots of ``index`` (the block's selection, −1 empty) whose key is
    neither one of the row's first ``sinks`` visible keys nor one of its last ``window``: the far keys
    that ``far_dtype`` rounds."""
    keep, _ = mask_parts(attn_mask, rows, t_q, t_k)
    visible = visible_keys(keep, rows, t_k, 0 if is_causal else None, index.device)            # [B|1, n, Tk]
    rank = visible.long().cumsum(-1)                                                         # 1-based among visible
    count = rank[..., -1:]
    batch, heads_kv, n, _ = index.shape
    rank = rank[:, None].expand(batch, heads_kv, n, t_k).gather(-1, index.clamp(min=0))
    return (index >= 0) & (rank > sinks) & (rank <= count[:, None] - window)


def round_far(x: torch.Tensor, far: torch.Tensor, far_dtype: torch.dtype | None) -> torch.Tensor:
    """x [..., S, D] (selected keys or values, in the compute dtype) with the slots where ``far`` [..., S]
    is True replaced by x.to(far_dtype).to(x.dtype) (a round trip: the precision a far key is kept at)."""
    if far_dtype is None:
        return x
    return torch.where(far.unsqueeze(-1), x.to(far_dtype).to(x.dtype), x)


def _csr(pointers: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "beta state" / "invariant checks disabled": built valid by construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(pointers, columns, values, shape, check_invariants=False)


def _attend_csr(q_rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias,
                scale: float, relative: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q_rows [B, Hq, n, D] over the selected keys only, as sparse matrix products (CPU).

    ``keys``/``values``: all keys and values as [B·Hkv·Tk, D|Dv] in the work dtype; ``index``
    [B, Hkv, n, S]: the selection (−1: empty).  Every query row (each head of a group with its group's
    selection) is one row of a CSR matrix over the B·Hkv·Tk keys: ``sampled_addmm`` computes
    scale·q·k (plus the bias) at the selected entries only, the softmax runs on the [rows, S] values,
    and one sparse × dense product with the values gives the output: no selected key or value is
    copied.  Empty slots point at the group's key 0 with a −inf score; rows without any key give 0.
    ``relative``: R[h, j − i] at the selected entries [B, Hkv, g, n, S] (:func:`gather_relative`), or None.
    """
    batch, heads_q, rows, dim = q_rows.shape
    heads_kv, slots = index.shape[1], index.shape[-1]
    t_k, groups = keys.shape[0] // (batch * heads_kv), heads_q // heads_kv
    count = batch * heads_q * rows
    if slots == 0:
        return keys.new_zeros(batch, heads_q, rows, values.shape[-1])
    valid = index >= 0                                                                # [B, Hkv, n, S]
    if bias is None:
        scores = torch.zeros(index.shape, dtype=keys.dtype, device=keys.device)
    else:  # [B|1, n, Tk] → the selected entries
        scores = bias.to(keys.dtype)[:, None].expand(batch, heads_kv, rows, bias.shape[-1]).gather(
            -1, index.clamp(min=0))
    scores = scores[:, :, None].expand(batch, heads_kv, groups, rows, slots)
    if relative is not None:
        scores = scores + relative.to(keys.dtype)
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    offsets = (torch.arange(batch * heads_kv, device=keys.device) * t_k).view(batch, heads_kv, 1, 1, 1)
    columns = (index.clamp(min=0)[:, :, None] + offsets).expand(batch, heads_kv, groups, rows, slots).reshape(-1)
    pointers = torch.arange(0, count * slots + 1, slots, device=keys.device)
    pattern = _csr(pointers, columns, scores.reshape(-1), (count, keys.shape[0]))
    logits = torch.sparse.sampled_addmm(pattern, q_rows.reshape(count, dim).to(keys.dtype), keys.t(), alpha=scale)
    seen = valid.any(-1, keepdim=True)[:, :, None].expand(batch, heads_kv, groups, rows, 1).reshape(count, 1)
    probs = torch.softmax(logits.values().view(count, slots), dim=-1).masked_fill_(~seen, 0.0)
    out = _csr(pointers, columns, probs.view(-1), pattern.shape) @ values             # [B·Hq·n, Dv]
    return out.view(batch, heads_q, rows, values.shape[-1])


def hashed_attention_forward(q, k, v, attn_mask, is_causal: bool, scale: float, bits: int, top_k: int, window: int,
                             sinks: int, proj_q, proj_k, score_mod=None, far_dtype=None,
                             relative: torch.Tensor | None = None) -> torch.Tensor:
    """Hashed attention on checked inputs: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D|Dv] → [B, Hq, Tq, Dv].

    ``proj_q``/``proj_k``: float64 projections (see :func:`attnrewrite.kernels.hashed.codes.projections`).
    Semantics: :mod:`attnrewrite.kernels.hashed.reference`.  On the CPU the attention over the selected
    keys is sparse (:func:`_attend_csr`); elsewhere, and with a score modification (``score_mod``, a
    ``ScoreProgram`` applied to scale·q·k before the bias; the selection does not read scores), it
    gathers them.

    ``far_dtype`` (a torch dtype or None): the selected keys and values that are not sinks or window
    (:func:`far_slots`) are used as x.to(far_dtype).to(compute dtype), the compute dtype being
    :func:`work_dtype` of the input's; sinks and window keep full precision.  None: no rounding (and the
    same code as without the option).  With it the attention gathers (the CPU's sparse path reads keys in place).

    ``relative``: a relative position bias table R [Hq, Tq + Tk − 1] (work dtype or float64) or None: each
    selected key's score gets R[h, j − i + Tq − 1], added with the mask's bias after the modification (read
    per selected slot, never as a [Tq, Tk] tensor).
    """
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    groups = q.shape[1] // k.shape[1]
    sparse = q.device.type == "cpu" and USE_CSR and score_mod is None and far_dtype is None
    if sparse:
        dtype = work_dtype(q.dtype)
        keys, values = k.reshape(-1, k.shape[-1]).to(dtype), v.reshape(-1, v.shape[-1]).to(dtype)
    for rows, q_rows, index, bias in hashed_blocks(q, k, attn_mask, is_causal, bits, top_k, window, sinks,
                                                   proj_q, proj_k):
        # a CSR row holds one entry per slot; with more slots than there are keys in all (a short sequence
        # against the default top_k) its entries would outnumber the dense shape's, which torch refuses
        rel = None if relative is None else gather_relative(
            relative, relative_slots(index, rows, q.shape[-2], relative.shape[-1]), groups)
        if sparse and index.shape[-1] <= keys.shape[0]:
            out[:, :, rows] = _attend_csr(q_rows, keys, values, index, bias, scale, rel).to(out.dtype)
            continue
        k_sel, v_sel = gather(k, index), gather(v, index)
        if far_dtype is not None:
            far = far_slots(index, attn_mask, rows, is_causal, q.shape[-2], k.shape[-2], sinks, window)
            dtype = work_dtype(q.dtype)
            k_sel, v_sel = round_far(k_sel.to(dtype), far, far_dtype), round_far(v_sel.to(dtype), far, far_dtype)
        _, probs, _ = _block_probs(q_rows, k_sel, index, bias, scale, score_mod, relative=rel)
        o = torch.einsum("bkgns,bknsv->bkgnv", probs.to(v_sel.dtype), v_sel)
        out[:, :, rows] = o.reshape(q.shape[0], q.shape[1], -1, v.shape[-1])
    return out


def hashed_attention_backward(grad, q, k, v, attn_mask, is_causal: bool, scale: float, bits: int, top_k: int,
                              window: int, sinks: int, proj_q, proj_k, learned: bool, score_mod=None,
                              far_dtype=None, relative: torch.Tensor | None = None):
    """(dq, dk, dv, d_proj_q or None, d_proj_k or None, d_relative or None) of :func:`hashed_attention_forward`;
    d_relative [Hq, Tq + Tk − 1] in ``relative``'s dtype: the logits' gradient summed per distance it read.

    With ``far_dtype`` the far keys and values enter as the forward rounded them, and their gradients
    pass straight through the rounding (its derivative taken as the identity)."""
    dtype = work_dtype(q.dtype)
    batch, heads_q, _, dim = q.shape
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    groups = heads_q // k.shape[1]
    d_relative = None if relative is None else torch.zeros(relative.shape, dtype=torch.promote_types(
        relative.dtype, dtype), device=q.device)
    if learned:  # the straight-through estimate (module docstring): soft codes of q and k
        soft_q = torch.tanh(project(q, proj_q).to(dtype))                                # [B, Hq, Tq, bits]
        soft_k = torch.tanh(project(k, proj_k).to(dtype))                                # [B, Hkv, Tk, bits]
        d_soft_q = torch.zeros(soft_q.shape, dtype=dtype, device=q.device)
        d_soft_k = torch.zeros(soft_k.shape, dtype=dtype, device=q.device)
    for rows, q_rows, index, bias in hashed_blocks(q, k, attn_mask, is_causal, bits, top_k, window, sinks,
                                                   proj_q, proj_k):
        k_sel, v_sel = gather(k, index).to(dtype), gather(v, index).to(dtype)
        if far_dtype is not None:
            far = far_slots(index, attn_mask, rows, is_causal, q.shape[-2], k.shape[-2], sinks, window)
            k_sel, v_sel = round_far(k_sel, far, far_dtype), round_far(v_sel, far, far_dtype)
        slots = None if relative is None else relative_slots(index, rows, q.shape[-2], relative.shape[-1])
        rel = None if relative is None else gather_relative(relative, slots, groups)
        q5, probs, mod_grad = _block_probs(q_rows, k_sel, index, bias, scale, score_mod, want_grad=True,
                                           relative=rel)
        d_out = grad[:, :, rows].reshape(q5.shape[:-1] + (v.shape[-1],)).to(dtype)
        d_probs = torch.einsum("bkgnv,bknsv->bkgns", d_out, v_sel)
        d_logits = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))  # at the softmax's input
        if relative is not None:  # R is added at the softmax's input: its gradient is d_logits, per distance
            scatter_relative(d_relative, slots, index, d_logits)
        d_scores = d_logits if mod_grad is None else d_logits * mod_grad  # at scale·q·k
        dq[:, :, rows] = (scale * torch.einsum("bkgns,bknsd->bkgnd", d_scores, k_sel)).reshape(
            batch, heads_q, -1, dim)
        scatter_add(dk, index, scale * torch.einsum("bkgns,bkgnd->bknsd", d_scores, q5))
        scatter_add(dv, index, torch.einsum("bkgns,bkgnv->bknsv", probs, d_out))
        if learned:
            soft_k_sel = gather(soft_k, index)                                             # [B, Hkv, n, S, bits]
            sq = soft_q[:, :, rows].reshape(q5.shape[:-1] + (bits,))
            d_agree = d_logits / bits
            d_soft_q[:, :, rows] += torch.einsum("bkgns,bknsc->bkgnc", d_agree, soft_k_sel).reshape(
                batch, heads_q, -1, bits)
            scatter_add(d_soft_k, index, torch.einsum("bkgns,bkgnc->bknsc", d_agree, sq))
    d_proj_q = d_proj_k = None
    if learned:  # through tanh and the projections (q and k themselves get nothing from the estimate)
        d_pre_q, d_pre_k = d_soft_q * (1 - soft_q.square()), d_soft_k * (1 - soft_k.square())
        d_proj_q = torch.einsum("bhtd,bhtn->hdn", q.to(dtype), d_pre_q).to(proj_q.dtype)
        d_proj_k = torch.einsum("bhtd,bhtn->hdn", k.to(dtype), d_pre_k).to(proj_k.dtype)
    d_relative = None if d_relative is None else d_relative.to(relative.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_proj_q, d_proj_k, d_relative
