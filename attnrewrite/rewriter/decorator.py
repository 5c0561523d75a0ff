"""One-line use without writing ``torch.compile``: ``@attnrewrite.rewrite(to=...)`` and ``explain``."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.report import Report


def _compile_kwargs(to: str, options: dict[str, Any]) -> dict[str, Any]:
    dynamic = options.pop("dynamic", None)
    full = {"to": to, **options}
    RewriteOptions.parse(full)  # fail now, with a clear message, rather than at the first call
    return {"backend": functools.partial(attnrewrite_backend, options=full), "dynamic": dynamic}


def _compile(module: nn.Module, kwargs: dict[str, Any], strict: bool) -> None:
    """``module.compile(**kwargs)``; with ``strict`` its first call runs under
    :func:`~attnrewrite.rewriter.verify.checked_call` (verify's accounting of the forward).  A forward pre-hook
    says when another compile traces the module instead (:func:`_said_when_traced_by_another_compile`)."""
    module.compile(**kwargs)
    options = kwargs["backend"].keywords["options"]
    module._attnrewrite_rewritten = (type(module).__qualname__, tuple(sorted(options.items())))
    if not any(hook is _said_when_traced_by_another_compile for hook in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_said_when_traced_by_another_compile, prepend=True)
    dynamo_call = module._compiled_call_impl

    def compiled(*args: Any, **kw: Any) -> Any:
        # Under a torch.func transform (vmap, grad, jacrev …) Dynamo refuses every frame and marks its code
        # skipped for the rest of the process (torch 2.13): nn.Module._call_impl, so every module compiled later
        # would run eagerly too.  Run the module's own call instead, which its pre-hook reports.
        if torch._C._are_functorch_transforms_active():
            return module._call_impl(*args, **kw)
        return dynamo_call(*args, **kw)

    module._compiled_call_impl = compiled
    if not strict:
        return

    def first_call(*args: Any, **kw: Any) -> Any:
        module._compiled_call_impl = compiled  # checked once, even when it raises
        from attnrewrite.rewriter.verify import checked_call

        return checked_call(compiled, args, kw)

    module._compiled_call_impl = first_call


def _said_when_traced_by_another_compile(module: nn.Module, args: Any) -> None:
    """A forward pre-hook of every module ``rewrite`` compiles.  When Dynamo traces it, it says whether the compile
    tracing the module is the module's own rewrite: Dynamo ignores a module's own compile inside another compiled
    region (``torch.compile(model)`` around a rewritten block), whose backend then compiles the module's attention,
    unrewritten or rewritten otherwise.  Compiled, the hook leaves no trace in the graph, so when it *runs* the call
    is running the module's original code: that is said too (:func:`_said_when_run_uncompiled`)."""
    if torch.compiler.is_compiling():
        _check_tracing_compile(*module._attnrewrite_rewritten)
    else:
        _said_when_run_uncompiled(*module._attnrewrite_rewritten)


def _said_when_run_uncompiled(owner: str, options: tuple) -> None:
    """Warn (raise under ``strict``) that a call of ``owner`` (rewritten with ``options``) runs its original
    attention: Dynamo did not compile it."""
    from attnrewrite.rewriter.failures import Failure, not_rewritten

    wanted = RewriteOptions.parse(dict(options))
    if torch._C._are_functorch_transforms_active():
        why = ("it is called inside a torch.func transform (vmap, grad, jacrev …), under which torch.compile runs "
               "no compiled code, and attnrewrite does not rewrite attention traced under one either")
    else:
        why = ("Dynamo did not compile this call: torch.compiler.disable or set_stance('force_eager') around it, its "
               "frame past torch._dynamo.config.recompile_limit or skipped after an earlier failure (a compiled "
               "function called inside a torch.func transform marks its code skipped for the process), or a copy "
               "of a module rewritten in place (nn.Module.compile does not travel with copies)")
    cause = f"{owner} is rewritten to {wanted.to} by attnrewrite.rewrite, but this call ran its original attention: {why}"
    not_rewritten([Failure(owner, cause)], f"attention not rewritten to {wanted.to}", wanted.strict, stacklevel=4)


@torch._dynamo.assume_constant_result  # called while Dynamo traces, not put into the graph
def _check_tracing_compile(owner: str, options: tuple) -> int:
    """Warn (raise under ``strict``) when the compile that is tracing ``owner`` (a class rewritten with
    ``options``) is not an attnrewrite compile rewriting as ``options`` do; 0 (Dynamo keeps the result)."""
    from attnrewrite.rewriter.failures import Failure, not_rewritten

    wanted = RewriteOptions.parse(dict(options))
    backend, tracing = _tracing_compile()
    if tracing is not None and (tracing.to, tracing.kind_options) == (wanted.to, wanted.kind_options):
        return 0
    runs = "its original attention" if tracing is None else f"attention as that compile rewrites it (to={tracing.to})"
    cause = (f"{owner} is rewritten to {wanted.to} by attnrewrite.rewrite, but traced as part of an enclosing "
             f"torch.compile or torch.export ({backend}), which ignores the module's own compile: it runs {runs}. "
             f"Compile the whole model with backend=\"attnrewrite\" and the module's options, or leave the enclosing "
             "code uncompiled")
    not_rewritten([Failure(owner, cause)], f"attention not rewritten to {wanted.to}",
                  wanted.strict, stacklevel=2)
    return 0


def _tracing_compile() -> tuple[str, RewriteOptions | None]:
    """The backend of the compile Dynamo is tracing in (its name) and, when it is attnrewrite's, its options."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        backend = InstructionTranslator.current_tx().output.compiler_fn
    except Exception:  # noqa: BLE001 — no Dynamo trace: another tracer (torch.export's non-strict mode …)
        return "traced without Dynamo", None
    backend, options = _unwrapped(backend)
    name = getattr(backend, "__name__", None) or type(backend).__name__
    if backend is not attnrewrite_backend:
        return f"backend {getattr(backend, 'compiler_name', name)!r}", None
    try:
        return "backend 'attnrewrite'", RewriteOptions.parse(options)
    except (TypeError, ValueError):
        return "backend 'attnrewrite'", None


def _unwrapped(backend: Any) -> tuple[Any, dict | None]:
    """The compiler function inside Dynamo's wrappers of a backend, and the ``options`` they carry: the
    wrapper ``torch.compile`` puts around a backend (``_torchdynamo_orig_backend``, ``compiler_fn`` and its
    ``kwargs``), ``functools.partial``, and DDP's optimizer (``DDPOptimizer.compile_fn``, a bound method
    whose ``backend_compile_fn`` compiles each bucket's subgraph)."""
    options: dict | None = None
    for _ in range(8):  # a few layers at most; never loop on a self-referencing wrapper
        inner = getattr(backend, "_torchdynamo_orig_backend", backend)
        inner_options = dict(getattr(inner, "kwargs", None) or {}).get("options")
        if inner_options:
            options = {**(options or {}), **inner_options}
        inner = getattr(inner, "compiler_fn", inner)
        if isinstance(inner, functools.partial):
            options = {**(options or {}), **(inner.keywords.get("options") or {})}
            inner = inner.func
        inner = getattr(getattr(inner, "__self__", None), "backend_compile_fn", inner)
        if inner is backend:
            break
        backend = inner
    return backend, options


def rewrite(target: Any = None, *, to: str = "softmax", **options: Any) -> Any:
    """Make a module (or every instance of a module class) run with its attention rewritten.

    Three forms::

        model = attnrewrite.rewrite(model, to="softmax")        # an instance, compiled in place

        @attnrewrite.rewrite(to="softmax", compiler="eager")     # a class: instances compile
        class Block(nn.Module): ...                              # themselves when built

        @attnrewrite.rewrite                                     # the same with defaults
        class Block(nn.Module): ...

    ``options`` are the backend's (``strict``, ``compiler``, the kind's own) plus ``dynamic``
    (passed to ``torch.compile``). Parameters and ``state_dict`` are unchanged: the module is
    compiled with ``nn.Module.compile``, not wrapped.  With ``strict=True`` the module's first call
    (its forward) also runs :func:`attnrewrite.verify`'s accounting and raises ``RewriteFailed``
    when any softmax or SDPA ran outside attnrewrite's ops (an eager fallback, a skipped frame).

    Copies: instances of a decorated class stay rewritten through ``copy.deepcopy`` and pickling
    (``torch.save``/``torch.load``); a copy of an *instance* rewritten in place runs its original
    attention (``nn.Module.compile`` does not travel with copies), with a ``RewriteWarning`` at its
    calls — rewrite the copy too.  Any call Dynamo does not compile (a ``torch.func`` transform, a
    stance, a frame past the recompile limit) is said the same way.
    """
    if target is None:
        return lambda t: rewrite(t, to=to, **options)
    kwargs = _compile_kwargs(to, dict(options))
    strict = bool(options.get("strict", False))
    if isinstance(target, nn.Module):
        _compile(target, kwargs, strict)
        return target
    if isinstance(target, type) and issubclass(target, nn.Module):
        original_init = target.__init__

        @functools.wraps(original_init)
        def __init__(self, *args, **kw):
            original_init(self, *args, **kw)
            if type(self) is target:  # subclasses compile once, after their own __init__
                _compile(self, kwargs, strict)

        original_setstate = target.__setstate__

        @functools.wraps(original_setstate)
        def __setstate__(self, state):  # copy.deepcopy and pickle rebuild without __init__: compile here too
            original_setstate(self, state)
            if type(self) is target:
                _compile(self, kwargs, strict)

        target.__init__ = __init__
        target.__setstate__ = __setstate__
        return target
    raise TypeError(f"rewrite() takes an nn.Module instance or class, got {type(target).__name__}")


def explain(model: Any, *args: Any, to: str = "softmax", **kwargs: Any) -> Report:
    """Compile ``model`` with the attnrewrite backend, run it once on ``args``/``kwargs``, and
    return the :class:`Report` of every attention site found or rejected, with reasons.

    The graph after the rewrite runs eagerly (no code generation), and ``torch._dynamo`` is
    reset first — as ``torch._dynamo.explain`` does — so every graph is captured afresh.
    ``options`` for the pass may be given as ``options={...}``.
    """
    options = dict(kwargs.pop("options", None) or {})
    options.setdefault("compiler", "eager")
    report = Report(to=to)
    backend = functools.partial(attnrewrite_backend, options={"to": to, **options}, _report_sink=report.merge)
    RewriteOptions.parse({"to": to, **options})
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report
