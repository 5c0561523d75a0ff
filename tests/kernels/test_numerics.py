"""The numerics rule itself (attnrewrite.testing.numerics): what passes, what fails, the two bands."""

import math

import pytest
import torch

from attnrewrite.testing.numerics import assert_within_budget, error_budget, max_error, rounding_band

EXACT = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)


def test_rounding_bands():
    assert rounding_band(torch.bfloat16, EXACT) == 2 * torch.finfo(torch.bfloat16).eps * 4.0
    running_sum = (torch.finfo(torch.float16).eps + torch.finfo(torch.float32).eps * math.sqrt(100)) * 4.0
    assert rounding_band(torch.float16, EXACT, length=100) == pytest.approx(running_sum)


def test_twice_plain_torch_plus_the_band_and_no_more():
    plain = EXACT + torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)
    band = rounding_band(torch.float16, EXACT)
    assert error_budget(plain, EXACT, torch.float16) == pytest.approx(0.02 + band)
    at_the_limit = EXACT + torch.tensor([0.02 + band * 0.99, 0.0, 0.0], dtype=torch.float64)
    assert assert_within_budget(at_the_limit, plain, EXACT, torch.float16, "out") == pytest.approx(0.02 + band * 0.99)
    beyond = EXACT + torch.tensor([0.0, 0.0, 0.02 + band * 1.01], dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"^out: max error .* exceeds 2 × plain torch"):
        assert_within_budget(beyond, plain, EXACT, torch.float16, "out")


def test_nan_never_passes_and_shapes_must_match():
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_budget(torch.full((3,), float("nan")), EXACT, EXACT, torch.float32, "out")
    with pytest.raises(AssertionError, match="shape"):
        max_error(EXACT[:2], EXACT)
