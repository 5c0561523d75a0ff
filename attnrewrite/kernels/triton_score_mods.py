"""Score modifications generated into the Triton kernels: any :class:`~attnrewrite.kernels.score_mods.ScoreProgram`
becomes a ``@triton.jit`` function inlined where the kernels apply one.

The kernels apply a modification through :func:`attnrewrite.kernels.triton_scaffold.modified_scores`, which
calls ``score_mod_fn(u, MOD_FN)`` for (f(u), f'(u)) between the program's affine ends (runtime floats).  For
a program with one nonlinear step of ``score_mods.KERNEL_FUNCTIONS`` that function is the scaffold's fixed
table, selected by the constexpr ``MOD_FN`` (the fast path, unchanged).  For any other program
(:meth:`ScoreProgram.split`: its *core*, the first to the last nonlinear step — ``tanh; mul 30.0; sigmoid``,
``square; tanh``, ``clamp none 4.0; exp``, ``pow 3.0`` …):

1. :func:`function_source` writes the core as straight-line Triton source returning (f(u), f'(u)), the chain
   rule done here, at generation time: each step's value and its derivative factor, runs of affine steps
   folded into one multiply-add, the same numerically safe forms as the fixed table (tanh and sigmoid
   through exp: ±1 and 0/1 at ±inf, no NaN);
2. :func:`score_function` writes that source to ``<cache dir>/score_mods/mod_<sha256>.py`` (Triton compiles
   from real source: ``inspect.getsource`` must find it, and torch.compile's user-defined-kernel path copies
   it into inductor's module) and imports it, once per program text;
3. :func:`specialize` makes the kernel's *specialisation*: every ``@triton.jit`` function on the kernel's
   call path to ``score_mod_fn`` is re-made from its own code object with globals in which that name is the
   generated function (callers of a re-made function re-made in turn), the rest shared.  Each re-made
   function's source is its original, so Triton's cache key (source plus the keys of what it calls) and
   inductor's copy of the call graph (by name, from each function's globals) both see the generated function.

Why a specialisation and not a JITFunction passed as a ``tl.constexpr`` argument: inductor writes a
user-defined kernel's constant arguments into its generated module with ``repr`` (``triton_meta``'s
constants), where a JITFunction has no valid form; a kernel whose globals name the function is what
torch.compile's path already handles (it copies each called function's source), and plain launches and
the interpreter see an ordinary kernel.

A program with a step singular at 0 (``rdiv``, ``pow`` with an exponent below 1 other than 0) has an infinite
derivative there, and the kernels' padding rows and columns hold scores of exactly 0 that are hidden by
the mask after the modification: their probabilities are 0, but 0 · inf would poison dQ/dK.  For such
programs the generated derivative maps non-finite values to 0 (the value f keeps its IEEE result; a visible
score at a singularity has an infinite or NaN value either way).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

from attnrewrite.kernels.score_mods import AFFINE, ScoreProgram, Step, fold_affine

#: integer exponents of ``pow`` up to this size are multiplied out (exact, any sign of the base)
_MAX_MULTIPLIED_POWER = 32
#: the largest finite float32: a derivative beyond it (inf) or NaN is mapped to 0 for singular programs
_FLOAT32_MAX = 3.4028234663852886e38

_LOCK = threading.Lock()
_FUNCTIONS: dict[str, object] = {}
_SPECIALISATIONS: dict[tuple[int, str], tuple[object, object]] = {}


# --------------------------------------------------------------------------- source generation


def _number(c: float) -> str:
    """A float literal that round-trips and parses as one token (parenthesised when negative)."""
    text = repr(float(c))
    return f"({text})" if c < 0 else text


def _power(base: str, n: int, out: str, lines: list[str]) -> str:
    """Lines computing ``base`` ** n (n ≥ 1) into ``out`` by binary exponentiation; returns the expression."""
    result, square, k = None, base, 0
    while True:
        if n & 1:
            if result is None:
                result = square
            else:
                lines.append(f"{out}_{k} = {result} * {square}")
                result, k = f"{out}_{k}", k + 1
        n >>= 1
        if not n:
            return result
        lines.append(f"{out}_{k} = {square} * {square}")
        square, k = f"{out}_{k}", k + 1


def _step_lines(step: Step, x: str, y: str) -> tuple[list[str], str]:
    """(lines computing y = step(x), the expression of dy/dx) for one nonlinear step."""
    op, a = step.op, step.args
    if op == "tanh":  # 1 − 2 / (e^(2x) + 1): ±1 at the ends, no NaN
        return [f"{y} = 1.0 - 2.0 / (tl.exp(2.0 * {x}) + 1.0)"], f"(1.0 - {y} * {y})"
    if op == "sigmoid":
        return [f"{y} = 1.0 / (1.0 + tl.exp(-{x}))"], f"({y} * (1.0 - {y}))"
    if op == "exp":
        return [f"{y} = tl.exp({x})"], y
    if op == "abs":
        return [f"{y} = tl.abs({x})"], f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
    if op == "relu":
        return [f"{y} = tl.maximum({x}, 0.0)"], f"tl.where({x} > 0, 1.0, 0.0)"
    if op == "erf":
        return [f"{y} = tl.math.erf({x})"], f"(1.1283791670955126 * tl.exp(-{x} * {x}))"
    if op == "square":
        return [f"{y} = {x} * {x}"], f"(2.0 * {x})"
    if op == "rdiv":
        return [f"{y} = {_number(a[0])} / {x}"], f"(-{y} / {x})"
    if op == "clamp":
        lo, hi = a
        value, inside = x, []
        if lo is not None:
            value = f"tl.maximum({value}, {_number(lo)})"
            inside.append(f"({x} >= {_number(lo)})")
        if hi is not None:
            value = f"tl.minimum({value}, {_number(hi)})"
            inside.append(f"({x} <= {_number(hi)})")
        return [f"{y} = {value}"], f"tl.where({' & '.join(inside)}, 1.0, 0.0)"
    if op == "pow":
        return _pow_lines(a[0], x, y)
    raise ValueError(f"score modification step {step.text()!r} has no Triton form")  # parse() admits none


def _pow_lines(p: float, x: str, y: str) -> tuple[list[str], str]:
    """x ** p as torch computes it: integer p multiplied out (negative bases keep their sign), others through
    exp2(p · log2 x) (NaN for x < 0, 0 or inf at x = 0, as torch); the derivative p · x^(p−1), 0 for p = 0."""
    lines: list[str] = []
    if p == 0.0:
        return [f"{y} = {x} * 0.0 + 1.0"], f"({x} * 0.0)"
    if p.is_integer() and abs(p) <= _MAX_MULTIPLIED_POWER:
        n = int(abs(p))
        if n == 1:
            lines.append(f"{y} = {x}" if p > 0 else f"{y} = 1.0 / {x}")
            return lines, f"({x} * 0.0 + 1.0)" if p > 0 else f"(-{y} * {y})"
        below = _power(x, n - 1, f"{y}", lines)  # x^(n−1)
        lines.append(f"{y}_m = {below}")
        if p > 0:
            lines.append(f"{y} = {y}_m * {x}")
            return lines, f"({_number(p)} * {y}_m)"
        lines.append(f"{y} = 1.0 / ({y}_m * {x})")           # x^−n
        return lines, f"({_number(p)} * {y} / {x})"             # −n · x^(−n−1)
    if p.is_integer():  # a large integer exponent: |x|^p with the sign of x^p (and |x|^(p−1) with that of x^(p−1))
        odd = f"tl.where({x} < 0, -1.0, 1.0)"
        lines.append(f"{y}_l = tl.log2(tl.abs({x}))")
        lines.append(f"{y} = {odd if int(p) % 2 else '1.0'} * tl.exp2({_number(p)} * {y}_l)")
        return lines, f"({_number(p)} * {odd if int(p - 1) % 2 else '1.0'} * tl.exp2({_number(p - 1.0)} * {y}_l))"
    lines.append(f"{y}_l = tl.log2({x})")
    lines.append(f"{y} = tl.exp2({_number(p)} * {y}_l)")
    return lines, f"({_number(p)} * tl.exp2({_number(p - 1.0)} * {y}_l))"


def singular(core: ScoreProgram) -> bool:
    """Whether a step of ``core`` has an infinite derivative at a finite input (0): ``rdiv``, ``pow`` p < 1, p ≠ 0."""
    return any(s.op == "rdiv" or (s.op == "pow" and s.args[0] < 1.0 and s.args[0] != 0.0) for s in core.steps)


def function_source(core: ScoreProgram) -> str:
    """The Triton source of ``score_mod_fn(u, MOD_FN)`` returning (core(u), core'(u)) for the steps of ``core``
    (any steps of the program table; ``MOD_FN`` is not read: the signature is the fixed table's)."""
    body: list[str] = []
    x, grad, index = "u", None, 0
    run: list[Step] = []

    def flush_affine():
        nonlocal x, grad, index
        if not run:
            return
        m, a = fold_affine(run)
        run.clear()
        index += 1
        y = f"x{index}"
        expr = x if m == 1.0 else f"{x} * {_number(m)}"
        body.append(f"{y} = {expr} + {_number(a)}" if a != 0.0 else f"{y} = {expr}")
        if m != 1.0:
            body.append(f"d = d * {_number(m)}" if grad else f"d = {x} * 0.0 + {_number(m)}")
            grad = "d"
        x = y

    for step in core.steps:
        if step.op in AFFINE:
            run.append(step)
            continue
        flush_affine()
        index += 1
        y = f"x{index}"
        body.append(f"# {step.text()}")
        lines, factor = _step_lines(step, x, y)
        body.extend(lines)
        body.append(f"d = d * {factor}" if grad else f"d = {factor}")
        grad = "d"
        x = y
    flush_affine()
    if grad is None:  # an affine core (split() never makes one; kept total)
        body.append(f"d = {x} * 0.0 + 1.0")
    if singular(core):
        body.append(f"d = tl.where(tl.abs(d) <= {_FLOAT32_MAX!r}, d, 0.0)  # inf/NaN at a singularity: 0")
    body.append(f"return {x}, d")
    text = core.text()
    return ("# generated by attnrewrite.kernels.triton_score_mods: do not edit\n"
            f"# core: {text}\n"
            "import triton.language as tl\n\n\n"
            "def score_mod_fn(u, MOD_FN: tl.constexpr):\n"
            f"    \"\"\"(f(u), f'(u)) of the score modification core {text!r}.\"\"\"\n"
            + "".join(f"    {line}\n" for line in body))


# --------------------------------------------------------------------------- files and modules


def cache_dir() -> Path:
    """Where generated modules are written: ``$ATTNREWRITE_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnrewrite`` (or
    ``~/.cache/attnrewrite``), then ``score_mods/``; the temporary directory when that cannot be created."""
    root = os.environ.get("ATTNREWRITE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "attnrewrite")
    path = Path(root) / "score_mods"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"attnrewrite-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "score_mods"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load(source: str):
    """The plain function ``score_mod_fn`` of ``source``, written once to a file named by its hash and imported."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"attnrewrite_score_mod_{digest}"
    if name in sys.modules:
        return sys.modules[name].score_mod_fn
    path = cache_dir() / f"mod_{digest}.py"
    if not path.exists() or path.read_text() != source:
        partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(source)
        os.replace(partial, path)  # atomic: a concurrent process sees the whole file or none
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module.score_mod_fn


def _jit_like(template, fn, own_options: bool = True):
    """``fn`` made a Triton function of the same kind as ``template`` (a JITFunction, or the interpreter's
    InterpretedFunction under TRITON_INTERPRET=1), with its options (``own_options``) or the defaults."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(template, InterpretedFunction):
        return InterpretedFunction(fn, **(template.kwargs if own_options else {}))
    if not own_options:
        return type(template)(fn)
    options = {"version": getattr(template, "version", None),
               "do_not_specialize": getattr(template, "do_not_specialize", None),
               "do_not_specialize_on_alignment": getattr(template, "do_not_specialize_on_alignment", None),
               "debug": getattr(template, "debug", None), "noinline": getattr(template, "noinline", None),
               "repr": getattr(template, "_repr", None), "launch_metadata": getattr(template, "launch_metadata", None)}
    return type(template)(fn, **options)


def score_function(core: ScoreProgram, like):
    """The generated ``score_mod_fn`` of ``core`` as a Triton function of the kind of ``like`` (cached by text)."""
    key = f"{type(like).__name__}:{core.text()}"
    with _LOCK:
        if key not in _FUNCTIONS:
            _FUNCTIONS[key] = _jit_like(like, _load(function_source(core)), own_options=False)
        return _FUNCTIONS[key]


# --------------------------------------------------------------------------- kernel specialisation


def _triton_functions():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction, InterpretedFunction


def _names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def specialize(kernel, name: str, replacement, tag: str):
    """``kernel`` with every Triton function on its call path to the global ``name`` re-made so that ``name``
    is ``replacement`` (module docstring); ``tag`` names the specialisation (in the re-made functions'
    qualified names, which Triton registers).  Functions that do not reach ``name`` are shared."""
    kinds = _triton_functions()
    reaches: dict[int, bool] = {}
    made: dict[int, object] = {}

    def callees(fn):
        g = fn.fn.__globals__
        return [(n, g[n]) for n in sorted(_names(fn.fn.__code__)) if isinstance(g.get(n), kinds)]

    def reach(fn) -> bool:
        if id(fn) not in reaches:
            reaches[id(fn)] = False  # a cycle does not reach through itself
            reaches[id(fn)] = name in _names(fn.fn.__code__) and name in fn.fn.__globals__ or any(
                reach(callee) for _, callee in callees(fn))
        return reaches[id(fn)]

    def remake(fn):
        if id(fn) in made:
            return made[id(fn)]
        scope = dict(fn.fn.__globals__)
        if name in scope and name in _names(fn.fn.__code__):
            scope[name] = replacement
        for callee_name, callee in callees(fn):
            if callee_name != name and reach(callee):
                scope[callee_name] = remake(callee)
        old = fn.fn
        new = types.FunctionType(old.__code__, scope, old.__name__, old.__defaults__, old.__closure__)
        new.__kwdefaults__, new.__doc__, new.__module__ = old.__kwdefaults__, old.__doc__, old.__module__
        new.__annotations__ = dict(old.__annotations__)  # not in the code object: tl.constexpr marks live here
        new.__dict__.update(old.__dict__)
        new.__qualname__ = f"{old.__qualname__}__{tag}"
        made[id(fn)] = _jit_like(fn, new)
        return made[id(fn)]

    if not reach(kernel):
        raise ValueError(f"{kernel.fn.__name__} does not call {name}: nothing to specialise")
    return remake(kernel)


def kernel_for(kernel, program: ScoreProgram | None):
    """The kernel to launch for ``program``: ``kernel`` itself without one or with one in the fixed table
    (:meth:`ScoreProgram.affine_form`), else its specialisation with the generated core (cached)."""
    if program is None or program.affine_form() is not None:
        return kernel
    core = program.split()[2]
    text = core.text()
    with _LOCK:
        cached = _SPECIALISATIONS.get((id(kernel), text))
    if cached is not None:
        return cached[1]
    replacement = score_function(core, kernel)
    tag = "mod_" + hashlib.sha256(text.encode()).hexdigest()[:12]
    made = specialize(kernel, "score_mod_fn", replacement, tag)
    with _LOCK:
        _SPECIALISATIONS[(id(kernel), text)] = (kernel, made)  # the kernel is held: its id stays its own
    return made


__all__ = ["cache_dir", "function_source", "kernel_for", "score_function", "singular", "specialize"]
