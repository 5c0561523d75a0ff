"""The ``torch.compile`` backend: ``torch.compile(model, backend="attnrewrite", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so the name works without
importing attnrewrite first.  Dynamo calls the backend once per captured graph; the pass
rewrites the graph before autograd (so training uses the new op's backward) and hands it
to the chosen compiler.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch.fx as fx

from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.pipeline import run_pass
from attnrewrite.rewriter.report import Report, record

log = logging.getLogger("attnrewrite")


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], compiler: str) -> Callable:
    """Hand the (rewritten) graph to ``compiler``: inductor, eager or aot_eager."""
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def attnrewrite_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    _report_sink: Callable[[Report], None] | None = None,
    _attach_state: Callable | None = None,
) -> Callable:
    """Rewrite every certified attention site of ``gm`` to ``options["to"]``, then compile it.

    Options: ``to`` (kind, default ``"softmax"``), ``strict`` (default False), ``compiler``
    (``"inductor"`` default, ``"eager"``, ``"aot_eager"``) and the kind's own options.
    The report of each graph is logged (logger ``attnrewrite``) and kept for
    :func:`attnrewrite.recent_reports`.
    """
    opts = RewriteOptions.parse(options)
    report = run_pass(gm, example_inputs, opts, attach_state=_attach_state)
    record(report)
    if _report_sink is not None:
        _report_sink(report)
    log.info("attnrewrite → %s: %d site(s) rewritten, %d skipped", opts.to, len(report.rewritten),
             len(report.skipped))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s\n%s", report, gm.code)
    return compile_graph(gm, example_inputs, opts.compiler)


def register() -> None:
    """Register the backend by name in this process.

    Installed packages need no call: the ``torch_dynamo_backends`` entry point finds it.
    This is for running from a source checkout that is not installed.
    """
    from torch._dynamo.backends import registry

    if "attnrewrite" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=attnrewrite_backend, name="attnrewrite")
