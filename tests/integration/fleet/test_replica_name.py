"""One running daemon per replica name: a second one under the same name is refused, and a SIGKILLed
daemon's name is taken over once its hold lapses (real redis-server, real `agentd run`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as redis

from bot.fleet.lease import Leases
from bot.fleet.name import ReplicaName, ReplicaNameTaken
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer
from tests.support import paths
from tests.support.daemon_proc import DaemonProcess


def named(tmp_path: Path, model: FakeModel, redis_url: str, replica: str) -> DaemonProcess:
    home = tmp_path / uuid.uuid4().hex[:8]
    home.mkdir()
    toml = f'[cluster]\nreplica = "{replica}"\nlease_ttl_s = 1\n'
    return DaemonProcess(home, model.url, {"REDIS_URL": redis_url}, toml=toml)


async def test_a_second_daemon_under_a_running_ones_name_is_refused(
    tmp_path: Path, fake_model: FakeModel, redis_server: RedisServer
) -> None:
    replica = f"twin-{uuid.uuid4().hex[:6]}"
    first = named(tmp_path, fake_model, redis_server.url, replica)
    await first.start()
    try:
        twin = named(tmp_path, fake_model, redis_server.url, replica)
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bot.app.cli", "--config", str(twin.config), "run"],
            env=twin.env,
            cwd=paths.ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert await first.stop() == 0
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"agentd: cluster.replica '{replica}' is in use by another running agentd ({replica}#")
    assert last.endswith("give each replica its own name (the default is the hostname)")
    after_stop = named(tmp_path, fake_model, redis_server.url, replica)
    await after_stop.start()  # a stopped daemon let its name go at once
    assert await after_stop.stop() == 0


async def test_a_killed_daemons_name_is_taken_once_its_hold_lapses(client: redis.Redis) -> None:
    replica = f"phoenix-{uuid.uuid4().hex[:6]}"
    dead = Leases(client, f"{replica}#dead", 1)
    assert await dead.acquire(f"replica:{replica}")  # held by a daemon that was SIGKILLed: never renewed
    successor = ReplicaName(client, replica, 1)
    await successor.take()
    await successor.release()
    alive = ReplicaName(client, replica, 1)
    await alive.take()
    try:
        with pytest.raises(ReplicaNameTaken):
            await ReplicaName(client, replica, 1).take()
    finally:
        await alive.release()
