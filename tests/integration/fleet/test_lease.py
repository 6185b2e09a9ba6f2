"""Conversation leases and fencing tokens against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis

from bot.fleet.lease import Fenced, Held, Lease, Leases
from bot.store import keys
from tests.support.helpers import wait_for


def conversation() -> str:
    return f"slack:T1:C1:{uuid.uuid4().hex}"


async def test_the_first_replica_gets_the_lease_and_the_others_are_told_who_holds_it(client: redis.Redis) -> None:
    c = conversation()
    one, two = Leases(client, "replica-1", 30), Leases(client, "replica-2", 30)
    mine = await one.acquire(c)
    assert mine == Lease(c, "replica-1", 1)
    assert await one.acquire(c) == mine, "acquiring again renews, with the same epoch"
    assert await two.acquire(c) == Held(c, "replica-1", 1)


async def test_a_released_lease_goes_to_the_next_owner_with_a_newer_epoch(client: redis.Redis) -> None:
    c = conversation()
    one, two = Leases(client, "replica-1", 30), Leases(client, "replica-2", 30)
    first = await one.acquire(c)
    assert isinstance(first, Lease)
    assert await one.release(first)
    assert not await one.release(first), "released once"
    assert await two.acquire(c) == Lease(c, "replica-2", 2)
    assert not await one.renew(first), "the old owner learns it lost the lease"


async def test_an_owner_paused_past_its_lease_cannot_overwrite_the_new_owners_writes(client: redis.Redis) -> None:
    c, record = conversation(), keys.conversation(conversation())
    old, new = Leases(client, "replica-1", 0.2), Leases(client, "replica-2", 30)
    stale = await old.acquire(c)
    assert isinstance(stale, Lease)
    await old.fenced_set(stale, record, "written by the first owner")
    # The first owner stands still (a SIGSTOP, a pause) until its lease is gone.
    await wait_for(lambda: _gone(client, keys.conversation_lease(c)), timeout=10, what="the lease to expire")
    fresh = await new.acquire(c)
    assert fresh == Lease(c, "replica-2", 2)
    await new.fenced_set(fresh, record, "written by the second owner")
    with pytest.raises(Fenced):
        await old.fenced_set(stale, record, "a stale overwrite")
    assert await client.get(record) == "written by the second owner"
    assert not await old.renew(stale)


async def test_an_expired_lease_nobody_took_still_lets_its_owner_write(client: redis.Redis) -> None:
    c, record = conversation(), keys.conversation(conversation())
    leases = Leases(client, "replica-1", 0.2)
    lease = await leases.acquire(c)
    assert isinstance(lease, Lease)
    await wait_for(lambda: _gone(client, keys.conversation_lease(c)), timeout=10, what="the lease to expire")
    await leases.fenced_set(lease, record, "no newer owner exists", ttl_s=60)
    assert await client.ttl(record) > 0


async def test_replicas_racing_for_one_conversation_get_exactly_one_owner(client: redis.Redis) -> None:
    c = conversation()
    results = await asyncio.gather(*(Leases(client, f"replica-{i}", 30).acquire(c) for i in range(20)))
    owners = [r for r in results if isinstance(r, Lease)]
    assert len(owners) == 1
    assert {r.holder for r in results if isinstance(r, Held)} == {owners[0].replica}
    assert {r.epoch for r in results} == {1}


async def test_hostile_names_stay_in_their_own_keys(client: redis.Redis) -> None:
    c = "api:a} {b:" + "x " * 500
    leases = Leases(client, "replica with spaces 7", 30)
    lease = await leases.acquire(c)
    assert lease == Lease(c, "replica with spaces 7", 1)
    assert await Leases(client, "other", 30).acquire(c) == Held(c, "replica with spaces 7", 1)
    assert await leases.renew(lease)


async def _gone(client: redis.Redis, key: str) -> bool:
    return not await client.exists(key)
