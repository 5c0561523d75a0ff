"""The package's floors: who may import whom, and no import cycles.

The floors, from the top down (DESIGN.md, section Layout):

    the public face (attnrewrite/__init__, ops, hf, demo, __main__) and testing/
    rewriter/  the pass
    distributed/  context parallelism, over the kernels' public ops
    kinds/     one adapter per kind
    patterns/  spellings → AttentionSpec
    ir/        the words everything above shares (imports torch only)
    decode/    KV caches, over the kernels' ops
    kernels/   pure ops: import nothing from the floors above
    targets/   reference models: plain torch

Imports are read from the source (every ``import``/``from … import``, also inside functions),
so a lazy import up the floors is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnrewrite"

#: What each sub-package may import from the package (besides itself).
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "targets": set(),
    "ir": set(),
    "decode": {"kernels", "ir"},
    "patterns": {"ir"},
    "kinds": {"ir", "patterns", "kernels"},
    "rewriter": {"ir", "patterns", "kinds"},
    "distributed": {"kernels"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The attnrewrite modules ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = {f"{base}.{a.name}" for a in node.names}
            found |= names & MODULES.keys() or {base}  # ``from pkg import module`` imports the module
    return {m for m in found if m.split(".")[0] == "attnrewrite" and m in MODULES}


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


MODULES = _all_modules()


def _floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        graph.add_node(module)
        for target in _imports(path):
            if target != module:
                graph.add_edge(module, target)
    return graph


def test_every_floor_is_a_package():
    for floor in ALLOWED:
        assert (PACKAGE / floor / "__init__.py").exists(), floor


def test_no_import_points_up_the_floors():
    wrong = []
    for source, target in import_graph().edges:
        floor, other = _floor(source), _floor(target)
        if floor is None or other == floor:
            continue
        if target == "attnrewrite" or other is None or other not in ALLOWED[floor]:
            wrong.append(f"{source} imports {target}")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_kernels_are_pure_ops():
    """kernels/ imports nothing of the pass: not rewriter, patterns, kinds or ir."""
    wrong = [f"{s} imports {t}" for s, t in import_graph().edges
             if _floor(s) == "kernels" and t.split(".")[1:2] != ["kernels"]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Package __init__ files that re-export their own submodules are not cycles of behaviour,
    so an edge from a package to its own submodule is left out."""
    graph = import_graph()
    graph.remove_edges_from([(s, t) for s, t in list(graph.edges) if t.startswith(s + ".")])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c + [c[0]]) for c in cycles)


@pytest.mark.parametrize("bad", ["attnrewrite.rewriter.pipeline", "attnrewrite.kinds.registry"])
def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch, bad):
    """The floor check itself fails on a kernel module that imports the pass."""
    planted = PACKAGE / "kernels" / "_planted_for_layout_test.py"
    monkeypatch.setitem(MODULES, "attnrewrite.kernels._planted_for_layout_test", planted)
    monkeypatch.setattr(Path, "read_text", _reader(planted, f"def f():\n    import {bad}\n"))
    with pytest.raises(AssertionError, match="_planted_for_layout_test imports"):
        test_no_import_points_up_the_floors()


def _reader(planted: Path, source: str):
    original = Path.read_text

    def read_text(self, *args, **kwargs):
        return source if self == planted else original(self, *args, **kwargs)

    return read_text


def test_no_test_edits_sys_path():
    tests = Path(__file__).resolve().parent
    offenders = [str(p.relative_to(tests)) for p in tests.rglob("*.py")
                 if p != Path(__file__).resolve() and "sys.path.insert" in p.read_text()]
    assert not offenders, offenders
