"""``examples/train_lm.py --context-parallel 2`` under torchrun (2 gloo processes on loopback) trains the
llama target with its sequences sharded and follows one process's loss curve, step by step.

The single-process run is the example as users run it (hand-written softmax, or the model rewritten
to sigmoid by attnrewrite); the context-parallel run shards x, y and the RoPE positions with the
load-balanced layout and attends by the ring.  Both are fp32: the curves differ only by the order of
summation (the ring merges per-block partials), well inside rtol 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnrewrite.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--smoke", "--threads", "1"]  # 6 steps of llama/tiny, batch 4 × 32 bytes


def _load_train_lm():
    spec = importlib.util.spec_from_file_location("example_train_lm_cp", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(tmp_path: Path, extra: list[str]) -> dict:
    out = tmp_path / "cp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(ROOT / "examples" / "train_lm.py"), *ARGS,
               "--context-parallel", "2", "--json", str(out), *extra]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _compare(tmp_path, extra) -> dict:
    sharded = _torchrun(tmp_path, extra)
    single = _load_train_lm().main(ARGS + extra)
    assert sharded["context_parallel"] == 2 and len(sharded["train_losses"]) == 6
    torch.testing.assert_close(torch.tensor(sharded["train_losses"]), torch.tensor(single["train_losses"]),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sharded["val_loss"], single["val_loss"], rtol=1e-4, atol=1e-5)
    assert sorted(sharded["learned_states"]) == sorted(single["learned_states"])
    for name, values in single["learned_states"].items():  # trained alike (a state the sharded run ignored
        # or did not sum over the ranks would have moved otherwise)
        torch.testing.assert_close(torch.tensor(sharded["learned_states"][name]), torch.tensor(values), rtol=1e-4,
                                   atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    return single["learned_states"]


@pytest.mark.slow
def test_softmax_loss_curve_matches_one_process(tmp_path):
    _compare(tmp_path, [])


@pytest.mark.slow
def test_sigmoid_loss_curve_matches_the_rewritten_model(tmp_path):
    _compare(tmp_path, ["--attention", "sigmoid"])


def test_block_size_not_divisible_by_twice_the_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--block-size 30 is not divisible by 2 x --context-parallel = 4"):
        _load_train_lm().main(["--block-size", "30", "--context-parallel", "2"])


def test_context_parallel_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="launch with torchrun --nproc-per-node 2"):
        _load_train_lm().main(["--smoke", "--context-parallel", "2"])


def test_rope_and_the_causal_mask_follow_the_given_positions():
    """The tokens in the load-balanced order (rank 0's shard, then rank 1's) with their global positions
    give the natural-order logits, permuted the same way: RoPE and the causal mask follow the positions."""
    from attnrewrite.distributed.layout import shard_indices
    from attnrewrite.targets.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).eval()
    tokens = torch.randint(0, 256, (2, 16))
    order = shard_indices(16, 2)                                # 0-3, 12-15, 4-7, 8-11
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, order], positions=order), model(tokens)[:, order])
    with pytest.raises(ValueError, match="positions must be"):
        model(tokens, positions=torch.arange(15))


@pytest.mark.slow
def test_converted_sigmoid_with_learned_states_follows_the_rewritten_model(tmp_path):
    """``--option learned=true``: the model is converted (a head temperature and bias per layer, trained with
    the rest); the context-parallel run calls the op with each layer's state (attnrewrite.converted_attention)."""
    assert _compare(tmp_path, ["--attention", "sigmoid", "--option", "learned=true"])  # states compared
