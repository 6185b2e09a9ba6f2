"""Placement across replicas: bounded-load consistent hashing against plain consistent hashing and "most room".

Run: .venv/bin/python -m tests.bench.bench_placement [--replicas 4] [--sessions 25] [--conversations 400]

A simulated fleet, no processes: each replica holds at most ``--sessions`` warm sessions, evicts the
least recently used one when it needs room, and ends sessions idle for ``--idle`` messages. Messages
follow a Zipf trace. A warm conversation is always served by its owner (forwarding), so placement
decides only where a cold one starts. Half-way, one replica leaves and a new one joins.

Printed per policy:
* **warm hits**: messages that found their conversation warm;
* **home hits**: cold starts on the replica that served the conversation last (its workdir and
  local transcript are there: a cheaper resume, files still in place);
* **spread**: the mean over the trace of the fullest replica's sessions over the mean replica's;
* **home after**: the home hits of the second half alone, after the membership change.

Not a test: it prints numbers (tests/unit/test_placement.py checks the rules).
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.fleet.placement import Ring, Room, most_room, place

Policy = Callable[[str, Ring, list[Room]], str | None]
POLICIES: dict[str, Policy] = {
    "bounded (eps 0.25)": lambda key, ring, rooms: place(key, ring, rooms),
    "plain consistent hashing": lambda key, ring, rooms: ring.home(key),
    "most room": lambda key, ring, rooms: most_room(rooms),
}


@dataclass
class Replica:
    name: str
    capacity: int
    warm: OrderedDict[str, int] = field(default_factory=OrderedDict)  # conversation -> last message index

    def room(self) -> Room:
        return Room(self.name, len(self.warm), self.capacity)


@dataclass
class Tally:
    messages: int = 0
    warm: int = 0
    cold: int = 0
    home: int = 0
    spread_sum: float = 0.0
    cold_after: int = 0
    home_after: int = 0


def zipf_trace(conversations: int, messages: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(conversations)]
    names = [f"slack:T1:C{rank}" for rank in range(conversations)]
    rng.shuffle(names)  # popularity independent of the name's hash
    return rng.choices(names, weights=weights, k=messages)


def simulate(policy: Policy, trace: list[str], replicas: int, capacity: int, idle: int) -> Tally:
    fleet = {f"r{i}": Replica(f"r{i}", capacity) for i in range(replicas)}
    ring = Ring(fleet)
    last_home: dict[str, str] = {}
    tally = Tally()
    for index, key in enumerate(trace):
        after = index >= len(trace) // 2
        if index == len(trace) // 2:
            ring = _change_membership(fleet, capacity)
        _expire_idle(fleet.values(), index, idle)
        owner = next((r for r in fleet.values() if key in r.warm), None)
        tally.messages += 1
        if owner is not None:
            tally.warm += 1
        else:
            owner = _start(policy, key, ring, fleet)
            home = last_home.get(key) == owner.name
            tally.cold, tally.home = tally.cold + 1, tally.home + home
            tally.cold_after, tally.home_after = tally.cold_after + after, tally.home_after + (after and home)
        owner.warm[key] = index
        owner.warm.move_to_end(key)
        last_home[key] = owner.name
        sizes = [len(r.warm) for r in fleet.values()]
        tally.spread_sum += max(sizes) / (sum(sizes) / len(sizes))
    return tally


def _start(policy: Policy, key: str, ring: Ring, fleet: dict[str, Replica]) -> Replica:
    owner = fleet[policy(key, ring, [r.room() for r in fleet.values()]) or min(fleet)]
    if len(owner.warm) >= owner.capacity:
        owner.warm.popitem(last=False)  # its least recently used session
    return owner


def _change_membership(fleet: dict[str, Replica], capacity: int) -> Ring:
    """The first replica leaves (its sessions are gone), a new one joins."""
    del fleet[min(fleet)]
    joining = f"r{len(fleet) + 1}-new"
    fleet[joining] = Replica(joining, capacity)
    return Ring(fleet)


def _expire_idle(replicas: object, now: int, idle: int) -> None:
    for replica in replicas:  # type: ignore[attr-defined]
        while replica.warm and now - next(iter(replica.warm.values())) > idle:
            replica.warm.popitem(last=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=25, help="warm sessions per replica")
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--idle", type=int, default=150, help="messages after which an idle session ends")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    trace = zipf_trace(args.conversations, args.messages, args.seed)
    print(
        f"# placement: {args.replicas} replicas x {args.sessions} sessions, {args.conversations} conversations,"
        f" {args.messages} Zipf messages, idle end after {args.idle}; one replica replaced half-way"
    )
    print(f"{'policy':<26} {'warm hits':>10} {'home hits':>10} {'home after':>11} {'spread':>7}")
    for name, policy in POLICIES.items():
        t = simulate(policy, trace, args.replicas, args.sessions, args.idle)
        print(
            f"{name:<26} {t.warm / t.messages:>10.3f} {t.home / max(t.cold, 1):>10.3f}"
            f" {t.home_after / max(t.cold_after, 1):>11.3f} {t.spread_sum / t.messages:>7.2f}"
        )


if __name__ == "__main__":
    main()
