"""`orca router`'s picking policy: a pure function, tested on hand-built replica states."""
from __future__ import annotations

from collections import Counter

import pytest

from orca.operator.router.policy import ReplicaState, load, pick

NOW = 1000.0


def ready(address: str, running: float = 0, waiting: float = 0, **fields: object) -> ReplicaState:
    available = {"ready_in_endpoints": True, "ready_probe_ok": True, "metrics_ok": True}
    return ReplicaState(address, num_requests_running=running, num_requests_waiting=waiting,
                        **{**available, **fields})  # type: ignore[arg-type]


def test_least_load_wins_counting_running_waiting_and_routed_since_scrape() -> None:
    replicas = [ready("10.0.0.1:8000", running=3), ready("10.0.0.2:8000", running=1, waiting=1),
                ready("10.0.0.3:8000", running=0, waiting=0, routed_since_scrape=4)]
    assert load(replicas[1]) == 2 and load(replicas[2]) == 4
    for counter in range(5):
        assert pick(replicas, set(), counter, NOW) is replicas[1]


def test_routed_since_scrape_moves_traffic_before_the_next_scrape() -> None:
    """The gauges are up to a scrape old: requests routed since then must count, or every request
    between two scrapes would pile onto the one replica that looked idlest."""
    busy, idle = ready("10.0.0.1:8000", running=2), ready("10.0.0.2:8000")
    picks = []
    for counter in range(6):
        chosen = pick([busy, idle], set(), counter, NOW)
        assert chosen is not None
        chosen.routed_since_scrape += 1  # what the replica set does on every pick
        picks.append(chosen.address)
    assert picks[:2] == ["10.0.0.2:8000", "10.0.0.2:8000"]  # idle catches up with busy first
    assert Counter(picks[2:]) == {"10.0.0.1:8000": 2, "10.0.0.2:8000": 2}  # then they share


def test_ties_rotate_round_robin_in_a_stable_order() -> None:
    replicas = [ready("10.0.0.3:8000"), ready("10.0.0.1:8000"), ready("10.0.0.2:8000")]
    picks = [pick(replicas, set(), counter, NOW).address for counter in range(6)]  # type: ignore[union-attr]
    assert picks == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"] * 2
    assert pick(list(reversed(replicas)), set(), 1, NOW).address == "10.0.0.2:8000"  # type: ignore[union-attr]


def test_ties_rotate_only_among_the_least_loaded() -> None:
    replicas = [ready("10.0.0.1:8000"), ready("10.0.0.2:8000", running=1), ready("10.0.0.3:8000")]
    assert {pick(replicas, set(), counter, NOW).address for counter in range(10)} == {  # type: ignore[union-attr]
        "10.0.0.1:8000", "10.0.0.3:8000"}


@pytest.mark.parametrize("fields", [
    {"ready_in_endpoints": False}, {"ready_probe_ok": False}, {"draining": True}, {"metrics_ok": False},
    {"failed_until": NOW + 0.5},
], ids=["not-ready-in-endpoints", "ready-probe-failed", "draining", "scrape-failed", "failed-until-later"])
def test_an_unavailable_replica_is_never_chosen_even_when_idlest(fields: dict[str, object]) -> None:
    unavailable = ready("10.0.0.1:8000", **fields)
    loaded = ready("10.0.0.2:8000", running=50, waiting=50)
    assert all(pick([unavailable, loaded], set(), counter, NOW) is loaded for counter in range(4))
    assert pick([unavailable], set(), 0, NOW) is None


def test_a_failed_replica_returns_once_its_cooldown_ended() -> None:
    replica = ready("10.0.0.1:8000", failed_until=NOW)
    assert pick([replica], set(), 0, NOW) is replica
    assert pick([replica], set(), 0, NOW - 0.001) is None


def test_excluded_replicas_are_skipped() -> None:
    tried, other = ready("10.0.0.1:8000"), ready("10.0.0.2:8000", running=9)
    assert pick([tried, other], {"10.0.0.1:8000"}, 0, NOW) is other
    assert pick([tried, other], {"10.0.0.1:8000", "10.0.0.2:8000"}, 0, NOW) is None


def test_none_when_nothing_is_eligible() -> None:
    assert pick([], set(), 0, NOW) is None
    assert pick([ReplicaState("10.0.0.1:8000")], set(), 0, NOW) is None  # new: not probed yet
