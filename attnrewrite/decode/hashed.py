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
at a time give the op's outputs).  Selection needs the queries, which transformers does not pass to
``Cache.update``: with ``attn_implementation="attnrewrite_hashed"`` (:func:`attnrewrite.hf.hashed_forward`)
``update`` only stores the step and that attention function selects with the query (:func:`claim_step`);
code calling ``update`` itself may pass ``cache_kwargs={"query_states": q}`` instead.

Padding (``key_valid`` per step, or ``HashedCache(attention_mask=...)`` for ``update``): padded keys are
stored as zeros, flagged, and never selected; sinks and window are each row's first and last valid
keys, as in the op with that key mask.  A decode step then returns sinks + window + top_k slots per
row with a [B, 1, 1, S] mask: a row with fewer valid keys fills the last slots (see
:meth:`HashedCache.update` for why the last).

Mixed precision (``far_dtype``, off by default): the selected keys that are neither among the first ``sinks``
nor the last ``window`` visible keys (the far keys) are returned, keys and values, as x.to(far_dtype) cast back
to the cache's dtype, the rest unchanged: the op's rule (:mod:`attnrewrite.kernels.hashed.reference`, step 5).
The cache rounds when a step reads the keys; it stores every key at full precision, so it saves no memory
(a key's farness depends on the query: the keys of the window become far later, and a prefill's queries see
one key both near and far).  A several-token step returns every key twice, [full | rounded], and its mask
picks, per query, the copy that query uses.  Exact where the far values fit the cache's dtype: far_dtype equal
to it (then nothing changes), float8_e4m3fn, or a float32/float64 cache; other pairs (float16 far keys in a
bfloat16 cache, bfloat16 in a float16 one) raise a ValueError.
"""

from __future__ import annotations

import contextvars

import torch

from attnrewrite.decode.cache import KindCache, LayerCache
from attnrewrite.kernels.hashed.codes import hamming, pack, projections, signs
from attnrewrite.kernels.hashed.op import HASHES, far_dtype_of
from attnrewrite.kernels.hashed.sparse import select, visible_keys

try:  # the Triton decode selection (kernels/hashed/triton_decode.py) is optional
    from attnrewrite.kernels.hashed import triton_codes as _triton_codes
    from attnrewrite.kernels.hashed import triton_decode as _triton_decode
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _triton_codes = _triton_decode = None

_FLOAT8 = getattr(torch, "float8_e4m3fn", None)


def decode_on_kernels(q: torch.Tensor) -> bool:
    """Whether a one-token step's selection runs on the Triton decode kernels: CUDA tensors and triton
    importable.  (Steps with padded keys keep the torch selection, whose slot layout the padding mask reads.)"""
    return q.is_cuda and _triton_decode is not None


def far_keys(visible: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """bool [..., T]: of the visible keys (bool [..., T], True = seen), those neither among the first ``sinks``
    nor the last ``window``: the keys that ``far_dtype`` rounds when selected."""
    rank = visible.long().cumsum(-1)
    return visible & (rank > sinks) & (rank <= rank[..., -1:] - window)


class HashedLayer(LayerCache):
    """One layer's hashed cache (see the module docstring)."""

    def __init__(self, bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, seed: int = 0,
                 learned: tuple[torch.Tensor, torch.Tensor] | None = None, max_seq_len: int | None = None,
                 far_dtype: str | None = None):
        super().__init__(max_seq_len)
        if bits < 8 or bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        self.far_dtype, self._far = far_dtype, far_dtype_of(far_dtype)
        self.bits, self.top_k, self.window, self.sinks, self.seed = bits, top_k, window, sinks, seed
        self.learned = learned
        # bool [B, length]: the key is not padding; None while every key is a token
        self.valid: torch.Tensor | None = None
        # int64 [B, Hkv, S]: the positions of the keys the last one-token step returned (None after a step of
        # several tokens, which returns every key at its position): a model whose bias depends on the key's
        # position (T5's relative bias) reads its bias there
        self.selected_positions: torch.Tensor | None = None

    def capacity_for(self, max_seq_len: int) -> int:
        return max_seq_len

    def prepare(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype, device, value_dim=None):
        self._check_far_fits(dtype)
        self.allocate({"key_store": (batch, heads_kv, head_dim, dtype),
                       "value_store": (batch, heads_kv, value_dim or head_dim, dtype),
                       "code_store": (batch, heads_kv, self.bits // 8, torch.uint8)}, device)
        q_projection, k_projection = self.learned if self.learned is not None else (None, None)
        self.proj_q, self.proj_k = projections(q_projection, k_projection, head_dim, self.bits, self.seed, device)
        self.length = 0
        self.valid = None

    def _check_far_fits(self, dtype: torch.dtype) -> None:
        """A ValueError unless x.to(far_dtype).to(dtype) is the op's x.to(far_dtype).to(compute dtype) for every x
        of ``dtype`` (the module docstring's pairs)."""
        far = self._far
        if far is None or far == dtype or dtype in (torch.float32, torch.float64) or far == _FLOAT8:
            return
        raise ValueError(f"HashedCache: far_dtype={self.far_dtype!r} values do not all fit the cache's dtype {dtype} "
                         "(the rounded far keys would round again); use a float32 cache, or far_dtype equal to the "
                         "cache's dtype or 'float8_e4m3fn'")

    def _round(self, x: torch.Tensor, far: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., S, D] with the slots where ``far`` [..., S] is True (all of them when None) rounded through
        far_dtype, in x's dtype."""
        rounded = x.to(self._far).to(x.dtype)
        return rounded if far is None else torch.where(far.unsqueeze(-1), rounded, x)

    def rounded_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored key and value [B, Hkv, length, D], the far ones (for a query after the last key, with this
        row's valid keys) rounded through far_dtype: what a one-token step that selects every valid key reads."""
        keys, values = self.key_store[:, :, :self.length], self.value_store[:, :, :self.length]
        if self._far is None:
            return keys, values
        valid = (torch.ones(1, self.length, dtype=torch.bool, device=keys.device) if self.valid is None
                 else self.valid[:, :self.length].to(keys.device))
        far = far_keys(valid, self.sinks, self.window)[:, None]                               # [B|1, 1, T]
        return self._round(keys, far), self._round(values, far)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.prepare(batch, heads, heads, dim, key_states.dtype, key_states.device, value_states.shape[-1])

    def append(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        """Store k, v [B, Hkv, T, D] and their codes at the next T positions, without attending.

        ``key_valid``: bool [B, T], False for padding (never selected, as in the op with that key mask)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        start, stop = self.length, self.length + k.shape[-2]
        if key_valid is not None:
            key_valid = key_valid.to(device=k.device, dtype=torch.bool).reshape(k.shape[0], k.shape[-2])
            if self.valid is None and not bool(key_valid.all()):
                self.valid = torch.ones(k.shape[0], start, dtype=torch.bool, device=k.device)
        if self.valid is not None:
            step_valid = key_valid if key_valid is not None else torch.ones(
                k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
            self.valid = torch.cat([self.valid, step_valid], dim=1)
        self.ensure_capacity(stop)
        self.key_store[:, :, start:stop] = k
        self.value_store[:, :, start:stop] = v
        self.code_store[:, :, start:stop] = pack(k, self.proj_k)
        self.length = stop

    def select_decode(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices [B, Hkv, S] (ascending) of the keys that the one-token queries q [B, Hq, 1, D] attend to,
        and None, or, once some key is padding, bool [B, S] saying which slots hold a selected key (a row
        with fewer valid keys selects fewer: its selection fills the last slots, the spare ones first).

        The same set as the op's ``topk`` over (agreement, position) among the row's valid keys, found in
        O(T) passes: agreements are small integers (0 … g·bits), so a histogram per head gives the agreement
        threshold of the ``top_k``-th best key, and of the keys exactly at the threshold the latest ones
        are taken.  Sinks and window are the first and last valid keys, as in the op.
        """
        length, bits = self.length, self.bits
        batch, heads_q = q.shape[:2]
        heads_kv = self.key_store.shape[1]
        if self.valid is None and decode_on_kernels(q):  # the same set, ascending, every slot filled
            index = _triton_decode.decode_select(_triton_codes.pack_codes(q, self.proj_q),
                                                 self.code_store[:, :, :length], None, self.top_k, self.window,
                                                 self.sinks)
            return index[:, :, 0].long(), None
        groups = heads_q // heads_kv
        query_codes = pack(q, self.proj_q).reshape(batch, heads_kv, groups, bits // 8)
        agreement = groups * bits - hamming(query_codes, self.code_store[:, :, :length]).to(q.device)  # [B, Hkv, T]
        if self.valid is None:
            position = torch.arange(length, device=q.device)
            valid = torch.ones(1, 1, length, dtype=torch.bool, device=q.device)
            always = ((position < self.sinks) | (position >= length - self.window))[None, None]
        else:
            valid = self.valid[:, None, :length].to(q.device)                                   # [B, 1, T]
            rank = valid.long().cumsum(-1)
            always = valid & ((rank <= self.sinks) | (rank > rank[..., -1:] - self.window))
        chosen = always.expand(batch, heads_kv, length).clone()
        need = (valid.sum(-1, keepdim=True) - always.sum(-1, keepdim=True)).clamp(max=self.top_k)  # [B|1, 1, 1]
        if bool((need > 0).any()):
            candidates = agreement.masked_fill(always | ~valid, -1)
            counts = torch.zeros(batch, heads_kv, groups * bits + 2, dtype=torch.long, device=q.device)
            counts.scatter_add_(-1, candidates + 1, torch.ones_like(candidates))            # slot 0: not a candidate
            at_least = counts[..., 1:].flip(-1).cumsum(-1).flip(-1)                      # [v]: candidates >= v
            threshold = (at_least >= need).sum(-1, keepdim=True) - 1
            above = candidates > threshold
            ties = candidates == threshold
            tie_rank = ties.long().cumsum(-1)
            from_end = tie_rank[..., -1:] - tie_rank + ties.long()                       # 1 for the last tie
            chosen |= (above | (ties & (from_end <= need - above.sum(-1, keepdim=True)))) & (need > 0)
        if self.valid is None:
            return chosen.nonzero()[:, -1].view(batch, heads_kv, -1), None
        per_row = chosen.sum(-1)                                                            # [B, Hkv], equal over heads
        slots = int(per_row.max())
        # the chosen keys last, in ascending order (the layout a left-padded transformers mask reads correctly)
        index = torch.sort(chosen.to(torch.uint8), dim=-1, stable=True).indices[..., length - slots:]
        slot_ok = torch.arange(slots, device=q.device) >= slots - per_row[..., None]         # [B, Hkv, S]
        return index.masked_fill(~slot_ok, 0), slot_ok[:, 0]

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None):
        """Add k, v [B, Hkv, T, D] at the next T positions; return (keys, values, visible) for the queries
        q [B, Hq, T, D]: the selected keys/values [B, Hkv, S, D] and None (or, with padding, [B, 1, 1, S]:
        the slots holding a selection) for one query, or every key [B, Hkv, n, D] and the selection as a
        mask [B, Hq, T, n] for several.

        ``key_valid``: bool [B, T] (False = padding) or None: padded keys are never selected (not as sinks,
        window or top-k), as in the op with that key mask; they are stored as zeros (a model may give
        them nan states, and 0·nan is nan).  After a one-token step, :attr:`selected_positions` [B, Hkv, S] holds
        the returned keys' positions: a relative position bias (T5) is the model's own bias for the query's
        position over every key, read there (tested against the op with the table R)."""
        start = self.length
        self.store(k, v, key_valid)
        return self.select_stored(q, start)

    def store(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        """:meth:`append`, with the padded keys and values (``key_valid`` False) stored as zeros."""
        if key_valid is not None:
            hide = ~key_valid.to(device=k.device, dtype=torch.bool).reshape(k.shape[0], 1, k.shape[-2], 1)
            k, v = k.masked_fill(hide, 0), v.masked_fill(hide, 0)
        self.append(k, v, key_valid)

    def select_stored(self, q: torch.Tensor, start: int):
        """(keys, values, visible) for the queries q [B, Hq, T, D] at positions ``start`` … ``start + T − 1``,
        whose keys are already stored (:meth:`append`): what :meth:`step` returns after storing them."""
        length = self.length
        if start + q.shape[-2] != length:
            raise ValueError(f"HashedLayer: {q.shape[-2]} queries from position {start} do not end at the "
                             f"{length} stored keys")
        keys, values = self.key_store[:, :, :length], self.value_store[:, :, :length]
        self.selected_positions = None
        if q.shape[-2] == 1:
            index, slot_ok = self.select_decode(q)                                          # [B, Hkv, S]
            self.selected_positions = index
            batch, heads_kv, selected = index.shape
            rows = (index + (torch.arange(batch * heads_kv, device=q.device)
                             * self.key_store.shape[2]).view(batch, heads_kv, 1)).view(-1)
            keys = self.key_store.view(-1, self.key_store.shape[-1]).index_select(0, rows)
            values = self.value_store.view(-1, self.value_store.shape[-1]).index_select(0, rows)
            visible = None if slot_ok is None else slot_ok[:, None, None, :]
            keys, values = keys.view(batch, heads_kv, selected, -1), values.view(batch, heads_kv, selected, -1)
            if self._far is not None:  # the far slots: by the last query's visible keys (the row's valid ones)
                valid = (torch.ones(1, length, dtype=torch.bool, device=q.device) if self.valid is None
                         else self.valid[:, :length].to(q.device))
                far = far_keys(valid, self.sinks, self.window)[:, None].expand(batch, heads_kv, length)
                far = far.gather(-1, index)                                                 # [B, Hkv, S]
                keys, values = self._round(keys, far), self._round(values, far)
            return keys, values, visible
        batch, heads_q, count, _ = q.shape
        heads_kv = keys.shape[1]
        rows = slice(0, count)
        keep = None if self.valid is None else self.valid[:, None, :length]
        visible = visible_keys(keep, rows, length, start, q.device)
        index = select(signs(q, self.proj_q), signs(keys, self.proj_k), visible, self.bits, self.top_k,
                       self.window, self.sinks)                                              # [B, Hkv, T, S]
        chosen = torch.zeros(batch, heads_kv, count, length + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(index >= 0, index, length), True)                   # −1 → a spare column
        chosen = chosen[..., :length].repeat_interleave(heads_q // heads_kv, dim=1)
        if self._far is not None:  # [full | rounded] keys; each query's mask picks the copy it uses
            far = far_keys(visible, self.sinks, self.window)[:, None]                        # [B|1, 1, n, T]
            if bool((chosen & far).any()):
                keys, values = torch.cat([keys, self._round(keys)], 2), torch.cat([values, self._round(values)], 2)
                chosen = torch.cat([chosen & ~far, chosen & far], -1)
        return keys, values, chosen

    def attend(self, input_pos: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, key_valid: torch.Tensor | None = None):
        """The llama target's hook: store the step's k, v and return (keys, values, mask) for q.
        ``key_valid``: bool [B, T], False for the step's padded tokens."""
        self.check_positions(input_pos, k.shape[-2])
        keys, values, visible = self.step(q, k, v, key_valid)
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

    def reset(self) -> None:
        super().reset()
        self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def budget(self) -> int:
        """Keys a one-token step selects at most: sinks + window + top_k."""
        return self.sinks + self.window + self.top_k

    def shows_every_key(self, query_length: int = 1) -> bool:
        """Whether a transformers step returns every stored key at its position (its padding mask then hides the
        padded ones) rather than the selection: while no row holds more valid keys than :meth:`budget`."""
        if self.valid is None:
            return self.length + query_length <= self.budget()
        return int(self.valid.sum(-1).max()) + query_length <= self.budget()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' mask: every key, or the selection placed at the last
        positions (which it then shows to every row; see :meth:`HashedCache.update`)."""
        if self.shows_every_key(query_length):
            return self.length + query_length, 0
        selected = self.budget()
        return selected, self.length + query_length - selected


# (cache, layer, the keys update returned, the step's first position): set by HashedCache.update without a
# query, taken by the attention that follows it (transformers calls update, then the attention function)
_PENDING: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("attnrewrite_hashed_pending", default=None)


def claim_step(keys: torch.Tensor) -> tuple[HashedLayer, int] | None:
    """For the attention function that follows ``HashedCache.update`` without a query (``attnrewrite_hashed`` in
    :mod:`attnrewrite.hf`): (the layer cache, the step's first position) when ``keys`` is what that update
    returned, else None.  The layer then selects with the query: ``layer.select_stored(q, start)``."""
    pending = _PENDING.get()
    if pending is None or pending[2] is not keys:
        return None
    _PENDING.set(None)
    return pending[1], pending[3]


class HashedCache(KindCache):
    """The ``hashed`` kind's KV cache: keys, values and bit-packed key codes per layer.

    Args:
        bits, top_k, window, sinks, hash, seed: as for :func:`attnrewrite.ops.hashed_attention` (they must
            match the options the model was rewritten with).
        layer_states: for ``hash="learned"`` without the llama target: (P_q, P_k) (or
            :class:`~attnrewrite.kernels.hashed.state.HashProjections`) per layer.  With the llama
            target they are read from the attention modules (attached by :func:`attnrewrite.convert`).
        attention_mask: for a padded batch through :meth:`update`, the prompt's mask [B, L] (1 = token,
            0 = padding; positions past L are tokens): padded keys are never selected.
        far_dtype: None (off) or a name from :data:`~attnrewrite.kernels.hashed.op.FAR_DTYPES`, as for the op:
            the selected far keys and values are returned rounded through it (rounded when read, stored at full
            precision: no memory saved; see the module docstring for the cache dtypes it takes).
    """

    kind = "hashed"

    def __init__(self, bits: int = 64, top_k: int = 256, window: int = 64, sinks: int = 4, hash: str = "random",
                 seed: int = 0, layer_states: list | None = None, attention_mask: torch.Tensor | None = None,
                 far_dtype: str | None = None):
        if hash not in HASHES:
            raise ValueError(f"hash must be one of {HASHES}, got {hash!r}")
        far_dtype_of(far_dtype)  # a bad name is refused here, by name
        super().__init__(layer_states)
        self.options = dict(bits=bits, top_k=top_k, window=window, sinks=sinks, seed=seed, far_dtype=far_dtype)
        self.hash = hash
        self.attention_mask = None if attention_mask is None else attention_mask.to(torch.bool)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs):
        """transformers' hook.  Without ``cache_kwargs["query_states"]`` (a transformers model with
        ``attn_implementation="attnrewrite_hashed"``): store the step, return every key and value, and leave the
        selection to that attention function; another attention after it makes the next update raise.  With a
        one-token ``query_states``: select here, as follows.  A padded batch: give the prompt's mask,
        ``HashedCache(attention_mask=m)``.

        transformers' padding mask reads the returned slots at token positions (:meth:`HashedLayer.get_mask_sizes`).
        While no row holds more than ``sinks + window + top_k`` valid keys every key is returned at its
        position, and that mask hides the padded ones.  After that the selection sits at the last positions,
        each row's selected keys in the last slots: a left-padded row with fewer valid keys than that selects
        them all, and the mask hides its leading slots, which read padding.  That is exact for left padding;
        a step where the mask would show a spare slot or hide a selected key (right or inner padding) raises
        instead of being wrong."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self.new_layer(self._state_of(None, len(self.layers)), None))
        layer = self.layers[layer_idx]
        query = (cache_kwargs or {}).get("query_states")
        if query is None and isinstance(cache_kwargs, dict) and "query_states" in cache_kwargs:
            raise ValueError("HashedCache: cache_kwargs['query_states'] is None")
        if query is None:
            return self._store_for_attention(layer, key_states, value_states, kwargs)
        if query.shape[-2] != 1 or key_states.shape[-2] != 1:
            raise ValueError("HashedCache selects keys per query: call update(k, v, layer_idx, "
                             "{'query_states': q}) with a one-token step (q [B, Hq, 1, D], k [B, Hkv, 1, D])")
        start = layer.get_seq_length() if layer.is_initialized else 0
        key_valid = self.step_padding(key_states, start, kwargs)
        every_key = layer.shows_every_key() if layer.is_initialized else True  # what get_mask_sizes told the mask
        keys, values, visible = layer.step(query, key_states, value_states, key_valid)
        if layer.valid is None:
            return keys, values
        length = layer.length
        if every_key:  # each row selects all its valid keys: the padding mask hides the others
            return layer.rounded_store()
        budget = layer.budget()
        if keys.shape[2] < budget:  # the mask has budget slots; the spare ones (hidden below) lead
            spare = budget - keys.shape[2]
            keys = torch.cat([keys[:, :, :1].expand(-1, -1, spare, -1), keys], 2)
            values = torch.cat([values[:, :, :1].expand(-1, -1, spare, -1), values], 2)
            visible = torch.cat([visible.new_zeros(visible.shape[0], 1, 1, spare), visible], -1)
        shown = self._mask_up_to(length)[:, length - budget:length].to(visible.device)
        if not torch.equal(shown, visible[:, 0, 0]):
            raise ValueError(
                f"HashedCache: transformers' padding mask reads the {budget} selected keys at positions "
                f"{length - budget} … {length - 1} of attention_mask, which here hide a selected key or show a "
                "spare slot (padding that is not left padding); the step would not be the whole-sequence op.  Use "
                "the llama target's attend or HashedLayer.step(q, k, v, key_valid), which take any padding")
        return keys, values

    def _store_for_attention(self, layer: HashedLayer, key_states, value_states, kwargs: dict):
        """``update`` without a query (a transformers model with ``attn_implementation="attnrewrite_hashed"``):
        store the step's keys, values and codes, return every stored key and value, and leave the layer for
        that attention function, which selects with the query (:func:`claim_step`)."""
        if _PENDING.get() is not None:
            pending = _PENDING.get()
            _PENDING.set(None)
            if pending[0] is self:
                raise ValueError(
                    "HashedCache.update was called without query_states, and the attention that followed did not "
                    "select from the cache: a transformers model decoding with HashedCache needs "
                    "attn_implementation='attnrewrite_hashed' (call attnrewrite.hf.register() first); other "
                    "attention implementations would attend to every key, which is not the hashed kind")
        start = layer.get_seq_length() if layer.is_initialized else 0
        key_valid = self.step_padding(key_states, start, kwargs)
        layer.store(key_states, value_states, key_valid)
        keys, values = layer.key_store[:, :, :layer.length], layer.value_store[:, :, :layer.length]
        _PENDING.set((self, layer, keys, start))
        return keys, values

    def _mask_up_to(self, length: int) -> torch.Tensor:
        mask = self.attention_mask
        return torch.cat([mask, torch.ones(mask.shape[0], max(0, length - mask.shape[1]), dtype=torch.bool,
                                           device=mask.device)], 1)

    def needs_state(self) -> bool:
        return self.hash == "learned"

    def new_layer(self, state, max_seq_len: int | None) -> HashedLayer:
        learned = None
        if state is not None:
            learned = (state.q_projection, state.k_projection) if hasattr(state, "q_projection") else tuple(state)
        return HashedLayer(**self.options, learned=learned, max_seq_len=max_seq_len)
