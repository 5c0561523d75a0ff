"""Shared checks for the sigmoid kernel tests: run a case through a path, through the float64
oracle and through plain torch at the same precision, and compare every output by name."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import pytest
import torch

from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch
from attnrewrite.kernels.sigmoid.reference import naive_sigmoid_attention
from attnrewrite.testing.numerics import assert_within_budget


@dataclass
class Case:
    """One call: sizes and options of ``sigmoid_attention_dispatch``; tensors are drawn fresh by ``inputs``."""

    batch: int = 2
    heads_q: int = 2
    heads_kv: int = 2
    len_q: int = 40
    len_k: int = 40
    dim: int = 32
    dim_v: int | None = None
    causal: bool = False
    causal_align: str = "top_left"
    kv_lens: list[int] | None = None
    cu_q: list[int] | None = None
    cu_k: list[int] | None = None
    mask: str | None = None  # None, "alibi", "t5" (float, requires grad), "neginf", "keypad", "bool"
    bias: str | float = "auto"
    options: dict = field(default_factory=dict)

    def inputs(self, dtype: torch.dtype, generator: torch.Generator) -> dict:
        """Fresh random inputs in ``dtype`` (a float mask is cast by ``run``)."""
        dim_v = self.dim_v or self.dim
        if self.cu_q is not None:
            batch, len_q, len_k = 1, self.cu_q[-1], self.cu_k[-1]
        else:
            batch, len_q, len_k = self.batch, self.len_q, self.len_k

        def rnd(*shape):
            return torch.randn(*shape, generator=generator).to(dtype)

        x = dict(q=rnd(batch, self.heads_q, len_q, self.dim), k=rnd(batch, self.heads_kv, len_k, self.dim),
                 v=rnd(batch, self.heads_kv, len_k, dim_v), grad=rnd(batch, self.heads_q, len_q, dim_v))
        kwargs = dict(is_causal=self.causal, causal_align=self.causal_align, bias=self.bias,
                      enable_gqa=self.heads_q != self.heads_kv, **self.options)
        if self.kv_lens is not None:
            kwargs["kv_lens"] = torch.tensor(self.kv_lens)
        if self.cu_q is not None:
            kwargs["cu_seqlens_q"] = torch.tensor(self.cu_q, dtype=torch.int32)
            kwargs["cu_seqlens_k"] = torch.tensor(self.cu_k, dtype=torch.int32)
        if self.mask is not None:
            kwargs["attn_mask"] = self._mask(batch, len_q, len_k, generator)
        x["kwargs"] = kwargs
        return x

    def _mask(self, batch, len_q, len_k, generator):
        heads = self.heads_q
        if self.mask == "alibi":  # [Hq, Tq, Tk] slopes times distance, no grad
            slopes = torch.tensor([2.0 ** -(h + 1) for h in range(heads)]).view(heads, 1, 1)
            distance = (torch.arange(len_k).view(1, -1) - torch.arange(len_q).view(-1, 1)).abs()
            return -slopes * distance
        if self.mask == "t5":  # learned [1, Hq, Tq, Tk] bias
            return (0.5 * torch.randn(1, heads, len_q, len_k, generator=generator)).requires_grad_()
        if self.mask == "neginf":  # float [B, 1, Tq, Tk] with some -inf entries and one fully masked row
            m = 0.3 * torch.randn(batch, 1, len_q, len_k, generator=generator)
            m = m.masked_fill(torch.rand(batch, 1, len_q, len_k, generator=generator) < 0.3, float("-inf"))
            m[:, :, 1] = float("-inf")
            return m.requires_grad_()
        if self.mask == "keypad":  # bool [B, 1, 1, Tk]: the last keys of each batch are padding
            valid = torch.arange(len_k).view(1, -1) < torch.tensor([len_k - 7 * (b + 1) for b in range(batch)]).view(-1, 1)
            return valid.view(batch, 1, 1, len_k)
        if self.mask == "bool":  # bool [B, Hq, Tq, Tk] random, with one query row that sees nothing
            m = torch.rand(batch, heads, len_q, len_k, generator=generator) < 0.7
            m[:, :, 2] = False
            return m
        raise ValueError(self.mask)


def run(x: dict, dtype: torch.dtype, fn) -> dict[str, torch.Tensor]:
    """Call ``fn(q, k, v, **kwargs)`` on copies of ``x`` cast to ``dtype``; return out and every gradient."""
    leaves = {name: x[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v")}
    kwargs = dict(x["kwargs"])
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.detach().to(dtype).requires_grad_(mask.requires_grad)
        kwargs["attn_mask"] = mask
    out = fn(leaves["q"], leaves["k"], leaves["v"], **kwargs)
    out.backward(x["grad"].to(dtype))
    result = {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}
    if mask is not None and mask.dtype != torch.bool and mask.requires_grad:
        result["dmask"] = mask.grad
    return result


def reference(q, k, v, **kwargs):
    kwargs.pop("enable_gqa", None)
    kwargs.pop("impl", None)
    return naive_sigmoid_attention(q, k, v, kwargs.pop("attn_mask", None), kwargs.pop("is_causal", False),
                                   kwargs.pop("scale", None), **kwargs)


def check_against_reference(case: Case, dtype: torch.dtype, impl: str, seed: int = 0) -> dict[str, float]:
    """Assert every output of ``impl`` at ``dtype`` keeps the rule of :mod:`attnrewrite.testing.numerics`
    against the float64 oracle (plain torch: the oracle at ``dtype``); return the errors."""
    generator = torch.Generator().manual_seed(seed)
    x = case.inputs(dtype, generator)
    exact = run(x, torch.float64, reference)
    plain = run(x, dtype, reference)
    got = run(x, dtype, lambda q, k, v, **kw: sigmoid_attention_dispatch(q, k, v, impl=impl, **kw))
    assert set(got) == set(exact), f"outputs {sorted(got)} vs reference {sorted(exact)}"
    errors = {}
    for name, ref in exact.items():
        assert ref.abs().max() > 0, f"{name}: the reference is all zeros; the case proves nothing"
        assert got[name].shape == ref.shape, f"{name}: shape {tuple(got[name].shape)} vs {tuple(ref.shape)}"
        assert got[name].dtype == plain[name].dtype, f"{name}: dtype {got[name].dtype} vs {plain[name].dtype}"
        errors[name] = assert_within_budget(got[name], plain[name], ref, dtype, f"{impl} {name}")
    return errors


def seeded(name: str) -> torch.Generator:
    """A generator seeded from ``name``: each test draws its own inputs, whatever ran before it."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def masked_inputs(name: str, heads_q: int = 4, heads_kv: int = 2, len_q: int = 9, len_k: int = 11,
                  dim: int = 8) -> tuple[torch.Generator, list[torch.Tensor]]:
    """(the generator, [q, k, v, mask]) in float64, batch 2, GQA by default, a float mask with key 3 hidden from
    every query (its gradient must stay 0); draw a test's further inputs from the generator."""
    g = seeded(name)
    q = torch.randn(2, heads_q, len_q, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, heads_kv, len_k, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, heads_kv, len_k, dim, generator=g, dtype=torch.float64)
    mask = torch.randn(2, 1, len_q, len_k, generator=g, dtype=torch.float64)
    mask[..., 3] = -math.inf
    return g, [q, k, v, mask]


#: b of the by-name kernel tests (score modifications, position and relative biases)
BIAS = -1.5
#: a soft-cap as a program and in plain torch
SOFTCAP = ("div 5.0; tanh; mul 5.0", lambda s: torch.tanh(s / 5.0) * 5.0)


def plain_sigmoid(q, k, v, scale, causal, mask=None, added=None, mod=None):
    """sigmoid(mod(scale·q·kᵀ) + mask + added + b)·v over the visible keys (``causal``: j ≤ i), b = :data:`BIAS`,
    written in plain torch (the oracle of the by-name kernel tests, in float64); k and v repeated for GQA.
    ``added``: a position or relative bias written out, [1, Hq, Tq, Tk]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)
    s = s if mod is None else mod(s)
    z = s + (0.0 if mask is None else mask) + (0.0 if added is None else added) + BIAS
    p = torch.sigmoid(z)
    if causal:
        p = p.masked_fill(torch.ones_like(p, dtype=torch.bool).triu(1), 0.0)
    return p @ v


def require_interpreter() -> None:
    """Skip the test unless the Triton kernels can run here (on the CPU: under TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from attnrewrite.kernels.sigmoid import op

    if not op.interpreter_active():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
