"""The Slack channel: slack-bolt intake (Socket Mode or HTTP Events), one lane per thread, replies in the thread.

Bolt listeners only translate, deduplicate and enqueue (``intake``).  Each thread has a lane task that
submits its messages to the conversations in order; each turn's reply is streamed by its own task
(``progress``), so a slow answer never blocks intake or other threads.  The connection to Slack is
``connection``; attachments and the agent's files are ``files``; what jobs need is ``courier``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import structlog
from slack_bolt.async_app import AsyncApp

from bot import metrics
from bot.config import Settings
from bot.core import (
    Approver,
    ChannelStatus,
    Conversations,
    Inbound,
    Profile,
    Route,
    SessionInfo,
    Store,
    ToolSpec,
)
from bot.lanes import Lanes
from bot.slack import events
from bot.slack.approvals import Approvals
from bot.slack.assistant import AssistantSurface
from bot.slack.connection import SlackConnection
from bot.slack.courier import SlackCourier
from bot.slack.events import SlackMessage
from bot.slack.files import FileRefused, SlackFiles
from bot.slack.intake import EventIntake, KnownThreads
from bot.slack.progress import ThreadProgress
from bot.slack.reply import SLACK_ERRORS, Thread
from bot.store import keys

log = structlog.get_logger(__name__)

INTERNAL_ERROR_TEXT = "Something went wrong on our side; this message was not processed. Please send it again."
REFUSED_TEXT = "Sorry, I can't take requests from you here. An admin can give you access."


class SlackChannel:
    """The Channel the daemon runs: wires the parts together and serves each thread's lane."""

    name = "slack"

    def __init__(self, settings: Settings, profile: Profile, conversations: Conversations, store: Store) -> None:
        self._config, self._profile, self._conversations = settings.slack, profile, conversations
        thread_ttl_s = keys.conversation_ttl_s(settings.store.conversation_ttl_days)
        self._lanes: Lanes[SlackMessage] = Lanes("slack", self._serve)
        self._connection = SlackConnection(self._config, self._lanes)
        self._client = client = self._connection.client
        staging = settings.store.data_dir.resolve() / "incoming"
        self._files = SlackFiles(self._config, client, self._connection.token, staging)
        prompts = settings.suggested_prompts(self._config.profile)
        self._assistant = AssistantSurface(client, store, self._config, prompts, thread_ttl_s)
        self._threads = KnownThreads(store, thread_ttl_s)
        self._approvals = Approvals(self._config.approval_timeout_s)
        self._intake = EventIntake(self._config, self._connection, store, self._threads, self._approvals, self._lanes)
        self._progress = ThreadProgress(client, self._config.stream, self._files, self._assistant)
        allowlist = frozenset(c.removeprefix("#") for c in settings.triage.slack_channels)
        self._courier = SlackCourier(client, allowlist, lambda: self._connection.me.team_id)
        self._register(self._connection.app)

    def _register(self, app: AsyncApp) -> None:
        self._intake.register(app)
        self._assistant.register(app)
        app.error(self._intake.on_bolt_error)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self._connection.start()

    def routes(self) -> list[Route]:
        return self._connection.routes()

    async def status(self) -> ChannelStatus:
        return await self._connection.status(self.name)

    async def stop_intake(self) -> None:
        await self._connection.stop_intake()

    async def close(self) -> None:
        await self.stop_intake()
        await self._lanes.join()
        await self._connection.close()

    # -- lanes: one per thread, messages submitted in order -----------------------

    async def _serve(self, conversation_id: str, message: SlackMessage) -> None:
        thread = self._thread(message)
        try:
            await self._accept(message, thread)
        except Exception:  # task boundary: a bug must still give the message one visible outcome
            log.exception("slack_failed", conversation=conversation_id)
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="failed").inc()
            with contextlib.suppress(*SLACK_ERRORS):
                await thread.post(f":x: {INTERNAL_ERROR_TEXT}")
            await self._progress.react(message, "x")

    def _thread(self, message: SlackMessage) -> Thread:
        return Thread(
            self._client,
            message.channel,
            message.thread_ts,
            message.user_team,  # a stream's recipient_team_id: the sender's own team
            message.user,
            message.is_dm,
            mentions=self._profile.slack_mentions,
        )

    async def _accept(self, message: SlackMessage, thread: Thread) -> None:
        bound = log.bind(conversation=message.conversation_id, channel=message.channel, user=message.user)
        rule = events.refusal(message, self._config)
        if rule is not None:
            bound.warning("slack_refused", rule=str(rule))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="refused").inc()
            await thread.post(REFUSED_TEXT)
            return
        if message.control is not None:
            await self._control(message, thread)
            return
        try:
            staged = await self._files.download(message)
        except FileRefused as exc:
            bound.warning("slack_file_refused", reason=str(exc))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="file_refused").inc()
            await thread.post(f":x: {exc} I did not start on this message.")
            return
        await self._submit(message, thread, staged)

    async def _submit(self, message: SlackMessage, thread: Thread, staged: tuple[Path, ...]) -> None:
        info = await self._conversations.info(message.conversation_id)
        queued = info is not None and info.state == "busy"
        mark = await self._progress.taken(message, queued)
        prompt = await self._prompt(message)
        inbound = Inbound(
            message.conversation_id,
            prompt,
            "slack",
            staged,
            self._profile.name,
            self._approver(message, thread),
            user=message.user,
        )
        turn = await self._conversations.submit(inbound)
        metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="accepted").inc()
        await self._threads.remember(message)
        reply = self._progress.stream_reply(message, thread, turn, mark)
        self._lanes.spawn(reply, name=f"slack-reply:{message.conversation_id}")

    def _approver(self, message: SlackMessage, thread: Thread) -> Approver | None:
        if not self._profile.ask_tools:
            return None
        approvers = frozenset(self._config.approvers) or frozenset({message.user})
        return self._approvals.approver(thread, approvers)

    async def _prompt(self, message: SlackMessage) -> str:
        text = message.text or "(The message has no text.)"
        if not message.is_dm:
            text = f"<@{message.user}>: {text}"
        assistant = await self._assistant.before_turn(message)  # None outside Slack assistant threads
        if assistant is not None:
            return assistant + text
        if message.in_thread and not await self._threads.knows(message):
            text = await self._history(message) + text
        return text

    async def _history(self, message: SlackMessage) -> str:
        """The thread so far, for a mention in a thread the agent has not seen (fetched once per thread)."""
        limit = self._config.thread_context_messages
        if limit == 0:
            return ""
        try:
            response = await self._client.conversations_replies(
                channel=message.channel, ts=message.thread_ts, limit=limit + 1
            )
        except SLACK_ERRORS as exc:
            log.warning("slack_error", call="conversations.replies", error=str(exc)[:200])
            return ""
        history = response.get("messages") or []
        return events.thread_context(list(history), message.ts, self._connection.me, limit)

    async def _control(self, message: SlackMessage, thread: Thread) -> None:
        cid = message.conversation_id
        log.info("slack_control", conversation=cid, word=message.control, user=message.user)
        if message.control == "reset":
            await self._conversations.reset(cid)
            await thread.post(":recycle: Started a fresh session for this thread. Files in its workspace stay.")
        elif message.control == "cancel":
            cancelled = await self._conversations.cancel(cid)
            await thread.post(
                ":octagonal_sign: Cancelled the running turn." if cancelled else "Nothing is running here."
            )
        else:
            await thread.post(stats_text(await self._conversations.info(cid)))

    # -- scheduled jobs: the Courier for ``slack:`` targets and the slack_post tool ---------

    async def deliver(self, target: str, subject: str, text: str) -> None:
        await self._courier.deliver(target, subject, text)

    def toolsets(self) -> dict[str, list[ToolSpec]]:
        return self._courier.toolsets()


def stats_text(info: SessionInfo | None) -> str:
    if info is None:
        return "No agent session in this thread yet."
    rss = f"{info.rss_mb:.0f} MiB" if info.rss_mb is not None else "not running"
    return (
        f"*Session* `{info.session_id}`\n"
        f"State: {info.state} · Messages: {info.turns} · Cost: ${info.cost_usd:.4f} · Memory: {rss}"
    )
