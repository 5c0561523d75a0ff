"""Proxy recording: new graph nodes written by running code on ``torch.fx.Proxy`` objects.

The rewrite records a kind's call this way, and so does unfusing a fused attention module;
new nodes get example values (fake tensors) and the metadata Dynamo would have given them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from attnrewrite.ir.capture import example

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def find_fake_mode(gm: fx.GraphModule, example_inputs: list[Any] | None = None):
    """The fake mode of the example values in ``gm``'s node metadata (new nodes need the same)."""
    from torch._guards import detect_fake_mode

    for node in gm.graph.nodes:
        value = example(node)
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            return value.fake_mode
    return detect_fake_mode(example_inputs or [])


def _call_module_fake(gm: fx.GraphModule, target: str, fake_mode, args, kwargs):
    """Run a submodule on fake inputs; its real parameters are converted on the fly (the module
    itself is never modified)."""
    module = gm.get_submodule(target)
    if fake_mode is None:
        return module(*args, **kwargs)
    previous = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        return module(*args, **kwargs)
    finally:
        fake_mode.allow_non_fake_inputs = previous


def propagate_meta(nodes: list[fx.Node], fake_mode, template: fx.Node | None, gm: fx.GraphModule | None = None) -> None:
    """Give ``nodes`` example values by running them on their inputs' example values."""
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    for node in nodes:
        args = fx.node.map_arg(node.args, example)
        kwargs = fx.node.map_arg(node.kwargs, example)
        with ctx:
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module" and gm is not None:
                value = _call_module_fake(gm, node.target, fake_mode, args, kwargs)
            else:
                continue
        node.meta["example_value"] = value
        if template is not None:
            for key in _META_KEYS:
                if key in template.meta and key not in node.meta:
                    node.meta[key] = template.meta[key]


@contextlib.contextmanager
def recording(graph: fx.Graph, before: fx.Node) -> Iterator[tuple[Callable[[fx.Node], Proxy], list[fx.Node]]]:
    """Record new nodes before ``before`` through proxies; yields (lookup, new_nodes).

    On an exception the nodes recorded so far are erased, leaving the graph as it was.
    """
    tracer = GraphAppendingTracer(graph)
    existing = set(graph.nodes)
    new_nodes: list[fx.Node] = []
    try:
        with graph.inserting_before(before):
            yield (lambda node: Proxy(node, tracer)), new_nodes
    except BaseException:
        for node in reversed([n for n in graph.nodes if n not in existing]):
            graph.erase_node(node)
        raise
    new_nodes.extend(n for n in graph.nodes if n not in existing)


def erase_unused(nodes: list[fx.Node]) -> int:
    """Erase the nodes of ``nodes`` that nothing uses any more (latest first). Returns the count.

    Only for nodes a pattern has read (a site's region): they compute values of the site
    alone, so once unused they can go — dropout included, which ``Node.is_impure`` keeps.
    """
    erased = 0
    for node in reversed(nodes):
        if not getattr(node, "_erased", False) and not node.users and node.op not in ("placeholder", "output"):
            node.graph.erase_node(node)
            erased += 1
    return erased
