"""The float64 graph evaluator: parts of a captured graph run on concrete values.

Certification evaluates a site's region and its canonical form with it; the mask resolver
reads constant masks with it; both ask it whether a value depends on the user's data.
Casts to lower precision are evaluated in float64 and dropout is off, so two spellings of
the same function agree to rounding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

from attnrewrite.ir.capture import (
    canonical_name,
    example,
    hint,
    hinted_shape,
    mutated_placeholders,
    placeholder_role,
    value_inputs,
)

#: Largest number of nodes evaluated to produce one site's inputs (masks, biases).
CLOSURE_LIMIT = 2000

_LOW_PRECISION_METHODS = {"float": "double", "half": "double", "bfloat16": "double"}


class ClosureTooLarge(Exception):
    pass


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
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Iterable[Any], seed: int = 0):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(placeholders, example_inputs))
        mutated = mutated_placeholders(gm.graph)
        self.roles = {n: placeholder_role(n, self.inputs.get(n), mutated) for n in placeholders}
        self._order: dict[fx.Node, int] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self._values: dict[fx.Node, Any] = {}
        self._data_memo: dict[fx.Node, bool] = {}
        self._input_memo: dict[fx.Node, bool] = {}

    # ------------------------------------------------------------------ values

    def random_like_meta(self, node: fx.Node) -> torch.Tensor:
        """A fresh float64 standard-normal tensor with ``node``'s (hinted) shape."""
        return torch.randn(hinted_shape(node), generator=self.generator, dtype=torch.float64)

    def _random_like(self, value: torch.Tensor) -> torch.Tensor:
        g = self.generator
        if value.dtype == torch.bool:
            return self._random_mask(value.shape)
        if value.dtype.is_floating_point:
            return torch.randn(value.shape, generator=g, dtype=torch.float64)
        if value.numel() and bool(((value == 0) | (value == 1)).all()):
            return self._random_mask(value.shape).to(value.dtype)
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

    def placeholder_value(self, node: fx.Node, randomize: bool) -> Any:
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
            value = self._random_like(value)
        return _to_float64(value)

    def compute(self, node: fx.Node, env: dict, randomize: bool = False) -> Any:
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
            return _to_float64(obj)
        args = _retarget(fx.node.map_arg(node.args, lambda n: env[n]))
        kwargs = _retarget(fx.node.map_arg(node.kwargs, lambda n: env[n]))
        name = canonical_name(node)
        if name == "dropout":
            return args[0]
        if name == "sdpa":
            kwargs = dict(kwargs, dropout_p=0.0)
            if len(args) > 4:
                args = args[:4] + (0.0,) + args[5:]
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            method = _LOW_PRECISION_METHODS.get(node.target, node.target)
            return getattr(args[0], method)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise ValueError(f"cannot evaluate node {node.name} ({node.op})")

    def closure(self, targets: Iterable[fx.Node], env: dict, limit: int = CLOSURE_LIMIT) -> list[fx.Node]:
        """Nodes that must be computed (in graph order) to know ``targets``, given ``env``."""
        needed: set[fx.Node] = set()
        stack = [t for t in targets if t not in env]
        while stack:
            node = stack.pop()
            if node in needed or node in env:
                continue
            needed.add(node)
            if len(needed) > limit:
                raise ClosureTooLarge(f"more than {limit} nodes feed {node.name}")
            meta = example(node)
            if node.op == "placeholder" or isinstance(meta, (int, float, torch.SymInt, torch.SymFloat, torch.Size)):
                continue
            stack.extend(n for n in node.all_input_nodes if n not in env)
        return sorted(needed, key=self.position)

    def position(self, node: fx.Node) -> int:
        """Index of ``node`` in graph order (recomputed once the graph has gained nodes)."""
        if node not in self._order:
            self._order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return self._order[node]

    def evaluate(self, targets: Iterable[fx.Node], env: dict | None = None, randomize: bool = False) -> dict:
        """Fill ``env`` with the values of ``targets`` and everything they need."""
        env = {} if env is None else env
        with torch.no_grad(), float64_default():
            for node in self.closure(list(targets), env):
                env[node] = self.compute(node, env, randomize)
        return env

    def value(self, node: fx.Node) -> Any:
        """The value of ``node`` on the real example inputs (memoised: masks are shared by layers)."""
        if node not in self._values:
            self.evaluate([node], env=self._values)
        return self._values[node]

    # ------------------------------------------------------------------ data dependence

    def depends_on_data(self, node: fx.Node) -> bool:
        """True when ``node``'s value depends on user inputs or parameters (not only on shapes,
        constants and buffers)."""
        return self._depends(node, ("input", "param"), self._data_memo)

    def depends_on_inputs(self, node: fx.Node) -> bool:
        """True when ``node``'s value depends on the user's inputs (not only on parameters)."""
        return self._depends(node, ("input",), self._input_memo)

    def _depends(self, node: fx.Node, roles: tuple[str, ...], memo: dict[fx.Node, bool]) -> bool:
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if current in memo:
                continue
            meta = example(current)
            if current.op == "placeholder":
                memo[current] = self.roles.get(current, "input") in roles
            elif current.op == "get_attr" or isinstance(meta, (int, float, torch.SymInt, torch.SymFloat, torch.Size)):
                memo[current] = False
            elif not expanded:
                stack.append((current, True))
                stack.extend((n, False) for n in value_inputs(current) if n not in memo)
            else:  # (a shape-only read, ones_like(scores), does not depend on the scores' values)
                memo[current] = any(memo.get(n, True) for n in value_inputs(current))
        return memo[node]
