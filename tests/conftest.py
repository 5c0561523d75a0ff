"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU; the variable
must be set before any kernel is defined, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# .ci/install keeps torchvision (timm needs it) out of the environment, in .thirdparty/ (test_timm.py
# adds it). Where torchvision is installed anyway, transformers' model classes import it too; beside
# the CPU torch its C++ ops do not load and the import fails unless two op schemas are declared first.
from attnrewrite.testing.thirdparty import make_torchvision_importable  # noqa: E402

make_torchvision_importable()


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    """Every test starts from the same RNG state and a clean dynamo cache."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread for the test (the compiled CPU loops run only there), restored after it, and
    ``ATTNREWRITE_NATIVE`` unset (a test that wants the torch paths sets it to 0 itself)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("ATTNREWRITE_NATIVE", raising=False)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Under pytest-xdist each worker already has a core: torch's default of one thread per core in
    every worker oversubscribes the machine and makes small-op loops several times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
