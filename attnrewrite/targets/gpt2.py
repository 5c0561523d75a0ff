"""GPT-2: a decoder-only transformer in one file, in the manner of nanoGPT.

Like nanoGPT it keeps two spellings of causal self-attention, picked by ``config.attn_impl``:

- ``"eager"``: written out by hand — ``q @ k.transpose(-2, -1) * scale``, a causal
  ``masked_fill`` with ``-inf``, softmax, dropout, ``@ v``;
- ``"sdpa"``: ``F.scaled_dot_product_attention(..., is_causal=True)``.

Both compute the same function; the rewriter must find either.

    model = GPT2(GPT2Config.from_name("tiny"))
    logits = model(idx)                                       # [B, T, vocab]
    model = GPT2.from_hf(hf_gpt2_lm_head_model, attn_impl="eager")

Shapes: B batch, T sequence, C width, H heads, D head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("eager", "sdpa")


@dataclass
class GPT2Config:
    """Shape of a GPT-2 model. ``attn_impl`` is ``"eager"`` (hand-written) or ``"sdpa"``."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    attn_impl: str = "eager"

    def __post_init__(self):
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT2Config":
        """A named configuration from :data:`CONFIGS`, with fields optionally overridden."""
        if name not in CONFIGS:
            raise KeyError(f"unknown GPT-2 config {name!r}; known: {sorted(CONFIGS)}")
        return dataclasses.replace(CONFIGS[name], **overrides)


CONFIGS: dict[str, GPT2Config] = {
    "tiny": GPT2Config(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=64),
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        causal = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", causal.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # [B, H, T, D]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # [B, H, T, D]
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # [B, H, T, D]

        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))   # [B, H, T, T]
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v                                                       # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)                      # [B, T, C]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model; the output projection shares the token embedding's weights."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT2":
        """A freshly initialised model of a named configuration (see :data:`CONFIGS`)."""
        return cls(GPT2Config.from_name(name, **overrides))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] for token ids idx [B, T] (int64), T <= block_size."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)     # [T]
        x = self.drop(self.wte(idx) + self.wpe(pos))                   # [B, T, C]
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))                              # [B, T, V]

    @classmethod
    def from_hf(cls, hf_model: nn.Module, attn_impl: str = "eager") -> "GPT2":
        """Build a :class:`GPT2` with the weights of a transformers ``GPT2LMHeadModel``.

        Dropout rates are copied (call ``.eval()`` to compare outputs). HF stores the linear
        layers as ``Conv1D`` with [in, out] weights; they are transposed here.
        """
        hf = hf_model.config
        if getattr(hf, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"from_hf supports the tanh GELU only, got {hf.activation_function!r}")
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf, "scale_attn_weights", True):
            raise ValueError("from_hf supports GPT-2's standard 1/sqrt(head_dim) attention scale only")
        if (getattr(hf, "n_inner", None) or 4 * hf.n_embd) != 4 * hf.n_embd:
            raise ValueError(f"from_hf supports n_inner = 4 * n_embd only, got {hf.n_inner}")
        config = GPT2Config(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                            n_head=hf.n_head, n_embd=hf.n_embd, dropout=hf.attn_pdrop, bias=True,
                            layer_norm_eps=hf.layer_norm_epsilon, attn_impl=attn_impl)
        model = cls(config)
        source = {name.removeprefix("transformer."): tensor for name, tensor in hf_model.state_dict().items()}
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {}
        for name in model.state_dict():
            tensor = source["wte.weight" if name == "lm_head.weight" else name]   # the head is tied to wte
            state[name] = tensor.t() if name.endswith(transposed) else tensor
        model.load_state_dict(state)
        return model.to(device=hf_model.lm_head.weight.device, dtype=hf_model.lm_head.weight.dtype)
