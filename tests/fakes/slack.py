"""A scriptable fake of Slack for the real slack-sdk / slack-bolt clients.

One aiohttp server plays three parts:

* the Web API at ``/api/<method>`` (point ``AsyncWebClient(base_url=fake.url)`` at it);
* the Socket Mode websocket at ``/link``, handed out by ``apps.connections.open``;
* the file hosts: ``/files/<id>/<name>`` (downloads of ``add_file`` files) and
  ``/upload/<id>`` (the upload URLs of ``files.getUploadURLExternal``).

Every Web API call is recorded in ``calls``; the state the bot can change (messages,
reactions, statuses, shared files) is kept so tests can assert on what a user would see.
Tests push events with ``send_event`` / ``click`` and read acks from ``acks``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote

from aiohttp import WSMsgType, web

from bot.slack.probe import MANIFEST_SCOPES
from tests.support.helpers import wait_until

MAX_TEXT = 40_000  # chat.postMessage text
MAX_MARKDOWN = 12_000  # markdown_text params, markdown_text chunks and markdown blocks
MAX_SECTION_TEXT = 3_000  # text of a section block
MAX_BLOCKS = 50  # blocks in one message


APP_ID = "A0APP"
# What the bot token was granted, sent back in x-oauth-scopes: the manifest's bot scopes by default.
GRANTED_SCOPES = sorted(MANIFEST_SCOPES)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None


@dataclass
class Message:
    """A message the bot created, in its current state."""

    ts: str
    channel: str
    thread_ts: str | None
    text: str
    blocks: list[dict[str, Any]] | None
    method: str  # the method that created it: chat.postMessage or chat.startStream
    streaming: bool = False  # between chat.startStream and chat.stopStream
    edits: int = 0  # chat.update calls on it

    def as_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "channel": self.channel,
            "thread_ts": self.thread_ts,
            "text": self.text,
            "blocks": self.blocks,
            "method": self.method,
            "streaming": self.streaming,
            "edits": self.edits,
        }


@dataclass(frozen=True)
class SharedFile:
    file_id: str
    title: str
    content: bytes
    channel: str
    thread_ts: str | None
    initial_comment: str | None


@dataclass
class _Failure:
    error: str
    status: int
    retry_after: int
    times: int


@dataclass(frozen=True)
class _HostedFile:
    name: str
    content: bytes
    mimetype: str


class SlackError(Exception):
    """Raised by a method handler to answer ``{"ok": false, "error": ...}``."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


Handler = Callable[[Call], dict[str, Any]]


@dataclass
class FakeSlack:
    """An aiohttp app; ``url`` and ``root`` are set once started."""

    team_id: str = "T0TEAM"
    bot_user_id: str = "U0BOT"
    bot_id: str = "B0BOT"
    url: str = ""
    root: str = ""
    calls: list[Call] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    ack_payloads: dict[str, Any] = field(default_factory=dict)  # envelope_id -> "payload" of acks that carry one
    frames: list[dict[str, Any]] = field(default_factory=list)  # every JSON frame the socket mode client sent
    connections: int = 0
    uploads: dict[str, bytes] = field(default_factory=dict)
    shares: list[SharedFile] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)  # bodies POSTed to response_url
    streaming: bool = True
    status_api: bool = True
    # Unhandled methods answer ok so harmless calls don't fail the daemon; list a name here
    # (or "*" for all) to answer unknown_method instead.
    strict_methods: set[str] = field(default_factory=set)
    scopes: list[str] | None = field(default_factory=lambda: list(GRANTED_SCOPES))  # None: no x-oauth-scopes
    refused_tokens: set[str] = field(default_factory=set)  # answered invalid_auth, as a revoked token is
    MAX_UPDATE_TEXT: int = 4_000  # chat.update rejects long text that postMessage accepted
    disconnect_grace: float = 2.0  # how long disconnect() lets the client close the old socket itself
    _messages: list[Message] = field(default_factory=list)
    _replies: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    _reactions: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _statuses: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _prompts: dict[tuple[str, str], list[list[dict[str, Any]]]] = field(default_factory=dict)
    _titles: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _users: dict[str, dict[str, Any]] = field(default_factory=dict)
    _failures: dict[str, list[_Failure]] = field(default_factory=dict)
    _pending_uploads: dict[str, str] = field(default_factory=dict)  # file_id -> filename
    _hosted: dict[str, _HostedFile] = field(default_factory=dict)
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _bot_ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _event_ts: itertools.count[int] = field(default_factory=lambda: itertools.count(100, 100))
    _runner: web.AppRunner | None = None

    HANDLERS: ClassVar[dict[str, str]] = {
        "auth.test": "_auth_test",
        "apps.connections.open": "_connections_open",
        "chat.postMessage": "_post_message",
        "chat.update": "_update",
        "chat.startStream": "_start_stream",
        "chat.appendStream": "_append_stream",
        "chat.stopStream": "_stop_stream",
        "reactions.add": "_reactions_add",
        "reactions.remove": "_reactions_remove",
        "assistant.threads.setStatus": "_set_status",
        "assistant.threads.setSuggestedPrompts": "_set_suggested_prompts",
        "assistant.threads.setTitle": "_set_title",
        "conversations.replies": "_conversations_replies",
        "users.info": "_users_info",
        "files.info": "_files_info",
        "files.getUploadURLExternal": "_get_upload_url",
        "files.completeUploadExternal": "_complete_upload",
    }

    # ---- lifecycle

    async def start(self, port: int = 0) -> None:
        """Serve on ``port`` (0: any free port)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link", self._link)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/files/{file_id}/{name}", self._download)
        app.router.add_post("/response", self._response_url)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/api/"

    async def stop(self) -> None:
        # Close sockets first: cleanup() would otherwise wait on their handlers.
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"server stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- scripting and inspection

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def fail_next(
        self, method: str, *, error: str = "ratelimited", status: int = 429, retry_after: int = 1, times: int = 1
    ) -> None:
        self._failures.setdefault(method, []).append(_Failure(error, status, retry_after, times))

    def set_replies(self, channel: str, thread_ts: str, messages: list[dict[str, Any]]) -> None:
        self._replies[(channel, thread_ts)] = messages

    def set_user(self, user_id: str, **fields: Any) -> None:
        """Override fields of the users.info answer for one user."""
        self._users.setdefault(user_id, {}).update(fields)

    def posted(self, channel: str | None = None, thread_ts: str | None = None) -> list[dict[str, Any]]:
        return [
            m.as_dict()
            for m in self._messages
            if (channel is None or m.channel == channel) and (thread_ts is None or m.thread_ts == thread_ts)
        ]

    def reactions(self, channel: str, ts: str) -> list[str]:
        return list(self._reactions.get((channel, ts), []))

    def statuses(self, channel: str, thread_ts: str) -> list[str]:
        """Every status set on the thread by assistant.threads.setStatus, oldest first."""
        return list(self._statuses.get((channel, thread_ts), []))

    def suggested_prompts(self, channel: str, thread_ts: str) -> list[list[dict[str, Any]]]:
        """Every prompt list set on the thread by assistant.threads.setSuggestedPrompts, oldest first."""
        return list(self._prompts.get((channel, thread_ts), []))

    def titles(self, channel: str, thread_ts: str) -> list[str]:
        """Every title set on the thread by assistant.threads.setTitle, oldest first."""
        return list(self._titles.get((channel, thread_ts), []))

    def shared_files(self, channel: str, thread_ts: str | None = None) -> list[tuple[str, bytes]]:
        """(title, content) of files shared into the channel, and the thread when given."""
        return [
            (s.title, s.content)
            for s in self.shares
            if s.channel == channel and (thread_ts is None or s.thread_ts == thread_ts)
        ]

    def add_file(self, name: str, content: bytes, mimetype: str = "text/plain") -> dict[str, Any]:
        file_id = self._new_id("F")
        self._hosted[file_id] = _HostedFile(name, content, mimetype)
        return self._file_object(file_id)

    # ---- building events

    def message_event(
        self,
        text: str,
        *,
        user: str = "U0ALICE",
        channel: str = "C0GENERAL",
        ts: str | None = None,
        thread_ts: str | None = None,
        channel_type: str = "channel",
        mention: bool = False,
        files: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        ts = ts or self._new_event_ts()
        event: dict[str, Any] = {
            "type": "app_mention" if mention else "message",
            "user": user,
            "text": f"<@{self.bot_user_id}> {text}" if mention else text,
            "ts": ts,
            "event_ts": ts,
            "channel": channel,
            "team": self.team_id,
            "channel_type": channel_type,
        }
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        if files:
            event["files"] = files
            if not mention:
                event["subtype"] = "file_share"
        event.update(extra)
        return event

    def assistant_event(
        self,
        kind: str,
        *,
        channel: str = "D0ALICE",
        thread_ts: str | None = None,
        user: str = "U0ALICE",
        context: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``assistant_thread_started`` or ``assistant_thread_context_changed``, shaped as in bolt-python's
        tests/scenario_tests_async/test_events_assistant.py (Slack's payloads); ``context`` None: none sent."""
        thread_ts = thread_ts or self._new_event_ts()
        thread: dict[str, Any] = {"user_id": user, "channel_id": channel, "thread_ts": thread_ts}
        if context is not None:
            thread["context"] = context
        thread.update(extra)
        return {"type": kind, "assistant_thread": thread, "event_ts": self._new_event_ts()}

    def event_payload(
        self, event: dict[str, Any], *, event_id: str | None = None, team_id: str | None = None
    ) -> dict[str, Any]:
        team = team_id or self.team_id
        return {
            "token": "x",
            "team_id": team,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "team_id": team,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                    "enterprise_id": None,
                }
            ],
            "is_ext_shared_channel": False,
            "context_team_id": team,
        }

    def block_actions_payload(
        self,
        *,
        action_id: str,
        value: str,
        user: str,
        channel: str,
        message_ts: str,
        thread_ts: str | None = None,
        block_id: str = "b",
        action_type: str = "button",
    ) -> dict[str, Any]:
        return {
            "type": "block_actions",
            "team": {"id": self.team_id, "domain": "fake"},
            "user": {"id": user, "username": user, "name": user, "team_id": self.team_id},
            "api_app_id": APP_ID,
            "token": "x",
            "container": {
                "type": "message",
                "message_ts": message_ts,
                "channel_id": channel,
                "is_ephemeral": False,
                "thread_ts": thread_ts,
            },
            "trigger_id": "1.2.3",
            "channel": {"id": channel, "name": "general"},
            "message": {
                "ts": message_ts,
                "thread_ts": thread_ts,
                "type": "message",
                "text": "",
                "user": self.bot_user_id,
            },
            "response_url": f"{self.root}/response",
            "actions": [
                {"action_id": action_id, "block_id": block_id, "value": value, "type": action_type, "action_ts": "1.1"}
            ],
        }

    def block_actions_form(self, **click: Any) -> dict[str, str]:
        """The form body Slack POSTs to an HTTP-mode app for a button click (``block_actions_payload``'s args)."""
        return {"payload": json.dumps(self.block_actions_payload(**click))}

    # ---- Socket Mode

    async def wait_connected(self, timeout: float = 10) -> None:
        await wait_until(lambda: self._current_socket() is not None, timeout, "a socket mode connection")

    async def push(
        self, payload: dict[str, Any], *, type: str = "events_api", retry_attempt: int = 0, retry_reason: str = ""
    ) -> str:
        await self.wait_connected(10)
        ws = self._current_socket()
        assert ws is not None
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "type": type,
            "payload": payload,
            "accepts_response_payload": type != "events_api",
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
        }
        await ws.send_json(envelope)
        return envelope_id

    async def send_event(self, event: dict[str, Any], *, event_id: str | None = None, retry_attempt: int = 0) -> str:
        payload = self.event_payload(event, event_id=event_id)
        reason = "timeout" if retry_attempt else ""
        await self.push(payload, retry_attempt=retry_attempt, retry_reason=reason)
        return str(payload["event_id"])

    async def click(self, **click: Any) -> str:
        """Push a button click over Socket Mode (``block_actions_payload``'s args)."""
        payload = self.block_actions_payload(**click)
        return await self.push(payload, type="interactive")

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        ws = self._current_socket()
        if ws is None:
            return
        await ws.send_json({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake"}})
        # Like Slack, give the client a moment to reconnect and drop the old socket itself,
        # so one disconnect leads to one reconnect rather than racing a server-side close.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: ws.closed, self.disconnect_grace, "the client to drop the old socket")
        if not ws.closed:
            await ws.close(code=1000, message=reason.encode())

    def _current_socket(self) -> web.WebSocketResponse | None:
        open_sockets = [ws for ws in self._sockets if not ws.closed]
        return open_sockets[-1] if open_sockets else None

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        # autoping answers the client's heartbeat pings; Slack does the same.
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections += 1
        hello = {
            "type": "hello",
            "num_connections": 1,
            "debug_info": {"host": "fake", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": APP_ID},
        }
        await ws.send_json(hello)
        self._sockets.append(ws)  # only now: wait_connected() promises that hello was sent
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_frame(msg.data)
        finally:
            self._sockets.remove(ws)
        return ws

    def _on_frame(self, data: str) -> None:
        try:
            frame = json.loads(data)
        except json.JSONDecodeError:
            return
        if not isinstance(frame, dict):
            return
        self.frames.append(frame)
        if "envelope_id" in frame:
            self.acks.append(str(frame["envelope_id"]))
            if "payload" in frame:
                self.ack_payloads[str(frame["envelope_id"])] = frame["payload"]

    # ---- Web API plumbing

    async def _api(self, request: web.Request) -> web.Response:
        call = Call(request.match_info["method"], await _read_params(request), _bearer(request))
        self.calls.append(call)
        failure = self._take_failure(call.method)
        if failure is not None:
            headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
            return web.json_response({"ok": False, "error": failure.error}, status=failure.status, headers=headers)
        try:
            self._check_token(call)
            body = self._handler(call.method)(call)
        except SlackError as e:
            body = {"ok": False, "error": e.error}
        headers = {} if self.scopes is None else {"x-oauth-scopes": ",".join(self.scopes)}
        return web.json_response(body, headers=headers)

    def _take_failure(self, method: str) -> _Failure | None:
        queue = self._failures.get(method)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.pop(0)
        return failure

    def _check_token(self, call: Call) -> None:
        # Catch a daemon that sends the app-level token where the bot token belongs, or vice versa.
        if not call.token:
            raise SlackError("not_authed")
        if call.token in self.refused_tokens:
            raise SlackError("invalid_auth")
        is_app_token = call.token.startswith("xapp-")
        if call.method == "apps.connections.open" and not is_app_token:
            raise SlackError("not_allowed_token_type")
        if is_app_token and call.method not in ("apps.connections.open", "auth.test"):
            raise SlackError("not_allowed_token_type")

    def _handler(self, method: str) -> Handler:
        name = self.HANDLERS.get(method)
        if name is not None:
            handler: Handler = getattr(self, name)
            return handler
        if method in self.strict_methods or "*" in self.strict_methods:
            raise SlackError("unknown_method")
        return lambda call: {"ok": True}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}0{next(self._ids):08d}"

    def _new_bot_ts(self) -> str:
        n = next(self._bot_ts)
        return f"{1_800_000_000 + n // 1_000_000}.{n % 1_000_000:06d}"

    def _new_event_ts(self) -> str:
        n = next(self._event_ts)
        return f"{1_700_000_000 + n // 1_000_000}.{n % 1_000_000:06d}"

    def _message(self, channel: str, ts: str) -> Message:
        for message in self._messages:
            if message.channel == channel and message.ts == ts:
                return message
        raise SlackError("message_not_found")

    def _message_body(self, message: Message) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "text": message.text,
            "ts": message.ts,
            "team": self.team_id,
        }
        if message.thread_ts is not None:
            body["thread_ts"] = message.thread_ts
        if message.blocks is not None:
            body["blocks"] = message.blocks
        return body

    # ---- Web API methods

    def _auth_test(self, call: Call) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "agent",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _connections_open(self, call: Call) -> dict[str, Any]:
        ws_root = self.root.replace("http://", "ws://", 1)
        return {"ok": True, "url": f"{ws_root}/link?ticket={next(self._ids)}"}

    def _post_message(self, call: Call) -> dict[str, Any]:
        channel = _required(call.params, "channel", "channel_not_found")
        text = _message_text(call.params, MAX_TEXT)
        blocks = _blocks(call.params)
        if not text and blocks is None:
            raise SlackError("no_text")
        message = Message(self._new_bot_ts(), channel, _opt_str(call.params, "thread_ts"), text, blocks, call.method)
        self._messages.append(message)
        return {"ok": True, "channel": channel, "ts": message.ts, "message": self._message_body(message)}

    def _update(self, call: Call) -> dict[str, Any]:
        channel = _required(call.params, "channel", "channel_not_found")
        message = self._message(channel, _required(call.params, "ts", "message_not_found"))
        text = _message_text(call.params, self.MAX_UPDATE_TEXT)
        blocks = _blocks(call.params)
        if text or "text" in call.params or "markdown_text" in call.params:
            message.text = text
        if blocks is not None:
            message.blocks = blocks
        message.edits += 1
        return {
            "ok": True,
            "channel": channel,
            "ts": message.ts,
            "text": message.text,
            "message": self._message_body(message),
        }

    def _start_stream(self, call: Call) -> dict[str, Any]:
        self._check_streaming()
        channel = _required(call.params, "channel", "channel_not_found")
        if not channel.startswith("D"):
            # Outside DMs Slack needs to know whom the stream is for.
            if not call.params.get("recipient_team_id"):
                raise SlackError("missing_recipient_team_id")
            if not call.params.get("recipient_user_id"):
                raise SlackError("missing_recipient_user_id")
        text = _stream_text(call.params)
        thread_ts = _opt_str(call.params, "thread_ts")
        message = Message(self._new_bot_ts(), channel, thread_ts, text, None, call.method, streaming=True)
        self._messages.append(message)
        return {"ok": True, "channel": channel, "ts": message.ts}

    def _append_stream(self, call: Call) -> dict[str, Any]:
        message = self._streaming_message(call)
        message.text += _stream_text(call.params)
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _stop_stream(self, call: Call) -> dict[str, Any]:
        message = self._streaming_message(call)
        message.text += _stream_text(call.params)
        blocks = _blocks(call.params)
        if blocks is not None:
            message.blocks = blocks
        message.streaming = False
        return {"ok": True, "channel": message.channel, "ts": message.ts, "message": self._message_body(message)}

    def _check_streaming(self) -> None:
        if not self.streaming:
            raise SlackError("unknown_method")

    def _streaming_message(self, call: Call) -> Message:
        self._check_streaming()
        channel = _required(call.params, "channel", "channel_not_found")
        message = self._message(channel, _required(call.params, "ts", "message_not_found"))
        if not message.streaming:
            raise SlackError("message_not_in_streaming_state")
        return message

    def _reaction_key(self, call: Call) -> tuple[tuple[str, str], str]:
        channel = _required(call.params, "channel", "channel_not_found")
        ts = _required(call.params, "timestamp", "no_item_specified")
        return (channel, ts), _required(call.params, "name", "invalid_name")

    def _reactions_add(self, call: Call) -> dict[str, Any]:
        key, name = self._reaction_key(call)
        names = self._reactions.setdefault(key, [])
        if name in names:
            raise SlackError("already_reacted")
        names.append(name)
        return {"ok": True}

    def _reactions_remove(self, call: Call) -> dict[str, Any]:
        key, name = self._reaction_key(call)
        names = self._reactions.get(key, [])
        if name not in names:
            raise SlackError("no_reaction")
        names.remove(name)
        return {"ok": True}

    def _set_status(self, call: Call) -> dict[str, Any]:
        if not self.status_api:
            raise SlackError("not_allowed")
        channel = _required(call.params, "channel_id", "channel_not_found")
        thread_ts = _required(call.params, "thread_ts", "invalid_arguments")
        self._statuses.setdefault((channel, thread_ts), []).append(str(call.params.get("status", "")))
        return {"ok": True}

    def _assistant_thread(self, call: Call) -> tuple[str, str]:
        if not self.status_api:
            raise SlackError("not_allowed")
        channel = _required(call.params, "channel_id", "channel_not_found")
        return channel, _required(call.params, "thread_ts", "invalid_thread_ts")

    def _set_suggested_prompts(self, call: Call) -> dict[str, Any]:
        key = self._assistant_thread(call)
        prompts = _json_list(call.params.get("prompts"))
        if not prompts or len(prompts) > 4 or not all(p.get("title") and p.get("message") for p in prompts):
            raise SlackError("invalid_arguments")  # Slack takes one to four prompts, each with title and message
        self._prompts.setdefault(key, []).append(prompts)
        return {"ok": True}

    def _set_title(self, call: Call) -> dict[str, Any]:
        key = self._assistant_thread(call)
        self._titles.setdefault(key, []).append(_required(call.params, "title", "invalid_arguments"))
        return {"ok": True}

    def _conversations_replies(self, call: Call) -> dict[str, Any]:
        channel = _required(call.params, "channel", "channel_not_found")
        ts = _required(call.params, "ts", "thread_not_found")
        return {"ok": True, "messages": list(self._replies.get((channel, ts), [])), "has_more": False}

    def _users_info(self, call: Call) -> dict[str, Any]:
        user_id = _required(call.params, "user", "user_not_found")
        name = user_id.lower()
        user: dict[str, Any] = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": f"User {user_id}",
            "is_bot": False,
            "tz": "UTC",
            "profile": {"display_name": name, "real_name": f"User {user_id}"},
        }
        user.update(self._users.get(user_id, {}))
        return {"ok": True, "user": user}

    def _files_info(self, call: Call) -> dict[str, Any]:
        file_id = _required(call.params, "file", "file_not_found")
        if file_id not in self._hosted:
            raise SlackError("file_not_found")
        return {"ok": True, "file": self._file_object(file_id)}

    def _get_upload_url(self, call: Call) -> dict[str, Any]:
        filename = _required(call.params, "filename", "invalid_arguments")
        _required(call.params, "length", "invalid_arguments")
        file_id = self._new_id("F")
        self._pending_uploads[file_id] = filename
        return {"ok": True, "upload_url": f"{self.root}/upload/{file_id}", "file_id": file_id}

    def _complete_upload(self, call: Call) -> dict[str, Any]:
        files = _json_list(call.params.get("files"))
        if not files:
            raise SlackError("invalid_arguments")
        if any(str(f.get("id")) not in self.uploads for f in files):
            raise SlackError("file_not_found")
        for channel in _share_channels(call.params):
            self._share(files, channel, call.params)
        answer = [self._uploaded_object(str(f["id"]), str(f.get("title") or "")) for f in files]
        return {"ok": True, "files": answer}

    def _share(self, files: list[dict[str, Any]], channel: str, params: dict[str, Any]) -> None:
        for f in files:
            file_id = str(f["id"])
            title = str(f.get("title") or self._pending_uploads.get(file_id, file_id))
            self.shares.append(
                SharedFile(
                    file_id,
                    title,
                    self.uploads[file_id],
                    channel,
                    _opt_str(params, "thread_ts"),
                    _opt_str(params, "initial_comment"),
                )
            )

    def _uploaded_object(self, file_id: str, title: str) -> dict[str, Any]:
        name = self._pending_uploads.get(file_id, file_id)
        return {"id": file_id, "title": title or name, "name": name, "size": len(self.uploads[file_id])}

    def _file_object(self, file_id: str) -> dict[str, Any]:
        hosted = self._hosted[file_id]
        url = f"{self.root}/files/{file_id}/{quote(hosted.name, safe='')}"
        return {
            "id": file_id,
            "name": hosted.name,
            "title": hosted.name,
            "mimetype": hosted.mimetype,
            "filetype": _filetype(hosted.name),
            "size": len(hosted.content),
            "url_private_download": url,
            "url_private": url,
        }

    # ---- file hosts

    async def _upload(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self._pending_uploads:
            return web.Response(status=404, text="unknown upload")
        self.uploads[file_id] = await _upload_bytes(request)
        # files.slack.com answers text/plain, which slack-sdk reads as text.
        return web.Response(text=f"OK - {len(self.uploads[file_id])}")

    async def _download(self, request: web.Request) -> web.Response:
        hosted = self._hosted.get(request.match_info["file_id"])
        if hosted is None:
            return web.Response(status=404)
        if not (_bearer(request) or "").startswith("xoxb-"):
            return web.Response(status=403, text="forbidden")
        return web.Response(body=hosted.content, content_type=hosted.mimetype)

    async def _response_url(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.responses.append(body if isinstance(body, dict) else {"body": body})
        return web.json_response({"ok": True})


# ---- request parsing


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Query string, then form or JSON body, as one dict (form and query values stay strings)."""
    params: dict[str, Any] = dict(request.query)
    if not request.can_read_body:
        return params
    if request.content_type == "application/json":
        body = await request.json()
        if isinstance(body, dict):
            params.update(body)
    elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        for key, value in form.items():
            params[key] = value.file.read() if isinstance(value, web.FileField) else value
    return params


async def _upload_bytes(request: web.Request) -> bytes:
    """The file content: the raw body, or the "file" field when sent as multipart."""
    if request.content_type != "multipart/form-data":
        return await request.read()
    form = await request.post()
    value = form.get("file")
    if isinstance(value, web.FileField):
        return bytes(value.file.read())
    return str(value or "").encode()


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[len("Bearer ") :] if header.startswith("Bearer ") else None


def _opt_str(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    return None if value is None or value == "" else str(value)


def _required(params: dict[str, Any], key: str, error: str) -> str:
    value = _opt_str(params, key)
    if value is None:
        raise SlackError(error)
    return value


def _json_list(value: Any) -> list[dict[str, Any]]:
    """A list param: JSON bodies carry lists, form and query bodies carry JSON strings."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _blocks(params: dict[str, Any]) -> list[dict[str, Any]] | None:
    raw = params.get("blocks")
    if raw is None or raw == "":
        return None
    try:
        blocks = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise SlackError("invalid_blocks") from None
    if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
        raise SlackError("invalid_blocks")
    if not all(isinstance(b, dict) and "type" in b for b in blocks) or any(_block_too_long(b) for b in blocks):
        raise SlackError("invalid_blocks")
    if any(_bad_context_actions(b) for b in blocks):
        raise SlackError("invalid_blocks")
    return blocks


def _bad_context_actions(block: dict[str, Any]) -> bool:
    """A context_actions block holds one to five feedback_buttons or icon_button elements."""
    if block.get("type") != "context_actions":
        return False
    elements = block.get("elements")
    if not isinstance(elements, list) or not 1 <= len(elements) <= 5:
        return True
    return not all(isinstance(e, dict) and e.get("type") in ("feedback_buttons", "icon_button") for e in elements)


def _block_too_long(block: dict[str, Any]) -> bool:
    if block.get("type") == "section":
        text = block.get("text")
        return isinstance(text, dict) and len(str(text.get("text", ""))) > MAX_SECTION_TEXT
    if block.get("type") == "markdown":
        return len(str(block.get("text", ""))) > MAX_MARKDOWN
    return False


def _message_text(params: dict[str, Any], max_text: int) -> str:
    """The text of chat.postMessage / chat.update, from text or markdown_text."""
    markdown = str(params.get("markdown_text") or "")
    if len(markdown) > MAX_MARKDOWN:
        raise SlackError("msg_too_long")
    text = str(params.get("text") or "")
    if len(text) > max_text:
        raise SlackError("msg_too_long")
    return markdown or text


def _stream_text(params: dict[str, Any]) -> str:
    """Text a chat.*Stream call adds: markdown_text plus markdown_text chunks (slack-sdk's helper sends chunks)."""
    pieces = [str(params.get("markdown_text") or "")]
    pieces += [str(c.get("text", "")) for c in _json_list(params.get("chunks")) if c.get("type") == "markdown_text"]
    if any(len(p) > MAX_MARKDOWN for p in pieces):
        raise SlackError("msg_too_long")
    return "".join(pieces)


def _share_channels(params: dict[str, Any]) -> list[str]:
    channels = [c for c in str(params.get("channels") or "").split(",") if c]
    channel_id = _opt_str(params, "channel_id")
    return [channel_id, *channels] if channel_id else channels


def _filetype(name: str) -> str:
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"txt": "text", "md": "markdown", "py": "python", "": "binary"}.get(extension, extension)
