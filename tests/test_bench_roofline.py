"""bench/roofline.py's FLOP counts (the roofline rows of bench/model_speed_cpu.py rest on them): checked
against a brute-force count of the products' multiply-adds, torch's own FLOP counter, and the HF Llama's
own linear layers; the bound rows of model_speed_cpu.py from a made-up floor."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rl = _load("roofline")


def _brute_exact(T, q_heads, head_dim, layers, batch, causal):
    """Multiply-adds of q·kᵀ and p·v, one (query, key) pair at a time, ×2 FLOPs each."""
    qk = pv = 0
    for _ in range(batch * layers * q_heads):
        for i in range(T):
            for j in range(T):
                if causal and j > i:
                    continue
                qk += 2 * head_dim  # s_ij = Σ_d q_id k_jd
                pv += 2 * head_dim  # o_i += p_ij v_j (D outputs)
    return qk, pv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,q_heads,kv_heads,head_dim,layers,batch", [(1, 1, 1, 1, 1, 1), (5, 4, 2, 3, 2, 1),
                                                                         (7, 2, 1, 8, 1, 3)])
def test_exact_flops_match_a_pair_by_pair_count(T, q_heads, kv_heads, head_dim, layers, batch, causal):
    shape = rl.AttentionShape(T, q_heads, kv_heads, head_dim, layers, batch, causal)
    qk, pv = _brute_exact(T, q_heads, head_dim, layers, batch, causal)
    assert rl.attention_flops(shape, "exact") == {"qk": qk, "pv": pv}
    # the backward: dP = dO·vᵀ like q·kᵀ; dV, dQ, dK like p·v
    assert rl.attention_flops(shape, "exact", "train") == {"qk": 2 * qk, "pv": 4 * pv}


def test_exact_flops_at_the_issue_shape():
    # issue 14's Llama at 4k: 4 layers of 8 query heads of 32, causal: 2 products × 2·32 FLOPs × Σ_{i=1..4096} i
    shape = rl.AttentionShape(4096, 8, 4, 32, 4)
    flops = rl.attention_flops(shape, "exact")
    assert flops["qk"] == flops["pv"] == 4 * 8 * 64 * (4096 * 4097 // 2) == 17_184_063_488
    assert sum(flops.values()) == 34_368_126_976  # the "≈ 34 GFLOP" of the session-9 estimate
    assert sum(rl.attention_flops(shape, "exact", "train").values()) == 3 * 34_368_126_976
    assert rl.kept_pairs(4096, causal=True) == 8_390_656 and rl.kept_pairs(4096, causal=False) == 4096 ** 2


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_exact_flops_match_torch_flop_counter(mode):
    """torch's FlopCounterMode over the written-out bidirectional attention (GQA by repeat), forward and
    forward + backward (matmul gradients only: the softmax counts nothing there either)."""
    from torch.utils.flop_counter import FlopCounterMode

    B, Hq, Hkv, T, D = 2, 4, 2, 6, 8
    q = torch.randn(B, Hq, T, D, requires_grad=mode == "train")
    k = torch.randn(B, Hkv, T, D, requires_grad=mode == "train")
    v = torch.randn(B, Hkv, T, D, requires_grad=mode == "train")
    with FlopCounterMode(display=False) as counter:
        kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        out = torch.softmax(q @ kr.transpose(-1, -2), -1) @ vr
        if mode == "train":
            out.sum().backward()
    counted = rl.attention_flops(rl.AttentionShape(T, Hq, Hkv, D, 1, B, causal=False), "exact", mode)
    assert sum(counted.values()) == counter.get_total_flops()
    # causal keeps (T+1)/(2T) of the pairs
    causal = rl.attention_flops(rl.AttentionShape(T, Hq, Hkv, D, 1, B, causal=True), "exact", mode)
    assert sum(causal.values()) * 2 * T == counter.get_total_flops() * (T + 1)


def test_linear_flops_count_state_updates_per_kv_head_and_readouts_per_query_head():
    T, Hq, Hkv, D, L = 5, 4, 2, 3, 2
    shape = rl.AttentionShape(T, Hq, Hkv, D, L)
    brute = 0
    for _ in range(L):
        for _ in range(T):
            brute += Hkv * 2 * D * D  # S += φ(k) vᵀ, F = D
            brute += Hq * 2 * D * D  # o = φ(q) S
    assert rl.attention_flops(shape, "linear") == {"state": brute} == {"state": 1080}
    assert rl.attention_flops(shape, "linear", features=6) == {"state": 2 * brute}
    assert rl.attention_flops(shape, "linear", "train") == {"state": 3 * brute}
    # issue 14's Llama at 4k: tiny beside exact attention's 34.4 GFLOP
    assert rl.attention_flops(rl.AttentionShape(4096, 8, 4, 32, 4), "linear") == {"state": 402_653_184}


def test_rest_flops_match_the_hf_llamas_linear_layers():
    """The Llama of model_speed_cpu.py without attention: every nn.Linear's in·out, ×2 FLOPs per token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    per_token = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    sizes = dict(hidden=256, q_heads=8, kv_heads=4, head_dim=32, mlp=688, vocab=1024)
    assert rl.llama_rest_flops(1, layers=4, **sizes) == per_token == 6_324_224
    assert rl.llama_rest_flops(4096, layers=4, batch=2, mode="train", **sizes) == 3 * 2 * 4096 * per_token


def test_attention_seconds_takes_the_best_rate_per_shape_class():
    rates = {"qk": [("whole", 5.0), ("tile", 10.0)], "pv": [("whole", 4.0)], "rest": [("proj", 1000.0)]}
    assert rl.attention_seconds({"qk": 10, "pv": 20}, rates) == pytest.approx(10 / 10 + 20 / 4)
    assert rl.attention_seconds({"state": 12}, rates) == pytest.approx(12 / 10)  # the best attention rate
    with pytest.raises(ValueError, match="no attention rates"):
        rl.attention_seconds({"qk": 1}, {"rest": [("proj", 1.0)]})


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        rl.AttentionShape(8, 3, 2, 4, 1)
    with pytest.raises(ValueError, match="length must be a positive int"):
        rl.AttentionShape(0, 2, 2, 4, 1)
    shape = rl.AttentionShape(8, 2, 2, 4, 1)
    with pytest.raises(ValueError, match="form must be one of"):
        rl.attention_flops(shape, "summary")
    with pytest.raises(ValueError, match="mode must be"):
        rl.attention_flops(shape, "exact", "backward")
    with pytest.raises(ValueError, match="features must be"):
        rl.attention_flops(shape, "linear", features=0)


def test_sgemm_rate_is_a_finite_rate(one_thread):
    rate = rl.sgemm_rate(16, 8, 16, batch=2, trials=2, min_seconds=0.001)
    assert math.isfinite(rate) and rate > 0


def test_model_speed_bound_rows_are_the_floor_plus_the_attention(one_thread):
    speed = _load("model_speed_cpu")
    sizes = dict(hidden=64, q_heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=32)
    work = speed.Workload("llama", 64, None, {}, 1, 4, 2, sizes)
    floor = speed.Variant("floor", None, None)
    floor.times = {"infer": [1.0, 3.0, 2.0], "train": []}
    rows = speed.roofline(work, [floor], ["infer", "train"], rl.time.process_time)
    assert [r.name for r in rows] == ["bound: floor + exact attention", "bound: floor + linear attention"]
    for row in rows:
        assert set(row.bound) == {"infer"}  # no floor timing in train: no bound there
        assert 2.0 < row.bound["infer"] < 2.1  # the floor's median + microseconds of attention at T = 64
    assert "GFLOP of projections, MLP and head" in floor.note["infer"]
    lines = speed.table(work, [floor] + rows, ["infer", "train"])
    assert any(line.startswith("| bound: floor + exact attention | 2") for line in lines)
    assert any("GFLOP of exact attention" in line for line in lines)
    # without sizes (a model that is not the Llama) or without a floor: no rows
    assert speed.roofline(speed.Workload("bert", 64, None, {}, 1, 4, 2), [floor], ["infer"], rl.time.process_time) == []
    assert speed.roofline(work, [], ["infer"], rl.time.process_time) == []
