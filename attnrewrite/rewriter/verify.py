"""``attnrewrite.verify``: prove at run time which attention actually executed.

The report of the pass says what happened to each graph it saw.  What it cannot see is code that
never reached it: frames Dynamo ran eagerly (past its recompile limit, skipped or disabled code),
and the eager bytecode between the graphs of a frame with a graph break.  ``verify`` runs the
model once more under the PyTorch profiler and accounts for every softmax and SDPA call that
executed outside attnrewrite's own ops:

- outside any compiled region: attention (or a softmax) that ran eagerly, with the line of
  model code that ran it;
- inside a compiled region: the sites that graph's report lists as attention left as it was,
  and the parts of an attention split by a graph break (a softmax over scores that are a graph
  input, or whose probabilities leave the graph, next to a value product or a q·kᵀ product).

Every such case is a failure: ``verify`` raises :class:`RewriteFailed` listing them (or returns
them, with ``raise_on_failure=False``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from attnrewrite.rewriter.backend import GRAPH_RANGE
from attnrewrite.rewriter.failures import Failure, RewriteFailed
from attnrewrite.rewriter.report import Report, graph_report

#: Forward ops that compute attention, or the softmax of one (the outermost such event counts once).
ATTENTION_OPS = frozenset({
    "aten::softmax", "aten::_softmax", "aten::_safe_softmax", "aten::special_softmax",
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
})
_REGION = "Torch-Compiled Region: "
_OURS = "attnrewrite::"
#: Ops the autograd engine runs: the backward, and the forward code activation checkpointing recomputes in it
#: (outside the compiled region and its graph's range), which replays the forward already accounted for.
_BACKWARD = "autograd::engine::evaluate_function"


@dataclass
class Verification:
    """What ran: ``failures`` lists every attention left as it was; ``regions`` the compiled regions
    (Dynamo compile ids) that executed; ``report`` the pass's reports of those regions."""

    failures: list[Failure] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    report: Report = field(default_factory=Report)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        head = (f"attnrewrite.verify: {len(self.report.rewritten)} site(s) rewritten in "
                f"{len(self.regions)} compiled region(s); ")
        if self.ok:
            return head + "no other attention ran"
        return head + f"{len(self.failures)} attention or softmax call(s) not rewritten:\n" + "\n".join(
            f"  {f}" for f in self.failures)


def verify(model: Callable, *args: Any, to: str | None = None, options: dict[str, Any] | None = None,
           raise_on_failure: bool = True, **kwargs: Any) -> Verification:
    """Run ``model(*args, **kwargs)`` (and a backward when its output needs gradients) and account for
    every attention that executed outside attnrewrite's ops.

    Args:
        model: a module or function. When ``to`` is given it is compiled here with the attnrewrite
            backend (``options`` for the pass, e.g. ``{"compiler": "inductor"}``; default compiler
            ``"eager"``); otherwise it must already be compiled with it (``torch.compile`` or
            :func:`attnrewrite.rewrite`), and is verified as the user runs it.
        args, kwargs: the model's inputs.
        raise_on_failure: raise :class:`RewriteFailed` listing the failures (default) or return them.

    Returns:
        A :class:`Verification`. The model runs twice: once to compile (not accounted: compiling
        evaluates attention itself), once under the profiler; gradients it leaves are restored.
        What the autograd engine runs is not accounted: activation checkpointing's recomputation
        replays the forward (outside the compiled regions), whose every call was accounted already.
    """
    if to is not None:
        from attnrewrite.rewriter.backend import attnrewrite_backend
        from attnrewrite.rewriter.options import RewriteOptions

        full = {"compiler": "eager", **(options or {}), "to": to}
        RewriteOptions.parse(full)
        model = torch.compile(model, backend=functools.partial(attnrewrite_backend, options=full))
    elif options:
        raise ValueError("verify: options= goes with to=; a model compiled already keeps its own options")
    saved = _saved_grads(model)
    try:
        _run(model, args, kwargs)  # compiles (the pass evaluates attention eagerly while certifying)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True,
                                    experimental_config=_python_stacks()) as prof:
            _run(model, args, kwargs)
    finally:
        _restore_grads(saved)
    result = _account(prof.events())
    if raise_on_failure and result.failures:
        raise RewriteFailed(str(result), result.failures)
    return result


def _python_stacks() -> Any:
    """Profiler setting that records the Python stack of each op (to name the line that ran it)."""
    try:
        return torch._C._profiler._ExperimentalConfig(verbose=True)
    except (AttributeError, TypeError):  # another torch: ops are then named without their line
        return None


def _run(model: Callable, args: tuple, kwargs: dict) -> None:
    out = model(*args, **kwargs)
    tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors and torch.is_grad_enabled():
        torch.autograd.backward([t.float().sum() for t in tensors])


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict) or hasattr(value, "to_tuple"):  # HF ModelOutput is a dict
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _saved_grads(model: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    module = model if isinstance(model, nn.Module) else getattr(model, "_orig_mod", None)
    if not isinstance(module, nn.Module):
        return []
    return [(p, None if p.grad is None else p.grad.clone()) for p in module.parameters()]


def _restore_grads(saved: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for param, grad in saved:
        param.grad = grad


def _account(events: list[Any]) -> Verification:
    result = Verification()
    graphs: dict[int, Report] = {}  # the report of each graph that ran, by its serial, in order
    for event in events:
        if event.name.startswith(_REGION):
            region = event.name[len(_REGION):]
            if region not in result.regions:
                result.regions.append(region)
        elif event.name.startswith(GRAPH_RANGE):
            serial = int(event.name[len(GRAPH_RANGE):].split(" ", 1)[0])
            if serial not in graphs:
                report = graph_report(serial)
                if report is None:  # cannot be while the graph runs: its range holds the report
                    raise RuntimeError(f"verify: no report for {event.name!r}")
                graphs[serial] = report
    for event in events:
        if event.name not in ATTENTION_OPS or _has_ancestor(event, lambda e: e.name in ATTENTION_OPS
                                                              or e.name.startswith((_OURS, _BACKWARD))
                                                              or _compiling(e)):
            continue
        if not _has_ancestor(event, lambda e: e.name.startswith(_REGION)):
            result.failures.append(Failure(_where(event), f"{event.name} ran eagerly, outside any compiled "
                                           "graph (a frame Dynamo did not compile: recompile limit, skipped or "
                                           "disabled code, a graph break inside a loop; a softmax there may or may "
                                           "not be attention)"))
        elif not _has_ancestor(event, lambda e: e.name.startswith(GRAPH_RANGE)):
            result.failures.append(Failure(_where(event), f"{event.name} ran eagerly inside a compiled frame, in "
                                           "none of its graphs (code between graph breaks, a function Dynamo "
                                           "skips or that is disabled; a softmax there may or may not be "
                                           "attention)"))
    for report in graphs.values():
        result.report.merge(copy.deepcopy(report))  # merge renumbers the sites' graphs in place
        graph = ", ".join(report.compile_ids)
        for site in report.sites:
            if site.attention_left_as_it_was:
                said = "attention not rewritten: " if site.spec is not None else ""
                result.failures.append(Failure(site.module, f"{said}{site.reason} (graph {graph})"))
    return result


def _compiling(event: Any) -> bool:
    """A range of Dynamo's compilation: what runs inside it (the pass certifying a site evaluates the
    original attention) is not the model running."""
    return event.name.endswith("(dynamo_timed)") or event.name == "entire_frame_compile"


def checked_call(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` under the profiler, with :func:`verify`'s accounting of the forward it
    runs (compilation excluded): raises :class:`RewriteFailed` listing every softmax or SDPA call that
    ran outside attnrewrite's ops.  What ``strict=True`` runs on the first call of
    :func:`attnrewrite.rewrite`'s modules.  Without Python stacks (recorded across a compilation they
    come back corrupt in torch 2.13): a failure names the op, not the model line — ``verify`` does."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args, **kwargs)
    result = _account(prof.events())
    if result.failures:
        raise RewriteFailed("strict=True, first call: " + str(result), result.failures)
    return out


def _has_ancestor(event: Any, test: Callable[[Any], bool]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if test(parent):
            return True
        parent = parent.cpu_parent
    return False


def _where(event: Any) -> str:
    """The innermost line of user code on the event's Python stack (torch's own frames skipped)."""
    for frame in getattr(event, "stack", None) or []:
        if not frame.startswith("<built-in") and "/torch/" not in frame and "attnrewrite/rewriter" not in frame:
            return frame
    return event.name
