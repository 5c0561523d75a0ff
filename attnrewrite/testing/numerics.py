"""The numerics rule every kernel test and GPU check applies, in one place.

A kernel run at precision ``dtype`` (fp16, bf16, fp32) is accurate enough when, measured against
``exact`` — the same computation in float64 (the kind's plain-torch reference on float64 inputs) —

    max|got − exact|  ≤  2 × max|plain − exact|  +  band

where ``plain`` is the plain-torch implementation run on the same inputs at the same ``dtype``.
In words: a kernel may be at most twice as far from the truth as plain torch is at that precision,
plus a rounding band.  The factor 2 leaves room for a different (but not worse-conditioned) order
of operations; the band keeps the bound meaningful where plain torch happens to be (nearly)
exact, e.g. an output that is a copy of an input, or float32 against float64 on small sums.

The default band (:func:`rounding_band`) is two roundings of the largest expected value to
``dtype``: ``2 · eps(dtype) · max|exact|``.  Kernels that keep a float32 running sum over a
sequence (linear attention's state) pass ``length``: the band is then one rounding of the result
plus the typical error of summing ``length`` terms one after another in float32,
``(eps(dtype) + eps(float32) · √length) · max|exact|``.
"""

from __future__ import annotations

import math

import torch


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max|got − exact| in float64 (NaN when either holds a NaN, so no bound is met); same shapes."""
    assert got.shape == exact.shape, f"shape {tuple(got.shape)} differs from the reference's {tuple(exact.shape)}"
    return float((got.detach().double() - exact.detach().double()).abs().max())


def rounding_band(dtype: torch.dtype, exact: torch.Tensor, length: int | None = None) -> float:
    """The rounding allowance for results in ``dtype`` whose float64 values are ``exact`` (see the
    module docstring): ``2·eps(dtype)·max|exact|``, or with ``length``
    ``(eps(dtype) + eps(float32)·√length)·max|exact|`` for a float32 running sum over ``length`` terms."""
    if length is None:
        eps = 2 * torch.finfo(dtype).eps
    else:
        eps = torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * math.sqrt(max(1, length))
    return eps * float(exact.detach().abs().max())


def error_budget(plain: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, band: float | None = None) -> float:
    """The largest error a kernel at ``dtype`` may have: ``2 × max|plain − exact| + band`` (default band:
    :func:`rounding_band`).  ``plain``: plain torch at ``dtype``; ``exact``: float64."""
    return 2 * max_error(plain, exact) + (rounding_band(dtype, exact) if band is None else band)


def assert_within_budget(got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str,
                         band: float | None = None) -> float:
    """Assert the rule of this module for one output or gradient and return ``got``'s max error.

    Args:
        got: the kernel's result at ``dtype``; plain: plain torch's result at ``dtype``; exact: the
            float64 result.  All of one shape (any dtypes; compared in float64).
        dtype: the precision both ``got`` and ``plain`` were computed at.
        what: names the output in the failure message.
        band: overrides :func:`rounding_band` (e.g. ``rounding_band(dtype, exact, length=T)``).
    """
    err = max_error(got, exact)
    plain_err = max_error(plain, exact)
    band = rounding_band(dtype, exact) if band is None else band
    assert err <= 2 * plain_err + band, (
        f"{what}: max error {err:.3e} exceeds 2 × plain torch ({plain_err:.3e}) + band ({band:.3e}) at {dtype}")
    return err


__all__ = ["assert_within_budget", "error_budget", "max_error", "rounding_band"]
