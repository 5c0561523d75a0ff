"""Grouped-query attention: see through the repetition of key/value heads.

Models with fewer key/value heads than query heads repeat k and v before attention, as
``repeat_kv`` does (``x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv * n, T, D)``) or
with ``repeat_interleave(n, dim=1)``. Both give query head h the kv head h // n, which is
what ``enable_gqa`` means; the site then reads the un-repeated tensors and records n.
(``x.repeat(1, n, 1, 1)`` pairs head h with h % n instead: it is left as it is.)
"""

from __future__ import annotations

import torch.fx as fx

from attnrewrite.ir.capture import hinted_shape, normalize, rank
from attnrewrite.ir.spec import TensorRef


def _unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    """x when ``node`` is x[:, :, None] or x.unsqueeze(2) of a 4-D x."""
    call = normalize(node)
    if call is None:
        return None
    if call.name == "unsqueeze" and call.args[1] in (2, -3) and rank(call.args[0]) == 4:
        return call.args[0]
    if call.name == "getitem" and isinstance(call.args[1], tuple):
        index = call.args[1]
        full = slice(None, None, None)
        if len(index) >= 3 and index[2] is None and index[0] == full and index[1] == full and all(
            i == full or i is Ellipsis for i in index[3:]
        ) and rank(call.args[0]) == 4:
            return call.args[0]
    return None


def see_through_repeat(ref: TensorRef) -> tuple[TensorRef, int]:
    """(un-repeated tensor, n) when ``ref`` is a repeat of kv heads by n, else (ref, 1)."""
    if ref.steps:
        return ref, 1
    call = normalize(ref.node)
    if call is None or rank(ref.node) != 4:
        return ref, 1
    if call.name == "repeat_interleave":
        repeats, dim = call.args[1], call.kwargs.get("dim")
        if isinstance(repeats, int) and repeats > 1 and dim in (1, -3):
            return TensorRef(call.args[0]), repeats
        return ref, 1
    if call.name != "view":
        return ref, 1
    expand = normalize(call.args[0]) if isinstance(call.args[0], fx.Node) else None
    if expand is None or expand.name != "expand":
        return ref, 1
    source = _unsqueezed_at_2(expand.args[0])
    if source is None:
        return ref, 1
    src, mid, out = hinted_shape(source), hinted_shape(expand.node), hinted_shape(ref.node)
    b, h_kv, t, d = src
    if len(mid) != 5 or mid[0] != b or mid[1] != h_kv or mid[3:] != (t, d):
        return ref, 1
    groups = mid[2]
    if out != (b, h_kv * groups, t, d) or groups < 1:
        return ref, 1
    return TensorRef(source), groups
