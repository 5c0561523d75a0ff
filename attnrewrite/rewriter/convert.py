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


def converted_attention(owner: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, to: str, *,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False, ordinal: int = 0, **options: Any) -> torch.Tensor:
    """The attention a converted site runs, called eagerly: the site's state (``owner.attnrewrite_<to>``,
    attached by :func:`convert`) applied exactly as the rewrite applies it (the kind's own ``emit``), then the
    kind's op.  q [B, Hq, T, D], k and v [B, Hkv, S, D] (Hkv = Hq, or a divisor with ``enable_gqa``); returns
    [B, Hq, T, Dv] in q's dtype.

    For code that calls attention itself instead of being compiled: inside
    :func:`attnrewrite.distributed.context_parallel` (where a model compiled with ``backend="attnrewrite"``
    also runs, compiled again inside and uncompiled there), a converted model's attention module may call
    this, and its learned states (sigmoid's head temperature and bias, hedgehog feature maps, learned
    summary queries, learned hash projections) reach the context-parallel op as its tensor arguments.  Each rank's gradient of a state is then its share, as for every replicated
    parameter: sum it over the ranks (DDP, or an ``all_reduce``).

    Raises:
        ValueError: ``owner`` holds a state of ``to`` made for other options, or these options need
            per-site parameters and ``owner`` has none (convert the model first); options as
            :func:`convert` checks them.
    """
    from attnrewrite import kinds
    from attnrewrite.ir.canonical import AttentionCall
    from attnrewrite.ir.spec import state_name

    full = RewriteOptions.parse({"to": to, **options})
    kind = kinds.get(to)
    name = state_name(to, ordinal)
    state = owner._modules.get(name)
    if state is not None:
        made_for = getattr(state, state_registry.OPTIONS_ATTR, None)
        if made_for is not None and made_for != full.kind_options:
            raise ValueError(f"{type(owner).__name__}.{name} holds {to} parameters made for {made_for}, not "
                             f"{full.kind_options}: call with the options the model was converted with")
    elif _needs_state(kind, full.kind_options):  # never run a learned kind without its parameters
        raise ValueError(f"{to} with {full.kind_options} needs per-site parameters, and {type(owner).__name__} has "
                         f"no {name}: convert the model first (attnrewrite.convert(model, {to!r}, example_inputs, "
                         "**options))")
    bool_mask = isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool
    call = AttentionCall(q, k, v, attn_mask, 0.0, bool(is_causal), scale, bool(enable_gqa),
                         kv_groups=q.shape[-3] // k.shape[-3], dtype=q.dtype, bool_mask=bool_mask)
    return kind.emit(call, full.kind_options, state)


class _NeedsState(Exception):
    pass


class _NoSpec:
    """A spec that is never read: every kind's ``make_state`` returns None for options without state
    before it looks at the site, and reads the site's shapes to make one."""

    def __getattr__(self, name: str) -> Any:
        raise _NeedsState(name)


def _needs_state(kind: Any, kind_options: dict[str, Any]) -> bool:
    """Whether ``kind`` with these options has per-site parameters."""
    if kind.make_state is None:
        return False
    try:
        return kind.make_state(_NoSpec(), kind_options) is not None
    except _NeedsState:
        return True
