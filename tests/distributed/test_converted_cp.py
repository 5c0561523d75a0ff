"""Converted models (learned per-site states) inside ``attnrewrite.distributed.context_parallel`` on 2 spawned
gloo processes, against the single-process run of the model rewritten by the pass: sigmoid (learned head
temperature and bias), linear (hedgehog feature maps), summary (learned queries), hashed (learned hash
projections) — logits, the gradients of every weight and learned state, 3 AdamW steps — and the refusals
(learned options without a conversion, options other than the conversion's).  One process group runs every
case (:mod:`attnrewrite.testing.converted_cp`).
"""

import pytest

from attnrewrite.testing.converted_cp import compiled_converted_cases, converted_cases
from attnrewrite.testing.distributed import run_suite


@pytest.mark.slow  # ~90 s on the loaded 2-core machine: 5 cases, each compiling llama/tiny once
def test_converted_models_match_one_process():
    results = run_suite("attnrewrite.testing.converted_cp:converted_cases", world=2, timeout_s=300.0)
    assert sorted(results) == sorted(name for name, _ in converted_cases())
    failed = {name: outcome for name, outcome in results.items() if not outcome["ok"]}
    assert not failed, "\n\n".join(f"{name} (rank {rank}):\n{error}" for name, outcome in failed.items()
                                   for rank, error in outcome["errors"].items())


@pytest.mark.slow  # ~80 s on the loaded 2-core machine: llama/tiny compiled outside and again inside, 2 kinds
def test_compiled_converted_models_match_one_process():
    """``torch.compile(converted, backend="attnrewrite")`` inside the manager: sigmoid-learned and linear-hedgehog,
    logits, gradients of every weight and learned state, 2 AdamW steps, against the single-process compiled run."""
    results = run_suite("attnrewrite.testing.converted_cp:compiled_converted_cases", world=2, timeout_s=300.0)
    assert sorted(results) == sorted(name for name, _ in compiled_converted_cases())
    failed = {name: outcome for name, outcome in results.items() if not outcome["ok"]}
    assert not failed, "\n\n".join(f"{name} (rank {rank}):\n{error}" for name, outcome in failed.items()
                                   for rank, error in outcome["errors"].items())
