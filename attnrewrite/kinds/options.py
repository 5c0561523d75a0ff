"""A kind's options, declared once with their types and ranges, checked when they are given.

Each kind lists its options as :class:`Option` values (``options={"bits": integer(64, minimum=8,
multiple_of=8), ...}``).  :func:`check_options` runs wherever a user hands options to attnrewrite —
``torch.compile(..., options=...)``, ``@attnrewrite.rewrite(...)``, ``attnrewrite.rewrite(model, ...)``,
``convert()`` and ``explain()`` — so that a bad value fails at once with a message naming the option,
the value and what is accepted, instead of surfacing later as a site that silently stays softmax.

A value of the wrong type raises ``TypeError``; a value of the right type outside the accepted
range or set raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Option:
    """One option: its default, what it accepts (in words, for errors and docs), and its check.

    ``check(value)`` returns None when ``value`` is accepted, else ``(exception type, why)``.
    """

    default: Any
    accepts: str
    check: Callable[[Any], tuple[type[Exception], str] | None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(default: str, values: tuple[str, ...]) -> Option:
    """A name from ``values``."""
    accepts = "one of " + ", ".join(repr(v) for v in values)

    def check(value):
        if not isinstance(value, str):
            return TypeError, f"a {type(value).__name__}, not a name"
        return None if value in values else (ValueError, "not a known name")

    return Option(default, accepts, check)


def integer(default: int | None, minimum: int, multiple_of: int = 1, optional: bool = False) -> Option:
    """An int (not a bool) ≥ ``minimum`` and a multiple of ``multiple_of``; None too when ``optional``."""
    accepts = f"an int >= {minimum}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
    accepts += " or None" if optional else ""

    def check(value):
        if value is None and optional:
            return None
        if not _is_int(value):
            return TypeError, f"a {type(value).__name__}"
        if value < minimum or value % multiple_of:
            return ValueError, "out of range"
        return None

    return Option(default, accepts, check)


def positive_number(default: float) -> Option:
    """A finite int or float > 0."""

    def check(value):
        if not _is_number(value):
            return TypeError, f"a {type(value).__name__}"
        return None if math.isfinite(value) and value > 0 else (ValueError, "out of range")

    return Option(default, "a finite number > 0", check)


def flag(default: bool) -> Option:
    """True or False (not a truthy stand-in such as ``"no"`` or 1)."""

    def check(value):
        return None if isinstance(value, bool) else (TypeError, f"a {type(value).__name__}")

    return Option(default, "True or False", check)


def auto_or_number(default: str | float = "auto") -> Option:
    """``"auto"`` or a finite number."""

    def check(value):
        if isinstance(value, str):
            return None if value == "auto" else (ValueError, "the only accepted name is 'auto'")
        if not _is_number(value):
            return TypeError, f"a {type(value).__name__}"
        return None if math.isfinite(value) else (ValueError, "not finite")

    return Option(default, "'auto' or a finite number", check)


#: the paths of a kind whose public op has Triton kernels (its ``impl`` argument)
IMPLS = ("auto", "triton", "torch")


def impl_choice(default: str = "auto") -> Option:
    """Which path a rewritten site's op runs, passed to the op as ``impl``: ``"auto"`` (the Triton kernels
    on CUDA for 16-bit inputs, the torch path otherwise), ``"triton"`` (the kernels or an error naming
    why, never a silent fallback; on the CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``."""
    accepts = "one of " + ", ".join(repr(v) for v in IMPLS) + " (the op's impl=)"

    def check(value):
        if not isinstance(value, str):
            return TypeError, f"a {type(value).__name__}, not a name"
        return None if value in IMPLS else (ValueError, "not a path")

    return Option(default, accepts, check)


def check_options(kind: str, declared: Mapping[str, Option], given: Mapping[str, Any],
                  passes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The kind's full options (defaults, then ``given``), each value checked.

    ``passes`` names options that are not the kind's own but are valid in the same mapping
    (the pass's ``to``, ``strict`` ...): they are listed when an unknown name is reported.

    Raises:
        ValueError: an option name the kind does not take, or a value outside its range.
        TypeError: a value of the wrong type.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = sorted({*passes, *declared})
        raise ValueError(f"unknown option(s) {unknown} for kind {kind!r}; valid options: {valid}")
    for name, value in given.items():
        option = declared[name]
        problem = option.check(value)
        if problem is not None:
            error, why = problem
            raise error(f"option {name!r} of kind {kind!r} must be {option.accepts}; got {value!r} ({why})")
    return {**{name: option.default for name, option in declared.items()}, **given}
