"""``attnrewrite.SlidingCache``: the KV cache of the ``sliding_window`` kind.

Each layer keeps at most ``sinks + window`` keys and values: the first ``sinks`` positions and the
last ``window`` ones, in position order, in stores of exactly that many entries [B, Hkv, sinks +
window, D] (allocated once; memory does not grow with the sequence).  A step of n tokens returns the
kept entries followed by its own n keys, with a [n, kept + n] mask of which query sees which key (the
op's causal rule: p − window < j ≤ p, or j < sinks and j ≤ p), then keeps the new set.  Semantics are
those of :func:`attnrewrite.ops.sliding_window_attention` with ``is_causal=True`` (tested on the llama
target: a prefill, one token at a time and uneven steps give the rewritten model's logits).

For transformers models (``update``): the returned keys are in position order with one gap, between
the sinks and the recent keys, and every recent key keeps its distance to the queries, so the
``attnrewrite_sliding_window`` attention (:mod:`attnrewrite.hf`) with the same ``window`` and
``sinks`` computes the op on them.  Key padding is not supported (sequences of a batch advance together).
"""

from __future__ import annotations

import torch

from attnrewrite.decode.cache import KindCache, LayerCache


def window_visible(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """bool [n, m]: key at position j visible from the query at position p (causal window plus sinks)."""
    p, j = query_positions.view(-1, 1), key_positions.view(1, -1)
    return ((j <= p) & (j > p - window)) | ((j < sinks) & (j <= p))


class SlidingLayer(LayerCache):
    """One layer's sliding-window cache (see the module docstring)."""

    def __init__(self, window: int, sinks: int = 0, max_seq_len: int | None = None):
        super().__init__(max_seq_len)
        if window < 1 or sinks < 0:
            raise ValueError(f"need window >= 1 and sinks >= 0, got {window} and {sinks}")
        self.window, self.sinks = window, sinks
        self.kept = 0  # entries in use

    def capacity_for(self, max_seq_len: int) -> int:
        return self.sinks + self.window

    def prepare(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype, device, value_dim=None):
        self.allocate({"key_store": (batch, heads_kv, head_dim, dtype),
                       "value_store": (batch, heads_kv, value_dim or head_dim, dtype)}, device,
                      capacity=self.sinks + self.window)
        self.length = self.kept = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.prepare(batch, heads, heads, dim, key_states.dtype, key_states.device, value_states.shape[-1])

    def _recent_start(self) -> int:
        """The first position kept as a recent key (not a sink)."""
        return min(self.length, max(self.sinks, self.length - self.window))

    def kept_positions(self, device=None) -> torch.Tensor:
        """The positions of the kept entries, ascending: the sinks, then the recent keys."""
        sinks = torch.arange(min(self.sinks, self.length), device=device)
        recent = torch.arange(self._recent_start(), self.length, device=device)
        return torch.cat([sinks, recent])

    def step(self, k: torch.Tensor, v: torch.Tensor):
        """Add k, v [B, Hkv, n, D] at the next n positions; return (keys, values, key positions) for the
        step's queries — the kept entries then the n new ones — and keep the new set."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        count = k.shape[-2]
        device = self.key_store.device
        positions = torch.cat([self.kept_positions(device), torch.arange(self.length, self.length + count, device=device)])
        keys = torch.cat([self.key_store[:, :, :self.kept], k], dim=2)
        values = torch.cat([self.value_store[:, :, :self.kept], v], dim=2)
        self.length += count
        keep = (positions < self.sinks) | (positions >= self.length - self.window)
        self.kept = int(keep.sum())
        self.key_store[:, :, :self.kept] = keys[:, :, keep]
        self.value_store[:, :, :self.kept] = values[:, :, keep]
        return keys, values, positions

    def attend(self, input_pos: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None):
        """The llama target's hook: store the step's k, v and return (keys, values, mask [n, kept + n])."""
        self.check_positions(input_pos, k.shape[-2])
        start = self.length
        keys, values, positions = self.step(k, v)
        queries = torch.arange(start, start + k.shape[-2], device=positions.device)
        return keys, values, window_visible(queries, positions, self.window, self.sinks)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' hook: the kept keys and values followed by the step's, in position order."""
        keys, values, _ = self.step(key_states, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' causal mask: every kept key precedes the queries."""
        kept = min(self.sinks, self.length) + self.length - self._recent_start()
        return kept + query_length, self.length - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.kept = 0

    def entries(self) -> int:
        """Key/value entries in use (at most sinks + window)."""
        return self.kept


class SlidingCache(KindCache):
    """The ``sliding_window`` kind's KV cache: per layer the first ``sinks`` and the last ``window`` keys.

    Args:
        window, sinks: as for :func:`attnrewrite.ops.sliding_window_attention` (they must match the options
            the model was rewritten with).

    ``Llama.generate(prompt, n, cache=SlidingCache(window=64))`` decodes with it; a transformers model takes it
    as ``past_key_values`` with ``attn_implementation="attnrewrite_sliding_window"``.
    """

    kind = "sliding_window"

    def __init__(self, window: int = 256, sinks: int = 0):
        if not isinstance(window, int) or window < 1 or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"SlidingCache needs window >= 1 and sinks >= 0 (ints), got {window!r} and {sinks!r}")
        super().__init__(None)
        self.window, self.sinks = window, sinks

    def new_layer(self, state, max_seq_len: int | None) -> SlidingLayer:
        return SlidingLayer(self.window, self.sinks, max_seq_len)
