"""The ``torch.compile`` backend: ``torch.compile(model, backend="attnrewrite", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so the name works without
importing attnrewrite first.  Dynamo calls the backend once per captured graph; the pass
rewrites the graph before autograd (so training uses the new op's backward) and hands it
to the chosen compiler.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx

from attnrewrite.rewriter.failures import recompile_limit_reached
from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.pipeline import run_pass
from attnrewrite.rewriter.report import Report, graph_serial, record

log = logging.getLogger("attnrewrite")


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], compiler: str, mode: str | None = None) -> Callable:
    """Hand the (rewritten) graph to ``compiler``: inductor (with ``torch.compile``'s ``mode``, if any), eager or
    aot_eager.

    Inductor compiles it without its own attention fusion (``fuse_attention``'s SDPA patterns):
    attnrewrite has already handled every attention in the graph, and those patterns can be wrong
    on what attnrewrite left alone (torch 2.13 fuses a softmax over the *query* dim into SDPA).
    The rest of inductor's pattern passes stay on.
    """
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = None
    if mode is not None:
        from torch._inductor import list_mode_options

        patches = list_mode_options(mode)
    with without_inductor_attention_fusion():
        return compile_fx(gm, example_inputs, config_patches=patches)


def _is_attention_fusion(entry: Any) -> bool:
    """An entry of inductor's joint-graph patterns that fuses attention into SDPA (``_sfdp_pattern_*``)."""
    if "sfdp" in str(getattr(entry, "pattern_name", None) or ""):
        return True
    cells = getattr(getattr(entry, "extra_check", None), "__closure__", None) or ()
    return any(getattr(cell.cell_contents, "__module__", "").endswith("fx_passes.fuse_attention") for cell in cells
               if cell.cell_contents is not None)


class _PatternsWithoutAttentionFusion:
    """Inductor's first joint-graph pattern pass with the attention-fusion entries left out.

    Filtered when applied — inductor registers its patterns lazily, inside the compile — and the
    registry itself is never changed, so other compiles in the process keep their fusion.
    """

    def __init__(self, inner: Any):
        self.inner = inner

    def apply(self, gm: Any) -> int:
        from torch._inductor.pattern_matcher import PatternMatcherPass

        kept = PatternMatcherPass(pass_name=self.inner.pass_name, subsystem=self.inner.subsystem)
        for key, entries in self.inner.patterns.items():
            kept.patterns[key] = [e for e in entries if not _is_attention_fusion(e)]
        kept.seen_patterns = self.inner.seen_patterns
        return kept.apply(gm)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@functools.cache
def source_fingerprint() -> str:
    """A digest of this install's attnrewrite source (see :func:`digest_sources`), computed once.

    Inductor's caches key a graph on its nodes, and a node calling one of attnrewrite's
    ``CompositeImplicitAutograd`` ops (``attnrewrite::sigmoid_attention`` …) names the op, not the
    Python code it decomposes into.  torch 2.13's AOTAutograd cache keys the graph *before* that
    decomposition, so without this digest in the key a cache written by another version or checkout
    of attnrewrite would replay that version's code (seen: a causal call given the non-causal bias
    of an older decomposition).
    """
    return digest_sources(Path(__file__).resolve().parents[1])


def digest_sources(root: Path) -> str:
    """sha256 (16 hex digits) over the relative path and bytes of every ``.py`` file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _marker_class() -> type:
    """The marker pass's class, built on first use (importing inductor costs seconds)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class NoAttentionFusionMarker(CustomGraphPass):
        """A joint-graph pass that runs the user's own (if any) and names, in the cache key, that
        attention fusion was off and which attnrewrite source the graph's ops decompose into."""

        def __init__(self, inner: Any):
            self.inner = inner
            self.keyable = isinstance(inner, CustomGraphPass)

        def __call__(self, graph: Any) -> None:
            if self.inner is not None:
                self.inner(graph)

        def uuid(self) -> Any:
            return ("attnrewrite: no attention fusion, 1", source_fingerprint(),
                    self.inner.uuid() if self.keyable else None)

    return NoAttentionFusionMarker


_FUSION_LOCK = threading.RLock()


@contextlib.contextmanager
def without_inductor_attention_fusion() -> Iterator[None]:
    """Inductor compiles inside this block skip its SDPA-fusion patterns (see :func:`compile_graph`)."""
    try:
        from torch._inductor.fx_passes import joint_graph
    except ImportError:  # an inductor without these passes fuses nothing of the kind
        yield
        return
    import torch._inductor.config as inductor_config

    with _FUSION_LOCK:
        passes = joint_graph.pass_patterns
        original = passes[0]
        if isinstance(original, _PatternsWithoutAttentionFusion):  # nested: already filtered
            yield
            return
        # the FX graph cache keys on the graph and inductor's config, not on these patterns: a marker
        # pass in the config keeps a graph compiled with the fusion apart from one compiled without
        existing = inductor_config.joint_custom_pre_pass
        marker = _marker_class()(existing)
        cache = {} if existing is None or marker.keyable else {"fx_graph_cache": False}
        passes[0] = _PatternsWithoutAttentionFusion(original)
        try:
            with inductor_config.patch(joint_custom_pre_pass=marker, **cache):
                yield
        finally:
            passes[0] = original


def _as_is(tensor: Any) -> Any:
    return tensor


def attnrewrite_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    _report_sink: Callable[[Report], None] | None = None,
    _attach_state: Callable | None = None,
    _tap: Callable | None = None,
    mode: str | None = None,
) -> Callable:
    """Rewrite every certified attention site of ``gm`` to ``options["to"]``, then compile it.

    Options: ``to`` (kind, default ``"softmax"``), ``strict`` (default False), ``compiler``
    (``"inductor"`` default, ``"eager"``, ``"aot_eager"``), ``mode`` and the kind's own options.
    ``mode`` is what ``torch.compile(..., mode=...)`` passes (it takes a mode or options, not both).
    The report of each graph is logged (logger ``attnrewrite``) and kept for
    :func:`attnrewrite.recent_reports`.
    """
    if mode is not None:
        if options and "mode" in options and options["mode"] != mode:
            raise ValueError(f"mode={mode!r} and option 'mode'={options['mode']!r} disagree")
        options = {**(options or {}), "mode": mode}
    opts = RewriteOptions.parse(options)
    recompile_limit_reached(opts.strict)  # the frame's last compile: later versions will run unrewritten
    # the pass evaluates attention on real tensors (certification): saved-tensor hooks around the compile, such as
    # non-reentrant activation checkpointing's when the first call is inside torch.utils.checkpoint, must not see
    # what those evaluations save (it counts them, and the recomputation, which runs the compiled code, saves fewer)
    sharded = _context_parallel_manager()
    if sharded is not None:  # the attention calls Dynamo traced through the manager's mode are marked: unmark them
        sharded.strip_markers(gm)
    # (inside the manager, the pass's evaluations run the ops on tensors of its own, not on the rank's shard)
    with torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is), \
            (sharded.not_on_the_shard() if sharded is not None else contextlib.nullcontext()):
        report = run_pass(gm, example_inputs, opts, attach_state=_attach_state, tap=_tap)
    report.compile_ids = [_compile_id()]
    compiler = opts.compiler
    if sharded is not None:
        compiler = _route_context_parallel(sharded, gm, report, opts)
    record(report)
    if _report_sink is not None:
        _report_sink(report)
    log.info("attnrewrite → %s: %d site(s) rewritten, %d skipped", opts.to, len(report.rewritten),
             len(report.skipped))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s\n%s", report, gm.code)
    return ranged(compile_graph(gm, example_inputs, compiler, opts.mode), report)


def _context_parallel_manager() -> Any:
    """:mod:`attnrewrite.distributed.manager` when the graph is compiled inside its ``context_parallel``, else None
    (nothing is imported: when that module was never imported, the manager cannot be on)."""
    import sys

    manager = sys.modules.get("attnrewrite.distributed.manager")
    return manager if manager is not None and manager.compiling_inside() is not None else None


def _route_context_parallel(manager: Any, gm: fx.GraphModule, report: Report, opts: RewriteOptions) -> str:
    """Inside ``attnrewrite.distributed.context_parallel``: every attention call of the rewritten graph goes through
    the manager when it runs (this rank's rows over the whole sequence, see ``route_graph``), and a site the pass
    left alone is an error (it would attend over the rank's shard only).  The graph then runs as it is (compiler
    ``eager``): the manager's exchanges between the ranks cannot be traced by AOTAutograd."""
    if report.skipped:
        raise NotImplementedError(
            f"attnrewrite: compiling inside attnrewrite.distributed.context_parallel, {len(report.skipped)} attention "
            "site(s) were not rewritten and would attend over this rank's shard of the sequence only: "
            + "; ".join(f"{site.module or '<root>'}: {site.reason}" for site in report.skipped)
            + ". Fix what the report names, or run the model eagerly inside context_parallel")
    manager.route_graph(gm)
    if opts.compiler != "eager":
        warnings.warn(f"attnrewrite: inside attnrewrite.distributed.context_parallel the graph runs uncompiled "
                      f"(compiler 'eager', not {opts.compiler!r}): its attention calls exchange blocks between the "
                      "ranks, which AOTAutograd cannot trace", stacklevel=2)
    return "eager"


#: Profiler range around each call of a graph this backend compiled, named ``"attnrewrite graph <serial>
#: <compile id>"``: ``verify`` tells by it the graphs from the eager code of a compiled frame (graph-break
#: bytecode, functions Dynamo skips), and finds by the serial the report of the graph that ran.
GRAPH_RANGE = "attnrewrite graph "


def ranged(compiled: Callable, report: Report) -> Callable:
    """``compiled`` called inside a ``record_function`` range naming its graph's report (kept alive
    with the graph, see :func:`attnrewrite.rewriter.report.graph_report`)."""
    name = f"{GRAPH_RANGE}{graph_serial(report)} {report.compile_ids[0]}"

    @functools.wraps(compiled)  # keeps the calling convention's attributes (inductor's _boxed_call)
    def run(*args: Any) -> Any:
        with torch.profiler.record_function(name):
            return compiled(*args)

    run.attnrewrite_report = report  # alive as long as the graph can run
    return run


def _compile_id() -> str:
    """Dynamo's id of the graph being compiled ("frame/compile", as its profiler ranges name it), or ""."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return "" if compile_id is None else str(compile_id)


def register() -> None:
    """Register the backend by name in this process.

    Installed packages need no call: the ``torch_dynamo_backends`` entry point finds it.
    This is for running from a source checkout that is not installed.
    """
    from torch._dynamo.backends import registry

    if "attnrewrite" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=attnrewrite_backend, name="attnrewrite")
