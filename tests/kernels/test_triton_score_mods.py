"""The generated score functions (attnrewrite/kernels/triton_score_mods.py): every step of the program table in
chains, value and derivative against ``ScoreProgram.with_grad`` (the torch paths' own chain rule) on a grid of
scores through a one-program elementwise kernel under TRITON_INTERPRET=1; the cache files; which functions a
specialisation re-makes; and the source torch.compile's user-defined-kernel path copies (compiled Triton,
in a subprocess without the interpreter)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from attnrewrite.kernels import score_mods, triton_score_mods
from attnrewrite.kernels.triton_scaffold import GENERATED, interpreter_active, mod_args, modified_scores

#: chains the generator must differentiate; every step of the table occurs
CHAINS = [
    "div 4.0; tanh; mul 4.0; sigmoid; mul 3.0",
    "mul 0.5; square; tanh; add -0.25",
    "clamp -1.0 1.5; exp; neg",
    "clamp none 0.5; relu; erf",
    "abs; mul 0.5; pow 3.0",
    "neg; pow 2.0; tanh",
    "tanh; pow -2.0",
    "sigmoid; pow 0.5",
    "abs; add 1.0; pow 1.5; rdiv 2.0",
    "mul 0.1; exp; pow 40.0",
    "tanh; pow 33.0",
    "tanh; pow 0.0; mul 2.0",
    "erf; clamp -0.5 none; sigmoid",
]


@triton.jit
def _apply_kernel(X, Y, D, n, BLOCK: tl.constexpr, MOD_FN: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    y, d = modified_scores(x, 1.0, None, 1.0, 0.0, 1.0, 0.0, 1.0, MOD_FN)
    tl.store(Y + offs, y, mask=offs < n)
    tl.store(D + offs, d, mask=offs < n)


def _needs_interpreter():
    if not interpreter_active(_apply_kernel):
        pytest.skip("runs the elementwise kernel on the CPU under TRITON_INTERPRET=1")


def _run(program: score_mods.ScoreProgram, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mod(x), mod'(x)) as the kernels compute them (the affine ends as runtime floats, the core generated)."""
    (in_mul, in_add, out_mul, out_add, grad_mul), mod_fn = mod_args(program, 1.0, log2=False)
    assert mod_fn == GENERATED
    u = x * in_mul + in_add
    y, d = torch.empty_like(u), torch.empty_like(u)
    kernel = triton_score_mods.kernel_for(_apply_kernel, program)
    kernel[(1,)](u, y, d, u.numel(), BLOCK=triton.next_power_of_2(u.numel()), MOD_FN=mod_fn)
    return y * out_mul + out_add, d * grad_mul


@pytest.mark.parametrize("text", CHAINS)
def test_the_generated_function_is_the_programs_value_and_derivative(text):
    _needs_interpreter()
    program = score_mods.parse(text)
    assert program.affine_form() is None  # really generated, not the fixed table
    x = torch.linspace(-3.0, 3.0, 200, dtype=torch.float32)  # no exact 0: pow 0.5 / -2 are singular there
    got_y, got_d = _run(program, x)
    want_y, want_d = program.with_grad(x.double())
    # float32 against float64; tanh as 1 − 2/(e^(2u) + 1) (the fixed table's form: no NaN at ±inf) keeps an
    # absolute, not relative, error near 0, which pow −2 turns into ~1e-5 relative
    torch.testing.assert_close(got_y.double(), want_y, rtol=1e-4, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(got_d.double(), want_d, rtol=1e-4, atol=2e-5, equal_nan=True)
    assert torch.isfinite(want_d).any()


def test_tanh_and_sigmoid_have_no_nan_at_the_ends_and_a_singularity_gives_a_zero_derivative():
    _needs_interpreter()
    x = torch.tensor([-1e30, -100.0, 0.0, 100.0, 1e30], dtype=torch.float32)
    y, d = _run(score_mods.parse("tanh; mul 80.0; sigmoid"), x)
    assert torch.isfinite(y).all() and torch.isfinite(d).all(), (y, d)
    torch.testing.assert_close(y[[0, -1]], torch.tensor([0.0, 1.0]))
    y, d = _run(score_mods.parse("abs; pow 0.5; rdiv 1.0"), x)  # at 0: y = inf, y' = inf · 0 → 0, not NaN
    assert y[2] == float("inf") and d[2] == 0.0


def test_the_source_is_cached_in_one_file_per_program(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNREWRITE_CACHE_DIR", str(tmp_path))
    core = score_mods.parse("tanh; mul 0.123456789; sigmoid")
    source = triton_score_mods.function_source(core)
    assert "tl.exp" in source and "0.123456789" in source
    fn = triton_score_mods._load(source)
    files = list((tmp_path / "score_mods").glob("mod_*.py"))
    assert len(files) == 1 and files[0].read_text() == source
    assert triton_score_mods._load(source) is fn  # imported once
    assert triton_score_mods.function_source(score_mods.parse("tanh; mul 0.5; sigmoid")) != source


def test_a_specialisation_remakes_only_the_call_path_to_the_score_function():
    from attnrewrite.kernels.sigmoid import triton_common, triton_fwd

    program = score_mods.parse("div 5.0; tanh; mul 5.0; sigmoid")
    kernel = triton_score_mods.kernel_for(triton_fwd.sigmoid_fwd_kernel, program)
    assert triton_score_mods.kernel_for(triton_fwd.sigmoid_fwd_kernel, program) is kernel  # cached
    assert triton_score_mods.kernel_for(triton_fwd.sigmoid_fwd_kernel, score_mods.parse("div 5.0; tanh")) is \
        triton_fwd.sigmoid_fwd_kernel  # the fixed table: the kernel itself
    loop = kernel.fn.__globals__["_fwd_key_loop"]
    tile = loop.fn.__globals__["sigmoid_tile"]
    scores = tile.fn.__globals__["modified_scores"]
    assert loop is not triton_fwd._fwd_key_loop and tile is not triton_common.sigmoid_tile
    generated = scores.fn.__globals__["score_mod_fn"]
    assert "x3 = 1.0 / (1.0 + tl.exp(-x2))" in inspect.getsource(generated.fn)
    assert generated.fn.__module__.startswith("attnrewrite_score_mod_")
    # what does not reach the score function is shared, not copied
    assert kernel.fn.__globals__["locate"] is triton_fwd.locate
    assert tile.fn.__globals__["sigmoid_log2"] is triton_common.sigmoid_log2
    with pytest.raises(ValueError, match="does not call score_mod_fn"):
        triton_score_mods.specialize(triton_common.sigmoid_log2, "score_mod_fn", generated, "x")


_INDUCTOR_SOURCE = textwrap.dedent("""
    import importlib.util, os, sys, tempfile
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure
    from attnrewrite.kernels import score_mods
    from attnrewrite.kernels.sigmoid.triton_bwd import sigmoid_bwd_dq_kernel
    from attnrewrite.kernels.triton_scaffold import mod_kernel
    kernel = mod_kernel(sigmoid_bwd_dq_kernel, score_mods.parse("mul 0.5; square; tanh; mul 2.0"))
    assert kernel.cache_key != sigmoid_bwd_dq_kernel.cache_key
    # the same parameters, the same constexprs (annotations are not in the code object the copy is made from)
    assert [(p.name, p.is_constexpr) for p in kernel.params] == \
        [(p.name, p.is_constexpr) for p in sigmoid_bwd_dq_kernel.params]
    source = closure(kernel)
    assert source.count("def score_mod_fn(") == 1 and "MOD_FN == 7" not in source, source
    path = os.path.join(tempfile.mkdtemp(), "copied.py")
    with open(path, "w") as f:  # what inductor writes into its module, with its imports
        f.write("import triton\\nimport triton.language as tl\\n@triton.jit\\n" + source)
    spec = importlib.util.spec_from_file_location("copied", path)
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert "x2 = 1.0 - 2.0 / (tl.exp(2.0 * x1) + 1.0)" in copied.score_mod_fn.src, copied.score_mod_fn.src
    assert copied.sigmoid_bwd_dq_kernel.cache_key
    print("ok")
""")


def test_torch_compile_copies_the_generated_function_with_the_kernel():
    """torch.compile's user-defined-kernel path writes a kernel's source and, by name from each function's
    globals, that of every function it calls, into inductor's module: the specialisation's copy must hold the
    generated function (once, the fixed table not at all) and import as compiled Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _INDUCTOR_SOURCE], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
