"""``F.scaled_dot_product_attention`` calls, as written by users and by HF's sdpa attention.

The call already states q, k, v, the mask, causality, dropout and the scale; the family adds
what SDPA leaves implicit: grouped-query attention hidden behind ``repeat_kv`` (so kinds get
the un-repeated k and v), and, through the resolver, the causal part of an explicit mask.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from attnrewrite.ir.capture import (
    Call,
    constant_value,
    is_scalar,
    normalize,
    owning_module,
    rank,
    symbolic_number,
    tensor_meta,
)
from attnrewrite.ir.spec import AttentionSpec, MaskTerm, NotAttention, Site, TensorRef
from attnrewrite.patterns.eager_matmul import region_between
from attnrewrite.patterns.grouped_kv import see_through_repeat
from attnrewrite.patterns.layout import ref_shape, term_steps, to_four_dims


def is_anchor(call: Call) -> bool:
    return call.name == "sdpa"


_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


def opaque_attention(node: fx.Node) -> str | None:
    """The name of the attention op ``node`` calls when no family reads it — a custom op (flash-attn's,
    xformers', your own ``torch.library`` op), one of aten's SDPA kernels called directly — or None.  Known by
    its name only: its arguments do not say what it computes, so it is reported, never rewritten."""
    if node.op != "call_function" or not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    name = node.target.name() if isinstance(node.target, torch._ops.OpOverload) else node.target._qualified_op_name
    if name.split("::", 1)[0].startswith("attnrewrite") or not _ATTENTION_NAME.search(name):  # our own namespaces
        return None
    return (f"an attention op the matcher does not read ({name}): it runs as it was; call "
            "F.scaled_dot_product_attention or write the attention out to have it rewritten")


def _constant(value, kind: type, what: str):
    if isinstance(value, bool) and kind is not bool:
        raise NotAttention(f"{what} is a bool")
    if value is None or isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return value
    raise NotAttention(f"{what} is not a compile-time constant ({value!r})")


def match(anchor: fx.Node) -> Site:
    call = normalize(anchor)
    q, k, v = call.args
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise NotAttention("q, k or v is not a tensor")
    kw = call.kwargs
    symbolic_dropout = symbolic_number(kw["dropout_p"])  # an nn.Dropout's p under dynamic=True
    dropout_p, dropout_node = symbolic_dropout or (_constant(kw["dropout_p"], float, "dropout_p"), None)
    is_causal = _constant(kw["is_causal"], bool, "is_causal")
    scale = kw["scale"]
    q_factors: tuple = ()
    if isinstance(scale, fx.Node) and is_scalar(scale):
        q_factors, scale = ((scale, 1),), 1.0  # a SymFloat scale (dynamic head dim): folded into q
    scale = _constant(scale, float, "scale")
    enable_gqa = _constant(kw["enable_gqa"], bool, "enable_gqa")

    k_ref, k_groups = see_through_repeat(TensorRef(k))
    v_ref, v_groups = see_through_repeat(TensorRef(v))
    if k_groups != v_groups:
        k_ref, v_ref, k_groups = TensorRef(k), TensorRef(v), 1
    q_ref = TensorRef(q)
    r = rank(q)
    if rank(k) != r or rank(v) != r or r is None:
        raise NotAttention("q, k and v have different ranks")
    in_steps, _ = to_four_dims(r)
    q_ref, k_ref, v_ref = (TensorRef(x.node, x.steps + in_steps) for x in (q_ref, k_ref, v_ref))
    q_shape, k_shape, v_shape = ref_shape(q_ref), ref_shape(k_ref), ref_shape(v_ref)
    if q_shape[-3] % k_shape[-3] != 0:
        raise NotAttention(f"{q_shape[-3]} query heads cannot share {k_shape[-3]} kv heads")
    groups = q_shape[-3] // k_shape[-3]
    # one kv head broadcast over every query head (Falcon's multi-query attention) is SDPA's
    # batch broadcasting; any other mismatch needs enable_gqa
    broadcast = k_shape[-3] == v_shape[-3] == 1
    if groups > 1 and not enable_gqa and k_groups == 1 and not broadcast:
        raise NotAttention("q and k have different head counts without enable_gqa")

    terms: tuple[MaskTerm, ...] = ()
    mask = kw["attn_mask"]
    if isinstance(mask, fx.Node):
        meta = tensor_meta(mask)
        if meta is None:
            raise NotAttention("attn_mask is not a tensor")
        kind = "keep" if meta.dtype == torch.bool else "add"
        terms = (MaskTerm(kind, mask, term_steps(meta.dim(), r)),)
    elif mask is not None:
        raise NotAttention(f"attn_mask is {mask!r}")

    scale_value = constant_value(scale) if scale is not None else None
    spec = AttentionSpec(
        q=q_ref, k=k_ref, v=v_ref,
        scale=scale_value,
        q_factors=q_factors,
        bias=terms,
        causal=is_causal,
        kv_groups=groups,
        dropout_p=dropout_p or 0.0,
        dropout_node=dropout_node,
        module_path=owning_module([anchor]),
        pattern="sdpa",
    )
    _, out_steps = to_four_dims(r)
    region = region_between({q_ref.node, k_ref.node, v_ref.node}, anchor)
    return Site(anchor=anchor, pattern="sdpa", module_path=spec.module_path, spec=spec, output=anchor,
                out_steps=out_steps, region=region, score_rank=r)
