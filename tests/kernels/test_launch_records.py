"""The shared check on recorded kernel launches (attnrewrite.testing.checks.assert_launched_with_mod)."""

import pytest

from attnrewrite.testing.checks import assert_launched_with_mod

KERNELS = {"fwd_kernel", "bwd_kernel"}
CHAIN = "chain program"


def test_it_accepts_exactly_the_expected_launches():
    assert_launched_with_mod([("fwd_kernel", CHAIN, True), ("bwd_kernel", CHAIN, True), ("bwd_kernel", CHAIN, True)],
                             KERNELS, CHAIN, generated=True)
    assert_launched_with_mod([("fwd_kernel", "tanh", False), ("bwd_kernel", "tanh", False)], KERNELS, "tanh",
                             generated=False)


@pytest.mark.parametrize("launches, what", [
    ([("fwd_kernel", CHAIN, True)], "launched"),                                          # a kernel missing
    ([("fwd_kernel", CHAIN, True), ("bwd_kernel", CHAIN, True), ("other", CHAIN, True)], "launched"),  # one more
    ([("fwd_kernel", CHAIN, True), ("bwd_kernel", None, True)], "without program"),       # the program lost
    ([("fwd_kernel", CHAIN, True), ("bwd_kernel", CHAIN, False)], "not generated=True"),   # the generic kernel ran
])
def test_it_names_what_differs(launches, what):
    with pytest.raises(AssertionError, match=what):
        assert_launched_with_mod(launches, KERNELS, CHAIN, generated=True)
