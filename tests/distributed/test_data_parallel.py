"""DDP and FSDP2 (fully_shard) on 2 spawned CPU processes train a model rewritten to sigmoid in step
with one process: the parameters after 3 AdamW steps on half the batch each equal those of one process
on the whole batch.  One test runs both cases in one process group."""

import pytest

from attnrewrite.testing.distributed import data_parallel_cases, run_suite


@pytest.mark.slow
def test_data_parallel_matches_one_process():
    results = run_suite("data_parallel", world=2)
    assert sorted(results) == sorted(name for name, _ in data_parallel_cases())
    failed = {name: outcome for name, outcome in results.items() if not outcome["ok"]}
    assert not failed, "\n\n".join(f"{name} (rank {rank}):\n{error}" for name, outcome in failed.items()
                                   for rank, error in outcome["errors"].items())
