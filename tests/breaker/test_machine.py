"""The breaker's pure state machine: trips, open periods, probes and manual states."""

from __future__ import annotations

import pytest

from partitioner.breaker.machine import Breaker, Outcome, Policy, State

FAIL = Outcome(failed=True)
OK = Outcome(failed=False)
SLOW = Outcome(failed=False, slow=True)


def probe_ok(breaker: Breaker) -> Outcome:
    return Outcome(failed=False, probe=breaker.period)


def probe_failed(breaker: Breaker) -> Outcome:
    return Outcome(failed=True, probe=breaker.period)


def feed(breaker: Breaker, policy: Policy, outcomes: list[Outcome], now_ms: int = 0) -> Breaker:
    for outcome in outcomes:
        breaker, _ = breaker.record(policy, outcome, now_ms)
    return breaker


@pytest.mark.parametrize(
    ("outcomes", "state"),
    [
        pytest.param([FAIL] * 4, State.CLOSED, id="below-min-calls-never-trips"),
        pytest.param([FAIL] * 5, State.OPEN, id="all-failed-at-min-calls-trips"),
        pytest.param([OK, OK, OK, FAIL, FAIL], State.CLOSED, id="40pct-below-50pct-threshold"),
        pytest.param([OK, OK, OK, FAIL, FAIL, FAIL], State.OPEN, id="50pct-at-threshold-trips"),
        pytest.param([OK] * 5, State.CLOSED, id="all-ok"),
    ],
)
def test_failure_rate_trips_at_threshold(outcomes: list[Outcome], state: State) -> None:
    policy = Policy(min_calls=5, window_calls=10, failure_rate=0.5)
    assert feed(Breaker(), policy, outcomes).state is state


def test_count_window_forgets_old_outcomes() -> None:
    policy = Policy(min_calls=4, window_calls=4, failure_rate=0.5)
    breaker = feed(Breaker(), policy, [FAIL, OK, OK, OK, OK])
    assert breaker.window.counts(policy, 0).failures == 0
    assert breaker.state is State.CLOSED


def test_time_window_forgets_outcomes_older_than_window() -> None:
    policy = Policy(window="time", window_ms=1000, min_calls=3, failure_rate=0.5)
    breaker = feed(Breaker(), policy, [FAIL, FAIL], now_ms=0)

    # Two failures 1.5 s ago fall out of a 1 s window: three successes now keep it closed.
    breaker = feed(breaker, policy, [OK, OK, OK], now_ms=1500)
    assert breaker.window.counts(policy, 1500).calls == 3
    assert breaker.state is State.CLOSED

    # Within the window they count: two failures and one success trip it.
    again = feed(Breaker(), policy, [FAIL, FAIL, OK], now_ms=500)
    assert again.state is State.OPEN


def test_slow_calls_trip_on_their_own_rate() -> None:
    policy = Policy(min_calls=4, window_calls=10, slow_call_ms=100, slow_call_rate=0.75)
    assert feed(Breaker(), policy, [SLOW, SLOW, OK, OK]).state is State.CLOSED
    breaker, moved = feed(Breaker(), policy, [SLOW, SLOW, SLOW]).record(policy, OK, 0)
    assert breaker.state is State.OPEN
    assert moved is not None and "slow-call rate 75% (3 of 4 calls over 0.1 s)" in moved.reason


def test_open_period_ends_in_half_open_and_probes_close_it() -> None:
    policy = Policy(min_calls=2, open_ms=500, half_open_probes=2)
    breaker = feed(Breaker(), policy, [FAIL, FAIL], now_ms=1000)
    assert (breaker.state, breaker.until_ms) == (State.OPEN, 1500)

    # Given the open period is not over, no permit is granted.
    breaker, granted, _ = breaker.claim(policy, 1499)
    assert not granted and breaker.state is State.OPEN

    # When it is over, exactly half_open_probes permits are granted.
    grants = []
    for _ in range(5):
        breaker, granted, _ = breaker.claim(policy, 1500)
        grants.append(granted)
    assert grants == [True, True, False, False, False]
    assert breaker.state is State.HALF_OPEN

    # Then outcomes of tasks that are not probes decide nothing; probes close it.
    breaker = feed(breaker, policy, [FAIL, OK], now_ms=1600)
    assert breaker.state is State.HALF_OPEN
    breaker = feed(breaker, policy, [probe_ok(breaker)], now_ms=1600)
    assert breaker.state is State.HALF_OPEN
    breaker, moved = breaker.record(policy, probe_ok(breaker), 1600)
    assert breaker == Breaker()
    assert moved is not None and moved.reason == "2 of 2 probes succeeded"


def test_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    policy = Policy(min_calls=1, open_ms=1000, open_backoff=2.0, open_max_ms=3000)
    breaker = feed(Breaker(), policy, [FAIL], now_ms=0)
    periods = []
    for _ in range(4):
        start = breaker.until_ms
        breaker, _, _ = breaker.claim(policy, start)
        breaker, moved = breaker.record(policy, probe_failed(breaker), start)
        assert moved is not None and moved.reason.startswith("probe failed")
        periods.append(breaker.until_ms - start)
    assert periods == [2000, 3000, 3000, 3000]


@pytest.mark.parametrize("state", [State.FORCED_OPEN, State.DISABLED], ids=str)
def test_manual_states_ignore_outcomes(state: State) -> None:
    policy = Policy(min_calls=1)
    breaker, moved = Breaker().set(state, "by hand")
    assert moved is not None and moved.new is state
    breaker = feed(breaker, policy, [FAIL] * 10)
    assert breaker.state is state
    assert breaker.window.counts(policy, 0).calls == 0


def test_metrics_only_counts_but_never_opens() -> None:
    policy = Policy(min_calls=1)
    breaker, _ = Breaker().set(State.METRICS_ONLY, "by hand")
    breaker = feed(breaker, policy, [FAIL] * 10)
    assert breaker.state is State.METRICS_ONLY
    assert breaker.window.counts(policy, 0).failures == 10


def test_close_by_hand_clears_the_window() -> None:
    policy = Policy(min_calls=3)
    breaker = feed(Breaker(), policy, [FAIL, FAIL])
    breaker, moved = breaker.set(State.CLOSED, "reset")
    assert moved is None  # already closed: no transition to announce
    assert breaker.window.counts(policy, 0).calls == 0


@pytest.mark.parametrize("state", [State.OPEN, State.HALF_OPEN], ids=str)
def test_automatic_states_cannot_be_set_by_hand(state: State) -> None:
    with pytest.raises(ValueError, match="reached by the breaker itself"):
        Breaker().set(state, "by hand")


def test_probe_of_an_earlier_half_open_period_decides_nothing() -> None:
    # Given a probe admitted in one half-open period that reports after the next began
    policy = Policy(min_calls=1, open_ms=100, half_open_probes=2)
    breaker = feed(Breaker(), policy, [FAIL], now_ms=0)
    breaker, _, _ = breaker.claim(policy, 100)
    late = probe_ok(breaker)
    breaker, _, _ = breaker.claim(policy, 100)
    breaker, _ = breaker.record(policy, probe_failed(breaker), 100)  # reopens until 300
    breaker, _, _ = breaker.claim(policy, 300)
    assert breaker.state is State.HALF_OPEN

    # When it reports, it is not counted in the new period
    breaker, moved = breaker.record(policy, late, 310)
    assert moved is None
    assert (breaker.state, breaker.probe_ok) == (State.HALF_OPEN, 0)


def test_permits_of_probes_that_never_report_are_granted_again() -> None:
    # Given a half-open period whose only probe never reports
    policy = Policy(min_calls=1, open_ms=100, half_open_probes=1)
    breaker = feed(Breaker(), policy, [FAIL], now_ms=0)
    breaker, granted, _ = breaker.claim(policy, 100)
    assert granted
    breaker, granted, _ = breaker.claim(policy, 150)
    assert not granted

    # When the period's deadline (one open period, 10 s at least) passes, its permit is
    # granted again
    breaker, granted, _ = breaker.claim(policy, 100 + 9_999)
    assert not granted
    breaker, granted, _ = breaker.claim(policy, 100 + 10_000)
    assert granted and breaker.state is State.HALF_OPEN
