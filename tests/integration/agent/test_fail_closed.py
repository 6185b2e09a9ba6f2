"""The sandbox fails closed, and the daemon's secrets are in no process environment an agent can read.

Real ``agentd run`` / ``agentd once`` processes: without bubblewrap on PATH a profile that offers
Bash refuses to start; with ``sandbox = false`` (an explicit opt-in) the daemon re-executes itself
with its secrets on a descriptor, so ``/proc/<daemon>/environ`` and every child's hold none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bot.app import handover
from tests.fakes.model import FakeModel, ToolUse
from tests.support import paths
from tests.support.daemon_proc import SECRETS, DaemonProcess

SECRET_VALUES = [*SECRETS.values(), "sk-test-anthropic-key"]


def agentd(args: list[str], config: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "ANTHROPIC_API_KEY": "sk-x", **env}
    return subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "--config", str(config), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=paths.ROOT,
    )


@pytest.mark.parametrize("command", [["run"], ["once", "--prompt", "hello"]])
def test_no_bubblewrap_on_path_is_a_refusal(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n')
    empty = tmp_path / "bin"
    empty.mkdir()
    done = agentd(command, config, path=str(empty))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "offers Bash, but its sandbox cannot run: bwrap and socat not found on PATH" in lines[0]
    assert "apt-get install bubblewrap socat" in lines[0] and "sandbox = false" in lines[0]


def test_an_explicit_sandbox_false_starts_without_bubblewrap(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n[agent]\nsandbox = false\n')
    done = agentd(["config"], config, path=str(tmp_path))
    assert done.returncode == 0 and '"sandbox": false' in done.stdout


def environ_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


async def test_unsandboxed_secrets_are_in_no_process_environment(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("look around", tool=ToolUse("Bash", {"command": "cat /proc/$PPID/environ | tr '\\0' '\\n'"}))
    daemon = DaemonProcess(tmp_path, fake_model.url, toml="sandbox = false\n")
    await daemon.start()
    try:
        assert daemon.process is not None
        daemon_pid = daemon.process.pid
        assert not [v for v in SECRET_VALUES if v in environ_of(daemon_pid)], "a secret in /proc/<daemon>/environ"
        # What is left of the handover is a descriptor number, closed once read.
        handed = f"{handover.HANDOVER_VARIABLE}="
        fd = environ_of(daemon_pid).split(handed, 1)[1].split("\0", 1)[0]
        assert not Path(f"/proc/{daemon_pid}/fd/{fd}").exists() or "memfd" not in os.readlink(
            f"/proc/{daemon_pid}/fd/{fd}"
        )
        reply = await daemon.ask("fail-closed", "look around")
        assert reply.get("failure") is None, reply
        children = psutil.Process(daemon_pid).children(recursive=True)
        assert children, "the CLI is running"
        for child in children:
            seen = environ_of(child.pid)
            assert not [v for v in SECRET_VALUES if v in seen], f"a secret in /proc/{child.pid}/environ"
        read = fake_model.tool_results()
        assert not [v for v in SECRET_VALUES if v in read], "the agent's Bash read a secret"
        # The config file holds no secret here, but it stays out of the file tools' reach.
        fake_model.add("read config", tool=ToolUse("Read", {"file_path": str(daemon.config)}))
        await daemon.ask("fail-closed", "read config")
        assert "[store]" not in fake_model.tool_results()
    finally:
        await daemon.stop()
