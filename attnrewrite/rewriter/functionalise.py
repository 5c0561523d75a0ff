"""Elementwise in-place writes into a private tensor, made out of place before matching.

The scores are very often written in place before the softmax::

    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    s.masked_fill_(mask, float("-inf"))          # or s += bias, s.div_(scale), s = s.add_(m) ...
    p = torch.softmax(s, dim=-1) @ v

Dynamo keeps the write as written: the softmax reads ``s``, with no dataflow edge from the write,
so matching sees the scores before their mask and certification refuses the site ("is written in
place by").  :func:`functionalise_writes` turns such a write ``w = t.op_(*args)`` into
``n = t.op(*args)`` placed where ``w`` was, makes every reader of ``t`` placed after ``w`` (and
every reader of ``w``) read ``n``, and erases ``w``.

Why that computes the same values.  A write is taken only when every one of these holds, else the
graph is left exactly as it was (and the site keeps its reason):

* it is one of ``masked_fill_ add_ sub_ mul_ div_`` (a method) or ``+= -= *= /=`` on a tensor:
  an elementwise op whose out-of-place form reads the same operands at the same point and
  returns the values the in-place form writes;
* the out-of-place form, run on the example values, has the target's shape, dtype and device
  (no broadcast to a larger shape, no type promotion: the in-place op would have kept them);
* the target ``t`` is a plain op output (not a placeholder, parameter, buffer, attribute or the
  result of a view), and nothing else in the graph shares its storage before its last write: no
  view or alias of it (``view``, ``transpose``, slicing, ``detach``, a no-op ``.float()`` ...) is
  made before that write, and every node that may write into the storage is itself such a write.
  So the only way to observe a write is to read ``t`` (or ``w``, the same tensor) after it.
  Readers placed before the write saw the old values and still read ``t``; readers after it saw
  the new ones and now read ``n``.  An alias made after the last write (XLM's ``scores.float()``
  on float32 scores) is such a reader: it becomes an alias of the last ``n``, whose values are
  the ones it saw, and no write follows to tell the two apart.
  The storage facts come from :class:`~attnrewrite.ir.capture.Writes` (fake tensors share a
  storage exactly where the real ones do); a node without an example value is not trusted.

Item assignment into ``t`` (``t[..., 6:] = -inf``, ``t[:, :, m] = -inf``, ``t[i] += b``, ``t[i].fill_(c)``,
``t.index_put_((m,), c)``) is one more kind of write, with the out-of-place form built by
:mod:`~attnrewrite.rewriter.item_writes` (a ``masked_fill`` over the indexed region, or ``t + P``); the
view such a write goes through is part of the write when the write is its only reader.

Several writes into one tensor are taken one after another, in graph order: the second then
writes into ``n``, itself a private op output.  Autograd is the same too: the out-of-place op
has the in-place op's derivative.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnrewrite.ir.capture import Writes, canonical_name, example
from attnrewrite.rewriter.item_writes import DryValue, Emitter, ItemWrite, emit_out_of_place, item_write

#: In-place spelling → out-of-place spelling, for methods and for the augmented operators.
OUT_OF_PLACE_METHODS = {"masked_fill_": "masked_fill", "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                          operator.itruediv: operator.truediv}


def _out_of_place(node: fx.Node) -> tuple[str, Any] | None:
    """``(op, target)`` of the out-of-place form of ``node``, or None when it is not a write taken here."""
    if node.op == "call_method" and node.target in OUT_OF_PLACE_METHODS:
        return "call_method", OUT_OF_PLACE_METHODS[node.target]
    if node.op == "call_function":
        try:
            return ("call_function", OUT_OF_PLACE_OPERATORS[node.target]) if node.target in OUT_OF_PLACE_OPERATORS \
                else None
        except TypeError:  # unhashable target
            return None
    return None


def _fake_tensor(node: Any) -> torch.Tensor | None:
    value = example(node)
    return value if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode") else None


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)


def _writes_into_private(target: fx.Node, writes: Writes) -> tuple[list[Any], list[fx.Node]] | None:
    """The writes into ``target`` (elementwise write nodes and :class:`ItemWrite` s) and the aliases of it,
    in graph order, when the writes may all be made out of place: nothing but ``target``, such writes (and
    their results, the same tensor; an item write's view, used by it alone) and aliases made after the
    last of them (``scores.float()`` on float32 scores) share its storage.  Else None."""
    if target.op not in ("call_function", "call_method", "call_module") or _fake_tensor(target) is None:
        return None
    if canonical_name(target) in ("view", "transpose", "permute", "unsqueeze", "expand", "flatten", "unflatten",
                                  "getitem", "identity", "cast"):
        return None  # a view of something (or the thing itself)
    group = writes.group.get(target)
    if group is None or group[0] != "storage" or writes.unknown_write(target):
        return None
    members = writes.members.get(group, [])
    if members[0] is not target:
        return None  # the storage was there before it (an alias of an earlier value)
    found = writes.writers.get(group, [])
    if not found:
        return None
    units: list[Any] = []
    whole = {target}  # the target and the results of the writes so far: the same tensor, whole
    parts: set[fx.Node] = set()  # the nodes of the item writes (their views included)
    for write in found:
        if write in parts:
            continue
        if _out_of_place(write) is not None and write.args[0] in whole and write in members \
                and writes.targets.get(write) == [write.args[0]]:
            units.append(write)
            whole.add(write)
            continue
        unit = item_write(write)
        if unit is None or unit.base not in whole:
            return None  # another kind of write, or one that writes elsewhere as well (an out= argument ...)
        units.append(unit)
        parts.update(unit.nodes)
    last = writes.position[found[-1]]
    aliases = [m for m in members if m not in whole and m not in parts]
    if any(writes.position[a] < last or a.op not in ("call_function", "call_method") for a in aliases):
        return None  # a view or alias of the target that a write reaches, or another node on its storage
    if any(w not in parts and writes.targets.get(w) != [w.args[0]] for w in found):
        return None
    return units, aliases


def _fake_result(write: fx.Node, op: str, target: Any, known: dict | None = None) -> torch.Tensor | None:
    """``write``'s arguments (their example values, or ``known``'s) given to ``op``/``target`` in fake mode,
    or None when that cannot be done (or raises)."""
    missing = []

    def value(n: fx.Node) -> Any:
        v = known[n] if known and n in known else example(n)
        if v is None:
            missing.append(n)
        return v

    args = fx.node.map_arg(write.args, value)
    kwargs = fx.node.map_arg(write.kwargs, value)
    if missing:
        return None
    shape_env = getattr(getattr(args[0], "fake_mode", None), "shape_env", None)
    try:  # (a check only: no guard on the user's shapes comes of it)
        with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
            result = getattr(args[0], target)(*args[1:], **kwargs) if op == "call_method" else target(*args, **kwargs)
    except Exception:  # noqa: BLE001 — anything the fake run refuses is left as written
        return None
    return result if isinstance(result, torch.Tensor) else None


def _same_layout(written: torch.Tensor, before: torch.Tensor) -> bool:
    return (written.dtype == before.dtype and written.device == before.device and written.dim() == before.dim()
            and all(_same(a, b) for a, b in zip(written.shape, before.shape)))


def _dry_run(unit: Any, before: torch.Tensor) -> torch.Tensor | None:
    """The value ``unit`` (a write node or an :class:`ItemWrite`) leaves in its target, run on fake tensors."""
    if not isinstance(unit, ItemWrite):
        return _fake_result(unit, *_out_of_place(unit))
    try:
        result = emit_out_of_place(unit, DryValue(before), Emitter(before.fake_mode))
    except Exception:  # noqa: BLE001 — anything the fake run refuses is left as written
        return None
    return None if result is None else result.value


def _functionalise(gm: fx.GraphModule, target: fx.Node, chain: list[Any], aliases: list[fx.Node],
                   writes: Writes) -> bool:
    """Replace every write of ``chain`` (all of ``target``'s) by its out-of-place form, or none of them.
    ``aliases`` (made after the last write) become aliases of the last out-of-place result."""
    before = _fake_tensor(target)
    results = [_dry_run(w, before) for w in chain]
    if any(r is None or not _same_layout(r, before) for r in results):
        return False
    members = {target, *(w for w in chain if not isinstance(w, ItemWrite))}
    known = dict.fromkeys(members, results[-1])
    for alias in aliases:  # (their example values shared the written storage: they share the result's now)
        known[alias] = _fake_result(alias, alias.op, alias.target, known)
        if known[alias] is None:
            return False
    current = target
    for write, written in zip(chain, results):
        last = write.last if isinstance(write, ItemWrite) else write
        position = writes.position[last]
        if isinstance(write, ItemWrite):
            meta = {k: v for k, v in last.meta.items() if k not in ("example_value", "val")}
            emit = Emitter(before.fake_mode, gm.graph, meta)
            with gm.graph.inserting_before(last):
                new = emit_out_of_place(write, current, emit)
            if new is None:  # (the dry run above took the same path)
                raise RuntimeError(f"functionalise: {last.name} could not be written out of place after all")
            for node in reversed(emit.created):  # (a region built for a tensor placed by padding is not read)
                if not node.users and node is not new:
                    gm.graph.erase_node(node)
                else:
                    writes.position[node] = position
            new._rename(f"{target.name}_functional")
        else:
            op, name = _out_of_place(write)
            args = fx.node.map_arg(write.args, lambda n: current if n in members else n)
            kwargs = fx.node.map_arg(dict(write.kwargs), lambda n: current if n in members else n)
            with gm.graph.inserting_before(write):
                new = gm.graph.create_node(op, name, args, kwargs, name=f"{target.name}_functional")
            new.meta = {k: v for k, v in write.meta.items() if k not in ("example_value", "val")}
            new.meta["example_value"] = written
        writes.position[new] = position  # (readers made by other targets' writes too)
        for member in members:  # readers after the write read the written values
            for user in list(member.users):
                if user is not new and writes.position.get(user, -1) > position:
                    user.replace_input_with(member, new)
        if isinstance(write, ItemWrite):
            for node in reversed(write.nodes):  # (each used by the next alone, the last by no one)
                gm.graph.erase_node(node)
        else:
            write.replace_all_uses_with(new)
            gm.graph.erase_node(write)
            members.discard(write)
        members.add(new)  # the readers after the next write may read this one now
        current = new
    for alias in aliases:
        alias.meta = {k: v for k, v in alias.meta.items() if k not in ("example_value", "val")}
        alias.meta["example_value"] = known[alias]
    # the target's example counted the writes in its version; it is now a tensor no one writes
    target.meta = {k: _fresh(v) if k in ("example_value", "val") and _fake_tensor(v) is not None else v
                   for k, v in target.meta.items()}
    return True


def _fresh(value: torch.Tensor) -> torch.Tensor:
    shape_env = getattr(value.fake_mode, "shape_env", None)
    with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
        return value.clone()


def functionalise_writes(gm: fx.GraphModule) -> int:
    """Make every elementwise in-place write into a private op output out of place (module
    docstring); the others stay as they are.  Returns how many writes were replaced."""
    writes = Writes(gm.graph)
    targets = [n for n in gm.graph.nodes if n.op != "output"]
    done = 0
    for target in targets:
        found = _writes_into_private(target, writes) if writes.written(target) else None
        if found is not None and _functionalise(gm, target, *found, writes):
            done += len(found[0])
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
