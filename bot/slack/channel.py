"""The Slack channel: slack-bolt intake (Socket Mode or HTTP Events), one lane per thread, replies in the thread.

Bolt listeners only translate, deduplicate and enqueue.  Each thread has a
lane task that submits its messages to the pool in order; each turn's reply is
delivered by its own task, so a slow answer never blocks intake or other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_bolt.error import BoltUnhandledRequestError
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from bot import metrics
from bot.config import ConfigError, Settings
from bot.core import (
    Approver,
    ChannelStatus,
    Conversations,
    Inbound,
    Outcome,
    Profile,
    Route,
    SessionInfo,
    Store,
    StoreError,
    ToolSpec,
    TurnHandle,
)
from bot.lanes import Lanes
from bot.slack import events
from bot.slack.approvals import APPROVE, DENY, Approvals, Click
from bot.slack.assistant import AssistantSurface
from bot.slack.courier import SlackCourier
from bot.slack.events import Identity, SlackMessage
from bot.slack.files import FileRefused, SlackFiles
from bot.slack.reply import AutoWriter, Thread
from bot.store import keys

log = structlog.get_logger(__name__)

SLACK_ERRORS = (SlackApiError, SlackClientError, aiohttp.ClientError, TimeoutError)
SLACK_CONNECTION_ERRORS = (SlackClientError, aiohttp.ClientError, TimeoutError, OSError)

CONNECT_BACKOFF_CAP_S = 60.0
REVOCATION_ACK_WAIT_S = 5.0


def connect_retrying() -> AsyncRetrying:
    """Slack unreachable at start: retry until it answers, jittered exponential backoff capped at a minute.

    Only connection errors are retried; anything else (a refused token is a ConfigError) ends the loop.
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(SLACK_CONNECTION_ERRORS),
        wait=wait_random_exponential(multiplier=1.0, max=CONNECT_BACKOFF_CAP_S),
        before_sleep=_log_retry,
    )


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("slack_unreachable", error=str(error)[:200], retry_in_s=round(wait, 1))


INTERNAL_ERROR_TEXT = "Something went wrong on our side; this message was not processed. Please send it again."
REFUSED_TEXT = "Sorry, I can't take requests from you here. An admin can give you access."


class SlackChannel:
    name = "slack"

    def __init__(self, settings: Settings, profile: Profile, conversations: Conversations, store: Store) -> None:
        self._config, self._profile, self._conversations, self._store = settings.slack, profile, conversations, store
        self._thread_ttl_s = keys.conversation_ttl_s(settings.store.conversation_ttl_days)
        assert self._config.bot_token is not None
        token = self._config.bot_token.get_secret_value()
        self._client = AsyncWebClient(
            token=token,
            base_url=self._config.api_url or AsyncWebClient.BASE_URL,
            retry_handlers=[AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=3)],
        )
        self._files = SlackFiles(self._config, self._client, token, settings.store.data_dir.resolve() / "incoming")
        prompts = settings.suggested_prompts(self._config.profile)
        self._assistant = AssistantSurface(self._client, store, self._config, prompts, self._thread_ttl_s)
        self._app = self._bolt_app()
        secret = self._config.signing_secret
        self._verifier = SignatureVerifier(secret.get_secret_value()) if secret else None
        self._socket: AsyncSocketModeHandler | None = None
        self._me = Identity("", "", "")
        allowlist = frozenset(c.removeprefix("#") for c in settings.triage.slack_channels)
        self._courier = SlackCourier(self._client, allowlist, lambda: self._me.team_id)
        self._approvals = Approvals(self._config.approval_timeout_s)
        self._lanes: Lanes[SlackMessage] = Lanes("slack", self._serve)
        self._intake = False
        self._connector: asyncio.Task[None] | None = None
        self._streaming = self._config.stream
        self._status_api = True
        self._hellos = 0  # Slack greets every new Socket Mode connection with a "hello" frame
        self._stopped: str | None = None  # why Slack took the app's access away (tokens_revoked, app_uninstalled)
        self._revocation_acked = asyncio.Event()

    def _bolt_app(self) -> AsyncApp:
        secret = self._config.signing_secret
        app = AsyncApp(
            client=self._client,
            signing_secret=secret.get_secret_value() if secret else "unused-in-socket-mode",
            request_verification_enabled=self._config.mode == "http",
            logger=logging.getLogger("slack_bolt"),
            # Bolt answers what no listener takes with a 404 (HTTP) or no ack (Socket Mode), which
            # Slack retries and in the end disables the subscription for: the error handler acks it.
            raise_error_for_unhandled_request=True,
        )
        app.event("app_mention")(self._on_event)
        app.event("message")(self._on_event)
        app.event("tokens_revoked")(self._on_revoked)
        app.event("app_uninstalled")(self._on_revoked)
        app.action(APPROVE)(self._on_approval)
        app.action(DENY)(self._on_approval)
        self._assistant.register(app)
        app.error(self._on_bolt_error)
        return app

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect now if Slack answers; if it is unreachable, keep trying in the background.

        A token Slack refuses is a configuration error and stops the daemon.
        """
        try:
            await self._connect()
        except SLACK_CONNECTION_ERRORS as exc:
            log.error("slack_unreachable", error=str(exc)[:200], note="retrying in the background")
            self._connector = asyncio.create_task(self._connect_until_up(), name="slack-connect")

    async def _connect(self) -> None:
        try:
            auth = await self._client.auth_test()
        except SlackApiError as exc:
            raise ConfigError(f"slack: Slack refused the bot token ({exc.response.get('error')})") from exc
        self._me = Identity(str(auth["team_id"]), str(auth["user_id"]), str(auth.get("bot_id") or ""))
        self._intake = True
        if self._config.mode == "socket":
            assert self._config.app_token is not None
            self._socket = AsyncSocketModeHandler(
                self._app, self._config.app_token.get_secret_value(), web_client=self._client
            )
            self._socket.client.message_listeners.append(self._on_socket_frame)
            self._socket.client.socket_mode_request_listeners.append(self._after_socket_request)
            await self._socket.connect_async()  # type: ignore[no-untyped-call]
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(1)
        log.info("slack_started", mode=self._config.mode, team=self._me.team_id, bot_user=self._me.user_id)

    async def _on_socket_frame(self, client: object, message: dict[str, Any], raw: str | None) -> None:
        if message.get("type") == "hello":
            self._hellos += 1

    def routes(self) -> list[Route]:
        """Slack's HTTP Events endpoint, in HTTP mode; Socket Mode needs none (the daemon mounts these)."""
        if self._config.mode != "http":
            return []
        return [Route("POST", "/slack/events", self._http_events)]

    async def status(self) -> ChannelStatus:
        """Connected: the WebSocket is up (Socket Mode), or the token was accepted (HTTP Events)."""
        if self._config.mode == "socket":
            connected = self._socket is not None and await self._socket.client.is_connected()
        else:
            connected = self._intake
        connected = connected and self._stopped is None
        return ChannelStatus(self.name, connected, reconnects=max(self._hellos - 1, 0), stopped=self._stopped)

    async def _connect_until_up(self) -> None:
        try:
            async for attempt in connect_retrying():
                with attempt:
                    await self._connect()
        except ConfigError as exc:
            log.error("slack_refused_token", error=str(exc))

    async def stop_intake(self) -> None:
        self._intake = False
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(0)
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.wait([self._connector])
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None

    async def close(self) -> None:
        await self.stop_intake()
        await self._lanes.join()
        if self._client.session is not None:
            await self._client.session.close()

    # -- intake (bolt listeners: translate, deduplicate, enqueue) -------------------

    async def _http_events(self, request: web.Request) -> web.Response:
        if not self._intake and self._stopped is None:
            # Slack retries a failed delivery: the event is processed after the restart.
            return web.json_response({"error": "shutting down"}, status=503)
        # Stopped for good, requests are still verified and acked: Slack disables an
        # endpoint that keeps failing, and the reinstalled app needs it.
        if not self._signed_by_slack(await request.read(), request.headers):
            return web.json_response({"error": "invalid request"}, status=401)
        try:
            bolt_request = await to_bolt_request(request)
        except ValueError:  # signed but unparseable: acked, since a retry would not help
            log.warning("slack_unreadable_body", bytes=request.content_length, content_type=request.content_type)
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="unreadable").inc()
            return web.json_response({"ok": True, "note": "unreadable body, ignored"})
        return await to_aiohttp_response(await self._app.async_dispatch(bolt_request))

    def _signed_by_slack(self, body: bytes, headers: Mapping[str, str]) -> bool:
        """Checked before bolt parses the body (bolt parses first, and a malformed header made it raise)."""
        stamp = headers.get("X-Slack-Request-Timestamp", "")
        if not (stamp.isascii() and stamp.isdigit()):
            return False  # slack-sdk's verifier int()s it
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return False  # Slack signs UTF-8 (JSON or a form); the verifier would raise
        assert self._verifier is not None, "HTTP Events mode has a signing secret (config)"
        return self._verifier.is_valid(text, stamp, headers.get("X-Slack-Signature"))

    async def _on_bolt_error(self, error: Exception, body: dict[str, Any]) -> BoltResponse | None:
        """Unhandled requests are acknowledged and ignored; a listener's exception is logged (bolt answers 500)."""
        if isinstance(error, BoltUnhandledRequestError):
            log.info("slack_ignored", **events.describe(body))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="ignored").inc()
            return BoltResponse(status=200, body="")
        log.error("slack_listener_failed", error=repr(error)[:300], **events.describe(body), exc_info=error)
        return None

    async def _on_revoked(self, body: dict[str, Any]) -> None:
        """``tokens_revoked`` or ``app_uninstalled``: Slack took the app's access away (or a user token's)."""
        reason = events.revocation(body)
        if reason is None:
            # No bot token among them (user tokens only): agentd uses none, its bot token still works.
            log.info("slack_tokens_revoked_not_the_bot_token", **events.describe(body))
            return
        self._stop_for_good(events.describe(body).get("event_type", ""), reason)

    def _stop_for_good(self, event_type: str, why: str) -> None:
        """Stop taking Slack messages; the daemon and its other channels go on serving."""
        if self._stopped is not None:
            return
        self._stopped = why
        self._intake = False
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(0)
        log.error(
            "slack_channel_stopped",
            slack_event=event_type,
            reason=why,
            team=self._me.team_id,
            action="reinstall the Slack app to the workspace, set its new bot token (SLACK_BOT_TOKEN), restart agentd",
        )
        if self._socket is not None:
            self._lanes.spawn(self._close_socket_once_acked(), name="slack-stop")

    async def _after_socket_request(self, client: object, request: SocketModeRequest) -> None:
        """Runs after bolt's Socket Mode listener has dispatched and acked an envelope."""
        if events.revocation(request.payload) is not None:
            self._revocation_acked.set()

    async def _close_socket_once_acked(self) -> None:
        # Bolt acks an event before its listener runs, but the ack is sent after: closing at once
        # would lose it (and Slack would redeliver). Wait for it, for a bounded time.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._revocation_acked.wait(), REVOCATION_ACK_WAIT_S)
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.close_async()  # type: ignore[no-untyped-call]

    async def _on_event(self, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext) -> None:
        if not self._intake:
            if self._stopped is not None:
                metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="channel_stopped").inc()
            return
        try:
            # The installation's team, as bolt computes it (authorizations[0].team_id for events):
            # the top-level team_id and event.team are the sender's in a Slack Connect channel.
            message = events.parse(event, context.team_id or "", self._me)
        except events.BadEvent as exc:
            log.warning("slack_bad_event", error=str(exc), event_id=body.get("event_id"))
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="bad_event").inc()
            return
        skip = events.skip_reason(event, message, self._me, self._config) or await self._unaddressed(message)
        if skip is not None:
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate=str(skip)).inc()
            return
        if not await self._first_delivery(body, message):
            metrics.CHANNEL_MESSAGES.labels(channel="slack", fate="duplicate").inc()
            log.info("slack_duplicate", event_id=body.get("event_id"), conversation=message.conversation_id)
            return
        self._enqueue(message)

    async def _unaddressed(self, message: SlackMessage) -> events.Skip | None:
        if message.mentioned or message.is_dm:
            return None
        if message.in_thread and self._config.follow_up_without_mention and await self._knows_thread(message):
            return None
        return events.Skip.NOT_ADDRESSED

    async def _knows_thread(self, message: SlackMessage) -> bool:
        try:
            name = keys.slack_thread(message.team, message.channel, message.thread_ts)
            return await self._store.get_value(name) is not None
        except StoreError as exc:
            log.error("store_error", error=str(exc), conversation=message.conversation_id)
            return False

    async def _first_delivery(self, body: dict[str, Any], message: SlackMessage) -> bool:
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

    def _enqueue(self, message: SlackMessage) -> None:
        self._lanes.put(message.conversation_id, message)

    async def _on_approval(self, ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id") or "")
        verdict = self._approvals.click(str(action.get("value") or ""), user, action.get("action_id") == APPROVE)
        if verdict is Click.NOT_ALLOWED:
            container = body.get("container") or {}
            self._lanes.spawn(self._tell_not_allowed(container, user), name="slack-approval-refused")

    async def _tell_not_allowed(self, container: dict[str, Any], user: str) -> None:
        try:
            await self._client.chat_postEphemeral(
                channel=str(container.get("channel_id")),
                user=user,
                thread_ts=container.get("thread_ts"),
                text="You are not one of the people allowed to approve this agent's tools.",
            )
        except SLACK_ERRORS as exc:
            log.warning("slack_error", call="chat.postEphemeral", error=str(exc)[:200])

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
            await self._react(message, "x")

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
        mark = await self._show_status(message, queued)
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
        await self._remember_thread(message)
        self._lanes.spawn(self._deliver(message, thread, turn, mark), name=f"slack-reply:{message.conversation_id}")

    async def _remember_thread(self, message: SlackMessage) -> None:
        try:
            name = keys.slack_thread(message.team, message.channel, message.thread_ts)
            await self._store.put_value(name, "1", self._thread_ttl_s)
        except StoreError as exc:
            log.error("store_error", error=str(exc), conversation=message.conversation_id)

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
        if message.in_thread and not await self._knows_thread(message):
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
        return events.thread_context(list(history), message.ts, self._me, limit)

    # -- status and control words --------------------------------------------

    async def _show_status(self, message: SlackMessage, queued: bool) -> str | None:
        """Show at once that the message was taken; returns the reaction added, to remove when done."""
        if queued:
            return await self._react(message, "hourglass_flowing_sand")
        if self._status_api:
            try:
                await self._client.assistant_threads_setStatus(
                    channel_id=message.channel, thread_ts=message.thread_ts, status="is thinking…"
                )
                return None
            except SLACK_ERRORS as exc:
                self._status_api = False
                log.info("slack_status_unavailable", error=str(exc)[:200], fallback="eyes reaction")
        return await self._react(message, "eyes")

    async def _react(self, message: SlackMessage, name: str, remove: bool = False) -> str | None:
        call = self._client.reactions_remove if remove else self._client.reactions_add
        try:
            await call(channel=message.channel, timestamp=message.ts, name=name)
            return name
        except SLACK_ERRORS as exc:
            log.debug("slack_reaction_failed", name=name, error=str(exc)[:200])
            return None

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

    # -- delivery -------------------------------------------------------------------

    async def _deliver(self, message: SlackMessage, thread: Thread, turn: TurnHandle, mark: str | None) -> None:
        logger = log.bind(conversation=message.conversation_id, channel=message.channel)
        try:
            writer = AutoWriter(thread, self._streaming, self._streaming_unavailable)
            async for text in turn.stream():
                await writer.write(text)
            outcome = await turn.outcome
            if outcome.reply:
                await writer.finish(outcome.reply)
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
        if not outcome.ok:
            await thread.post(f":x: {outcome.error}")
        if mark is not None:
            await self._react(message, mark, remove=True)
        # The finishing reaction comes last: it tells the thread that everything has been said.
        await self._react(message, "white_check_mark" if outcome.ok else "x")
        if self._status_api:
            try:
                await self._client.assistant_threads_setStatus(
                    channel_id=message.channel, thread_ts=message.thread_ts, status=""
                )
            except SLACK_ERRORS as exc:
                log.debug("slack_status_clear_failed", error=str(exc)[:200])

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
