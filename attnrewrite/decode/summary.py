"""``attnrewrite.SummaryCache``: the KV cache of the ``summary`` kind.

Each layer keeps, in one store [B, Hkv, capacity, D] for keys and one for values,

    [ k̄_0 … k̄_{n−1} | k_{n·C} … k_{L−1} ]      n = max(0, L // C − W) summaries, then the window

so the keys a decoding query at position L sees are one contiguous slice (no copy), and memory
is n + W·C + C entries: O(window + T / chunk_size) instead of O(T).  When position L starts a new
chunk, the oldest chunk of the window is folded into its summary (the same function as the op's,
:func:`~attnrewrite.kernels.summary.chunked.chunk_summaries`) and the window moves down.

A step of several tokens (a prefill) returns the summaries and raw keys its queries need with a
[T, n] mask saying which query sees which, then stores only the folded state.  Semantics are
those of :func:`attnrewrite.ops.summary_attention` with ``is_causal=True`` (tested: T tokens at
once and one at a time give the op's outputs).
"""

from __future__ import annotations

import math

import torch

from attnrewrite.decode.cache import KindCache, LayerCache
from attnrewrite.kernels.summary.chunked import chunk_summaries
from attnrewrite.kernels.summary.op import SUMMARIES


class SummaryLayer(LayerCache):
    """One layer's summary cache (see the module docstring)."""

    def __init__(self, chunk_size: int, window_chunks: int, summary_query: torch.Tensor | None = None,
                 max_seq_len: int | None = None):
        super().__init__(max_seq_len)
        if chunk_size < 1 or window_chunks < 0:
            raise ValueError(f"need chunk_size >= 1 and window_chunks >= 0, got {chunk_size} and {window_chunks}")
        self.chunk_size, self.window_chunks = chunk_size, window_chunks
        self.summary_query = summary_query
        self.n_sum = 0   # summaries stored (chunks 0 … n_sum − 1)
        self.n_win = 0   # raw tokens stored after them (positions n_sum·C … length − 1)

    def capacity_for(self, max_seq_len: int) -> int:
        summaries = max(0, (max_seq_len - 1) // self.chunk_size - self.window_chunks)
        return summaries + (self.window_chunks + 1) * self.chunk_size

    def prepare(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype, device, value_dim=None):
        self.allocate({"key_store": (batch, heads_kv, head_dim, dtype),
                       "value_store": (batch, heads_kv, value_dim or head_dim, dtype)}, device)
        self.n_sum = self.n_win = self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.prepare(batch, heads, heads, dim, key_states.dtype, key_states.device, value_states.shape[-1])

    def _summaries_needed(self, position: int) -> int:
        """Chunks seen only through their summary by a query at ``position``."""
        return max(0, position // self.chunk_size - self.window_chunks)

    def _summarise(self, k: torch.Tensor, v: torch.Tensor):
        k_sum, v_sum, _ = chunk_summaries(k, v, None, self.chunk_size, self.summary_query)
        return k_sum, v_sum

    def _fold(self) -> None:
        """Fold the window's oldest chunks into summaries until the state is the one position ``length`` needs."""
        target = self._summaries_needed(self.length)
        chunks = target - self.n_sum
        if chunks <= 0:
            return
        start, tokens = self.n_sum, chunks * self.chunk_size
        k_sum, v_sum = self._summarise(self.key_store[:, :, start:start + tokens],
                                       self.value_store[:, :, start:start + tokens])
        rest_k = self.key_store[:, :, start + tokens:start + self.n_win].clone()
        rest_v = self.value_store[:, :, start + tokens:start + self.n_win].clone()
        self.key_store[:, :, start:target] = k_sum
        self.value_store[:, :, start:target] = v_sum
        self.key_store[:, :, target:target + rest_k.shape[2]] = rest_k
        self.value_store[:, :, target:target + rest_v.shape[2]] = rest_v
        self.n_sum, self.n_win = target, self.n_win - tokens

    def step(self, k: torch.Tensor, v: torch.Tensor):
        """Add k, v [B, Hkv, T, D] at the next T positions; return (keys, values, visible) that the step's
        queries attend to: keys/values [B, Hkv, n, D], visible bool [T, n] or None (every query sees all)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self._fold()
        length, count, chunk = self.length, k.shape[-2], self.chunk_size
        if count == 1:  # decode: the new token joins the window; the query sees the whole store
            end = self.n_sum + self.n_win
            self.ensure_capacity(end + 1)
            self.key_store[:, :, end:end + 1] = k
            self.value_store[:, :, end:end + 1] = v
            self.n_win, self.length = self.n_win + 1, length + 1
            return self.key_store[:, :, :end + 1], self.value_store[:, :, :end + 1], None

        raw_k = torch.cat([self.key_store[:, :, self.n_sum:self.n_sum + self.n_win], k], dim=2)
        raw_v = torch.cat([self.value_store[:, :, self.n_sum:self.n_sum + self.n_win], v], dim=2)
        raw_start = self.n_sum * chunk
        new_length = length + count
        # every summary any query of the step needs (the last query needs the most), and the folded state after it
        needed = self._summaries_needed(new_length - 1)
        folded = self._summaries_needed(new_length)
        k_new_sum, v_new_sum = self._summarise(raw_k[:, :, :(folded - self.n_sum) * chunk],
                                               raw_v[:, :, :(folded - self.n_sum) * chunk])
        keys = torch.cat([self.key_store[:, :, :self.n_sum], k_new_sum[:, :, :needed - self.n_sum], raw_k], dim=2)
        values = torch.cat([self.value_store[:, :, :self.n_sum], v_new_sum[:, :, :needed - self.n_sum], raw_v], dim=2)

        positions = torch.arange(length, new_length, device=k.device)[:, None]
        query_chunk = positions // chunk
        summary_ids = torch.arange(needed, device=k.device)[None, :]
        raw_positions = torch.arange(raw_start, new_length, device=k.device)[None, :]
        visible = torch.cat([summary_ids < query_chunk - self.window_chunks,
                             (raw_positions // chunk >= query_chunk - self.window_chunks)
                             & (raw_positions <= positions)], dim=1)

        rest = (folded - self.n_sum) * chunk
        self.ensure_capacity(folded + raw_k.shape[2] - rest)
        self.key_store[:, :, self.n_sum:folded] = k_new_sum
        self.value_store[:, :, self.n_sum:folded] = v_new_sum
        self.key_store[:, :, folded:folded + raw_k.shape[2] - rest] = raw_k[:, :, rest:]
        self.value_store[:, :, folded:folded + raw_v.shape[2] - rest] = raw_v[:, :, rest:]
        self.n_sum, self.n_win, self.length = folded, raw_k.shape[2] - rest, new_length
        return keys, values, visible

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, Hkv, T, D] without attending (e.g. after a prefill computed by the op)."""
        for start in range(0, k.shape[-2], max(1, self.chunk_size * max(1, self.window_chunks))):
            stop = min(k.shape[-2], start + self.chunk_size * max(1, self.window_chunks))
            self.step(k[:, :, start:stop], v[:, :, start:stop])

    def attend(self, input_pos: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None):
        """The llama target's hook: store the step's k, v and return (keys, values, mask [T, n]) for q."""
        self.check_positions(input_pos, k.shape[-2])
        keys, values, visible = self.step(k, v)
        if visible is None:
            visible = torch.ones(k.shape[-2], keys.shape[2], dtype=torch.bool, device=k.device)
        return keys, values, visible

    # -- transformers ---------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' hook.  Its models build a causal mask from :meth:`get_mask_sizes`, which can say
        "query p sees the keys up to p" but not "older chunks through their summaries only": a step
        of several tokens is accepted only while all its queries share the same summaries."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if count > 1 and (self._summaries_needed(self.length + count - 1) != self._summaries_needed(self.length)):
            raise ValueError(
                f"SummaryCache cannot give a transformers model a step of {count} tokens from position {self.length}: "
                "its queries need different chunk summaries, which a causal mask cannot express; feed the "
                "prompt in steps that stay within one summary set (or one token at a time)")
        keys, values, _ = self.step(key_states, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' causal mask: the summaries are placed just before the
        window's first position, so every query sees them and the window keys keep their positions."""
        n_sum = self._summaries_needed(self.length)
        n_win = self.length - n_sum * self.chunk_size
        return n_sum + n_win + query_length, n_sum * self.chunk_size - n_sum

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.n_sum = self.n_win = 0

    def entries(self) -> int:
        """Key/value entries in use (summaries + window)."""
        return self.n_sum + self.n_win


class SummaryCache(KindCache):
    """The ``summary`` kind's KV cache: per layer the window in full and one summary per older chunk.

    Args:
        chunk_size, window_chunks, summary: as for :func:`attnrewrite.ops.summary_attention` (they must
            match the options the model was rewritten with).
        layer_states: for ``summary="learned"`` without the llama target: one pooling query [Hkv, D]
            (or :class:`~attnrewrite.kernels.summary.state.SummaryPooling`) per layer.  With the llama
            target they are read from the attention modules (attached by :func:`attnrewrite.convert`).

    ``Llama.generate(prompt, n, cache=SummaryCache(...))`` decodes with it; a transformers model takes it
    as ``past_key_values`` (steps of one token; see :meth:`SummaryLayer.update`).
    """

    kind = "summary"

    def __init__(self, chunk_size: int = 8, window_chunks: int = 128, summary: str = "mean",
                 layer_states: list | None = None):
        if summary not in SUMMARIES:
            raise ValueError(f"summary must be one of {SUMMARIES}, got {summary!r}")
        super().__init__(layer_states)
        self.chunk_size, self.window_chunks, self.summary = chunk_size, window_chunks, summary

    def needs_state(self) -> bool:
        return self.summary == "learned"

    def new_layer(self, state, max_seq_len: int | None) -> SummaryLayer:
        query = getattr(state, "query", state)
        return SummaryLayer(self.chunk_size, self.window_chunks, None if query is None else query.detach(), max_seq_len)

    @staticmethod
    def entries_bound(length: int, chunk_size: int, window_chunks: int) -> int:
        """Entries a layer needs for ``length`` tokens: summaries of the older chunks + at most (W + 1)·C raw."""
        return max(0, math.ceil(length / chunk_size) - window_chunks) + (window_chunks + 1) * chunk_size
