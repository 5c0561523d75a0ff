"""Shared pieces of the decode-cache tests: random q/k/v, and plain softmax over what a cache returns."""

from __future__ import annotations

import torch


def random_qkv(t: int, b: int = 2, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0):
    """q [b, hq, t, d], k and v [b, hkv, t, d]: float64 standard normal, seeded."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))


def attend_returned(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    visible: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax of q [B, Hq, T, D] over the keys and values a cache returned (GQA expanded, its
    ``visible`` mask applied when there is one), scale 1/√D: [B, Hq, T, Dv]."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ values


def through_layer(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, steps: list[int],
                  **attend_kwargs) -> torch.Tensor:
    """Feed ``sum(steps)`` tokens to a layer cache in steps of the given sizes; each step's queries attend
    to what the cache returns. ``attend_kwargs`` may hold tensors over all tokens [B, T] (``key_valid``),
    sliced per step. Returns [B, Hq, T, Dv]."""
    got, start = [], 0
    for count in steps:
        rows = slice(start, start + count)
        extra = {name: value[:, rows] for name, value in attend_kwargs.items()}
        keys, values, visible = layer.attend(torch.arange(start, start + count), q[:, :, rows], k[:, :, rows],
                                             v[:, :, rows], **extra)
        got.append(attend_returned(q[:, :, rows], keys, values, visible))
        start += count
    return torch.cat(got, 2)


def padding(kind: str, t: int, pads=(0, 5, 11)) -> torch.Tensor:
    """bool [len(pads), T], False = padding: ``left`` (batched prompts), ``right``, or ``inner`` (4 padded tokens
    from position pad); row r padded by ``pads[r]``, so rows differ and some hold more padding than a chunk."""
    valid = torch.ones(len(pads), t, dtype=torch.bool)
    for row, pad in enumerate(pads):
        if kind == "left":
            valid[row, :pad] = False
        elif kind == "right":
            valid[row, t - pad:] = False
        elif kind == "inner":
            valid[row, pad:pad + 4] = False
        else:
            raise ValueError(f"padding kind must be left, right or inner, got {kind!r}")
    return valid


def assert_equal_where_seen(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor, atol: float = 1e-12) -> None:
    """got, want [B, H, T, D]: equal wherever a query saw some key.  A query that sees none (padding before
    a row's first token) is 0 in the ops and nan through a cache; every valid query must have seen one."""
    seen = ~got.isnan().all(-1)
    assert bool(seen[valid[:, None, :].expand_as(seen)].all()), "a valid query saw no key"
    torch.testing.assert_close(got[seen], want[seen], rtol=0, atol=atol)


def hf_decode_mask(cache, batch_mask: torch.Tensor, position: int) -> torch.Tensor:
    """The mask transformers builds for a one-token step at ``position`` from the batch's 2-d mask [B, T] and
    the cache's sizes (its first layer's ``get_mask_sizes``)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    kv_length, kv_offset = cache.layers[0].get_mask_sizes(1) if cache.layers else (1, 0)
    return sdpa_mask(batch_size=batch_mask.shape[0], q_length=1, kv_length=kv_length, q_offset=position,
                     kv_offset=kv_offset, mask_function=causal_mask_function,
                     attention_mask=batch_mask[:, :position + 1].bool(), allow_is_causal_skip=False)
