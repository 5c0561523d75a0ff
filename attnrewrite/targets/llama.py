"""Llama: a decoder-only transformer in one file.

RMSNorm, rotary position embeddings (RoPE, the half-split layout that HF checkpoints use),
SwiGLU feed-forward, grouped-query attention, a static KV cache and ``generate()`` with a
prefill step and one-token decode steps.

Attention is written out plainly (matmul, scale, causal ``masked_fill``, softmax in float32,
matmul): finding it and swapping it for another kind is the rewriter's job, so the model has no
switch for it.

    config = LlamaConfig.from_name("tiny")
    model = Llama(config)
    logits = model(tokens)                              # [B, T, vocab]
    out = model.generate(prompt, max_new_tokens=32)     # [B, T0 + 32]
    model = Llama.from_hf(hf_llama_for_causal_lm)       # same logits as HF (fp32, <= 1e-5)

Shapes: B batch, T query length, S key length (cache length when decoding), C model width,
H query heads, K key/value heads, D head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class LlamaConfig:
    """Shape of a Llama model.

    ``intermediate_size`` defaults to the Llama rule (2/3 of 4·C, rounded up to a multiple of
    ``multiple_of``); ``head_dim`` defaults to C / H; ``n_kv_heads`` defaults to ``n_heads``
    (plain multi-head attention).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.intermediate_size is None:
            self.intermediate_size = _find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        """A named configuration from :data:`CONFIGS`, with fields optionally overridden."""
        if name not in CONFIGS:
            raise KeyError(f"unknown Llama config {name!r}; known: {sorted(CONFIGS)}")
        return dataclasses.replace(CONFIGS[name], **overrides)


# Named shapes. "tiny" is for tests, "char" is what examples/train_lm.py trains on bytes; the
# large ones match published checkpoints and are meant to be built on the meta device (their
# graphs are benchmarked, their weights never exist here).
CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=160, max_seq_len=128),
    "char": LlamaConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, n_kv_heads=2,
                        intermediate_size=512, max_seq_len=256),
    "small": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                         max_seq_len=2048),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  intermediate_size=5632, max_seq_len=2048),
    "llama-2-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                              intermediate_size=11008, max_seq_len=4096),
    "llama-3-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, max_seq_len=8192, rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16/fp16 models keep the statistics exact.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for RoPE, each [max_seq_len, head_dim] float32 (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]        # [S, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)            # [S, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles of its positions; cos, sin are [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Static key/value cache: [B, K, S_max, D] buffers written in place at ``input_pos``."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: positions past the current one are masked with -inf and their
        # probability is exactly 0, but 0 * NaN garbage would still be NaN.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, K, T, D] at positions input_pos [T]; return the whole cache [B, K, S_max, D] twice."""
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache

    def attend(self, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor):
        """Store the step's k, v and return what its queries q [B, H, T, D] attend to: keys and values
        [B, K, S, D] and a bool mask broadcastable to [B, H, T, S].  The static cache returns everything
        with the causal ``mask`` [T, S_max]; caches of other kinds (see :meth:`Llama.setup_cache`) may
        return fewer keys and their own mask."""
        k, v = self.update(input_pos, k, v)
        return k, v, mask


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if input_pos is not None:
            k, v, mask = self.kv_cache.attend(input_pos, q, k, v, mask)                # [B, K, S, D]

        # Grouped-query attention: each key/value head serves H / K query heads.
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)                                          # [B, H, S, D]
        v = v.repeat_interleave(n_rep, dim=1)                                          # [B, H, S, D]

        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5                     # [B, H, T, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)                      # [B, H, T, S]
        out = probs @ v                                                                # [B, H, T, D]

        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)          # [B, T, H*D]
        return self.o_proj(out)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only Llama language model.

    Call it as ``model(tokens)`` for a whole causal sequence (training, scoring), or as
    ``model(tokens, input_pos)`` after :meth:`setup_cache` to attend over the KV cache (decoding).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # [S_max, D]
        self.register_buffer("rope_sin", sin, persistent=False)   # [S_max, D]
        causal = torch.ones(config.max_seq_len, config.max_seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)   # [S_max, S_max]
        self.cache_batch_size = 0
        self.cache_seq_len = 0
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Llama":
        """A freshly initialised model of a named configuration (see :data:`CONFIGS`)."""
        return cls(LlamaConfig.from_name(name, **overrides))

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                    cache=None):
        """Allocate a KV cache in every layer for up to ``batch_size`` sequences of ``max_seq_len``
        positions (default: the config's); dtype and device follow the weights.

        ``cache=None`` gives the static :class:`KVCache`.  Another cache (``attnrewrite.SummaryCache``,
        ``attnrewrite.HashedCache``) supplies each layer's with
        ``cache.for_layer(index, attention, batch_size, max_seq_len, dtype, device)``: a module whose
        ``attend(input_pos, q, k, v, mask)`` stores the step and returns the keys, values and mask the
        queries attend to.
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} positions exceeds max_seq_len={self.config.max_seq_len}")
        weight = self.output.weight
        dtype = dtype or weight.dtype
        for index, layer in enumerate(self.layers):
            if cache is None:
                layer.attention.kv_cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_len,
                                                   self.config.head_dim, dtype, weight.device)
            else:
                layer.attention.kv_cache = cache.for_layer(index, layer.attention, batch_size, max_seq_len, dtype,
                                                           weight.device)
        self.cache_batch_size = batch_size
        self.cache_seq_len = max_seq_len

    def clear_cache(self):
        """Drop the KV caches (frees their memory)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_batch_size = 0
        self.cache_seq_len = 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: [B, T] int64 token ids.
            input_pos: None for a whole sequence starting at position 0 (no cache), or [T] int64
                positions of ``tokens`` in the KV cache (needs :meth:`setup_cache` first).
            positions: without a cache only: [T] int64 positions of ``tokens`` in their sequence, for
                RoPE (default 0 … T − 1).  Under context parallelism a rank holds a shard of the sequence
                (with the load-balanced layout, two chunks far apart) and passes their global positions;
                the causal mask written here then orders the tokens by these positions.
        Returns:
            [B, T, V] logits in the weights' dtype.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if positions is not None:
            if input_pos is not None:
                raise ValueError("give positions (a sequence's positions) or input_pos (KV cache), not both")
            if positions.shape != (T,) or positions.dtype != torch.int64:
                raise ValueError(f"positions must be [T={T}] int64, got {tuple(positions.shape)} {positions.dtype}")
            if T and (int(positions.min()) < 0 or int(positions.max()) >= self.config.max_seq_len):
                raise ValueError(f"positions must lie in [0, max_seq_len={self.config.max_seq_len})")
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]   # [T, D]
            # the shard's causal order [T, T]; not built when every layer's attention is causal by itself
            # (``reads_mask = False``: examples/train_lm.py's context-parallel attention), at T = 16k per
            # rank it would be 256 MB that nothing reads
            reads = any(getattr(layer.attention, "reads_mask", True) for layer in self.layers)
            mask = positions[:, None] >= positions[None, :] if reads else None
        elif input_pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]                 # [T, D]
            mask = self.causal_mask[:T, :T]                                  # [T, T]
        else:
            if self.cache_seq_len == 0:
                raise RuntimeError("forward with input_pos needs a KV cache: call setup_cache() first")
            if B > self.cache_batch_size:
                raise ValueError(f"batch of {B} exceeds the cache's batch size {self.cache_batch_size}")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]   # [T, D]
            mask = self.causal_mask[input_pos, :self.cache_seq_len]          # [T, S]
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)

        x = self.tok_embeddings(tokens)                                      # [B, T, C]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))                                     # [B, T, V]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, cache=None) -> torch.Tensor:
        """Continue ``prompt`` [B, T0] (int64) by ``max_new_tokens`` tokens; returns [B, T0 + new].

        One prefill pass writes the prompt into a fresh KV cache, then each new token is one
        decode step of length 1. ``temperature=0`` is greedy (argmax); otherwise tokens are
        sampled from softmax(logits / temperature), restricted to the ``top_k`` largest if given.
        ``cache``: None for the static KV cache, or a cache of another kind (see :meth:`setup_cache`).
        """
        if prompt.dim() != 2 or prompt.dtype != torch.long:
            raise ValueError(f"prompt must be [B, T] int64, got {prompt.dtype} of shape {tuple(prompt.shape)}")
        B, T0 = prompt.shape
        total = T0 + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"{T0} prompt + {max_new_tokens} new tokens exceed max_seq_len={self.config.max_seq_len}")
        self.setup_cache(B, total, cache=cache)
        device = prompt.device

        logits = self(prompt, torch.arange(T0, device=device))              # prefill: [B, T0, V]
        next_token = _sample(logits[:, -1], temperature, top_k, generator)  # [B, 1]
        generated = [next_token]
        for pos in range(T0, total - 1):
            logits = self(next_token, torch.tensor([pos], device=device))   # decode: [B, 1, V]
            next_token = _sample(logits[:, -1], temperature, top_k, generator)
            generated.append(next_token)
        return torch.cat([prompt, *generated], dim=1)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "Llama":
        """Build a :class:`Llama` with the weights of a transformers ``LlamaForCausalLM``.

        The result computes the same logits as ``hf_model`` (fp32: within 1e-5). Only the
        default RoPE is supported; scaled variants (llama3, yarn, ...) raise ``ValueError``.
        """
        hf = hf_model.config
        # transformers >= 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"from_hf supports the default RoPE only, this model uses {rope_type!r}")
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise ValueError("from_hf supports Llama without attention/MLP biases only")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"from_hf supports SwiGLU (silu) only, got {hf.hidden_act!r}")
        config = LlamaConfig(
            vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
            rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
            norm_eps=hf.rms_norm_eps, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        )
        model = cls(config)
        source = hf_model.state_dict()
        mapping = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
        for i in range(config.n_layers):
            ours, theirs = f"layers.{i}.", f"model.layers.{i}."
            mapping[ours + "attention_norm.weight"] = theirs + "input_layernorm.weight"
            mapping[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mapping[ours + f"attention.{name}.weight"] = theirs + f"self_attn.{name}.weight"
            for name in ("gate_proj", "up_proj", "down_proj"):
                mapping[ours + f"feed_forward.{name}.weight"] = theirs + f"mlp.{name}.weight"
        if config.tie_embeddings and "lm_head.weight" not in source:
            mapping["output.weight"] = "model.embed_tokens.weight"
        model.load_state_dict({ours: source[theirs] for ours, theirs in mapping.items()})
        dtype = hf_model.lm_head.weight.dtype
        return model.to(device=hf_model.lm_head.weight.device, dtype=dtype)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V]; returns [B, 1] int64."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
