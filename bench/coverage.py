"""Pattern coverage side by side: attnrewrite against inductor's attention fusion, over the zoo.

Every zoo model (``attnrewrite/testing/zoo.py``) is compiled twice per mode — inference
(``no_grad``) and training (forward + backward):

- with the attnrewrite backend (exact kind; the graph then runs eagerly, which does not change
  what the pass rewrites): the number of attention sites it rewrote;
- with inductor (CPU): the number of fused attention ops (``aten._scaled_dot_product_*``, forward
  ones) in the graph inductor generates code for, and how many of those inductor's
  ``fuse_attention`` patterns created.

How inductor is counted.  ``counters["inductor"]["fuse_attention"]`` is incremented each time a
replacement function is *traced*, which in training happens more than once per site (2 per
site with torch 2.13), so it is printed for reference only.  The reliable count comes from two
custom graph passes: ``joint_custom_pre_pass`` sees the graph before inductor's pattern passes
(SDPA ops there come from the model's own SDPA / ``nn.MultiheadAttention`` calls), and
``post_grad_custom_post_pass`` sees the graph inductor compiles; fused by inductor = after −
before.  The FX graph and AOT autograd caches are disabled so that every compile runs the passes.
By default inductor stops once the forward graph has been through all its passes (the graph
then runs eagerly): code generation would not change the counts and takes most of the time on a
CPU; ``--full-inductor`` runs it anyway.

    python bench/coverage.py [--only llama,bert] [--modes inference,training] [--no-inductor]

``--peer`` prints another table instead: the peer's own attention spellings — inductor's attention-fusion
tests restated as 56 cases in ``attnrewrite/testing/peer.py`` — with the sites attnrewrite rewrote and
those inductor's ``fuse_attention`` fused, read from its own counter
(``counters["inductor"]["fuse_attention"]``, each case compiled with plain inductor, inference):

    python bench/coverage.py --peer [--only p1_float,p15_expand_as] [--no-inductor]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sdpa_forward_ops(graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)
               and "backward" not in str(n.target))


class _CountingDone(Exception):
    """Raised after the forward graph's post-grad passes when code generation is not wanted."""


def _counting_pass(counts: dict, key: str, stop: bool | None = None):
    """A custom graph pass adding the forward SDPA ops it sees to ``counts[key]``; ``stop`` (post-grad
    only): True raises once the forward graph is counted, False lets inductor go on."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class CountSDPA(CustomGraphPass):
        def __call__(self, graph) -> None:
            # the joint graph (before the passes) holds tangents too; after partitioning only the
            # backward graph does, and its forward ops are not the model's attention
            backward = stop is not None and any(n.op == "placeholder" and n.name.startswith("tangents")
                                                for n in graph.nodes)
            if not backward:
                counts[key] += _sdpa_forward_ops(graph)
                if stop:
                    raise _CountingDone

        def uuid(self):
            return None  # never cache: the count must come from this compile

    return CountSDPA()


def _inductor_until_codegen(full: bool):
    """Inductor as the backend; unless ``full``, the compile stops once the forward graph has been
    through every pass (fusion decided, counted) and the graph then runs eagerly: code generation
    and C++ compilation, most of the time on a CPU, do not change which attention is fused."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        try:
            return compile_fx(gm, example_inputs)
        except Exception as exc:  # noqa: BLE001 — inductor may wrap our signal in its own error
            cause = exc
            while cause is not None and not isinstance(cause, _CountingDone):
                cause = cause.__cause__ or cause.__context__
            if full or cause is None:
                raise
            return gm.forward

    return backend


def _run(model, entry, inputs, backend, training: bool) -> None:
    import torch

    compiled = torch.compile(model, backend=backend)
    if training:
        out = entry.pick_output(compiled(**inputs))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
    else:
        with torch.no_grad():
            compiled(**inputs)


def attnrewrite_count(entry, training: bool) -> tuple[int, int]:
    """(sites rewritten, attention sites found) by the attnrewrite backend."""
    import torch

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.report import Report

    torch._dynamo.reset()
    torch.manual_seed(0)
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"compiler": "eager"}, _report_sink=report.merge)
    _run(entry.build(), entry, entry.example_inputs(), backend, training)
    return len([s for s in report.rewritten if s.spec is not None]), len(report.attention_sites())


def inductor_count(entry, training: bool, full: bool = False) -> dict[str, int]:
    """SDPA ops before inductor's pattern passes, in the compiled graph, and the raw fuse_attention counter."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    counts = {"before": 0, "after": 0}
    counters["inductor"].clear()
    with inductor_config.patch(fx_graph_cache=False, joint_custom_pre_pass=_counting_pass(counts, "before"),
                               post_grad_custom_post_pass=_counting_pass(counts, "after", stop=not full)), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _run(entry.build(), entry, entry.example_inputs(), _inductor_until_codegen(full), training)
    return {**counts, "counter": counters["inductor"]["fuse_attention"]}


class PlainAttention:
    """Calibration: ``matmul(q, kᵀ).div(√d).softmax(-1).matmul(v)`` — inductor's fuse_attention pattern 1,
    so its column must read 1 here; builds a module with a qkv projection (training needs parameters)."""

    @staticmethod
    def build():
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = nn.Linear(32, 96)

            def forward(self, x):
                b, t, _ = x.shape
                q, k, v = (y.view(b, t, 4, 8).transpose(1, 2) for y in self.qkv(x).split(32, dim=-1))
                return q.matmul(k.transpose(-2, -1)).div(8 ** 0.5).softmax(dim=-1).matmul(v)

        return Block().eval()

    @staticmethod
    def inputs(g):
        import torch

        return {"x": torch.randn(2, 8, 32, generator=g)}


def _peer_inputs(case):
    import torch

    inputs = list(case.inputs)
    if case.dynamic:
        for x in inputs[:3]:
            torch._dynamo.mark_dynamic(x, 0)
    return inputs


def peer_attnrewrite(case) -> tuple[int, int]:
    """(sites rewritten, attention sites found) for one peer case, exact kind, eager compiler, inference."""
    import torch

    from attnrewrite.rewriter.backend import attnrewrite_backend
    from attnrewrite.rewriter.report import Report

    torch._dynamo.reset()
    report = Report()
    backend = functools.partial(attnrewrite_backend, options={"to": "softmax", "compiler": "eager"},
                                _report_sink=report.merge)
    with torch.no_grad():
        torch.compile(case.fn, backend=backend)(*_peer_inputs(case))
    return len([s for s in report.rewritten if s.spec is not None]), len(report.attention_sites())


def peer_inductor(case, full: bool = False) -> int:
    """Inductor's own count for one peer case: ``counters["inductor"]["fuse_attention"]`` after compiling it
    with plain inductor (inference; the FX graph cache off so that its passes run)."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters["inductor"].clear()
    stop = _counting_pass({"after": 0}, "after", stop=not full)
    with inductor_config.patch(fx_graph_cache=False, post_grad_custom_post_pass=stop), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        torch.compile(case.fn, backend=_inductor_until_codegen(full))(*_peer_inputs(case))
    return counters["inductor"]["fuse_attention"]


def peer_section(args) -> int:
    """The peer's own spellings (attnrewrite/testing/peer.py): attnrewrite and inductor side by side."""
    import torch

    from attnrewrite.testing import peer

    cases = [c for c in peer.cases() if not args.only or c.name in args.only.split(",")]
    print(f"peer suite — inductor's attention-fusion test spellings restated ({len(cases)} cases), torch "
          f"{torch.__version__}, {platform.platform()}, {os.cpu_count()} CPU(s); inference")
    print(f"{'case':30s} {'sites':>5s} {'attnrewrite':>11s} {'inductor':>9s}  what")
    ours_total = fused_total = sites_total = 0
    start = time.perf_counter()
    for case in cases:
        sites_total += case.sites
        try:
            ours, _ = peer_attnrewrite(case)
            ours_cell = f"{ours}/{case.sites}"
            ours_total += ours
        except Exception as exc:  # noqa: BLE001 — one case failing must not hide the rest
            ours_cell = f"err({type(exc).__name__})"
        ind_cell = "-"
        if not args.no_inductor:
            try:
                counter = peer_inductor(case, args.full_inductor)
                fused = min(counter, case.sites) if counter else 0  # the counter counts traces, not sites
                fused_total += fused
                ind_cell = f"{fused}/{case.sites}" + (f" ({counter})" if counter > case.sites else "")
            except Exception as exc:  # noqa: BLE001
                ind_cell = f"err({type(exc).__name__})"
        print(f"{case.name:30s} {case.sites:5d} {ours_cell:>11s} {ind_cell:>9s}  {case.what[:70]}", flush=True)
    print(f"\ntotals ({time.perf_counter() - start:.0f} s): {len(cases)} cases, {sites_total} attention sites; "
          f"attnrewrite rewrote {ours_total}"
          + ("" if args.no_inductor else f", inductor's fuse_attention fused {fused_total}"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated zoo ids or families")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--no-inductor", action="store_true", help="count attnrewrite's sites only")
    parser.add_argument("--full-inductor", action="store_true",
                        help="let inductor generate and compile code too (slow on a CPU; same counts)")
    parser.add_argument("--peer", action="store_true",
                        help="the peer suite (inductor's own fusion-test spellings) instead of the zoo")
    args = parser.parse_args(argv)
    if args.peer:
        warnings.filterwarnings("ignore")
        return peer_section(args)

    import torch

    from attnrewrite.testing import zoo as hf_zoo

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    wanted = [w for w in args.only.split(",") if w]
    calibration = hf_zoo.ZooEntry(family="calibration", impl="sfdp_pattern_1", sites=1, build=PlainAttention.build,
                                  inputs=PlainAttention.inputs)
    entries = [e for e in [calibration] + hf_zoo.ZOO if not wanted or e.id in wanted or e.family in wanted]
    modes = [m for m in args.modes.split(",") if m]
    print(f"attnrewrite coverage vs inductor — torch {torch.__version__}, {platform.platform()}, "
          f"{os.cpu_count()} CPU(s), {len(entries)} zoo models, modes: {', '.join(modes)}", flush=True)
    head = f"{'model':24s} {'sites':>5s}"
    for mode in modes:
        head += f" | {mode:9s} ours  ind.SDPA  ind.fused  (counter)"
    print(head)
    totals = {m: {"sites": 0, "ours": 0, "sdpa": 0, "fused": 0, "eligible": 0} for m in modes}
    start = time.perf_counter()
    for entry in entries:
        if entry is calibration:
            print("(calibration: a spelling inductor's fuse_attention matches; not part of the totals)")
        row = f"{entry.id:24s} {entry.sites:5d}"
        for mode in modes:
            training = mode == "training"
            t = totals[mode] if entry is not calibration else {k: 0 for k in totals[mode]}
            t["sites"] += entry.sites
            try:
                ours, _found = attnrewrite_count(entry, training)
                t["ours"] += ours
                row += f" | {'':9s} {ours:4d}"
            except Exception as exc:  # noqa: BLE001 — one model failing must not hide the rest
                row += f" | {'':9s} err({type(exc).__name__})"
            if args.no_inductor:
                continue
            try:
                ind = inductor_count(entry, training, args.full_inductor)
                fused = ind["after"] - ind["before"]
                t["sdpa"] += ind["after"]
                t["fused"] += fused
                t["eligible"] += entry.sites - ind["before"]  # sites not already SDPA in the source
                row += f"  {ind['after']:8d}  {fused:9d}  ({ind['counter']})"
            except Exception as exc:  # noqa: BLE001
                row += f"  err({type(exc).__name__}: {str(exc)[:60]})"
        print(row, flush=True)
    print(f"\ntotals ({time.perf_counter() - start:.0f} s):")
    for mode, t in totals.items():
        share = 100 * t["ours"] / max(1, t["sites"])
        line = f"  {mode:9s} sites {t['sites']}: attnrewrite rewrote {t['ours']} ({share:.0f} %)"
        if not args.no_inductor:
            line += (f"; inductor ran {t['sdpa']} as fused SDPA ({100 * t['sdpa'] / max(1, t['sites']):.0f} %), "
                     f"its fuse_attention created {t['fused']} of the {t['eligible']} sites not already SDPA "
                     f"({100 * t['fused'] / max(1, t['eligible']):.0f} %)")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
