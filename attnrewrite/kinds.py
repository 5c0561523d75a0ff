"""Attention kinds: what a certified site can be rewritten *to*.

A kind says which specs it can honour (and why not), how to emit its operator from the
canonical call, and which options it takes. Kinds are looked up by name (``to="softmax"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from attnrewrite.rewriter.canonical import AttentionCall
from attnrewrite.rewriter.spec import AttentionSpec


@dataclass(frozen=True)
class Kind:
    """One attention kind.

    Attributes:
        name: the ``to=`` name.
        emit: ``emit(call, options) -> out`` — calls the kind's op on the canonical
            [B, H, T, D] arguments (tensors or FX proxies) and returns [B, Hq, Tq, Dv].
        supports: ``supports(spec, options) -> reason | None`` — None when the kind can honour
            the site exactly as specified (mask, causality, dropout, returned weights).
        options: option names the kind accepts, with their defaults.
        description: one line for reports and errors.
        score_mod: True when ``emit`` applies ``call.score_mod`` (an elementwise function of the
            scores, e.g. soft-capping) before its own normalisation.  Sites with a score
            modification are skipped, with that reason, for kinds that do not.
    """

    name: str
    emit: Callable[[AttentionCall, dict[str, Any]], Any]
    supports: Callable[[AttentionSpec, dict[str, Any]], str | None]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    score_mod: bool = False


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (replacing one of the same name)."""
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The kind called ``name``; a clear error lists the known kinds otherwise."""
    if name not in _KINDS:
        raise ValueError(f"unknown attention kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    return sorted(_KINDS)


# --------------------------------------------------------------------------- softmax (exact)


def _emit_softmax(call: AttentionCall, options: dict[str, Any]):
    # the softmax_attention op; the canonical math written out when the site has a score_mod
    from attnrewrite.rewriter.score_mod import exact_attention

    return exact_attention(call)


register(Kind(
    name="softmax",
    emit=_emit_softmax,
    supports=lambda spec, options: None,  # the exact kind honours every certified site
    description="exact softmax attention (F.scaled_dot_product_attention semantics)",
    score_mod=True,
))
