"""Learned hashes (``hash="learned"``) on the hashed Triton path (under ``TRITON_INTERPRET=1`` on the CPU):
codes and selected sets equal to the torch path's / the reference's, and the output and every gradient by
name — q, k, v and the two projections' straight-through gradients — within the rule of
attnrewrite.testing.numerics against the torch path in float64 (``impl="torch"``, itself checked against an
independent construction of the estimate in test_hashed_op.py) and in float32.

Inputs are drawn in float64 and rounded to float32, so the float32 and float64 runs hash the same values and
select the same keys.  Shapes are tiny: the interpreter runs one program at a time."""

import zlib

import pytest
import torch

from attnrewrite import ops
from attnrewrite.kernels.hashed import public
from attnrewrite.kernels.hashed.codes import pack
from attnrewrite.kernels.hashed.reference import naive_hashed_attention
from attnrewrite.testing.numerics import assert_within_budget

triton_ops = pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")
from attnrewrite.kernels.hashed.triton_codes import pack_codes  # noqa: E402
from attnrewrite.kernels.hashed.triton_select import select_keys  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_ops.interpreter_active(), reason="the kernels run on the CPU only under "
                                "TRITON_INTERPRET=1")

SOFTCAP = "div 2.0; tanh; mul 2.0"
# name: (hq, hkv, t, causal, mask, extra options)
CASES = {
    # GQA (one selection per group of 2), causal: the group's soft query codes share the keys' atomics
    "gqa_causal": (4, 2, 12, True, "none", dict(bits=16, top_k=3, window=2, sinks=1)),
    # a float mask with a bias and a score modification: the estimate reads dS before the modification's
    # derivative (as the torch path does), the attention after it
    "additive_softcap": (2, 2, 10, False, "additive", dict(bits=8, top_k=3, window=1, sinks=1, score_mod=SOFTCAP)),
    # padding and far keys rounded through bfloat16, 24 bits (a code that is not a power of two of bytes)
    "padding_far": (2, 1, 12, True, "padding", dict(bits=24, top_k=3, window=2, sinks=1, far_dtype="bfloat16")),
}


def _inputs(name, hq, hkv, t, bits, d=8, dv=6):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().double()  # noqa: E731
    q, k, v = make(1, hq, t, d), make(1, hkv, t, d), make(1, hkv, t, dv)
    planes = make(d, bits)  # the learned projections start from one draw and move apart per head
    proj_q, proj_k = planes + 0.3 * make(hq, d, bits), planes + 0.3 * make(hkv, d, bits)
    return q, k, v, proj_q, proj_k, make(1, hq, t, dv)


def _mask(kind, t):
    g = torch.Generator().manual_seed(11)
    if kind == "none":
        return None
    if kind == "padding":
        keep = torch.ones(1, 1, 1, t, dtype=torch.bool)
        keep[..., :2] = False
        return keep
    keep = torch.rand(1, 1, t, t, generator=g) > 0.3
    return (0.5 * torch.randn(1, 1, t, t, generator=g, dtype=torch.float64)).masked_fill(~keep, float("-inf"))


def _run(impl, dtype, tensors, mask, causal, options):
    q, k, v, pq, pk, weights = tensors
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, pq, pk)]
    out = ops.hashed_attention(*leaves[:3], None if mask is None else mask.to(dtype if mask.is_floating_point()
                                                                                else torch.bool),
                               is_causal=causal, enable_gqa=True, hash="learned", projections=tuple(leaves[3:]),
                               impl=impl, **options)
    return [out, *torch.autograd.grad((out * weights.to(dtype)).sum(), leaves)]


@pytest.mark.parametrize("name", list(CASES))
def test_learned_hashes_on_the_kernels_match_the_torch_path(name):
    hq, hkv, t, causal, mask_kind, options = CASES[name]
    tensors = _inputs(name, hq, hkv, t, options["bits"])
    mask = _mask(mask_kind, t)
    got = _run("triton", torch.float32, tensors, mask, causal, options)
    plain = _run("torch", torch.float32, tensors, mask, causal, options)
    exact = _run("torch", torch.float64, tensors, mask, causal, options)
    for what, g, pl, ex in zip(["out", "dq", "dk", "dv", "d_q_projection", "d_k_projection"], got, plain, exact):
        assert ex.abs().max() > 1e-3, what
        assert g.dtype == torch.float32, what
        assert_within_budget(g, pl, exact=ex, dtype=torch.float32, what=f"{name}: {what}")


def test_learned_codes_and_selection_equal_the_torch_path_and_the_reference():
    q, k, v, pq, pk, _ = _inputs("selection", 4, 2, 14, 16)
    q, k = q.float(), k.float()
    q_codes, k_codes = pack_codes(q, pq), pack_codes(k, pk)
    assert torch.equal(q_codes, pack(q, pq)) and torch.equal(k_codes, pack(k, pk))
    index = select_keys(q_codes, k_codes, None, True, 3, 2, 1)
    got = [[[sorted(j for j in row if j >= 0) for row in head] for head in batch] for batch in index.tolist()]
    _, chosen = naive_hashed_attention(q.double(), k.double(), v, None, True, top_k=3, window=2, sinks=1,
                                       proj_q=pq, proj_k=pk)
    assert got == chosen
    # the per-head projections matter: one shared draw selects other keys somewhere
    shared = select_keys(pack_codes(q, pq[0]), pack_codes(k, pq[0]), None, True, 3, 2, 1)
    assert not torch.equal(shared.sort(-1).values, index.sort(-1).values)


def test_triton_runs_the_kernels_and_frozen_projections_get_no_gradient(monkeypatch):
    """``impl="triton"`` with learned hashes runs the kernels, never the torch path; projections that do not
    require a gradient (inference, frozen codes) give none and cost no estimate."""
    from attnrewrite.kernels.hashed import op

    q, k, v, pq, pk, _ = _inputs("frozen", 2, 2, 8, 8)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    monkeypatch.setattr(op, "hashed_attention_forward", lambda *a, **kw: pytest.fail("ran the torch path"))
    soft = []
    real = triton_ops.attend_backward
    monkeypatch.setattr(triton_ops, "attend_backward",
                        lambda *a, **kw: soft.append(kw.get("soft") is not None) or real(*a, **kw))
    out = ops.hashed_attention(q, k, v, is_causal=True, bits=8, top_k=2, window=2, sinks=1, hash="learned",
                               projections=(pq.float(), pk.float()), impl="triton")
    out.sum().backward()
    assert soft == [False] and q.grad.abs().max() > 0
    assert public._path("triton", q, v, "learned") == "triton"
    assert public._path("auto", q, v, "learned") == "torch"  # the CPU


def test_what_stays_refused_with_learned_hashes():
    q, k, v, pq, pk, _ = _inputs("refused", 2, 2, 8, 8)
    q, k, v = q.float(), k.float(), v.float()
    kw = dict(bits=8, hash="learned", projections=(pq.float(), pk.float()), impl="triton")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ops.hashed_attention(q, k, v, far_dtype="float8_e4m3fn", **kw)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got torch.float64"):
        ops.hashed_attention(q.double(), k.double(), v.double(), **dict(kw, projections=(pq, pk)))
    with pytest.raises(ValueError, match=r"projections must be \[Hq, D, bits\]"):
        ops.hashed_attention(q, k, v, **dict(kw, projections=(pq[:1].float(), pk.float())))
