"""End to end: the real ``agentd run`` process, its signals, its environment, its restarts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.daemon_proc import SECRETS, DaemonProcess
from tests.fakes.model import FakeModel, ToolUse
from tests.fakes.redis_server import RedisServer
from tests.helpers import wait_until


@pytest.fixture
async def daemon(tmp_path: Path, fake_model: FakeModel) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, fake_model.url)
    yield proc
    proc.kill()


async def run_cli(daemon: DaemonProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bot.cli", "--config", str(daemon.config), *args]
    return await asyncio.to_thread(
        subprocess.run, command, input=stdin, env=daemon.env, capture_output=True, text=True, timeout=60
    )


def cli_descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


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
    assert "agent> here is the streamed story" in result.stdout
    assert "agent> echo: second line" in result.stdout
    assert "turn 2" in result.stdout
