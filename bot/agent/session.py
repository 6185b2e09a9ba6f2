"""The live ``AgentSession``: one connected ``ClaudeSDKClient``, its turns, its interrupt and its end.

``connect`` starts the CLI and disconnects it when the context is left; the
caller enters and leaves it in one task and is the only one reading turns (the
SDK requires both).  A turn stamps the turn's policy on the gate, opens the
turn at the gateway's meter, sends the text verbatim and reads the CLI's
messages until its result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    MirrorErrorMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
)

from bot.agent.gate import ToolGate
from bot.agent.transcripts import Transcripts
from bot.core import AgentCrashed, AgentError, BudgetStop, Meter, TextDelta, TurnContext, TurnDone


@asynccontextmanager
async def connect(
    options: ClaudeAgentOptions, gate: ToolGate, meter: Metered | None, mirror: MirrorWatch | None
) -> AsyncIterator[ClaudeSession]:
    """A connected session; leaving the context disconnects the CLI."""
    client = ClaudeSDKClient(options)
    try:
        await client.connect()
    except ClaudeSDKError as exc:
        await client.disconnect()
        raise AgentError(f"could not start the agent: {exc}") from exc
    try:
        yield ClaudeSession(client, gate, meter, mirror)
    finally:
        await client.disconnect()


class ClaudeSession:
    def __init__(
        self, client: ClaudeSDKClient, gate: ToolGate, meter: Metered | None, mirror: MirrorWatch | None = None
    ) -> None:
        self._client = client
        self._gate = gate
        self._meter = meter
        self._mirror = mirror

    @property
    def pid(self) -> int | None:
        return cli_pid(self._client)

    async def interrupt(self) -> None:
        await self._client.interrupt()

    async def turn(self, text: str, context: TurnContext) -> AsyncIterator[TextDelta | TurnDone]:
        self._gate.policy = self._gate.for_turn(context.approver)
        if self._meter is not None:
            self._meter.begin(context)
        parts: list[str] = []
        try:
            await self._client.query(_verbatim(text))
            async for message in self._client.receive_response():
                if isinstance(message, StreamEvent):
                    delta = _text_delta(message.event, bool(parts))
                    if delta is not None:
                        yield delta
                elif isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
                    parts += [b.text for b in message.content if isinstance(b, TextBlock) and b.text]
                elif isinstance(message, MirrorErrorMessage):
                    self._mirror_failed(message, context.conversation_id)
                elif isinstance(message, ResultMessage):
                    yield self._done(message, parts)
                    return
        except ClaudeSDKError as exc:
            raise AgentCrashed(str(exc)) from exc
        raise AgentCrashed("the agent's output ended before the turn finished")

    async def preheat(self) -> str | None:
        """Warm a spare: one turn the gateway answers itself (no upstream call, no cost), then ``/clear``.

        A freshly connected CLI spends ~100 ms more on its first query; after this the adopting
        conversation's first message is as fast as a warm one, and its history holds nothing of the
        warm-up.  Returns the session id the CLI continues under, or None without a gateway.
        """
        if self._meter is None:
            return None
        gateway, credential = self._meter.gateway, self._meter.credential
        # Local answers last until the first real turn (``begin_turn``), not just the warm-up turn: the CLI's
        # title request for the warm-up may leave after its turn has ended, and must not go upstream either.
        gateway.answer_locally(credential, True)
        await self._client.query(_verbatim(WARM_UP_PROMPT))
        await self._until_result()
        await self._client.query("/clear")  # not verbatim: the CLI's own command
        return await self._until_result()

    async def _until_result(self) -> str | None:
        """Read to the end of a turn; the session id a reset moved to, if one did."""
        session_id = None
        try:
            async for message in self._client.receive_response():
                if isinstance(message, MirrorErrorMessage):
                    self._mirror_failed(message)
                elif isinstance(message, SystemMessage) and message.subtype == "init":
                    session_id = str(message.data.get("session_id") or "") or None
                elif isinstance(message, ResultMessage):
                    return session_id or message.session_id
        except ClaudeSDKError as exc:
            raise AgentCrashed(str(exc)) from exc
        raise AgentCrashed("the agent's output ended before the warm-up finished")

    def _mirror_failed(self, message: MirrorErrorMessage, conversation_id: str | None = None) -> None:
        """A batch the Redis mirror dropped: the turn goes on (local disk has it); the next append heals."""
        if self._mirror is not None:
            # A spare's process serves the conversation that adopted it: the turn names it.
            self._mirror.transcripts.mirror_failed(conversation_id or self._mirror.conversation_id, message.error)

    def _done(self, result: ResultMessage, parts: list[str]) -> TurnDone:
        done = _turn_done(result, parts)
        if self._meter is None:
            return done
        stop = self._meter.stopped()
        return dataclasses.replace(
            done, budget=stop.text if stop is not None else None, metered_usd=self._meter.spent()
        )


def cli_pid(client: ClaudeSDKClient) -> int | None:
    """The connected CLI's pid, which the pool samples for memory and kills; None before connecting.

    A reach into the SDK's private attributes: it exposes no pid, and its transport's process is the CLI
    (``ClaudeSDKClient._transport``, a ``SubprocessCLITransport`` whose ``_process`` is anyio's ``Process``).
    tests/unit/test_sdk_private.py fails, naming the SDK version, when either name changes.
    """
    process = getattr(getattr(client, "_transport", None), "_process", None)
    return getattr(process, "pid", None)


@dataclass(frozen=True)
class Metered:
    """One process's line to the gateway: its credential, and the gateway that meters it."""

    gateway: Meter
    credential: str

    def begin(self, context: TurnContext) -> None:
        self.gateway.begin_turn(self.credential, context.conversation_id, context.user, context.channel)

    def stopped(self) -> BudgetStop | None:
        return self.gateway.stopped(self.credential)

    def spent(self) -> float:
        return self.gateway.turn_spent(self.credential)


@dataclass(frozen=True)
class MirrorWatch:
    """Where one process reports the batches its transcript mirror failed to store."""

    transcripts: Transcripts
    conversation_id: str


WARM_UP_PROMPT = "agentd warm-up: reply with OK."


async def _verbatim(text: str) -> AsyncIterator[dict[str, Any]]:
    """One user message the CLI delivers as written: no ``@file`` expansion, no slash commands."""
    yield {
        "type": "user",
        "message": {"role": "user", "content": text},
        "parent_tool_use_id": None,
        "client_composed": True,
    }


def _text_delta(event: dict[str, Any], after_text: bool) -> TextDelta | None:
    kind = event.get("type")
    if kind == "content_block_start" and after_text and event.get("content_block", {}).get("type") == "text":
        return TextDelta("\n\n")
    if kind == "content_block_delta" and event.get("delta", {}).get("type") == "text_delta":
        return TextDelta(str(event["delta"].get("text", "")))
    return None


def _turn_done(result: ResultMessage, parts: list[str]) -> TurnDone:
    interrupted = (result.terminal_reason or "").startswith("aborted")
    error = None
    if result.is_error and not interrupted:
        detail = "; ".join(result.errors or []) or result.result or result.subtype
        error = f"{result.subtype}: {detail}"
    return TurnDone(
        reply="\n\n".join(parts),
        session_id=result.session_id,
        total_cost_usd=result.total_cost_usd or 0.0,
        error=error,
        interrupted=interrupted,
        num_turns=result.num_turns,
    )
