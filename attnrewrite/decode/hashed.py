"""``attnrewrite.HashedCache``: the KV cache of the ``hashed`` kind.

Each layer stores the keys and values [B, Hkv, T, D] and, beside them, each key's code bit-packed
[B, Hkv, T, bits/8] uint8 (written once, when the key arrives).  A decode step packs the query
heads' codes, scores all T keys with XOR and popcount over T·bits/8 bytes per query head, picks
the first ``sinks``, the last ``window`` and the ``top_k`` best-agreeing others (the heads of a
grouped-query group share the pick, as in the op), and returns only those keys and values: the
attention then reads sinks + window + top_k entries instead of T.

A step of several tokens (a prefill) returns every key with a [B, Hq, T, n] mask of each query's
selection, computed as the op computes it.  Semantics are those of
:func:`attnrewrite.ops.hashed_attention` with ``is_causal=True`` (tested: T tokens at once and one
at a time give the op's outputs).  Selection needs the queries, so transformers models, whose
attention does not pass them to ``Cache.update``, must pass ``cache_kwargs={"query_states": q}``.
"""

from __future__ import annotations

import torch

from attnrewrite.decode.cache import KindCache, LayerCache
from attnrewrite.kernels.hashed.codes import hamming, pack, projections, signs
from attnrewrite.kernels.hashed.op import HASHES
from attnrewrite.kernels.hashed.sparse import select, visible_keys


class HashedLayer(LayerCache):
    """One layer's hashed cache (see the module docstring)."""

    def __init__(self, bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, seed: int = 0,
                 learned: tuple[torch.Tensor, torch.Tensor] | None = None, max_seq_len: int | None = None):
        super().__init__(max_seq_len)
        if bits < 8 or bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        self.bits, self.top_k, self.window, self.sinks, self.seed = bits, top_k, window, sinks, seed
        self.learned = learned

    def capacity_for(self, max_seq_len: int) -> int:
        return max_seq_len

    def prepare(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype, device, value_dim=None):
        self.allocate({"key_store": (batch, heads_kv, head_dim, dtype),
                       "value_store": (batch, heads_kv, value_dim or head_dim, dtype),
                       "code_store": (batch, heads_kv, self.bits // 8, torch.uint8)}, device)
        q_projection, k_projection = self.learned if self.learned is not None else (None, None)
        self.proj_q, self.proj_k = projections(q_projection, k_projection, head_dim, self.bits, self.seed, device)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.prepare(batch, heads, heads, dim, key_states.dtype, key_states.device, value_states.shape[-1])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, Hkv, T, D] and their codes at the next T positions, without attending."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        start, stop = self.length, self.length + k.shape[-2]
        self.ensure_capacity(stop)
        self.key_store[:, :, start:stop] = k
        self.value_store[:, :, start:stop] = v
        self.code_store[:, :, start:stop] = pack(k, self.proj_k)
        self.length = stop

    def select_decode(self, q: torch.Tensor) -> torch.Tensor:
        """Indices [B, Hkv, S] (ascending) of the keys that the one-token queries q [B, Hq, 1, D] attend to.

        The same set as the op's ``topk`` over (agreement, position), found in O(T) passes: agreements
        are small integers (0 … g·bits), so a histogram per head gives the agreement threshold of the
        ``top_k``-th best key, and of the keys exactly at the threshold the latest ones are taken.
        """
        length, bits = self.length, self.bits
        batch, heads_q = q.shape[:2]
        heads_kv = self.key_store.shape[1]
        groups = heads_q // heads_kv
        query_codes = pack(q, self.proj_q).reshape(batch, heads_kv, groups, bits // 8)
        agreement = groups * bits - hamming(query_codes, self.code_store[:, :, :length]).to(q.device)  # [B, Hkv, T]
        position = torch.arange(length, device=q.device)
        always = (position < self.sinks) | (position >= length - self.window)
        need = min(self.top_k, length - int(always.sum()))
        chosen = always.expand(batch, heads_kv, length).clone()
        if need > 0:
            candidates = agreement.masked_fill(always, -1)
            counts = torch.zeros(batch, heads_kv, groups * bits + 2, dtype=torch.long, device=q.device)
            counts.scatter_add_(-1, candidates + 1, torch.ones_like(candidates))            # slot 0: not a candidate
            at_least = counts[..., 1:].flip(-1).cumsum(-1).flip(-1)                      # [v]: candidates >= v
            threshold = (at_least >= need).sum(-1, keepdim=True) - 1
            above = candidates > threshold
            ties = candidates == threshold
            tie_rank = ties.long().cumsum(-1)
            from_end = tie_rank[..., -1:] - tie_rank + ties.long()                       # 1 for the last tie
            chosen |= above | (ties & (from_end <= need - above.sum(-1, keepdim=True)))
        return chosen.nonzero()[:, -1].view(batch, heads_kv, -1)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Add k, v [B, Hkv, T, D] at the next T positions; return (keys, values, visible) for the queries
        q [B, Hq, T, D]: the selected keys/values [B, Hkv, S, D] and None for one query, or every key
        [B, Hkv, n, D] and the selection as a mask [B, Hq, T, n] for several."""
        start = self.length
        self.append(k, v)
        length = self.length
        keys, values = self.key_store[:, :, :length], self.value_store[:, :, :length]
        if q.shape[-2] == 1:
            index = self.select_decode(q)                                                    # [B, Hkv, S]
            batch, heads_kv, selected = index.shape
            rows = (index + (torch.arange(batch * heads_kv, device=q.device)
                             * self.key_store.shape[2]).view(batch, heads_kv, 1)).view(-1)
            keys = self.key_store.view(-1, self.key_store.shape[-1]).index_select(0, rows)
            values = self.value_store.view(-1, self.value_store.shape[-1]).index_select(0, rows)
            return keys.view(batch, heads_kv, selected, -1), values.view(batch, heads_kv, selected, -1), None
        batch, heads_q, count, _ = q.shape
        heads_kv = keys.shape[1]
        rows = slice(0, count)
        visible = visible_keys(None, rows, length, start, q.device)
        index = select(signs(q, self.proj_q), signs(keys, self.proj_k), visible, self.bits, self.top_k,
                       self.window, self.sinks)                                              # [B, Hkv, T, S]
        chosen = torch.zeros(batch, heads_kv, count, length + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(index >= 0, index, length), True)                   # −1 → a spare column
        chosen = chosen[..., :length].repeat_interleave(heads_q // heads_kv, dim=1)
        return keys, values, chosen

    def attend(self, input_pos: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None):
        """The llama target's hook: store the step's k, v and return (keys, values, mask) for q."""
        self.check_positions(input_pos, k.shape[-2])
        keys, values, visible = self.step(q, k, v)
        if visible is None:
            visible = torch.ones(1, keys.shape[2], dtype=torch.bool, device=k.device)
        return keys, values, visible

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None,
               *args, **kwargs):
        """transformers' hook: needs ``cache_kwargs["query_states"]`` (one-token steps; the selection
        depends on the query, which transformers' attention does not otherwise pass)."""
        query = (cache_kwargs or {}).get("query_states")
        if query is None or query.shape[-2] != 1:
            raise ValueError("HashedCache selects keys per query: call update(k, v, layer_idx, "
                             "{'query_states': q}) with a one-token query (q [B, Hq, 1, D])")
        keys, values, _ = self.step(query, key_states, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        selected = min(self.length + query_length, self.sinks + self.window + self.top_k)
        return selected, self.length + query_length - selected


class HashedCache(KindCache):
    """The ``hashed`` kind's KV cache: keys, values and bit-packed key codes per layer.

    Args:
        bits, top_k, window, sinks, hash, seed: as for :func:`attnrewrite.ops.hashed_attention` (they must
            match the options the model was rewritten with).
        layer_states: for ``hash="learned"`` without the llama target: (P_q, P_k) (or
            :class:`~attnrewrite.kernels.hashed.state.HashProjections`) per layer.  With the llama
            target they are read from the attention modules (attached by :func:`attnrewrite.convert`).
    """

    kind = "hashed"

    def __init__(self, bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
                 seed: int = 0, layer_states: list | None = None):
        if hash not in HASHES:
            raise ValueError(f"hash must be one of {HASHES}, got {hash!r}")
        super().__init__(layer_states)
        self.options = dict(bits=bits, top_k=top_k, window=window, sinks=sinks, seed=seed)
        self.hash = hash

    def needs_state(self) -> bool:
        return self.hash == "learned"

    def new_layer(self, state, max_seq_len: int | None) -> HashedLayer:
        learned = None
        if state is not None:
            learned = (state.q_projection, state.k_projection) if hasattr(state, "q_projection") else tuple(state)
        return HashedLayer(**self.options, learned=learned, max_seq_len=max_seq_len)
