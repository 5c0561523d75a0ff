"""The package's own reference models as tiny test cases: a model, its inputs, and the spec its sites must have."""

from __future__ import annotations

import torch

from attnrewrite.targets import bert, gpt2, llama, singlecell, vit

#: Every reference target, by the name :func:`build` takes.
NAMES = ("llama", "gpt2-eager", "gpt2-sdpa", "bert", "vit", "singlecell")


def _tokens(vocab, b=2, t=12):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))


def build(name: str) -> tuple[torch.nn.Module, dict, dict]:
    """A tiny reference target by name (:data:`NAMES`): the model (seeded, random weights), keyword
    inputs (with key padding where the model takes it) and what every site's spec must say."""
    torch.manual_seed(0)
    if name == "llama":
        m = llama.Llama.from_name("tiny")
        return m, {"tokens": _tokens(m.config.vocab_size)}, dict(causal=True, kv_groups=m.config.n_heads // m.config.n_kv_heads)
    if name.startswith("gpt2"):
        m = gpt2.GPT2.from_name("tiny", attn_impl=name.split("-")[1])
        return m, {"idx": _tokens(m.config.vocab_size)}, dict(causal=True)
    if name == "bert":
        m = bert.Bert.from_name("tiny")
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        return m, {"input_ids": _tokens(m.config.vocab_size), "attention_mask": mask}, dict(causal=False, has_bias=True)
    if name == "vit":
        m = vit.ViT.from_name("tiny")
        c = m.config
        images = torch.randn(2, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
        return m, {"images": images}, dict(causal=False, has_bias=False)
    if name == "singlecell":
        m = singlecell.CellEncoder.from_name("tiny")
        tokens = torch.randint(1, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        tokens[1, 8:] = singlecell.PAD_ID
        return m, {"tokens": tokens}, dict(causal=False, has_bias=True)
    raise ValueError(f"unknown reference target {name!r}; known: {NAMES}")


class _HandWrittenAttention(torch.nn.Module):
    """A llama target attention layer whose softmax is replaced by ``attend`` (see :func:`hand_written_llama`)."""

    def __init__(self, inner: llama.Attention, attend):
        super().__init__()
        self.inner, self.attend = inner, attend

    def forward(self, x, cos, sin, mask, input_pos=None):
        a = self.inner
        b, t, _ = x.shape
        q = llama.apply_rope(a.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2), cos, sin)
        k = llama.apply_rope(a.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2), cos, sin)
        v = a.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        out = self.attend(q, k, v, mask)
        return a.o_proj(out.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim))


def hand_written_llama(model: llama.Llama, attend) -> llama.Llama:
    """A copy of the llama target ``model`` (same weights) with attention written by hand: each layer
    computes ``attend(q, k, v, mask)`` in place of its softmax — q [B, H, T, D] and k, v [B, Hkv, T, D]
    (rotary embedding applied; GQA not repeated), ``mask`` the layer's bool mask (True = may attend) —
    which returns [B, H, T, D].  The oracle a rewritten model of a kind is compared with."""
    import copy

    oracle = copy.deepcopy(model)
    for layer in oracle.layers:
        layer.attention = _HandWrittenAttention(layer.attention, attend)
    return oracle


def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v [B, Hkv, T, D] repeated to q's number of heads (grouped-query attention written out)."""
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
