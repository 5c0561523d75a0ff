"""transformers integration: the kinds as HF attention implementations, no compile needed.

    import attnrewrite.hf
    attnrewrite.hf.register()
    model = AutoModel.from_config(cfg, attn_implementation="attnrewrite_sigmoid")

``register()`` adds ``attnrewrite_softmax``, ``attnrewrite_sigmoid``, ``attnrewrite_linear`` and
``attnrewrite_sliding_window`` (window from ``config.sliding_window``, sinks from
``config.sliding_window_sinks``) and ``attnrewrite_hashed`` (options from ``config.hashed_attention``, a dict;
decodes with :class:`attnrewrite.HashedCache`, see :func:`hashed_forward`) and ``attnrewrite_summary`` (options from
``config.summary_attention``, a dict; decodes with :class:`attnrewrite.SummaryCache` under the cache's own mask,
see :func:`summary_forward`) to ``transformers.AttentionInterface`` (and their mask functions to
``AttentionMaskInterface``).
Each takes HF's attention arguments (q, k, v as [B, H, T, D], a 4-d mask or None, ``scaling``,
``dropout``, ``is_causal``), calls the kind's op, and returns HF's [B, T, H, D] layout.

Masks: ``softmax`` and ``sigmoid`` take HF's SDPA-style bool mask as it is.  ``linear`` can only
honour causality and key padding: its mask function hands over the padding alone ([B, 1, 1, Tk])
and causality comes from the module's ``is_causal``; a model whose mask is anything else
(sliding windows, chunked or bidirectional-with-prefix masks) raises a clear error.

Decoding (``model.generate()``): a step's queries are the last Tq of the Tk cached keys.  softmax
and sigmoid get them through HF's mask; ``linear`` runs causal with Tq < Tk, which its op aligns
bottom-right (the queries are the last Tq positions), so a step equals a full re-run.

Returned weights (``output_attentions=True``): each kind's own weights, [B, Hq, Tq, Tk], materialised
only when HF asks for them — softmax's probabilities, sigmoid's sigmoid(s·q·kᵀ + b) (the formula of
:func:`attnrewrite.kinds.sigmoid.weights`), linear's φ(q_i)·φ(k_j) / Σ_j (:func:`attnrewrite.kinds.linear.weights`);
out = weights @ v in every case.  With attention dropout in training the weights the op dropped
cannot be returned, so asking for them raises.

Learned sink logits (gpt-oss's ``s_aux``): ``attnrewrite_softmax`` honours them exactly
(:func:`attnrewrite.ops.sink_softmax_attention`); every other function raises rather than drop them.

Dropout: softmax and sigmoid apply HF's attention dropout; linear has no attention probabilities
to drop, so a model training with ``attention_dropout > 0`` raises instead of silently not dropping.
"""

from __future__ import annotations

from typing import Any

import torch

IMPLEMENTATIONS = ("attnrewrite_softmax", "attnrewrite_sigmoid", "attnrewrite_linear", "attnrewrite_sliding_window",
                   "attnrewrite_hashed", "attnrewrite_summary")


def _gqa(module, query, key) -> bool:
    return query.shape[1] != key.shape[1]


def _module_causal(module, is_causal) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _is_causal(module, query, is_causal, attention_mask) -> bool:
    return _module_causal(module, is_causal) and query.shape[2] > 1 and attention_mask is None


def _softcap(kwargs: dict) -> float | None:
    """HF's ``softcap`` (Gemma-2's ``attn_logit_softcapping``: scores become c·tanh(s / c) before the mask),
    or None; a value that is not a positive number raises."""
    cap = kwargs.get("softcap")
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"softcap must be a positive number, got {cap!r}")
    return float(cap)


def _cap_program(cap: float | None) -> str | None:
    """The soft-cap as a score-modification program (:mod:`attnrewrite.kernels.score_mods`)."""
    return None if cap is None else f"div {cap!r}; tanh; mul {cap!r}"


def _cap_scores(cap: float | None):
    return None if cap is None else (lambda scores: torch.tanh(scores / cap) * cap)


def _capped_softmax(query, key, value, attention_mask, scaling, causal: bool, cap: float, dropout: float):
    """Exact softmax attention with soft-capped scores, written out as HF's eager Gemma-2 attention computes
    it (float32 probabilities, dropout on them): ``attnrewrite::softmax_attention`` has SDPA's signature and
    no score modification.  Returns ([B, Hq, Tq, Dv], the probabilities)."""
    import torch.nn.functional as F

    weights = softmax_weights(query, key, attention_mask, scaling, causal, softcap=cap)
    dropped = F.dropout(weights, p=dropout, training=dropout > 0)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    return dropped.to(value.dtype) @ value, weights


def _finish(out: torch.Tensor, weights: torch.Tensor | None = None):
    return out.transpose(1, 2).contiguous(), weights


def weights_requested(kwargs: dict) -> bool:
    """Whether HF wants this layer's attention weights: ``output_attentions`` passed down, or (how
    transformers 5 collects them) an output collector that records attentions for this forward."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers: only the keyword tells
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and ("attentions" in collected or "cross_attentions" in collected)


def _refuse_weights_with_dropout(kind: str, dropout: float) -> None:
    if dropout > 0:
        raise ValueError(f"attnrewrite_{kind}: output_attentions=True in training with attention dropout "
                         f"(p={dropout:g}): the op draws its dropout inside, so the weights it used cannot be "
                         "returned; call model.eval() (or set attention_dropout=0) to get the weights")


def _keep_mask(attention_mask: torch.Tensor | None, t_q: int, t_k: int, causal: bool, device) -> torch.Tensor | None:
    """bool [B|1, 1, Tq, Tk]: HF's mask (bool keep, or additive 0/−inf) and, when ``causal``, j ≤ i + Tk − Tq."""
    keep = None
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
            attention_mask.dtype).min / 2
    if causal:
        shift = t_k - t_q
        tri = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=shift)
        keep = tri if keep is None else keep & tri
    return keep


def softmax_weights(query, key, attention_mask, scaling, causal: bool, softcap: float | None = None,
                    sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax kind's probabilities [B, Hq, Tq, Tk] (SDPA's top-left causal, as its op); ``softcap``
    caps the scores (c·tanh(s / c)) before the mask, as Gemma-2 does; ``sink_logits`` ([Hq], gpt-oss) join each
    row as one more column, dropped after the softmax."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        keep = attention_mask
    elif attention_mask is not None:
        scores = scores + attention_mask.float()
    if causal:
        tri = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        keep = tri if keep is None else keep & tri
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if sink_logits is not None:
        column = sink_logits.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1].to(query.dtype)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).to(query.dtype)


def sigmoid_weights(query, key, value, attention_mask, scaling, causal: bool,
                    softcap: float | None = None) -> torch.Tensor:
    """The sigmoid kind's weights [B, Hq, Tq, Tk], by the rewriter's formula (bias "auto"), the scores
    soft-capped first when ``softcap`` is given."""
    from attnrewrite.ir.canonical import AttentionCall
    from attnrewrite.kinds.sigmoid import weights

    bool_mask = attention_mask is not None and attention_mask.dtype == torch.bool
    call = AttentionCall(query, key, value, attention_mask, 0.0, causal, scaling, query.shape[1] != key.shape[1],
                         score_mod=_cap_scores(softcap), bool_mask=bool_mask)
    return weights(call, {"bias": "auto"}, None)


def linear_weights(query, key, value, attention_mask, causal: bool, eps: float = 1e-6) -> torch.Tensor:
    """The linear kind's weights φ(q_i)·φ(k_j) / (Σ_j + eps) [B, Hq, Tq, Tk], causal bottom-right as its op."""
    from attnrewrite.ir.canonical import AttentionCall
    from attnrewrite.kinds.linear import weights

    keep = _keep_mask(attention_mask, query.shape[-2], key.shape[-2], causal, query.device)
    call = AttentionCall(query, key, value, keep, 0.0, False, None, query.shape[1] != key.shape[1], bool_mask=True)
    return weights(call, {"feature_map": "elu", "eps": eps, "use_scale": False}, None).to(query.dtype)


def softmax_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs: Any):
    from attnrewrite import ops

    causal = _is_causal(module, query, is_causal, attention_mask)
    cap = _softcap(kwargs)
    sinks = kwargs.get("s_aux")  # gpt-oss's learned sink logits, one per head
    if sinks is not None:
        if cap is not None:
            raise ValueError("attnrewrite_softmax: this model both soft-caps its scores and adds sink logits (s_aux), "
                             "which attnrewrite_softmax does not combine")
        out = ops.sink_softmax_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=causal, scale=scaling, enable_gqa=_gqa(module, query, key),
                                         sink_logits=sinks)
        weights = None
        if weights_requested(kwargs):
            _refuse_weights_with_dropout("softmax", dropout)
            weights = softmax_weights(query, key, attention_mask, scaling, causal, sink_logits=sinks)
        return _finish(out, weights)
    if cap is not None:
        out, weights = _capped_softmax(query, key, value, attention_mask, scaling, causal, cap, dropout)
        if weights_requested(kwargs):
            _refuse_weights_with_dropout("softmax", dropout)
            return _finish(out, weights)
        return _finish(out)
    out = ops.softmax_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                                scale=scaling, enable_gqa=_gqa(module, query, key))
    weights = None
    if weights_requested(kwargs):
        _refuse_weights_with_dropout("softmax", dropout)
        weights = softmax_weights(query, key, attention_mask, scaling, causal)
    return _finish(out, weights)


def _refuse_sinks(kind: str, kwargs: dict) -> None:
    """gpt-oss passes its learned sink logits as ``s_aux``: a kind other than softmax has no form for them, and
    dropping them would change the model silently."""
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"attnrewrite_{kind}: this model adds learned sink logits to its attention (s_aux, "
                         f"gpt-oss's attention sinks), which {kind} attention does not honour; use "
                         f"attnrewrite_softmax, or rewrite the model with attnrewrite (to={kind!r}), whose report "
                         "says what the kind does with them")


def sigmoid_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs: Any):
    from attnrewrite import ops

    _refuse_sinks("sigmoid", kwargs)

    causal = _is_causal(module, query, is_causal, attention_mask)
    if not causal and _module_causal(module, is_causal) and 1 < query.shape[2] == key.shape[2]:
        # a causal prefill under HF's padding mask (which holds causality too): saying so makes
        # bias="auto" count each row's own visible keys, as a later one-token step will
        causal = True
    cap = _softcap(kwargs)
    out = ops.sigmoid_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                                scale=scaling, enable_gqa=_gqa(module, query, key), score_mod=_cap_program(cap))
    weights = None
    if weights_requested(kwargs):
        _refuse_weights_with_dropout("sigmoid", dropout)
        weights = sigmoid_weights(query, key, value, attention_mask, scaling, causal, softcap=cap)
    return _finish(out, weights)


def linear_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   is_causal=None, **kwargs: Any):
    from attnrewrite.ops import linear_attention

    _refuse_sinks("linear", kwargs)
    if dropout > 0:
        raise ValueError(f"attnrewrite_linear: attention dropout (p={dropout:g}) cannot be honoured: linear attention "
                         "has no attention probabilities to drop. Set the config's attention dropout "
                         "(attention_dropout / attention_probs_dropout_prob) to 0, or call model.eval()")
    if _softcap(kwargs) is not None:
        raise ValueError("attnrewrite_linear: this model soft-caps its attention scores (softcap="
                         f"{kwargs['softcap']!r}), which linear attention cannot apply (it forms no scores); use "
                         "attnrewrite_sigmoid, attnrewrite_sliding_window or attnrewrite_softmax")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # causal with fewer queries than keys (a decoding step against the cache): the op aligns the
    # queries with the last keys, so a step sees its own token and everything before it
    out = linear_attention(query, key, value, attn_mask=attention_mask, is_causal=bool(causal),
                           enable_gqa=_gqa(module, query, key))
    weights = linear_weights(query, key, value, attention_mask, bool(causal)) if weights_requested(kwargs) else None
    return _finish(out, weights)


def sliding_window_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, sliding_window=None, **kwargs: Any):
    """``attnrewrite_sliding_window``: the op with the model config's ``sliding_window`` keys (required) and
    ``sliding_window_sinks`` sink tokens (default 0).  HF's mask (padding, a model's own window) restricts
    the window further; a decoding step's queries are the last positions (the op aligns bottom-right),
    which is also how it reads the keys :class:`attnrewrite.SlidingCache` keeps."""
    from attnrewrite.ops import sliding_window_attention

    _refuse_sinks("sliding_window", kwargs)
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        raise ValueError("attnrewrite_sliding_window needs the model config's sliding_window (an int >= 1), got "
                         f"{window!r}: set config.sliding_window = W before building the model")
    if weights_requested(kwargs):
        raise ValueError("attnrewrite_sliding_window does not return attention weights (output_attentions=True)")
    out = sliding_window_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                   is_causal=_module_causal(module, is_causal), scale=scaling,
                                   enable_gqa=_gqa(module, query, key), window=window,
                                   sinks=int(getattr(config, "sliding_window_sinks", 0) or 0),
                                   score_mod=_cap_program(_softcap(kwargs)))
    return _finish(out)


HASHED_OPTIONS = ("bits", "top_k", "window", "sinks", "hash", "seed", "far_dtype")


def _refuse_outside_causal_inference(kind: str, module, dropout: float, is_causal, kwargs) -> None:
    """The refusals of the decode kinds' HF functions (summary, hashed): attention dropout, returned weights, a
    module that is not causal — each a ValueError naming ``attnrewrite_<kind>`` and what to change."""
    if dropout > 0:
        raise ValueError(f"attnrewrite_{kind}: the {kind} kind has no attention dropout (p={dropout:g}); set the "
                         "config's attention_dropout to 0, or call model.eval()")
    if weights_requested(kwargs):
        raise ValueError(f"attnrewrite_{kind} does not return attention weights (output_attentions=True)")
    _refuse_sinks(kind, kwargs)
    if not _module_causal(module, is_causal):
        raise ValueError(f"attnrewrite_{kind} is causal self-attention only; this module is not causal")
    if kwargs.get("position_bias") is not None:  # T5's relative bias: dropping it would change the model silently
        raise ValueError(f"attnrewrite_{kind} does not add the model's position_bias (T5's relative position bias) to "
                         f"the scores; rewrite the model with attnrewrite (to={kind!r}) instead, which reads a bias "
                         "proven to be R[h, j − i] where the kind takes one")


def _kind_config(module, kind: str, allowed: tuple[str, ...]) -> dict:
    """The options dict ``config.<kind>_attention`` of the module's model config ({} when absent); anything else,
    or an option not in ``allowed``, is a ValueError naming ``attnrewrite_<kind>``."""
    options = getattr(getattr(module, "config", None), f"{kind}_attention", None) or {}
    if not isinstance(options, dict) or set(options) - set(allowed):
        raise ValueError(f"attnrewrite_{kind}: config.{kind}_attention must be a dict of {allowed}, got {options!r}")
    return options


def _hashed_config(module) -> dict:
    return _kind_config(module, "hashed", HASHED_OPTIONS)


def hashed_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                   **kwargs: Any):
    """``attnrewrite_hashed``: causal hashed attention, options from the model config's ``hashed_attention``
    dict (``bits``, ``top_k``, ``window``, ``sinks``, ``hash``, ``seed``, ``far_dtype``; the op's defaults otherwise).

    Without a cache the step is the whole sequence: the op, with HF's key padding.  With
    :class:`attnrewrite.HashedCache` (``past_key_values=``), the cache's ``update`` has stored the step's keys
    and their codes and left its layer here: a one-token step attends to the keys that layer selects with
    the query (sinks, window and top-k by XOR/popcount over the packed codes), a prompt without padding runs
    the op with the cache's projections, and other steps attend to every key under the layer's selection mask;
    padding comes from ``HashedCache(attention_mask=...)``.  The cache's options rule; config options that
    differ from them raise."""
    import torch.nn.functional as F

    from attnrewrite.decode.hashed import claim_step
    from attnrewrite.ops import hashed_attention

    _refuse_outside_causal_inference("hashed", module, dropout, is_causal, kwargs)
    options = _hashed_config(module)
    cap = _softcap(kwargs)
    claimed = claim_step(key)
    if claimed is None:
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"attnrewrite_hashed: {query.shape[2]} queries against {key.shape[2]} keys without "
                             "attnrewrite.HashedCache: decode with past_key_values=attnrewrite.HashedCache(...) "
                             "built with the config's hashed_attention options (another cache cannot select)")
        out = hashed_attention(query, key, value, attn_mask=attention_mask, is_causal=True, scale=scaling,
                               enable_gqa=_gqa(module, query, key), score_mod=_cap_program(cap), **options)
        return _finish(out)
    layer, start = claimed
    cache_options = dict(bits=layer.bits, top_k=layer.top_k, window=layer.window, sinks=layer.sinks,
                         hash="random" if layer.learned is None else "learned", seed=layer.seed,
                         far_dtype=layer.far_dtype)
    differ = {name: (value, cache_options[name]) for name, value in options.items() if cache_options[name] != value}
    if differ:
        raise ValueError(f"attnrewrite_hashed: HashedCache options differ from config.hashed_attention "
                         f"(config, cache): {differ}")
    if start == 0 and layer.valid is None and query.shape[2] > 1:  # a prompt: the op itself
        out = hashed_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=_gqa(module, query, key),
                               projections=layer.learned, score_mod=_cap_program(cap), **cache_options)
        return _finish(out)
    keys, values, visible = layer.select_stored(query, start)
    if cap is not None:  # the selected keys' capped scores: exact softmax over them, written out
        return _finish(_capped_softmax(query, keys, values, visible, scaling, False, cap, 0.0)[0])
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scaling,
                                         enable_gqa=_gqa(module, query, keys))
    return _finish(out)


SUMMARY_OPTIONS = ("chunk_size", "window_chunks", "summary")


def _summary_config(module) -> dict:
    return _kind_config(module, "summary", SUMMARY_OPTIONS)


def summary_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs: Any):
    """``attnrewrite_summary``: causal summary attention, options from the model config's ``summary_attention``
    dict (``chunk_size``, ``window_chunks``, ``summary``; the op's defaults otherwise); ``summary="learned"``
    pools with the state :func:`attnrewrite.convert` attached to the module.

    Without a cache the step is the whole sequence: the op, with HF's key padding.  With
    :class:`attnrewrite.SummaryCache` (``past_key_values=`` / ``cache=``), the cache's ``update`` returned the
    summaries and window the step's queries see, and this attention takes the cache's own mask of which query
    sees which (:func:`attnrewrite.decode.summary.claim_step`) instead of HF's, which cannot express it: any
    padding (``SummaryCache(attention_mask=...)``) and prompts of any length decode as the whole-sequence op."""
    from attnrewrite.decode.summary import claim_step, decode_attention
    from attnrewrite.ir.spec import state_name
    from attnrewrite.kernels.score_mods import parse as parse_score_mod
    from attnrewrite.kernels.summary.chunked import block_attention
    from attnrewrite.ops import summary_attention

    _refuse_outside_causal_inference("summary", module, dropout, is_causal, kwargs)
    options = _summary_config(module)
    cap = _softcap(kwargs)
    claimed = claim_step(key)
    if claimed is None:
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"attnrewrite_summary: {query.shape[2]} queries against {key.shape[2]} keys without "
                             "attnrewrite.SummaryCache: decode with cache=attnrewrite.SummaryCache(...) built with "
                             "the config's summary_attention options")
        summary_query = None
        if options.get("summary", "mean") == "learned":
            state = getattr(module, state_name("summary", 0), None)
            if state is None:
                raise ValueError("attnrewrite_summary with summary='learned' pools with the queries that "
                                 "attnrewrite.convert(model, to='summary', summary='learned', ...) attaches to "
                                 "each attention module; this module has none")
            summary_query = state(key)
        out = summary_attention(query, key, value, attn_mask=attention_mask, is_causal=True, scale=scaling,
                                enable_gqa=_gqa(module, query, key), summary_query=summary_query,
                                score_mod=_cap_program(cap), **options)
        return _finish(out)
    layer, visible = claimed
    cache_options = dict(chunk_size=layer.chunk_size, window_chunks=layer.window_chunks,
                         summary="mean" if layer.summary_query is None else "learned")
    differ = {name: (value, cache_options[name]) for name, value in options.items() if cache_options[name] != value}
    if differ:
        raise ValueError(f"attnrewrite_summary: SummaryCache options differ from config.summary_attention "
                         f"(config, cache): {differ}")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[2] == 1 and cap is None:  # a decode step: the Triton decode kernel on CUDA, else torch
        return _finish(decode_attention(query, key, value, visible, scale))
    if visible is None:  # a step of one token without padding sees every key returned
        visible = torch.ones(1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
    elif visible.dim() == 2:  # [T, n]
        visible = visible[None]
    else:  # [B, 1, T, n]
        visible = visible[:, 0]
    program = None if cap is None else parse_score_mod(_cap_program(cap))
    return _finish(block_attention(query, key.to(query.dtype), value.to(query.dtype), visible, scale,
                                   score_mod=program))


def summary_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                         mask_function=None, attention_mask=None, **kwargs: Any):
    """HF mask function for ``attnrewrite_summary``: None while a :class:`attnrewrite.SummaryCache` is being
    stepped (its attention takes the cache's own mask, which this call tells the cache), else the key padding
    [B, 1, 1, Tk] as for ``attnrewrite_linear`` (:func:`padding_only_mask`)."""
    from attnrewrite.decode.summary import use_own_mask

    if use_own_mask():
        return None
    return padding_only_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                             **kwargs)


def padding_only_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask=None, **kwargs: Any):
    """HF mask function for ``attnrewrite_linear``: the key-padding part of the mask, bool [B, 1, 1, Tk].

    HF's full mask is built and compared with padding & causal (or padding alone): anything else
    (sliding windows, prefix or chunked masks) cannot be honoured by a linear kind and raises.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **{k: v for k, v in kwargs.items() if k in ("device", "use_vmap")})
    device = full.device
    keep = (torch.ones(batch_size, kv_length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.bool().to(device)[:, -kv_length:])[:, None, None, :]
    q_index = torch.arange(q_length, device=device) + q_offset
    kv_index = torch.arange(kv_length, device=device) + kv_offset
    causal = kv_index[None, :] <= q_index[:, None]
    full = full.expand(batch_size, -1, q_length, kv_length)
    if not (torch.equal(full, (keep & causal).expand_as(full)) or torch.equal(full, keep.expand_as(full))):
        raise ValueError("attnrewrite_linear, attnrewrite_hashed and attnrewrite_summary honour causal and "
                         "key-padding masks only; this "
                         "model's mask is "
                         "something else (a sliding window, a prefix or chunked mask)")
    return None if bool(keep.all()) else keep


def register() -> None:
    """Add the attnrewrite kinds to transformers' attention registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("attnrewrite_softmax", softmax_forward)
    AttentionInterface.register("attnrewrite_sigmoid", sigmoid_forward)
    AttentionInterface.register("attnrewrite_linear", linear_forward)
    AttentionInterface.register("attnrewrite_sliding_window", sliding_window_forward)
    AttentionInterface.register("attnrewrite_hashed", hashed_forward)
    AttentionInterface.register("attnrewrite_summary", summary_forward)
    AttentionMaskInterface.register("attnrewrite_softmax", sdpa_mask)
    AttentionMaskInterface.register("attnrewrite_sigmoid", sdpa_mask)
    AttentionMaskInterface.register("attnrewrite_linear", padding_only_mask)
    AttentionMaskInterface.register("attnrewrite_sliding_window", sdpa_mask)
    AttentionMaskInterface.register("attnrewrite_hashed", padding_only_mask)
    AttentionMaskInterface.register("attnrewrite_summary", summary_padding_mask)
