"""A site's score modification as a program of elementwise steps, for the kinds that cannot replay a graph.

The exact kind replays a :class:`~attnrewrite.ir.spec.ScoreMod` from the graph's own nodes
(:func:`attnrewrite.ir.canonical.bind_score_mod`).  The other kinds run custom ops, which cannot take
a Python callable; they take the modification as a short text instead, in the step language of
:mod:`attnrewrite.kernels.score_mods` (``"div 30.0; tanh; mul 30.0"`` for Gemma-2's soft-capping).
:func:`score_program` reads that text off the recomputed nodes; a modification that reads anything
besides the scores and constants (a tensor, a symbolic number) or uses an op outside the step
language has no program, and the reason says why.

ALiBi, relative-position and T5 biases are not score modifications here: the matcher carries an
addition to the scores as a mask term (``MaskTerm(kind="add")``), which every kind with scores
already receives as its float ``attn_mask``.
"""

from __future__ import annotations

import math

import torch.fx as fx

from attnrewrite.ir.capture import constant_value, normalize
from attnrewrite.ir.spec import ScoreMod

_UNARY = {"neg", "tanh", "sigmoid", "exp", "abs", "relu", "erf", "square"}
_METHOD_CLAMPS = {"clamp_min": "min", "clamp_max": "max"}


class NoProgram(Exception):
    """The modification cannot be written as a program; the message says why."""


def score_program(mod: ScoreMod | None) -> tuple[str | None, str | None]:
    """(program, None) for a modification the step language expresses, (None, reason) otherwise;
    (None, None) without a modification."""
    if mod is None:
        return None, None
    try:
        return _program(mod), None
    except NoProgram as why:
        return None, f"its score modification {mod.describe()} {why}"


def _program(mod: ScoreMod) -> str:
    scores = {mod.source} | {node for node, _ in mod.chain}
    steps: list[str] = []
    for node, recompute in mod.chain:
        if recompute:
            steps.extend(_steps(node, scores))
    return "; ".join(steps)


def _number(value, what: str) -> float:
    c = constant_value(value)
    if c is None:
        name = value.name if isinstance(value, fx.Node) else repr(value)
        raise NoProgram(f"reads {name} ({what}), not a constant number")
    if not math.isfinite(c):
        raise NoProgram(f"uses a constant that is not finite ({c})")
    return c


def _steps(node: fx.Node, scores: set[fx.Node]) -> list[str]:
    """The steps of one recomputed node, whose score argument is a node of ``scores``."""
    call = normalize(node)
    if call is None:
        raise NoProgram(f"uses {node.target}, which no kind applies")
    name, args, kwargs = call.name, call.args, call.kwargs
    is_score = [isinstance(a, fx.Node) and a in scores for a in args]
    if not args or not is_score[0] and not (len(args) > 1 and is_score[1]):
        raise NoProgram(f"reads the scores in {node.name} in a way no kind applies")
    if name in ("mul", "div", "add", "sub"):
        a, b = args[0], args[1]
        if is_score[0] and is_score[1]:  # (the matcher refuses these sites today: two score branches)
            raise NoProgram(f"combines the scores with themselves in {node.name} ({name})")
        alpha = _number(kwargs.get("alpha", 1), "add's alpha") if name in ("add", "sub") else 1.0
        if name == "mul":
            return [f"mul {_number(b if is_score[0] else a, 'a factor')!r}"]
        if name == "div":
            return [f"div {_number(b, 'a divisor')!r}"] if is_score[0] else [f"rdiv {_number(a, 'a dividend')!r}"]
        sign = -1.0 if name == "sub" else 1.0
        if is_score[0]:  # x ± alpha·c
            return [f"add {sign * alpha * _number(b, 'an addend')!r}"]
        return [f"mul {sign * alpha!r}", f"add {_number(a, 'an addend')!r}"]  # c ± alpha·x
    if any(is_score[1:]):
        raise NoProgram(f"reads the scores as an argument of {name} in {node.name}")
    if name in _UNARY:
        if len(args) > 1 or set(kwargs) - {"inplace"}:  # F.relu(x, inplace=...) computes the same
            raise NoProgram(f"calls {name} with extra arguments in {node.name}")
        return [name]
    if name == "pow":
        exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
        return [f"pow {_number(exponent, 'an exponent')!r}"]
    if name == "clamp":
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if target in _METHOD_CLAMPS:  # clamp_min(x, v) / clamp_max(x, v)
            value = args[1] if len(args) > 1 else kwargs.get(_METHOD_CLAMPS[target])
            bounds = {_METHOD_CLAMPS[target]: value}
        else:
            bounds = {"min": args[1] if len(args) > 1 else kwargs.get("min"),
                      "max": args[2] if len(args) > 2 else kwargs.get("max")}
        lo, hi = ("none" if bounds.get(k) is None else repr(_number(bounds[k], f"a {k} bound"))
                  for k in ("min", "max"))
        if lo == hi == "none":
            raise NoProgram(f"clamps without bounds in {node.name}")
        return [f"clamp {lo} {hi}"]
    raise NoProgram(f"uses {name}, which no kind applies")
