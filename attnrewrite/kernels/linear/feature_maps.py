"""Feature maps φ of linear attention, in plain torch.

The kernels fuse ``elu`` and ``relu`` (and the trivial ``identity``); these torch
versions are what the reference and the torch path use, and what the kernels are
checked against.  Learned or random maps (``favor``, ``hedgehog``) are not here:
the caller applies them in torch to q and k and passes ``feature_map="identity"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "identity")

# The kernels take the map as a small integer constexpr; this is the one place that numbers them.
FEATURE_MAP_IDS = {name: i for i, name in enumerate(FEATURE_MAPS)}


def check_feature_map(name: str) -> str:
    """Return ``name`` if it is a fused feature map, else raise a ValueError listing the choices."""
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"feature_map must be one of {FEATURE_MAPS}, got {name!r}; apply other maps (favor, hedgehog) "
            "to q and k in torch and pass feature_map='identity'")
    return name


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: positive, smooth, ≈ 1 + x near 0 (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ(x) elementwise for the named map; same shape and dtype as ``x``."""
    if name == "elu":
        return elu_plus_one(x)
    if name == "relu":
        return torch.relu(x)
    if name == "identity":
        return x
    check_feature_map(name)
    raise AssertionError("unreachable")
