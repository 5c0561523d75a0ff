"""Rewriting: replace a certified site by its kind's operator, in place, before autograd.

New nodes are recorded by running :mod:`attnrewrite.ir.canonical` on ``torch.fx.Proxy``
objects, so the rewrite is the code the certifier evaluated.  Each new node gets an example
value (fake tensor) and the owning module's ``nn_module_stack``, as Dynamo would have given
it; the site's old nodes are removed only once nothing uses them, and nothing else is touched
(a graph-wide dead-code pass could drop in-place updates such as a KV-cache write).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.proxy import Proxy

from attnrewrite.ir import canonical
from attnrewrite.ir.capture import Writes, same_size, tensor_meta, written_by
from attnrewrite.ir.record import erase_unused, propagate_meta, recording
from attnrewrite.ir.spec import Site


class RewriteError(Exception):
    """A rewrite could not be completed; the site is left as it was."""


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def rewrite_site(gm: fx.GraphModule, site: Site, emit: Callable, fake_mode,
                 weights: Callable | None = None, positions: bool = False,
                 shift_invariant: bool = False) -> list[fx.Node]:
    """Replace ``site.output`` by ``emit(call)`` on the canonical call. Returns the new nodes.

    ``emit`` receives an :class:`~attnrewrite.ir.canonical.AttentionCall` of proxies and
    returns the [B, H, Tq, Dv] result (a proxy). ``weights``, when given, returns the kind's
    [B, H, Tq, Tk] attention weights, which replace the site's probabilities for their other uses.
    ``positions``: the kind computes position biases, so ``emit``'s call carries a ``position`` term apart
    (``call.position_slopes``); ``weights`` always gets it written out in ``attn_mask``.  ``shift_invariant``:
    the kind's softmax ignores a constant per query row, so a position term's shift is left out
    (:func:`attnrewrite.ir.canonical.attention_call`).
    """
    spec, graph = site.spec, gm.graph
    replaced = _replaced(gm)
    q_dtype = tensor_meta(spec.q.node).dtype
    out_meta = tensor_meta(site.output)
    new_weights = None
    with recording(graph, site.output) as (record_lookup, new_nodes):
        lookup = _through(replaced, record_lookup)
        call = canonical.attention_call(spec, lookup, q_dtype, positions=positions, shift_invariant=shift_invariant)
        out = canonical.apply_steps(emit(call), site.out_steps, lookup)
        if any(step[0] in ("transpose", "permute") for step in site.out_steps):
            out = out.contiguous()  # a product's output is contiguous: later views of it may rely on that
        if out_meta is not None and out_meta.dtype != q_dtype:
            out = out.to(out_meta.dtype)
    if weights is not None:
        # the weights' other users (a cast, dropout, the returned tuple) may come before the value
        # product: record them right after the last node they read, before any of those users
        reads = {replaced.get(n, n) for n in {spec.q.node, spec.k.node, spec.v.node} | _spec_inputs(site)}
        order = {n: i for i, n in enumerate(graph.nodes)}
        # ... and after any in-place write into them before the site's output (certification read
        # them there: a mask built by writes into zeros must be read after its writes)
        writes = Writes(graph)
        reads |= {w for n in reads for w in writes.writes_into(n, before=site.output)}
        latest = max(reads, key=order.__getitem__)
        with recording(graph, latest.next) as (record_lookup, weight_nodes):
            lookup = _through(replaced, record_lookup)
            call = canonical.attention_call(spec, lookup, q_dtype)
            new_weights = canonical.apply_steps(weights(call), site.probs_steps, lookup)
            new_weights = new_weights.to(tensor_meta(site.probs).dtype)
        new_nodes = weight_nodes + new_nodes
    try:
        propagate_meta(new_nodes, fake_mode, site.output, gm)
        checks = [(out, site.output)] + ([(new_weights, site.probs)] if new_weights is not None else [])
        for new, old in checks:
            new_meta, old_meta = tensor_meta(new.node), tensor_meta(old)
            if old_meta is not None and (new_meta is None or not _same_shape(new_meta, old_meta)):
                raise RewriteError(
                    f"rewritten {old.name} has shape {None if new_meta is None else tuple(new_meta.shape)}, "
                    f"the original {tuple(old_meta.shape)}")
    except Exception:
        for node in reversed(new_nodes):
            graph.erase_node(node)
        raise
    site.output.replace_all_uses_with(out.node)
    replaced[site.output] = out.node
    if new_weights is not None:
        site.probs.replace_all_uses_with(new_weights.node)
        replaced[site.probs] = new_weights.node
    region = set(site.region)
    frontier = {node for part in site.region for node in part.all_input_nodes if node not in region}
    erase_unused(site.region)
    erase_dead_inputs(frontier | _spec_inputs(site))
    for term in spec.bias:  # the original [.., Tq, Tk] bias of a relative term, once no site reads it any more
        if term.relative is not None and positions:
            erase_unused(_relative_sources(graph, term))
    return new_nodes


#: substrings of the targets that draw random numbers: erasing an unused one would shift later draws
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson", "exponential", "cauchy",
           "geometric")


def erase_dead_inputs(nodes: set[fx.Node]) -> int:
    """Erase the nodes of ``nodes`` that nothing reads once their site is rewritten, and what only they read,
    when they are pure (no in-place write, nothing torch.fx calls impure, no random draw). Returns the count.

    A site's inputs lie outside its region (other sites may share them): a kind that reads no mask leaves e.g. the model's ``~mask`` [Tq, Tk] behind, which every layer would still compute under
    ``compiler="eager"`` (at T = 8k, 64 MB per layer)."""
    erased, stack = 0, list(nodes)
    while stack:
        node = stack.pop()
        name = str(getattr(node.target, "__name__", node.target)).lower()
        if (getattr(node, "_erased", False) or node.users or node.op not in ("call_function", "call_method")
                or written_by(node) or node.is_impure() or any(word in name for word in _RANDOM)):
            continue
        inputs = node.all_input_nodes
        node.graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def _relative_sources(graph: fx.Graph, term) -> list[fx.Node]:
    """The nodes that computed a ``relative`` term on the grid, in graph order: its chain and leaves, and the
    index arithmetic under the leaves (aranges, views, differences; pure: the matcher proved them so)."""
    found = set(term.relative.chain) | {term.node}
    stack = [leaf for leaf, _, _ in term.relative.leaves]
    while stack:
        node = stack.pop()
        if node in found or node.op not in ("call_function", "call_method"):
            continue
        found.add(node)
        stack.extend(node.all_input_nodes)
    # (an in-place write into anything else stays, and with it what it reads)
    return [n for n in graph.nodes if n in found and all(w in found for w in written_by(n))]


def _replaced(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Old site outputs (and probabilities) → the nodes that replaced them, for this graph's pass.

    Sites are matched and certified before any is rewritten, so a later site's spec may still name
    an earlier site's output — when one attention's output is the next one's query (chained sites):
    its canonical form must read the replacement, not the erased original."""
    if not hasattr(gm.graph, "_attnrewrite_replaced"):  # on the graph: a restored backup starts afresh
        gm.graph._attnrewrite_replaced = {}
    return gm.graph._attnrewrite_replaced


def _through(replaced: dict[fx.Node, fx.Node], lookup: Callable) -> Callable:
    def read(node: fx.Node) -> Any:
        while node in replaced:
            node = replaced[node]
        return lookup(node)

    return read


def _spec_inputs(site: Site) -> set[fx.Node]:
    """Nodes the canonical form reads besides q, k, v (mask terms, scale factors, sizes in steps, a
    symbolic dropout probability)."""
    spec, nodes = site.spec, set()
    for steps in [spec.q.steps, spec.k.steps, spec.v.steps, site.probs_steps] + [t.steps for t in spec.bias]:
        for step in steps:
            fx.node.map_arg(step, nodes.add)
    nodes |= {spec.dropout_node} if spec.dropout_node is not None else set()
    if spec.sink_logits is not None:  # gpt-oss's learned sinks (and sizes in their steps)
        nodes.add(spec.sink_logits.node)
        for step in spec.sink_logits.steps:
            fx.node.map_arg(step, nodes.add)
    for term in spec.bias:  # what a relative bias's replay reads (its table)
        nodes |= term.relative.inputs() if term.relative is not None else set()
    nodes |= {node for t in spec.bias for node, _ in t.offset if node is not None}  # a position term's sizes
    return nodes | {t.node for t in spec.bias} | {n for n, _ in spec.q_factors}


def module_caller(gm: fx.GraphModule, module: torch.nn.Module, name: str) -> Callable:
    """Add ``module`` to ``gm`` (once) and return a function that records calls to it on proxies."""
    if not hasattr(gm, name):
        gm.add_submodule(name, module)
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:  # AOTAutograd reads one Dynamo source per lifted parameter/buffer
            from torch._dynamo.source import ConstantSource

            tensors = list(module.named_parameters(prefix=name, remove_duplicate=False))
            tensors += list(module.named_buffers(prefix=name, remove_duplicate=False))
            for tensor_name, _ in tensors:
                sources[tensor_name] = ConstantSource(f"__attnrewrite_{tensor_name.replace('.', '_')}")

    def call(*args: Proxy, **kwargs: Any) -> Proxy:
        tracer = args[0].tracer
        return tracer.create_proxy("call_module", name, args, kwargs)

    return call
