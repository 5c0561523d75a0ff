"""Context parallelism on 2 spawned CPU processes (gloo, loopback) against the single-process run.

One process group runs every case (start-up is the slow part), in one test so that pytest-xdist does
not start the group once per worker; the failure message names every failing case with its traceback.
Cases: every kind × causal/bidirectional × key padding, forward and q/k/v gradients; a learned state's
gradient; 3 SGD steps of a small model (sigmoid, SDPA, linear); a model compiled by attnrewrite run inside
(compiled again there, its attention routed through the manager) and another backend's graph refused; torch's own
manager refused; bad input.
"""

import pytest

from attnrewrite.testing.distributed import context_parallel_cases, run_suite


@pytest.mark.slow
def test_context_parallel_matches_one_process():
    results = run_suite("context_parallel", world=2)
    assert sorted(results) == sorted(name for name, _ in context_parallel_cases())
    failed = {name: outcome for name, outcome in results.items() if not outcome["ok"]}
    assert not failed, "\n\n".join(f"{name} (rank {rank}):\n{error}" for name, outcome in failed.items()
                                   for rank, error in outcome["errors"].items())
