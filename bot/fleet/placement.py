"""Where a new conversation goes: consistent hashing with bounded loads.

Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA 2018): each
replica sits at many points of a hash ring; a conversation walks the ring clockwise from its own
hash and takes the first replica whose load stays within ``(1 + epsilon)`` times the fleet's
average. Plain consistent hashing is stable (a replica that comes or goes moves only its own
share) but lets one replica fill while others idle; the bound keeps the stability for all but the
overflow, which goes on to the next replica on the ring, never to a random one.

Load is the *fill* each replica reports in its heartbeat: the larger of its sessions against its
session limit and its memory against its memory ceiling. Replicas differ in size, so the bound is
on fill, not on a count. Placement is a hint: correctness comes from the conversation's lease.

Pure and deterministic (BLAKE2b, no process-seeded ``hash``): every replica computes the same ring.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# Points per replica on the ring: enough that shares differ by a few percent, cheap to rebuild.
POINTS_PER_REPLICA = 128
# The load bound's slack; the paper's 1 + epsilon. 0.25 keeps every replica within 125 % of the mean.
DEFAULT_EPSILON = 0.25
# Below this memory fill a replica is never too loaded by memory: an idle fleet's small differences are noise.
MEMORY_FLOOR = 0.5


@dataclass(frozen=True)
class Room:
    """What one replica reports in its heartbeat: how full it is against its own limits."""

    replica: str
    sessions: int
    max_sessions: int
    rss_bytes: int = 0
    max_rss_bytes: int = 0
    busy: int = 0  # sessions running a turn: the others can be evicted to make room

    @property
    def memory_fill(self) -> float:
        return self.rss_bytes / self.max_rss_bytes if self.max_rss_bytes > 0 else 0.0

    @property
    def fill(self) -> float:
        """0.0 (empty) to 1.0 (full), by whichever limit is nearer."""
        by_sessions = self.sessions / self.max_sessions if self.max_sessions > 0 else 1.0
        return max(by_sessions, self.memory_fill)

    @property
    def full(self) -> bool:
        """No room even by evicting an idle session: every session is busy, or memory is at its ceiling."""
        return self.busy >= self.max_sessions or self.memory_fill >= 1.0


class Ring:
    """The replicas' points on a 64-bit hash ring."""

    def __init__(self, replicas: Iterable[str], points: int = POINTS_PER_REPLICA) -> None:
        pairs = sorted((_hash(f"{replica}#{i}"), replica) for replica in set(replicas) for i in range(points))
        self._hashes = [h for h, _ in pairs]
        self._owners = [r for _, r in pairs]
        self.replicas = frozenset(self._owners)

    def walk(self, key: str) -> Iterator[str]:
        """Each replica once, in ring order clockwise from ``key``'s hash."""
        if not self._hashes:
            return
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[str] = set()
        for i in range(len(self._hashes)):
            owner = self._owners[(start + i) % len(self._hashes)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.replicas):
                    return

    def home(self, key: str) -> str | None:
        """Plain consistent hashing: the first replica on the ring, whatever its load."""
        return next(self.walk(key), None)


def place(key: str, ring: Ring, rooms: Sequence[Room], epsilon: float = DEFAULT_EPSILON) -> str | None:
    """The replica a new conversation ``key`` should start on; None if every replica is full.

    The first replica clockwise that is within its bound after taking one more session: at most
    ``ceil((1 + epsilon) * mean * max_sessions)`` sessions, where ``mean`` is the fleet's session
    fill with this one added (the paper's ``ceil((1 + epsilon) m / n)``, per replica size); and a
    memory fill within ``(1 + epsilon)`` of the fleet's, unless under half its ceiling (small
    differences of an idle fleet overload nobody). When no replica qualifies, the one with the
    most room takes it.
    """
    by_name = {room.replica: room for room in rooms if room.replica in ring.replicas}
    if not by_name:
        return None
    bound = _Bound.of(by_name.values(), epsilon)
    for replica in ring.walk(key):
        room = by_name.get(replica)
        if room is not None and bound.admits(room):  # on the ring without a heartbeat: no candidate
            return replica
    return most_room(by_name.values())


@dataclass(frozen=True)
class _Bound:
    session_fill: float  # (1 + epsilon) x the fleet's session fill with one more session
    memory_fill: float  # (1 + epsilon) x the fleet's memory fill

    @classmethod
    def of(cls, rooms: Iterable[Room], epsilon: float) -> _Bound:
        listed = list(rooms)
        capacity = sum(room.max_sessions for room in listed)
        sessions = sum(room.sessions for room in listed) + 1
        ceiling = sum(room.max_rss_bytes for room in listed)
        memory = sum(room.rss_bytes for room in listed) / ceiling if ceiling > 0 else 0.0
        return cls((1 + epsilon) * sessions / capacity if capacity > 0 else 0.0, (1 + epsilon) * memory)

    def admits(self, room: Room) -> bool:
        if room.full:
            return False
        if room.sessions + 1 > math.ceil(self.session_fill * room.max_sessions):
            return False
        return room.memory_fill < MEMORY_FLOOR or room.memory_fill <= self.memory_fill


def most_room(rooms: Iterable[Room]) -> str | None:
    """The replica with the lowest fill that is not full (ties by name, so every replica agrees).

    Also a placement policy of its own, for comparison: the best spread, but no stickiness.
    """
    open_rooms = [room for room in rooms if not room.full]
    if not open_rooms:
        return None
    return min(open_rooms, key=lambda room: (room.fill, room.replica)).replica


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
