"""Make torchvision importable beside a CPU-only torch, for the third-party model tests (test-only).

Why this exists: ``timm`` imports ``torchvision`` (for ``FrozenBatchNorm2d`` and its data
transforms), and so does ``transformers`` (``modeling_utils`` → ``image_utils``) whenever torchvision
is installed.  The only torchvision build for torch 2.13 that this project's machines can install
from PyPI is the CUDA one.  Beside the CPU torch wheel its C++ extension (``torchvision/_C.so``)
fails to load; torchvision tolerates that (its ops are then simply missing), but its
``_meta_registrations`` module unconditionally registers fake (meta) kernels for two operators,
``torchvision::nms`` and ``torchvision::qnms``, and ``torch.library.register_fake`` refuses an
operator that was never defined.  ``import torchvision`` — and with it ``import transformers``'s
model classes — then fails with ``RuntimeError: operator torchvision::nms does not exist``.

:func:`make_torchvision_importable` declares exactly those two operator schemas (the signatures
torchvision's C++ code defines, ``(Tensor dets, Tensor scores, float iou_threshold) -> Tensor``)
with no kernel, then imports torchvision.  The fake registrations find their operators, the import
succeeds, and every pure-Python part of torchvision (``FrozenBatchNorm2d``, transforms) works.  The
declared operators have no kernel: ``torchvision.ops.nms`` still raises torchvision's own
"Couldn't load custom C++ ops" error, which is right — nothing here may use them, and torchvision's
own models are not tested.

It does nothing where it is not needed: torchvision not installed, already imported, or importable
as it is (an environment whose C++ extension loads: the schemas come from the extension there, and
declaring them first would clash with it).

So that the package, its demo, examples and benchmarks never meet that torchvision, ``.ci/install``
does not install it (nor timm, which requires it) into the environment: both go to a folder of their
own, :data:`THIRDPARTY_DIR` (``pip install --no-deps --target .thirdparty``), which only
:func:`use_thirdparty_dir` — called by ``tests/integrations/test_timm.py`` before it imports timm —
puts on ``sys.path``.  ``tests/conftest.py`` also calls :func:`make_torchvision_importable`, for an
environment where torchvision was installed anyway.

The rest of the module runs a third-party model through the pass for ``tests/integrations``
(:func:`run_rewritten`, :class:`ThirdPartyRun` and its checks, :func:`redraw_weights`); see
``docs/third_party.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from attnrewrite.rewriter.report import Report
from attnrewrite.testing.checks import assert_close_rel, compile_rewritten
from attnrewrite.testing.zoo import first_tensor

#: The operators torchvision's fake registrations need, with the schemas its C++ extension defines.
TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The torch.library.Library holding the declarations; kept alive for the process (dropping it
# would remove the operators again).
_LIBRARY: torch.library.Library | None = None


def _declare_schemas() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")  # schemas only, no kernels
    for schema in TORCHVISION_SCHEMAS.values():
        library.define(schema)
    _LIBRARY = library


def _forget_partial_import() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


#: Where ``.ci/install`` puts torchvision and timm (``pip install --target``): beside the environment,
#: not in it, so that nothing but these tests ever imports them (``transformers`` imports torchvision
#: whenever it can, and would fail outside the tests; see the module docstring).
#: ``ATTNREWRITE_THIRDPARTY_DIR`` points elsewhere.
THIRDPARTY_DIR = Path(os.environ.get("ATTNREWRITE_THIRDPARTY_DIR", Path(__file__).resolve().parents[2] / ".thirdparty"))


def use_thirdparty_dir() -> bool:
    """Put :data:`THIRDPARTY_DIR` on ``sys.path`` (once) and make torchvision importable from it;
    returns whether the folder exists.  Called by the tests that need timm, before importing it."""
    if not THIRDPARTY_DIR.is_dir():
        return False
    if str(THIRDPARTY_DIR) not in sys.path:
        sys.path.append(str(THIRDPARTY_DIR))  # after the environment: never shadows what it holds
        importlib.invalidate_caches()
    make_torchvision_importable()
    return True


def make_torchvision_importable() -> bool:
    """Import torchvision, declaring ``torchvision::nms``/``qnms`` first if its C++ ops cannot load.

    Returns whether the schemas were declared here (``False``: torchvision is absent, already
    imported, or imported as it is).  Any other import failure is raised unchanged.
    """
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "ops"):
        return _LIBRARY is not None
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as error:
        extension = sys.modules.get("torchvision.extension")
        loaded_ops = extension is not None and extension._has_ops()
        if loaded_ops or not any(f"torchvision::{op} does not exist" in str(error) for op in TORCHVISION_SCHEMAS):
            raise
    # The C++ extension did not load and the fake registrations failed: declare, import afresh.
    _forget_partial_import()
    _declare_schemas()
    importlib.import_module("torchvision")
    return True


# --- running a third-party model through the pass -------------------------------------------------


class SitesMissed(AssertionError):
    """Some attention site of a third-party model was not rewritten, or the sites rewritten are not
    the ones the library's source holds.  A class of its own so that a test may expect it (a known
    miss, ``xfail(raises=SitesMissed)``) while any other failure — a wrong output above all — still fails."""


class ModulePathsUnclean(AssertionError):
    """A site's module path is not the dotted ``named_modules()`` path (``__dict__._modules.`` in it)."""


#: What Dynamo writes into a module path when it reaches a submodule through a plain dict.
DICT_PATH_NOISE = "__dict__._modules."


def clean_module_path(path: str) -> str:
    """``path`` without the ``__dict__._modules.`` segments Dynamo leaves for modules held in dicts."""
    return path.replace(DICT_PATH_NOISE, "")


@dataclass
class ThirdPartyRun:
    """One model compiled with the attnrewrite backend (to ``softmax``, eager compiler) and run on
    each of several inputs: the pass's merged report and, per input, the compiled and eager outputs."""

    report: Report
    outputs: list[tuple[torch.Tensor, torch.Tensor]]  # (compiled, eager) per input

    def assert_exact(self, rtol: float = 1e-5) -> None:
        """Every compiled output equals eager's (relative error ≤ ``rtol``) and no graph hit an internal error.
        Holds whatever was rewritten: a certified site whose output differs fails here."""
        assert not self.report.errors, f"the pass failed on a graph:\n{self.report}"
        for i, (got, want) in enumerate(self.outputs):
            assert_close_rel(got, want, rtol, f"output for input {i} (report:\n{self.report}\n)")

    def rewritten_by_graph(self) -> dict[int, list[str]]:
        """The (cleaned) module paths of the rewritten sites, per compiled graph, sorted."""
        by_graph: dict[int, list[str]] = {g: [] for g in range(self.report.graphs)}
        for site in self.report.rewritten:
            by_graph.setdefault(site.graph, []).append(clean_module_path(site.module))
        return {g: sorted(paths) for g, paths in by_graph.items()}

    def assert_sites_rewritten(self, expected: list[str], graphs: int = 1) -> None:
        """Each of ``graphs`` compiled graphs rewrote exactly the sites at the module paths ``expected``
        (one site each; paths compared after :func:`clean_module_path`); raises :class:`SitesMissed`."""
        expected = sorted(expected)
        found = self.rewritten_by_graph()
        want = {g: expected for g in range(graphs)}
        if self.report.graphs != graphs or found != want:
            skipped = "\n".join(f"  skipped {s.module}: {s.reason}" for s in self.report.skipped)
            raise SitesMissed(f"expected {len(expected)} rewritten site(s) in each of {graphs} graph(s) at {expected}; "
                              f"{self.report.graphs} graph(s), rewritten {found}\n{skipped}\n{self.report}")

    def assert_not_rewritten(self, paths: list[str]) -> None:
        """No site inside the modules at ``paths`` (near misses) was rewritten."""
        hit = [s.module for s in self.report.rewritten
               if any(clean_module_path(s.module) == p or clean_module_path(s.module).startswith(p + ".") for p in paths)]
        assert not hit, f"near misses rewritten: {hit}\n{self.report}"

    def assert_module_paths_clean(self) -> None:
        """Every row names its module by its ``named_modules()`` path; raises :class:`ModulePathsUnclean`."""
        unclean = [s.module for s in self.report.sites if DICT_PATH_NOISE in s.module]
        if unclean:
            raise ModulePathsUnclean(f"module paths with {DICT_PATH_NOISE!r}: {unclean}")


def run_rewritten(model: torch.nn.Module, inputs: list[dict[str, Any]],
                  output: Callable[[Any], torch.Tensor] = first_tensor, dynamic: bool | None = None) -> ThirdPartyRun:
    """Compile ``model`` once with the attnrewrite backend (``to="softmax"``, ``compiler="eager"``: what
    ``attnrewrite.explain`` does) and run it on each of ``inputs`` (keyword arguments), beside eager.
    ``dynamic`` goes to ``torch.compile``."""
    report = Report(to="softmax")
    compiled = compile_rewritten(model, report, dynamic=dynamic, to="softmax", compiler="eager")
    outputs = []
    with torch.no_grad():
        for kwargs in inputs:
            want = output(model(**kwargs))
            outputs.append((output(compiled(**kwargs)), want))
    return ThirdPartyRun(report, outputs)


def module_paths(model: torch.nn.Module, *classes: type) -> list[str]:
    """The ``named_modules()`` paths of the submodules of ``model`` that are instances of ``classes``."""
    return [name for name, module in model.named_modules() if isinstance(module, classes)]


def redraw_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter of ``model`` so that each attention site visibly drives the output.

    Libraries initialise for training, not for testing: timm draws weights with std 0.02, position
    biases near zero and layer scales of 1e-5 (CaiT), so a block's attention adds almost nothing to
    the residual stream, and a wrongly rewritten site would move the output by less than the
    tolerance.  Here linear and convolution weights get std 1/√fan_in (activations keep their scale
    through the layers), their biases std 0.1, other 1-D parameters (norm weights, layer scales)
    1 + 0.2·N(0, 1), and every other parameter (position tables, tokens, temperatures) std 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and name == "weight":
                    value = noise / max(p[0].numel(), 1) ** 0.5
                elif isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and name == "bias":
                    value = 0.1 * noise
                elif p.dim() == 1:
                    value = 1 + 0.2 * noise
                else:
                    value = 0.5 * noise
                p.copy_(value.to(p.dtype))
    return model


__all__ = ["TORCHVISION_SCHEMAS", "ModulePathsUnclean", "SitesMissed", "ThirdPartyRun", "clean_module_path",
           "make_torchvision_importable", "module_paths", "redraw_weights", "run_rewritten"]
