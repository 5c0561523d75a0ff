"""Binary codes for hashed attention: projections, signs, bit packing and popcount scoring.

A vector x gets the code bit_b = [x·P_b > 0] for ``bits`` columns P_b of a projection.  Queries
and keys use different projections (asymmetric): ``hash="random"`` draws one Gaussian matrix from
the seed and uses it for both (SimHash: the agreement of two codes estimates the angle between
the vectors, P[bit agrees] = 1 − angle/π; two independent draws would make the codes unrelated);
``hash="learned"`` starts both from that draw and trains them apart (one matrix per head).

The products x·P are taken in float64 so that a code does not depend on how many tokens were
projected together (prefill and decode give the same bits).  The agreement of two codes is
``bits − popcount(a XOR b)``; on ±1 signs it equals ``(bits + s_a·s_b) / 2``, which the prefill
path computes with one matrix product.  Both are exact integers.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=32)
def _hyperplanes_cpu(head_dim: int, bits: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, bits, generator=generator, dtype=torch.float64)


def random_hyperplanes(head_dim: int, bits: int, seed: int, device=None) -> torch.Tensor:
    """[D, bits] float64 Gaussian hyperplanes drawn from ``seed`` (the same on every device)."""
    return _hyperplanes_cpu(head_dim, bits, seed).to(device)


def projections(q_projection, k_projection, head_dim: int, bits: int, seed: int, device):
    """(P_q, P_k), float64: each [D, bits] (one for all heads) or [H, D, bits] (one per head)."""
    if q_projection is None:
        shared = random_hyperplanes(head_dim, bits, seed, device)
        return shared, shared
    return q_projection.detach().to(device, torch.float64), k_projection.detach().to(device, torch.float64)


def project(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] → x·P [B, H, T, bits] (P [D, bits], or [H, D, bits] one per head), in P's dtype."""
    x = x.to(projection.dtype)
    if projection.dim() == 2:
        return x @ projection
    return torch.einsum("bhtd,hdn->bhtn", x, projection)


def signs(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """±1 codes [B, H, T, bits] (float32) of x [B, H, T, D]."""
    return torch.where(project(x, projection) > 0, 1.0, -1.0).to(torch.float32)


def pack(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Bit-packed codes [B, H, T, bits / 8] uint8 of x [B, H, T, D] (bit b of the code is bit b % 8 of byte b // 8)."""
    bits = (project(x, projection) > 0).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
    return (bits.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


@functools.lru_cache(maxsize=8)
def _byte_popcounts(device: str) -> torch.Tensor:
    return torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=device)


def hamming(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Summed Hamming distances: query_codes [B, K, g, bytes] against key_codes [B, K, T, bytes] uint8
    → int64 [B, K, T], Σ over the g queries of popcount(q XOR k).

    On the CPU the XOR and popcount run on 64-bit words with numpy (``bitwise_count``, numpy >= 2,
    one POPCNT per word); elsewhere through a 256-entry table per byte.
    """
    if key_codes.device.type == "cpu" and hasattr(np, "bitwise_count"):
        n_bytes = key_codes.shape[-1]
        word = np.uint64 if n_bytes % 8 == 0 else np.uint8
        keys = key_codes.numpy().view(word)                                  # [B, K, T, words]
        queries = query_codes.contiguous().numpy().view(word)               # [B, K, g, words]
        if keys.shape[-1] == 1:  # one word per code: XOR every query with every key at once
            distance = np.bitwise_count(np.bitwise_xor(keys[:, :, None, :, 0], queries[:, :, :, None, 0]))
            return torch.from_numpy(distance.sum(2, dtype=np.int64))
        total = np.zeros(keys.shape[:3], dtype=np.int64)
        for g in range(queries.shape[2]):
            distance = np.bitwise_count(np.bitwise_xor(keys, queries[:, :, g:g + 1, :]))
            total += distance.sum(-1, dtype=np.int64)
        return torch.from_numpy(total)
    return hamming_by_table(query_codes, key_codes)


def hamming_by_table(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """:func:`hamming` with torch ops only (any device): XOR per byte, popcount from a 256-entry table."""
    table = _byte_popcounts(str(key_codes.device))
    xor = torch.bitwise_xor(key_codes.unsqueeze(2), query_codes.unsqueeze(3))      # [B, K, g, T, bytes]
    return table[xor.long()].sum(dim=(-1, 2)).long()
