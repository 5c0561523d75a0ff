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

Padding: chunks are cut at tensor positions, padded or not, as in the op; the cache keeps one flag per
stored entry (the token is not padding / the summary exists) once a step brings padding
(``key_valid``), pools each chunk over its valid tokens only (a chunk of padding only has no
summary) and returns a [B, 1, T, n] mask that hides padded keys and absent summaries.  Padded
tokens are stored as zeros (a model may give them nan states, and 0·nan is nan).

transformers models build their mask from the 2-d padding mask at the positions :meth:`SummaryLayer.get_mask_sizes`
reports, which cannot say "older chunks through their summaries only" nor hide the absent summary of a chunk
of padding only.  With ``attn_implementation="attnrewrite_summary"`` (:func:`attnrewrite.hf.summary_forward`)
the model's attention takes the cache's own mask instead: the mask function of that implementation tells
the cache (:func:`use_own_mask`), ``update`` then accepts any step and leaves its mask to the attention
that follows (:func:`claim_step`), so ``generate()`` takes any padding and prompts of any length.
"""

from __future__ import annotations

import contextvars
import math

import torch

from attnrewrite.decode.cache import KindCache, LayerCache
from attnrewrite.kernels.summary.chunked import block_attention, chunk_summaries
from attnrewrite.kernels.summary.op import SUMMARIES

try:  # the Triton decode kernel (kernels/summary/triton_decode.py) is optional
    from attnrewrite.kernels.summary import triton_decode as _triton_decode
except ImportError:  # pragma: no cover - triton is not installed on this platform
    _triton_decode = None

# what the op's impl="auto" sends to its kernels (kernels/summary/public.py): 16-bit floats, head dims <= 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_MAX_HEAD_DIM = 256


def decode_on_kernels(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether a one-token step's attention over the cache's slice runs on the Triton decode kernel
    (:func:`~attnrewrite.kernels.summary.triton_decode.summary_decode`): CUDA tensors, triton importable,
    q, keys and values of one 16-bit float dtype, head dims up to 256 and a unit stride in the last dim
    of the store (what the op's ``impl="auto"`` sends to its kernels).  Otherwise the torch path."""
    return (q.is_cuda and _triton_decode is not None and q.shape[-2] == 1
            and q.dtype in _KERNEL_DTYPES and keys.dtype == q.dtype and values.dtype == q.dtype
            and max(q.shape[-1], values.shape[-1]) <= _KERNEL_MAX_HEAD_DIM
            and keys.stride(-1) == 1 and values.stride(-1) == 1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of one token's queries q [B, Hq, 1, D] over what a one-token :meth:`SummaryLayer.step`
    returned: keys/values [B, Hkv, n, D|Dv] (the store's slice, read in place by the kernel) and ``visible``
    (None: every entry, or bool [B, 1, 1, n]).  The decode kernel where :func:`decode_on_kernels` says so,
    else the torch block (:func:`~attnrewrite.kernels.summary.chunked.block_attention`).  → [B, Hq, 1, Dv]."""
    if decode_on_kernels(q, keys, values):
        return _triton_decode.summary_decode(q, keys, values, visible, scale)
    if visible is None:
        visible = torch.ones(1, 1, keys.shape[2], dtype=torch.bool, device=q.device)
    else:
        visible = visible.reshape(visible.shape[0], 1, keys.shape[2])
    return block_attention(q, keys.to(q.dtype), values.to(q.dtype), visible, scale)


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
        # bool [B, n_sum + n_win]: the summary exists / the token is not padding; None while all are
        self.valid: torch.Tensor | None = None

    def capacity_for(self, max_seq_len: int) -> int:
        summaries = max(0, (max_seq_len - 1) // self.chunk_size - self.window_chunks)
        return summaries + (self.window_chunks + 1) * self.chunk_size

    def prepare(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, dtype, device, value_dim=None):
        self.allocate({"key_store": (batch, heads_kv, head_dim, dtype),
                       "value_store": (batch, heads_kv, value_dim or head_dim, dtype)}, device)
        self.n_sum = self.n_win = self.length = 0
        self.valid = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.prepare(batch, heads, heads, dim, key_states.dtype, key_states.device, value_states.shape[-1])

    def _summaries_needed(self, position: int) -> int:
        """Chunks seen only through their summary by a query at ``position``."""
        return max(0, position // self.chunk_size - self.window_chunks)

    def _summarise(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
        """Summaries of whole chunks of k, v over their valid tokens (padding left out, as in the op);
        exists [B, N] is None while nothing is padding."""
        k_sum, v_sum, exists = chunk_summaries(k, v, valid, self.chunk_size, self.summary_query)
        return k_sum, v_sum, (None if valid is None else exists)

    def _fold(self) -> None:
        """Fold the window's oldest chunks into summaries until the state is the one position ``length`` needs."""
        target = self._summaries_needed(self.length)
        chunks = target - self.n_sum
        if chunks <= 0:
            return
        start, tokens = self.n_sum, chunks * self.chunk_size
        valid = self.valid
        k_sum, v_sum, exists = self._summarise(self.key_store[:, :, start:start + tokens],
                                               self.value_store[:, :, start:start + tokens],
                                               None if valid is None else valid[:, start:start + tokens])
        if valid is not None:
            self.valid = torch.cat([valid[:, :start], exists, valid[:, start + tokens:start + self.n_win]], dim=1)
        rest_k = self.key_store[:, :, start + tokens:start + self.n_win].clone()
        rest_v = self.value_store[:, :, start + tokens:start + self.n_win].clone()
        self.key_store[:, :, start:target] = k_sum
        self.value_store[:, :, start:target] = v_sum
        self.key_store[:, :, target:target + rest_k.shape[2]] = rest_k
        self.value_store[:, :, target:target + rest_v.shape[2]] = rest_v
        self.n_sum, self.n_win = target, self.n_win - tokens

    def step(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None):
        """Add k, v [B, Hkv, T, D] at the next T positions; return (keys, values, visible) that the step's
        queries attend to: keys/values [B, Hkv, n, D], visible bool [T, n], [B, 1, T, n] once some key
        is padding, or None (every query sees all).

        ``key_valid``: bool [B, T] (False = padding) or None (all tokens).  As in the op, a padded key is
        left out of the window and of its chunk's summary, and a chunk of padding only has no summary."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        length, count, chunk = self.length, k.shape[-2], self.chunk_size
        if key_valid is not None:
            key_valid = key_valid.to(device=k.device, dtype=torch.bool).reshape(k.shape[0], count)
            if self.valid is None and not bool(key_valid.all()):
                self.valid = torch.ones(k.shape[0], self.n_sum + self.n_win, dtype=torch.bool, device=k.device)
        if self.valid is not None and key_valid is None:
            key_valid = torch.ones(k.shape[0], count, dtype=torch.bool, device=k.device)
        if self.valid is None:
            key_valid = None
        else:  # padded tokens are never seen: store zeros (a model may have made them nan, and 0·nan is nan)
            hide = ~key_valid[:, None, :, None]
            k, v = k.masked_fill(hide, 0), v.masked_fill(hide, 0)
        self._fold()
        if count == 1:  # decode: the new token joins the window; the query sees the whole store
            end = self.n_sum + self.n_win
            self.ensure_capacity(end + 1)
            self.key_store[:, :, end:end + 1] = k
            self.value_store[:, :, end:end + 1] = v
            self.n_win, self.length = self.n_win + 1, length + 1
            visible = None
            if key_valid is not None:
                self.valid = torch.cat([self.valid, key_valid], dim=1)
                visible = self.valid[:, None, None, :]
            return self.key_store[:, :, :end + 1], self.value_store[:, :, :end + 1], visible

        raw_k = torch.cat([self.key_store[:, :, self.n_sum:self.n_sum + self.n_win], k], dim=2)
        raw_v = torch.cat([self.value_store[:, :, self.n_sum:self.n_sum + self.n_win], v], dim=2)
        raw_start = self.n_sum * chunk
        new_length = length + count
        # every summary any query of the step needs (the last query needs the most), and the folded state after it
        needed = self._summaries_needed(new_length - 1)
        folded = self._summaries_needed(new_length)
        raw_valid = None if key_valid is None else torch.cat([self.valid[:, self.n_sum:], key_valid], dim=1)
        k_new_sum, v_new_sum, new_exists = self._summarise(
            raw_k[:, :, :(folded - self.n_sum) * chunk], raw_v[:, :, :(folded - self.n_sum) * chunk],
            None if raw_valid is None else raw_valid[:, :(folded - self.n_sum) * chunk])
        keys = torch.cat([self.key_store[:, :, :self.n_sum], k_new_sum[:, :, :needed - self.n_sum], raw_k], dim=2)
        values = torch.cat([self.value_store[:, :, :self.n_sum], v_new_sum[:, :, :needed - self.n_sum], raw_v], dim=2)

        positions = torch.arange(length, new_length, device=k.device)[:, None]
        query_chunk = positions // chunk
        summary_ids = torch.arange(needed, device=k.device)[None, :]
        raw_positions = torch.arange(raw_start, new_length, device=k.device)[None, :]
        visible = torch.cat([summary_ids < query_chunk - self.window_chunks,
                             (raw_positions // chunk >= query_chunk - self.window_chunks)
                             & (raw_positions <= positions)], dim=1)
        if raw_valid is not None:  # padded keys and summaries of padding only are seen by no query
            key_ok = torch.cat([self.valid[:, :self.n_sum], new_exists[:, :needed - self.n_sum], raw_valid], dim=1)
            visible = visible[None, None] & key_ok[:, None, None, :]

        rest = (folded - self.n_sum) * chunk
        if raw_valid is not None:
            self.valid = torch.cat([self.valid[:, :self.n_sum], new_exists, raw_valid[:, rest:]], dim=1)
        self.ensure_capacity(folded + raw_k.shape[2] - rest)
        self.key_store[:, :, self.n_sum:folded] = k_new_sum
        self.value_store[:, :, self.n_sum:folded] = v_new_sum
        self.key_store[:, :, folded:folded + raw_k.shape[2] - rest] = raw_k[:, :, rest:]
        self.value_store[:, :, folded:folded + raw_v.shape[2] - rest] = raw_v[:, :, rest:]
        self.n_sum, self.n_win, self.length = folded, raw_k.shape[2] - rest, new_length
        return keys, values, visible

    def append(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        """Store k, v [B, Hkv, T, D] without attending (e.g. after a prefill computed by the op)."""
        for start in range(0, k.shape[-2], max(1, self.chunk_size * max(1, self.window_chunks))):
            stop = min(k.shape[-2], start + self.chunk_size * max(1, self.window_chunks))
            self.step(k[:, :, start:stop], v[:, :, start:stop],
                      None if key_valid is None else key_valid[:, start:stop])

    def attend(self, input_pos: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, key_valid: torch.Tensor | None = None):
        """The llama target's hook: store the step's k, v and return (keys, values, mask [T, n] or
        [B, 1, T, n] with padding) for q.  ``key_valid``: bool [B, T], False for the step's padded tokens."""
        self.check_positions(input_pos, k.shape[-2])
        keys, values, visible = self.step(k, v, key_valid)
        if visible is None:
            visible = torch.ones(k.shape[-2], keys.shape[2], dtype=torch.bool, device=k.device)
        return keys, values, visible

    # -- transformers ---------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               key_valid: torch.Tensor | None = None, **kwargs):
        """transformers' hook.  Its models build a causal mask from :meth:`get_mask_sizes`, which can say
        "query p sees the keys up to p" but not "older chunks through their summaries only": a step
        of several tokens is accepted only while all its queries share the same summaries.

        ``key_valid`` bool [B, T]: the step's padding (from ``SummaryCache(attention_mask=...)``).  The
        model's own padding mask hides summary slot s where ``attention_mask[:, n·C − n + s]`` is 0 (the
        summaries sit just before the window, see :meth:`get_mask_sizes`); that is the op's "this chunk
        has no summary" only while no summarised chunk is padding from end to end.  A step where it
        is not raises instead of returning the wrong summaries."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if count > 1 and (self._summaries_needed(self.length + count - 1) != self._summaries_needed(self.length)):
            raise ValueError(
                f"SummaryCache cannot give a transformers model a step of {count} tokens from position {self.length}: "
                "its queries need different chunk summaries, which a causal mask cannot express; feed the "
                f"prompt in steps that stay within one summary set (generate(..., prefill_chunk_size={self.chunk_size}), "
                "or one token at a time), or build the model with attn_implementation='attnrewrite_summary' "
                "(after attnrewrite.hf.register()), whose attention takes the cache's own mask")
        keys, values, _ = self.step(key_states, value_states, key_valid)
        return keys, values

    def check_summary_slots(self, attention_mask: torch.Tensor, n_sum: int) -> None:
        """Raise unless transformers' padding mask shows exactly the summaries that exist: with n summaries
        it reads slot s at position n·C − n + s of ``attention_mask`` [B, ≥ length] (see :meth:`get_mask_sizes`)."""
        if not n_sum:
            return
        exists = (torch.ones(attention_mask.shape[0], n_sum, dtype=torch.bool, device=attention_mask.device)
                  if self.valid is None else self.valid[:, :n_sum].to(attention_mask.device))
        start = n_sum * self.chunk_size - n_sum
        if not bool((attention_mask[:, start:start + n_sum] == exists).all()):
            raise ValueError(
                f"SummaryCache: transformers' padding mask reads the {n_sum} summary slots at positions {start} … "
                f"{start + n_sum - 1} of attention_mask, which here hide a summary that exists or show one of "
                f"a chunk of padding only (chunk_size={self.chunk_size}); the step would not be the "
                "whole-sequence op, and no placement of the summaries makes a mask read from token positions "
                "right for rows padded by different numbers of whole chunks.  Left padding of fewer than "
                "chunk_size tokens per row always works; otherwise build the model with "
                "attn_implementation='attnrewrite_summary' (after attnrewrite.hf.register()), whose attention takes "
                "the cache's own mask, or decode step by step with that mask, model(ids, "
                "attention_mask=cache.step_mask(dtype), position_ids=..., cache=cache), or run the rows separately")

    def next_visible(self, key_valid: torch.Tensor) -> torch.Tensor:
        """bool [B, n]: which of the n keys that a one-token step with padding ``key_valid`` [B, 1] will return
        its query sees (existing summaries, valid window tokens, the token itself), without changing the cache."""
        batch = key_valid.shape[0]
        flags = (torch.ones(batch, self.n_sum + self.n_win, dtype=torch.bool, device=key_valid.device)
                 if self.valid is None else self.valid.to(key_valid.device))
        chunks = max(0, self._summaries_needed(self.length) - self.n_sum)
        start, stop = self.n_sum, self.n_sum + chunks * self.chunk_size
        exists = flags[:, start:stop].reshape(batch, chunks, self.chunk_size).any(-1)
        return torch.cat([flags[:, :start], exists, flags[:, stop:], key_valid.to(torch.bool)], dim=1)

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
        self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def entries(self) -> int:
        """Key/value entries in use (summaries + window)."""
        return self.n_sum + self.n_win


# (cache, layer, the keys update returned, the step's visibility): set by SummaryCache.update when the model's
# attention takes the cache's mask, taken by that attention (transformers calls update, then the attention)
_PENDING: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("attnrewrite_summary_pending", default=None)
# the SummaryCache whose get_mask_sizes transformers' mask creation just called (the mask function follows)
_SIZING: contextvars.ContextVar[SummaryCache | None] = contextvars.ContextVar("attnrewrite_summary_sizing",
                                                                             default=None)


def use_own_mask() -> bool:
    """For the mask function of ``attnrewrite_summary`` (:mod:`attnrewrite.hf`), called by transformers right after
    it sized the mask with a cache's ``get_mask_sizes``: when that cache is a :class:`SummaryCache`, tell it that
    the model's attention will take the cache's own mask for the coming step (True), so its ``update`` accepts
    steps a 2-d padding mask cannot describe.  False when no SummaryCache is being sized (no cache: the
    whole-sequence op)."""
    cache = _SIZING.get()
    _SIZING.set(None)
    if cache is None:
        return False
    cache._own_attention_at = cache.get_seq_length()
    return True


def claim_step(keys: torch.Tensor) -> tuple[SummaryLayer, torch.Tensor | None] | None:
    """For ``attnrewrite_summary``'s attention function: (the layer cache, the step's visibility — None, bool [T, n]
    or [B, 1, T, n]) when ``keys`` is what the preceding ``SummaryCache.update`` returned for it, else None."""
    pending = _PENDING.get()
    if pending is None or pending[2] is not keys:
        return None
    _PENDING.set(None)
    return pending[1], pending[3]


class SummaryCache(KindCache):
    """The ``summary`` kind's KV cache: per layer the window in full and one summary per older chunk.

    Args:
        chunk_size, window_chunks, summary: as for :func:`attnrewrite.ops.summary_attention` (they must
            match the options the model was rewritten with).
        layer_states: for ``summary="learned"`` without the llama target: one pooling query [Hkv, D]
            (or :class:`~attnrewrite.kernels.summary.state.SummaryPooling`) per layer.  With the llama
            target they are read from the attention modules (attached by :func:`attnrewrite.convert`).
        attention_mask: for a padded batch in a transformers model, the prompt's mask [B, L] (1 = token,
            0 = padding; positions past L are tokens), so that padded keys are left out of the summaries.

    ``Llama.generate(prompt, n, cache=SummaryCache(...))`` decodes with it; a transformers model takes it
    as ``past_key_values`` (steps of one token; see :meth:`SummaryLayer.update`).  A padded batch whose
    padding covers whole chunks decodes step by step with :meth:`step_mask` as the model's mask.
    """

    kind = "summary"

    def __init__(self, chunk_size: int = 8, window_chunks: int = 128, summary: str = "mean",
                 layer_states: list | None = None, attention_mask: torch.Tensor | None = None):
        if summary not in SUMMARIES:
            raise ValueError(f"summary must be one of {SUMMARIES}, got {summary!r}")
        super().__init__(layer_states)
        self.chunk_size, self.window_chunks, self.summary = chunk_size, window_chunks, summary
        self.attention_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        self._own_mask_at: int | None = None  # the position whose step got step_mask()'s mask
        self._own_attention_at: int | None = None  # the position whose step attnrewrite_summary's attention takes

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """transformers' hook (see :meth:`SummaryLayer.get_mask_sizes`); also notes that a mask is being built for
        this cache, so that ``attnrewrite_summary``'s mask function can say it takes the cache's own (:func:`use_own_mask`)."""
        self._own_attention_at = None
        _SIZING.set(self)
        return super().get_mask_sizes(query_length, layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' hook.  With a padded batch the cache must know the padding, to leave padded keys out
        of the summaries as the op does: pass the prompt's ``attention_mask`` [B, L] to the constructor
        (positions past L are tokens).  Without it, positions that show padding (``position_ids`` that do
        not count up from the cache's length, as ``generate`` gives a left-padded batch) raise.

        Under ``attn_implementation="attnrewrite_summary"`` (its mask function said so, :func:`use_own_mask`) any
        step is accepted and its mask is left to that attention (:func:`claim_step`); under any other attention
        a step that transformers' mask would get wrong raises (:meth:`SummaryLayer.update`)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self.new_layer(self._state_of(None, len(self.layers)), None))
        layer = self.layers[layer_idx]
        batch, count, start = key_states.shape[0], key_states.shape[-2], layer.get_seq_length()
        if _SIZING.get() is self:  # the mask just built was transformers' own, not attnrewrite_summary's
            _SIZING.set(None)
        _PENDING.set(None)
        key_valid = self.step_padding(key_states, start, kwargs)
        if self._own_attention_at == start:  # attnrewrite_summary's attention takes the step's own mask
            keys, values, visible = layer.step(key_states, value_states, key_valid)
            _PENDING.set((self, layer, keys, visible))
            return keys, values
        own_mask = self._own_mask_at == start
        if own_mask and count != 1:
            raise ValueError(f"SummaryCache.step_mask() describes a one-token step; this step has {count} tokens")
        keys, values = layer.update(key_states, value_states, *args, key_valid=key_valid)
        if self.attention_mask is not None and not own_mask:
            mask = torch.cat([self.attention_mask.to(key_states.device), torch.ones(
                batch, max(0, layer.length - self.attention_mask.shape[1]), dtype=torch.bool, device=key_states.device)], 1)
            layer.check_summary_slots(mask, layer._summaries_needed(start))
        return keys, values

    def step_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The attention mask [B, 1, 1, n] for the next one-token step of a transformers model: pass it as the
        model's ``attention_mask`` (a 4-d mask, which transformers uses as it is) instead of the 2-d one.

        It says which of the n keys the step will return the query sees, from the padding the cache knows
        (``attention_mask=`` of the constructor): exact for any padding, including chunks of padding only,
        which transformers' own mask cannot hide (see :meth:`SummaryLayer.check_summary_slots`).  ``dtype``:
        bool (sdpa) or the model's float dtype for an additive 0 / −inf-like mask (eager).  Every layer of
        a model sees the same keys, so one mask serves them all."""
        if self.attention_mask is None:
            raise ValueError("SummaryCache.step_mask needs the batch's padding: SummaryCache(..., attention_mask=mask)")
        mask = self.attention_mask
        layer = self.layers[0] if self.layers else None
        start = layer.get_seq_length() if layer is not None and layer.is_initialized else 0
        key_valid = mask[:, start:start + 1] if start < mask.shape[1] else torch.ones(
            mask.shape[0], 1, dtype=torch.bool, device=mask.device)
        visible = key_valid if layer is None or not layer.is_initialized else layer.next_visible(key_valid)
        self._own_mask_at = start
        visible = visible[:, None, None, :]
        if dtype == torch.bool:
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)

    def needs_state(self) -> bool:
        return self.summary == "learned"

    def new_layer(self, state, max_seq_len: int | None) -> SummaryLayer:
        query = getattr(state, "query", state)
        return SummaryLayer(self.chunk_size, self.window_chunks, None if query is None else query.detach(), max_seq_len)

    @staticmethod
    def entries_bound(length: int, chunk_size: int, window_chunks: int) -> int:
        """Entries a layer needs for ``length`` tokens: summaries of the older chunks + at most (W + 1)·C raw."""
        return max(0, math.ceil(length / chunk_size) - window_chunks) + (window_chunks + 1) * chunk_size
