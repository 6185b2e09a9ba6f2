"""Bolt's listeners: each event is translated, filtered, claimed once and put in its thread's lane.

Nothing here waits on the agent: a listener returns as soon as the message is queued (or dropped, with
its fate counted), so bolt acks at once and Slack does not retry.  Clicks on the approval buttons
answer the waiting tool call; a revocation stops the connection for good.
"""

from __future__ import annotations

from typing import Any

import structlog
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_bolt.error import BoltUnhandledRequestError
from slack_bolt.response import BoltResponse

from bot import metrics
from bot.config import SlackConfig
from bot.core import Store, StoreError
from bot.lanes import Lanes
from bot.slack import events
from bot.slack.approvals import APPROVE, DENY, Approvals, Click
from bot.slack.connection import SlackConnection
from bot.slack.events import SlackMessage
from bot.slack.reply import SLACK_ERRORS
from bot.store import keys

log = structlog.get_logger(__name__)


class KnownThreads:
    """The threads the agent has taken part in (so a follow-up needs no mention, and history is fetched once)."""

    def __init__(self, store: Store, ttl_s: int) -> None:
        self._store, self._ttl_s = store, ttl_s

    async def knows(self, message: SlackMessage) -> bool:
        try:
            name = keys.slack_thread(message.team, message.channel, message.thread_ts)
            return await self._store.get_value(name) is not None
        except StoreError as exc:
            log.error("store_error", error=str(exc), conversation=message.conversation_id)
            return False

    async def remember(self, message: SlackMessage) -> None:
        try:
            name = keys.slack_thread(message.team, message.channel, message.thread_ts)
            await self._store.put_value(name, "1", self._ttl_s)
        except StoreError as exc:
            log.error("store_error", error=str(exc), conversation=message.conversation_id)


class EventIntake:
    """Registers the message, revocation and approval listeners, and the error handler, on the bolt app."""

    def __init__(
        self,
        config: SlackConfig,
        connection: SlackConnection,
        store: Store,
        threads: KnownThreads,
        approvals: Approvals,
        lanes: Lanes[SlackMessage],
    ) -> None:
        self._config, self._connection, self._store, self._threads = config, connection, store, threads
        self._approvals, self._lanes = approvals, lanes

    def register(self, app: AsyncApp) -> None:
        app.event("app_mention")(self._on_event)
        app.event("message")(self._on_event)
        app.event("tokens_revoked")(self._on_revoked)
        app.event("app_uninstalled")(self._on_revoked)
        app.action(APPROVE)(self._on_approval)
        app.action(DENY)(self._on_approval)

    async def on_bolt_error(self, error: Exception, body: dict[str, Any]) -> BoltResponse | None:
        """Unhandled requests are acknowledged and ignored; a listener's exception is logged (bolt answers 500)."""
        if isinstance(error, BoltUnhandledRequestError):
            log.info("slack_ignored", **events.describe(body))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="ignored").inc()
            return BoltResponse(status=200, body="")
        log.error("slack_listener_failed", error=repr(error)[:300], **events.describe(body), exc_info=error)
        return None

    async def _on_event(self, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        if not self._connection.accepting:
            if self._connection.stopped is not None:
                metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="channel_stopped").inc()
            return
        me = self._connection.me
        try:
            # The installation's team, as bolt computes it (authorizations[0].team_id for events):
            # the top-level team_id and event.team are the sender's in a Slack Connect channel.
            message = events.parse(event, context.team_id or "", me)
        except events.BadEvent as exc:
            log.warning("slack_bad_event", error=str(exc), event_id=body.get("event_id"))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="bad_event").inc()
            return
        skip = events.skip_reason(event, message, me, self._config) or await self._unaddressed(message)
        if skip is not None:
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate=str(skip)).inc()
            return
        if not await self._claim_event(body, message):
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="duplicate").inc()
            log.info("slack_duplicate", event_id=body.get("event_id"), conversation=message.conversation_id)
            return
        self._lanes.put(message.conversation_id, message)

    async def _unaddressed(self, message: SlackMessage) -> events.Skip | None:
        if message.mentioned or message.is_dm:
            return None
        if message.in_thread and self._config.follow_up_without_mention and await self._threads.knows(message):
            return None
        return events.Skip.NOT_ADDRESSED

    async def _claim_event(self, body: dict[str, Any], message: SlackMessage) -> bool:
        """Claim the event id (Slack's retries) and the message (mention + message twins); True once."""
        names = [keys.slack_message(message.team, message.channel, message.ts)]
        if isinstance(body.get("event_id"), str):
            names.insert(0, keys.slack_event(body["event_id"]))
        try:
            for name in names:
                if not await self._store.claim(name, keys.SLACK_EVENT_TTL_S):
                    return False
        except StoreError as exc:
            # Without the store a retry may be answered twice; dropping the message would be worse.
            log.error("store_error", error=str(exc), conversation=message.conversation_id, note="not deduplicated")
        return True

    async def _on_revoked(self, body: dict[str, Any]) -> None:
        """``tokens_revoked`` or ``app_uninstalled``: Slack took the app's access away (or a user token's)."""
        reason = events.revocation(body)
        if reason is None:
            # No bot token among them (user tokens only): agentd uses none, its bot token still works.
            log.info("slack_tokens_revoked_not_the_bot_token", **events.describe(body))
            return
        self._connection.stop_for_good(events.describe(body).get("event_type", ""), reason)

    async def _on_approval(self, ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id") or "")
        verdict = self._approvals.click(str(action.get("value") or ""), user, action.get("action_id") == APPROVE)
        if verdict is Click.NOT_ALLOWED:
            container = body.get("container") or {}
            self._lanes.spawn(self._tell_not_allowed(container, user), name="slack-approval-refused")

    async def _tell_not_allowed(self, container: dict[str, Any], user: str) -> None:
        try:
            await self._connection.client.chat_postEphemeral(
                channel=str(container.get("channel_id")),
                user=user,
                thread_ts=container.get("thread_ts"),
                text="You are not one of the people allowed to approve this agent's tools.",
            )
        except SLACK_ERRORS as exc:
            log.warning("slack_error", call="chat.postEphemeral", error=str(exc)[:200])
