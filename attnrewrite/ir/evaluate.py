"""The float64 graph evaluator: parts of a captured graph run on concrete values.

Certification evaluates a site's region and its canonical form with it; the mask resolver
reads constant masks with it; both ask it whether a value depends on the user's data.
Casts to lower precision are evaluated in float64 and dropout is off, so two spellings of
the same function agree to rounding.

In-place writes are evaluated as the graph runs them.  A mask built as ``m = zeros(T, T)``
then ``m[:, 5:] = -inf`` has no dataflow edge from the write to the reads of ``m``, so the
nodes needed for a value are its inputs *and* every node that may write into its storage
(:class:`~attnrewrite.ir.capture.Writes`) before the point where it is read; they run in graph
order, on copies, with the writes really executed.  A value is therefore always asked for
*at* a node: the value a reader placed just before that node sees.  We evaluate the graph as
written rather than functionalizing it first: the rewrite reads the very same nodes at the
same point, so what is certified is what runs, and the user's graph is left as it is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

from attnrewrite.ir.capture import (
    Writes,
    canonical_name,
    example,
    hint,
    hinted_shape,
    placeholder_role,
    value_inputs,
)

#: Largest number of nodes evaluated to produce one site's inputs (masks, biases).
CLOSURE_LIMIT = 2000

_LOW_PRECISION_METHODS = {"float": "double", "half": "double", "bfloat16": "double"}


class ClosureTooLarge(Exception):
    pass


class UnreadableWrite(Exception):
    """A value is written in place in a way the evaluator cannot reproduce exactly."""


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        return value.detach().to(torch.float64)
    return value


def _retarget(value: Any) -> Any:
    """Float dtypes become float64 so casts inside a site are evaluated without rounding."""
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    if isinstance(value, (tuple, list)):
        return type(value)(_retarget(v) for v in value)
    if isinstance(value, dict):
        return {k: _retarget(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class GraphEvaluator:
    """Evaluates parts of a captured graph on concrete float64 values.

    Placeholders take the real example inputs (cloned, so in-place ops cannot touch the
    user's tensors); symbolic sizes take their hints; any node whose example value is a size
    or a number is read from its hint rather than computed.  With ``randomize=True``, user
    inputs and parameters are replaced by random values of the same kind (0/1 masks stay
    0/1 masks); buffers, which hold constants such as causal masks, keep their values.
    ``randomize="perturbed"`` changes the real values a little instead (see :meth:`_perturbed`).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Iterable[Any], seed: int = 0):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(placeholders, example_inputs))
        self._writes = Writes(gm.graph)
        mutated = {n for n in placeholders if self._writes.writes_into(n)}
        self.roles = {n: placeholder_role(n, self.inputs.get(n), mutated) for n in placeholders}
        self.generator = torch.Generator().manual_seed(seed)
        self._order: dict[fx.Node, int] = self._writes.position
        self._values: dict[frozenset, dict] = {}  # values asked for, per set of nodes evaluated together
        self._dependence: dict[tuple[str, ...], tuple[dict[fx.Node, bool], dict[Any, bool]]] = {}

    # ------------------------------------------------------------------ values

    def random_like_meta(self, node: fx.Node) -> torch.Tensor:
        """A fresh float64 standard-normal tensor with ``node``'s (hinted) shape."""
        return torch.randn(hinted_shape(node), generator=self.generator, dtype=torch.float64)

    def _random_like(self, value: torch.Tensor, role: str) -> torch.Tensor:
        g = self.generator
        if value.dtype == torch.bool:
            return self._random_mask(value.shape)
        zero_one = value.numel() and bool(((value == 0) | (value == 1)).all())
        if zero_one and (role == "input" or not value.dtype.is_floating_point):  # 0/1 masks stay 0/1 masks
            return self._random_mask(value.shape).to(value.dtype)
        if value.dtype.is_floating_point:  # (a parameter initialised to zeros or ones is not a mask)
            return torch.randn(value.shape, generator=g, dtype=torch.float64)
        return value  # integer ids or positions: their values are meaningful, keep them

    def _random_mask(self, shape: torch.Size) -> torch.Tensor:
        """A random 0/1 mask, mostly ones, in which every row (last dim) holds both values.

        Each row keeping and dropping something matters: a spec that forgets the mask in one
        batch row only is caught when that row masks a key, and a row with nothing kept would
        be left out of the comparison.  (Rows of length 1 are drawn as they come.)
        """
        g = self.generator
        mask = torch.rand(shape, generator=g) > 0.2
        n = shape[-1] if len(shape) else 1
        if n < 2 or mask.numel() == 0:
            return mask
        rows = mask.reshape(-1, n)
        index = torch.arange(rows.shape[0])
        dropped = torch.randint(n, (rows.shape[0],), generator=g)
        kept = (dropped + torch.randint(1, n, (rows.shape[0],), generator=g)) % n
        rows[index, dropped] = False
        rows[index, kept] = True
        return rows.reshape(shape)

    def _perturbed(self, value: torch.Tensor) -> torch.Tensor:
        """The real value, a little changed: 0/1 masks with one entry in ten flipped, floats moved by a
        tenth of their spread.  For masks computed from inputs by arithmetic (lengths through a
        convolution's length formula, thresholds) where random values mask every key."""
        g = self.generator
        if value.dtype == torch.bool or (value.numel() and bool(((value == 0) | (value == 1)).all())):
            flip = torch.rand(value.shape, generator=g) < 0.1
            return (value.bool() ^ flip).to(value.dtype)
        if value.dtype.is_floating_point and value.numel():
            value = value.to(torch.float64)
            spread = float(value.std()) if value.numel() > 1 else 0.0
            spread = spread or 0.1 * float(value.abs().max()) or 0.1
            return value + 0.1 * spread * torch.randn(value.shape, generator=g, dtype=torch.float64)
        return value

    def placeholder_value(self, node: fx.Node, randomize: bool | str) -> Any:
        """A placeholder's value: the real example input (cloned), or, with ``randomize`` (``True`` or
        ``"random"``: random values of the same kind; ``"perturbed"``: the real values a little changed),
        a new draw for user inputs and parameters."""
        real = self.inputs.get(node)
        role = self.roles.get(node, "input")
        if role == "size" or not isinstance(real, torch.Tensor):
            return hint(real if real is not None else example(node))
        if is_fake(real):  # called under export or another backend: synthesise from metadata
            shape, dtype = hinted_shape(node), real.dtype
            value = torch.randn(shape, generator=self.generator) if dtype.is_floating_point else torch.zeros(
                shape, dtype=dtype)
        else:
            value = real.detach().clone()
        if randomize and role in ("input", "param"):
            value = self._perturbed(value) if randomize == "perturbed" else self._random_like(value, role)
        return _to_float64(value)

    def compute(self, node: fx.Node, env: dict, randomize: bool | str = False) -> Any:
        """The value of one node, its inputs taken from ``env``."""
        if node.op == "placeholder":
            return self.placeholder_value(node, randomize)
        meta = example(node)
        if isinstance(meta, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size)):
            return hint(meta)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            # a copy: the graph may write into it in place, the module's tensor must not change
            return _to_float64(obj.detach().clone()) if isinstance(obj, torch.Tensor) else obj
        result = self._call(node, env)
        written = self._writes.written
        if written(node) or any(written(a) for a in node.all_input_nodes):
            result = self._alias_as_traced(node, result, env)
        return result

    def _call(self, node: fx.Node, env: dict) -> Any:
        args = _retarget(fx.node.map_arg(node.args, lambda n: env[n]))
        kwargs = _retarget(fx.node.map_arg(node.kwargs, lambda n: env[n]))
        name = canonical_name(node)
        if name == "dropout":
            return args[0]
        if name == "sdpa":
            kwargs = dict(kwargs, dropout_p=0.0)
            if len(args) > 4:
                args = args[:4] + (0.0,) + args[5:]
        if name == "mha_forward":  # F.multi_head_attention_forward(..., add_zero_attn, dropout_p, ...)
            if len(args) > 10:
                args = args[:10] + (0.0,) + args[11:]
            else:
                kwargs = dict(kwargs, dropout_p=0.0)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            method = _LOW_PRECISION_METHODS.get(node.target, node.target)
            return getattr(args[0], method)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise ValueError(f"cannot evaluate node {node.name} ({node.op})")

    def _alias_as_traced(self, node: fx.Node, result: Any, env: dict) -> Any:
        """Make ``result`` share storage with an input exactly where the traced graph does: in
        float64 a cast such as ``.half()`` returns its input itself, where the model's own cast
        copies, and a write through one must not reach the other."""
        if not isinstance(result, torch.Tensor) or result.layout != torch.strided:
            return result
        group = self._writes.group.get(node)
        for arg in node.all_input_nodes:
            value = env.get(arg)
            if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
                continue
            shares = value.untyped_storage().data_ptr() == result.untyped_storage().data_ptr()
            traced = group is not None and group == self._writes.group.get(arg)
            if shares and not traced:
                result = result.clone()
            elif traced and not shares:
                raise UnreadableWrite(f"{node.name} is a view of {arg.name}, written in place, that the "
                                      f"float64 evaluation cannot reproduce")
        return result

    @property
    def writes(self) -> Writes:
        """The graph's in-place writes (re-read once the graph has gained nodes)."""
        nodes = self.gm.graph.nodes
        if len(self._writes.position) != len(nodes) or not all(self._writes.covers(n) for n in nodes):
            self._writes = Writes(self.gm.graph)
            self._dependence.clear()
        return self._writes

    def closure(self, targets: Iterable[fx.Node], env: dict, limit: int = CLOSURE_LIMIT,
                at: fx.Node | None = None) -> list[fx.Node]:
        """Nodes that must be computed, in graph order, to know ``targets`` as a reader placed just
        before ``at`` sees them (``at=None``: at the end of the graph), given ``env``: their inputs,
        and every write into their storage before ``at``, with its own inputs, and so on."""
        writes = self.writes
        self._order = writes.position
        needed: set[fx.Node] = set()
        stack = [t for t in targets if t not in env]
        while stack:
            node = stack.pop()
            if node in needed or node in env:
                continue
            needed.add(node)
            if len(needed) > limit:
                raise ClosureTooLarge(f"more than {limit} nodes feed {node.name}")
            if writes.unknown_write(node):
                raise UnreadableWrite(f"{node.name} is written in place by an operation attnrewrite does not read")
            meta = example(node)
            if isinstance(meta, (int, float, torch.SymInt, torch.SymFloat, torch.Size)):
                continue
            if node.op != "placeholder":
                stack.extend(n for n in node.all_input_nodes if n not in env)
            stack.extend(w for w in writes.writes_into(node, before=at) if w not in env)
        return sorted(needed, key=self.position)

    def position(self, node: fx.Node) -> int:
        """Index of ``node`` in graph order (recomputed once the graph has gained nodes)."""
        if node not in self._order:
            self._order = self.writes.position
        return self._order[node]

    @staticmethod
    def release_plan(order: list[fx.Node], keep: Iterable[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
        """For each node of ``order``, the nodes of ``order`` (``keep`` aside) whose value is no longer
        read once it has run: their last reader in ``order``, or themselves when nothing reads them.

        Every read of a value is a dataflow edge (in-place writes reach later readers through the
        written tensor or a view of it, which are values in their own right), so dropping a value
        from the environment after its last reader loses nothing; storage that a live view still
        shares stays alive with it.  At long sequence lengths this is what keeps certification from
        holding every [B, H, T, T] intermediate of a site at once.
        """
        members = set(order)
        last: dict[fx.Node, fx.Node] = {}
        for node in order:
            for arg in node.all_input_nodes:
                if arg in members:
                    last[arg] = node
        keep = set(keep)
        plan: dict[fx.Node, list[fx.Node]] = {}
        for node in order:
            if node not in keep:
                plan.setdefault(last.get(node, node), []).append(node)
        return plan

    def evaluate(self, targets: Iterable[fx.Node], env: dict | None = None, randomize: bool | str = False,
                 at: fx.Node | None = None, release: bool = False) -> dict:
        """Fill ``env`` with the values of ``targets`` as seen just before ``at`` (see :meth:`closure`)
        and everything they need, computed in graph order with in-place writes executed.

        With ``release=True`` only the targets (and what ``env`` held before) are left in ``env``:
        every other value is dropped after its last reader (:meth:`release_plan`), so the peak memory
        is that of the values live at once rather than of all of them."""
        env = {} if env is None else env
        targets = list(targets)
        order = self.closure(targets, env, at=at)
        plan = self.release_plan(order, targets) if release else {}
        with torch.no_grad(), float64_default():
            for node in order:
                env[node] = self.compute(node, env, randomize)
                for done in plan.get(node, ()):
                    del env[done]
        return env

    def value(self, node: fx.Node, at: fx.Node | None = None) -> Any:
        """The value of ``node`` on the real example inputs, as a reader just before ``at`` sees it
        (``at=None``: at the end of the graph).  Memoised per set of nodes evaluated, so layers that
        read one mask share its evaluation, and two reads that differ by a write do not; only the
        values asked for are kept, not the intermediates that produced them."""
        key = frozenset(self.closure([node], {}, at=at))
        known = self._values.setdefault(key, {})
        if node not in known:
            known[node] = self.evaluate([node], env={}, at=at, release=True)[node]
        return known[node]

    # ------------------------------------------------------------------ data dependence

    def depends_on_data(self, node: fx.Node) -> bool:
        """True when ``node``'s value depends on user inputs or parameters (not only on shapes,
        constants and buffers), through its inputs or through anything written into it in place."""
        return self._depends(node, ("input", "param"))

    def depends_on_inputs(self, node: fx.Node) -> bool:
        """True when ``node``'s value depends on the user's inputs (not only on parameters)."""
        return self._depends(node, ("input",))

    def _depends(self, node: fx.Node, roles: tuple[str, ...]) -> bool:
        writes = self.writes
        if roles not in self._dependence:
            # one pass in graph order: a node depends on what its inputs hold when it runs, and a
            # write taints its whole storage from then on (over time: the storage is tainted)
            own: dict[fx.Node, bool] = {}
            tainted: dict[Any, bool] = {}
            for current in self.gm.graph.nodes:
                meta = example(current)
                if current.op == "placeholder":
                    depends = self.roles.get(current, "input") in roles
                elif current.op == "get_attr" or isinstance(meta, (int, float, torch.SymInt, torch.SymFloat,
                                                                   torch.Size)):
                    depends = False
                else:
                    depends = any(own.get(n, True) or tainted.get(writes.group.get(n), False)
                                  for n in value_inputs(current))
                own[current] = depends
                if depends:
                    for target in writes.targets.get(current, ()):
                        tainted[writes.group[target]] = True
            self._dependence[roles] = own, tainted
        own, tainted = self._dependence[roles]
        return own.get(node, True) or tainted.get(writes.group.get(node), False)
