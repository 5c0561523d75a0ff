"""Feature maps that carry state, applied in torch before the kernels (``feature_map="identity"``).

- :class:`FavorFeatureMap` — Performer's positive orthogonal random features (FAVOR+,
  Choromanski et al., 2021): φ(x) = exp(Wx − |x|²/2) / √M, an unbiased estimate of the softmax
  kernel exp(q·k).  Seeded, and redrawable with :meth:`FavorFeatureMap.redraw`.
- :class:`HedgehogFeatureMap` — Hedgehog's learned map (Zhang et al., 2024), as LoLCATs uses it
  to convert softmax models: φ(x) = softmax([xW, −xW]) over 2·F features (F = D by default), one W
  per head, initialised to the identity (and seeded unit directions beyond D).  With a key gate
  the keys' map is multiplied by exp(k·u_h), u_h learned per head (0 at first): the softmax over
  features divides each key by its own normaliser, which removes the weight softmax attention gives
  a key whatever the query (exp(q̄·k) for the queries' common direction q̄); the gate gives it back.

:class:`LinearSiteState` holds one map for the queries and one for the keys of a site; the
linear kind attaches it to the model with :func:`attnrewrite.convert`.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn


def orthogonal_gaussian(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, dim]: blocks of orthogonal directions with chi-distributed norms (as Gaussian rows have)."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append(q.T)
    directions = torch.cat(blocks)[:rows]
    norms = torch.randn(rows, dim, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (directions * norms).float()


class FavorFeatureMap(nn.Module):
    """Positive random features approximating exp(scale · q·k).

    Args:
        head_dim: D.
        num_features: M (default 2·D).
        scale: the softmax scale to approximate (√scale is applied to both q and k).
        seed: draws are reproducible from it; :meth:`redraw` makes a new draw.
    Input [B, H, T, D] → output [B, H, T, M] (positive).
    """

    def __init__(self, head_dim: int, num_features: int | None = None, scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.head_dim, self.num_features = head_dim, num_features or 2 * head_dim
        self.input_scale = math.sqrt(scale)
        self.seed = seed
        self.register_buffer("projection", torch.empty(self.num_features, head_dim))
        self.redraw(seed)

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw new random features (from ``seed``, or from the next seed after the current one)."""
        self.seed = self.seed + 1 if seed is None else seed
        generator = torch.Generator().manual_seed(self.seed)
        self.projection.copy_(orthogonal_gaussian(self.num_features, self.head_dim, generator))

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        dtype = x.dtype  # exp() needs at least float32; the kernels need q, k, v in one dtype
        x = x.to(torch.promote_types(dtype, torch.float32)) * self.input_scale
        wx = x @ self.projection.T.to(x.dtype)  # [B, H, T, M]
        logits = wx - x.square().sum(-1, keepdim=True) / 2
        # A constant per query row, or one per (batch, head) for the keys, cancels in the ratio
        # φ(q)·S / φ(q)·z: it only keeps exp() in range.
        stabilizer = logits.amax(-1, keepdim=True) if is_query else logits.amax(dim=(-2, -1), keepdim=True)
        return (torch.exp(logits - stabilizer.detach()) / math.sqrt(self.num_features)).to(dtype)


class HedgehogFeatureMap(nn.Module):
    """φ(x) = softmax([x W_h, −x W_h]) over 2·F features, W_h [D, F] per head.

    W_h starts as the identity (F = D, the default).  With more features (F > D) the first D
    columns are the identity and the other F − D are unit directions drawn from ``seed``, the same
    for every head (so a site's query and key maps start alike).  Input [B, H, T, D] → output
    [B, H, T, 2·F] (positive, sums to 1 per token).

    ``key_gate``: the map is for keys and multiplies its output by exp(x·u_h), u_h [D] per head,
    learned, starting at 0 (so the map starts as without the gate).  A factor per key, not a
    normaliser across keys, so prefill and decoding see the same features.  (On the query side such
    a factor would cancel in the ratio φ(q)·S / φ(q)·z.)

    ``gate_normaliser`` (with ``key_gate``): the gate's exponent also gets a_h·log Σ_f exp([x W_h, −x W_h]_f),
    a_h per head, learned, starting at 0.  The softmax over features divides each key by that sum, a
    nonlinear function of the key (about its largest |x·w_f|) that a gate linear in x cannot give back;
    a_h = 1 undoes it (the keys' features become exp([x W_h, −x W_h]), the Hedgehog paper's map, whose
    rows carry the key's own weight), a_h = 0 keeps the softmax's (LoLCATs').  Still one factor per key.
    """

    #: The gate's exponent is clamped to ±GATE_LIMIT (exp() in range in float32 and bfloat16).
    GATE_LIMIT = 30.0

    def __init__(self, heads: int, head_dim: int, num_features: int | None = None, seed: int = 0,
                 key_gate: bool = False, gate_normaliser: bool = False, feature_bias: bool = False):
        super().__init__()
        if gate_normaliser and not key_gate:
            raise ValueError("hedgehog's gate_normaliser is a part of its key gate: give key_gate=True with it")
        columns = head_dim if num_features is None else num_features // 2
        if num_features is not None and (num_features % 2 or columns < 1):
            raise ValueError(f"hedgehog's features must be an even number >= 2 (x W and -x W); got {num_features}")
        init = torch.eye(head_dim, columns)  # [D, F]
        if columns > head_dim:
            extra = orthogonal_gaussian(columns - head_dim, head_dim, torch.Generator().manual_seed(seed))
            init[:, head_dim:] = (extra / extra.norm(dim=-1, keepdim=True)).T
        self.weight = nn.Parameter(init.repeat(heads, 1, 1))  # [H, D, F]
        self.gate = nn.Parameter(torch.zeros(heads, head_dim)) if key_gate else None  # [H, D]
        self.gate_normaliser = nn.Parameter(torch.zeros(heads)) if gate_normaliser else None  # [H]
        self.bias = nn.Parameter(torch.zeros(heads, 2 * columns)) if feature_bias else None  # [H, 2·F]

    def forward(self, x: torch.Tensor, is_query: bool = True) -> torch.Tensor:
        z = torch.einsum("bhtd,hde->bhte", x, self.weight.to(x.dtype))
        logits = torch.cat([z, -z], dim=-1)
        if self.bias is not None:
            logits = logits + self.bias.to(x.dtype)[:, None, :]
        features = torch.softmax(logits, dim=-1)
        if self.gate is None:
            return features
        g = torch.einsum("bhtd,hd->bht", x, self.gate.to(x.dtype))
        if self.gate_normaliser is not None:
            g = g + self.gate_normaliser.to(x.dtype)[:, None] * torch.logsumexp(logits, dim=-1)
        g = g.clamp(-self.GATE_LIMIT, self.GATE_LIMIT)
        return features * g.exp().unsqueeze(-1)


class LinearSiteState(nn.Module):
    """The feature maps of one attention site: ``forward(q, k) -> (φ(q), φ(k))``."""

    def __init__(self, q_map: nn.Module, k_map: nn.Module):
        super().__init__()
        self.q_map, self.k_map = q_map, k_map

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_map(q, is_query=True), self.k_map(k, is_query=False)


def site_seed(seed: int, module_path: str) -> int:
    """A seed per site, stable across runs: random features of different layers are independent."""
    return (seed * 1_000_003 + zlib.crc32(module_path.encode())) % (2**31)


def make_site_state(kind: str, heads_q: int, heads_kv: int, head_dim: int, scale: float, module_path: str,
                    num_features: int | None = None, seed: int = 0, key_gate: bool = False,
                    gate_normaliser: bool = False, feature_bias: bool = False) -> LinearSiteState:
    """The state of one site for feature map ``kind`` (``"favor"`` or ``"hedgehog"``; ``key_gate`` and
    ``gate_normaliser``: hedgehog's keys' map gets a learned gate; ``feature_bias``: both hedgehog maps get a
    learned bias on their logits; see :class:`HedgehogFeatureMap`)."""
    if kind == "hedgehog":
        extra_seed = site_seed(seed, module_path)
        return LinearSiteState(HedgehogFeatureMap(heads_q, head_dim, num_features, extra_seed,
                                                  feature_bias=feature_bias),
                               HedgehogFeatureMap(heads_kv, head_dim, num_features, extra_seed, key_gate=key_gate,
                                                  gate_normaliser=gate_normaliser, feature_bias=feature_bias))
    if kind == "favor":
        shared = FavorFeatureMap(head_dim, num_features, scale, site_seed(seed, module_path))
        return LinearSiteState(shared, shared)  # one draw: q and k must use the same features
    raise ValueError(f"feature map {kind!r} has no state")


def redraw_favor(model: nn.Module, seed: int | None = None) -> int:
    """Redraw the random features of every FAVOR+ map in ``model``; returns how many were redrawn."""
    maps = {id(m): m for m in model.modules() if isinstance(m, FavorFeatureMap)}
    for i, m in enumerate(maps.values()):
        m.redraw(None if seed is None else site_seed(seed, str(i)))
    return len(maps)
