"""Sites named from the compiled model's root in the report, whichever frame Dynamo compiled them in.

A site's module path comes from its anchor's ``nn_module_stack``: a path from a local of the frame Dynamo is
compiling (``L['self'].layers.0.attn``).  For ``torch.compile(model)`` the first frame is the model's, but a frame
Dynamo compiles later around a submodule — the rest of a layer's forward resumed after a graph break, a layer
whose call Dynamo compiles as a frame of its own after a break in its caller — roots its paths at that submodule:
its sites were reported as ``<root>`` or ``attn`` where the model names them ``layers.1.attn``.  The model being
compiled is on the Python stack then (the ``OptimizedModule`` that ``torch.compile(model)`` returned, calling into
its frames): a site whose path starts from the frame's ``self`` is named with that module's path in the model.
Names only: per-site states are found from the frame itself (:mod:`attnrewrite.rewriter.state`).
"""

from __future__ import annotations

import re
import sys

import torch.fx as fx
import torch.nn as nn

#: nn.Module's own frames of a call (``module(x)``): where the OptimizedModule is ``self``.
_MODULE_CALLS = frozenset({"_wrapped_call_impl", "_call_impl", "__call__"})

#: The root of an ``nn_module_stack`` entry when it is a local of the frame: ``L['self']``.
_LOCAL_ROOT = re.compile(r"^L\[['\"](?P<name>[^'\"]+)['\"]\]")


def root_prefix(anchor: fx.Node) -> str:
    """The path, in the model ``torch.compile`` wrapped, of the module the compiled frame runs as ``self`` when
    ``anchor``'s module path starts from it; ``""`` for the model itself, for a path from another local or a
    global, and outside a ``torch.compile``d module (a function compiled, ``nn.Module.compile``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    from attnrewrite.rewriter.state import _frame, _self_name

    frame = _frame()
    if frame is None:
        return ""
    name = _self_name(frame.f_code)
    module = frame.f_locals.get(name) if name is not None else None
    if not isinstance(module, nn.Module):
        return ""
    stack = anchor.meta.get("nn_module_stack") or {}
    if stack:
        root = _LOCAL_ROOT.match(list(stack.values())[-1][0])
        if root is None or root.group("name") != name:
            return ""
    caller = sys._getframe(1)
    while caller is not None:  # the OptimizedModule whose call Dynamo is compiling a frame for
        # only nn.Module's call frames are read (a frame's f_locals is a snapshot built on each read)
        wrapper = caller.f_locals.get("self") if caller.f_code.co_name in _MODULE_CALLS else None
        if isinstance(wrapper, OptimizedModule):
            for path, sub in wrapper._orig_mod.named_modules():
                if sub is module:
                    return path
            return ""
        caller = caller.f_back
    return ""


def from_root(prefix: str, path: str) -> str:
    """``path`` (a site's module path in its frame) named from the model's root."""
    return ".".join(part for part in (prefix, path) if part)


def named_from_root(anchor: fx.Node, path: str) -> str:
    """The module path ``path`` of the site anchored at ``anchor``, as the report and warnings name it."""
    return from_root(root_prefix(anchor), path)
