"""A CPU dry run of the prepared GPU check (bench/gpu_checks/sigmoid.py) at toy sizes under the
interpreter: GPU time is too scarce to find a typo there.  Every row must come back without an
error, the correctness rows must pass, and the searched table must validate."""

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
import triton.testing

from attnrewrite.kernels import tuning
from attnrewrite.kernels.sigmoid import sigmoid_attention_dispatch, spaces

CHECK_PATH = Path(__file__).resolve().parents[3] / "bench" / "gpu_checks" / "sigmoid.py"


def _shrink(value):
    """Lengths / 10 (rounded up, so packed boundaries stay ordered), head dims / 4 (80 -> 20 stays padded)."""
    if isinstance(value, list):
        return [math.ceil(x / 10) for x in value]
    return value


def _cpu_do_bench(fn, warmup=None, rep=None, grad_to_none=None, return_mode=None):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class _FakeTritonSigmoid:
    """Stands in for the triton-sigmoid package: its API, layout [B, T, H, D], computed by our torch path."""

    @staticmethod
    def sigmoid_attention(q, k, v, is_causal=False):
        out = sigmoid_attention_dispatch(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal, impl="torch")
        return out.transpose(1, 2)


@pytest.fixture
def check(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_sigmoid", CHECK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = []
    for name, dtype, (b, hq, hkv, lq, lk, d), options, forced in module.CASES:
        options = {k: _shrink(v) for k, v in options.items()}
        small.append((name, torch.float16, (b, hq, hkv, math.ceil(lq / 10), math.ceil(lk / 10), max(16, d // 4)),
                      options, forced))
    monkeypatch.setattr(module, "CASES", small)
    monkeypatch.setattr(module, "COMPILE_BACKEND", "aot_eager")
    # every row must run: the GPU's time budgets would skip rows on a loaded CPU under the interpreter
    monkeypatch.setattr(module, "CORRECTNESS_BUDGET_S", float("inf"))
    monkeypatch.setattr(module, "FAMILY_BUDGET_S", float("inf"))
    monkeypatch.setattr(module, "TIMING_DTYPE", torch.float32)
    monkeypatch.setattr(module, "HEADLINE", dict(dim=32, length=48, causal=False))
    monkeypatch.setattr(module, "LENGTHS", {"quick": (48,), "full": (48,)})
    monkeypatch.setattr(module, "DIMS", (32,))
    monkeypatch.setattr(module, "_sizes", lambda length, dim: (1, 2))
    monkeypatch.setattr(module, "CANDIDATES", {k: v[:1] for k, v in module.CANDIDATES.items()})
    monkeypatch.setattr(module, "_import_triton_sigmoid", lambda rows: _FakeTritonSigmoid)
    monkeypatch.setattr(triton.testing, "do_bench", _cpu_do_bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    return module


def test_dry_run_of_the_gpu_check(check, tmp_path):
    device = torch.device("cpu")
    rows = check.correctness(device)
    assert not [r for r in rows if "note" in r and "skipped" not in r["note"] and r.get("note") != "vs eager"], rows
    assert all(r["ok"] for r in rows if "ok" in r), [r for r in rows if not r.get("ok")]
    outputs = {(r["case"], r["output"]) for r in rows if "output" in r}
    assert ("t5 bias with grad, causal d64 [triton]", "dmask") in outputs
    assert len(outputs) >= 4 * len(check.CASES)

    rows = check.timings(device, quick=False)
    errors = [r for r in rows if r.get("ok") is False]
    assert not errors, errors
    configs = [r.get("config") for r in rows]
    assert "default" in configs and "searched" in configs and "triton-sigmoid 0.1.2" in configs
    assert "softcap" in configs and "chain" in configs
    target, = (r for r in rows if r["case"].startswith("target: soft-capped"))
    assert target["met"] is not None and target["ratio"] > 0, target
    assert any(r["case"].startswith("accuracy") for r in rows)
    table_path, = tmp_path.glob("sigmoid-*.json")
    assert tuning.validate_table(json.loads(table_path.read_text()), spaces.SPACES) == []
