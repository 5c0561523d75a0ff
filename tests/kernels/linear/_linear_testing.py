"""Shared numerics for the linear-attention tests.

Every candidate is compared with the fp64 recurrent oracle, output, final state and every
gradient by name, by the rule of :mod:`attnrewrite.testing.numerics`: plain torch is the quadratic
form computed in the candidate's dtype, with autograd, and the rounding band is the one for an fp32
running sum over T terms (``rounding_band(dtype, expected, length=T)``), as the kernels' running
states sum (plain torch sums them blockwise).  Inputs are fresh random draws; nothing is compared
on zeros.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnrewrite.kernels.linear.reference import naive_quadratic_linear_attn, naive_recurrent_linear_attn
from attnrewrite.testing.numerics import assert_within_budget, rounding_band

GRAD_NAMES = ("q", "k", "v", "initial_S", "initial_z")


def make_qkv(batch=2, heads_q=2, heads_kv=1, tq=80, tk=None, dk=32, dv=16, dtype=torch.float32, positive=False):
    """Random q [B, Hq, Tq, Dk], k [B, Hkv, Tk, Dk], v [B, Hkv, Tk, Dv]; ``positive`` for the identity map
    (its normaliser needs positive features)."""
    tk = tq if tk is None else tk
    q, k = torch.randn(batch, heads_q, tq, dk), torch.randn(batch, heads_kv, tk, dk)
    v = torch.randn(batch, heads_kv, tk, dv)
    if positive:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_state(num_seqs, heads_kv, dk, dv):
    """A plausible prefix state: S of either sign, z positive (it is a sum of positive features)."""
    return torch.randn(num_seqs, heads_kv, dk, dv) * 4.0, torch.rand(num_seqs, heads_kv, dk) * 8.0 + 1.0


def _leaves(q, k, v, state, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    if state is not None:
        state = tuple(t.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
                      for t in state)
        leaves += list(state)
    return leaves, state


def _grads(out, S, z, leaves, upstream):
    d_out, d_S, d_z = upstream
    loss = (out.double() * d_out).sum() + (S.double() * d_S).sum() + (z.double() * d_z).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def results(fn: Callable, q, k, v, state, dtype, upstream) -> dict[str, torch.Tensor]:
    """Run ``fn(q, k, v, state) -> (out, S, z)`` with inputs in ``dtype``; outputs and gradients by name."""
    leaves, state = _leaves(q, k, v, state, dtype)
    out, S, z = fn(*leaves[:3], state)
    named = {"out": out.detach(), "final_S": S.detach(), "final_z": z.detach()}
    grads = _grads(out, S, z, leaves, upstream)
    named.update({f"d{name}": g for name, g in zip(GRAD_NAMES, grads) if g is not None})
    return named


def compare(candidate: Callable, q, k, v, *, dtype, causal, feature_map="elu", scale=1.0, eps=1e-6,
            key_mask=None, state=None) -> dict[str, float]:
    """Check ``candidate(q, k, v, state) -> (out, S, z)`` in ``dtype`` against the fp64 recurrent oracle.

    Returns each checked name's max error (for messages); raises AssertionError naming the first
    output or gradient beyond its bound.
    """
    opts = dict(causal=causal, feature_map=feature_map, scale=scale, eps=eps, key_mask=key_mask)

    def oracle(q_, k_, v_, st):
        return naive_recurrent_linear_attn(q_, k_, v_, initial_state=st, **opts)

    def plain(q_, k_, v_, st):
        st = None if st is None else tuple(t.to(dtype) for t in st)
        return naive_quadratic_linear_attn(q_, k_, v_, initial_state=st, compute_dtype=dtype, **opts)

    ref_out, ref_S, ref_z = oracle(q.double(), k.double(), v.double(),
                                   None if state is None else tuple(t.double() for t in state))
    upstream = (torch.randn_like(ref_out), torch.randn_like(ref_S), torch.randn_like(ref_z))
    ref = results(oracle, q, k, v, state, torch.float64, upstream)
    base = results(plain, q, k, v, state, dtype, upstream)
    got = results(candidate, q, k, v, state, dtype, upstream)
    errors = {}
    for name, expected in ref.items():
        assert name in got, f"{name}: the candidate produced no {name}"
        assert expected.abs().max() > 0, f"{name}: the reference is all zeros; the check would prove nothing"
        actual = got[name]
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"
        errors[name] = assert_within_budget(actual, base[name], expected, dtype, name,
                                            band=rounding_band(dtype, expected, length=k.shape[2]))
    return errors
