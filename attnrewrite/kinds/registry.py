"""Attention kinds: what a certified site can be rewritten *to*.

A kind says which specs it can honour (and why not), how to emit its operator from the
canonical call, and which options it takes. Kinds are looked up by name (``to="softmax"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from attnrewrite.ir.canonical import AttentionCall
from attnrewrite.ir.spec import AttentionSpec


@dataclass(frozen=True)
class Kind:
    """One attention kind.

    Attributes:
        name: the ``to=`` name.
        emit: ``emit(call, options, state) -> out`` — calls the kind's op on the canonical
            [B, H, T, D] arguments (tensors or FX proxies) and returns [B, Hq, Tq, Dv]. ``state``
            is the site's state module as a callable (see ``make_state``), or None.
        supports: ``supports(spec, options) -> reason | None`` — None when the kind can honour
            the site exactly as specified (mask, causality, dropout, score modification).
        options: option names the kind accepts, with their defaults.
        description: one line for reports and errors.
        weights: how the kind supplies attention weights when a site's probabilities are used
            elsewhere (``output_attentions``): ``"original"`` keeps the site's own computation
            (the exact kind), a callable ``weights(call, options, state) -> [B, Hq, Tq, Tk]``
            computes the kind's own, None means it cannot (such sites are skipped).
        make_state: ``make_state(spec, options) -> nn.Module | None`` — the per-site module of a
            kind with parameters or fixed random draws (learned feature maps, summary queries,
            hash projections) for these options; None when the options need none. States are
            attached to the model by :func:`attnrewrite.convert` before compiling.
        score_mod: True when ``emit`` applies ``call.score_mod`` (an elementwise function of the
            scores, e.g. soft-capping) before its own normalisation.  Sites with a score
            modification are skipped, with that reason, for kinds that do not.
    """

    name: str
    emit: Callable[[AttentionCall, dict[str, Any], Any], Any]
    supports: Callable[[AttentionSpec, dict[str, Any]], str | None]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    weights: Callable[[AttentionCall, dict[str, Any], Any], Any] | str | None = None
    make_state: Callable[[AttentionSpec, dict[str, Any]], Any] | None = None
    score_mod: bool = False


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (replacing one of the same name)."""
    _KINDS[kind.name] = kind
    return kind


#: Modules that define further kinds; imported on first lookup (no import-time cost otherwise).
_KIND_MODULES = ("attnrewrite.kinds.softmax", "attnrewrite.kinds.sigmoid", "attnrewrite.kinds.linear",
                 "attnrewrite.kinds.summary", "attnrewrite.kinds.hashed")


def _load_all() -> None:
    import importlib

    for module in _KIND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def get(name: str) -> Kind:
    """The kind called ``name``; a clear error lists the known kinds otherwise."""
    if name not in _KINDS:
        _load_all()
    if name not in _KINDS:
        raise ValueError(f"unknown attention kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    _load_all()
    return sorted(_KINDS)
