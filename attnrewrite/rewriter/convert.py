"""``attnrewrite.convert``: give a model the per-site parameters of a kind, before compiling it.

Kinds with parameters — learned feature maps (``linear`` with ``hedgehog``), random features
that must stay fixed (``favor``), learned summary queries, hash encoders — need one module per
attention site.  ``convert`` runs the model once through the pass on example inputs, creates
each site's module and attaches it to the module that owns the site, where optimizers,
``state_dict`` and ``load_state_dict`` see it.  Compiling the converted model with the same kind
and options then uses those modules.  To reload a converted model: build it, ``convert`` it
again, then ``load_state_dict``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from attnrewrite.rewriter import state as state_registry
from attnrewrite.rewriter.backend import attnrewrite_backend
from attnrewrite.rewriter.options import RewriteOptions
from attnrewrite.rewriter.report import Report


def convert(model: nn.Module, to: str, example_inputs: Any = (), **options: Any) -> nn.Module:
    """Attach ``to``'s per-site modules to ``model`` (in place) and return it, ready to compile.

    Args:
        model: the model to convert.
        to: the attention kind (``"linear"``, ...).
        example_inputs: a tuple of positional arguments, or a dict of keyword arguments, on
            which the model is run once to find its attention sites.
        options: the kind's options (``feature_map="hedgehog"`` ...), as for the backend.

    Returns:
        ``model``, with ``<owner>.attnrewrite_<kind>`` submodules added; the sites found and
        converted are in ``model.attnrewrite_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    full = RewriteOptions.parse({"to": to, "compiler": "eager", **options})
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}

    def attach(site, new_state):
        try:
            owner = model.get_submodule(site.module_path) if site.module_path else model
        except AttributeError as exc:
            raise ValueError(f"site {site.module_path!r} is not a submodule of the converted model") from exc
        existing = getattr(owner, state_registry.state_name(full.to, site.ordinal), None)
        if existing is not None:  # converted before: reuse, never replace trained parameters
            return state_registry.attached(owner, full.to, site.ordinal)
        device = next((p.device for p in state_registry.owner_parameters(owner)), torch.device("cpu"))
        state_registry.attach(owner, full.to, site.ordinal, new_state.to(device))
        return new_state

    report = Report(to=full.to)
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": "eager", **options},
                                _report_sink=report.merge, _attach_state=attach)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    model.attnrewrite_report = report
    return model
