"""One turn per Idempotency-Key: an API message with a key is accepted durably, run once, and its outcome kept.

A client whose connection broke (the daemon restarted, a proxy timed out) sends the same message with
the same key again and gets the recorded outcome, or waits on the turn still running: never a second
turn. What was accepted and has no outcome when the daemon stops (it crashed, or stopped before the
turn ran) is run again at the next start, so the retry still gets an answer. A message that was
refused before it ran (busy, over a limit, out of budget) keeps nothing: its retry is a new attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bot.core import Conversations, Failure, Inbound, Intake, IntakeEntry, Outcome, StoreError

log = structlog.get_logger(__name__)

# Refused before the turn ran: nothing is kept, so a retry (after the limit clears) runs it.
NOT_RUN = frozenset({Failure.BUSY, Failure.QUEUE_FULL, Failure.POOL_BUSY, Failure.USER_LIMIT, Failure.BUDGET})
# The daemon stopped before the turn ended: kept as accepted, so the next start runs it again.
UNFINISHED = frozenset({Failure.SHUTDOWN})
API_PREFIX = "api:"


class KeyReused(Exception):
    """The key was first sent with another message; the message says so (answered as 422)."""


@dataclass(frozen=True)
class Receipt:
    """What a keyed message got: the turn this call started (to stream), or an earlier call's.

    ``outcome`` resolves to the message's one outcome; None means another process holds the message
    (it was accepted by a daemon that has not recorded it yet): look it up later.
    """

    deltas: AsyncIterator[str] | None  # the reply as it streams; a retry waits on the outcome alone
    outcome: asyncio.Future[Outcome] | None


@dataclass
class _Running:
    fingerprint: str
    outcome: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Receipts:
    """Keyed API messages over the durable intake (``bot.core.Intake``) and the conversations."""

    def __init__(self, intake: Intake, conversations: Conversations) -> None:
        self._intake, self._conversations = intake, conversations
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, inbound: Inbound, key: str) -> Receipt:
        """Run ``inbound`` once for ``key``; a retry with the same key and text gets the same outcome."""
        intake_key = intake_key_of(inbound.conversation_id, key)
        fingerprint = fingerprint_of(inbound)
        if (running := self._running.get(intake_key)) is not None:
            if fingerprint != running.fingerprint:
                raise KeyReused(_REUSED)
            return Receipt(None, asyncio.shield(running.outcome))
        # Held before the first await, so a retry racing this call waits on it rather than starting one.
        running = self._running[intake_key] = _Running(fingerprint)
        try:
            entry = IntakeEntry(intake_key, inbound.conversation_id, _payload(inbound, fingerprint), time.time())
            if not await self._intake.accept(entry):
                return await self._earlier(intake_key, running)
            turn = await self._conversations.submit(inbound)
        except BaseException:
            self._running.pop(intake_key, None)
            raise
        self._keep(intake_key, running, turn.outcome)
        return Receipt(turn.stream(), asyncio.shield(running.outcome))

    async def lookup(self, conversation_id: str, key: str) -> Receipt | None:
        """The keyed message's outcome (recorded, or the running turn's); None if the key is unknown."""
        intake_key = intake_key_of(conversation_id, key)
        if (running := self._running.get(intake_key)) is not None:
            return Receipt(None, asyncio.shield(running.outcome))
        recorded = await self._intake.outcome(intake_key)
        if recorded is not None:
            return Receipt(None, _done(outcome_from_json(json.loads(recorded.outcome)["outcome"])))
        if await self._intake.pending(intake_key):
            return Receipt(None, None)
        return None

    async def replay(self) -> int:
        """At start: run again every keyed message accepted and never finished (a crash, a restart)."""
        replayed = 0
        for entry in await self._intake.unfinished():
            if not entry.key.startswith(API_PREFIX) or entry.key in self._running:
                continue
            inbound, fingerprint = _inbound_of(entry)
            running = self._running[entry.key] = _Running(fingerprint)
            turn = await self._conversations.submit(inbound)
            self._keep(entry.key, running, turn.outcome)
            replayed += 1
        if replayed:
            log.info("api_messages_replayed", count=replayed)
        return replayed

    async def close(self) -> None:
        """After the pool closed (every outcome is known): let the last outcomes be recorded."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _earlier(self, intake_key: str, running: _Running) -> Receipt:
        """Accepted before (by a call that is gone, or another process): its outcome, or None for later."""
        self._running.pop(intake_key, None)
        recorded = await self._intake.outcome(intake_key)
        if recorded is None:
            return Receipt(None, None)
        kept = json.loads(recorded.outcome)
        if kept["fingerprint"] != running.fingerprint:
            raise KeyReused(_REUSED)
        return Receipt(None, _done(outcome_from_json(kept["outcome"])))

    def _keep(self, intake_key: str, running: _Running, outcome: Awaitable[Outcome]) -> None:
        task = asyncio.create_task(self._record(intake_key, running, outcome), name=f"receipt {intake_key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, intake_key: str, running: _Running, pending: Awaitable[Outcome]) -> None:
        """A task boundary: whatever happens here, the waiting calls get the outcome."""
        outcome: Outcome | None = None
        try:
            outcome = await pending
            await self._settle(intake_key, running.fingerprint, outcome)
        except StoreError as exc:
            # The client still gets its answer; a retry after a restart may run the message again.
            log.error("api_outcome_not_recorded", key=intake_key, error=str(exc))
        except Exception:  # a task boundary: log it, and still answer the waiting calls
            log.exception("api_outcome_not_recorded", key=intake_key)
        finally:
            self._running.pop(intake_key, None)
            if not running.outcome.done():
                if outcome is not None:
                    running.outcome.set_result(outcome)
                else:
                    running.outcome.set_exception(StoreError("the message's turn ended without an outcome"))

    async def _settle(self, intake_key: str, fingerprint: str, outcome: Outcome) -> None:
        if outcome.failure in UNFINISHED:
            return
        if outcome.failure in NOT_RUN:
            await self._intake.forget(intake_key)
            return
        kept = {"fingerprint": fingerprint, "outcome": outcome_to_json(outcome)}
        await self._intake.record(intake_key, json.dumps(kept))


_REUSED = "this Idempotency-Key was first sent with another message: use a new key for a new message"


def intake_key_of(conversation_id: str, key: str) -> str:
    # The conversation id is the API's ("api:<id>"), so keys of two conversations never meet.
    return f"{conversation_id}/{key}"


def fingerprint_of(inbound: Inbound) -> str:
    return hashlib.sha256(inbound.text.encode()).hexdigest()


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "conversation_id": outcome.conversation_id,
        "reply": outcome.reply,
        "session_id": outcome.session_id,
        "cost_usd": outcome.cost_usd,
        "turns": outcome.turns,
        "failure": None if outcome.failure is None else str(outcome.failure),
        "error": outcome.error,
        "files": [str(path) for path in outcome.files],
    }


def outcome_from_json(data: dict[str, Any]) -> Outcome:
    return Outcome(
        conversation_id=str(data["conversation_id"]),
        reply=str(data["reply"]),
        session_id=data["session_id"],
        cost_usd=float(data["cost_usd"]),
        turns=int(data["turns"]),
        failure=None if data["failure"] is None else Failure(data["failure"]),
        error=data["error"],
        files=tuple(Path(path) for path in data["files"]),
    )


def _payload(inbound: Inbound, fingerprint: str) -> str:
    # What a replay needs: an API message has no files, approver or profile of its own.
    return json.dumps(
        {"text": inbound.text, "user": inbound.user, "source": inbound.source, "fingerprint": fingerprint}
    )


def _inbound_of(entry: IntakeEntry) -> tuple[Inbound, str]:
    data = json.loads(entry.payload)
    inbound = Inbound(entry.conversation_id, str(data["text"]), source=str(data["source"]), user=str(data["user"]))
    return inbound, str(data["fingerprint"])


def _done(outcome: Outcome) -> asyncio.Future[Outcome]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future
