"""Spares must not slow live turns: a starting spare waits to start, or stands still, while a turn runs."""

from __future__ import annotations

import asyncio
import contextlib

import psutil

from bot.core import Failure, Inbound
from bot.pool import Pool, Turn, Worker
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.support.helpers import gone, wait_until


def spare_cli(spare: Worker) -> psutil.Process | None:
    """The spare's CLI, found before the SDK names its pid: the daemon's child with its config dir."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.environ().get("CLAUDE_CONFIG_DIR") == spare.record.config_dir:
                return child
    return None


def is_stopped(spare: Worker) -> bool:
    cli = spare_cli(spare)
    with contextlib.suppress(psutil.Error):
        return cli is not None and cli.status() == psutil.STATUS_STOPPED
    return False


def spare_ready(pool: Pool) -> bool:
    return bool(pool._spares) and all(s.state == "warm" and s.preheated for s in pool._spares)


async def long_turn(pool: Pool, fake_model: FakeModel) -> Turn:
    """A turn of ``api:a`` the model answers only after a minute (the tests interrupt it), once it runs."""
    fake_model.add("long turn", text="long answer", delay_s=60)
    asked = asyncio.Event()
    fake_model.on_request = lambda r: asked.set() if "long turn" in r.last_said() else None
    turn = await pool.submit(Inbound("api:a", "long turn"))
    await asyncio.wait_for(asked.wait(), 20)
    return turn


async def refill(pool: Pool, launched: bool = False) -> Worker:
    """``api:b`` adopts the spare; its replacement, once created (and, if ``launched``, once its CLI runs)."""
    assert (await pool.ask(Inbound("api:b", "adopts the spare"))).ok
    await wait_until(lambda: bool(pool._spares), 20, "the refill after api:b")
    (spare,) = pool._spares
    if launched:
        await wait_until(lambda: spare_cli(spare) is not None, 20, "the refill's CLI")
    return spare


async def warm_with_spare(make_pool: PoolFactory, **pool: object) -> Pool:
    made = await make_pool(pool={"prewarm": 1, **pool})
    await made.ask(Inbound("api:a", "first"))
    await wait_until(lambda: spare_ready(made), 30, "the refill after api:a")
    return made


async def test_a_refill_waits_to_start_while_a_turn_runs(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await warm_with_spare(make_pool)
    long = await long_turn(pool, fake_model)
    spare = await refill(pool)
    await wait_until(lambda: spare.pacing.pause.stopped, 20, "the refill to wait")
    assert spare_cli(spare) is None and spare.state == "starting"
    assert await pool.cancel("api:a")  # the turn ends: the spare starts
    assert (await asyncio.wait_for(long.outcome, 20)).failure is Failure.INTERRUPTED
    await wait_until(lambda: spare.state == "warm", 30, "the refill to connect once no turn runs")
    assert (await pool.ask(Inbound("api:c", "takes the refill"))).ok
    assert pool._workers["api:c"] is spare


async def test_a_starting_spare_stands_still_while_a_turn_runs(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await warm_with_spare(make_pool)
    spare = await refill(pool, launched=True)
    long = await long_turn(pool, fake_model)
    await wait_until(lambda: is_stopped(spare), 20, "the refill's CLI to be stopped")
    assert spare.state == "starting" and not long.outcome.done()
    assert await pool.cancel("api:a")
    await wait_until(lambda: spare.state == "warm", 30, "the refill to go on once no turn runs")


async def test_a_stopped_spare_goes_on_when_adopted(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await warm_with_spare(make_pool)
    spare = await refill(pool, launched=True)
    long = await long_turn(pool, fake_model)
    await wait_until(lambda: is_stopped(spare), 20, "the refill's CLI to be stopped")
    adopted = await asyncio.wait_for(pool.ask(Inbound("api:c", "cannot wait")), 30)
    assert adopted.ok and pool._workers["api:c"] is spare
    assert not long.outcome.done(), "answered while the other turn still runs"
    await pool.cancel("api:a")


async def test_a_spare_waits_only_so_long(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await warm_with_spare(make_pool, spare_pause_max_s=0.5)
    long = await long_turn(pool, fake_model)
    spare = await refill(pool)
    await wait_until(lambda: spare.state == "warm", 30, "the refill to connect despite the running turn")
    assert not long.outcome.done() and spare.pacing.pause.stopped_s() >= 0.5
    await pool.cancel("api:a")


async def test_close_continues_a_stopped_spare_and_ends_it(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await warm_with_spare(make_pool)
    spare = await refill(pool, launched=True)
    long = await long_turn(pool, fake_model)
    await wait_until(lambda: is_stopped(spare), 20, "the refill's CLI to be stopped")
    cli = spare_cli(spare)
    assert cli is not None
    await asyncio.wait_for(pool.close(grace_s=1), 30)
    assert long.outcome.done() and gone(cli)
