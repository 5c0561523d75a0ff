"""``attnrewrite.convert``: give a model the per-site parameters of a kind, before compiling it.

Kinds with parameters — learned feature maps (``linear`` with ``hedgehog``), random features
that must stay fixed (``favor``), learned summary queries, hash encoders — need one module per
attention site.  ``convert`` runs the model once through the pass on example inputs, creates
each site's module and attaches it to the module that owns the site, where optimizers,
``state_dict``, ``load_state_dict``, ``copy.deepcopy``, pickling and FSDP see it.  Compiling the
converted model (or any copy of it) with the same kind and options then finds those modules by
their place in the model (see :mod:`attnrewrite.rewriter.state`); a forward pre-hook on each owner
makes the states' tensors inputs of the compiled graphs, so identical layers share compiled code and
each runs with its own state.  To reload saved weights: build
the model, ``convert`` it, then ``load_state_dict``.

Converting again is idempotent: states already attached for the same kind and options are kept
(their trained values are never replaced).  States attached for other options of the kind are an
error, unless ``replace=True`` asks for fresh ones.
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


def convert(model: nn.Module, to: str, example_inputs: Any = (), *, replace: bool = False, **options: Any
            ) -> nn.Module:
    """Attach ``to``'s per-site modules to ``model`` (in place) and return it, ready to compile.

    Args:
        model: the model to convert.
        to: the attention kind (``"linear"``, ...).
        example_inputs: a tuple of positional arguments, or a dict of keyword arguments, on
            which the model is run once to find its attention sites.
        replace: drop the states of kind ``to`` the model already has and make new ones (their
            trained values are lost).  Without it, states made for other options raise.
        options: the kind's options (``feature_map="hedgehog"`` ...), as for the backend.

    The states are made on the device of their owner's parameters and, when those share one floating
    dtype, in that dtype (a float64 or bfloat16 model gets states of its own dtype, as FSDP2 requires).

    Returns:
        ``model``, with ``<owner>.attnrewrite_<kind>`` submodules added; the sites found and
        converted are in ``model.attnrewrite_report``.

    Raises:
        ValueError: the model has states of kind ``to`` made for other options (and ``replace``
            is False); the message names both option sets.
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

    existing = state_registry.states(model, full.to)
    if replace:
        for name in existing:
            parent, _, attr = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, attr)
    else:
        for name, module in existing.items():
            made_for = getattr(module, state_registry.OPTIONS_ATTR, None)
            if made_for is not None and made_for != full.kind_options:
                raise ValueError(
                    f"{name} holds {full.to} parameters made for {made_for}, not {full.kind_options}: convert with "
                    f"those options to keep them, or with replace=True to make new ones (the trained values are "
                    f"lost)")

    def attach(site, new_state):
        # called by the pass for a site with no state yet: the owner is the module that ran the
        # site in the frame being compiled (also right when a graph break compiles a submodule)
        owner = state_registry.owner_of(site.anchor).module
        tensors = [t for name, t in [*owner.named_parameters(), *owner.named_buffers()]
                   if not state_registry.is_state_name(name)]
        new_state = new_state.to(tensors[0].device if tensors else torch.device("cpu"))
        # and in the owner's floating dtype when it has one: a float64 or bfloat16 model gets states of its dtype,
        # as FSDP2 (uniform parameter dtype) and plain .double()/.half() users expect
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if len(dtypes) == 1:
            new_state = new_state.to(dtypes.pop())
        return state_registry.attach(owner, full.to, site.ordinal, new_state, full.kind_options)

    report = Report(to=full.to)
    backend = functools.partial(attnrewrite_backend, options={"to": to, "compiler": "eager", **options},
                                _report_sink=report.merge, _attach_state=attach)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    for name in state_registry.states(model, full.to):  # each owner feeds its states to compiled graphs
        parent = name.rpartition(".")[0]
        state_registry.install_feed(model.get_submodule(parent) if parent else model)
    model.attnrewrite_report = report
    return model
