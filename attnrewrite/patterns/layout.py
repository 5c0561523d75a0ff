"""Layout helpers shared by the pattern families: from what the graph holds to [B, H, T, D]."""

from __future__ import annotations

import torch.fx as fx

from attnrewrite.ir.capture import constant_value, hint, hinted_shape, normalize, rank
from attnrewrite.ir.spec import NotAttention, Step, TensorRef

#: Views that can be replayed as layout steps when a constant scale is pulled out from under them.
_VIEW_STEPS = {"transpose", "permute", "view", "unsqueeze", "identity", "unflatten", "flatten"}


def normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise NotAttention(f"dim {dim} out of range for rank {ndim}")
    return dim % ndim


def keys_from_transposed(node: fx.Node) -> TensorRef:
    """The keys [..., Tk, D] behind an operand kᵀ [..., D, Tk] of the score product."""
    call = normalize(node)
    r = rank(node)
    if call is not None and r is not None and r >= 2:
        if call.name == "transpose" and {normalize_dim(d, r) for d in call.args[1:]} == {r - 2, r - 1}:
            return TensorRef(call.args[0])
        if call.name == "permute":
            dims = [normalize_dim(d, r) for d in call.args[1]]
            if dims == list(range(r - 2)) + [r - 1, r - 2]:
                return TensorRef(call.args[0])
    return TensorRef(node).then("transpose", -2, -1)


def _as_step(call) -> Step | None:
    if call.name == "transpose":
        return ("transpose", call.args[1], call.args[2])
    if call.name == "permute":
        return ("permute", tuple(call.args[1]))
    if call.name == "view":
        return ("reshape", tuple(call.args[1]))
    if call.name == "unsqueeze":
        return ("unsqueeze", call.args[1])
    if call.name == "unflatten" and isinstance(call.args[2], tuple):
        return ("unflatten", call.args[1], call.args[2])
    if call.name == "flatten":
        return ("flatten", call.args[1], call.args[2])
    return None


def fold_constant_scale(ref: TensorRef, max_views: int = 6) -> tuple[TensorRef, float]:
    """Pull a constant factor out of q or k: ``(x * c).view(...).transpose(...)`` → x, c.

    Whisper and others scale q right after its projection; the views in between are replayed
    as layout steps on the unscaled tensor, so no node is copied.
    """
    factor, steps, node = 1.0, [], ref.node
    for _ in range(max_views + 1):
        call = normalize(node)
        if call is None:
            break
        if call.name in ("mul", "div"):
            a, b = call.args
            c = constant_value(b)
            if c is None and call.name == "mul":
                a, c = b, constant_value(a)
            if c is None or c <= 0 or not isinstance(a, fx.Node):
                break
            factor = factor * c if call.name == "mul" else factor / c
            node = a
            continue
        if call.name not in _VIEW_STEPS or not isinstance(call.args[0], fx.Node):
            break
        step = _as_step(call)
        if step is None and call.name != "identity":
            break  # a view we cannot replay: keep the scale where it is
        if step is not None:
            steps.insert(0, step)
        node = call.args[0]
    if factor == 1.0:
        return ref, 1.0
    return TensorRef(node, tuple(steps) + ref.steps), factor


def ref_shape(ref: TensorRef) -> tuple[int, ...]:
    """Hinted shape of ``ref`` after its steps."""
    from attnrewrite.ir.canonical import steps_shape

    shape = hinted_shape(ref.node)
    if shape is None:
        raise NotAttention(f"{ref.node.name} is not a tensor")
    if any(op in ("reshape", "unflatten", "expand") for op, *_ in ref.steps):
        steps = tuple(("expand", tuple(s[4][d] if d in s[2] else -1 for d in range(s[3]))) if s[0] == "expand_like"
                      else s for s in ref.steps)  # replayed on a meta tensor: the other operand's traced sizes
        return _replay_reshape(shape, steps)
    return steps_shape(shape, ref.steps)


def broadcast_over_batch(ref: TensorRef, lead: tuple[int, ...], donors: tuple[TensorRef, ...]) -> TensorRef:
    """``ref`` (q, k or v) brought to the rank of the product whose leading sizes are ``lead``, its batch dims
    expanded where the product broadcasts it: a learned latent query [H, L, D] against keys [B, H, T, D]
    (Perceiver, Set Transformer's pooling, attention-pooling heads).  The batch dims are the leading dims
    but the head dim (all of them for 3-D products); a head dim of 1 is left to the caller (multi-query
    attention for keys, a near miss for queries).  The sizes are read from a ``donor`` that has them."""
    shape = ref_shape(ref)
    full = len(lead) + 2
    missing = full - len(shape)
    if missing < 0:
        return ref
    steps = ref.steps + (("unsqueeze", 0),) * missing
    shape = (1,) * missing + tuple(shape)
    batch_dims = range(len(lead) - 1) if len(lead) >= 2 else range(len(lead))
    dims = tuple(d for d in batch_dims if shape[d] == 1 and lead[d] != 1)
    if not dims:
        return TensorRef(ref.node, steps)
    for donor in donors:
        donor_shape = ref_shape(donor)
        if len(donor_shape) == full and all(donor_shape[d] == lead[d] for d in dims):
            return TensorRef(ref.node, steps + (("expand_like", donor.node, donor.steps, dims, full,
                                                 tuple(donor_shape)),))
    raise NotAttention(f"{ref.node.name} {tuple(shape)} broadcasts over batch dims {dims} that no other operand "
                       f"spells out")


def _replay_reshape(shape: tuple[int, ...], steps) -> tuple[int, ...]:
    import torch

    from attnrewrite.ir.canonical import apply_steps
    from attnrewrite.ir.capture import hint

    meta = torch.empty(shape, device="meta")
    return tuple(apply_steps(meta, steps, lambda n: hint(n.meta.get("example_value"))).shape)


def to_four_dims(rank_: int, lead_sizes: tuple | None = None,
                 like: TensorRef | None = None) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """Steps that bring q/k/v of ``rank_`` dims to [B, H, T, D], and the output steps back.

    Above rank 4 (attention over grid or block partitions, ``b h w i d``) the leading dims but the
    last one of ``lead_sizes`` (the scores' leading sizes: ints, or graph nodes for symbolic ones)
    are merged into one batch dim; every leading dim is an independent batch of attention anyway.
    Symbolic sizes the graph does not name are read back from ``like`` (an operand in the scores'
    layout, e.g. q) when the output is unflattened.
    """
    if rank_ == 4:
        return (), ()
    if rank_ == 3:  # [N, T, D]: one batch dim, treated as N sequences of one head
        return (("unsqueeze", 1),), (("squeeze", 1),)
    if rank_ == 2:
        return (("unsqueeze", 0), ("unsqueeze", 0)), (("squeeze", 0), ("squeeze", 0))
    if lead_sizes is not None and len(lead_sizes) == rank_ - 2:
        merged = tuple(lead_sizes[:rank_ - 3])
        if all(isinstance(s, (int, fx.Node)) for s in merged[1:]):
            return (("flatten", 0, rank_ - 4),), (("unflatten", 0, (-1,) + merged[1:]),)
        if like is not None and tuple(ref_shape(like)[:len(merged)]) == tuple(hint(s) for s in merged):
            return (("flatten", 0, rank_ - 4),), (("unflatten_like", like.node, like.steps, len(merged),
                                                   tuple(ref_shape(like))),)
        raise NotAttention(f"rank-{rank_} attention whose leading sizes {merged} the graph does not name")
    raise NotAttention(f"rank-{rank_} attention operands (only 2-, 3- and 4-D layouts are supported)")


def relayout(lead_rank: int, to_lead: tuple) -> tuple[Step, ...]:
    """Steps that regroup the ``lead_rank`` leading dims of a tensor into ``to_lead`` (row-major, as a
    view of the scores does): flatten them, then unflatten.

    ``to_lead`` holds ints, -1 or graph nodes (symbolic sizes, read when the steps run).  When all
    but the first are sizes (ints other than -1), the first is written -1, so that a dynamic batch size
    stays dynamic; a -1 elsewhere (``view(b, -1, H, N, N)``) is kept where the view put it.
    """
    if lead_rank < 1 or len(to_lead) < 1:
        raise NotAttention("a view of the scores to or from a rank below 3")
    if all(isinstance(s, int) and s != -1 for s in to_lead[1:]):
        sizes = (-1,) + tuple(to_lead[1:])
    elif all(isinstance(s, (int, fx.Node)) for s in to_lead):
        sizes = tuple(to_lead)
    else:
        raise NotAttention(f"a view of the scores to symbolic leading sizes {to_lead} that the graph does not name")
    steps: list[Step] = []
    if lead_rank > 1:
        steps.append(("flatten", 0, lead_rank - 1))
    if len(sizes) > 1:
        steps.append(("unflatten", 0, sizes))
    return tuple(steps)


def term_steps(term_rank: int | None, score_rank: int) -> tuple[Step, ...]:
    """Steps that keep a mask term broadcastable once the scores went from ``score_rank`` to 4-D."""
    if score_rank == 3 and term_rank == 3:
        return (("unsqueeze", 1),)
    return ()
