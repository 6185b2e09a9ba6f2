"""The pool under pressure: room at the cap, tool offers, lost transcripts, dead CLIs, handovers, orphans."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import psutil
import pytest

from bot import files, procs
from bot.agent import ClaudeLauncher
from bot.core import AgentSession, Failure, Inbound, Outcome, SessionSpec
from bot.pool import LOST_CONTEXT_NOTICE, Pool
from bot.store.sqlite import SqliteStore
from tests.conftest import PoolFactory, make_settings
from tests.fakes.model import FakeModel
from tests.support.helpers import wait_until


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cli_pids() -> set[int]:
    """Live Claude CLI processes started by this test process (other test processes have their own).

    Direct children only: a starting CLI briefly runs a helper process of the same name.
    """
    found = set()
    for proc in psutil.Process().children():
        try:
            if proc.name() == "claude" and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def worker_pid(pool: Pool, conversation_id: str) -> int:
    worker = pool._workers[conversation_id]
    assert worker.pid is not None
    return worker.pid


# -- 1. the policy's tools ------------------------------------------------------------------


async def test_profile_tools_reach_the_cli_and_skip_the_spare(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"prewarm": 1})
    await wait_until(lambda: bool(pool._spares) and pool._spares[0].state == "warm", what="the spare")
    spare = pool._spares[0]
    outcome = await pool.ask(Inbound("email:r", "read only please", source="email", profile="email"))
    assert outcome.ok, outcome.error
    (request,) = fake_model.find("read only please")
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    assert pool._workers["email:r"] is not spare and spare in pool._spares
    record = await pool.store.get("email:r")
    assert record is not None and not Path(record.workdir).name.startswith("spare-")


async def test_spares_are_per_profile(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"prewarm": {"email": 1}})
    await wait_until(lambda: bool(pool._spares) and pool._spares[0].state == "warm", what="the email spare")
    spare = pool._spares[0]
    assert (await pool.ask(Inbound("api:chat", "chat first"))).ok
    assert pool._workers["api:chat"] is not spare, "a chat conversation cannot take an email spare"
    assert (await pool.ask(Inbound("email:t", "mail first", profile="email"))).ok
    assert pool._workers["email:t"] is spare


async def test_successor_keeps_the_profile(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"session_max_turns": 1})
    await pool.ask(Inbound("email:s", "first", profile="email"))
    await wait_until(lambda: "email:s" not in pool._workers, what="turn-ceiling eviction")
    again = await pool.ask(Inbound("email:s", "second", profile="email"))
    assert again.ok, again.error
    (request,) = fake_model.find("second")
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    assert "first" in request.all_text()


# -- 2. one new conversation at the cap evicts one --------------------------------------------


async def test_new_conversation_at_the_cap_evicts_only_the_least_recently_used(make_pool: PoolFactory) -> None:
    pool = await make_pool(pool={"max_sessions": 4})
    for i in range(4):
        assert (await pool.ask(Inbound(f"api:c{i}", "hello"))).ok
    pids = {i: worker_pid(pool, f"api:c{i}") for i in range(4)}
    assert (await pool.ask(Inbound("api:c4", "hello"))).ok
    await wait_until(lambda: not alive(pids[0]), what="the LRU eviction")
    for i in (1, 2, 3):
        assert pool._live(f"api:c{i}") is not None and alive(pids[i]), f"api:c{i} was evicted too"
    record = await pool.store.get("api:c0")
    assert record is not None and record.evict_reason == "room"


# -- 3. the cap holds while processes retire --------------------------------------------------


async def talk_and_count(pool: Pool, conversations: int) -> tuple[list[Outcome], int]:
    """Two messages in each of ``conversations`` at once; every outcome, and the most CLI processes seen alive."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(cli_pids()))
            await asyncio.sleep(0.005)

    async def talk(i: int) -> list[Outcome]:
        return [await pool.ask(Inbound(f"api:c{i}", f"c{i} t{t}")) for t in range(2)]

    watcher = asyncio.create_task(watch())
    outcomes = await asyncio.gather(*(talk(i) for i in range(conversations)))
    done.set()
    await watcher
    return [o for each in outcomes for o in each], peak


async def test_cli_count_never_exceeds_the_cap_while_processes_retire(make_pool: PoolFactory) -> None:
    limit = 2 + 1
    pool = await make_pool(pool={"max_sessions": 2, "prewarm": 1})
    outcomes, peak = await talk_and_count(pool, conversations=8)
    assert all(o.ok for o in outcomes)
    assert 0 < peak <= limit, f"{peak} CLI processes alive at once, cap {limit}"


async def test_memory_budget_counts_retiring_processes_until_they_exit(make_pool: PoolFactory) -> None:
    # Two trees of ~210 MiB fit the budget, a third never does; every turn retires its process.
    pool = await make_pool(
        pool={"memory_budget_mb": 600, "spawn_estimate_mb": 250, "session_max_turns": 1, "rss_sample_s": 0.02}
    )
    outcomes, peak = await talk_and_count(pool, conversations=5)
    assert all(o.ok for o in outcomes)
    assert 0 < peak <= 2, f"{peak} CLI processes alive at once under a budget for 2"


# -- 4. a lost transcript is never permanent ----------------------------------------------------


async def test_lost_transcript_starts_a_fresh_session_once(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"idle_timeout_s": 0.3})
    first = await pool.ask(Inbound("api:l", "remember plum"))
    await wait_until(lambda: not pool.live_pids(), what="idle eviction")
    shutil.rmtree(pool.data_dir / "state")
    second = await pool.ask(Inbound("api:l", "what fruit?"))
    assert second.ok, second.error
    assert second.reply.startswith(LOST_CONTEXT_NOTICE + "\n\n") and second.reply.endswith("echo: what fruit?")
    assert second.session_id != first.session_id
    assert "plum" not in fake_model.find("what fruit?")[0].all_text()
    record = await pool.store.get("api:l")
    assert record is not None and record.previous_session_ids == (first.session_id,)
    await wait_until(lambda: not pool.live_pids(), what="idle eviction")
    third = await pool.ask(Inbound("api:l", "and now?"))
    assert third.ok and third.reply == "echo: and now?"
    assert third.session_id == second.session_id
    assert "what fruit?" in fake_model.find("and now?")[0].all_text()


# -- 5. every message gets exactly one outcome --------------------------------------------------


async def test_a_broken_turn_still_gets_its_outcome(make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = await make_pool()

    def explode(workdir: Path, parking: Path) -> tuple[Path, ...]:
        raise RuntimeError("outbox exploded")

    monkeypatch.setattr(files, "take_outbox", explode)
    outcome = await asyncio.wait_for(pool.ask(Inbound("api:e", "boom")), 30)
    assert outcome.failure is Failure.AGENT_ERROR and "internal error" in (outcome.error or "")
    monkeypatch.undo()
    after = await asyncio.wait_for(pool.ask(Inbound("api:e", "still here")), 30)
    assert after.ok, after.error


async def test_outbox_name_too_long_after_nfkc_is_delivered(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    assert (await pool.ask(Inbound("api:n", "hello"))).ok
    record = await pool.store.get("api:n")
    assert record is not None
    outbox = Path(record.workdir) / "outbox"
    outbox.mkdir()
    # 80 x U+337F is 244 bytes on disk; NFKC turns each into four CJK characters (960 bytes).
    (outbox / ("\u337f" * 80 + ".txt")).write_text("report")
    outcome = await asyncio.wait_for(pool.ask(Inbound("api:n", "send it")), 30)
    assert outcome.ok, outcome.error
    (sent,) = outcome.files
    assert sent.read_text() == "report" and len(sent.name.encode()) <= 255 and sent.name.endswith(".txt")


# -- 6. order survives a handover ---------------------------------------------------------------


async def test_queued_messages_keep_their_order_across_a_retirement(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    fake_model.add("q0", text="slow answer", delay_s=0.5)
    pool = await make_pool(pool={"busy_policy": "queue", "session_max_turns": 1})
    turns = [await pool.submit(Inbound("api:o", f"q{i}")) for i in range(4)]
    await turns[0].outcome
    retiring = pool._workers["api:o"]
    await wait_until(lambda: retiring.retire_reason is not None, what="the turn-ceiling retirement")
    assert retiring.queue, "the queued messages must still be waiting for the handover"
    turns.append(await pool.submit(Inbound("api:o", "q4")))
    outcomes = await asyncio.wait_for(asyncio.gather(*(t.outcome for t in turns)), 60)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert [o.turns for o in outcomes] == [1, 2, 3, 4, 5]
    said = [r.last_said() for r in fake_model.turn_requests()]
    assert said == [f"q{i}" for i in range(5)]


# -- 7. a CLI that dies while idle; spare refills back off ----------------------------------------


async def test_cli_killed_while_idle_is_replaced_before_the_next_message(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    pool = await make_pool()
    assert (await pool.ask(Inbound("api:k", "remember fig"))).ok
    pid = worker_pid(pool, "api:k")
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not alive(pid), what="the CLI to die")
    after = await asyncio.wait_for(pool.ask(Inbound("api:k", "still there?")), 30)
    assert after.ok, after.error
    assert "remember fig" in fake_model.find("still there?")[0].all_text()


async def test_sampler_retires_a_dead_idle_cli(make_pool: PoolFactory) -> None:
    pool = await make_pool(pool={"rss_sample_s": 0.05})
    assert (await pool.ask(Inbound("api:d", "hello"))).ok
    os.kill(worker_pid(pool, "api:d"), signal.SIGKILL)
    await wait_until(lambda: "api:d" not in pool._workers, what="the dead CLI's worker to retire")
    record = await pool.store.get("api:d")
    assert record is not None and record.evict_reason == "died"


class CountingLauncher:
    def __init__(self, inner: ClaudeLauncher) -> None:
        self.inner, self.opened = inner, 0

    def open(self, spec: SessionSpec) -> AbstractAsyncContextManager[AgentSession]:
        self.opened += 1
        return self.inner.open(spec)


async def test_failing_spare_spawns_back_off(tmp_path: Path, fake_model: FakeModel) -> None:
    settings = make_settings(tmp_path, fake_model, agent={"cli_path": Path("/bin/false")}, pool={"prewarm": 1})
    launcher = CountingLauncher(ClaudeLauncher(settings.agent))
    pool = Pool(settings, launcher, SqliteStore(tmp_path / "state.db", ttl_days=1))
    await pool.start()
    try:
        await wait_until(lambda: launcher.opened >= 2, what="a retried spare spawn")
        # A window, not an event: count how many spawns a broken CLI gets in 1.5 s.
        await asyncio.sleep(1.5)
        assert launcher.opened <= 5, f"{launcher.opened} spawn attempts in ~2 s"
    finally:
        await pool.close(grace_s=1)
        await pool.store.close()


# -- 8. a killed CLI leaves nothing behind --------------------------------------------------------


def helper_sockets(pid: int) -> list[Path]:
    args = psutil.Process(pid).cmdline()
    return [Path(a.removeprefix("UNIX-LISTEN:").split(",")[0]) for a in args if a.startswith("UNIX-LISTEN:")]


def socat_pids(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).name() == "socat":
                found.append(pid)
        except psutil.Error:
            continue
    return found


async def test_killed_cli_leaves_no_sandbox_helper(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("doomed", text="never", delay_s=10)
    pool = await make_pool(agent={"sandbox": True}, pool={"rss_sample_s": 0.05})
    assert (await pool.ask(Inbound("api:z", "remember pear"))).ok
    worker = pool._workers["api:z"]
    pid = worker_pid(pool, "api:z")
    turn = await pool.submit(Inbound("api:z", "doomed"))
    await wait_until(lambda: bool(fake_model.find("doomed")), what="the turn to reach the model")
    await wait_until(lambda: bool(socat_pids(procs.live_descendants(pid))), what="the sandbox helper")
    helpers = socat_pids(procs.live_descendants(pid))
    sockets = [s for h in helpers for s in helper_sockets(h)]
    os.kill(pid, signal.SIGKILL)
    outcome = await asyncio.wait_for(turn.outcome, 30)
    assert outcome.failure is Failure.CRASHED
    await wait_until(worker.task.done, what="the crashed worker to finish")
    for helper in helpers:
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(helper).status()  # killed and reaped, not even a zombie
    assert sockets and not any(s.exists() for s in sockets)
    after = await asyncio.wait_for(pool.ask(Inbound("api:z", "back?")), 30)
    assert after.ok and "remember pear" in fake_model.find("back?")[0].all_text()


async def test_the_replacement_spare_starts_after_the_first_reply(make_pool: PoolFactory) -> None:
    pool = await make_pool(pool={"prewarm": 1})
    await wait_until(lambda: bool(pool._spares) and pool._spares[0].state == "warm", what="the spare")
    turn = await pool.submit(Inbound("api:first", "first reply"))
    await asyncio.wait_for(turn.started.wait(), 20)
    assert pool._spares == [], "no CLI start-up competes with the adopted spare's first reply"
    assert (await turn.outcome).ok
    await wait_until(lambda: bool(pool._spares), what="the replacement spare")
