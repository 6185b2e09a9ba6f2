from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from bot import procs
from bot.core import Failure, Inbound
from bot.store.sqlite import SqliteStore
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.support.helpers import wait_until


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_warm_follow_up_reuses_process_and_history(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    first = await pool.ask(Inbound("api:a", "hello alpha"))
    assert first.ok, first.error
    assert first.reply == "echo: hello alpha"
    pid = pool.live_pids()[0]
    second = await pool.ask(Inbound("api:a", "hello beta"))
    assert second.reply == "echo: hello beta"
    assert second.session_id == first.session_id
    assert second.turns == 2
    assert pool.live_pids() == [pid]
    assert "hello alpha" in fake_model.find("hello beta")[-1].all_text()


async def test_turn_ceiling_evicts_and_next_message_resumes(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"session_max_turns": 2})
    await pool.ask(Inbound("api:t", "turn one"))
    first_pid = pool.live_pids()[0]
    await pool.ask(Inbound("api:t", "turn two"))
    await wait_until(lambda: not alive(first_pid), what="turn-ceiling eviction")
    third = await pool.ask(Inbound("api:t", "turn three"))
    assert third.ok, third.error
    assert pool.live_pids() != [first_pid]
    history = fake_model.find("turn three")[-1].all_text()
    assert "turn one" in history and "turn two" in history
    (row,) = await pool.sessions()
    assert row.turns == 3 and row.session_id == third.session_id


async def test_idle_timeout_evicts(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"idle_timeout_s": 0.3})
    await pool.ask(Inbound("api:i", "before idle"))
    pid = pool.live_pids()[0]
    await wait_until(lambda: not pool.live_pids(), what="idle eviction")
    assert not alive(pid)
    (row,) = await pool.sessions()
    assert row.state == "evicted"
    after = await pool.ask(Inbound("api:i", "after idle"))
    assert after.ok
    assert "before idle" in fake_model.find("after idle")[-1].all_text()


async def test_rss_ceiling_evicts_between_turns(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    # The hard ceiling (2x by default) would kill a loaded machine's slower second turn mid-way.
    pool = await make_pool(pool={"session_max_rss_mb": 32, "hard_rss_mb": 100_000})
    outcome = await pool.ask(Inbound("api:m", "memory hungry"))
    assert outcome.ok, "the turn itself must complete; eviction happens after it"
    await wait_until(lambda: not pool.live_pids(), what="memory eviction")
    store_record = await pool.store.get("api:m")
    assert store_record is not None and store_record.evict_reason == "memory"
    again = await pool.ask(Inbound("api:m", "still there"))
    assert again.ok and "memory hungry" in fake_model.find("still there")[-1].all_text()


async def test_max_sessions_evicts_least_recently_used(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"max_sessions": 1})
    await pool.ask(Inbound("api:x", "x first"))
    await pool.ask(Inbound("api:y", "y first"))
    assert len(pool.live_pids()) == 1
    record = await pool.store.get("api:x")
    assert record is not None and record.evict_reason == "room"
    back = await pool.ask(Inbound("api:x", "x again"))
    assert back.ok and "x first" in fake_model.find("x again")[-1].all_text()


async def test_memory_budget_makes_room(make_pool: PoolFactory) -> None:
    pool = await make_pool(pool={"memory_budget_mb": 300, "spawn_estimate_mb": 150})
    await pool.ask(Inbound("api:p", "p"))
    pool.sample()
    await pool.ask(Inbound("api:q", "q"))
    assert len(pool.live_pids()) == 1


async def test_prewarmed_spare_serves_new_conversation(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = await make_pool(pool={"prewarm": 1})
    await wait_until(lambda: len(pool.live_pids()) == 1, what="spare to connect")
    (spare_pid,) = pool.live_pids()
    outcome = await pool.ask(Inbound("api:new", "first words"))
    assert outcome.ok
    record = await pool.store.get("api:new")
    assert record is not None and Path(record.workdir).name.startswith("spare-")
    assert spare_pid in pool.live_pids()
    await wait_until(lambda: len(pool.live_pids()) == 2, what="replacement spare")


async def test_queue_policy_answers_every_message_in_order(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("slow one", text="slow answer", delay_s=0.5)
    pool = await make_pool(pool={"busy_policy": "queue"})
    first = await pool.submit(Inbound("api:q", "slow one"))
    second = await pool.submit(Inbound("api:q", "quick two"))
    a, b = await asyncio.gather(first.outcome, second.outcome)
    assert (a.reply, b.reply) == ("slow answer", "echo: quick two")
    assert (a.turns, b.turns) == (1, 2)


async def test_reject_policy_answers_busy(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("slow one", text="slow answer", delay_s=0.5)
    pool = await make_pool(pool={"busy_policy": "reject"})
    first = await pool.submit(Inbound("api:r", "slow one"))
    second = await pool.submit(Inbound("api:r", "too soon"))
    rejected = await second.outcome
    assert rejected.failure is Failure.BUSY and "busy" in (rejected.error or "")
    assert (await first.outcome).reply == "slow answer"


async def test_interrupt_policy_stops_running_turn(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("very slow", text="never shown", delay_s=5)
    pool = await make_pool(pool={"busy_policy": "interrupt"})
    started = asyncio.Event()
    fake_model.on_request = lambda r: started.set() if "very slow" in r.last_said() else None
    first = await pool.submit(Inbound("api:n", "very slow"))
    await asyncio.wait_for(started.wait(), 20)
    second = await pool.submit(Inbound("api:n", "newer"))
    a, b = await asyncio.wait_for(asyncio.gather(first.outcome, second.outcome), 20)
    assert a.failure is Failure.INTERRUPTED
    assert b.ok and b.reply == "echo: newer"


async def test_crash_mid_turn_fails_clearly_and_resumes(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("doomed", text="never", delay_s=10)
    pool = await make_pool()
    await pool.ask(Inbound("api:c", "remember me"))
    (pid,) = pool.live_pids()
    started = asyncio.Event()
    fake_model.on_request = lambda r: started.set() if "doomed" in r.last_said() else None
    turn = await pool.submit(Inbound("api:c", "doomed"))
    await asyncio.wait_for(started.wait(), 20)
    os.kill(pid, signal.SIGKILL)
    outcome = await asyncio.wait_for(turn.outcome, 20)
    assert outcome.failure is Failure.CRASHED and "stopped unexpectedly" in (outcome.error or "")
    await wait_until(lambda: not alive(pid), what="crashed CLI to be reaped")
    assert pid not in [c.pid for c in psutil.Process().children(recursive=True)]
    after = await pool.ask(Inbound("api:c", "are you back"))
    assert after.ok and "remember me" in fake_model.find("are you back")[-1].all_text()


async def test_hard_memory_ceiling_kills_runaway_mid_turn(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("runaway", text="never", delay_s=10)
    pool = await make_pool(pool={"session_max_rss_mb": 32, "hard_rss_mb": 64, "rss_sample_s": 0.05})
    outcome = await asyncio.wait_for(pool.ask(Inbound("api:h", "runaway")), 30)
    assert outcome.failure is Failure.MEMORY
    assert "MiB" in (outcome.error or "")


async def test_close_leaves_no_cli_processes(make_pool: PoolFactory) -> None:
    pool = await make_pool(pool={"prewarm": 1})
    await asyncio.gather(*(pool.ask(Inbound(f"api:{i}", "hi")) for i in range(3)))
    pids = pool.live_pids()
    assert len(pids) >= 3
    await pool.close(grace_s=5)
    for pid in pids:
        assert not alive(pid)


async def test_restart_resumes_from_store(make_pool: PoolFactory, fake_model: FakeModel, tmp_path: Path) -> None:
    db = tmp_path / "data" / "state.db"
    pool = await make_pool(store=SqliteStore(db, ttl_days=1))
    first = await pool.ask(Inbound("api:r", "before restart"))
    await pool.close(grace_s=5)
    reborn = await make_pool(store=SqliteStore(db, ttl_days=1))
    after = await reborn.ask(Inbound("api:r", "after restart"))
    assert after.ok and after.session_id == first.session_id
    assert "before restart" in fake_model.find("after restart")[-1].all_text()


async def test_shutdown_refuses_new_messages(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    await pool.close(grace_s=1)
    outcome = await pool.ask(Inbound("api:s", "late"))
    assert outcome.failure is Failure.SHUTDOWN


@pytest.mark.parametrize("policy", ["queue"])
async def test_many_conversations_through_small_pool(make_pool: PoolFactory, policy: str) -> None:
    pool = await make_pool(pool={"max_sessions": 3, "busy_policy": policy})
    outcomes = await asyncio.gather(*(pool.ask(Inbound(f"api:m{i % 6}", f"msg {i}")) for i in range(12)))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert sorted(o.reply for o in outcomes) == sorted(f"echo: msg {i}" for i in range(12))
    assert len(pool.live_pids()) <= 3


async def test_the_sampler_outlives_a_failing_sample(make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RSS sampler enforces the memory kill: one bad sample must not end it silently."""
    pool = await make_pool(pool={"rss_sample_s": 0.05, "prewarm": 0})
    calls = 0
    sampler = pool._sampler
    real_sample = type(sampler).sample

    def flaky_sample(self: object, snapshot: procs.Snapshot | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in one sample")
        real_sample(sampler, snapshot)

    monkeypatch.setattr(type(sampler), "sample", flaky_sample)
    await wait_until(lambda: calls >= 3, what="samples after the failed one")
    assert pool._monitor is not None and not pool._monitor.done()
