"""End to end: the real ``agentd run`` process, its signals, its environment, its restarts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.fakes.model import FakeModel, ToolUse
from tests.fakes.redis_server import RedisServer
from tests.support.daemon_proc import SECRETS, DaemonProcess
from tests.support.helpers import gone, wait_for, wait_until


@pytest.fixture
async def daemon(tmp_path: Path, fake_model: FakeModel) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, fake_model.url)
    yield proc
    proc.kill()


async def run_cli(daemon: DaemonProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bot.app.cli", "--config", str(daemon.config), *args]
    return await asyncio.to_thread(
        subprocess.run, command, input=stdin, env=daemon.env, capture_output=True, text=True, timeout=60
    )


def cli_descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


async def readyz_is(daemon: DaemonProcess, status: int) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/readyz") as response:
        return response.status == status


async def slow_turn_running(
    daemon: DaemonProcess, fake_model: FakeModel
) -> tuple[asyncio.Task[object], list[psutil.Process]]:
    """A turn the fake model holds for 30 s, and the daemon's process tree while it runs."""
    fake_model.add("slow", text="never sent", delay_s=30)
    in_flight: asyncio.Task[object] = asyncio.create_task(daemon.ask("slow", "slow"))
    await wait_until(lambda: bool(fake_model.find("slow")), what="the slow turn to reach the model")
    assert daemon.process is not None
    children = cli_descendants(daemon.process.pid)
    assert any(p.name() == "claude" for p in children)
    return in_flight, children


async def dropped(in_flight: asyncio.Task[object]) -> None:
    """The in-flight request of a daemon that was killed: its connection just ends."""
    with contextlib.suppress(aiohttp.ClientError):
        await in_flight


async def test_agent_environment_holds_no_daemon_secrets(
    tmp_path: Path, fake_model: FakeModel, redis_server: RedisServer
) -> None:
    proc = DaemonProcess(tmp_path, fake_model.url, extra_env={"REDIS_URL": redis_server.url})
    fake_model.add("show env", tool=ToolUse("Bash", {"command": "env", "description": "print environment"}))
    await proc.start()
    try:
        reply = await proc.ask("env", "show env")
        assert "error" not in reply, reply
    finally:
        await proc.stop()
    results = [
        str(b.get("content"))
        for r in fake_model.turn_requests()
        for b in r.last_user_blocks()
        if b.get("type") == "tool_result"
    ]
    assert results and "PATH=" in results[0]
    dumped = "\n".join(results)
    for name, value in {**SECRETS, "REDIS_URL": redis_server.url}.items():
        assert name not in dumped and value not in dumped
    assert redis_server.password not in dumped and "sk-test-anthropic-key" not in dumped


async def test_sigterm_drains_and_leaves_no_orphans(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    fake_model.add("slowish", text="finished in time", delay_s=1.0)
    await daemon.start()
    assert (await daemon.ask("one", "hi"))["reply"] == "echo: hi"
    assert daemon.process is not None
    in_flight = asyncio.create_task(daemon.ask("two", "slowish"))
    await wait_until(lambda: bool(fake_model.find("slowish")), what="the slow turn to reach the model")
    children = cli_descendants(daemon.process.pid)
    assert children
    assert await daemon.stop() == 0
    assert (await in_flight)["reply"] == "finished in time"
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


async def test_restart_resumes_conversation(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    await daemon.start()
    first = await daemon.ask("keep", "remember the word heliotrope")
    await daemon.stop()
    await daemon.start()
    second = await daemon.ask("keep", "what was the word")
    await daemon.stop()
    assert second["session_id"] == first["session_id"] and second["turns"] == 2
    assert "heliotrope" in fake_model.find("what was the word")[-1].all_text()


async def test_sessions_command_prints_table(daemon: DaemonProcess) -> None:
    await daemon.start()
    await daemon.ask("tbl", "hello")
    result = await run_cli(daemon, "sessions")
    await daemon.stop()
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:3] == ["CONVERSATION", "SESSION", "STATE"]
    assert row.startswith("api:tbl") and " warm " in row


async def test_chat_command_streams_replies(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    fake_model.add("tell me", text="here is the streamed story")
    await daemon.start()
    result = await run_cli(daemon, "chat", "term", stdin="tell me\nsecond line\n")
    await daemon.stop()
    assert result.returncode == 0, result.stderr
    # Piped stdin: no prompts, each answer alone on its line (a terminal gets "you> " and "agent> ").
    assert result.stdout.splitlines() == ["here is the streamed story", "echo: second line"]


async def test_second_sigterm_forces_exit_and_kills_the_cli_trees(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    await daemon.start()
    in_flight, children = await slow_turn_running(daemon, fake_model)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: readyz_is(daemon, 503), what="the daemon to drain")
    assert daemon.process.poll() is None, "the first signal drains, it does not exit"
    forced_at = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.process.wait, 10)
    assert code == 1 and time.monotonic() - forced_at < 3
    await wait_until(lambda: all(gone(p) for p in children), 5, "the CLI process trees to die")
    assert '"reason": "second_signal"' in daemon.log.read_text()
    await dropped(in_flight)


async def test_shutdown_deadline_kills_the_cli_trees_when_a_cleanup_hangs(
    tmp_path: Path, fake_model: FakeModel
) -> None:
    # A pool close that never returns; drain grace 1 s + the stuck daemon's 2 s margin = a 3 s budget.
    daemon = DaemonProcess(tmp_path, fake_model.url, http_toml="drain_grace_s = 1", module="tests.support.stuck_daemon")
    await daemon.start()
    in_flight, children = await slow_turn_running(daemon, fake_model)
    assert daemon.process is not None
    stopped_at = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.process.wait, 20)
    elapsed = time.monotonic() - stopped_at
    assert code == 1 and 2.5 < elapsed < 6, elapsed
    await wait_until(lambda: all(gone(p) for p in children), 5, "the CLI process trees to die")
    assert '"reason": "shutdown_deadline"' in daemon.log.read_text()
    await dropped(in_flight)


async def test_kill_takes_the_cli_processes_with_it(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    await daemon.start()
    in_flight, children = await slow_turn_running(daemon, fake_model)
    daemon.kill()
    assert all(gone(p) for p in children)
    await dropped(in_flight)
