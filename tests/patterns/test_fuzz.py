"""Property-based fuzzing of the matcher (hypothesis): random spellings of real attention are
rewritten and certified with the expected spec; near misses stay untouched (zero false positives).

The generator is :mod:`attnrewrite.testing.spellings`; ``bench/fuzz_matcher.py`` runs thousands
of the same programs and prints the counts.  Here a few hundred run, derandomized so that CI is
reproducible; the benchmark draws fresh ones.  ``ATTNREWRITE_FUZZ_SCALE=10`` multiplies the example
counts (a long run by hand; CI keeps the default of 1).
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnrewrite.testing import spellings

_SCALE = int(os.environ.get("ATTNREWRITE_FUZZ_SCALE", "1"))
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def _choose(data, **fixed):
    return lambda name, options: fixed[name] if name in fixed else data.draw(st.sampled_from(options), label=name)


@pytest.mark.parametrize("family", ["eager", "sdpa"])  # two tests: xdist runs them side by side
@settings(max_examples=100 * _SCALE, **_SETTINGS)
@given(data=st.data())
def test_random_spellings_of_attention_are_rewritten(family, data):
    outcome = spellings.check(spellings.draw_attention(_choose(data, family=family)))
    assert not outcome.problems, f"{outcome.program}\n{outcome.problems}"


@settings(max_examples=120 * _SCALE, **_SETTINGS)
@given(st.data())
def test_near_misses_stay_untouched(data):
    outcome = spellings.check(spellings.draw_near_miss(_choose(data)))
    assert not outcome.problems, f"{outcome.program}\n{outcome.problems}\nreasons: {outcome.reasons}"


@pytest.mark.parametrize("miss", spellings.NEAR_MISSES)
def test_every_kind_of_near_miss_stays_untouched(miss):
    """Each near-miss category at least once, whatever hypothesis draws."""
    first = iter([miss])

    def choose(name, options):
        return next(first) if name == "near_miss" else options[0]

    outcome = spellings.check(spellings.draw_near_miss(choose))
    assert not outcome.problems, f"{outcome.program}\n{outcome.problems}"
