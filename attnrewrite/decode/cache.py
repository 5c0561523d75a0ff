"""What the decode caches of the ``summary`` and ``hashed`` kinds share.

A cache is a transformers ``Cache`` (a list of per-layer caches, ``update(k, v, layer_idx)``) and
also plugs into the llama target (``Llama.setup_cache(..., cache=...)`` / ``generate(..., cache=...)``),
which asks it for one layer cache per attention module with :meth:`KindCache.for_layer` and calls
each layer's :meth:`LayerCache.attend` with the step's queries, keys and values.

How a rewritten model decodes.  A layer cache does not return the full key sequence: it returns
the keys and values that the kind lets the step's queries see (the window and the chunk summaries;
the selected keys) and, when the step has several queries, which query sees which.  The site's
own softmax attention over that set *is* the kind, so the decode graph needs no rewrite (and gets
none: its keys are not the queries' sequence, so the rewriter leaves it alone), while a whole
sequence (training, scoring, a prefill without cache) runs through the rewritten op.  Both give
the same outputs: the tests run T tokens at once and one at a time and compare.

Sequences of a batch advance together (one position counter); key padding is supported by
both (``key_valid`` per step, or ``attention_mask=`` for transformers; see each module for what a
transformers model can express).  Storage is allocated for ``max_seq_len`` when it is known, else grown by doubling.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, CacheLayerMixin

from attnrewrite.ir.spec import state_name


class LayerCache(nn.Module, CacheLayerMixin):
    """One layer's cache: named buffers that grow along the sequence axis, and a position counter."""

    is_compileable = False
    is_sliding = False

    def __init__(self, max_seq_len: int | None = None):
        nn.Module.__init__(self)
        CacheLayerMixin.__init__(self)
        self.max_seq_len = max_seq_len
        self.length = 0  # tokens seen so far

    # -- storage ---------------------------------------------------------------------------
    def capacity_for(self, max_seq_len: int) -> int:
        """Entries needed along the sequence axis for ``max_seq_len`` tokens."""
        raise NotImplementedError

    def allocate(self, layout: dict[str, tuple[int, int, int, torch.dtype]], device, capacity: int | None = None):
        """Create the stores: name → (batch, heads, width, dtype), each [batch, heads, capacity, width]."""
        self._layout = layout
        capacity = capacity if capacity is not None else (
            self.capacity_for(self.max_seq_len) if self.max_seq_len else 64)
        for name, (batch, heads, width, dtype) in layout.items():
            self.register_buffer(name, torch.zeros(batch, heads, capacity, width, dtype=dtype, device=device),
                                 persistent=False)
        self.is_initialized = True
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def ensure_capacity(self, needed: int) -> None:
        """Grow every store (doubling) so that it holds ``needed`` entries."""
        name = next(iter(self._layout))
        capacity = getattr(self, name).shape[2]
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity)
        for name in self._layout:
            old = getattr(self, name)
            grown = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
            grown[:, :, :capacity] = old
            setattr(self, name, grown)

    def nbytes(self) -> int:
        """Bytes allocated by this layer's stores."""
        return sum(getattr(self, name).nbytes for name in getattr(self, "_layout", {}))

    # -- the llama target's protocol ---------------------------------------------------------
    def check_positions(self, input_pos: torch.Tensor | None, length: int) -> None:
        """Steps must continue the sequence: positions self.length … self.length + length − 1."""
        if input_pos is None:
            return
        first, last = int(input_pos[0]), int(input_pos[-1])
        if first != self.length or last != self.length + length - 1 or input_pos.numel() != length:
            raise ValueError(f"{type(self).__name__} takes positions in order: expected {self.length} … "
                             f"{self.length + length - 1}, got {first} … {last} ({input_pos.numel()} positions)")

    # -- transformers' CacheLayerMixin --------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for name in getattr(self, "_layout", {}):
            getattr(self, name).zero_()
        self.length = 0

    def offload(self):
        raise NotImplementedError(f"{type(self).__name__} does not offload")

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in getattr(self, "_layout", {}):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))


class KindCache(Cache):
    """A transformers ``Cache`` whose layers are one kind's :class:`LayerCache`."""

    kind: str = ""

    def __init__(self, layer_states: list | None = None):
        super().__init__(layers=[])
        self.layer_states = layer_states

    def new_layer(self, state, max_seq_len: int | None) -> LayerCache:
        """A fresh layer cache for one attention site with the given learned state (or None)."""
        raise NotImplementedError

    def needs_state(self) -> bool:
        return False

    def _state_of(self, attention: nn.Module | None, index: int):
        if not self.needs_state():
            return None
        if self.layer_states is not None:
            return self.layer_states[index]
        state = None if attention is None else getattr(attention, state_name(self.kind, 0), None)
        if state is None:
            raise ValueError(
                f"{type(self).__name__} with learned parameters reads them from each attention module: call "
                f"attnrewrite.convert(model, to={self.kind!r}, ...) first, or pass layer_states=[...]")
        return state

    def for_layer(self, index: int, attention: nn.Module, batch_size: int, max_seq_len: int, dtype, device
                  ) -> LayerCache:
        """The llama target's hook: a fresh, allocated cache for layer ``index`` (its attention module
        has ``n_heads``, ``n_kv_heads`` and ``head_dim``, and any state :func:`attnrewrite.convert` attached)."""
        layer = self.new_layer(self._state_of(attention, index), max_seq_len)
        layer.prepare(batch_size, attention.n_heads, attention.n_kv_heads, attention.head_dim, dtype, device)
        while len(self.layers) <= index:
            self.layers.append(None)
        self.layers[index] = layer
        return layer

    def step_padding(self, key_states: torch.Tensor, start: int, kwargs: dict) -> torch.Tensor | None:
        """bool [B, T] (False = padding) for a transformers step of T tokens from position ``start``, read from
        the ``attention_mask`` [B, L] given to the constructor (positions past L are tokens), or None without
        one.  Without it, a step whose ``position_ids`` do not count up from ``start`` (as ``generate`` gives a
        left-padded batch) raises: the cache would otherwise treat padded keys as tokens."""
        batch, count = key_states.shape[0], key_states.shape[-2]
        mask = getattr(self, "attention_mask", None)
        if mask is not None:
            mask = mask.to(key_states.device)
            if mask.shape[0] != batch:
                raise ValueError(f"{type(self).__name__}: attention_mask has {mask.shape[0]} rows, the batch {batch}")
            key_valid = torch.ones(batch, count, dtype=torch.bool, device=key_states.device)
            known = mask[:, start:start + count]
            key_valid[:, :known.shape[1]] = known
            return key_valid
        position_ids = (kwargs.get("kwargs") or {}).get("position_ids", kwargs.get("position_ids"))
        if position_ids is not None:
            expected = torch.arange(start, start + count, device=position_ids.device)
            if not bool((position_ids.reshape(-1, count) == expected).all()):
                raise ValueError(
                    f"{type(self).__name__}: the positions of this step do not count up from the cache's length (a "
                    f"padded batch?); pass the batch's attention_mask, {type(self).__name__}(..., attention_mask=mask), "
                    "so that padded keys are left out as in the whole-sequence op")
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self.new_layer(self._state_of(None, len(self.layers)), None))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes allocated by every layer's stores."""
        return sum(layer.nbytes() for layer in self.layers if layer is not None)
