"""The model gateway: every CLI reaches the model through the daemon, which alone holds the real key.

Each CLI process gets the gateway's loopback URL as ``ANTHROPIC_BASE_URL`` and a
random credential of its own as ``ANTHROPIC_API_KEY``.  The gateway maps that
credential to the process's conversation (and the current turn's user and
channel), refuses unknown ones with 401, checks the budgets before each model
request, forwards only the paths the CLI really uses (see ``FORWARDED``; anything
else, dot segments and encoded slashes included, is refused with 403, since it would
reach the upstream with the real key, unmetered) to the upstream (SSE streamed
through byte for byte, errors passed through with their headers so the CLI's
own retries still work), and meters the ``usage`` of each response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from dataclasses import dataclass, field

import aiohttp
import structlog
from aiohttp import web

from bot import metrics
from bot.config import AgentConfig, GatewayConfig
from bot.core import BudgetStop, Caller, StoreError
from bot.gateway.ledger import Ledger, Usage

log = structlog.get_logger(__name__)

# Hop-by-hop headers, and the ones the gateway sets itself.
_DROP_REQUEST = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "content-length",
        "x-api-key",
        "authorization",
        "accept-encoding",
    }
)
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"})
# A metered SSE line longer than this is not parsed (its bytes still pass through): memory stays bounded.
MAX_METERED_LINE = 1 << 20
MAX_METERED_BODY = 16 << 20
CREDENTIAL_PREFIX = "agentd-gw-"
# The only requests forwarded, compared with the raw request target (before any decoding or dot
# removal), so what is checked is exactly what is forwarded. Logged from the bundled CLI: a turn and a
# warm-up send only ``POST /v1/messages?beta=true``; count_tokens is the one other endpoint it may call.
FORWARDED = frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")})
FORWARDED_QUERIES = frozenset({"", "beta=true"})


@dataclass
class _Line:
    """One CLI process's credential: who it is, and what its current turn has spent."""

    caller: Caller
    turn_spent_usd: float = 0.0
    stop: BudgetStop | None = None
    local: bool = False  # a spare warming up: answered here, never upstream


class UsageMeter:
    """Reads ``usage`` out of a response as it streams past, in time linear in its size."""

    def __init__(self, streaming: bool) -> None:
        self._streaming = streaming
        self._buffer = bytearray()
        self._skipping = False
        self.model = ""
        self.usage: dict[str, int] = {}
        self.finished = False  # message_stop seen: the usage is final

    def feed(self, chunk: bytes) -> None:
        if not self._streaming:
            if len(self._buffer) + len(chunk) <= MAX_METERED_BODY:
                self._buffer += chunk
            return
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._line(chunk[start:end])
            start = end + 1
        self._keep(chunk[start:])

    def _keep(self, partial: bytes) -> None:
        if self._skipping or len(self._buffer) + len(partial) > MAX_METERED_LINE:
            self._skipping, self._buffer = True, bytearray()
        else:
            self._buffer += partial

    def _line(self, tail: bytes) -> None:
        line = (bytes(self._buffer) + tail).rstrip(b"\r")
        skipping = self._skipping
        self._buffer, self._skipping = bytearray(), False
        if skipping or not line.startswith(b"data:"):
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if isinstance(event, dict):
            self._event(event)

    def _event(self, event: dict[str, object]) -> None:
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            assert isinstance(message, dict)
            self.model = str(message.get("model") or "")
            self._take(message.get("usage"))
        elif event.get("type") == "message_delta":
            self._take(event.get("usage"))
        elif event.get("type") == "message_stop":
            self.finished = True

    def _take(self, usage: object) -> None:
        if isinstance(usage, dict):
            # message_delta carries cumulative counts: the newest value of each wins.
            self.usage |= {k: int(v) for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}

    def result(self) -> Usage | None:
        if not self._streaming:
            try:
                body = json.loads(bytes(self._buffer))
            except ValueError:
                return None
            if isinstance(body, dict):
                self.model = str(body.get("model") or "")
                self._take(body.get("usage"))
        if not self.usage:
            return None
        return Usage(
            model=self.model,
            input_tokens=self.usage.get("input_tokens", 0),
            output_tokens=self.usage.get("output_tokens", 0),
            cache_creation_input_tokens=self.usage.get("cache_creation_input_tokens", 0),
            cache_read_input_tokens=self.usage.get("cache_read_input_tokens", 0),
        )


@dataclass
class Gateway:
    agent: AgentConfig
    config: GatewayConfig
    ledger: Ledger
    url: str = ""
    _lines: dict[str, _Line] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        # One pool of upstream connections for every CLI process.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=60),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600),
        )
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A CLI that hangs up (an interrupt) cancels the handler, which closes the upstream request.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        host, _, port = self.config.listen.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else int(port)
        self.url = f"http://{host}:{bound}"
        log.info("gateway_listening", url=self.url, upstream=self.agent.upstream)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.ledger.close()
        if self._session is not None:
            await self._session.close()

    # -- credentials ----------------------------------------------------------------------------

    def issue(self, caller: Caller) -> str:
        """A fresh credential for one CLI process."""
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        self._lines[credential] = _Line(caller)
        return credential

    def revoke(self, credential: str) -> None:
        self._lines.pop(credential, None)

    def begin_turn(self, credential: str, conversation_id: str, user: str, channel: str) -> None:
        """A new message on this process: its spend starts at 0, and it is billed to its sender."""
        line = self._lines.get(credential)
        if line is not None:
            line.caller = dataclasses.replace(line.caller, conversation_id=conversation_id, user=user, channel=channel)
            line.turn_spent_usd, line.stop, line.local = 0.0, None, False

    def answer_locally(self, credential: str, on: bool) -> None:
        """While on, this process's model requests get a canned answer from the gateway (a spare's warm-up)."""
        line = self._lines.get(credential)
        if line is not None:
            line.local = on

    def turn_spent(self, credential: str) -> float:
        line = self._lines.get(credential)
        return line.turn_spent_usd if line is not None else 0.0

    def stopped(self, credential: str) -> BudgetStop | None:
        """The budget that refused a request of the current turn, if one did."""
        line = self._lines.get(credential)
        return line.stop if line is not None else None

    # -- the proxy ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        line = self._lines.get(_credential(request))
        if line is None:
            return _error(401, "authentication_error", "unknown credential")
        if (refusal := _path_refusal(request)) is not None:
            log.warning("gateway_path_refused", method=request.method, path=request.raw_path[:200])
            return _error(403, "permission_error", f"agentd gateway: {refusal}", retry=False)
        if line.local and _is_model_request(request):
            return await _local_answer(request)
        if _is_model_request(request):
            try:
                stop = await self.ledger.check(line.caller, line.turn_spent_usd)
            except StoreError as exc:
                # Budgets that cannot be read are not waived: the CLI retries a 503, and the store may be back.
                metrics.STORE_ERRORS.inc()
                log.error("store_error", error=str(exc), note="budget check failed; request refused")
                return _error(503, "api_error", "agentd: the budget counters are unreachable (store down)")
            if stop is not None:
                return self._refuse(line, stop)
        return await self._forward(request, line)

    def _refuse(self, line: _Line, stop: BudgetStop) -> web.Response:
        line.stop = stop
        metrics.BUDGET_STOPS.labels(budget=stop.budget).inc()
        log.warning(
            "budget_stop",
            conversation=line.caller.conversation_id,
            budget=stop.budget,
            spent_usd=round(stop.spent_usd, 6),
            limit_usd=stop.limit_usd,
        )
        # 402 with x-should-retry false ends the CLI's turn at once, without retries, showing our text.
        return _error(402, "billing_error", f"agentd: {stop.text}", retry=False)

    async def _forward(self, request: web.Request, line: _Line) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        started = time.monotonic()
        model = _model_of(body) if _is_model_request(request) else ""
        try:
            upstream = await self._session.request(
                request.method,
                self.agent.upstream + request.raw_path,  # checked by _path_refusal: exact, no dot segments
                headers=self._upstream_headers(request),
                data=body or None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.MODEL_REQUESTS.labels(model=model or "none", status="unreachable").inc()
            return _error(502, "api_error", f"agentd gateway: the model API is unreachable ({type(exc).__name__})")
        except asyncio.CancelledError:
            # The CLI hung up (an interrupt) before the upstream answered: nothing was produced to bill.
            metrics.MODEL_REQUESTS.labels(model=model or "none", status="interrupted").inc()
            raise
        async with upstream:
            return await self._relay(request, upstream, line, model, started)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, line: _Line, model: str, started: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _DROP_RESPONSE:
                response.headers.add(name, value)
        await response.prepare(request)
        meter = UsageMeter("text/event-stream" in upstream.headers.get("content-type", ""))
        first_byte: float | None = None
        metered = False
        try:
            async for chunk in upstream.content.iter_any():
                first_byte = first_byte or time.monotonic()
                meter.feed(chunk)
                if meter.finished and not metered:
                    # Recorded before the CLI can see the end of the message, so the turn's cost is complete
                    # when the CLI reports the turn done.
                    metered = True
                    self._meter(line, meter, model, str(upstream.status), started, first_byte)
                await response.write(chunk)
        except aiohttp.ClientError as exc:
            # The upstream dropped mid-stream: end ours the same way, so the CLI retries as it would.
            log.warning("gateway_upstream_dropped", error=str(exc)[:200])
            if not metered:
                self._meter(line, meter, model, "dropped", started, first_byte)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            # The CLI hung up (an interrupt): the upstream bills what it already produced, so record it.
            if not metered:
                self._meter(line, meter, model, "interrupted", started, first_byte)
            raise
        if not metered:
            self._meter(line, meter, model, str(upstream.status), started, first_byte)
        await response.write_eof()
        return response

    def _meter(
        self, line: _Line, meter: UsageMeter, model: str, status: str, started: float, first_byte: float | None
    ) -> None:
        usage = meter.result()
        name = (usage.model if usage else "") or model or "none"
        metrics.MODEL_REQUESTS.labels(model=name, status=status).inc()
        if first_byte is not None:
            metrics.MODEL_FIRST_BYTE_SECONDS.observe(first_byte - started)
        metrics.MODEL_SECONDS.observe(time.monotonic() - started)
        if usage is not None:
            line.turn_spent_usd += self.ledger.record(line.caller, dataclasses.replace(usage, model=name))

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        # Uncompressed, so the stream passes through byte for byte and its usage can be read.
        headers["accept-encoding"] = "identity"
        if self.agent.auth_token is not None:
            headers["authorization"] = f"Bearer {self.agent.auth_token.get_secret_value()}"
        elif self.agent.api_key is not None:
            headers["x-api-key"] = self.agent.api_key.get_secret_value()
        return headers


async def _local_answer(request: web.Request) -> web.StreamResponse:
    """A minimal, free answer in the Messages API's own shape (streamed when asked to be)."""
    body = await request.read()
    model = _model_of(body) or "local"
    message: dict[str, object] = {
        "id": "msg_agentd_local",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    text = {"type": "text", "text": "OK"}
    if b'"stream":true' not in body.replace(b" ", b""):
        done = {**message, "content": [text], "stop_reason": "end_turn"}
        return web.json_response(done)
    events = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "OK"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 0},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for name, data in events:
        await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    await response.write_eof()
    return response


def _credential(request: web.Request) -> str:
    given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
    return given.strip()


def _path_refusal(request: web.Request) -> str | None:
    """Why this request is not forwarded, or None for an allowlisted one (checked on the raw target)."""
    path, _, query = request.raw_path.partition("?")
    lowered = path.lower()
    if "%2f" in lowered or "%2e" in lowered or "%5c" in lowered or "\\" in path:
        return "encoded slashes and dots are refused in the path"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "dot segments are refused in the path"
    if (request.method, path) not in FORWARDED or query not in FORWARDED_QUERIES:
        return f"{request.method} {path} is not forwarded (only the Messages API is)"
    return None


def _is_model_request(request: web.Request) -> bool:
    return request.method == "POST" and request.raw_path.partition("?")[0] == "/v1/messages"


def _model_of(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    return str(parsed.get("model") or "") if isinstance(parsed, dict) else ""


def _error(status: int, kind: str, message: str, retry: bool | None = None) -> web.Response:
    headers = {} if retry is None else {"x-should-retry": "true" if retry else "false"}
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)
