"""Two replicas on one Redis and one inbox: one reads it at a time, each mail is answered once, and a
SIGKILLed reader's duty moves to the other within the lease, which answers what came in meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.fakes.mailserver import PASSWORD, MailServer, message
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_for
from tests.support.mail_harness import email_toml, replies, wait_replies

LEASE_TTL_S = 3


def replica(tmp_path: Path, name: str, model: FakeModel, mail: MailServer, redis_url: str) -> DaemonProcess:
    home = tmp_path / name
    home.mkdir()
    cluster = f'[cluster]\nreplica = "{name}"\nlease_ttl_s = {LEASE_TTL_S}\n'
    env = {"IMAP_PASSWORD": PASSWORD, "REDIS_URL": redis_url}
    return DaemonProcess(home, model.url, env, toml=email_toml(mail) + cluster)


async def email_status(daemon: DaemonProcess) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers=daemon.headers) as http,
        http.get(f"{daemon.url}/v1/status") as response,
    ):
        snapshot = await response.json()
    return next(c for c in snapshot["channels"] if c["name"] == "email")


async def reader_of(one: DaemonProcess, two: DaemonProcess) -> tuple[DaemonProcess, DaemonProcess]:
    """(the replica reading the inbox, the one standing by), once each says so."""
    found: list[DaemonProcess] = []

    async def settled() -> bool:
        first, second = await email_status(one), await email_status(two)
        found[:] = [one, two] if first["connected"] and second["standby"] else []
        found[:] = found or ([two, one] if second["connected"] and first["standby"] else [])
        return bool(found)

    await wait_for(settled, 30, "one replica to read the inbox and the other to stand by")
    return found[0], found[1]


async def test_one_replica_reads_the_inbox_and_another_takes_over_when_it_is_killed(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer, own_redis: RedisServer
) -> None:
    one = replica(tmp_path, "replica-a", fake_model, mail, own_redis.url)
    two = replica(tmp_path, "replica-b", fake_model, mail, own_redis.url)
    await one.start()
    await two.start()
    try:
        reader, standby = await reader_of(one, two)
        for n in range(3):
            mail.deliver(message(f"question {n}", f"Both replicas see question {n}."))
        await wait_replies(mail, 3)
        reader.kill()  # SIGKILL: no release; the lease runs out and the standby takes the inbox over
        mail.deliver(message("in the gap", "Sent while no replica reads the inbox."))
        await wait_replies(mail, 4, timeout=40 + LEASE_TTL_S)
        status = await email_status(standby)
        assert status["connected"] and not status["standby"]
    finally:
        for daemon in (one, two):
            if daemon.process is not None and daemon.process.poll() is None:
                await daemon.stop()
    subjects = sorted(str(r["Subject"]) for r in replies(mail))
    assert subjects == ["Re: in the gap", "Re: question 0", "Re: question 1", "Re: question 2"], "each answered once"
    for n in range(3):
        assert len(fake_model.find(f"Both replicas see question {n}.")) == 1, "one turn per mail"
    assert len(fake_model.find("Sent while no replica reads the inbox.")) == 1
