"""DDP and FSDP2 (fully_shard) on 2 spawned CPU processes train a model rewritten to each kind (softmax,
sigmoid, and the converted kinds with learned states: sigmoid, linear/hedgehog, summary, hashed) in step with
one process, each rank on half of every batch: per cell, the first step's outputs (the rank's rows) and
gradients (by parameter name) and the parameters after 3 AdamW steps equal those of one process on the whole
batch.  One test runs every cell in one process group (starting one is the slow part)."""

import pytest

from attnrewrite.testing.distributed import data_parallel_cases, run_suite


@pytest.mark.slow
def test_data_parallel_matches_one_process():
    results = run_suite("data_parallel", world=2)
    assert sorted(results) == sorted(name for name, _ in data_parallel_cases())
    failed = {name: outcome for name, outcome in results.items() if not outcome["ok"]}
    assert not failed, "\n\n".join(f"{name} (rank {rank}):\n{error}" for name, outcome in failed.items()
                                   for rank, error in outcome["errors"].items())
