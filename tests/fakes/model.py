"""A scriptable fake of the Anthropic Messages API, for the real Claude Code CLI.

The CLI POSTs ``/v1/messages?beta=true`` with ``stream: true`` and reads
Anthropic SSE events.  Each request is recorded; the reply comes from the first
rule whose trigger occurs in the text of the last role=user message, else an
echo.  A rule answers with text, a ``tool_use`` block, or a delay.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import serve_on_loopback


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: dict[str, Any]


@dataclass
class Rule:
    trigger: str
    text: str | None = None
    tool: ToolUse | None = None
    delay_s: float = 0.0
    once: bool = False
    used: bool = False
    # An upstream failure instead of an answer: an HTTP error (status, headers) or a dropped stream.
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


@dataclass
class RecordedRequest:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    streamed: bytearray = field(default_factory=bytearray)  # the exact bytes of the answer sent
    cancelled: bool = False  # the client hung up while the answer was delayed

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def has_tools(self) -> bool:
        return bool(self.body.get("tools"))

    def last_user_blocks(self) -> list[dict[str, Any]]:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _blocks(message.get("content"))
        return []

    def last_user_text(self) -> str:
        return "\n".join(_block_text(b) for b in self.last_user_blocks())

    def last_said(self) -> str:
        """The newest prompt text: the last text block that is not a system reminder."""
        texts = [str(b.get("text", "")) for b in self.last_user_blocks() if b.get("type") == "text"]
        said = [t for t in texts if not t.lstrip().startswith("<system-reminder>")]
        return said[-1] if said else ""

    def all_text(self) -> str:
        """Every text and tool result the model was shown, in order."""
        parts = [_block_text(b) for m in self.messages for b in _blocks(m.get("content"))]
        return "\n".join(parts)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        return "\n".join(_block_text(b) for b in _blocks(block.get("content")))
    return ""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class FakeModel:
    """An aiohttp app; ``url`` is set once started."""

    rules: list[Rule] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    url: str = ""
    chunk_size: int = 40
    on_request: Callable[[RecordedRequest], None] | None = None
    api_keys: set[str] | None = None  # when set, any other key is refused with 401 as the real API does
    paths: list[str] = field(default_factory=list)  # "METHOD path?query" of every request, in order
    host: str = "127.0.0.1"  # 0.0.0.0 for a container on a bridge network (tests/integration/deploy/test_container.py)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _runner: web.AppRunner | None = None

    def add(self, trigger: str, **kwargs: Any) -> Rule:
        rule = Rule(trigger=trigger, **kwargs)
        self.rules.insert(0, rule)
        return rule

    def turn_requests(self) -> list[RecordedRequest]:
        """Requests of real turns (side requests such as titles carry no tools)."""
        return [r for r in self.requests if r.has_tools]

    def tool_results(self) -> str:
        """Every tool result the CLI sent back, in order."""
        texts = []
        for request in self.turn_requests():
            for block in request.last_user_blocks():
                if block.get("type") == "tool_result":
                    texts.append(_block_text(block))
        return "\n".join(texts)

    def find(self, needle: str) -> list[RecordedRequest]:
        return [r for r in self.turn_requests() if needle in r.last_said()]

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._note_path])
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._other)
        # Cancel a delayed answer when the CLI hangs up (interrupt, kill), so stop() never waits on it.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        self.url = await serve_on_loopback(self._runner, self.host)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _note_path(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.paths.append(f"{request.method} {request.raw_path}")
        return await handler(request)

    async def _other(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=404)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        return self._refusal(request) or web.json_response({"input_tokens": 10})

    def _refusal(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_keys is None or key in self.api_keys:
            return None
        error = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
        return web.json_response(error, status=401)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        recorded = RecordedRequest(await request.json(), {k.lower(): v for k, v in request.headers.items()})
        self.requests.append(recorded)
        if self.on_request is not None:
            self.on_request(recorded)
        rule = self._match(recorded)
        if rule is not None and rule.delay_s:
            try:
                await asyncio.sleep(rule.delay_s)
            except asyncio.CancelledError:
                recorded.cancelled = True
                raise
        if rule is not None and rule.status is not None:
            error = {"type": "error", "error": {"type": "api_error", "message": f"fake upstream {rule.status}"}}
            return web.json_response(error, status=rule.status, headers=rule.headers)
        blocks = self._answer(recorded, rule)
        if not recorded.body.get("stream"):
            return web.json_response(self._message(blocks, recorded))
        try:
            return await self._stream(request, recorded, blocks, drop=rule is not None and rule.drop)
        except ConnectionResetError:  # the CLI hung up (interrupt, kill): nothing to answer
            return web.Response(status=499)

    def _match(self, recorded: RecordedRequest) -> Rule | None:
        if not recorded.has_tools:
            return None
        if any(b.get("type") == "tool_result" for b in recorded.last_user_blocks()):
            return None
        text = recorded.last_said()
        for rule in self.rules:
            if rule.trigger in text and not (rule.once and rule.used):
                rule.used = True
                return rule
        return None

    def _answer(self, recorded: RecordedRequest, rule: Rule | None) -> list[dict[str, Any]]:
        if not recorded.has_tools:
            return [{"type": "text", "text": "Fake title"}]
        if rule is not None and rule.tool is not None:
            tool_id = f"toolu_{next(self._ids):06d}"
            return [{"type": "tool_use", "id": tool_id, "name": rule.tool.name, "input": rule.tool.input}]
        if rule is not None and rule.text is not None:
            return [{"type": "text", "text": rule.text}]
        return [{"type": "text", "text": self._echo(recorded)}]

    def _echo(self, recorded: RecordedRequest) -> str:
        blocks = recorded.last_user_blocks()
        if any(b.get("type") == "tool_result" for b in blocks):
            return "tool finished"
        return "echo: " + recorded.last_said()

    def _message(self, blocks: list[dict[str, Any]], recorded: RecordedRequest) -> dict[str, Any]:
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        return {
            "id": f"msg_{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": recorded.body.get("model", "claude-sonnet-4-5"),
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 20},
        }

    async def _stream(
        self, request: web.Request, recorded: RecordedRequest, blocks: list[dict[str, Any]], drop: bool = False
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        message = self._message([], recorded)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        message["stop_reason"] = None

        async def write(data: bytes) -> None:
            recorded.streamed += data
            await response.write(data)

        await write(_sse("message_start", {"type": "message_start", "message": message}))
        if drop:
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-stream
            return response
        for index, block in enumerate(blocks):
            for event, data in self._block_events(index, block):
                await write(_sse(event, data))
        await write(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": 20},
                },
            )
        )
        await write(_sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response

    def _block_events(self, index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        else:
            start = {"type": "text", "text": ""}
            text = block["text"]
            pieces = [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)]
            deltas = [{"type": "text_delta", "text": p} for p in pieces or [""]]
        events = [("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events
