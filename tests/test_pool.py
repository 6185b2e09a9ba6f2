from __future__ import annotations

import os
import signal

import psutil

from bot.core import Failure, Inbound
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel


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
    last = fake_model.find("hello beta")[-1]
    assert "hello alpha" in last.all_text()
