"""Per-site state of kinds with parameters: learned feature maps, summary queries, hash projections.

A state is an ``nn.Module`` attached to the module that owns the site, under a fixed name
(``owner.attnrewrite_linear``, ``owner.attnrewrite_linear_1`` for a second site): optimizers,
``state_dict`` / ``load_state_dict``, ``copy.deepcopy``, pickling and FSDP see it like any other
submodule, and a copy of the model carries copies of its states.

The compiled graph does not call the state — Dynamo captured the model's own forward — so the pass
has to find it, on *the model being compiled*: the site's owner is the module Dynamo recorded in the
anchor's ``nn_module_stack`` — a path from a local (or global) of the frame Dynamo is compiling,
``L['self'].layers.0.attn``.  The frame's locals are the objects the compiled code runs on, so
walking that path from them reaches the owner of *this* model, whatever wraps it (DDP's
``module.``, ``torch.compile``'s ``_orig_mod``, FSDP2's class swap) and however it was made (a
deepcopy, ``torch.load``, a fresh model that loaded a ``state_dict``).  Object identities and
parameter objects are not used: copies, sharding and reloading all replace them.

The rewrite adds the state module itself to the graph, so the compiled code is only valid for that
state object (and, once AOTAutograd lifted them as constants, for its tensor objects).  Dynamo shares
compiled code between instances of one class (a deepcopy, the layers of a model compiled one by one),
so :func:`guard` adds identity guards on the state's attribute path and on each of its tensors:
another model, a replaced state or replaced tensors fail them and are compiled again with their own.
A model compiled layer by layer therefore compiles once per layer (mind Dynamo's recompile limit).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

from attnrewrite.ir.capture import module_path
from attnrewrite.ir.spec import STATE_PREFIX as PREFIX
from attnrewrite.ir.spec import NotAttention, state_name
from attnrewrite.rewriter.failures import RewriteWarning

#: The root of an ``nn_module_stack`` entry: a local (``L['self']``) or global (``G['model']``) of
#: the compiled frame, maybe indexed (``L['args'][0]``); the rest of the entry is the module path.
_ROOT = re.compile(r"^(?P<scope>[LG])\[['\"](?P<name>[^'\"]+)['\"]\](?:\[(?P<index>\d+)\])?")

#: Attribute (a plain one: deepcopy and pickle keep it) with the kind options a state was made for.
OPTIONS_ATTR = "attnrewrite_options"


@dataclass
class Owner:
    """The module that owns a site in the model being compiled, and Dynamo's source for it."""

    module: nn.Module
    source: Any  # torch._dynamo.source.Source: the same path, as guards evaluate it

    def state_source(self, kind: str, ordinal: int) -> Any:
        from torch._dynamo.source import AttrSource, DictGetItemSource

        return DictGetItemSource(AttrSource(self.source, "_modules"), state_name(kind, ordinal))


def _frame() -> Any:
    """The frame Dynamo is compiling (its root instruction translator), or None outside Dynamo."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 — no Dynamo frame: the graph came from elsewhere
        return None


def owner_of(node: fx.Node) -> Owner:
    """The module that ran ``node`` (a site's anchor), on the model Dynamo is compiling now.

    Raises :class:`NotAttention` (the site is skipped with the reason) when the graph was not
    captured by ``torch.compile`` or the path does not lead to a module.
    """
    stack = node.meta.get("nn_module_stack") or {}
    frame = _frame()
    if frame is None:
        raise NotAttention("its per-site parameters are found through the module that owns the site, which "
                           "only a graph captured by torch.compile names")
    from torch._dynamo.source import (
        AttrSource,
        DictGetItemSource,
        GetItemSource,
        GlobalSource,
        LocalSource,
    )

    if not stack:  # run by the frame's own module (a layer compiled on its own, FSDP2 per layer): `self`
        code = frame.f_code
        name = code.co_varnames[0] if code.co_argcount else None
        if name is None or not isinstance(frame.f_locals.get(name), nn.Module):
            raise NotAttention("it is not run by an nn.Module: per-site parameters need a module to live on")
        return Owner(frame.f_locals[name], LocalSource(name))
    raw = list(stack.values())[-1][0]
    root = _ROOT.match(raw)
    if root is None:
        raise NotAttention(f"the module that owns it ({raw}) is not reached from a local or global of the frame")
    scope, name, index = root.group("scope", "name", "index")
    try:
        obj = (frame.f_locals if scope == "L" else frame.f_globals)[name]
        source = LocalSource(name) if scope == "L" else GlobalSource(name)
        if index is not None:
            obj, source = obj[int(index)], GetItemSource(source, int(index))
        path = module_path(node)
        for part in path.split(".") if path else ():
            obj, source = obj._modules[part], DictGetItemSource(AttrSource(source, "_modules"), part)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise NotAttention(f"the module that owns it ({raw}) cannot be reached from the compiled frame: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise NotAttention(f"{raw} is not an nn.Module: per-site parameters need a module to live on")
    return Owner(obj, source)


def _layout(module: nn.Module) -> tuple[list, list]:
    """What a state is made of: its submodules' names and classes, its tensors' names and shapes."""
    modules = [(name, type(m)) for name, m in module.named_modules()]
    # not state_dict(): its hooks have side effects (under FSDP2 it reshards the parameters mid-forward)
    tensors = [(name, tuple(t.shape)) for name, t in [*module.named_parameters(), *module.named_buffers()]]
    return modules, tensors


def compatible(found: nn.Module, fresh: nn.Module) -> str | None:
    """None when ``found`` has the layout of ``fresh`` (what the requested options would create),
    else what differs.  Submodule classes may be subclasses (FSDP2 swaps a sharded module's class)."""
    (found_modules, found_tensors), (fresh_modules, fresh_tensors) = _layout(found), _layout(fresh)
    if [n for n, _ in found_modules] != [n for n, _ in fresh_modules] or not all(
            issubclass(a, b) for (_, a), (_, b) in zip(found_modules, fresh_modules)):
        return (f"it holds a {type(found).__name__} of {[c.__name__ for _, c in found_modules]}, these options "
                f"need {[c.__name__ for _, c in fresh_modules]}")
    if found_tensors != fresh_tensors:
        return f"its tensors are {found_tensors}, these options need {fresh_tensors}"
    return None


def find(owner: nn.Module, kind: str, ordinal: int, fresh: nn.Module) -> nn.Module | None:
    """The state attached to ``owner`` for this site, or None.  A state made for other options
    raises :class:`NotAttention`: running it would not be the kind that was asked for."""
    found = owner._modules.get(state_name(kind, ordinal))
    if found is None:
        return None
    mismatch = compatible(found, fresh)
    if mismatch is not None:
        made_for = getattr(found, OPTIONS_ATTR, None)
        raise NotAttention(
            f"the {kind} state attached to it was made for other options ({made_for}): {mismatch}; compile with "
            f"the options it was converted with, or convert again with replace=True")
    return found


def attach(owner: nn.Module, kind: str, ordinal: int, state: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Attach ``state`` to ``owner`` for this site, recording the kind ``options`` it was made for."""
    setattr(state, OPTIONS_ATTR, dict(options))
    owner.add_module(state_name(kind, ordinal), state)
    return state


def guard(owner: Owner, kind: str, ordinal: int) -> None:
    """Make the code being compiled valid only while this owner holds this very state object, and
    the state these very tensors.

    The rewrite calls the state module from the graph, so the compiled code runs whatever state it
    was compiled with: without the guard Dynamo would run a deepcopy (or any other instance of the
    class) through the graph compiled for the original, with the original's state.  AOTAutograd
    (``aot_eager``, inductor) also lifts the state's tensors as constants at compile time: a tensor
    replaced on the same state (``load_state_dict(assign=True)``, ``to_empty``) recompiles too.
    """
    import torch._guards
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import AttrSource, DictGetItemSource

    context = torch._guards.TracingContext.try_get()
    if context is None:  # not inside torch.compile: the graph is not cached by Dynamo either
        return
    guards = context.guards_context.dynamo_guards
    source = owner.state_source(kind, ordinal)
    state = owner.module._modules[state_name(kind, ordinal)]
    guards.add(source.make_guard(GuardBuilder.ID_MATCH))

    def walk(module: nn.Module, source: Any) -> None:
        for table in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, table).items():
                if tensor is not None:
                    guards.add(DictGetItemSource(AttrSource(source, table), name).make_guard(GuardBuilder.ID_MATCH))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, DictGetItemSource(AttrSource(source, "_modules"), name))

    walk(state, source)
    _warn_near_recompile_limit(kind)


def _warn_near_recompile_limit(kind: str) -> None:
    """Say so when this frame's code is compiled for as many states as Dynamo keeps: the next instance
    (a 9th layer compiled one by one) would run uncompiled — plain softmax — with only Dynamo's
    warning, which names a guard and not the consequence."""
    import torch._dynamo

    frame = _frame()
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        compiled = len(_debug_get_cache_entry_list(frame.f_code)) + 1  # + the one being compiled
    except Exception:  # noqa: BLE001 — a private API: without it, no early warning
        return
    limit = torch._dynamo.config.recompile_limit
    if compiled >= limit:
        name = frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname") else frame.f_code.co_name
        warnings.warn(
            f"attnrewrite: {name} now has {compiled} compiled versions (torch._dynamo.config.recompile_limit = "
            f"{limit}): each module holding a {kind} state gets its own, and further ones will run uncompiled, with "
            "plain softmax attention. Compile the whole model once, or raise the limit to the number of such "
            "modules.", RewriteWarning, stacklevel=2)


def states(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    """Every state of ``kind`` attached in ``model``, by qualified name."""
    pattern = re.compile(re.escape(state_name(kind, 0)) + r"(_\d+)?$")
    return {name: m for name, m in model.named_modules() if pattern.match(name.rsplit(".", 1)[-1])}


def is_state_name(name: str) -> bool:
    """True for a parameter or module name that goes through a state (``...attnrewrite_linear.q_map...``)."""
    return any(part.startswith(PREFIX) for part in name.split("."))
