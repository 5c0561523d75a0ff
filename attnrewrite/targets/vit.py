"""Vision Transformer (ViT) in one file: patch embedding, class token, pre-norm encoder,
classifier on the class token.

Attention is written plainly with a multiplied scale and no mask (every patch sees every
patch): ``(q @ k^T) * scale``, softmax, dropout, ``@ v``.

    model = ViT(ViTConfig.from_name("digits"))    # 8x8 grey digits, 2x2 patches, 10 classes
    logits = model(images)                        # images [B, 1, 8, 8] -> [B, 10]

Shapes: B batch, N patches (+1 for the class token), C width, H heads, D head width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    """Shape of a ViT. ``image_size`` must be a multiple of ``patch_size``."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    n_classes: int = 1000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViTConfig":
        """A named configuration from :data:`CONFIGS`, with fields optionally overridden."""
        if name not in CONFIGS:
            raise KeyError(f"unknown ViT config {name!r}; known: {sorted(CONFIGS)}")
        return dataclasses.replace(CONFIGS[name], **overrides)


CONFIGS: dict[str, ViTConfig] = {
    "tiny": ViTConfig(image_size=8, patch_size=2, in_channels=1, n_classes=10, dim=32, n_layers=2,
                      n_heads=4, mlp_dim=64),
    # scikit-learn's digits: 8x8 grey images, 16 patches of 2x2 pixels.
    "digits": ViTConfig(image_size=8, patch_size=2, in_channels=1, n_classes=10, dim=64, n_layers=4,
                        n_heads=4, mlp_dim=128, dropout=0.1),
    "vit-b-16": ViTConfig(),
    "vit-l-16": ViTConfig(dim=1024, n_layers=24, n_heads=16, mlp_dim=4096),
}


class Attention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = qkv.unbind(0)                                                                 # [B, H, N, D]
        attn = (q @ k.transpose(-2, -1)) * self.scale                                           # [B, H, N, N]
        attn = attn.softmax(dim=-1)
        attn = self.attn_dropout(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)                                         # [B, N, C]
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x))))))


class ViT(nn.Module):
    """Image classifier: patches -> tokens, a learned class token, encoder, linear head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # A convolution with stride = kernel = patch size is a linear map of each patch.
        self.patch_embed = nn.Conv2d(config.in_channels, config.dim, kernel_size=config.patch_size,
                                     stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.dim))
        self.pos_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.dim, config.n_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViT":
        """A freshly initialised model of a named configuration (see :data:`CONFIGS`)."""
        return cls(ViTConfig.from_name(name, **overrides))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Final normalised token states [B, N + 1, C] (class token first) of images
        [B, in_channels, image_size, image_size]."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                             f"got shape {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)              # [B, N, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1)                      # [B, 1, C]
        x = torch.cat([cls, x], dim=1) + self.pos_embed                      # [B, N + 1, C]
        x = self.pos_dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, n_classes] (float, the weights' dtype) of images [B, in_channels, H, W]."""
        return self.head(self.features(images)[:, 0])
