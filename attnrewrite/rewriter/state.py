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

**States as graph inputs.**  ``convert`` gives each owner a forward pre-hook (:func:`feed_states`)
that passes the owner's states' tensors through a marker operator (``attnrewrite_pass::site_states``,
an alias of the owner's first tensor argument): Dynamo traces the hook, so those tensors become inputs
of the captured graph like the model's own parameters.  The pass finds the site's marker (same owner,
same state name), calls the state as a function of those inputs (:class:`StateCall`, with the state
found on the owner as the template of the computation) and removes the marker.  One compiled graph
then serves every instance of a layer — a deepcopy, a reloaded model, the 12 layers of a model
compiled one by one — each running with its own state's tensors; guards on the state's class and
options keep a differently built state from reusing it.

Without a marker in the graph (a model whose states were attached without ``convert``, a hook whose
owner had no tensor argument, a DDP bucket split between hook and site) the rewrite adds the state
module itself to the graph, so the compiled code is only valid for that state object (and, once
AOTAutograd lifted them as constants, for its tensor objects): :func:`guard` then adds identity guards
on the state's attribute path and on each of its tensors, and a model compiled layer by layer
compiles once per layer (the backend warns when Dynamo's recompile limit is reached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from attnrewrite.ir.capture import module_path
from attnrewrite.ir.spec import STATE_PREFIX as PREFIX
from attnrewrite.ir.spec import NotAttention, state_name

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


def _self_name(code: Any) -> str | None:
    """The name of the first argument of the function ``code`` runs (``self`` for a method), also for a frame
    Dynamo resumes after a graph break: a resume function (``torch_dynamo_resume_in_forward_at_N``) takes the
    stack's values first (``___stack0``) and the original's locals after them, under their own names, so the
    name is read from the original function's code."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        resumed = ContinueExecutionCache.generated_code_metadata
    except (ImportError, AttributeError):  # another torch: no resume metadata to read
        resumed = {}
    seen = set()
    while code in resumed and id(code) not in seen:  # a resume of a resume: back to the original
        seen.add(id(code))
        code = resumed[code].code
    return code.co_varnames[0] if code.co_argcount else None


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
        name = _self_name(frame.f_code)
        if name is not None and name not in frame.f_locals and frame.f_code.co_name.startswith("torch_dynamo_resume"):
            raise NotAttention(f"it runs in the part of the module's forward that Dynamo resumed after a graph break "
                               f"({frame.f_code.co_name}), where the module that owns it ({name!r}) is no longer a "
                               "local, so its per-site parameters cannot be reached: remove the graph break before "
                               f"the attention (or use {name!r} after it)")
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


def states(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    """Every state of ``kind`` attached in ``model``, by qualified name."""
    pattern = re.compile(re.escape(state_name(kind, 0)) + r"(_\d+)?$")
    return {name: m for name, m in model.named_modules() if pattern.match(name.rsplit(".", 1)[-1])}


def is_state_name(name: str) -> bool:
    """True for a parameter or module name that goes through a state (``...attnrewrite_linear.q_map...``)."""
    return any(part.startswith(PREFIX) for part in name.split("."))


# --------------------------------------------------------------------------- states as graph inputs

#: The marker's namespace: not ``attnrewrite`` (whose operators are all kernels, opchecked as such).
_MARKER_LIB = torch.library.Library("attnrewrite_pass", "DEF")
_MARKER_LIB.define("site_states(Tensor(a) x, Tensor[] states, str name) -> Tensor(a)")
# an alias of x: wherever the pass does not remove it (eager runs, a graph it left alone) it costs a view
_MARKER_LIB.impl("site_states", lambda x, states, name: torch.ops.aten.alias(x), "CompositeImplicitAutograd")
MARKER = torch.ops.attnrewrite_pass.site_states.default


def state_tensors(state: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """A state's parameters and buffers, by qualified name, in one fixed order (parameters first); a
    tensor shared by two submodules (favor's one map for q and k) once: ``functional_call`` ties the
    other name to it, where passing it twice would leave the module holding a traced tensor."""
    named = [*state.named_parameters(), *state.named_buffers()]
    return [n for n, _ in named], [t for _, t in named]


def feed_states(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook that :func:`install_feed` puts on a state's owner: the owner's first tensor
    argument goes through one marker per state (see the module docstring), which makes the states'
    tensors inputs of a graph Dynamo captures.  Outside ``torch.compile`` only an alias is added."""
    names = [n for n in module._modules if n.startswith(PREFIX) and module._modules[n] is not None]
    if not names:
        return None
    args, kwargs = list(args), dict(kwargs)
    for i, a in enumerate(args):  # the first tensor argument, positional or keyword
        if isinstance(a, torch.Tensor):
            container, key = args, i
            break
    else:
        key = next((k for k, a in kwargs.items() if isinstance(a, torch.Tensor)), None)
        if key is None:
            return None
        container = kwargs
    x = container[key]
    for name in names:
        x = MARKER(x, state_tensors(module._modules[name])[1], name)
    container[key] = x
    return tuple(args), kwargs


def install_feed(owner: nn.Module) -> None:
    """Give ``owner`` the :func:`feed_states` pre-hook, once (hooks travel with deepcopy and pickling)."""
    if not any(hook is feed_states for hook in owner._forward_pre_hooks.values()):
        owner.register_forward_pre_hook(feed_states, with_kwargs=True)


def _stack_root(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def marker_for(gm: fx.GraphModule, anchor: fx.Node, name: str) -> fx.Node | None:
    """The marker of state ``name`` hooked on the module that ran ``anchor``, in ``gm``, or None."""
    owner = _stack_root(anchor)
    for node in gm.graph.find_nodes(op="call_function", target=MARKER):
        if node.args[2] == name and _stack_root(node) == owner:
            return node
    return None


def remove_markers(gm: fx.GraphModule) -> None:
    """Drop every marker from ``gm`` (each is an alias of its first argument)."""
    for node in list(gm.graph.find_nodes(op="call_function", target=MARKER)):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


class StateCall(nn.Module):
    """A state called as a function of tensors that are graph inputs: ``forward(*args, *tensors)``
    runs ``template``'s forward with its parameters and buffers replaced by ``tensors`` for the
    duration of the call.  The template is held outside the module tree, so nothing of it is lifted
    into the graph.  (Not ``torch.func.functional_call``: with a submodule shared by two names, as
    favor's one map for q and k, it restores the wrong tensor and leaves a traced one behind.)"""

    def __init__(self, template: nn.Module, num_args: int):
        super().__init__()
        object.__setattr__(self, "template", template)
        slots = {}
        for prefix, module in template.named_modules():
            for table in ("_parameters", "_buffers"):
                for key, tensor in getattr(module, table).items():
                    if tensor is not None:
                        slots.setdefault(f"{prefix}.{key}" if prefix else key, (module, table, key))
        names = state_tensors(template)[0]
        object.__setattr__(self, "slots", [slots[name] for name in names])
        self.num_args = num_args

    def forward(self, *inputs: torch.Tensor) -> Any:
        args, tensors = inputs[:self.num_args], inputs[self.num_args:]
        saved = [getattr(module, table)[key] for module, table, key in self.slots]
        try:
            for (module, table, key), tensor in zip(self.slots, tensors):
                getattr(module, table)[key] = tensor
            return self.template(*args)
        finally:
            for (module, table, key), tensor in zip(self.slots, saved):
                getattr(module, table)[key] = tensor


def input_caller(gm: fx.GraphModule, state: nn.Module, marker: fx.Node, name: str):
    """A caller for the kinds' ``emit`` (as :func:`~attnrewrite.rewriter.rewrite.module_caller`) that
    records a call of ``state`` on the marker's tensors, the graph inputs of this site's state."""
    tensor_nodes = list(marker.args[1])

    def call(*args: Any) -> Any:
        module_name = f"{name}_{len(args)}"
        if not hasattr(gm, module_name):
            gm.add_submodule(module_name, StateCall(state, len(args)))
        tracer = args[0].tracer
        tensors = [fx.Proxy(node, tracer) for node in tensor_nodes]
        return tracer.create_proxy("call_module", module_name, (*args, *tensors), {})

    return call


def guard_template(owner: Owner, kind: str, ordinal: int) -> None:
    """The compiled code runs the state found now as the template for every instance whose tensors
    reach it: guard on the class of the state and of each submodule, and on the options it was made
    for, so that a differently built state compiles its own."""
    import torch._guards
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import AttrSource, DictGetItemSource

    context = torch._guards.TracingContext.try_get()
    if context is None:
        return
    guards = context.guards_context.dynamo_guards
    source = owner.state_source(kind, ordinal)
    state = owner.module._modules[state_name(kind, ordinal)]

    def walk(module: nn.Module, source: Any) -> None:
        guards.add(source.make_guard(GuardBuilder.TYPE_MATCH))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, DictGetItemSource(AttrSource(source, "_modules"), name))

    walk(state, source)
    if isinstance(getattr(state, OPTIONS_ATTR, None), dict):
        guards.add(AttrSource(source, OPTIONS_ATTR).make_guard(GuardBuilder.DICT_KEYS_MATCH))
        for key, value in getattr(state, OPTIONS_ATTR).items():
            if isinstance(value, (bool, int, float, str, type(None))):
                guards.add(DictGetItemSource(AttrSource(source, OPTIONS_ATTR), key).make_guard(
                    GuardBuilder.EQUALS_MATCH))


def guard_site(gm: fx.GraphModule, anchor: fx.Node, owner: Owner, kind: str, ordinal: int) -> None:
    """The guards the site's state needs: on its class and options when its tensors are graph inputs
    (:func:`guard_template`), else on the identity of the state and its tensors (:func:`guard`)."""
    if marker_for(gm, anchor, state_name(kind, ordinal)) is not None:
        guard_template(owner, kind, ordinal)
    else:
        guard(owner, kind, ordinal)


def caller(gm: fx.GraphModule, anchor: fx.Node, kind: str, ordinal: int, module: nn.Module | None, index: int):
    """What the kinds' ``emit`` calls the site's state with: a call on the graph inputs of the site's
    marker when there is one, else a call of the state module added to ``gm``."""
    if module is None:
        return None
    marker = marker_for(gm, anchor, state_name(kind, ordinal))
    if marker is not None:
        return input_caller(gm, module, marker, f"attnrewrite_state_{index}")
    from attnrewrite.rewriter.rewrite import module_caller

    return module_caller(gm, module, f"attnrewrite_state_{index}")
