"""Process ownership: orphans re-parented to the daemon (a subreaper) are reaped, never left as zombies."""

from __future__ import annotations

import asyncio
import subprocess

import psutil
import pytest

from bot import procs
from tests.support.helpers import wait_until


async def test_orphans_reparented_to_us_are_reaped() -> None:
    assert procs.become_subreaper()
    # The shell exits at once; its background sleep is re-parented to us and exits soon after.
    await asyncio.to_thread(subprocess.run, ["sh", "-c", "sleep 0.2 &"], check=True)

    def orphan_zombies() -> list[psutil.Process]:
        return [p for p in psutil.Process().children() if p.name() == "sleep" and p.status() == psutil.STATUS_ZOMBIE]

    await wait_until(lambda: bool(orphan_zombies()), what="the orphan to exit")
    (zombie,) = orphan_zombies()
    assert procs.reap_orphans(own=set(), names=frozenset({"sleep"}), snapshot=procs.Snapshot.take()) == [zombie.pid]
    assert not psutil.pid_exists(zombie.pid)


async def test_one_snapshot_gives_each_tree_its_members_and_rss() -> None:
    # A shell with two children, a sleep and a shell with a sleep of its own: three descendants.
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"])
    try:
        await wait_until(lambda: len(psutil.Process(parent.pid).children(recursive=True)) == 3, what="the tree")
        snapshot = procs.Snapshot.take()
        expected = psutil.Process(parent.pid).children(recursive=True)
        assert sorted(snapshot.descendants(parent.pid)) == sorted(p.pid for p in expected)
        rss = sum(p.memory_info().rss for p in [psutil.Process(parent.pid), *expected]) / procs.MIB
        assert snapshot.tree_rss_mb(parent.pid) == pytest.approx(rss, rel=0.05)  # sleeping: all but constant
        assert snapshot.tree_rss_mb(2**22 + 1) is None  # above pid_max: never a process
    finally:
        members = [parent.pid, *(p.pid for p in psutil.Process(parent.pid).children(recursive=True))]
        procs.kill_tree(parent.pid)
        parent.wait()
        # Its children were re-parented to us (a subreaper) as zombies: reaped, not left to the next test.
        orphans = frozenset({"sh", "sleep"})
        await wait_until(
            lambda: (procs.reap_orphans(set(), orphans), not any(map(psutil.pid_exists, members)))[1],
            what="the killed tree to be reaped",
        )


async def test_our_own_processes_are_left_to_their_watchers() -> None:
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    await wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="the child to exit")
    assert procs.reap_orphans(own={child.pid}, names=frozenset({"sh"})) == []
    assert child.wait() == 3, "its exit status is still there for its owner"
