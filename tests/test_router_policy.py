"""`orca router`'s picking policy and prefix index: pure functions, tested on hand-built replica states."""
from __future__ import annotations

from collections import Counter

import pytest

from orca.operator.router.endpoints import StaticSource
from orca.operator.router.policy import PrefixMatch, ReplicaState, ScoringWeights, choose, pick, score
from orca.operator.router.prefix import PrefixIndex, block_hashes
from orca.operator.router.replicas import ReplicaSet

NOW = 1000.0


LOAD_ONLY = ScoringWeights(kv_cache_weight=0.0, prefix_affinity=False)
HASHES = (11, 22, 33)  # a request's block hashes: the pure pick only needs to know there are some


def ready(address: str, running: float = 0, waiting: float = 0, **fields: object) -> ReplicaState:
    available = {"ready_in_endpoints": True, "ready_probe_ok": True, "metrics_ok": True}
    return ReplicaState(address, num_requests_running=running, num_requests_waiting=waiting,
                        **{**available, **fields})  # type: ignore[arg-type]


def test_least_load_wins_counting_running_waiting_and_routed_since_scrape() -> None:
    replicas = [ready("10.0.0.1:8000", running=3), ready("10.0.0.2:8000", running=1, waiting=1),
                ready("10.0.0.3:8000", running=0, waiting=0, routed_since_scrape=4)]
    assert score(replicas[1], LOAD_ONLY) == 2 and score(replicas[2], LOAD_ONLY) == 4
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


# --- the score ---

def test_the_score_weighs_waiting_running_routed_and_kv_usage() -> None:
    replica = ready("10.0.0.1:8000", running=2, waiting=3, routed_since_scrape=1, kv_cache_usage=0.5)
    assert score(replica) == 3 + (2 + 1) + 4 * 0.5  # the defaults: 1, 1, 4
    weights = ScoringWeights(waiting_weight=2.0, running_weight=0.5, kv_cache_weight=10.0)
    assert score(replica, weights) == 2 * 3 + 0.5 * (2 + 1) + 10 * 0.5


def test_unknown_kv_usage_counts_as_empty() -> None:
    assert score(ready("10.0.0.1:8000", running=1, kv_cache_usage=None)) == 1


def test_kv_usage_moves_traffic_between_equal_queues() -> None:
    full, empty = ready("10.0.0.1:8000", kv_cache_usage=0.9), ready("10.0.0.2:8000", kv_cache_usage=0.1)
    assert all(pick([full, empty], set(), counter, NOW) is empty for counter in range(4))
    # Four queued requests outweigh a cache 0.8 fuller at weight 4: 4 + 4 * 0.1 > 4 * 0.9.
    empty.num_requests_waiting = 4
    assert pick([full, empty], set(), 0, NOW) is full


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_weight"):
        ScoringWeights(kv_cache_weight=-1.0)
    with pytest.raises(ValueError, match="affinity_bound"):
        ScoringWeights(affinity_bound=float("nan"))


# --- prefix affinity in the pick ---

def test_affinity_hit_within_the_bound() -> None:
    holder, idle = ready("10.0.0.2:8000", running=3), ready("10.0.0.1:8000")
    for counter in range(4):
        choice = choose([holder, idle], set(), counter, NOW, block_hashes=HASHES,
                        prefix_match=PrefixMatch(holder.address, 3))
        assert choice is not None and (choice.replica, choice.affinity) == (holder, "hit")
    holder.num_requests_running = 4  # exactly the bound (4.0) above the best: still a hit
    assert choose([holder, idle], set(), 0, NOW, block_hashes=HASHES,
                  prefix_match=PrefixMatch(holder.address, 3)).replica is holder  # type: ignore[union-attr]


def test_affinity_overridden_when_the_holder_is_out_of_bound() -> None:
    holder, idle = ready("10.0.0.2:8000", running=4, kv_cache_usage=0.25), ready("10.0.0.1:8000")
    choice = choose([holder, idle], set(), 0, NOW, block_hashes=HASHES, prefix_match=PrefixMatch(holder.address, 3))
    assert choice is not None and (choice.replica, choice.affinity) == (idle, "overridden")
    wide = ScoringWeights(affinity_bound=10.0)
    choice = choose([holder, idle], set(), 0, NOW, wide, HASHES, PrefixMatch(holder.address, 3))
    assert choice is not None and (choice.replica, choice.affinity) == (holder, "hit")


@pytest.mark.parametrize("fields", [
    {"draining": True}, {"ready_in_endpoints": False}, {"ready_probe_ok": False}, {"metrics_ok": False},
    {"failed_until": NOW + 1},
], ids=["draining", "not-ready-in-endpoints", "ready-probe-failed", "scrape-failed", "failed-until-later"])
def test_affinity_never_chooses_an_unavailable_holder(fields: dict[str, object]) -> None:
    holder, other = ready("10.0.0.1:8000", **fields), ready("10.0.0.2:8000", running=2)
    for counter in range(4):
        choice = choose([holder, other], set(), counter, NOW, block_hashes=HASHES,
                        prefix_match=PrefixMatch(holder.address, 5))
        assert choice is not None and (choice.replica, choice.affinity) == (other, "overridden")
    assert choose([holder], set(), 0, NOW, block_hashes=HASHES, prefix_match=PrefixMatch(holder.address, 5)) is None


def test_affinity_to_an_excluded_or_vanished_holder_is_overridden() -> None:
    holder, other = ready("10.0.0.1:8000"), ready("10.0.0.2:8000")
    choice = choose([holder, other], {holder.address}, 0, NOW, block_hashes=HASHES,
                    prefix_match=PrefixMatch(holder.address, 2))
    assert choice is not None and (choice.replica, choice.affinity) == (other, "overridden")
    choice = choose([other], set(), 0, NOW, block_hashes=HASHES, prefix_match=PrefixMatch("10.0.0.9:8000", 2))
    assert choice is not None and (choice.replica, choice.affinity) == (other, "overridden")


def test_a_miss_routes_by_score_and_ties_rotate() -> None:
    replicas = [ready("10.0.0.2:8000"), ready("10.0.0.1:8000"), ready("10.0.0.3:8000", running=1)]
    choices = [choose(replicas, set(), counter, NOW, block_hashes=HASHES) for counter in range(4)]
    assert [c.replica.address for c in choices] == ["10.0.0.1:8000", "10.0.0.2:8000"] * 2  # type: ignore[union-attr]
    assert {c.affinity for c in choices} == {"miss"}  # type: ignore[union-attr]


def test_without_block_hashes_affinity_is_not_consulted() -> None:
    holder, idle = ready("10.0.0.1:8000", running=1), ready("10.0.0.2:8000")
    choice = choose([holder, idle], set(), 0, NOW, block_hashes=(), prefix_match=PrefixMatch(holder.address, 3))
    assert choice is not None and (choice.replica, choice.affinity) == (idle, None)


def test_affinity_off_ignores_the_index() -> None:
    holder, idle = ready("10.0.0.1:8000", running=1), ready("10.0.0.2:8000")
    off = ScoringWeights(prefix_affinity=False)
    for counter in range(4):
        choice = choose([holder, idle], set(), counter, NOW, off, HASHES, PrefixMatch(holder.address, 3))
        assert choice is not None and (choice.replica, choice.affinity) == (idle, None)


# --- the prefix index and the chained block hashes ---

def test_two_prompts_sharing_three_blocks_share_exactly_three_hashes() -> None:
    shared = list(range(48))  # three blocks of 16
    first, second = block_hashes(shared + list(range(100, 140))), block_hashes(shared + list(range(200, 240)))
    assert len(first) == len(second) == 5  # 88 tokens: five full blocks; the partial sixth is not hashed
    assert first[:3] == second[:3] and not set(first[3:]) & set(second[3:])
    assert len(set(first) & set(second)) == 3


def test_a_change_in_block_one_changes_every_later_hash() -> None:
    tokens = list(range(16 * 6))
    changed = list(tokens)
    changed[16 + 5] = 9999  # inside block 1
    original, edited = block_hashes(tokens), block_hashes(changed)
    assert original[0] == edited[0]
    assert all(a != b for a, b in zip(original[1:], edited[1:]))
    # Block 3's tokens are equal in both, yet its hash differs: it stands for the whole prefix.
    assert tokens[48:64] == changed[48:64] and original[3] != edited[3]


def test_block_hashes_respect_block_size_and_the_cap() -> None:
    assert block_hashes(list(range(15))) == []
    assert len(block_hashes(list(range(100)), block_size=10)) == 10
    assert len(block_hashes(list(range(16 * 300)))) == 128  # capped
    assert block_hashes(list(range(64)), block_size=16, max_blocks=2) == block_hashes(list(range(64)))[:2]


def test_longest_prefix_wins() -> None:
    index = PrefixIndex()
    short, long = block_hashes(list(range(16 * 3))), block_hashes(list(range(16 * 6)))
    assert short == long[:3]
    index.record(long, "10.0.0.2:8000")
    index.record(short, "10.0.0.1:8000")  # the shared first three blocks now name 10.0.0.1
    assert index.lookup(long) == PrefixMatch("10.0.0.2:8000", 6)  # the deepest block known decides
    assert index.lookup(short) == PrefixMatch("10.0.0.1:8000", 3)
    diverging = block_hashes(list(range(16 * 4)) + [7] * 32)
    assert index.lookup(diverging) == PrefixMatch("10.0.0.2:8000", 4)
    assert index.lookup(block_hashes([5] * 64)) is None and index.lookup([]) is None


def test_the_prefix_index_is_a_bounded_lru_keeping_leading_blocks_longest() -> None:
    index = PrefixIndex(capacity=4)
    index.record([1, 2, 3], "a")
    index.record([10, 11], "b")  # five entries: the least recently used, block 3 of "a", goes
    assert len(index) == 4
    assert index.lookup([1, 2, 3]) == PrefixMatch("a", 2)
    index.lookup([1])  # a lookup alone does not refresh: only serving a prompt does
    index.record([1], "a")
    index.record([20, 21], "c")  # evicts the two least recently used: 2, then b's deeper block 11
    assert index.lookup([1, 2]) == PrefixMatch("a", 1)
    assert index.lookup([10, 11]) == PrefixMatch("b", 1)  # b's leading block outlived its deeper one
    assert index.lookup([20, 21]) == PrefixMatch("c", 2)
    assert len(index) == 4
    with pytest.raises(ValueError):
        PrefixIndex(capacity=0)


def test_a_finished_request_no_longer_counts_against_its_replica() -> None:
    """Short requests one after another must not make a replica look busy between scrapes (it would
    lose its prefix affinity to an idle one)."""
    replicas = ReplicaSet(StaticSource(["http://127.0.0.1:1", "http://127.0.0.1:2"]))
    for address in ("127.0.0.1:1", "127.0.0.1:2"):
        replicas.replicas[address] = ReplicaState(address, ready_probe_ok=True, metrics_ok=True)
    first = replicas.pick(set())
    assert first.replica.routed_since_scrape == 1
    replicas.release(first)
    assert first.replica.routed_since_scrape == 0
    replicas.release(first)  # a second release changes nothing
    assert first.replica.routed_since_scrape == 0
    open_one = replicas.pick(set())
    open_one.replica.scrapes += 1  # a scrape after it was sent: the gauges carry it now
    open_one.replica.routed_since_scrape = 0
    replicas.release(open_one)
    assert open_one.replica.routed_since_scrape == 0
    unmetered = replicas.pick(set(), count_load=False)
    assert unmetered.counted_at_scrape is None
