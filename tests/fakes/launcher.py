"""A launcher whose "process" answers every turn at once: the pool's own logic without a CLI.

Routing, admission, eviction, successors and the store run for real; each turn costs microseconds,
so pool tests and the eviction benchmark take milliseconds per message instead of a CLI spawn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.core import AgentSession, SessionSpec, TextDelta, TurnContext, TurnDone


class InstantSession:
    """Stands in for a CLI process: every turn answers at once, echoing its text."""

    def __init__(self, spec: SessionSpec) -> None:
        self._session_id = spec.session_id

    @property
    def pid(self) -> int | None:
        return None

    async def turn(self, text: str, context: TurnContext) -> AsyncIterator[TextDelta | TurnDone]:
        yield TurnDone(reply=text, session_id=self._session_id, total_cost_usd=0.0, error=None, interrupted=False)

    async def interrupt(self) -> None:
        return None

    async def preheat(self) -> str | None:
        return None


class InstantLauncher:
    def __init__(self) -> None:
        self.opened = 0

    @asynccontextmanager
    async def open(self, spec: SessionSpec) -> AsyncIterator[AgentSession]:
        self.opened += 1
        # Like the CLI, keep a transcript, so a successor finds its session to resume.
        transcript = spec.config_dir / "projects" / "bench" / f"{spec.session_id}.jsonl"
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.touch()
        yield InstantSession(spec)
