"""Context parallelism on 2 spawned CPU processes (gloo, loopback) against the single-process run.

One process group runs every case (start-up is the slow part); each case is reported as its own test.
Cases: every kind × causal/bidirectional × key padding, forward and q/k/v gradients; a learned state's
gradient; 3 SGD steps of a small model (sigmoid, SDPA, linear); torch's own manager refused; bad input.
"""

import pytest

from attnrewrite.testing.distributed import context_parallel_cases, run_suite

CASES = [name for name, _ in context_parallel_cases()]


@pytest.fixture(scope="module")
def results():
    return run_suite("context_parallel", world=2)


@pytest.mark.parametrize("case", CASES)
def test_context_parallel_matches_one_process(results, case):
    outcome = results[case]
    assert outcome["ok"], "\n".join(f"rank {rank}:\n{error}" for rank, error in outcome["errors"].items())


def test_every_case_ran(results):
    assert sorted(results) == sorted(CASES)
