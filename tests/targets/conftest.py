"""Fixtures for the reference-model tests."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Build cached data sets (the text corpus) in a temporary folder, not the user's cache."""
    previous = os.environ.get("ATTNREWRITE_CACHE")
    os.environ["ATTNREWRITE_CACHE"] = str(tmp_path_factory.mktemp("attnrewrite-cache"))
    yield
    if previous is None:
        os.environ.pop("ATTNREWRITE_CACHE", None)
    else:
        os.environ["ATTNREWRITE_CACHE"] = previous


@pytest.fixture
def check_gradients():
    """A function that asserts every parameter of a model got a finite, not-all-zero gradient."""

    def check(model: torch.nn.Module, skip: tuple[str, ...] = ()):
        for name, param in model.named_parameters():
            if name in skip:
                continue
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
            assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    return check
