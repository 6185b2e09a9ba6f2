"""What a thread shows of one message's turn: taken at once, the reply as it streams, then one final mark.

The status ("is thinking…", or a reaction where Slack's assistant status is unavailable) appears as the
message is submitted; the reply streams in (or is posted and updated); the turn's files are uploaded;
and the finishing reaction comes last, telling the thread that everything has been said.
"""

from __future__ import annotations

import structlog
from slack_sdk.web.async_client import AsyncWebClient

from bot.core import Outcome, TurnHandle
from bot.slack.assistant import AssistantSurface
from bot.slack.events import SlackMessage
from bot.slack.files import SlackFiles
from bot.slack.reply import SLACK_ERRORS, AutoWriter, Thread

log = structlog.get_logger(__name__)


class ThreadProgress:
    """Remembers, for the daemon's life, what the workspace refused: streaming, or the assistant status."""

    def __init__(self, client: AsyncWebClient, stream: bool, files: SlackFiles, assistant: AssistantSurface) -> None:
        self._client, self._files, self._assistant = client, files, assistant
        self._streaming = stream
        self._status_api = True

    async def taken(self, message: SlackMessage, queued: bool) -> str | None:
        """Show at once that the message was taken; returns the reaction added, to remove when done."""
        if queued:
            return await self.react(message, "hourglass_flowing_sand")
        if self._status_api:
            try:
                await self._client.assistant_threads_setStatus(
                    channel_id=message.channel, thread_ts=message.thread_ts, status="is thinking…"
                )
                return None
            except SLACK_ERRORS as exc:
                self._status_api = False
                log.info("slack_status_unavailable", error=str(exc)[:200], fallback="eyes reaction")
        return await self.react(message, "eyes")

    async def stream_reply(self, message: SlackMessage, thread: Thread, turn: TurnHandle, mark: str | None) -> None:
        logger = log.bind(conversation=message.conversation_id, channel=message.channel)
        try:
            writer = AutoWriter(thread, self._streaming, self._streaming_unavailable)
            async for text in turn.stream():
                await writer.write(text)
            outcome = await turn.outcome
            if outcome.reply:
                await writer.complete(outcome.reply)
            await self._files.upload(thread, outcome)
            await self._assistant.after_answer(message, outcome)
            await self._finish(message, thread, outcome, mark)
        except Exception:  # task boundary: log with context; the outcome is recorded by the pool
            logger.exception("slack_delivery_failed")

    def _streaming_unavailable(self, error: str) -> None:
        if self._streaming:
            self._streaming = False
            log.warning("slack_streaming_unavailable", error=error[:200], fallback="post and update")

    async def _finish(self, message: SlackMessage, thread: Thread, outcome: Outcome, mark: str | None) -> None:
        """The message's one visible outcome: the error if the turn failed, then the finishing reaction."""
        if not outcome.ok:
            await thread.post(f":x: {outcome.error}")
        if mark is not None:
            await self.react(message, mark, remove=True)
        # The finishing reaction comes last: it tells the thread that everything has been said.
        await self.react(message, "white_check_mark" if outcome.ok else "x")
        if self._status_api:
            try:
                await self._client.assistant_threads_setStatus(
                    channel_id=message.channel, thread_ts=message.thread_ts, status=""
                )
            except SLACK_ERRORS as exc:
                log.debug("slack_status_clear_failed", error=str(exc)[:200])

    async def react(self, message: SlackMessage, name: str, remove: bool = False) -> str | None:
        call = self._client.reactions_remove if remove else self._client.reactions_add
        try:
            await call(channel=message.channel, timestamp=message.ts, name=name)
            return name
        except SLACK_ERRORS as exc:
            log.debug("slack_reaction_failed", name=name, error=str(exc)[:200])
            return None
