"""Options of the pass: ``torch.compile(..., backend="attnrewrite", options={...})``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from attnrewrite import kinds

COMPILERS = ("inductor", "eager", "aot_eager")
#: ``torch.compile``'s modes, which choose inductor's settings (``torch._inductor.list_mode_options``).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The pass's own options; every other name is the kind's (see ``attnrewrite.kinds``).
PASS_OPTIONS = ("to", "strict", "compiler", "mode")


@dataclass(frozen=True)
class RewriteOptions:
    """Validated options.

    Attributes:
        to: the attention kind to rewrite to (default ``"softmax"``, the exact kind).
        strict: raise instead of warning when the pass fails or an attention site cannot be
            rewritten (default False: such sites stay as they were, and the report says why).
        compiler: what runs the graph after the rewrite: ``"inductor"`` (default), ``"eager"``
            (the rewritten FX graph, no code generation; fastest to start) or ``"aot_eager"``
            (AOTAutograd with eager kernels: the training graph without code generation).
        mode: ``torch.compile``'s mode for inductor (``"max-autotune"`` …), or None. ``torch.compile(...,
            backend="attnrewrite", mode=...)`` passes it to the backend; since ``torch.compile`` takes
            ``mode`` or ``options`` but not both, it can also be given as an option.
        kind_options: the kind's own options (e.g. ``feature_map`` for ``linear``).
    """

    to: str = "softmax"
    strict: bool = False
    compiler: str = "inductor"
    mode: str | None = None
    kind_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> RewriteOptions:
        """Validate a user's options dict: every name known, every value of the right type and range.

        Raises:
            ValueError: an unknown kind or option name, or a value outside what the option accepts
                (the message names the option, the value and the accepted values).
            TypeError: a value of the wrong type.
        """
        options = dict(options or {})
        to = options.pop("to", "softmax")
        if not isinstance(to, str):
            raise TypeError(f"option 'to' must be a kind name (str), got {type(to).__name__}")
        kind = kinds.get(to)
        strict = options.pop("strict", False)
        if not isinstance(strict, bool):
            raise TypeError(f"option 'strict' must be a bool, got {strict!r}")
        compiler = options.pop("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ValueError(f"option 'compiler' must be one of {COMPILERS}; got {compiler!r}")
        mode = options.pop("mode", None)
        if mode is not None and mode not in MODES:
            raise ValueError(f"option 'mode' must be one of {MODES}; got {mode!r}")
        if mode not in (None, "default") and compiler != "inductor":
            raise ValueError(f"option 'mode' ({mode!r}) chooses inductor's settings; it cannot go with "
                             f"compiler={compiler!r}")
        kind_options = kind.check_options(options, passes=PASS_OPTIONS)
        return cls(to=to, strict=strict, compiler=compiler, mode=None if mode == "default" else mode,
                   kind_options=kind_options)
