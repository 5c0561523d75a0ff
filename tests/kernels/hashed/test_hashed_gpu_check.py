"""A CPU dry run of the prepared GPU check (bench/gpu_checks/hashed.py) at toy sizes under the interpreter:
GPU time is too scarce to find a typo there.  Every row must come back without an error and the
correctness rows must pass."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("attnrewrite.kernels.hashed.triton_ops")
from attnrewrite.kernels.hashed import triton_ops  # noqa: E402

CHECK_PATH = Path(__file__).resolve().parents[3] / "bench" / "gpu_checks" / "hashed.py"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not triton_ops.interpreter_active(),
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")


def _once(fn, graph=False):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.fixture
def check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_hashed", CHECK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OPTIONS", dict(bits=8, top_k=3, window=2, sinks=1))
    monkeypatch.setattr(module, "CORRECT_SIZE", dict(batch=2, heads_q=2, heads_kv=1, length=12, dim=16))
    monkeypatch.setattr(module, "DECODE_CONTEXT", 20)
    monkeypatch.setattr(module, "DTYPES", (torch.float16,))
    monkeypatch.setattr(module, "TIMING", dict(batch=1, heads_q=2, heads_kv=1, dim=16, bits=8, top_k=3, window=2,
                                               sinks=1))
    monkeypatch.setattr(module, "DECODE_LENGTHS", (24,))
    monkeypatch.setattr(module, "PREFILL_LENGTHS", (8,))
    monkeypatch.setattr(module, "_bench", _once)
    return module


@pytest.mark.slow
def test_dry_run(check):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = check.correctness(device)
    assert len(rows) == 8 and all(r["ok"] for r in rows), rows
    assert any("hash=learned" in r["case"] for r in rows)
    timing = check.timings(device, quick=False)
    assert not [r for r in timing if "error" in r], timing
    assert {r["case"] for r in timing} >= {"decode step (eager)", "causal prefill fwd+bwd"}
