"""One `agentd run` per data directory: a second one is refused with one line, and a SIGKILLed one's
directory is free at once (the lock goes with the process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.fakes.model import FakeModel
from tests.support import paths
from tests.support.daemon_proc import DaemonProcess


def second_run(tmp_path: Path, fake_model: FakeModel) -> subprocess.CompletedProcess[str]:
    """`agentd run` on the same data dir (and its own HTTP port), to its exit."""
    other = DaemonProcess(tmp_path, fake_model.url)
    return subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "--config", str(other.config), "run"],
        env=other.env,
        cwd=paths.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_second_daemon_on_one_data_dir_is_refused_and_a_killed_ones_dir_is_free(
    tmp_path: Path, fake_model: FakeModel
) -> None:
    first = DaemonProcess(tmp_path, fake_model.url)
    await first.start()
    assert first.process is not None
    refused = second_run(tmp_path, fake_model)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (
        f"agentd: data_dir {first.data_dir} is in use by another agentd run (pid {first.process.pid}): "
        "one daemon per data directory; replicas each need their own data_dir and share one Redis"
    )
    async with aiohttp.ClientSession() as http, http.get(f"{first.url}/readyz") as response:
        assert response.status == 200, "the first daemon goes on serving"
    first.kill()
    after_kill = DaemonProcess(tmp_path, fake_model.url)
    await after_kill.start()
    assert await after_kill.stop() == 0
