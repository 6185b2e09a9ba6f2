"""`agentd --help` imports nothing heavy; the commands that only talk HTTP to a daemon import no engine."""

from __future__ import annotations

import subprocess
import sys

from tests.support import paths

ENGINE = (
    "claude_agent_sdk",
    "mcp",
    "slack_bolt",
    "slack_sdk",
    "aioimaplib",
    "aiosmtplib",
    "bot.app.daemon",
    "bot.app.wiring",
    "bot.pool",
)
# Not the engine, but each costs more start-up than the command's own work: none for --help, and the
# one-request commands use the stdlib's HTTP client.
HEAVY = ("aiohttp", "pydantic", "bot.config", "structlog")

PROBE = """
import sys
from bot.app import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", *sorted(m for m in {engine!r} if m in sys.modules))
"""


def loaded_after(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(engine=ENGINE + HEAVY), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=paths.ROOT,
        env={"PATH": "/usr/bin:/bin", "ANTHROPIC_API_KEY": "sk-x"},
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOADED"))
    return line.split()[1:]


def test_help_imports_no_engine() -> None:
    assert loaded_after("--help") == []


def test_sessions_against_a_daemon_imports_no_engine() -> None:
    # Nothing listens on port 9: the command fails to connect, as a client, without the engine.
    assert loaded_after("sessions", "--url", "http://127.0.0.1:9") == ["bot.config", "pydantic", "structlog"]
