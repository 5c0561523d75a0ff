"""Score modifications as data: the elementwise programs the non-exact kinds apply to their scores.

A custom op cannot take a Python callable, so a score modification reaches the kernels as a *program*:
a short text of elementwise steps applied, in order, to the scores s = scale · q kᵀ before the mask and
the kind's own normalisation.  Gemma-2's soft-capping ``tanh(s / 30) · 30`` is ``"div 30.0; tanh; mul 30.0"``.

Steps (constants are Python floats written with ``repr``, so a program round-trips exactly):

==================  ====================  ==================
step                y =                   dy/dx
==================  ====================  ==================
``mul c``           x · c                 c
``div c``           x / c                 1 / c
``rdiv c``          c / x                 −c / x²
``add c``           x + c                 1
``neg``             −x                    −1
``tanh``            tanh x                1 − tanh² x
``sigmoid``         σ(x)                  σ(x)(1 − σ(x))
``exp``             eˣ                    eˣ
``abs``             |x|                   sign x
``relu``            max(x, 0)             [x > 0]
``erf``             erf x                 2/√π · e^(−x²)
``square``          x²                    2x
``pow p``           xᵖ                    p · xᵖ⁻¹
``clamp lo hi``     min(max(x, lo), hi)   [lo ≤ x ≤ hi]  (``none`` for an absent bound)
==================  ====================  ==================

:func:`parse` checks a program (ValueError naming the bad step); :class:`ScoreProgram` evaluates it and
its derivative on torch tensors (the torch paths' forward and backward), and :meth:`ScoreProgram.affine_form`
reduces it, when it can, to ``post_mul · f(pre_mul · s + pre_add) + post_add`` with one nonlinear f — the
form the Triton kernels compile in from a fixed table (``f`` a constexpr code, the four numbers runtime floats).
Any other program is :meth:`ScoreProgram.split` into the same affine ends around a *core* (its first to its
last nonlinear step), and the core is generated into the kernels as Triton source
(:mod:`attnrewrite.kernels.triton_score_mods`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AFFINE = ("mul", "div", "add", "neg")
_UNARY = ("neg", "tanh", "sigmoid", "exp", "abs", "relu", "erf", "square")
_ONE_CONSTANT = ("mul", "div", "rdiv", "add", "pow")
STEPS = _UNARY + _ONE_CONSTANT + ("clamp",)

#: Nonlinear functions the Triton kernels compile in (constexpr codes, 0 = none).
KERNEL_FUNCTIONS = {"tanh": 1, "sigmoid": 2, "exp": 3, "abs": 4, "relu": 5, "erf": 6, "square": 7}


@dataclass(frozen=True)
class Step:
    """One step: ``op`` and its constants (none; one; or clamp's lower and upper bound, None when absent)."""

    op: str
    args: tuple[float | None, ...] = ()

    def text(self) -> str:
        return " ".join([self.op] + ["none" if a is None else repr(float(a)) for a in self.args])


@dataclass(frozen=True)
class ScoreProgram:
    """A checked score modification: ``steps`` applied in order (see the module's table)."""

    steps: tuple[Step, ...]

    def text(self) -> str:
        """The program as op arguments carry it: ``"div 30.0; tanh; mul 30.0"``."""
        return "; ".join(step.text() for step in self.steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """mod(x), out of place."""
        for step in self.steps:
            x = _apply(step, x)
        return x

    def with_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mod(x), mod'(x)), elementwise, by the chain rule over the steps."""
        grad = torch.ones_like(x)
        for step in self.steps:
            x, d = _apply_with_grad(step, x)
            grad = grad * d
        return x, grad

    def affine_form(self) -> tuple[float, float, int, float, float] | None:
        """(pre_mul, pre_add, function code, post_mul, post_add) with mod(s) = post_mul · f(pre_mul · s +
        pre_add) + post_add, f one of :data:`KERNEL_FUNCTIONS` (code 0: none, mod affine), or None when
        the program has more than one nonlinear step or one the kernels do not compile (clamp, pow)."""
        pre, post, function = [1.0, 0.0], [1.0, 0.0], 0
        for step in self.steps:
            side = pre if function == 0 else post
            if step.op in ("mul", "div", "neg"):
                c = -1.0 if step.op == "neg" else step.args[0] if step.op == "mul" else 1.0 / step.args[0]
                side[0], side[1] = side[0] * c, side[1] * c
            elif step.op == "add":
                side[1] += step.args[0]
            elif step.op in KERNEL_FUNCTIONS and function == 0:
                function = KERNEL_FUNCTIONS[step.op]
            else:
                return None
        return pre[0], pre[1], function, post[0], post[1]

    def split(self) -> tuple[float, float, "ScoreProgram | None", float, float]:
        """(pre_mul, pre_add, core, post_mul, post_add) with mod(s) = post_mul · core(pre_mul · s + pre_add) +
        post_add: the leading and trailing affine steps (``mul``, ``div``, ``add``, ``neg``) folded into two
        numbers each, ``core`` the steps from the first nonlinear step to the last (None for an affine
        program)."""
        nonlinear = [i for i, step in enumerate(self.steps) if step.op not in AFFINE]
        if not nonlinear:
            pre_mul, pre_add = fold_affine(self.steps)
            return pre_mul, pre_add, None, 1.0, 0.0
        first, last = nonlinear[0], nonlinear[-1]
        pre_mul, pre_add = fold_affine(self.steps[:first])
        post_mul, post_add = fold_affine(self.steps[last + 1:])
        return pre_mul, pre_add, ScoreProgram(self.steps[first:last + 1]), post_mul, post_add


def fold_affine(steps) -> tuple[float, float]:
    """(m, a) with the affine ``steps`` (mul, div, add, neg) applied in order equal to x · m + a."""
    m, a = 1.0, 0.0
    for step in steps:
        if step.op == "add":
            a += step.args[0]
        else:
            c = -1.0 if step.op == "neg" else step.args[0] if step.op == "mul" else 1.0 / step.args[0]
            m, a = m * c, a * c
    return m, a


def parse(text: str | None) -> ScoreProgram | None:
    """The program written in ``text`` (None or "" for no modification).

    Raises:
        ValueError: an unknown step, a wrong number of constants, or a constant that is not a finite number.
    """
    if text is None or not text.strip():
        return None
    steps = []
    for raw in text.split(";"):
        words = raw.split()
        if not words:
            raise ValueError(f"score modification {text!r}: an empty step")
        op, values = words[0], words[1:]
        expected = 0 if op in _UNARY else 1 if op in _ONE_CONSTANT else 2 if op == "clamp" else None
        if expected is None:
            raise ValueError(f"score modification {text!r}: unknown step {op!r}; known steps: {', '.join(STEPS)}")
        if len(values) != expected:
            raise ValueError(f"score modification {text!r}: step {op!r} takes {expected} constant(s), "
                             f"got {len(values)}")
        args = tuple(_number(v, text, op) for v in values)
        if op == "clamp" and args == (None, None):
            raise ValueError(f"score modification {text!r}: clamp needs at least one bound")
        if op in ("div",) and args[0] == 0.0:
            raise ValueError(f"score modification {text!r}: division by zero")
        steps.append(Step(op, args))
    return ScoreProgram(tuple(steps))


def _number(word: str, text: str, op: str) -> float | None:
    if op == "clamp" and word == "none":
        return None
    try:
        value = float(word)
    except ValueError:
        raise ValueError(f"score modification {text!r}: {word!r} (step {op!r}) is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"score modification {text!r}: {word!r} (step {op!r}) is not finite")
    return value


def _apply(step: Step, x: torch.Tensor) -> torch.Tensor:
    op, a = step.op, step.args
    if op == "mul":
        return x * a[0]
    if op == "div":
        return x / a[0]
    if op == "rdiv":
        return a[0] / x
    if op == "add":
        return x + a[0]
    if op == "pow":
        return x ** a[0]
    if op == "clamp":
        return x.clamp(min=a[0], max=a[1])
    if op == "square":
        return x * x
    return getattr(torch, op)(x)  # neg, tanh, sigmoid, exp, abs, relu, erf


def _apply_with_grad(step: Step, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    op, a = step.op, step.args
    y = _apply(step, x)
    if op == "mul":
        d = torch.full_like(x, a[0])
    elif op == "div":
        d = torch.full_like(x, 1.0 / a[0])
    elif op == "rdiv":
        d = -a[0] / (x * x)
    elif op == "add":
        d = torch.ones_like(x)
    elif op == "neg":
        d = torch.full_like(x, -1.0)
    elif op == "tanh":
        d = 1.0 - y * y
    elif op == "sigmoid":
        d = y * (1.0 - y)
    elif op == "exp":
        d = y
    elif op == "abs":
        d = torch.sign(x)
    elif op == "relu":
        d = (x > 0).to(x.dtype)
    elif op == "erf":
        d = (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)
    elif op == "square":
        d = 2.0 * x
    elif op == "pow":
        d = a[0] * x ** (a[0] - 1.0)
    else:  # clamp: the gradient passes where the input is inside the bounds (torch's rule)
        inside = torch.ones_like(x, dtype=torch.bool)
        if a[0] is not None:
            inside = inside & (x >= a[0])
        if a[1] is not None:
            inside = inside & (x <= a[1])
        d = inside.to(x.dtype)
    return y, d

