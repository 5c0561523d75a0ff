"""Per-site state of kinds with parameters: learned feature maps, summary queries, hash projections.

A state is an ``nn.Module`` attached to the module that owns the site (``owner.attnrewrite_linear``),
so optimizers, ``state_dict``, ``load_state_dict`` and FSDP see it like any other parameter.
The compiled graph does not call it — Dynamo captured the model's own forward — so the pass
has to find it: the owner's parameters appear in the graph as inputs, and this registry maps
each of them (by object identity) to the states attached next to it.  The rewrite then adds
the state to the graph module and calls it, so its parameters get gradients.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from attnrewrite.ir.capture import module_path
from attnrewrite.ir.spec import STATE_PREFIX as PREFIX
from attnrewrite.ir.spec import state_name

# owner parameter -> {(kind, ordinal of the site within its owner): state}
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()  # by identity: tensors compare elementwise


def owner_parameters(owner: nn.Module) -> list[torch.Tensor]:
    """The owner's own parameters (attnrewrite states excluded): what the graph will show."""
    return [p for name, p in owner.named_parameters() if not any(part.startswith(PREFIX) for part in name.split("."))]


def attach(owner: nn.Module, kind: str, ordinal: int, state: nn.Module) -> None:
    """Attach ``state`` to ``owner`` and register it under the owner's parameters."""
    params = owner_parameters(owner)
    if not params:
        raise ValueError(
            f"{type(owner).__name__} has no parameters of its own: attnrewrite cannot tie a {kind} state to it "
            "(the attention is computed in a module without weights)")
    owner.add_module(state_name(kind, ordinal), state)
    for p in params:
        _REGISTRY.setdefault(p, {})[(kind, ordinal)] = state


def attached(owner: nn.Module, kind: str, ordinal: int) -> nn.Module | None:
    """The state attached to ``owner`` for this site, re-registering it if the registry lost it
    (e.g. after ``load_state_dict`` into a freshly converted model — registration is by object)."""
    state = getattr(owner, state_name(kind, ordinal), None)
    if isinstance(state, nn.Module):
        for p in owner_parameters(owner):
            _REGISTRY.setdefault(p, {})[(kind, ordinal)] = state
    return state


def lookup(site_module: str, kind: str, ordinal: int, placeholders: dict[fx.Node, object]) -> nn.Module | None:
    """The state registered for the site owned by ``site_module``, found through the owner's
    parameters among the graph's placeholders (node -> example input), or None."""
    prefix = site_module + "." if site_module else ""
    for node, value in placeholders.items():
        if not isinstance(value, nn.Parameter):
            continue
        path = module_path(node)
        if site_module and path != site_module and not path.startswith(prefix):
            continue
        state = _REGISTRY.get(value, {}).get((kind, ordinal))
        if state is not None:
            return state
    return None
