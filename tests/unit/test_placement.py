"""Placement of new conversations: consistent hashing with bounded loads, pure and deterministic."""

from __future__ import annotations

import math
from collections import Counter

from bot.fleet.placement import DEFAULT_EPSILON, Ring, Room, most_room, place
from tests.support import hostile

KEYS = [f"slack:T1:C{i}:{i * 7919}" for i in range(3000)]


def rooms(*names: str, sessions: int = 0, max_sessions: int = 100) -> list[Room]:
    return [Room(name, sessions, max_sessions) for name in names]


def test_every_replica_computes_the_same_ring() -> None:
    a, b = Ring(["r1", "r2", "r3"]), Ring(["r3", "r1", "r2"])
    assert [a.home(k) for k in KEYS[:200]] == [b.home(k) for k in KEYS[:200]]


def test_a_walk_names_each_replica_once() -> None:
    ring = Ring(["r1", "r2", "r3", "r4"])
    walked = list(ring.walk("conversation"))
    assert sorted(walked) == ["r1", "r2", "r3", "r4"]
    assert list(Ring([]).walk("x")) == []


def test_a_replica_that_leaves_moves_only_its_own_conversations() -> None:
    before, after = Ring(["r1", "r2", "r3", "r4"]), Ring(["r1", "r2", "r3"])
    moved = [k for k in KEYS if before.home(k) != after.home(k)]
    assert all(before.home(k) == "r4" for k in moved)


def test_a_replica_that_joins_takes_about_its_share() -> None:
    before, after = Ring(["r1", "r2", "r3"]), Ring(["r1", "r2", "r3", "r4"])
    moved = [k for k in KEYS if before.home(k) != after.home(k)]
    assert all(after.home(k) == "r4" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # a quarter, give or take the ring's unevenness


def test_placing_one_by_one_keeps_every_replica_within_the_bound() -> None:
    names = [f"r{i}" for i in range(5)]
    ring = Ring(names)
    counts: Counter[str] = Counter()
    for key in KEYS[:1000]:
        chosen = place(key, ring, [Room(n, counts[n], 400) for n in names], epsilon=0.05)
        assert chosen is not None
        counts[chosen] += 1
    # Plain consistent hashing gives these keys 165 to 236 per replica.
    assert max(counts.values()) <= math.ceil(1.05 * 1000 / 5), counts


def test_an_unloaded_fleet_places_exactly_as_plain_consistent_hashing() -> None:
    ring = Ring(["r1", "r2", "r3"])
    assert all(place(k, ring, rooms("r1", "r2", "r3")) == ring.home(k) for k in KEYS[:300])


def test_a_bigger_replica_takes_a_bigger_share_under_load() -> None:
    ring = Ring(["small", "big"])
    counts: Counter[str] = Counter()
    for key in KEYS[:300]:
        chosen = place(key, ring, [Room("small", counts["small"], 100), Room("big", counts["big"], 300)])
        assert chosen is not None
        counts[chosen] += 1
    assert counts["small"] <= math.ceil((1 + DEFAULT_EPSILON) * 301 / 400 * 100)


def test_a_replica_near_its_memory_ceiling_is_passed_over() -> None:
    ring = Ring(["r1", "r2"])
    key = next(k for k in KEYS if ring.home(k) == "r1")
    hot = [Room("r1", 1, 10, rss_bytes=95, max_rss_bytes=100), Room("r2", 1, 10, rss_bytes=20, max_rss_bytes=100)]
    assert place(key, ring, hot) == "r2"


def test_a_full_replica_is_skipped_and_a_full_fleet_places_nowhere() -> None:
    ring = Ring(["r1", "r2"])
    key = next(k for k in KEYS if ring.home(k) == "r1")
    assert place(key, ring, [Room("r1", 4, 4, busy=4), Room("r2", 0, 4)]) == "r2"
    assert place(key, ring, [Room("r1", 4, 4, busy=4), Room("r2", 4, 4, busy=4)]) is None


def test_warm_but_idle_sessions_do_not_make_a_replica_full() -> None:
    ring = Ring(["r1", "r2"])
    key = next(k for k in KEYS if ring.home(k) == "r1")
    assert place(key, ring, [Room("r1", 4, 4), Room("r2", 4, 4)]) == "r1"  # it evicts an idle one


def test_a_replica_without_a_heartbeat_is_no_candidate() -> None:
    ring = Ring(["r1", "r2"])
    key = next(k for k in KEYS if ring.home(k) == "r1")
    assert place(key, ring, rooms("r2")) == "r2"
    assert place(key, ring, []) is None


def test_most_room_breaks_ties_by_name() -> None:
    assert most_room(rooms("b", "a", "c")) == "a"
    assert most_room([Room("a", 3, 4), Room("b", 1, 4)]) == "b"


def test_a_hostile_key_costs_linear_time() -> None:
    ring = Ring(["r1", "r2", "r3"])
    hostile.assert_linear(ring.home, lambda n: "\u202e" * n)
