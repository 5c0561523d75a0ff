"""A zoo of tiny models for the pattern suite: every attention spelling we know of, in one list.

Each :class:`ZooEntry` builds a model from a transformers config class with random weights
(offline, no download), says how many attention sites it holds, gives example inputs (with
a padding mask wherever the model takes one), and records — as data, with the reason — any
site the matcher is expected not to rewrite.  The tests (``tests/patterns/test_zoo.py``) and
the coverage benchmark (``bench/coverage.py``) are generated from :data:`ZOO`.

Families: Llama, Mistral, Qwen2, Gemma, Gemma-2 (score soft-capping), Phi, GPT-2, GPT-NeoX,
OPT, BLOOM (ALiBi through ``baddbmm``), Falcon, BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA,
T5 (relative position bias, no scale), BART (encoder, decoder, cross-attention), Whisper (scale
folded into q), ViT, CLIP (causal text + vision), Swin (windows with relative position bias),
each in ``attn_implementation="eager"`` and ``"sdpa"`` where the model supports it; plus
``nn.Transformer`` (encoder and decoder, through ``nn.MultiheadAttention``).

Sizes are chosen for speed on a CPU (2 layers, width 32, 4 heads, 8 tokens) while keeping
every feature visible: grouped kv heads, sliding windows shorter than the sequence, padding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

#: Batch, sequence length and vocabulary of the text inputs.
BATCH, SEQ, VOCAB = 2, 8, 100
#: Decoder sequence length of the encoder-decoder models (differs from SEQ: cross-attention is rectangular).
DECODER_SEQ = 5


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        family: the model family, lower case (``"llama"``, ``"bart"``, ``"nn_transformer"``).
        impl: ``"eager"`` / ``"sdpa"`` (transformers' ``attn_implementation``) or ``"native"``.
        sites: the number of attention sites in the model.
        build: returns the model in eval mode, random weights, float32.
        inputs: ``inputs(generator) -> kwargs`` for the model's forward (fresh random values).
        output: the tensor the tests compare (and differentiate) from the model's output.
        expected_skips: ``{kind: reason}`` — the sites the matcher is known not to rewrite to
            ``kind``, and why.  Empty: every site must be rewritten to every kind.
        features: what the entry exercises (for the coverage table and the docs).
        hf_class: the transformers model class, for entries built from a transformers config.
    """

    family: str
    impl: str
    sites: int
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    output: Callable[[Any], torch.Tensor] | None = None
    expected_skips: Mapping[str, str] = field(default_factory=dict)
    features: str = ""
    hf_class: str | None = None

    @property
    def id(self) -> str:
        return f"{self.family}-{self.impl}"

    def example_inputs(self, seed: int = 0) -> dict[str, Any]:
        return self.inputs(torch.Generator().manual_seed(seed))

    def pick_output(self, out: Any) -> torch.Tensor:
        """The tensor to compare from the model's output ``out``."""
        return self.output(out) if self.output is not None else first_tensor(out)


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: itself, the first element, ``logits`` or ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(f"no tensor in {type(out).__name__}")


# --------------------------------------------------------------------------- inputs


def token_ids(g: torch.Generator, t: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, t), generator=g)


def padding_mask(t: int = SEQ) -> torch.Tensor:
    """[B, T] long, 1 = token: the second sequence is right-padded by 3 (every query still sees a key)."""
    mask = torch.ones(BATCH, t, dtype=torch.long)
    mask[1, t - 3:] = 0
    return mask


def _text(g: torch.Generator) -> dict[str, Any]:
    return {"input_ids": token_ids(g), "attention_mask": padding_mask()}


def _seq2seq(g: torch.Generator) -> dict[str, Any]:
    return {"input_ids": token_ids(g), "attention_mask": padding_mask(), "decoder_input_ids": token_ids(g, DECODER_SEQ)}


def _pixels(size: int) -> Callable[[torch.Generator], dict[str, Any]]:
    return lambda g: {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g)}


# --------------------------------------------------------------------------- builders


def _hf(model_class: str, config_class: str, impl: str, **config: Any) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_class)(**config)
    model = getattr(transformers, model_class)._from_config(cfg, attn_implementation=impl)
    return model.eval()


#: The common size of the text models: 2 layers, width 32, 4 heads of 8.
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)


def _hf_entry(family: str, model_class: str, config_class: str, impls: tuple[str, ...], sites: int,
              inputs: Callable, features: str, output: Callable | None = None,
              expected_skips: Mapping[str, str] | None = None, **config: Any) -> list[ZooEntry]:
    return [
        ZooEntry(family=family, impl=impl, sites=sites,
                 build=functools.partial(_hf, model_class, config_class, impl, **config),
                 inputs=inputs, output=output, expected_skips=dict(expected_skips or {}), features=features,
                 hf_class=model_class)
        for impl in impls
    ]


_BOTH = ("eager", "sdpa")


class TransformerWithEmbeddings(nn.Module):
    """``nn.Transformer`` (2 encoder + 2 decoder layers, batch-first), the way a user calls it:
    a causal target mask and a source padding mask."""

    def __init__(self, d_model: int = 32, nhead: int = 4):
        super().__init__()
        self.transformer = nn.Transformer(d_model, nhead, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, src_key_padding_mask):
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        # tgt_is_causal=True, as the docs advise: without it nn.Transformer reads the mask's values
        # to detect causality (a data-dependent graph break that leaves the decoder uncompiled)
        return self.transformer(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True,
                                src_key_padding_mask=src_key_padding_mask,
                                memory_key_padding_mask=src_key_padding_mask)


def _nn_transformer() -> nn.Module:
    return TransformerWithEmbeddings().eval()


def _nn_transformer_inputs(g: torch.Generator) -> dict[str, Any]:
    return {"src": torch.randn(BATCH, SEQ, 32, generator=g), "tgt": torch.randn(BATCH, DECODER_SEQ, 32, generator=g),
            "src_key_padding_mask": padding_mask() == 0}


def _clip_output(out: Any) -> torch.Tensor:
    # both towers: the text and the image embeddings
    return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])


def _whisper_inputs(g: torch.Generator) -> dict[str, Any]:
    # log-mel features [B, mel bins, 2 · max_source_positions]; the conv stem halves the length
    return {"input_features": torch.randn(BATCH, 8, 16, generator=g), "decoder_input_ids": token_ids(g, DECODER_SEQ),
            "decoder_attention_mask": padding_mask(DECODER_SEQ)}


def _clip_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_text(g), "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g)}


# --------------------------------------------------------------------------- the zoo

HF_ENTRIES: list[ZooEntry] = [
    *_hf_entry("llama", "LlamaModel", "LlamaConfig", _BOTH, 2, _text, "GQA (repeat_kv), causal+padding, fp32 softmax",
               num_key_value_heads=2, **_TEXT),
    *_hf_entry("mistral", "MistralModel", "MistralConfig", _BOTH, 2, _text, "GQA, sliding window (4) < sequence",
               num_key_value_heads=2, sliding_window=4, **_TEXT),
    *_hf_entry("qwen2", "Qwen2Model", "Qwen2Config", _BOTH, 2, _text, "GQA, q/k/v biases",
               num_key_value_heads=2, **_TEXT),
    *_hf_entry("gemma", "GemmaModel", "GemmaConfig", _BOTH, 2, _text, "multi-query (1 kv head), head_dim 16",
               num_key_value_heads=1, head_dim=16, **_TEXT),
    *_hf_entry("gemma2", "Gemma2Model", "Gemma2Config", ("eager",), 2, _text,
               "score soft-capping tanh(s/50)·50, query_pre_attn_scalar, sliding window (4) on layer 0",
               num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
               attn_logit_softcapping=50.0, **_TEXT),
    *_hf_entry("phi", "PhiModel", "PhiConfig", _BOTH, 2, _text, "partial rotary, dense with biases",
               **_TEXT),
    *_hf_entry("gpt2", "GPT2Model", "GPT2Config", _BOTH, 2, _text, "causal buffer, where(causal, s, min)",
               vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    *_hf_entry("gpt_neox", "GPTNeoXModel", "GPTNeoXConfig", _BOTH, 2, _text, "fused qkv, rotary",
               vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0),
    *_hf_entry("opt", "OPTModel", "OPTConfig", _BOTH, 2, _text, "scale on q",
               vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1),
    *_hf_entry("bloom", "BloomModel", "BloomConfig", ("eager",), 2, _text,
               "ALiBi through baddbmm, 3-D scores viewed 4-D for the mask and back",
               vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    *_hf_entry("falcon", "FalconModel", "FalconConfig", _BOTH, 2, _text, "multi-query, rotary",
               vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64),
    *_hf_entry("falcon_alibi", "FalconModel", "FalconConfig", _BOTH, 2, _text,
               "ALiBi added before the scale, new decoder architecture, 2 kv heads",
               vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
               new_decoder_architecture=True, alibi=True, max_position_embeddings=64),
    *_hf_entry("bert", "BertModel", "BertConfig", _BOTH, 2, _text, "additive padding mask", **_TEXT),
    *_hf_entry("roberta", "RobertaModel", "RobertaConfig", _BOTH, 2, _text, "additive padding mask",
               **{**_TEXT, "pad_token_id": 1, "max_position_embeddings": 66}),
    *_hf_entry("distilbert", "DistilBertModel", "DistilBertConfig", _BOTH, 2, _text, "masked_fill padding",
               vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
    *_hf_entry("albert", "AlbertModel", "AlbertConfig", _BOTH, 2, _text, "one layer shared twice",
               embedding_size=16, **_TEXT),
    *_hf_entry("electra", "ElectraModel", "ElectraConfig", _BOTH, 2, _text, "embedding projection",
               embedding_size=16, **_TEXT),
    *_hf_entry("t5", "T5Model", "T5Config", _BOTH, 6, _seq2seq,
               "relative position bias, no scale, encoder/decoder/cross-attention",
               vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               pad_token_id=0, decoder_start_token_id=0),
    *_hf_entry("bart", "BartModel", "BartConfig", _BOTH, 6, _seq2seq, "encoder, causal decoder, cross-attention",
               vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
    *_hf_entry("whisper", "WhisperModel", "WhisperConfig", _BOTH, 6, _whisper_inputs,
               "scale folded into q, audio encoder, decoder with cross-attention",
               vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1),
    *_hf_entry("vit", "ViTModel", "ViTConfig", _BOTH, 2, _pixels(32), "patches + CLS, no mask",
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
               patch_size=8),
    *_hf_entry("clip", "CLIPModel", "CLIPConfig", _BOTH, 4, _clip_inputs, "causal text tower + vision tower",
               output=_clip_output,
               text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, projection_dim=16,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
               vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=16),
               projection_dim=16),
    *_hf_entry("swin", "SwinModel", "SwinConfig", _BOTH, 4, _pixels(32),
               "window attention, relative position bias, shifted-window mask",
               image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4),
]

NATIVE_ENTRIES: list[ZooEntry] = [
    ZooEntry(family="nn_transformer", impl="native", sites=6, build=_nn_transformer, inputs=_nn_transformer_inputs,
             features="nn.MultiheadAttention: encoder, causal decoder, cross-attention, key padding"),
]


def _target(module: str, cls: str, **overrides):
    """Build a reference target (``attnrewrite.targets.<module>.<cls>``) from its tiny config, in eval mode."""

    def build() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"attnrewrite.targets.{module}"), cls).from_name(
            "tiny", **overrides).eval()

    return build


def _padded(tokens: torch.Tensor, pad_id: int = 0, keep: int = SEQ - 3) -> torch.Tensor:
    tokens = tokens.clone()
    tokens[1, keep:] = pad_id  # right padding in the second sequence
    return tokens


def _images(g: torch.Generator) -> dict[str, Any]:
    return {"images": torch.randn(BATCH, 1, 8, 8, generator=g)}


def package_targets() -> list[ZooEntry]:
    """The package's own reference models (``attnrewrite/targets/``), family ``target_<name>``."""
    return [
        ZooEntry(family="target_llama", impl="reference", sites=2, build=_target("llama", "Llama"),
                 inputs=lambda g: {"tokens": token_ids(g)},
                 features="GQA via repeat_interleave, bool tril buffer, float32 softmax"),
        ZooEntry(family="target_gpt2", impl="eager", sites=2, build=_target("gpt2", "GPT2", attn_impl="eager"),
                 inputs=lambda g: {"idx": token_ids(g)}, features="nanoGPT manual path: masked_fill on a buffer"),
        ZooEntry(family="target_gpt2", impl="sdpa", sites=2, build=_target("gpt2", "GPT2", attn_impl="sdpa"),
                 inputs=lambda g: {"idx": token_ids(g)}, features="SDPA with is_causal"),
        ZooEntry(family="target_bert", impl="reference", sites=2, build=_target("bert", "Bert"),
                 inputs=lambda g: {"input_ids": token_ids(g), "attention_mask": padding_mask()},
                 features="additive (1 - m)·min padding mask"),
        ZooEntry(family="target_vit", impl="reference", sites=2, build=_target("vit", "ViT"), inputs=_images,
                 features="bidirectional, no mask"),
        ZooEntry(family="target_singlecell", impl="reference", sites=2, build=_target("singlecell", "CellEncoder"),
                 inputs=lambda g: {"tokens": _padded(torch.randint(3, 64, (BATCH, SEQ), generator=g))},
                 features="gene tokens, key padding through masked_fill(finfo.min), float32 softmax"),
    ]


ZOO: list[ZooEntry] = HF_ENTRIES + NATIVE_ENTRIES + package_targets()


def get(entry_id: str) -> ZooEntry:
    """The entry called ``entry_id`` (``"<family>-<impl>"``); a clear error lists the known ids."""
    for entry in ZOO:
        if entry.id == entry_id:
            return entry
    raise KeyError(f"no zoo entry {entry_id!r}; known: {', '.join(e.id for e in ZOO)}")
