"""The HTTP server: health, readiness, metrics, the /status page and the authenticated /v1 API (aiohttp)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import html
import json
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot import guard
from bot.config import ConfigError, HttpConfig
from bot.core import (
    Channel,
    Conversations,
    Failure,
    Inbound,
    MirrorHealth,
    Outcome,
    Route,
    SessionInfo,
    StatusReporter,
    Store,
    StoreError,
)
from bot.jobs import JobError, JobInfo, JobRun
from bot.receipts import KeyReused, Receipt, Receipts
from bot.status import MirrorStatus, PoolStatus, SessionStatus, StatusSnapshot

log = structlog.get_logger(__name__)

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
# As Stripe's: up to 255 printable ASCII characters, chosen by the client (a UUID, say).
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
STATUS = {
    Failure.BUSY: 409,
    Failure.INTERRUPTED: 409,
    Failure.QUEUE_FULL: 429,
    Failure.SHUTDOWN: 503,
    Failure.STORE: 503,
    Failure.CRASHED: 502,
    Failure.MEMORY: 502,
    Failure.AGENT_ERROR: 502,
    Failure.TIMEOUT: 504,
    Failure.BUDGET: 402,
    Failure.POOL_BUSY: 503,
    Failure.USER_LIMIT: 429,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
USAGE_DIMENSIONS = ("conversation", "user", "profile", "channel", "day")
T = TypeVar("T")
DRAINING_BODY = {
    "error": "the daemon is shutting down; send this message again once it is back",
    "failure": str(Failure.SHUTDOWN),
}


# The page's browser credential: an HMAC of the API token (never the token itself), sent only by the browser.
STATUS_COOKIE = "agentd_status"
# Paths a browser reaches with the cookie; both are read-only, so a cookie cannot be used to act (no CSRF).
COOKIE_PATHS = frozenset({"/status", "/v1/status"})


class BadRequest(Exception):
    """A client error, answered as 400 with this message."""


class NotFound(Exception):
    """No such job (or no jobs at all), answered as 404 with this message."""


class Unprocessable(Exception):
    """A well-formed request the daemon will not run (an Idempotency-Key reused), answered as 422."""


def outcome_body(outcome: Outcome) -> dict[str, Any]:
    body: dict[str, Any] = {
        "reply": outcome.reply,
        "session_id": outcome.session_id,
        "cost_usd": round(outcome.cost_usd, 6),
        "turns": outcome.turns,
    }
    if not outcome.ok:
        body |= {"error": outcome.error, "failure": str(outcome.failure)}
    return body


class Engine(Conversations, Protocol):
    """What the API serves from: the conversations, and the engine's snapshot and session list."""

    def status(self) -> PoolStatus: ...

    async def sessions(self) -> list[SessionInfo]: ...


async def with_keepalive(deltas: AsyncIterator[str], every_s: float) -> AsyncGenerator[str | None, None]:
    """The deltas, and a None each time ``every_s`` passes without one.

    The wait runs in a task of its own, so a keep-alive tick does not cancel the stream it waits on.
    """
    pending: asyncio.Future[str | None] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(deltas, None))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            text, pending = pending.result(), None
            if text is None:
                return
            yield text
    finally:
        if pending is not None:
            pending.cancel()


class Jobs(Protocol):
    """What the API asks of the scheduler (``bot.jobs.Scheduler``)."""

    async def jobs(self) -> list[JobInfo]: ...

    async def history(self, job_id: str) -> list[JobRun]: ...

    async def run_now(self, job_id: str) -> JobRun: ...

    async def pause(self, job_id: str) -> None: ...

    async def resume(self, job_id: str) -> None: ...


class Spending(Protocol):
    """What the API asks of the ledger (``bot.gateway.ledger.Ledger``)."""

    async def spent_today(self, dimension: str, values: list[str]) -> dict[str, float]: ...

    async def report(self, by: str) -> dict[str, float]: ...


class Door:
    """Open until the daemon drains: then new work is refused (503) and /readyz says so."""

    def __init__(self) -> None:
        self.draining = False

    def refusal(self) -> web.Response | None:
        # New work is refused at the door; turns already running finish within the drain grace.
        return web.json_response(DRAINING_BODY, status=STATUS[Failure.SHUTDOWN]) if self.draining else None


class Api:
    """The HTTP server: complete when built, with every part it reports on and every component's route passed in.

    It serves the probes itself; the rest is its route providers': the status page, the conversations,
    the usage report and the jobs. ``Access`` guards all of them, the components' own routes too.
    """

    def __init__(
        self,
        config: HttpConfig,
        pool: Engine,
        store: Store,
        *,
        channels: Sequence[Channel] = (),
        routes: Sequence[Route] = (),
        scheduler: Jobs | None = None,
        ledger: Spending | None = None,
        mirror: MirrorHealth | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        if config.api_token is None and not config.is_loopback:
            raise ConfigError(
                "http.api_token (AGENTD_API_TOKEN) is required when http.listen is not a loopback address"
            )
        self._config, self._store = config, store
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._routes = tuple(routes)  # components' own endpoints (Slack HTTP Events); each authenticates itself
        self.port: int | None = None
        self._door = Door()
        page = StatusPage.load(config)
        self._access = Access(config, page)
        self._status = StatusRoutes(
            config, self._access, page, pool, channels=channels, jobs=scheduler, spending=ledger, mirror=mirror
        )
        self._providers = (
            self._status,
            ConversationRoutes(config, pool, self._door, receipts),
            UsageRoutes(ledger),
            JobRoutes(scheduler, self._door),
        )

    @property
    def draining(self) -> bool:
        return self._door.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._door.draining = value

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=self._access.middlewares(), client_max_size=self._config.max_text_chars * 4 + 65536
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        for provider in self._providers:
            for route in provider.routes():
                if route.method == "GET":
                    app.router.add_get(route.path, route.handler)  # and HEAD, as aiohttp does for a GET
                else:
                    app.router.add_route(route.method, route.path, route.handler)
        for route in self._routes:
            app.router.add_route(route.method, route.path, route.handler)
        return app

    async def start(self) -> None:
        # aiohttp's keep-alive timer runs from the connection's start until a request's headers are
        # complete, so it is also the header timeout: a client that sends one header and stops is closed.
        self._runner = web.AppRunner(
            self.app(), access_log=None, shutdown_timeout=5.0, keepalive_timeout=self._config.header_timeout_s
        )
        await self._runner.setup()
        server, cap = self._runner.server, self._config.max_connections
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            return _Refuse() if len(server.connections) >= cap else server()

        self._listener = await asyncio.get_running_loop().create_server(
            connection, self._config.host, self._config.port, reuse_address=True
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("http_listening", host=self._config.host, port=self.port, auth=self._config.api_token is not None)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def status(self) -> StatusSnapshot:
        return await self._status.status()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._door.draining:
            return web.json_response({"status": "draining"}, status=503)
        try:
            await self._store.ping()
        except StoreError as exc:
            return web.json_response({"status": "store unavailable", "error": str(exc)}, status=503)
        return web.json_response({"status": "ready"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class Access:
    """Who may call what: refusals before any handler or parser, then the API token (or the page's cookie)."""

    def __init__(self, config: HttpConfig, page: StatusPage) -> None:
        self._config, self._page = config, page
        self._hosts = guard.allowed_hosts(config.host)

    def middlewares(self) -> list[Middleware]:
        return [self._guard, self._auth]

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuses, before any handler or parser: foreign browsers, non-JSON API bodies, nesting bombs."""
        if self._config.api_token is None and (refusal := self._foreign(request)) is not None:
            log.warning("http_refused", reason=refusal, host=request.host[:100], path=request.path[:100])
            return web.json_response({"error": refusal}, status=403)
        if not request.body_exists:
            return await handler(request)
        form = request.content_type == "application/x-www-form-urlencoded"
        if request.path.startswith("/v1/") and request.content_type != "application/json":
            return web.json_response({"error": "the API takes only application/json bodies"}, status=415)
        try:
            async with asyncio.timeout(self._config.body_timeout_s):
                body = await request.read()  # bounded by client_max_size (413 above it)
        except TimeoutError:
            return web.json_response({"error": "the request body was not sent in time"}, status=408)
        if (guard.form_depth_exceeds if form else guard.json_depth_exceeds)(body):
            return web.json_response({"error": f"body nested deeper than {guard.MAX_JSON_DEPTH} levels"}, status=400)
        return await handler(request)

    def _foreign(self, request: web.Request) -> str | None:
        """Why a request is not from this machine's own clients (checked only without an API token)."""
        if guard.host_name(request.headers.get("Host", "")) not in self._hosts:
            return "Host is not this daemon's address (a loopback name or http.listen)"
        origin = request.headers.get("Origin")
        if origin is not None and guard.origin_host(origin) not in self._hosts:
            return "cross-site requests are refused (Origin is not this daemon)"
        return None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = self._authorized(request) or (
            request.method == "GET" and request.path in COOKIE_PATHS and self._cookie_authorized(request)
        )
        if request.path == "/status" and not allowed:
            return self._page.login(status=401)
        if request.path.startswith("/v1/") and not allowed:
            return web.json_response({"error": "missing or invalid bearer token"}, status=401)
        try:
            return await handler(request)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except NotFound as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except Unprocessable as exc:
            return web.json_response({"error": str(exc)}, status=422)
        except StoreError as exc:
            return web.json_response({"error": f"the store is unreachable: {exc}"}, status=503)

    def _authorized(self, request: web.Request) -> bool:
        token = self._config.api_token
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def cookie_value(self) -> str | None:
        """The page's cookie: an HMAC of the API token, never the token itself; None without a token."""
        token = self._config.api_token
        if token is None:
            return None
        return hmac.new(token.get_secret_value().encode(), b"agentd status page", hashlib.sha256).hexdigest()

    def _cookie_authorized(self, request: web.Request) -> bool:
        expected = self.cookie_value()
        given = request.cookies.get(STATUS_COOKIE, "")
        return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


class StatusRoutes:
    """The /status page, its sign-in form, and the snapshot of every part that it shows (/v1/status)."""

    def __init__(
        self,
        config: HttpConfig,
        access: Access,
        page: StatusPage,
        pool: Engine,
        *,
        channels: Sequence[Channel],
        jobs: Jobs | None,
        spending: Spending | None,
        mirror: MirrorHealth | None,
    ) -> None:
        self._config, self._access, self._page, self._pool = config, access, page, pool
        self._channels = tuple(channels)
        self._jobs, self._spending = jobs, spending
        self._mirror = mirror  # the Redis transcript mirror, when there is one
        self._sign_ins = guard.SignInLimiter()

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/status", self._status_page),
            Route("POST", "/status/login", self._status_login),
            Route("GET", "/v1/status", self._status_json),
        ]

    async def _status_page(self, request: web.Request) -> web.Response:
        return self._page.page()

    async def _status_login(self, request: web.Request) -> web.Response:
        """The page's sign-in form posts the API token here; the answer sets the page's cookie."""
        token = self._config.api_token
        expected = self._access.cookie_value()
        if token is None or expected is None:
            raise web.HTTPSeeOther("/status")
        if wait := self._sign_ins.take(request.remote or ""):
            log.warning("status_sign_in_limited", client=request.remote)
            retry_after = {"Retry-After": str(math.ceil(wait))}
            return web.json_response({"error": "too many sign-in attempts"}, status=429, headers=retry_after)
        if request.content_type != "application/x-www-form-urlencoded":
            raise BadRequest("sign in with the page's form (application/x-www-form-urlencoded)")
        try:
            form = await request.post()
        except ValueError:
            raise BadRequest("the sign-in form could not be read") from None
        given = form.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()
        ):
            return self._page.login(status=401, error="That token is not the daemon's API token.")
        response = web.HTTPSeeOther("/status")
        response.set_cookie(STATUS_COOKIE, expected, httponly=True, samesite="Strict", path="/", secure=request.secure)
        raise response

    async def _status_json(self, request: web.Request) -> web.Response:
        snapshot = await self.status()
        return web.json_response(dataclasses.asdict(snapshot), headers={"Cache-Control": "no-store"})

    async def status(self) -> StatusSnapshot:
        """One snapshot of every part; what the store cannot answer now is left out and named in ``problems``."""
        problems: list[str] = []
        pool = self._pool.status()
        sessions = await self._with_costs(pool.sessions, problems)
        channels = tuple([await c.status() for c in self._channels if isinstance(c, StatusReporter)])
        jobs: tuple[JobInfo, ...] = ()
        if self._jobs is not None:
            try:
                jobs = tuple(await self._jobs.jobs())
            except StoreError as exc:
                problems.append(f"jobs: the store is unreachable ({exc})")
        mirror = None
        if self._mirror is not None:
            mirror = MirrorStatus(self._mirror.mirror_errors, self._mirror.last_mirror_error)
        return StatusSnapshot(
            time.time(), dataclasses.replace(pool, sessions=sessions), channels, jobs, tuple(problems), mirror
        )

    async def _with_costs(self, sessions: tuple[SessionStatus, ...], problems: list[str]) -> tuple[SessionStatus, ...]:
        if self._spending is None:
            return sessions
        try:
            spent = await self._spending.spent_today("conversation", [s.conversation_id for s in sessions])
        except StoreError as exc:
            problems.append(f"cost today: the store is unreachable ({exc})")
            return sessions
        return tuple(dataclasses.replace(s, cost_today_usd=round(spent[s.conversation_id], 6)) for s in sessions)


class ConversationRoutes:
    """The conversation API: a message in, its reply out (one JSON body, or streamed as server-sent events)."""

    def __init__(self, config: HttpConfig, pool: Engine, door: Door, receipts: Receipts | None) -> None:
        self._config, self._pool, self._door, self._receipts = config, pool, door, receipts

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/conversations/{conversation_id}/messages", self._message),
            Route("GET", "/v1/conversations/{conversation_id}/messages/{key}", self._keyed_outcome),
            Route("GET", "/v1/sessions", self._sessions),
        ]

    async def _sessions(self, request: web.Request) -> web.Response:
        rows = [dataclasses.asdict(r) for r in await self._pool.sessions()]
        return web.json_response({"sessions": rows})

    async def _message(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._door.refusal()) is not None:
            return refusal
        inbound = await self._parse_message(request)
        key = request.headers.get("Idempotency-Key")
        if key is None:
            turn = await self._pool.submit(inbound)
            return await self._answer(request, turn.stream(), turn.outcome)
        receipt = await self._receipt(inbound, key)
        if receipt.outcome is None:
            return _elsewhere(request, key)
        return await self._answer(request, receipt.deltas or _nothing_until(receipt.outcome), receipt.outcome)

    async def _receipt(self, inbound: Inbound, key: str) -> Receipt:
        if not IDEMPOTENCY_KEY.match(key):
            raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters (a UUID, say)")
        if self._receipts is None:
            raise BadRequest("Idempotency-Key needs the daemon's durable intake, which this server has not")
        try:
            return await self._receipts.submit(inbound, key)
        except KeyReused as exc:
            raise Unprocessable(str(exc)) from None

    async def _keyed_outcome(self, request: web.Request) -> web.Response:
        conversation_id, key = request.match_info["conversation_id"], request.match_info["key"]
        receipt = await self._receipts.lookup(f"api:{conversation_id}", key) if self._receipts else None
        if receipt is None:
            raise NotFound("no message with this Idempotency-Key (never sent, or its outcome expired)")
        if receipt.outcome is None or not receipt.outcome.done():
            return web.json_response({"status": "running"}, status=202, headers={"Retry-After": "1"})
        return web.json_response({"status": "done"} | outcome_body(receipt.outcome.result()))

    async def _answer(
        self, request: web.Request, deltas: AsyncIterator[str], pending: Awaitable[Outcome]
    ) -> web.StreamResponse:
        if "text/event-stream" not in request.headers.get("Accept", ""):
            outcome = await pending
            return web.json_response(
                outcome_body(outcome), status=STATUS.get(outcome.failure, 200) if outcome.failure else 200
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        # A comment while the turn is silent (a long tool call), so idle-timeout proxies keep the stream.
        # Closed at once if the client goes away mid-stream, so no wait is left pending.
        async with contextlib.aclosing(with_keepalive(deltas, self._config.sse_keepalive_s)) as ticks:
            async for text in ticks:
                await response.write(b": keep-alive\n\n" if text is None else _sse("delta", {"text": text}))
        outcome = await pending
        await response.write(_sse("result" if outcome.ok else "error", outcome_body(outcome)))
        await response.write_eof()
        return response

    async def _parse_message(self, request: web.Request) -> Inbound:
        conversation_id = request.match_info["conversation_id"]
        if not CONVERSATION_ID.match(conversation_id):
            raise BadRequest("conversation id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest('body must be JSON: {"text": "..."}') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("field 'text' must be a non-empty string")
        if len(text) > self._config.max_text_chars:
            raise BadRequest(f"field 'text' is longer than {self._config.max_text_chars} characters")
        return Inbound(conversation_id=f"api:{conversation_id}", text=text, source="api", user="api")


def _elsewhere(request: web.Request, key: str) -> web.Response:
    """Accepted earlier and not finished by this process: its outcome is looked up later, never run twice."""
    location = f"{request.path}/{quote(key, safe='')}"
    return web.json_response(
        {"status": "running", "error": "this message was accepted before and is still running; GET its outcome"},
        status=202,
        headers={"Location": location, "Retry-After": "1"},
    )


async def _nothing_until(pending: Awaitable[Outcome]) -> AsyncIterator[str]:
    """No deltas (a retry's turn streams to its first caller), over once the outcome is known."""
    await pending
    return
    yield


class UsageRoutes:
    """The metered cost report (/v1/usage), by one dimension."""

    def __init__(self, spending: Spending | None) -> None:
        self._spending = spending

    def routes(self) -> list[Route]:
        return [Route("GET", "/v1/usage", self._usage)]

    async def _usage(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "conversation")
        if by not in USAGE_DIMENSIONS:
            raise BadRequest(f"by must be one of {', '.join(USAGE_DIMENSIONS)}")
        if self._spending is None:
            raise NotFound("metering is off (agent.gateway = false)")
        totals = await self._spending.report(by)
        return web.json_response({"by": by, "usage_usd": {k: round(v, 6) for k, v in totals.items()}})


class JobRoutes:
    """The scheduled jobs: list them, their runs, and run, pause or resume one."""

    def __init__(self, jobs: Jobs | None, door: Door) -> None:
        self._jobs, self._door = jobs, door

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/jobs", self._list),
            Route("GET", "/v1/jobs/{job_id}/runs", self._job_runs),
            Route("POST", "/v1/jobs/{job_id}/{action}", self._job_action),
        ]

    async def _list(self, request: web.Request) -> web.Response:
        infos = await self._jobs.jobs() if self._jobs is not None else []
        return web.json_response({"jobs": [dataclasses.asdict(info) for info in infos]})

    async def _job_runs(self, request: web.Request) -> web.Response:
        runs = await self._job_call(request, lambda scheduler, job_id: scheduler.history(job_id))
        return web.json_response({"runs": [run.to_json() for run in runs]})

    async def _job_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "run":
            if (refusal := self._door.refusal()) is not None:
                return refusal
            run = await self._job_call(request, lambda scheduler, job_id: scheduler.run_now(job_id))
            return web.json_response({"run": run.to_json()})
        if action not in ("pause", "resume"):
            return web.json_response({"error": f"unknown action {action!r}: run, pause or resume"}, status=404)
        control = self._pause if action == "pause" else self._resume
        await self._job_call(request, control)
        return web.json_response({"job": request.match_info["job_id"], "paused": action == "pause"})

    @staticmethod
    async def _pause(scheduler: Jobs, job_id: str) -> None:
        await scheduler.pause(job_id)

    @staticmethod
    async def _resume(scheduler: Jobs, job_id: str) -> None:
        await scheduler.resume(job_id)

    async def _job_call(self, request: web.Request, call: Callable[[Jobs, str], Awaitable[T]]) -> T:
        job_id = request.match_info["job_id"]
        if self._jobs is None:
            raise NotFound("no jobs are scheduled (no [[schedule]] entries)")
        try:
            return await call(self._jobs, job_id)
        except JobError as exc:
            raise NotFound(str(exc)) from None


class StatusPage:
    """The page and its sign-in form: static files from the package, sent with a strict CSP.

    The page holds no data (its script fetches ``/v1/status``) and runs only its own inline script and
    style, pinned by hash: even a conversation id that got past the escaping could not run script.
    """

    def __init__(self, page: str, login: str) -> None:
        self._page, self._login = page, login
        self._csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src {_inline_hash(page, 'script')}",
                f"style-src {_inline_hash(page, 'style')} {_inline_hash(login, 'style')}",
                "connect-src 'self'",
                "form-action 'self'",
                "base-uri 'none'",
                "frame-ancestors 'none'",
            ]
        )

    @classmethod
    def load(cls, config: HttpConfig) -> StatusPage:
        static = resources.files("bot") / "static"
        where = "only on loopback" if config.is_loopback else "beyond loopback"
        reach = f"This daemon listens {where} ({html.escape(config.listen)}) and has an API token set"
        login = (static / "login.html").read_text("utf-8").replace("{reach}", reach)
        return cls((static / "status.html").read_text("utf-8"), login)

    def page(self) -> web.Response:
        return self._html(self._page, 200)

    def login(self, status: int, error: str = "") -> web.Response:
        return self._html(self._login.replace("{error}", html.escape(error)), status)

    def _html(self, body: str, status: int) -> web.Response:
        headers = {
            "Content-Security-Policy": self._csp,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=headers)


def _inline_hash(document: str, tag: str) -> str:
    """The CSP source for the one inline ``<tag>`` element of our own static document."""
    start = document.index(f"<{tag}>") + len(tag) + 2
    body = document[start : document.index(f"</{tag}>", start)]
    return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"


class _Refuse(asyncio.Protocol):
    """A connection beyond ``http.max_connections``: answered 503 and closed, before any parsing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        transport.close()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
