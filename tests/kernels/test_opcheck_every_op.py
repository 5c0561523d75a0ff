"""``torch.library.opcheck`` on EVERY operator of the ``attnrewrite`` namespace, with contiguous,
transposed and expanded q/k/v.

The inner operators are not called by hand: each kind's public op (and the dispatchers' other paths)
runs forward and backward under a dispatch mode that records every ``attnrewrite`` call with the
tensors it really got (strides included), and each recorded call is then opchecked.  A fake
implementation whose output strides differ from the real op's (what breaks inductor's backward on
transposed inputs) fails ``test_faketensor``.  The list of operators is read from the namespace, so a
new operator that no path here reaches fails :func:`test_every_op_is_reached`.

The CUDA forms (``triton_op``s) share implementation and schema with their ``_interpreted`` twins,
which run here on the CPU; on a GPU the CUDA forms are recorded and checked as well.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnrewrite.kernels.linear.op  # noqa: F401  (registers the Triton path's ops)
import attnrewrite.kernels.hashed.triton_ops  # noqa: F401
import attnrewrite.kernels.sigmoid.op  # noqa: F401
from attnrewrite import kinds, ops
from attnrewrite.kernels.linear import linear_attention_dispatch, linear_attention_decode
from attnrewrite.kernels.sigmoid.api import sigmoid_attention_dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, HKV, T, D = 1, 2, 1, 8, 8
SOFTCAP = "div 2.0; tanh; mul 2.0"


def _layout(name: str, heads: int, t: int = T, d: int = D) -> torch.Tensor:
    """A [B, heads, t, d] tensor laid out as named: contiguous, transposed ([B, t, H, d] viewed as
    [B, H, t, d], as a projection's output), or expanded along the heads (stride 0, as a repeated kv)."""
    g = torch.Generator().manual_seed(t * 31 + heads)
    if name == "contiguous":
        x = torch.randn(B, heads, t, d, generator=g)
    elif name == "transposed":
        x = torch.randn(B, t, heads, d, generator=g).transpose(1, 2)
    else:
        x = torch.randn(B, 1, t, d, generator=g).expand(B, heads, t, d)
    return x.to(DEVICE)


def namespace_ops() -> set[str]:
    return {n for n in dir(torch.ops.attnrewrite) if not n.startswith("_") and n != "name"
            and isinstance(getattr(torch.ops.attnrewrite, n), torch._ops.OpOverloadPacket)}


def _cuda_forms() -> set[str]:
    names = namespace_ops()
    return {n for n in names if n + "_interpreted" in names}


def _differentiable(name: str) -> bool:
    opdef = torch._library.custom_ops.OPDEFS.get(f"attnrewrite::{name}")
    backward = None if opdef is None else opdef._backward_fn
    return backward is not None and not getattr(backward, "refuses", False)  # (_ops.refuse_derivative)


class _Recorder(TorchDispatchMode):
    """Records each call of an ``attnrewrite`` operator that reaches the dispatcher's Python key
    (the opaque ones; composite ops decompose before it and are checked directly)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[tuple]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "attnrewrite":
            self.calls.setdefault(func._opname, []).append((func, args, kwargs))
        return func(*args, **kwargs)


def _run_paths(layout: str) -> None:
    """Forward and backward of every path of every kind on q, k, v laid out as ``layout``."""
    q = _layout(layout, H).requires_grad_()
    k, v = _layout(layout, HKV).requires_grad_(), _layout(layout, HKV).requires_grad_()
    outs = [
        sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="torch"),
        sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="triton"),
        linear_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="triton"),
        linear_attention_dispatch(q, k, v, is_causal=False, enable_gqa=True, impl="triton"),
        ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1),
        ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1, impl="triton"),
        ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=0, is_causal=False,
                              summary="learned", summary_query=torch.randn(HKV, D, device=DEVICE), impl="triton"),
        ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2, sinks=1),
        ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2, sinks=1,
                             impl="triton"),
        # packed sequences on the summary kernels; learned hashes on the hashed kernels (the projections' gradient)
        ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1, impl="triton",
                              cu_seqlens=torch.tensor([0, 3, T], device=DEVICE)),
        ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2, sinks=1,
                             hash="learned", impl="triton",
                             projections=(torch.randn(H, D, 8, device=DEVICE, requires_grad=True),
                                          torch.randn(HKV, D, 8, device=DEVICE, requires_grad=True))),
        ops.sliding_window_attention(q, k, v, enable_gqa=True, window=3, sinks=1, impl="triton"),
        # a relative bias table R on the sliding-window kernels (the backward op's dR output)
        ops.sliding_window_attention(q, k, v, enable_gqa=True, window=3, sinks=1, impl="triton", position="relative",
                                     position_slopes=torch.randn(H, 2 * T - 1, device=DEVICE, requires_grad=True)),
        # the blockwise path as one opaque op, what symbolic lengths take (called by hand: eager calls have int
        # lengths; tests/kernels/sliding_window/test_sliding_window_compiled.py reaches it through torch.compile)
        torch.ops.attnrewrite.sliding_window_blockwise(q, k, v, None, True, None, 3, 1, SOFTCAP, None, None),
        torch.ops.attnrewrite.sliding_window_blockwise(
            q, k, v, None, False, None, 3, 1, None, torch.randn(H, 2 * T - 1, device=DEVICE, requires_grad=True),
            "relative"),
        # with dropout: the mask drawn from the seed, again in the backward
        torch.ops.attnrewrite.sliding_window_blockwise(q, k, v, None, True, None, 3, 1, None, None, None, 0.25,
                                                       torch.tensor(7)),
        # the ops' score-modification argument (soft-capping), on each path that applies one
        sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="torch", score_mod=SOFTCAP),
        sigmoid_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="triton", score_mod=SOFTCAP),
        ops.summary_attention(q, k, v, enable_gqa=True, chunk_size=2, window_chunks=1, score_mod=SOFTCAP),
        ops.hashed_attention(q, k, v, is_causal=True, enable_gqa=True, bits=8, top_k=2, window=2, sinks=1,
                             score_mod=SOFTCAP),
    ]
    torch.autograd.grad(sum(o.float().sum() for o in outs), (q, k, v))
    # a float mask that needs a gradient (the backward ops' mask-gradient output)
    bias = torch.randn(1, 1, T, T, device=DEVICE, requires_grad=True)
    for impl in ("torch", "triton"):
        out = sigmoid_attention_dispatch(q, k, v, bias, enable_gqa=True, impl=impl)
        torch.autograd.grad(out.sum(), (q, bias))
    with torch.no_grad():
        _, state = linear_attention_dispatch(q, k, v, is_causal=True, enable_gqa=True, impl="triton",
                                             output_final_state=True)
        step = _layout(layout, H, t=1), _layout(layout, HKV, t=1), _layout(layout, HKV, t=1)
        linear_attention_decode(*step, state, impl="triton")


@functools.lru_cache(maxsize=None)
def _recorded(layout: str) -> dict[str, list[tuple]]:
    recorder = _Recorder()
    with recorder:
        _run_paths(layout)
    return recorder.calls


def _as_leaf(x, grad: bool):
    """The recorded tensor, same strides and storage, detached (and a leaf needing grad for the
    differentiable ops, so that opcheck tests their autograd registration)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.requires_grad_() if grad and x.is_floating_point() else x
    return x


LAYOUTS = ("contiguous", "transposed", "expanded")

#: Each kind's public op (``<kind>_attention``, read from the kind registry, so a new kind needs no edit
#: here) with the options its tests use on short sequences (``Kind.example_options``).
PUBLIC = {f"{name}_attention": dict(kinds.get(name).example_options) for name in kinds.names()}
#: ... and the exact kind's form with learned sink logits (gpt-oss), one per query head
PUBLIC["sink_softmax_attention"] = {"sink_logits": torch.randn(H, generator=torch.Generator().manual_seed(2),
                                                               device=DEVICE)}


def _checked_ops() -> list[str]:
    skip = set() if DEVICE == "cuda" else _cuda_forms()
    return sorted(namespace_ops() - skip)


def test_every_op_is_reached():
    """Each operator of the namespace (less the CUDA forms without a GPU) is recorded or is a public
    op checked directly, in every layout: nothing in the namespace escapes the opcheck below."""
    public = set(PUBLIC)
    for layout in LAYOUTS:
        missing = set(_checked_ops()) - set(_recorded(layout)) - public
        assert not missing, f"{layout}: no test path reaches {sorted(missing)}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", _checked_ops())
def test_opcheck(name, layout):
    calls = _recorded(layout).get(name)
    if calls is None:  # a public op: composite ones decompose before the recorder sees them
        q, k, v = _layout(layout, H), _layout(layout, HKV), _layout(layout, HKV)
        kwargs = {"enable_gqa": True, **PUBLIC[name]}  # is_causal: the op's own default
        calls = [(getattr(torch.ops.attnrewrite, name).default, (q.requires_grad_(), k.requires_grad_(),
                                                                 v.requires_grad_()), kwargs)]
    grad = _differentiable(name) or name.endswith("_attention")
    seen = set()
    for op, args, kwargs in calls:
        # one check per distinct signature (sizes, strides, non-tensor arguments) keeps the test fast
        key = tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
                    for a in args)
        if key in seen:
            continue
        seen.add(key)
        args = tuple(_as_leaf(a, grad) for a in args)
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.slow
def test_inductor_trains_sigmoid_on_transposed_inputs():
    """The issue's case: inductor plans the backward from the fake strides, so a fake that copied a
    transposed q's strides made it fail (AssertionError on strides) where the real op ran."""
    q, k, v = (torch.randn(2, 16, 4, 8, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    compiled = torch.compile(lambda q, k, v: ops.sigmoid_attention(q, k, v, is_causal=True).sum())
    compiled(q, k, v).backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ops.sigmoid_attention(q, k, v, is_causal=True).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)
