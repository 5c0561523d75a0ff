"""A CPU dry run of the prepared GPU check (bench/gpu_checks/summary.py) at toy sizes under the
interpreter: GPU time is too scarce to find a typo there.  Every row must come back without an error
and the correctness rows must pass."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import triton.testing

from attnrewrite.kernels.summary import triton_op

CHECK_PATH = Path(__file__).resolve().parents[3] / "bench" / "gpu_checks" / "summary.py"
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)


def _cpu_do_bench(fn, warmup=None, rep=None, grad_to_none=None, return_mode=None):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.fixture
def check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_summary", CHECK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # two of the cases (GQA + padding + learned; bidirectional + padding) in float16 (the interpreter's
    # bf16 products are wrong): one sequence of 24 tokens, 2 query heads on 1 key/value head, head dims 16
    small = [(name, torch.float16, (1, 2, 1, 24, 16, 16), dict(opts, chunk_size=4, window_chunks=1))
             for name, *_, opts in module.CASES[1:3]]
    name, *_, opts = module.CASES[-1]  # packed sequences: three of 7, 12 and 5 tokens
    small.append((name, torch.float16, (1, 2, 1, 24, 16, 16), dict(opts, chunk_size=4, window_chunks=1, packed=(7, 12, 5))))
    monkeypatch.setattr(module, "CASES", small)
    monkeypatch.setattr(module, "LENGTHS", {"quick": (24,), "full": (24,)})
    monkeypatch.setattr(module, "DIM", 16)
    monkeypatch.setattr(module, "HEADS", 2)
    monkeypatch.setattr(module, "CHUNK", 4)
    monkeypatch.setattr(module, "WINDOW", 1)
    monkeypatch.setattr(module, "TIMING_DTYPE", torch.float32)
    monkeypatch.setattr(module, "DECODE_CONTEXTS", {"quick": (40,), "full": (40,)})
    monkeypatch.setattr(module, "DECODE_CORRECTNESS_ENTRIES", 40)
    monkeypatch.setattr(module, "DECODE_BATCH", 1)
    monkeypatch.setattr(module, "DECODE_DTYPES", (torch.float16,))
    monkeypatch.setattr(triton.testing, "do_bench", _cpu_do_bench)
    monkeypatch.setattr(triton_op, "launch_config", lambda kernel, *a, **kw: dict(SMALL_TILES))
    return module


def test_dry_run_of_the_gpu_check(check):
    device = torch.device("cpu")
    rows = check.correctness(device)
    assert not [r for r in rows if "note" in r], rows
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    outputs = {(r["case"], r["output"]) for r in rows}
    assert ("causal learned gqa 8/2 + padding d128", "dsummary_query") in outputs
    assert ("decode over a store slice, gqa 8/2, padding flags d128", "out") in outputs
    assert ("packed 300+517+183 (cu_seqlens), learned gqa 8/2 d128", "dsummary_query") in outputs
    assert len(outputs) == 5 + 4 + 5 + 1

    rows = check.timings(device, quick=True)
    assert not [r for r in rows if r.get("ok") is False], rows
    assert len(rows) == 2 and rows[0]["fwdbwd_x_sdpa"] > 0 and rows[1]["decode_x_sdpa"] > 0
