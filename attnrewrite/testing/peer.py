"""The peer's attention spellings: what PyTorch inductor's own attention-fusion tests feed it.

Inductor's ``fuse_attention`` pass is tested on a list of hand-written attention functions
(``test/inductor/test_fused_attention.py`` in the PyTorch repository): its ``sfdp`` patterns,
the dtypes, batch sizes, mask forms and activation checkpointing they are run with.  This
module restates those spellings in our own code, one :class:`PeerCase` per (spelling, inputs)
pair, so that attnrewrite is measured on the peer's own ground: every case here is genuine
attention and must be rewritten, certified and exact.

Shapes follow the peer's: [4, 2, 16, 32] tensors, read either as [B, H, T, D] or — when the
spelling transposes or permutes them first — as [B, T, H, D] (16 heads over 2 tokens).  Cases
with dropout take a ``training`` flag, passed as False (the rewrite of a training-mode dropout
is random and cannot be compared with eager); the peer runs those in both modes.

``tests/patterns/test_peer_suite.py`` runs every case through the attnrewrite backend;
``bench/coverage.py --peer`` prints attnrewrite and inductor side by side.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

SHAPE = (4, 2, 16, 32)


@dataclass
class PeerCase:
    """One spelling with its inputs.

    Attributes:
        name: unique id, ``p<N>_<variant>`` after the peer's pattern number where it has one.
        fn: the function (or module) computing it; called as ``fn(*inputs)``.
        inputs: positional arguments (tensors, and a ``training`` bool for dropout spellings).
        attention: True: it is attention (every case of the peer's suite is).
        sites: attention sites in it.
        dynamic: compile with the batch dim marked dynamic (the peer's dynamic-shape variants).
        checkpoint: the body runs under ``torch.utils.checkpoint`` (a higher-order op).
        seeded: the function draws random numbers itself: reseed before each call.
        tol: absolute/relative tolerance against eager (half precision needs more).
        what: one line saying what the spelling exercises.
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple
    attention: bool = True
    sites: int = 1
    dynamic: bool = False
    checkpoint: bool = False
    seeded: bool = False
    tol: float = 1e-5
    what: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def _randn(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g).to(dtype)


def _qkv(name: str, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32) -> tuple:
    return tuple(_randn(f"{name}/{x}", shape, dtype) for x in "qkv")


def _checkpointed(fn: Callable) -> Callable:
    def run(*args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=True)

    run.__doc__ = f"{fn.__doc__.split(':')[0]} under activation checkpointing"
    return run


# --------------------------------------------------------------------------- the spellings
# (q, k, v are [B, H, T, D] unless the function says it transposes them from [B, T, H, D])


def chained_div_sqrt(q, k, v):
    """p1: method chain, divided by sqrt of the key's head dim."""
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


def chained_div_sqrt_weights_returned(q, k, v):
    """The peer's reuse test: the probabilities are returned too (inductor must not fuse)."""
    weights = torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1)
    return weights.matmul(v), weights


def chained_mul_inv_sqrt(q, k, v):
    """p2: multiplied by the inverse square root."""
    return torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


def dropout_div_constant(q, k, v, training):
    """p3: divided by a constant, dropout on the probabilities."""
    p = torch.matmul(q, k.transpose(-2, -1)).div(3.0).softmax(dim=-1)
    return F.dropout(p, p=0.4, training=training, inplace=False).matmul(v)


def dropout_mul_constant(q, k, v, training):
    """p4: multiplied by a constant, dropout on the probabilities."""
    p = torch.matmul(q, k.transpose(-2, -1)).mul(0.4).softmax(dim=-1)
    return F.dropout(p, p=0.2, inplace=False, training=training).matmul(v)


def _bool_triangle_filled(t_q: int, t_k: int) -> torch.Tensor:
    """The peer's bool "mask": a bool triangle whose False entries are filled with -inf — which, in a
    bool tensor, is True. The result is all True, and adding it adds 1.0 to every score."""
    mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=0)
    return mask.masked_fill(torch.logical_not(mask), -float("inf"))


def bool_filled_mask_added(q, k, v):
    """p5 (first form): an all-True bool tensor added to the scores."""
    mask = _bool_triangle_filled(q.size(-2), k.size(-2))
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


def bool_zeros_mask_added(q, k, v):
    """p5 (second form): an all-False bool tensor added to the scores."""
    mask = torch.zeros(q.size(-2), k.size(-2), dtype=torch.bool).bool()
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


def bool_filled_mask_added_dropout(q, k, v, training):
    """p6: p5's bool mask, then dropout."""
    mask = _bool_triangle_filled(q.size(-2), k.size(-2))
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1)
    return F.dropout(p, 0.5, training) @ v


def half_upcast_dropout(q, k, v, training):
    """p7: [B, T, H, D] halves permuted, scores cast to float32, tiny dropout, cast back."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
    p = torch.dropout(torch.softmax(s, dim=-1), 1e-11, training)
    return p.to(torch.float16) @ v


def half_upcast(q, k, v):
    """p8: p7 without dropout."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
    return torch.softmax(s, dim=-1).to(torch.float16) @ v


def half_query_scaled_dropout(q, k, v, training):
    """p9: the query divided by sqrt(D) before the product, upcast, tiny dropout."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    q = q / math.sqrt(q.size(-1))
    p = torch.dropout(torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1), 1e-11, training)
    return p.to(torch.float16) @ v


def half_query_scaled(q, k, v):
    """p10: p9 without dropout."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    q = q / math.sqrt(q.size(-1))
    return torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1).to(torch.float16) @ v


class TensorFactor(torch.nn.Module):
    """The peer's tensor-factor test: scores multiplied or divided by a detached [H, 1, 1] tensor."""

    def __init__(self, divide: bool):
        super().__init__()
        self.divide = divide

    def forward(self, q, k, v, factor):
        factor = factor.detach()
        s = torch.matmul(q, k.transpose(-2, -1))
        s = s.div(factor) if self.divide else s.mul(factor)
        return s.softmax(dim=-1).matmul(v)


def input_mask_added(q, k, v, mask):
    """The peer's unsupported-mask test: a mask from the inputs (an int tensor, or a number) added."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


def transposed_inputs(q, k, v):
    """p11: [B, T, H, D] inputs transposed to heads first."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


def transposed_inputs_output_dropout(q, k, v, training):
    """p12: p11 with dropout on the attention output (not on the probabilities)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)
    return F.dropout(out, p=0.4, training=training, inplace=False)


def cloned_probabilities_div(q, k, v):
    """prev13: the probabilities cloned before the value product."""
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).clone().matmul(v)


def cloned_probabilities_mul(q, k, v):
    """prev14: as prev13, multiplied by the inverse square root."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / math.sqrt(k.shape[-1]))
    return s.softmax(dim=-1).clone().matmul(v)


def cloned_probabilities_transposed(q, k, v):
    """prev15: prev13 on [B, T, H, D] inputs."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).clone().matmul(v)


def bmm_unscaled_dropout(q, k, v, training):
    """p13: 3-D bmm without a scale, dropout on the probabilities."""
    p = F.dropout(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), p=0.5, training=training)
    return torch.bmm(p, v)


def bool_mask_added_permuted(q, k, v):
    """p14: p5's bool mask (built from the sequence sizes of [B, T, H, D] inputs), permuted inputs."""
    mask = _bool_triangle_filled(q.size(1), k.size(1))
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    return (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + mask).softmax(dim=-1).matmul(v)


def _per_batch_key_padding(scores: torch.Tensor, batch: int, t_k: int) -> torch.Tensor:
    """DistilBERT's spelling: a [B, Tk] keep-mask (here a bool triangle cut to B rows), ``== 0``, viewed
    [B, 1, 1, Tk] and expanded to the scores' shape with ``expand_as``."""
    keep = torch.ones(batch, t_k, dtype=torch.bool).tril(diagonal=0)
    return (keep == 0).view((batch, 1, 1, t_k)).expand_as(scores)


def expand_as_padding(q, k, v):
    """p15: a padding mask expanded with ``expand_as(scores)`` — a shape-only use of the scores."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.transpose(-2, -1)) / 3.0
    scores = scores.masked_fill(_per_batch_key_padding(scores, q.size(0), k.size(-2)), -float("inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


def bool_mask_added_permuted_dropout(q, k, v, training):
    """p16: p14 with dropout on the probabilities."""
    mask = _bool_triangle_filled(q.size(1), k.size(1))
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    p = (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + mask).softmax(dim=-1)
    return F.dropout(p, p=0.4, training=training, inplace=False).matmul(v)


def random_float_mask_dropout(q, k, v, training):
    """p16 with a float mask: a random lower-triangular bias drawn inside the function."""
    mask = torch.randn(q.size(1), k.size(1), dtype=torch.float).tril(diagonal=0)
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    p = (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + mask).softmax(dim=-1)
    return F.dropout(p, p=0.4, training=training, inplace=False).matmul(v)


def expand_as_padding_dropout(q, k, v, training):
    """p17: p15 with dropout on the probabilities."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.transpose(-2, -1)) / 3.0
    scores = scores.masked_fill(_per_batch_key_padding(scores, q.size(0), k.size(-2)), -float("inf"))
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1), p=0.4, training=training, inplace=False), v)


def gpt2_where(q, k, v, causal):
    """p18 (GPT-2): full() scale and mask value, where() with a bool causal input, keys returned."""
    q, k, v = (x.permute([0, 2, 1, 3]) for x in (q, k, v))
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full((), math.sqrt(v.size(-1)), dtype=q.dtype))
    s = torch.where(causal, s, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype))
    return F.dropout(s.softmax(dim=-1), 0.0).matmul(v), k.permute([0, 2, 1, 3]), v.permute([0, 2, 1, 3])


def gpt2_where_plus_bias(q, k, v, causal, bias, training):
    """p19: p18's where() and then an additive float mask, softmax cast with type(), dropout."""
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full((), math.sqrt(v.size(-1)), dtype=s.dtype))
    s = torch.where(causal, s, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype))
    p = (s + bias).softmax(dim=-1).type(v.dtype)
    return F.dropout(p, p=0.4, training=training, inplace=False).matmul(v)


def expand_as_padding_query_scaled(q, k, v, training):
    """p20: p17 with the query scaled before the product and the mask built after it."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q = q / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores.masked_fill(_per_batch_key_padding(scores, q.size(0), k.size(-2)), -float("inf"))
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1), p=0.4, training=training, inplace=False), v)


def inplace_bias_upcast(q, k, v, bias):
    """p21: unscaled scores, ``scores += bias`` in place, softmax in float32, cast back."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(v.dtype).matmul(v)


def inplace_bias_upcast_kv_returned(q, k, v, bias):
    """p22: p21 returning the transposed keys and values too."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(v.dtype).matmul(v), k, v


def inplace_zero_bias_kv_returned(q, k, v):
    """p23: p22 with a constant zero bias built by ``full``."""
    bias = torch.full((1, 1, 1, 2), 0.0)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(v.dtype).matmul(v), k, v


def bmm_viewed_for_bias(q, k, v, bias):
    """p24: 3-D bmm scores viewed 4-D to add a bias, viewed back for the softmax."""
    b, h, t, d = q.size(0), q.size(1), q.size(2), q.size(3)
    q3, k3, v3 = q.view(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, d)
    s = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, t, t) + bias
    p = F.softmax(s.view(b * h, t, t), dim=-1)
    return torch.bmm(p, v3).view(b, h, t, d)


def inplace_bias_upcast_dropout(q, k, v, bias, training):
    """p25: p21 in half precision with dropout."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    p = scores.float().softmax(dim=-1).type(v.dtype)
    return F.dropout(p, p=0.1, training=training).matmul(v)


def inplace_bias_upcast_dropout_kv_returned(q, k, v, bias, training):
    """p26: p25 returning the transposed keys and values too."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    p = scores.float().softmax(dim=-1).type(v.dtype)
    return F.dropout(p, p=0.1, training=training).matmul(v), k, v


def inplace_zero_half_bias_dropout(q, k, v, training):
    """p27: p26 with a constant zero half-precision bias built by ``full``."""
    bias = torch.full((1, 1, 1, 2), 0.0, dtype=torch.half)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores += bias
    p = scores.float().softmax(dim=-1).type(v.dtype)
    return F.dropout(p, p=0.1, training=training).matmul(v), k, v


# --------------------------------------------------------------------------- the cases


def cases() -> list[PeerCase]:
    """Every case, built afresh (inputs are drawn from seeds derived from the case names)."""
    half, out = torch.float16, []

    def add(name, fn, *extra, shape=SHAPE, dtype=torch.float32, **kw):
        kw.setdefault("tol", 5e-3 if dtype == half else 1e-5)
        out.append(PeerCase(name, fn, _qkv(name, shape, dtype) + extra, what=(fn.__doc__ or "").split("\n")[0],
                            **kw))

    causal_2 = torch.ones(2, 2, dtype=torch.bool).tril()
    causal_16 = torch.ones(16, 16, dtype=torch.bool).tril()
    add("p1_float", chained_div_sqrt)
    add("p1_half", chained_div_sqrt, dtype=half)
    add("p1_dynamic_batch", chained_div_sqrt, dynamic=True)
    add("p1_checkpointed", _checkpointed(chained_div_sqrt), checkpoint=True)
    add("weights_returned", chained_div_sqrt_weights_returned, shape=(2, 4, 8, 16))
    add("p2", chained_mul_inv_sqrt)
    add("p2_checkpointed", _checkpointed(chained_mul_inv_sqrt), checkpoint=True)
    add("p3_eval", dropout_div_constant, False)
    add("p4_eval", dropout_mul_constant, False)
    add("p5_bool_filled", bool_filled_mask_added)
    add("p5_bool_filled_dynamic", bool_filled_mask_added, dynamic=True)
    add("p5_bool_zeros", bool_zeros_mask_added)
    add("p6_eval", bool_filled_mask_added_dropout, False)
    add("p7_eval_half", half_upcast_dropout, False, shape=(2, 8, 4, 16), dtype=half)
    add("p8_half", half_upcast, shape=(2, 8, 4, 16), dtype=half)
    add("p9_eval_half", half_query_scaled_dropout, False, shape=(2, 8, 4, 16), dtype=half)
    add("p10_half", half_query_scaled, shape=(2, 8, 4, 16), dtype=half)
    add("p10_half_dynamic_batch", half_query_scaled, shape=(2, 8, 4, 16), dtype=half, dynamic=True)
    add("tensor_factor_div", TensorFactor(divide=True).eval(), _randn("factor_div", (4, 1, 1)), shape=(2, 4, 4, 4),
        tol=1e-4)
    add("tensor_factor_mul", TensorFactor(divide=False).eval(), _randn("factor_mul", (4, 1, 1)), shape=(2, 4, 4, 4),
        tol=1e-4)
    add("int_mask_added", input_mask_added, _randn("int_mask", (2, 4, 4, 4)).to(torch.int), shape=(2, 4, 4, 4),
        tol=1e-4)
    add("number_added", input_mask_added, 2.0, shape=(2, 4, 4, 4), tol=1e-4)
    add("p11", transposed_inputs)
    add("p11_dynamic_batch", transposed_inputs, dynamic=True)
    add("p12_eval", transposed_inputs_output_dropout, False)
    add("prev13", cloned_probabilities_div)
    add("prev14", cloned_probabilities_mul)
    add("prev15", cloned_probabilities_transposed)
    add("p13_eval", bmm_unscaled_dropout, False, shape=(4, 8, 16), tol=1e-4)
    add("p13_eval_half", bmm_unscaled_dropout, False, shape=(4, 8, 16), dtype=half, tol=1e-2)
    add("p14_bool_filled", bool_mask_added_permuted)
    add("p15_expand_as", expand_as_padding)
    add("p15_expand_as_dynamic", expand_as_padding, dynamic=True)
    add("p16_eval", bool_mask_added_permuted_dropout, False)
    add("p16_eval_batch1", bool_mask_added_permuted_dropout, False, shape=(1, 2, 16, 32))
    add("p16_float_mask_eval", random_float_mask_dropout, False, seeded=True)
    add("p16_float_mask_eval_batch1", random_float_mask_dropout, False, shape=(1, 2, 16, 32), seeded=True)
    add("p17_eval", expand_as_padding_dropout, False)
    add("p18", gpt2_where, causal_2)
    add("p18_batch1", gpt2_where, causal_2, shape=(1, 2, 16, 32))
    add("p19_eval", gpt2_where_plus_bias, causal_16, _randn("p19_bias", (16, 16)), False)
    add("p20_eval", expand_as_padding_query_scaled, False)
    add("p21", inplace_bias_upcast, _randn("p21_bias", (1, 1, 1, 2)))
    add("p21_batch1", inplace_bias_upcast, _randn("p21_bias1", (1, 1, 1, 2)), shape=(1, 2, 16, 32))
    add("p21_dynamic_batch", inplace_bias_upcast, _randn("p21_biasd", (1, 1, 1, 2)), dynamic=True)
    add("p22", inplace_bias_upcast_kv_returned, _randn("p22_bias", (1, 1, 2, 2)))
    add("p22_batch1", inplace_bias_upcast_kv_returned, _randn("p22_bias1", (1, 1, 2, 2)), shape=(1, 2, 16, 32))
    add("p22_strided_bias", inplace_bias_upcast_kv_returned, _randn("p22_biast", (1, 1, 2, 2)).transpose(2, 3))
    add("p22_strided_bias_batch1", inplace_bias_upcast_kv_returned, _randn("p22_biast1", (1, 1, 2, 2)).transpose(2, 3),
        shape=(1, 2, 16, 32))
    add("p23", inplace_zero_bias_kv_returned)
    add("p23_batch1", inplace_zero_bias_kv_returned, shape=(1, 2, 16, 32))
    add("p24", bmm_viewed_for_bias, _randn("p24_bias", (1, 1, 16, 16)))
    add("p24_dynamic_batch", bmm_viewed_for_bias, _randn("p24_biasd", (1, 1, 16, 16)), dynamic=True)
    add("p25_eval_half", inplace_bias_upcast_dropout, _randn("p25_bias", (1, 1, 1, 2), half), False, dtype=half)
    add("p26_eval_half", inplace_bias_upcast_dropout_kv_returned, _randn("p26_bias", (1, 1, 1, 2), half), False,
        dtype=half)
    add("p27_eval_half", inplace_zero_half_bias_dropout, False, dtype=half)
    names = [c.name for c in out]
    assert len(set(names)) == len(names), "duplicate peer case names"
    return out
