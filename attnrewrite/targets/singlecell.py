"""A single-cell foundation model in one file, in the style of Geneformer and scGPT.

A cell is a sentence of gene tokens: the genes it expresses, ranked by expression (each gene's
value first divided by its median over expressing cells, so that housekeeping genes do not
always come first — Geneformer's rank-value encoding). Cells express different numbers of
genes, so a batch is padded to its longest cell and the bidirectional encoder masks the padding
out. Pretraining hides some genes and predicts which gene stood there; the cell embedding is
the mean of the final states over the cell's genes.

Attention is written plainly: ``q @ k^T * scale``, padded keys filled with
``torch.finfo(dtype).min``, softmax upcast to float32 and cast back, ``@ v``.

    tokenizer = GeneTokenizer.fit(train_expression)            # [N, G] float
    tokens = pad_cells(tokenizer(expression))                  # [B, L] int64, PAD_ID padded
    model = CellEncoder(SingleCellConfig.from_name("pbmc"))
    loss = masked_gene_loss(model, tokens, generator=g)       # scalar
    cells = model.cell_embedding(tokens)                       # [B, C]

Shapes: B cells, L genes per cell (padded), C width, H heads, D head width, V = genes + specials.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 0
MASK_ID = 1
N_SPECIAL_TOKENS = 2   # gene g has token id g + N_SPECIAL_TOKENS


@dataclass
class SingleCellConfig:
    """Shape of a :class:`CellEncoder`. ``max_len`` is the most genes a cell may keep (the size
    of the rank embedding table); the tokenizer truncates longer cells to it."""

    n_genes: int = 765
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 512
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")

    @property
    def vocab_size(self) -> int:
        return self.n_genes + N_SPECIAL_TOKENS

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SingleCellConfig":
        """A named configuration from :data:`CONFIGS`, with fields optionally overridden."""
        if name not in CONFIGS:
            raise KeyError(f"unknown single-cell config {name!r}; known: {sorted(CONFIGS)}")
        return dataclasses.replace(CONFIGS[name], **overrides)


CONFIGS: dict[str, SingleCellConfig] = {
    "tiny": SingleCellConfig(n_genes=64, dim=32, n_layers=2, n_heads=4, mlp_dim=64, max_len=64),
    # scanpy's pbmc68k_reduced: 765 genes, 183 to 409 expressed per cell; the top 256 are kept,
    # sized to pretrain in minutes on two CPU cores.
    "pbmc": SingleCellConfig(n_genes=765, dim=96, n_layers=3, n_heads=4, mlp_dim=192, max_len=256),
    # Geneformer's published shapes (about 25k genes, 2048 ranked genes per cell).
    "geneformer-6l": SingleCellConfig(n_genes=25424, dim=256, n_layers=6, n_heads=4, mlp_dim=512, max_len=2048),
    "geneformer-12l": SingleCellConfig(n_genes=25424, dim=512, n_layers=12, n_heads=8, mlp_dim=1024,
                                       max_len=2048),
}


class GeneTokenizer:
    """Rank-value encoding of cells into gene tokens.

    ``gene_scale`` [G] holds each gene's median expression over the training cells that express
    it; a cell's expression is divided by it, its expressed genes sorted by the result (largest
    first, ties by gene index), and the first ``max_len`` kept.
    """

    def __init__(self, gene_scale: np.ndarray, max_len: int):
        self.gene_scale = np.asarray(gene_scale, dtype=np.float64)
        if self.gene_scale.ndim != 1 or not np.all(self.gene_scale > 0):
            raise ValueError("gene_scale must be a 1-d array of positive numbers")
        self.max_len = max_len

    @classmethod
    def fit(cls, expression: np.ndarray, max_len: int) -> "GeneTokenizer":
        """Learn the per-gene medians from non-negative expression [N, G]."""
        expression = _as_dense(expression)
        if np.any(expression < 0):
            raise ValueError("expression must be non-negative (counts or log-normalised counts)")
        scale = np.ones(expression.shape[1])
        for gene in range(expression.shape[1]):
            expressed = expression[:, gene][expression[:, gene] > 0]
            if expressed.size:
                scale[gene] = np.median(expressed)
        return cls(scale, max_len)

    @property
    def n_genes(self) -> int:
        return self.gene_scale.shape[0]

    def __call__(self, expression: np.ndarray) -> list[torch.Tensor]:
        """One int64 token tensor per cell of expression [N, G]; lengths vary from cell to cell."""
        expression = _as_dense(expression)
        if expression.ndim != 2 or expression.shape[1] != self.n_genes:
            raise ValueError(f"expression must be [cells, {self.n_genes}], got shape {expression.shape}")
        cells = []
        for row in expression:
            expressed = np.flatnonzero(row > 0)
            order = np.argsort(-(row[expressed] / self.gene_scale[expressed]), kind="stable")
            genes = expressed[order][: self.max_len]
            cells.append(torch.from_numpy(genes + N_SPECIAL_TOKENS).long())
        return cells


def _as_dense(expression) -> np.ndarray:
    if hasattr(expression, "toarray"):   # scipy sparse
        expression = expression.toarray()
    return np.asarray(expression, dtype=np.float64)


def pad_cells(cells: list[torch.Tensor]) -> torch.Tensor:
    """Stack variable-length token tensors into [B, L] int64, L = the longest cell, padded with PAD_ID."""
    if not cells:
        raise ValueError("pad_cells needs at least one cell")
    longest = max(len(cell) for cell in cells)
    tokens = torch.full((len(cells), longest), PAD_ID, dtype=torch.long)
    for i, cell in enumerate(cells):
        tokens[i, : len(cell)] = cell
    return tokens


class SelfAttention(nn.Module):
    def __init__(self, config: SingleCellConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(config.dim, config.dim)
        self.k = nn.Linear(config.dim, config.dim)
        self.v = nn.Linear(config.dim, config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q = self.q(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, L, D]
        k = self.k(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, L, D]
        v = self.v(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, L, D]

        scores = q @ k.transpose(-2, -1) * self.scale                            # [B, H, L, L]
        scores = scores.masked_fill(is_pad[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
        probs = self.attn_dropout(probs)
        out = probs @ v                                                          # [B, H, L, D]

        return self.out(out.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, config: SingleCellConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), is_pad))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class CellEncoder(nn.Module):
    """Bidirectional encoder over rank-ordered gene tokens, with a masked-gene head."""

    def __init__(self, config: SingleCellConfig):
        super().__init__()
        self.config = config
        self.gene_embed = nn.Embedding(config.vocab_size, config.dim, padding_idx=PAD_ID)
        self.rank_embed = nn.Embedding(config.max_len, config.dim)   # position in the ranking
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.gene_head = nn.Linear(config.dim, config.vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CellEncoder":
        """A freshly initialised model of a named configuration (see :data:`CONFIGS`)."""
        return cls(SingleCellConfig.from_name(name, **overrides))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final gene states [B, L, C] of tokens [B, L] (int64; PAD_ID marks padding, which no
        position attends to)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        if L > self.config.max_len:
            raise ValueError(f"cells of {L} genes exceed max_len={self.config.max_len}")
        is_pad = tokens == PAD_ID                                                  # [B, L]
        ranks = torch.arange(L, device=tokens.device)                              # [L]
        x = self.embed_dropout(self.gene_embed(tokens) + self.rank_embed(ranks))   # [B, L, C]
        for block in self.blocks:
            x = block(x, is_pad)
        return self.norm(x)

    def gene_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which gene stands at each position: logits [B, L, V]."""
        return self.gene_head(self(tokens))

    def cell_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """One vector per cell [B, C]: the mean of the final states over the cell's genes."""
        keep = (tokens != PAD_ID).unsqueeze(-1).to(self.norm.weight.dtype)      # [B, L, 1]
        return (self(tokens) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def mask_genes(tokens: torch.Tensor, mask_prob: float = 0.15,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide a random ``mask_prob`` of each cell's genes for the masked-gene objective.

    Returns (inputs, labels), both [B, L] int64: inputs has MASK_ID at the hidden positions;
    labels holds the hidden gene tokens there and -100 (ignored by cross-entropy) elsewhere.
    Every cell gets at least one hidden gene.
    """
    is_gene = tokens != PAD_ID
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    hidden = (draw < mask_prob) & is_gene
    # Cells where the draw hid nothing get their lowest-draw gene hidden, so no row is label-free.
    first = draw.masked_fill(~is_gene, 2.0).argmin(dim=1, keepdim=True)
    hidden.scatter_(1, first, True)
    hidden &= is_gene
    inputs = tokens.masked_fill(hidden, MASK_ID)
    labels = tokens.masked_fill(~hidden, -100)
    return inputs, labels


def masked_gene_loss(model: CellEncoder, tokens: torch.Tensor, mask_prob: float = 0.15,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of predicting the hidden genes of tokens [B, L]; a float32 scalar."""
    inputs, labels = mask_genes(tokens, mask_prob, generator)
    hidden = model(inputs)                                                        # [B, L, C]
    # Only hidden positions are scored, so only they go through the gene head.
    is_hidden = labels != -100
    logits = model.gene_head(hidden[is_hidden])                                   # [M, V]
    return F.cross_entropy(logits.float(), labels[is_hidden])
