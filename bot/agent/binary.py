"""Which Claude Code CLI the launcher runs, and its version: what ``agentd doctor`` reports."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import claude_agent_sdk

from bot.config import AgentConfig
from bot.probe import ProbeFailed

# Runs the CLI under ``setpriv --pdeathsig TERM`` (util-linux), the real path in $AGENTD_REAL_CLI.
DIE_WITH_PARENT = Path(__file__).with_name("die-with-parent")


@dataclass(frozen=True)
class CliBinary:
    path: Path
    version: str
    bundled: bool


def bundled_cli() -> Path:
    """Where claude-agent-sdk's wheel ships its CLI; the SDK runs it unless ``agent.cli_path`` is set."""
    return Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"


def cli_path(config: AgentConfig) -> Path | None:
    """The SDK's own order: the configured path, the bundled binary, then ``claude`` on PATH."""
    if config.cli_path is not None:
        return config.cli_path
    if bundled_cli().is_file():
        return bundled_cli()
    found = shutil.which("claude")
    return Path(found) if found else None


def launch(config: AgentConfig) -> tuple[Path | None, dict[str, str]]:
    """The ``cli_path`` for the SDK and the variables it needs: the CLI dies with the daemon where setpriv exists.

    The SDK spawns the CLI itself (no preexec hook), so a tiny launcher sets the parent-death signal and
    execs it. The signal fires when the forking thread ends: the event loop's, which lives as long as the daemon.
    """
    real = cli_path(config)
    if real is None or shutil.which("setpriv") is None:
        return config.cli_path, {}
    return DIE_WITH_PARENT, {"AGENTD_REAL_CLI": str(real)}


async def probe_cli(config: AgentConfig, timeout_s: float) -> CliBinary:
    """The CLI that would run, and what ``--version`` says; ProbeFailed if it is missing or does not run."""
    path = cli_path(config)
    if path is None or not path.is_file():
        where = f"agent.cli_path {path}" if config.cli_path else "the bundled CLI"
        raise ProbeFailed(
            f"{where} not found",
            "reinstall claude-agent-sdk (its wheel bundles the CLI) or point agent.cli_path at a claude binary",
        )
    version = await _version(path, timeout_s)
    return CliBinary(path, version, bundled=path == bundled_cli())


async def _version(path: Path, timeout_s: float) -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            str(path), "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        raise ProbeFailed(f"{path} does not run: {exc.strerror}", "make it executable, or reinstall it") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        raise ProbeFailed(f"{path} --version gave no answer in {timeout_s:g} s", "reinstall the CLI") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        raise ProbeFailed(f"{path} --version failed: {text[:200]}", "reinstall the CLI")
    return text.splitlines()[0][:100] if text else "unknown version"
