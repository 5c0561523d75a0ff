"""``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``: unfuse, then match as usual.

Dynamo keeps ``F.multi_head_attention_forward`` as one opaque node, and under ``no_grad`` in
eval mode ``nn.TransformerEncoderLayer`` runs the fused ``torch._transformer_encoder_layer_fwd``.
Neither shows its attention.  This family replaces each by the same computation written out
(in-projection, heads, ``F.scaled_dot_product_attention`` — or matmul/softmax when the
weights are returned —, out-projection; plus norms and feed-forward for the encoder layer),
checks the expansion against the fused op in float64 on the example's weights and random
inputs, and leaves the attention inside to the SDPA and eager families.
"""

from __future__ import annotations

import inspect
import math
import types

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnrewrite.ir.capture import Call, normalize, tensor_meta
from attnrewrite.ir.evaluate import GraphEvaluator, float64_default
from attnrewrite.ir.record import erase_unused, propagate_meta, recording
from attnrewrite.ir.spec import NotAttention
from attnrewrite.ir.written_out import shift_sensitive, shift_sensitive_sdpa

FUSED = {"mha_forward", "transformer_encoder_layer_fwd"}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_UNFUSE_RTOL = 1e-9


def is_fused(call: Call) -> bool:
    return call.name in FUSED


# --------------------------------------------------------------------------- the written-out forms


def _mask_parts(attn_mask, attn_bool, attn_rank, key_padding_mask, kpm_bool, num_heads):
    """Masks in MHA's convention (bool True = masked) as an SDPA mask broadcastable to [N, H, L, S]."""
    parts = []
    if attn_mask is not None:
        m = attn_mask.unflatten(0, (-1, num_heads)) if attn_rank == 3 else attn_mask
        parts.append((m, attn_bool))
    if key_padding_mask is not None:
        parts.append((key_padding_mask.unsqueeze(1).unsqueeze(2), kpm_bool))
    return parts


def _combine(parts, dtype):
    if not parts:
        return None
    if all(is_bool for _, is_bool in parts):
        keep = None
        for m, _ in parts:
            keep = ~m if keep is None else keep & ~m
        return keep
    total = None
    for m, is_bool in parts:
        m = torch.where(m, -math.inf, 0.0).to(dtype) if is_bool else m.to(dtype)
        total = m if total is None else total + m
    return total


def mha_forward_written_out(query, key, value, *, num_heads, embed_dim, dtype, in_proj_weight, in_proj_bias,
                            out_proj_weight, out_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight,
                            separate, same_qkv, same_kv, attn_mask, attn_bool, attn_rank, key_padding_mask, kpm_bool,
                            dropout_p, need_weights, average_weights, is_causal, batched):
    """``F.multi_head_attention_forward`` (no bias_k/bias_v/zero-attn/static kv) in plain ops.

    query [L, N, E], key/value [S, N, E] (or unbatched [L, E]); returns (out [L, N, E], weights).
    """
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    e = embed_dim
    if separate:
        b = [None] * 3 if in_proj_bias is None else [in_proj_bias[i * e:(i + 1) * e] for i in range(3)]
        q, k, v = (F.linear(x, w, bb) for x, w, bb in zip((query, key, value),
                                                           (q_proj_weight, k_proj_weight, v_proj_weight), b))
    elif same_qkv:
        qkv = F.linear(query, in_proj_weight, in_proj_bias)
        q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
    else:
        b = (None, None) if in_proj_bias is None else (in_proj_bias[:e], in_proj_bias[e:])
        q = F.linear(query, in_proj_weight[:e], b[0])
        if same_kv:
            kv = F.linear(key, in_proj_weight[e:], b[1])
            k, v = kv[..., :e], kv[..., e:]
        else:
            bk = (None, None) if in_proj_bias is None else (in_proj_bias[e:2 * e], in_proj_bias[2 * e:])
            k = F.linear(key, in_proj_weight[e:2 * e], bk[0])
            v = F.linear(value, in_proj_weight[2 * e:], bk[1])
    # [T, N, E] -> [N, H, T, E/H]
    q, k, v = (x.unflatten(-1, (num_heads, -1)).permute(1, 2, 0, 3) for x in (q, k, v))
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # MHA trusts the is_causal hint in exactly this case
    else:
        is_causal = False
    parts = _mask_parts(attn_mask, attn_bool, attn_rank, key_padding_mask, kpm_bool, num_heads)
    mask = _combine(parts, dtype)
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(e // num_heads))
        if mask is not None:
            keep_mask = all(is_bool for _, is_bool in parts)
            scores = scores.masked_fill(~mask, -math.inf) if keep_mask else scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
        if average_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    out = out.permute(2, 0, 1, 3).flatten(-2)  # [L, N, E]
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not batched:
        out = out.squeeze(1)
    return out, weights


def encoder_layer_written_out(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                              norm_first, eps, norm1_w, norm1_b, norm2_w, norm2_b, w1, b1, w2, b2, mask, mask_type,
                              *, mask_is_bool, dtype, mha=None):
    """``torch._transformer_encoder_layer_fwd`` (batch-first, eval mode) in plain ops.

    ``mha``: the self-attention as torch's own ``F.multi_head_attention_forward`` (or a function with its
    signature) instead of SDPA written out — the layer's slow path, which its fused op stands for."""
    def attention(x):  # x [N, L, E]
        if mha is not None:
            return _layer_attention_by_mha(mha, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                           proj_bias, mask, mask_type)
        qkv = F.linear(x, qkv_weight, qkv_bias)
        q, k, v = (qkv[..., i * embed_dim:(i + 1) * embed_dim].unflatten(-1, (num_heads, -1)).transpose(1, 2)
                   for i in range(3))
        attn_mask = None
        if mask is not None:
            m = mask.unsqueeze(1).unsqueeze(2) if mask_type == 1 else mask
            attn_mask = ~m if mask_is_bool else m.to(dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return F.linear(out.transpose(1, 2).flatten(-2), proj_weight, proj_bias)

    def feed_forward(x):
        h = F.linear(x, w1, b1)
        h = F.gelu(h) if use_gelu else F.relu(h)
        return F.linear(h, w2, b2)

    def norm1(x):
        return F.layer_norm(x, (embed_dim,), norm1_w, norm1_b, eps)

    def norm2(x):
        return F.layer_norm(x, (embed_dim,), norm2_w, norm2_b, eps)

    x = src
    if norm_first:
        x = x + attention(norm1(x))
        return x + feed_forward(norm2(x))
    x = norm1(x + attention(x))
    return norm2(x + feed_forward(x))


def _layer_attention_by_mha(mha, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask,
                            mask_type):
    """The encoder layer's self-attention as ``mha`` (``F.multi_head_attention_forward``) computes it, x [N, L, E];
    the fused op's merged mask (``MultiheadAttention.merge_masks``: type 0 [L, S], 1 key padding [N, S], 2
    [N, H, L, S]) passed as MHA takes it."""
    xt = x.transpose(0, 1)  # [L, N, E]
    attn_mask = key_padding_mask = None
    if mask is not None and mask_type == 1:
        key_padding_mask = mask
    elif mask is not None and mask.dim() == 4:
        n, length = x.shape[0], x.shape[1]
        attn_mask = mask.expand(n, num_heads, length, mask.shape[-1]).flatten(0, 1)
    else:
        attn_mask = mask
    out = mha(xt, xt, xt, embed_dim, num_heads, qkv_weight, qkv_bias, None, None, False, 0.0, proj_weight, proj_bias,
              training=False, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask)[0]
    return out.transpose(0, 1)


# --------------------------------------------------------------------------- unfusing


def _is_bool(node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.dtype == torch.bool


def _mha_outputs(node: fx.Node, lookup):
    bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            raise NotAttention(f"multi_head_attention_forward with {name} is not unfused")
    if a["add_zero_attn"]:
        raise NotAttention("multi_head_attention_forward with add_zero_attn is not unfused")
    for name in ("need_weights", "training", "average_attn_weights", "is_causal", "use_separate_proj_weight"):
        if not isinstance(a[name], bool):
            raise NotAttention(f"{name} is not a compile-time constant")
    if not isinstance(a["dropout_p"], (int, float)):
        raise NotAttention("dropout_p is not a compile-time constant")
    P = lambda x: lookup(x) if isinstance(x, fx.Node) else x  # noqa: E731
    query = a["query"]
    return mha_forward_written_out(
        P(query), P(a["key"]), P(a["value"]),
        num_heads=a["num_heads"], embed_dim=a["embed_dim_to_check"], dtype=tensor_meta(query).dtype,
        in_proj_weight=P(a["in_proj_weight"]), in_proj_bias=P(a["in_proj_bias"]),
        out_proj_weight=P(a["out_proj_weight"]), out_proj_bias=P(a["out_proj_bias"]),
        q_proj_weight=P(a["q_proj_weight"]), k_proj_weight=P(a["k_proj_weight"]),
        v_proj_weight=P(a["v_proj_weight"]), separate=a["use_separate_proj_weight"],
        same_qkv=query is a["key"] is a["value"], same_kv=a["key"] is a["value"],
        attn_mask=P(a["attn_mask"]), attn_bool=_is_bool(a["attn_mask"]),
        attn_rank=tensor_meta(a["attn_mask"]).dim() if a["attn_mask"] is not None else 0,
        key_padding_mask=P(a["key_padding_mask"]), kpm_bool=_is_bool(a["key_padding_mask"]),
        dropout_p=float(a["dropout_p"]) if a["training"] else 0.0,
        need_weights=a["need_weights"], average_weights=a["average_attn_weights"],
        is_causal=a["is_causal"], batched=tensor_meta(query).dim() == 3,
    )


def _encoder_layer_outputs(node: fx.Node, lookup, mha=None):
    args = list(node.args) + [None] * (20 - len(node.args))
    names = ("mask", "mask_type")
    for i, name in enumerate(names):
        if name in node.kwargs:
            args[18 + i] = node.kwargs[name]
    if not all(isinstance(args[i], (int, float, bool)) for i in (1, 2, 7, 8, 9)):
        raise NotAttention("encoder layer with a configuration that is not a compile-time constant")
    mask = args[18]
    P = lambda x: lookup(x) if isinstance(x, fx.Node) else x  # noqa: E731
    out = encoder_layer_written_out(*[P(a) for a in args], mask_is_bool=_is_bool(mask),
                                    dtype=tensor_meta(node.args[0]).dtype, mha=mha)
    return out, None


def unfuse(gm: fx.GraphModule, node: fx.Node, evaluator: GraphEvaluator, fake_mode) -> None:
    """Replace the fused ``node`` by its written-out form, checked in float64; NotAttention if not."""
    call = normalize(node)
    tuple_result = call.name == "mha_forward"
    users = list(node.users)
    if tuple_result and not all(u.op == "call_function" and u.target.__name__ == "getitem" for u in users):
        raise NotAttention("the fused attention's result is used as a tuple")
    build = _mha_outputs if tuple_result else _encoder_layer_outputs
    with recording(gm.graph, node) as (lookup, new_nodes):
        out, weights = build(node, lookup)
    outputs = (out.node, None if weights is None else weights.node)
    try:
        propagate_meta(new_nodes, fake_mode, node)
        _check_unfused(node, outputs, evaluator, tuple_result)
    except Exception:
        for n in reversed(new_nodes):
            gm.graph.erase_node(n)
        raise
    if tuple_result:
        for user in users:
            index = user.args[1]
            if outputs[index] is None:
                raise NotAttention("attention weights are read but the expansion has none")
            user.replace_all_uses_with(outputs[index])
        erase_unused(users + [node])
    else:
        node.replace_all_uses_with(outputs[0])
        erase_unused([node])


def _check_unfused(node: fx.Node, outputs, evaluator: GraphEvaluator, tuple_result: bool) -> None:
    """The written-out form must equal the fused op (float64, random activations, real weights), in its
    outputs and in its scores.

    Softmax ignores a constant added to one query's scores, so equal outputs do not prove equal scores: a
    written-out mask off by such a term would pass, and a kind that is not shift-invariant (sigmoid) would
    then be certified against the wrong scores.  So the two are compared a second time with their
    normalisation replaced by elu + 1 (``ir.written_out.shift_sensitive``): the written-out form's softmax or
    SDPA nodes, and in torch's own ``F.multi_head_attention_forward`` its ``softmax`` and SDPA (for the fused
    encoder layer, a C++ op, the layer's slow path: that function as its self-attention).
    """
    env = {}
    masks = _mask_operands(node, tuple_result)
    for arg in node.all_input_nodes:
        meta = tensor_meta(arg)
        if (meta is not None and meta.dtype.is_floating_point and arg not in masks
                and not evaluator.roles.get(arg) in ("param", "buffer")):
            env[arg] = evaluator.random_like_meta(arg)
    targets = [n for n in outputs if n is not None]
    evaluator.evaluate(targets + list(node.all_input_nodes), env)
    with torch.no_grad():
        fused = evaluator.compute(node, env)
    _compare_unfused(outputs, fused if tuple_result else (fused,), env, "")
    scores = {arg: env[arg] for arg in node.all_input_nodes}
    with torch.no_grad(), float64_default():
        for n in evaluator.closure(targets, scores):
            call = normalize(n)
            normalises = call is not None and call.name in ("softmax", "sdpa")
            scores[n] = _shift_sensitive_node(call, scores) if normalises else evaluator.compute(n, scores)
        mha = _shift_sensitive_mha()
        value = lambda x: scores[x] if isinstance(x, fx.Node) else x  # noqa: E731
        if tuple_result:
            bound = _MHA_SIGNATURE.bind(*fx.node.map_arg(node.args, value), **fx.node.map_arg(node.kwargs, value))
            want = mha(*bound.args, **bound.kwargs)
        else:
            want = _encoder_layer_outputs(node, value, mha=mha)
    _compare_unfused(outputs, want, scores, " scores (both normalised by elu + 1)")


def _mask_operands(node: fx.Node, tuple_result: bool) -> set:
    """The fused op's mask operands: taken as the graph computes them from the example inputs, not drawn at random
    (random floats in a mask mean nothing to the fused encoder layer, which reads nonzero entries as masked)."""
    if tuple_result:
        bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
        found = [bound.arguments.get("attn_mask"), bound.arguments.get("key_padding_mask")]
    else:
        found = [node.args[18] if len(node.args) > 18 else node.kwargs.get("mask")]
    return {m for m in found if isinstance(m, fx.Node)}


def _compare_unfused(outputs, fused, env, what: str) -> None:
    for got_node, want in zip(outputs, fused):
        if got_node is None or want is None:
            continue
        got = env[got_node]
        # positions the fused op leaves undefined (rows whose keys are all masked: NaN) are not compared, as in
        # certification; an op undefined everywhere (the fused encoder layer on CPU reads a float mask's nonzero
        # entries as masked: NaN) proves nothing
        finite = want.isfinite()
        if not bool(finite.any()):
            raise NotAttention(f"the fused op's output{what} is not finite on random inputs (NaN everywhere): the "
                               f"written-out form cannot be checked against it")
        if not bool(got[finite].isfinite().all()):
            raise NotAttention(f"written-out form is not finite where the fused op is{what}")
        got, want = got[finite], want[finite]
        err = float((got - want).abs().max() / (1.0 + want.abs().max()))
        if not err <= _UNFUSE_RTOL:
            more = (": they differ by a term the softmax ignores, such as a constant per query" if what else "")
            raise NotAttention(f"written-out form differs from the fused op{what} (relative error {err:.1e}){more}")


def _shift_sensitive_node(call: Call, env: dict) -> torch.Tensor:
    """A softmax or SDPA node of the written-out form, evaluated with elu + 1 for its softmax."""
    get = lambda x: env[x] if isinstance(x, fx.Node) else x  # noqa: E731
    if call.name == "softmax":
        return shift_sensitive(get(call.args[0]))
    return shift_sensitive_sdpa(*(get(a) for a in call.args), attn_mask=get(call.kwargs["attn_mask"]),
                                is_causal=get(call.kwargs["is_causal"]), scale=get(call.kwargs["scale"]))


def _shift_sensitive_mha():
    """torch's own ``F.multi_head_attention_forward``, its ``softmax`` and SDPA (globals of its module, which it
    calls by name) replaced by their elu + 1 forms; the function itself is not changed."""
    fn = F.multi_head_attention_forward
    names = fn.__code__.co_names
    if "softmax" not in names or "scaled_dot_product_attention" not in names:
        raise NotAttention("this torch's multi_head_attention_forward does not call softmax and SDPA by name: "
                           "the scores of its written-out form cannot be checked")
    namespace = dict(fn.__globals__, softmax=lambda x, dim=None, **_: shift_sensitive(x),
                     scaled_dot_product_attention=shift_sensitive_sdpa)
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
