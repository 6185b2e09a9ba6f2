"""Duties (the IMAP intake) held by one replica at a time through a lease, against a real redis-server."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from bot.core import DutyLost
from bot.fleet.duty import LeasedDuty
from bot.fleet.lease import Held, Lease, Leases
from bot.store import keys
from tests.fakes.redis_server import RedisServer
from tests.support.helpers import wait_until


class Work:
    """What a duty runs: counts its starts, stands until cancelled or told to end."""

    def __init__(self) -> None:
        self.starts = 0
        self.running = False
        self.cancelled = 0
        self.end = asyncio.Event()

    async def __call__(self) -> None:
        self.starts += 1
        self.running = True
        try:
            await self.end.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running = False


class Counting(Leases):
    """Leases that count the renewals and acquisitions a duty makes, and can stand still in a renewal."""

    def __init__(self, client: redis.Redis, replica: str, ttl_s: float) -> None:
        super().__init__(client, replica, ttl_s)
        self.renewals = self.acquisitions = 0
        self.paused: asyncio.Event | None = None

    async def acquire(self, conversation_id: str) -> Lease | Held:
        self.acquisitions += 1
        return await super().acquire(conversation_id)

    async def renew(self, lease: Lease) -> bool:
        if self.paused is not None:
            await self.paused.wait()  # the replica stands still (a SIGSTOP, a long pause) until set
        self.renewals += 1
        return await super().renew(lease)


def duty_of(client: redis.Redis, replica: str, name: str, ttl_s: float = 0.6) -> tuple[LeasedDuty, Counting]:
    leases = Counting(client, replica, ttl_s)
    return LeasedDuty(leases, name, ttl_s), leases


async def test_one_replica_at_a_time_holds_a_duty_and_a_stopped_holder_hands_it_on(client: redis.Redis) -> None:
    name = f"imap:{uuid.uuid4().hex}"
    (one, one_leases), (two, two_leases) = duty_of(client, "replica-1", name), duty_of(client, "replica-2", name)
    work_one, work_two = Work(), Work()
    run_one = asyncio.create_task(one.run(work_one))
    await wait_until(lambda: work_one.running, timeout=10, what="the first replica to take the duty")
    run_two = asyncio.create_task(two.run(work_two))
    await wait_until(
        lambda: one_leases.renewals >= 3 and two_leases.acquisitions >= 3, timeout=10, what="three renewal periods"
    )
    assert not work_two.starts and not two.held and one.held, "the second replica stands by while the first holds"
    one.stop()
    work_one.end.set()  # the holder's work ends (its owner stopped it): the lease is released at once
    await asyncio.wait_for(run_one, 10)
    assert not one.held
    await wait_until(lambda: work_two.running, timeout=10, what="the second replica to take the duty over")
    two.stop()
    work_two.end.set()
    await asyncio.wait_for(run_two, 10)


def other_replica(redis_url: str, name: str, checkpoint: str, took_over: threading.Event, end: threading.Event) -> None:
    """Another replica, on its own event loop in this thread: it takes the duty once it is free, writes
    the checkpoint under it, and holds it until ``end``."""

    async def serve() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        duty, _ = duty_of(client, "replica-2", name)
        work = Work()
        run = asyncio.create_task(duty.run(work))
        await wait_until(lambda: work.running, timeout=10, what="the second replica to take the duty")
        await duty.put_value(checkpoint, "2", 60)
        took_over.set()
        await asyncio.to_thread(end.wait, 30)
        duty.stop()
        work.end.set()
        await asyncio.wait_for(run, 10)
        await client.aclose()

    asyncio.run(serve())


async def test_a_holder_paused_past_its_lease_is_fenced_off_and_stops_its_work(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    name, checkpoint = f"imap:{uuid.uuid4().hex}", keys.mail_checkpoint(uuid.uuid4().hex)
    stale, _ = duty_of(client, "replica-1", name)
    work = Work()
    run = asyncio.create_task(stale.run(work))
    await wait_until(lambda: work.running, timeout=10, what="the first replica to take the duty")
    await stale.put_value(checkpoint, "1", 60)
    took_over, end = threading.Event(), threading.Event()
    other = threading.Thread(target=other_replica, args=(redis_server.url, name, checkpoint, took_over, end))
    other.start()
    try:
        # This replica's whole event loop stands still, as under SIGSTOP, until its lease expired and the
        # other replica took the duty and wrote under it.
        assert took_over.wait(timeout=10), "the other replica took the duty over"
        assert stale.held, "woken up, the paused replica still believes it holds the duty"
        with pytest.raises(DutyLost):
            await stale.put_value(checkpoint, "1 again", 60)
        assert await client.get(checkpoint) == "2", "the stale write was refused"
        await wait_until(lambda: work.cancelled == 1, timeout=10, what="the stale holder's work to be cancelled")
        await wait_until(lambda: not stale.held, timeout=10, what="the stale holder to let go")
        labels = {"duty": f"duty:{name}"}
        assert REGISTRY.get_sample_value("agentd_duty_losses_total", labels) == 1, "the loss is counted once"
    finally:
        stale.stop()
        work.end.set()  # it may have taken the duty again, once the other replica let go
        end.set()
        await asyncio.to_thread(other.join, 30)
        await asyncio.wait_for(run, 10)


async def test_a_replica_that_cannot_reach_redis_stops_its_work_before_the_lease_can_expire(
    client: redis.Redis,
) -> None:
    name = f"imap:{uuid.uuid4().hex}"
    duty, leases = duty_of(client, "replica-1", name, ttl_s=3)
    work = Work()
    run = asyncio.create_task(duty.run(work))
    await wait_until(lambda: work.running, timeout=10, what="the duty to be taken")
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    leases._renew = unreachable.register_script("return 0")  # every renewal now fails to connect
    await wait_until(lambda: work.cancelled == 1, timeout=10, what="the work to stop without Redis")
    lease_ms = await client.pttl(keys.conversation_lease(f"duty:{name}"))
    assert lease_ms > 0, "stopped while its lease still stood: no other replica could have begun"
    duty.stop()
    await asyncio.wait_for(run, 10)
    await unreachable.aclose()


async def test_a_non_holder_cannot_write_under_the_duty(client: redis.Redis) -> None:
    duty, _ = duty_of(client, "replica-1", f"imap:{uuid.uuid4().hex}")
    with pytest.raises(DutyLost):
        await duty.put_value(keys.mail_checkpoint(uuid.uuid4().hex), "1", 60)
