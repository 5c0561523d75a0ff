"""Shared rewrite checks for the tests: compile a model rewritten, compare it with the original."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

import attnrewrite
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.report import Report
from attnrewrite.testing.zoo import first_tensor


def compile_rewritten(model: Callable, report: Report | None = None, dynamic: bool | None = None,
                      **options: Any) -> Callable:
    """``torch.compile`` with the attnrewrite backend; the pass's reports are merged into ``report``.
    ``dynamic`` goes to ``torch.compile``; ``options`` to the pass (compiler ``"eager"`` by default)."""
    options.setdefault("compiler", "eager")
    sink = report.merge if report is not None else None
    return torch.compile(model, backend=functools.partial(attnrewrite_backend, options=options, _report_sink=sink),
                         dynamic=dynamic)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, floor: float = 0.0) -> None:
    """max|got - want| <= rtol · max(max|want|, floor)."""
    got, want = got.detach(), want.detach()
    scale = max(float(want.abs().max()), floor)
    assert scale > 0, f"{what}: comparing on zeros proves nothing"
    err = float((got - want).abs().max()) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def check_rewrite(model: torch.nn.Module, inputs: dict[str, Any], expected_sites: int, rtol: float = 1e-5,
                  output: Callable[[Any], torch.Tensor] = first_tensor, **options: Any) -> Report:
    """Every attention site of ``model`` is rewritten, and outputs and parameter gradients match."""
    report = Report(to=options.get("to", "softmax"))
    compiled = compile_rewritten(model, report, **options)
    params = [p for p in model.parameters() if p.requires_grad]

    want = output(model(**inputs))
    # a loss with random weights: sum(out²) is constant after a LayerNorm, its gradient zero
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
    want_grads = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    got = output(compiled(**inputs))
    got_grads = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)

    sites = report.attention_sites()
    assert len(sites) == expected_sites, f"expected {expected_sites} attention sites, found:\n{report}"
    assert all(s.status == "rewritten" for s in sites), f"not every site was rewritten:\n{report}"
    assert_close_rel(got, want, rtol, "output")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert_gradients_close(names, got_grads, want_grads, rtol)
    return report


def assert_gradients_close(names: list[str], got_grads, want_grads, rtol: float) -> None:
    """Gradients by name against the oracle's.

    Some gradients are exactly zero in exact arithmetic (a key bias: softmax ignores a shift of a
    whole score row) and hold only rounding noise; each gradient's error is measured against its own
    scale, but never against less than 1e-2 of the largest gradient.  A gradient the oracle does not
    have (None) must be absent or zero after the rewrite too.
    """
    floor = 1e-2 * max(float(w.abs().max()) for w in want_grads if w is not None)
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any(), f"{name} gets a gradient only after the rewrite"
            continue
        assert_close_rel(g, w, rtol, f"gradient of {name}", floor)


def record_sigmoid_calls(monkeypatch) -> list[dict[str, Any]]:
    """The arguments of every run-time call of the sigmoid op, as a rewritten graph passes them (its keyword
    arguments, ``q``, ``k``, ``attn_mask``, and ``args``: the positional ones after the mask, ``dropout_p`` first),
    appended as they come; the rewriter's shape propagation
    (fake tensors) is left out.  ``monkeypatch`` (pytest's) restores the op after the test."""
    import attnrewrite.kernels.sigmoid.public as sigmoid_public
    from torch._subclasses.fake_tensor import FakeTensor

    calls: list[dict[str, Any]] = []
    dispatch = sigmoid_public.sigmoid_attention_dispatch

    def recording(q, k, v, attn_mask=None, *args, **kwargs):
        if not isinstance(q, FakeTensor):
            calls.append(dict(kwargs, attn_mask=attn_mask, q=q, k=k, args=args))
        return dispatch(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(sigmoid_public, "sigmoid_attention_dispatch", recording)
    return calls


def record_kernel_launches(monkeypatch) -> list[tuple[str, str | None, bool]]:
    """(kernel name, score modification program text or None, whether the launched kernel is a generated
    specialisation) of every Triton kernel launch that takes a score modification (sigmoid, sliding window,
    summary and hashed attention: their launchers ask :func:`attnrewrite.kernels.triton_scaffold.mod_kernel`
    for the kernel as they launch it), appended as they come.  ``monkeypatch`` restores it after the test."""
    from attnrewrite.kernels import triton_score_mods

    launches: list[tuple[str, str | None, bool]] = []
    kernel_for = triton_score_mods.kernel_for

    def recording(kernel, program):
        launched = kernel_for(kernel, program)
        launches.append((kernel.fn.__name__, None if program is None else program.text(), launched is not kernel))
        return launched

    monkeypatch.setattr(triton_score_mods, "kernel_for", recording)
    return launches


def assert_launched_with_mod(launches: list[tuple[str, str | None, bool]], kernels: set[str], program: str,
                             generated: bool) -> None:
    """What :func:`record_kernel_launches` recorded: exactly the kernels named ``kernels`` ran (each at least
    once, no other), every launch took the score modification ``program`` (its text), and every launched
    kernel is a generated specialisation exactly when ``generated`` (a program of several nonlinear steps
    is generated into the kernels; a single step runs in the generic kernels)."""
    names = {name for name, _, _ in launches}
    assert names == set(kernels), f"launched {sorted(names)}, expected {sorted(kernels)}"
    wrong = [launch for launch in launches if launch[1] != program or launch[2] != generated]
    assert not wrong, f"launches without program {program!r} or not generated={generated}: {wrong}"


__all__ = ["attnrewrite", "check_rewrite", "compile_rewritten", "first_tensor", "assert_close_rel",
           "assert_gradients_close", "assert_launched_with_mod", "record_kernel_launches", "record_sigmoid_calls"]


def assert_same_function(got: torch.Tensor, want: torch.Tensor, leaves: dict[str, torch.Tensor],
                         atol: float = 1e-12, nonzero_grads: bool = True) -> None:
    """An op against its float64 reference: the outputs, and the gradient of each leaf by name (through
    a random weighting of the output), agree to ``atol``.  The output may not be trivially zero, nor
    (``nonzero_grads``) any gradient — pass False where some case makes one exactly zero (a window of
    one key: the softmax is constant)."""
    assert want.abs().max() > 0.1, "comparing on (near) zeros proves nothing"
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=want.dtype)
    got_grads = torch.autograd.grad((got * weights).sum(), list(leaves.values()))
    want_grads = torch.autograd.grad((want * weights).sum(), list(leaves.values()))
    for name, g, w in zip(leaves, got_grads, want_grads):
        assert not nonzero_grads or w.abs().max() > 0, f"the gradient of {name} is zero: it proves nothing"
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=f"gradient of {name}")
