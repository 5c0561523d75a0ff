"""DDP and FSDP2 (fully_shard) on 2 spawned CPU processes train a model rewritten to sigmoid in step
with one process: the parameters after 3 AdamW steps on half the batch each equal those of one process
on the whole batch."""

import pytest

from attnrewrite.testing.distributed import data_parallel_cases, run_suite

CASES = [name for name, _ in data_parallel_cases()]


@pytest.fixture(scope="module")
def results():
    return run_suite("data_parallel", world=2)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_data_parallel_matches_one_process(results, case):
    outcome = results[case]
    assert outcome["ok"], "\n".join(f"rank {rank}:\n{error}" for rank, error in outcome["errors"].items())
