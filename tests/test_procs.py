"""Process ownership: orphans re-parented to the daemon (a subreaper) are reaped, never left as zombies."""

from __future__ import annotations

import asyncio
import subprocess

import psutil

from bot import procs
from tests.helpers import wait_until


async def test_orphans_reparented_to_us_are_reaped() -> None:
    assert procs.become_subreaper()
    # The shell exits at once; its background sleep is re-parented to us and exits soon after.
    await asyncio.to_thread(subprocess.run, ["sh", "-c", "sleep 0.2 &"], check=True)

    def orphan_zombies() -> list[psutil.Process]:
        return [p for p in psutil.Process().children() if p.name() == "sleep" and p.status() == psutil.STATUS_ZOMBIE]

    await wait_until(lambda: bool(orphan_zombies()), what="the orphan to exit")
    (zombie,) = orphan_zombies()
    assert procs.reap_orphans(own=set(), names=frozenset({"sleep"})) == [zombie.pid]
    assert not psutil.pid_exists(zombie.pid)


async def test_our_own_processes_are_left_to_their_watchers() -> None:
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    await wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="the child to exit")
    assert procs.reap_orphans(own={child.pid}, names=frozenset({"sh"})) == []
    assert child.wait() == 3, "its exit status is still there for its owner"
