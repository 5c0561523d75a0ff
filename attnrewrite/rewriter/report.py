"""What the pass did: one row per attention site found or rejected, printable as a table."""

from __future__ import annotations

import collections
import itertools
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

from attnrewrite.ir.spec import Site
from attnrewrite.patterns.eager_matmul import NOT_READ, SPLIT_BY_GRAPH_BREAK


@dataclass
class SiteReport:
    """One site: ``status`` is ``"rewritten"`` or ``"skipped"``; ``reason`` says why it was skipped."""

    status: str
    reason: str | None
    pattern: str
    module: str
    spec: dict[str, Any] | None
    kind: str | None = None
    notes: list[str] = field(default_factory=list)
    graph: int = 0
    anchor: str = ""

    @property
    def attention_left_as_it_was(self) -> bool:
        """A skipped attention site, a half of an attention split by a graph break, or attention in a form
        the matcher recognises but does not read (:data:`NOT_READ`): attention that
        runs as it was, which the pass must say (warning, or RewriteFailed under strict)."""
        reason = self.reason or ""
        return self.status == "skipped" and (self.spec is not None or SPLIT_BY_GRAPH_BREAK in reason
                                             or reason.startswith(NOT_READ))

    @classmethod
    def from_site(cls, site: Site, graph: int, module: str | None = None) -> SiteReport:
        """``module``: the site's module path as the report names it (default: its path in its graph)."""
        return cls(
            status="rewritten" if site.status == "rewritten" else "skipped",
            reason=site.reason,
            pattern=site.pattern,
            module=clean_module_path(site.module_path if module is None else module),
            spec=site.spec.summary() if site.spec is not None else None,
            kind=site.kind,
            notes=list(site.notes),
            graph=graph,
            anchor=site.anchor.name,
        )


def clean_module_path(path: str) -> str:
    """A module path as the user names it: Dynamo's source of a module held in a plain dict (or reached
    through ``__dict__``) reads ``__dict__._modules.blocks.0.attn``; the user's name is ``blocks.0.attn``."""
    return re.sub(r"(^|\.)(__dict__|_modules)(?=\.|$)", "", path).lstrip(".")


@dataclass
class StageReport:
    """One stage of the pass: wall time, and the sites still in play (found, not skipped) before and after."""

    name: str
    seconds: float
    sites_in: int
    sites_out: int


@dataclass
class Report:
    """Everything the pass found in one compiled model (all its graphs).

    ``sites`` lists every attention site found or rejected; ``errors`` holds internal errors
    that made a graph run unrewritten; ``stages`` holds each stage of the pass with its time and
    sites in and out, summed over the graphs.  ``print(report)`` shows a table.
    """

    to: str = "softmax"
    sites: list[SiteReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    graphs: int = 0
    seconds: float = 0.0  # wall time spent in the pass itself
    stages: list[StageReport] = field(default_factory=list)
    compile_ids: list[str] = field(default_factory=list)  # Dynamo's "frame/compile" id of each graph

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def attention_sites(self) -> list[SiteReport]:
        """Sites recognised as attention (rewritten, or skipped after matching) — near misses excluded."""
        return [s for s in self.sites if s.spec is not None]

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def merge(self, other: Report) -> None:
        self.to = other.to
        offset = self.graphs
        for s in other.sites:
            s.graph += offset
            self.sites.append(s)
        self.errors.extend(other.errors)
        self.compile_ids.extend(other.compile_ids)
        self.graphs += other.graphs
        self.seconds += other.seconds
        mine = {s.name: s for s in self.stages}
        for stage in other.stages:
            if stage.name in mine:
                mine[stage.name].seconds += stage.seconds
                mine[stage.name].sites_in += stage.sites_in
                mine[stage.name].sites_out += stage.sites_out
            else:
                self.stages.append(StageReport(stage.name, stage.seconds, stage.sites_in, stage.sites_out))

    def __str__(self) -> str:
        head = (f"attnrewrite → {self.to}: {len(self.rewritten)} rewritten, {len(self.skipped)} skipped, "
                f"{self.graphs} graph(s), pass {self.seconds * 1e3:.0f} ms")
        rows = [("#", "status", "module", "pattern", "causal", "gqa", "scale", "bias", "drop", "reason / notes")]
        for i, s in enumerate(self.sites):
            spec = s.spec or {}
            scale = spec.get("scale")
            rows.append((
                str(i), s.status, s.module or "<root>", s.pattern,
                _flag(spec.get("causal")), str(spec.get("kv_groups", "")),
                f"{scale:.4g}" if isinstance(scale, float) else ("1/√d" if scale is None and spec else str(scale or "")),
                "+".join(spec.get("bias", []) + (["mod"] if spec.get("score_mod") else [])) or ("-" if spec else ""),
                f"{spec['dropout_p']:g}" if spec else "",
                s.reason or "; ".join(s.notes),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head]
        if self.stages:
            lines.append("stages: " + " · ".join(
                f"{s.name} {s.seconds * 1e3:.0f} ms ({s.sites_in}→{s.sites_out})" for s in self.stages))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines)


def _flag(value) -> str:
    return "" if value is None else ("yes" if value else "no")


_RECENT: collections.deque[Report] = collections.deque(maxlen=64)
_LOCK = threading.Lock()


def record(report: Report) -> None:
    with _LOCK:
        _RECENT.append(report)


def recent_reports() -> list[Report]:
    """Reports of the graphs the backend compiled in this process, oldest first (at most 64)."""
    with _LOCK:
        return list(_RECENT)


#: Report of each compiled graph still alive, by a serial number unique in the process.  Dynamo's
#: compile ids are not unique: they start again from 0/0 after ``torch._dynamo.reset()``, so a
#: report looked up by compile id can belong to another model compiled earlier.
_GRAPHS: weakref.WeakValueDictionary[int, Report] = weakref.WeakValueDictionary()
_SERIALS = itertools.count()


def graph_serial(report: Report) -> int:
    """A serial number naming ``report``'s graph; the caller keeps ``report`` alive as long as the
    graph can run (:func:`graph_report` forgets it after)."""
    with _LOCK:
        serial = next(_SERIALS)
        _GRAPHS[serial] = report
        return serial


def graph_report(serial: int) -> Report | None:
    """The report of the graph named ``serial`` by :func:`graph_serial`, or None once it is gone."""
    with _LOCK:
        return _GRAPHS.get(serial)
