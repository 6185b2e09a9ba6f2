"""Getting an answer into a Slack thread whole: streamed, or posted and updated, always split within limits."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.mrkdwn import safe_markdown, to_mrkdwn

log = structlog.get_logger(__name__)

# Slack's markdown fields hold 12,000 characters; a streamed message rolls over well before.
STREAM_MESSAGE_CHARS = 10_000
# chat.update has rejected long text that chat.postMessage took; keep every posted part small.
POST_MESSAGE_CHARS = 3_500
UPDATE_INTERVAL_S = 1.0
# What a failed Web API call (chat.update, a post, an upload) raises once slack-sdk's own retries are spent.
SLACK_ERRORS = (SlackApiError, SlackClientError, aiohttp.ClientError, TimeoutError)


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at a paragraph, line or word boundary where one exists.

    Walks by offset (never re-slicing the rest), so the work is linear in the text.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cuts = (text.rfind(boundary, start, end) - start for boundary in ("\n\n", "\n", " "))
        cut = next((c for c in cuts if c > limit // 2), limit)
        pieces.append(text[start : start + cut].rstrip())
        start = _skip_blanks(text, start + cut)
    rest = text[start:]
    if rest.strip() or not pieces:
        pieces.append(rest)
    return pieces


def _skip_blanks(text: str, index: int) -> int:
    while index < len(text) and text[index] in "\n ":
        index += 1
    return index


def _safe_cut(text: str) -> int:
    """How much of streamed text can be made safe now: a link or ``<!channel>`` cut in two by a delta
    would slip past the rules, so text after a ``[`` or ``<`` waits for its line's end."""
    line_start = text.rfind("\n") + 1
    tail = text[line_start:]
    return line_start if "[" in tail or "<" in tail else len(text)


def _word_cut(text: str, room: int) -> int:
    """Where to cut ``text`` to fit ``room``: after a space or newline, so no escape or link is cut in two."""
    if len(text) <= room:
        return len(text)
    boundary = max(text.rfind(" ", 0, room), text.rfind("\n", 0, room))
    return boundary + 1 if boundary > room // 2 else room


class ReplyWriter(Protocol):
    async def write(self, text: str) -> None:
        """More of the answer, as it is generated."""

    async def complete(self, reply: str) -> None:
        """The whole answer, once the turn is done: whatever was not yet shown is shown now."""


class Thread:
    """Where replies go, and who they answer (``thread_ts`` None: a new top-level message)."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str | None,
        team: str,
        user: str,
        dm: bool,
        mentions: bool = False,
    ) -> None:
        self.client, self.channel, self.thread_ts = client, channel, thread_ts
        self.team, self.user, self.dm = team, user, dm
        self.mentions = mentions  # the agent's <@U…> stay live mentions (the profile's slack_mentions)

    def mrkdwn(self, markdown: str) -> str:
        return to_mrkdwn(markdown, self.mentions)

    async def post(self, mrkdwn: str) -> str:
        response = await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts, text=mrkdwn)
        return str(response["ts"])

    async def post_all(self, markdown: str) -> None:
        for piece in split_text(self.mrkdwn(markdown), POST_MESSAGE_CHARS):
            await self.post(piece)


class PostWriter:
    """Fallback: post the first part, update it as text arrives, continue in new messages past the limit.

    If an update fails (``msg_too_long``, a 500, rate limited after retries), updating stops and, at the
    completion, whatever the messages do not yet show is posted as new messages: the whole answer arrives.
    """

    def __init__(self, thread: Thread) -> None:
        self._thread = thread
        self._text = ""
        self._messages: list[tuple[str, str]] = []  # (ts, text shown)
        self._last_update = 0.0
        self._broken = False

    async def write(self, text: str) -> None:
        self._text += text
        if not self._broken and time.monotonic() - self._last_update >= UPDATE_INTERVAL_S:
            await self._show(self._text)

    async def complete(self, reply: str) -> None:
        final = reply or self._text
        if not self._broken:
            await self._show(final)
        if self._broken:
            await self._post_unshown(final)

    async def _show(self, markdown: str) -> None:
        self._last_update = time.monotonic()
        pieces = split_text(self._thread.mrkdwn(markdown), POST_MESSAGE_CHARS)
        for index, piece in enumerate(pieces):
            if index >= len(self._messages):
                self._messages.append((await self._thread.post(piece), piece))
            elif self._messages[index][1] != piece and not await self._update(index, piece):
                return

    async def _update(self, index: int, piece: str) -> bool:
        ts = self._messages[index][0]
        try:
            await self._thread.client.chat_update(channel=self._thread.channel, ts=ts, text=piece)
        except SLACK_ERRORS as exc:
            self._broken = True
            log.warning("slack_update_failed", error=str(exc)[:200], message=index, fallback="post the rest")
            return False
        self._messages[index] = (ts, piece)
        return True

    async def _post_unshown(self, markdown: str) -> None:
        """Post what the (no longer updatable) messages do not show, continuing where the last one stops."""
        pieces = split_text(self._thread.mrkdwn(markdown), POST_MESSAGE_CHARS)
        shown = [text for _, text in self._messages]
        done = 0
        while done < min(len(shown), len(pieces)) and shown[done] == pieces[done]:
            done += 1
        rest = pieces[done:]
        if rest and done < len(shown) and rest[0].startswith(shown[done]):
            rest[0] = rest[0][len(shown[done]) :]
        for piece in rest:
            if piece.strip():
                await self._thread.post(piece)


class StreamingUnavailable(Exception):
    """chat.startStream is refused (no AI app feature, an old workspace, a proxy that lacks it)."""


class StreamWriter:
    """Streams Markdown with chat.startStream/appendStream/stopStream, one message per STREAM_MESSAGE_CHARS.

    If streaming breaks midway, the rest of the answer is posted instead: the final text is never lost.
    """

    def __init__(self, thread: Thread) -> None:
        self._thread = thread
        self._stream: AsyncChatStream | None = None
        self._in_message = 0
        self._shown = ""
        self._pending = ""
        self._last_flush = 0.0
        self._broken = False

    async def write(self, text: str) -> None:
        self._pending += text
        if not self._broken and time.monotonic() - self._last_flush >= UPDATE_INTERVAL_S / 2:
            await self._flush()

    async def complete(self, reply: str) -> None:
        if not self._broken:
            await self._flush(final=True)
        if self._stream is not None and not self._broken:
            await self._guard(self._stream.stop())
        final = reply or self._shown + self._pending
        # If the streamed text and the recorded answer differ, show the answer whole.
        rest = final[len(self._shown) :] if final.startswith(self._shown) else final
        if rest.strip():
            await self._thread.post_all(rest)

    async def _flush(self, final: bool = False) -> None:
        """Append what is written so far (up to ``_safe_cut``; all of it when ``final``), made safe as Markdown."""
        self._last_flush = time.monotonic()
        cut = len(self._pending) if final else _safe_cut(self._pending)
        if self._broken or cut <= 0:
            return
        ready = self._pending[:cut]
        safe = safe_markdown(ready, self._thread.mentions)
        while safe:
            room = STREAM_MESSAGE_CHARS - self._in_message
            if room <= 0:
                await self._roll_over()
                continue
            piece = safe[: _word_cut(safe, room)]
            stream = await self._current()
            if stream is None or not await self._guard(stream.append(markdown_text=piece)):
                return
            self._in_message += len(piece)
            safe = safe[len(piece) :]
        self._shown += ready
        self._pending = self._pending[cut:]

    async def _current(self) -> AsyncChatStream | None:
        if self._stream is None:
            recipient = {} if self._thread.dm else {"recipient_team_id": self._thread.team}
            if not self._thread.dm:
                recipient["recipient_user_id"] = self._thread.user
            # Slack streams only into threads; a top-level post (a job's delivery) is never streamed.
            assert self._thread.thread_ts is not None
            self._stream = await self._thread.client.chat_stream(
                channel=self._thread.channel, thread_ts=self._thread.thread_ts, buffer_size=1, **recipient
            )
        return self._stream

    async def _roll_over(self) -> None:
        if self._stream is not None:
            await self._guard(self._stream.stop())
        self._stream, self._in_message = None, 0

    async def _guard(self, call: Awaitable[Any]) -> bool:
        """Run one stream call; a failure switches the rest of the answer to plain posts."""
        try:
            await call
            return True
        except (SlackApiError, SlackClientError) as exc:
            self._broken = True
            if self._stream is not None and self._stream.ts is None and not self._shown:
                raise StreamingUnavailable(str(exc)) from exc
            log.warning("slack_stream_broken", error=str(exc)[:200], shown=len(self._shown))
            return False


class AutoWriter:
    """Streams when the workspace allows it, else posts and updates; remembers a refusal via ``on_unavailable``."""

    def __init__(self, thread: Thread, stream: bool, on_unavailable: Callable[[str], None]) -> None:
        self._thread, self._on_unavailable = thread, on_unavailable
        self._inner: ReplyWriter = StreamWriter(thread) if stream else PostWriter(thread)
        self._text = ""

    async def write(self, text: str) -> None:
        self._text += text
        try:
            await self._inner.write(text)
        except StreamingUnavailable as exc:
            await self._fall_back(str(exc)).write(self._text)

    async def complete(self, reply: str) -> None:
        try:
            await self._inner.complete(reply)
        except StreamingUnavailable as exc:
            await self._fall_back(str(exc)).complete(reply or self._text)

    def _fall_back(self, error: str) -> ReplyWriter:
        self._on_unavailable(error)
        self._inner = PostWriter(self._thread)
        return self._inner
