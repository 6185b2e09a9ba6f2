"""Serving one turn on a live session (``TurnServer``): its prompt, its deadline, its cost and its outcome.

The worker around it owns the process and the turn's place in its life: it marks the turn begun
and ended, maps a crash or a timeout to what it means for the process, and retires it. The server
only runs the turn and says what it cost and what the sender gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, Protocol

from bot import files
from bot.config import Settings
from bot.core import AgentCrashed, AgentSession, ConversationRecord, Failure, Outcome, TurnContext, TurnDone
from bot.pool.turn import Turn, drive, finished
from bot.telemetry import Telemetry


class ServingHost(Protocol):
    settings: Settings
    data_dir: Path
    telemetry: Telemetry


class TurnServer:
    """The turns of one CLI process, one at a time; its cost counter is the CLI's, which runs for the process's life."""

    def __init__(self, host: ServingHost, profile_name: str) -> None:
        self.host, self.profile_name = host, profile_name
        self.cost_base = 0.0  # the CLI's cumulative cost at the end of the last turn
        self.last_cost = 0.0

    def trace(self, turn: Turn, started_ns: int) -> None:
        """A span for the turn once it has its outcome, whichever way it got one."""
        turn.outcome.add_done_callback(lambda done: self._record(done, turn, started_ns))

    async def run(self, session: AgentSession, turn: Turn, record: ConversationRecord) -> TurnDone:
        inbound = turn.inbound
        context = TurnContext(record.conversation_id, inbound.user, inbound.source, inbound.approver)
        prompt = prompt_for(turn, Path(record.workdir))
        async with asyncio.timeout(self.host.settings.agent.turn_timeout_s):
            return await drive(session, prompt, context, turn.deltas.put_nowait)

    def cost(self, done: TurnDone | None, log: Any) -> float:
        """The gateway's metered cost when there is one (cross-checked with the CLI's own counter), else the CLI's."""
        self.last_cost = 0.0 if done is None else self._cost(done, log)
        return self.last_cost

    def outcome(self, done: TurnDone, record: ConversationRecord, notice: str | None) -> Outcome:
        """What the sender gets: the reply (after ``notice``, if any) and the files the agent put in its outbox."""
        workdir = Path(record.workdir)
        sent = files.take_outbox(workdir, self.host.data_dir / "sent" / workdir.name)
        outcome = finished(done, record.conversation_id, self.last_cost, record.turns, sent)
        if notice is None:
            return outcome
        return dataclasses.replace(outcome, reply=f"{notice}\n\n{outcome.reply}")

    def _cost(self, done: TurnDone, log: Any) -> float:
        reported = max(done.total_cost_usd - self.cost_base, 0.0)
        self.cost_base = done.total_cost_usd
        if done.metered_usd is None:
            return reported
        if abs(done.metered_usd - reported) > max(1e-6, 0.05 * max(done.metered_usd, reported)):
            log.warning("cost_mismatch", metered_usd=round(done.metered_usd, 6), cli_usd=round(reported, 6))
        return done.metered_usd

    def _record(self, done: asyncio.Future[Outcome], turn: Turn, started_ns: int) -> None:
        if not done.cancelled():
            self.host.telemetry.record_turn(done.result(), self.profile_name, turn.inbound.source, started_ns)


def prompt_for(turn: Turn, workdir: Path) -> str:
    """The message's text, with a note naming its attachments once they are moved into the workdir's inbox."""
    if not turn.inbound.files:
        return turn.inbound.text
    placed = files.move_into_inbox(turn.inbound.files, workdir)
    return turn.inbound.text + files.attachment_note(placed)


def crash_failure(exc: AgentCrashed, memory_kill_mb: float | None, ceiling_mb: float) -> tuple[Failure, str]:
    """A crashed turn's failure: the memory kill when the sampler killed it, else a crash with its detail."""
    if memory_kill_mb is not None:
        return Failure.MEMORY, f"{memory_kill_mb:.0f} MiB > {ceiling_mb} MiB"
    return Failure.CRASHED, str(exc)[:200]
