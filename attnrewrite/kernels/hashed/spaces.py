"""Search spaces of the hashed-attention kernels, as data.

One space per kernel (:data:`KERNELS`); axes:

    codes    BLOCK_T     tokens packed per program
    select   BLOCK_N     keys scored per step of the three passes over the keys
    fwd/bwd  BLOCK_S     selected slots gathered per step
    decode   SPLIT       keys per piece (one program each) of a decode step's selection
             BLOCK_N     keys scored per step within a piece
    all      num_warps

The products are broadcast multiply-and-sum tiles ([G, BLOCK_S, D] in the attention kernels,
[G, BLOCK_N, bytes] in the selection, [BLOCK_T, bits] float64 in the codes), so ``valid`` bounds
the tile values per thread (:data:`TILE_VALUES`, registers before spilling, calibrated by compiling
for sm_90 without a GPU) and removes blocks far beyond the sequence.  :func:`fit` moves an invalid
configuration to the valid point nearest to it.  No table has been measured yet: every call runs
the default (or a table entry, once ``tune`` has written one).
"""

from __future__ import annotations

import math

import torch

from attnrewrite.kernels import tuning

KIND = "hashed"
KERNELS = ("codes", "select", "fwd", "bwd", "decode")
BLOCK_AXIS = {"codes": "BLOCK_T", "select": "BLOCK_N", "fwd": "BLOCK_S", "bwd": "BLOCK_S", "decode": "BLOCK_N"}
# fp32 tile values per thread above which a kernel spills (float64 counts twice).  fwd/bwd calibrated on
# sm_90 with bench/hashed_aot.py (ptxas -v): the forward spilled at 128 (G = 8, D = 128), the backward
# at 64 (G = 4, D = 128 with a bias; 944 bytes at 128); the others compiled without spills.
TILE_VALUES = {"codes": 128, "select": 96, "fwd": 96, "bwd": 48, "decode": 96}


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def shape_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int) -> dict:
    """The tuning shape of a call: what its configurations depend on."""
    return {"D": int(q.shape[-1]), "DV": int(v.shape[-1]), "G": int(q.shape[1] // k.shape[1]), "bits": int(bits),
            "Tq": int(q.shape[2]), "Tk": int(k.shape[2]), "dtype": str(q.dtype).removeprefix("torch.")}


def _length_bucket(n: int) -> str:
    for edge in (1, 64, 1024, 16384, 65536):
        if n <= edge:
            return str(edge)
    return "big"


def bucket(shape) -> str:
    return (f"d{_pow2(shape['D'])}-dv{_pow2(shape['DV'])}-g{_pow2(shape['G'])}-bits{shape['bits']}"
            f"-q{_length_bucket(shape['Tq'])}-k{_length_bucket(shape['Tk'])}-{shape['dtype']}")


def tile_values(kernel: str, config, shape) -> float:
    """Estimated live tile values per thread of a configuration (the largest broadcast product)."""
    threads = 32 * config["num_warps"]
    block = config[BLOCK_AXIS[kernel]]
    groups = _pow2(shape["G"])
    if kernel == "codes":
        return 2 * block * _pow2(shape["bits"] // 8) * 8 / threads          # float64 accumulator
    if kernel in ("select", "decode"):
        return groups * block * _pow2(shape["bits"] // 8) / threads
    head = max(_pow2(shape["D"]), _pow2(shape["DV"]))
    return groups * block * head / threads


def _valid(kernel: str):
    def valid(config, shape) -> bool:
        block = config[BLOCK_AXIS[kernel]]
        length = shape["Tq"] if kernel == "codes" else shape["Tk"]
        if block > max(16, _pow2(length)) or (kernel == "decode" and block > config["SPLIT"]):
            return False  # blocks far beyond the sequence (or the piece) only waste work
        return tile_values(kernel, config, shape) <= TILE_VALUES[kernel]
    return valid


_AXES = {
    "codes": {"BLOCK_T": (16, 32, 64, 128), "num_warps": (2, 4, 8)},
    "select": {"BLOCK_N": (16, 32, 64, 128, 256, 512), "num_warps": (2, 4, 8)},
    "fwd": {"BLOCK_S": (8, 16, 32, 64, 128), "num_warps": (1, 2, 4, 8)},
    "bwd": {"BLOCK_S": (8, 16, 32, 64, 128), "num_warps": (1, 2, 4, 8)},
    "decode": {"SPLIT": (256, 512, 1024, 2048, 4096), "BLOCK_N": (64, 128, 256, 512), "num_warps": (2, 4, 8)},
}
_DEFAULTS = {"codes": {"BLOCK_T": 32, "num_warps": 4}, "select": {"BLOCK_N": 64, "num_warps": 4},
             "fwd": {"BLOCK_S": 32, "num_warps": 4}, "bwd": {"BLOCK_S": 16, "num_warps": 4},
             "decode": {"SPLIT": 1024, "BLOCK_N": 256, "num_warps": 4}}

SPACES: dict[str, tuning.SearchSpace] = {
    kernel: tuning.SearchSpace(kernel=kernel, axes=_AXES[kernel], default=_DEFAULTS[kernel], bucket=bucket,
                               valid=_valid(kernel))
    for kernel in KERNELS}


def fit(kernel: str, config, shape) -> dict:
    """``config`` if it is valid for ``shape``, else the valid point nearest to it (the largest block,
    then the fewest warps); the smallest point of the space when none is valid."""
    space = SPACES[kernel]
    config = dict(config)
    if space.valid(config, shape):
        return config
    candidates = space.configs(shape)
    if not candidates:
        return {name: min(values) if name != "num_warps" else max(values) for name, values in space.axes.items()}
    if kernel == "decode":  # the default's pieces, the largest step that fits
        same = [c for c in candidates if c["SPLIT"] == config["SPLIT"]] or candidates
        return dict(min(same, key=lambda c: (-c["BLOCK_N"], c["num_warps"])))
    axis = BLOCK_AXIS[kernel]
    return dict(min(candidates, key=lambda c: (-c[axis], c["num_warps"])))


def config_for(kernel: str, shape, device, tensors=()) -> dict:
    """The launch configuration of ``kernel`` for ``shape``: the device's table, else the default, fitted."""
    config = tuning.pick_config(KIND, SPACES[kernel], shape, device, None, tensors=tensors)
    return fit(kernel, config, shape)
