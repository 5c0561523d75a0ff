"""How attnrewrite says that the kind asked for is not what runs.

A rewrite that silently does not happen is as bad as a wrong one.  Every such case goes through
:func:`not_rewritten`: with ``strict=True`` it raises :class:`RewriteFailed` naming the site and
the cause; otherwise it warns with :class:`RewriteWarning` — a Python warning of our own category,
once per cause in a process, so ``warnings.simplefilter("error", attnrewrite.RewriteWarning)``
turns every case into an exception and ``"ignore"`` silences them.  The report of the pass
(:func:`attnrewrite.explain`) lists every site with its reason either way.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass


def _passed_through_by_dynamo() -> type[RuntimeError]:
    """The base class that Dynamo re-raises as it is from a backend (it wraps any other exception
    in ``BackendCompilerFailed``, which ``except attnrewrite.RewriteFailed`` would not catch)."""
    from torch._dynamo import exc

    base = getattr(exc, "ShortenTraceback", None)
    return base if isinstance(base, type) and issubclass(base, RuntimeError) else RuntimeError


class RewriteFailed(_passed_through_by_dynamo()):
    """Raised with ``strict=True`` when attention is left as it was: a site could not be
    rewritten, the pass failed, or a frame fell back to the original code.

    A ``RuntimeError``; raised from inside ``torch.compile`` it reaches the caller as itself, not
    wrapped in Dynamo's ``BackendCompilerFailed``.  ``failures`` lists each case as a
    :class:`Failure` (site module and cause).
    """

    def __init__(self, message: str, failures: list[Failure] | None = None):
        try:
            super().__init__(message, first_useful_frame=None)
        except TypeError:  # a plain RuntimeError base
            super().__init__(message)
        self.failures = list(failures or [])


class RewriteWarning(UserWarning):
    """Attention that the pass was asked to rewrite still runs as it was (see the message for why)."""


@dataclass(frozen=True)
class Failure:
    """One case of attention left as it was: the owning module (``""`` for the root) and why."""

    module: str
    cause: str

    def __str__(self) -> str:
        return f"{self.module or '<root>'}: {self.cause}"


_WARNED: set[str] = set()
_LOCK = threading.Lock()


def not_rewritten(failures: list[Failure], what: str, strict: bool, stacklevel: int = 3) -> None:
    """Say that ``failures`` were left as they were: raise under ``strict``, else warn once per cause.

    ``what`` says what happened, without counts (e.g. ``"attention not rewritten to linear"``): with
    the cause it is the key of "once per cause".
    """
    if not failures:
        return
    if strict:
        raise RewriteFailed(f"attnrewrite: {what} at {len(failures)} site(s): " + "; ".join(map(str, failures)),
                            failures)
    by_cause: dict[str, list[str]] = {}
    for failure in failures:
        by_cause.setdefault(failure.cause, []).append(failure.module or "<root>")
    for cause, modules in by_cause.items():
        key = f"{what}|{cause}"
        with _LOCK:
            if key in _WARNED:
                continue
            _WARNED.add(key)
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        warnings.warn(f"attnrewrite: {what} at {len(modules)} site(s) ({shown}): {cause}. Such sites run as "
                      "before; attnrewrite.explain() lists every site, strict=True raises instead.",
                      RewriteWarning, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which causes were warned about (each warns again once); for tests and notebooks."""
    with _LOCK:
        _WARNED.clear()


def recompile_limit_reached(strict: bool) -> None:
    """Called by the backend for every graph: when Dynamo compiles a frame for the last time its
    ``recompile_limit`` allows (the compile id's per-frame count says which time this is), say that
    further versions of this frame — new shapes, other guards (another model instance, a module
    holding other states) — will run its original code uncompiled, attention included.  Raises
    :class:`RewriteFailed` under ``strict`` (the frame would otherwise fall back later, unseen);
    otherwise warns once per frame.  Silent outside Dynamo."""
    import torch._dynamo
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    count = None if compile_id is None else compile_id.frame_compile_id
    limit = torch._dynamo.config.recompile_limit
    if count is None or count + 1 != limit:
        return
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code = InstructionTranslator.current_tx().f_code
        frame = f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"
    except Exception:  # noqa: BLE001 — the compile id alone still says which frame
        frame = f"frame {compile_id.frame_id}"
    cause = (f"{frame} is compiled for the {limit}th time, torch._dynamo.config.recompile_limit: Dynamo runs "
             "further versions of it (new shapes or other guards, e.g. another instance or a module holding other "
             "states) uncompiled, with their original attention. Raise the limit, mark the varying sizes dynamic, "
             "or compile the whole model once")
    if strict:
        raise RewriteFailed(f"attnrewrite: {cause}", [Failure("", cause)])
    with _LOCK:
        if cause in _WARNED:
            return
        _WARNED.add(cause)
    warnings.warn(f"attnrewrite: {cause}.", RewriteWarning, stacklevel=3)
