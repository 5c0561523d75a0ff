"""A model rewritten to ``summary`` or ``hashed`` reaches the Triton kernels: the emitted op is the
composite public op, which takes the kind option ``impl`` (here forced to ``"triton"``, the kernels run
under ``TRITON_INTERPRET=1``), and its output equals the torch path's."""

import importlib

import pytest
import torch

from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.report import Report
from attnrewrite.targets import llama
from attnrewrite.testing.checks import compile_rewritten

pytestmark = pytest.mark.skipif(
    not __import__("attnrewrite.kernels.summary.triton_op", fromlist=["x"]).interpreter_active(),
    reason="the kernels run on the CPU only under TRITON_INTERPRET=1")

OPTIONS = {"summary": dict(chunk_size=4, window_chunks=1), "hashed": dict(bits=16, top_k=3, window=3, sinks=1)}
TOKENS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


KERNEL_MODULES = {"summary": "attnrewrite.kernels.summary.triton_op", "hashed": "attnrewrite.kernels.hashed.triton_ops"}
# the CPU path of each op ("torch": its torch ops, or for hashed at one thread the compiled C loop beside them)
TORCH_PATHS = {"summary": [("attnrewrite.kernels.summary.op", "summary_attention_forward")],
               "hashed": [("attnrewrite.kernels.hashed.op", "hashed_attention_forward"),
                          ("attnrewrite.kernels.hashed.native", "forward")]}


@pytest.fixture
def calls(monkeypatch):
    """Counts, per kind, the kernel launches (through the Triton path's ``traceable``) and the torch
    path's forward calls, while the compiled model runs."""
    seen = []
    for kind, name in KERNEL_MODULES.items():
        module = importlib.import_module(name)

        def counting(kernel, _inner=module.traceable):
            seen.append("kernel")
            return _inner(kernel)

        monkeypatch.setattr(module, "traceable", counting)
    for kind, paths in TORCH_PATHS.items():
        for name, attr in paths:
            module = importlib.import_module(name)

            def counting_torch(*args, _inner=getattr(module, attr), **kwargs):
                seen.append("torch")
                return _inner(*args, **kwargs)

            monkeypatch.setattr(module, attr, counting_torch)
    return seen


def _run(kind, impl, calls, compiler="eager"):
    torch.manual_seed(0)
    model = llama.Llama.from_name("tiny").eval()
    report = Report()
    compiled = compile_rewritten(model, report, to=kind, impl=impl, strict=True, compiler=compiler, **OPTIONS[kind])
    with torch.no_grad():
        compiled(TOKENS)  # compiles (a traced compiler may run the path's code while tracing)
        calls.clear()
        out = compiled(TOKENS)
    assert len(report.rewritten) == 2 and not report.skipped, report
    return out, list(calls)


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_impl_option_reaches_the_kernels_and_equals_the_torch_path(kind, calls):
    got, seen = _run(kind, "triton", calls)
    want, seen_torch = _run(kind, "torch", calls)
    assert "torch" not in seen and seen.count("kernel") >= 2, seen  # both layers launched kernels
    assert seen_torch == ["torch", "torch"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_on_the_cpu_runs_the_torch_path(calls):
    _, seen = _run("summary", "auto", calls)
    assert seen == ["torch", "torch"]


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_traced_by_aot_autograd_the_kernels_still_run(kind, calls):
    """aot_eager traces the composite op on fake tensors: the path it chose stays in the graph."""
    got, seen = _run(kind, "triton", calls, compiler="aot_eager")
    want, _ = _run(kind, "torch", calls)
    assert "torch" not in seen and seen.count("kernel") >= 2, seen
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["summary", "hashed"])
def test_a_bad_impl_option_is_refused_by_name(kind):
    assert RewriteOptions.parse({"to": kind, "impl": "triton"}).kind_options["impl"] == "triton"
    with pytest.raises(ValueError, match=f"option 'impl' of kind '{kind}' must be one of 'auto', 'triton', 'torch'"):
        RewriteOptions.parse({"to": kind, "impl": "cuda"})
    with pytest.raises(TypeError, match="option 'impl'"):
        RewriteOptions.parse({"to": kind, "impl": None})


def test_learned_hashes_with_forced_kernels_train_through_the_kernels(calls):
    """``impl="triton"`` with ``hash="learned"``: a converted model's sites run the kernels forward and
    backward, and the output and the projections' straight-through gradients equal the torch path's."""
    import attnrewrite

    options = dict(OPTIONS["hashed"], hash="learned")
    results = {}
    for impl in ("triton", "torch"):
        torch.manual_seed(0)
        model = attnrewrite.convert(llama.Llama.from_name("tiny"), to="hashed", example_inputs=(TOKENS,), **options)
        report = Report()
        compiled = compile_rewritten(model, report, to="hashed", impl=impl, strict=True, **options)
        compiled(TOKENS)  # compiles
        calls.clear()
        out = compiled(TOKENS)
        out.float().square().mean().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if "attnrewrite_hashed" in name}
        assert len(report.rewritten) == 2 and len(grads) == 4 and all(g.abs().max() > 0 for g in grads.values())
        results[impl] = out, grads, list(calls)
    (got, got_grads, seen), (want, want_grads, _) = results["triton"], results["torch"]
    assert "torch" not in seen and seen.count("kernel") >= 2, seen
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, grad in got_grads.items():
        scale = float(want_grads[name].abs().max())
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-4 * scale, msg=name)
