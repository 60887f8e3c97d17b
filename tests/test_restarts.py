"""The restart policy of one replica: exponential backoff, and when it is flapping."""

from __future__ import annotations

from zpipe.supervision.restarts import FIRST_BACKOFF, MAX_BACKOFF, RestartPolicy


def test_backoff_doubles_from_a_tenth_of_a_second_to_five():
    policy = RestartPolicy(max_restarts=10, window=60)
    delays = [policy.died(float(t)) for t in range(8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, MAX_BACKOFF, MAX_BACKOFF]
    assert delays[0] == FIRST_BACKOFF and policy.restarts == 8


def test_more_deaths_than_max_restarts_within_the_window_is_flapping():
    policy = RestartPolicy(max_restarts=2, window=10)
    assert policy.died(0.0) is not None and policy.died(1.0) is not None
    assert policy.died(2.0) is None  # a third death within 10 s
    assert policy.recent() == 3


def test_deaths_older_than_the_window_are_forgotten_and_the_backoff_starts_over():
    policy = RestartPolicy(max_restarts=2, window=10)
    assert policy.died(0.0) == 0.1 and policy.died(5.0) == 0.2
    assert policy.died(30.0) == 0.1  # the two before are outside the window now
    assert policy.recent() == 1


def test_max_restarts_zero_means_never_restarted():
    assert RestartPolicy(max_restarts=0, window=60).died(0.0) is None
