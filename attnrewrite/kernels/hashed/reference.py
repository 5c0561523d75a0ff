"""Hashed attention, written to be read: the oracle the fast path and the cache are checked against.

Per batch b, key/value head h and query position i (the query heads of a group share one selection):

1. the visible keys are those the mask allows (and j ≤ i when causal), in order;
2. code agreement of key j = Σ over the group's query heads of the number of equal bits between the
   query's code and key j's code (codes: :mod:`attnrewrite.kernels.hashed.codes`);
3. selected = the first ``sinks`` visible keys, the last ``window`` visible keys, and the ``top_k``
   other visible keys with the highest agreement (ties go to the later key);
4. each query head computes exact softmax(scale·q·k + bias) over the selected keys; a query that sees
   no key gets 0.  With a relative bias table R [Hq, Tq + Tk − 1], query head h adds R[h, j − i + Tq − 1]
   to key j's score (with the mask's bias, after the score modification; it never excludes a key); a
   dense per-head bias [B|1, Hq, Tq, Tk] (``head_bias``) is added the same way, read at (h, i, j).
5. with ``far_dtype``, the chosen keys that are neither among the first ``sinks`` nor the last ``window``
   visible keys are used, keys and values both, as x.to(far_dtype).to(compute dtype), the compute
   dtype being float32 for 16-bit inputs (else the input's); the others at full precision.  The
   gradient passes straight through that rounding (its derivative is taken as the identity).

Codes are compared bit by bit here, from Python booleans.  Small inputs only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from attnrewrite.kernels.checks import MASKED_SCORE


def _code_bits(x: torch.Tensor, projection: torch.Tensor) -> list:
    """[B][H][T][bits] Python booleans: bit b of x's code is x·P_b > 0, the product in float64.
    Written here rather than imported, so that the oracle shares no code with the fast path."""
    x, projection = x.double(), projection.double()
    if projection.dim() == 2:
        products = torch.einsum("bhtd,dn->bhtn", x, projection)
    else:  # one projection per head
        products = torch.einsum("bhtd,hdn->bhtn", x, projection)
    return (products > 0).tolist()


def _far(x: torch.Tensor, compute: torch.dtype, far_dtype: torch.dtype, is_far: bool) -> torch.Tensor:
    """x in the compute dtype, rounded through far_dtype when ``is_far``; the gradient passes straight
    through the rounding (the derivative of the round trip taken as 1)."""
    x = x.to(compute)
    return x + (x.to(far_dtype).to(compute) - x).detach() if is_far else x


def naive_hashed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                           is_causal: bool = False, scale: float | None = None, *, top_k: int = 256,
                           window: int = 64, sinks: int = 4, proj_q: torch.Tensor, proj_k: torch.Tensor,
                           score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           far_dtype: torch.dtype | None = None, relative: torch.Tensor | None = None,
                           head_bias: torch.Tensor | None = None):
    """q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] → (out [B, Hq, Tq, Dv], selected sets).

    ``attn_mask``: bool (True = may attend) or float (added to the scores; entries ≤ −9000 (MASKED_SCORE) exclude
    the key), broadcastable to [B, 1, Tq, Tk].  ``proj_q``/``proj_k``: [D, bits] or [H, D, bits].
    ``selected[b][h][i]`` is the sorted list of key indices chosen for that group and query.
    ``score_mod``: an elementwise function applied to scale·q·k of the chosen keys before the mask, or None.
    ``far_dtype``: a torch dtype (step 5 of the module docstring) or None.
    ``relative``: a relative position bias table R [Hq, Tq + Tk − 1] (step 4) or None.
    ``head_bias``: a float bias per query head, broadcastable to [B, Hq, Tq, Tk] (step 4), or None: the
    same bias as R written out, for checking the table against the model's own dense bias.
    """
    batch, heads_q, t_q, dim = q.shape
    heads_kv, t_k = k.shape[1], k.shape[2]
    groups = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q_bits = _code_bits(q, proj_q)   # [B][Hq][Tq][bits] booleans
    k_bits = _code_bits(k, proj_k)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        mask = mask.expand(batch, 1, t_q, t_k)
    if head_bias is not None:
        head_bias = head_bias.reshape((1,) * (4 - head_bias.dim()) + tuple(head_bias.shape))
        head_bias = head_bias.expand(batch, heads_q, t_q, t_k)
    out = q.new_zeros(batch, heads_q, t_q, v.shape[-1])
    selected_sets = []
    for b in range(batch):
        per_head = []
        for h in range(heads_kv):
            per_query = []
            for i in range(t_q):
                def allowed(j):
                    if is_causal and j > i:
                        return False
                    if mask is None:
                        return True
                    m = mask[b, 0, i, j]
                    return bool(m) if mask.dtype == torch.bool else float(m) > MASKED_SCORE
                visible = [j for j in range(t_k) if allowed(j)]
                chosen = set(visible[:sinks]) | set(visible[max(0, len(visible) - window):] if window else [])
                near = set(chosen)
                heads = range(h * groups, (h + 1) * groups)
                agreement = {j: sum(a == c for hq in heads for a, c in zip(q_bits[b][hq][i], k_bits[b][h][j]))
                             for j in visible if j not in chosen}
                ranked = sorted(agreement, key=lambda j: (agreement[j], j), reverse=True)
                chosen |= set(ranked[:top_k])
                chosen = sorted(chosen)
                per_query.append(chosen)
                if not chosen:
                    continue
                keys, values = k[b, h, chosen], v[b, h, chosen]
                if far_dtype is not None:
                    compute = torch.promote_types(k.dtype, torch.float32)
                    keys = torch.stack([_far(k[b, h, j], compute, far_dtype, j not in near) for j in chosen])
                    values = torch.stack([_far(v[b, h, j], compute, far_dtype, j not in near) for j in chosen])
                for hq in heads:
                    logits = (keys @ q[b, hq, i].to(keys.dtype)) * scale
                    if score_mod is not None:
                        logits = score_mod(logits)
                    if mask is not None and mask.dtype != torch.bool:
                        logits = logits + mask[b, 0, i, chosen].to(logits.dtype)
                    if relative is not None:
                        logits = logits + relative[hq, [j - i + t_q - 1 for j in chosen]].to(logits.dtype)
                    if head_bias is not None:
                        logits = logits + head_bias[b, hq, i, chosen].to(logits.dtype)
                    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0)
                    out[b, hq, i] = (probs.to(values.dtype) @ values).to(out.dtype)
            per_head.append(per_query)
        selected_sets.append(per_head)
    return out, selected_sets
