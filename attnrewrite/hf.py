"""transformers integration: the kinds as HF attention implementations, no compile needed.

    import attnrewrite.hf
    attnrewrite.hf.register()
    model = AutoModel.from_config(cfg, attn_implementation="attnrewrite_sigmoid")

``register()`` adds ``attnrewrite_softmax``, ``attnrewrite_sigmoid`` and ``attnrewrite_linear``
to ``transformers.AttentionInterface`` (and their mask functions to ``AttentionMaskInterface``).
Each takes HF's attention arguments (q, k, v as [B, H, T, D], a 4-d mask or None, ``scaling``,
``dropout``, ``is_causal``), calls the kind's op, and returns HF's [B, T, H, D] layout.

Masks: ``softmax`` and ``sigmoid`` take HF's SDPA-style bool mask as it is.  ``linear`` can only
honour causality and key padding: its mask function hands over the padding alone ([B, 1, 1, Tk])
and causality comes from the module's ``is_causal``; a model whose mask is anything else
(sliding windows, chunked or bidirectional-with-prefix masks) raises a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

IMPLEMENTATIONS = ("attnrewrite_softmax", "attnrewrite_sigmoid", "attnrewrite_linear")


def _gqa(module, query, key) -> bool:
    return query.shape[1] != key.shape[1]


def _is_causal(module, query, is_causal, attention_mask) -> bool:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(causal and query.shape[2] > 1 and attention_mask is None)


def _finish(out: torch.Tensor):
    return out.transpose(1, 2).contiguous(), None


def _sdpa_like_forward(op_name: str):
    """An HF attention function calling ``attnrewrite.ops.<op_name>`` (kinds that take any mask)."""

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs: Any):
        from attnrewrite import ops

        out = getattr(ops, op_name)(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                    is_causal=_is_causal(module, query, is_causal, attention_mask), scale=scaling,
                                    enable_gqa=_gqa(module, query, key))
        return _finish(out)

    forward.__name__ = op_name.replace("_attention", "_forward")
    return forward


softmax_forward = _sdpa_like_forward("softmax_attention")
sigmoid_forward = _sdpa_like_forward("sigmoid_attention")


def linear_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   is_causal=None, **kwargs: Any):
    from attnrewrite.ops import linear_attention

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = linear_attention(query, key, value, attn_mask=attention_mask, is_causal=bool(causal),
                           enable_gqa=_gqa(module, query, key))
    return _finish(out)


def padding_only_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask=None, **kwargs: Any):
    """HF mask function for ``attnrewrite_linear``: the key-padding part of the mask, bool [B, 1, 1, Tk].

    HF's full mask is built and compared with padding & causal (or padding alone): anything else
    (sliding windows, prefix or chunked masks) cannot be honoured by a linear kind and raises.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **{k: v for k, v in kwargs.items() if k in ("device", "use_vmap")})
    device = full.device
    keep = (torch.ones(batch_size, kv_length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool().to(device)[:, -kv_length:])[:, None, None, :]
    q_index = torch.arange(q_length, device=device) + q_offset
    kv_index = torch.arange(kv_length, device=device) + kv_offset
    causal = kv_index[None, :] <= q_index[:, None]
    full = full.expand(batch_size, -1, q_length, kv_length)
    if not (torch.equal(full, (keep & causal).expand_as(full)) or torch.equal(full, keep.expand_as(full))):
        raise ValueError("attnrewrite_linear honours causal and key-padding masks only; this model's mask is "
                         "something else (a sliding window, a prefix or chunked mask)")
    return None if bool(keep.all()) else keep


def register() -> None:
    """Add the attnrewrite kinds to transformers' attention registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("attnrewrite_softmax", softmax_forward)
    AttentionInterface.register("attnrewrite_sigmoid", sigmoid_forward)
    AttentionInterface.register("attnrewrite_linear", linear_forward)
    AttentionMaskInterface.register("attnrewrite_softmax", sdpa_mask)
    AttentionMaskInterface.register("attnrewrite_sigmoid", sdpa_mask)
    AttentionMaskInterface.register("attnrewrite_linear", padding_only_mask)
