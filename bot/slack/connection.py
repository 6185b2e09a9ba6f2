"""The app's link to Slack: the Web API client, the bolt app, Socket Mode or HTTP Events, and losing access.

It connects (retrying while Slack is unreachable), verifies HTTP Events requests before bolt sees them,
reports whether Slack is connected, and stops taking events for good when Slack revokes the bot token.
What the events mean is the listeners' business (``bot.slack.intake``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
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
from bot.config import ConfigError, SlackConfig
from bot.core import ChannelStatus, Route
from bot.lanes import Lanes
from bot.slack import events
from bot.slack.events import Identity, SlackMessage

log = structlog.get_logger(__name__)

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


class SlackConnection:
    """``accepting`` while events may be taken; ``me`` is the bot, known once Slack accepted the token.

    ``lanes`` runs the background close after a revocation, so the channel's ``close`` waits for it.
    """

    def __init__(self, config: SlackConfig, lanes: Lanes[SlackMessage]) -> None:
        self._config, self._lanes = config, lanes
        assert config.bot_token is not None
        self.token = config.bot_token.get_secret_value()
        self.client = AsyncWebClient(
            token=self.token,
            base_url=config.api_url or AsyncWebClient.BASE_URL,
            retry_handlers=[AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=3)],
        )
        self.app = self._bolt_app()
        secret = config.signing_secret
        self._verifier = SignatureVerifier(secret.get_secret_value()) if secret else None
        self._socket: AsyncSocketModeHandler | None = None
        self.me = Identity("", "", "")
        self.accepting = False
        self._connector: asyncio.Task[None] | None = None
        self._hellos = 0  # Slack greets every new Socket Mode connection with a "hello" frame
        self.stopped: str | None = None  # why Slack took the app's access away (tokens_revoked, app_uninstalled)
        self._revocation_acked = asyncio.Event()

    def _bolt_app(self) -> AsyncApp:
        secret = self._config.signing_secret
        return AsyncApp(
            client=self.client,
            signing_secret=secret.get_secret_value() if secret else "unused-in-socket-mode",
            request_verification_enabled=self._config.mode == "http",
            logger=logging.getLogger("slack_bolt"),
            # Bolt answers what no listener takes with a 404 (HTTP) or no ack (Socket Mode), which
            # Slack retries and in the end disables the subscription for: the error handler acks it.
            raise_error_for_unhandled_request=True,
        )

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
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            raise ConfigError(f"slack: Slack refused the bot token ({exc.response.get('error')})") from exc
        self.me = Identity(str(auth["team_id"]), str(auth["user_id"]), str(auth.get("bot_id") or ""))
        self.accepting = True
        if self._config.mode == "socket":
            assert self._config.app_token is not None
            self._socket = AsyncSocketModeHandler(
                self.app, self._config.app_token.get_secret_value(), web_client=self.client
            )
            self._socket.client.message_listeners.append(self._on_socket_frame)
            self._socket.client.socket_mode_request_listeners.append(self._after_socket_request)
            await self._socket.connect_async()  # type: ignore[no-untyped-call]
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(1)
        log.info("slack_started", mode=self._config.mode, team=self.me.team_id, bot_user=self.me.user_id)

    async def _on_socket_frame(self, client: object, message: dict[str, Any], raw: str | None) -> None:
        if message.get("type") == "hello":
            self._hellos += 1

    async def _connect_until_up(self) -> None:
        try:
            async for attempt in connect_retrying():
                with attempt:
                    await self._connect()
        except ConfigError as exc:
            log.error("slack_refused_token", error=str(exc))

    def routes(self) -> list[Route]:
        """Slack's HTTP Events endpoint, in HTTP mode; Socket Mode needs none (the daemon mounts these)."""
        if self._config.mode != "http":
            return []
        return [Route("POST", "/slack/events", self._http_events)]

    async def status(self, name: str) -> ChannelStatus:
        """Connected: the WebSocket is up (Socket Mode), or the token was accepted (HTTP Events)."""
        if self._config.mode == "socket":
            connected = self._socket is not None and await self._socket.client.is_connected()
        else:
            connected = self.accepting
        connected = connected and self.stopped is None
        return ChannelStatus(name, connected, reconnects=max(self._hellos - 1, 0), stopped=self.stopped)

    async def stop_intake(self) -> None:
        self.accepting = False
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(0)
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.wait([self._connector])
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None

    async def close(self) -> None:
        """After ``stop_intake`` and once the replies are out: the Web API client's connections."""
        if self.client.session is not None:
            await self.client.session.close()

    # -- HTTP Events: verified before bolt parses them ---------------------------------

    async def _http_events(self, request: web.Request) -> web.Response:
        if not self.accepting and self.stopped is None:
            # Slack retries a refused request: the event is processed after the restart.
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
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

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

    # -- access revoked: stop for good ------------------------------------------------

    def stop_for_good(self, event_type: str, why: str) -> None:
        """Stop taking Slack messages; the daemon and its other channels go on serving."""
        if self.stopped is not None:
            return
        self.stopped = why
        self.accepting = False
        metrics.CHANNEL_CONNECTED.labels(channel="slack").set(0)
        log.error(
            "slack_channel_stopped",
            slack_event=event_type,
            reason=why,
            team=self.me.team_id,
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
        # would lose it (and Slack would send the event again). Wait for it, for a bounded time.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._revocation_acked.wait(), REVOCATION_ACK_WAIT_S)
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.close_async()  # type: ignore[no-untyped-call]
