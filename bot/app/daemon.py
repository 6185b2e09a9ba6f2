"""The daemon's lifecycle: services register bounded cleanups on one AsyncExitStack, all under one deadline.

Shutdown budget: from the first SIGTERM/SIGINT the process exits within ``http.drain_grace_s +
SHUTDOWN_MARGIN_S``. Every step (intake stop, drain, each cleanup) is bounded by what is left of that
one deadline, so slow services cannot add up. If the deadline passes anyway, or a second signal
arrives, the CLI process trees are killed and the process exits with ``FORCED_EXIT_CODE``; a
shutdown that finishes in time exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import structlog
from redis.exceptions import RedisError

from bot import procs
from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Transcripts
from bot.config import HttpConfig, Settings
from bot.core import Channel, Conversations, Courier, RouteProvider, Store, StoreError, ToolProvider
from bot.gateway.ledger import Ledger, Prices
from bot.gateway.proxy import Gateway
from bot.http import Api
from bot.jobs import Scheduler
from bot.pool import Pool
from bot.security import scrub_environ
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from bot.telemetry import Telemetry

log = structlog.get_logger(__name__)

# Time after the drain grace for stopping intake, closing services and exiting.
SHUTDOWN_MARGIN_S = 10.0
# Cleanups aim this far before the deadline, so a normal exit comes before the forced one.
EXIT_RESERVE_S = 1.0
# A cleanup reached after the deadline still gets this long, e.g. to close a socket.
CLEANUP_FLOOR_S = 0.1
# The pool reads a grace of 0 as "no limit"; this means "cancel now" either way.
NO_GRACE_S = 0.01
FORCED_EXIT_CODE = 1


def shutdown_budget_s(http: HttpConfig) -> float:
    """Longest time from the first stop signal to process exit."""
    return http.drain_grace_s + SHUTDOWN_MARGIN_S


class Deadline:
    """The one deadline every shutdown step shares; its clock starts at the stop request."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._at: float | None = None

    def start(self) -> None:
        if self._at is None:
            self._at = asyncio.get_running_loop().time() + self.budget_s

    def left_s(self) -> float:
        """Time a step may take now: what is left before the exit reserve, at least the floor."""
        self.start()  # an error unwinding the stack before any signal starts the clock too
        assert self._at is not None
        return max(self._at - asyncio.get_running_loop().time() - EXIT_RESERVE_S, CLEANUP_FLOOR_S)


def open_store(settings: Settings) -> Store:
    if settings.store.redis_url is not None:
        return RedisStore(settings.store.redis_url.get_secret_value(), settings.store.conversation_ttl_days)
    return SqliteStore(settings.store.data_dir / "agentd.db", settings.store.conversation_ttl_days)


def bounded(
    name: str,
    close: Callable[[], Awaitable[None]],
    deadline: Deadline,
    on_timeout: Callable[[], None] | None = None,
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A cleanup that gives up when the shared deadline says so, so one stuck service cannot hang shutdown."""

    async def run() -> None:
        limit_s = deadline.left_s()
        try:
            await asyncio.wait_for(close(), limit_s)
        except TimeoutError:
            log.error("cleanup_timeout", service=name, limit_s=round(limit_s, 3))
            if on_timeout is not None:
                on_timeout()

    return run


def kill_cli_trees(pids: Iterable[int]) -> None:
    for pid in pids:
        procs.kill_tree(pid)


@dataclass(frozen=True)
class Running:
    """The daemon's parts once it is ready (for embedding it, and for tests)."""

    pool: Pool
    api: Api
    gateway: Gateway | None
    transcripts: Transcripts | None = None


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    on_ready: Callable[[Running], None] | None = None,
) -> None:
    deadline = Deadline(shutdown_budget_s(settings.http))
    async with AsyncExitStack() as stack:
        store = open_store(settings)
        stack.push_async_callback(bounded("store", store.close, deadline))
        await _check_store(store)
        prices = Prices(settings.gateway.prices)
        _warn_unpriced(settings, prices)
        ledger = Ledger(store, settings.budget, prices)
        gateway = await _start_gateway(settings, ledger, stack, deadline)
        telemetry = start_telemetry(settings, stack, deadline)
        transcripts = await _open_transcripts(settings, stack, deadline)
        launcher = ClaudeLauncher(
            settings.agent,
            settings.config_file,
            gateway=gateway,
            telemetry=settings.telemetry,
            transcripts=transcripts,
        )
        pool = Pool(settings, launcher, store, telemetry=telemetry, transcripts=transcripts)
        channels = build_channels(settings, pool, store)
        mount_toolsets(launcher, channels)
        scheduler = build_scheduler(settings, pool, store, channels)
        if scheduler is not None:
            channels.append(scheduler)  # last: jobs fire once the channels they deliver to are up
        api = Api(
            settings.http,
            pool,
            store,
            channels=channels,
            routes=[route for c in channels if isinstance(c, RouteProvider) for route in c.routes()],
            scheduler=scheduler,
            ledger=ledger,
            mirror=transcripts,
        )
        await pool.start()
        stack.push_async_callback(bounded("pool", lambda: pool.close(NO_GRACE_S), deadline, _tree_killer(pool)))
        for channel in channels:
            await channel.start()
            stack.push_async_callback(bounded(channel.name, channel.close, deadline))
        await api.start()
        stack.push_async_callback(bounded("http", api.stop, deadline))
        log.info("ready", sandbox=settings.agent.sandbox_enabled, store=type(store).__name__, channels=len(channels))
        if started is not None:
            started.set()
        if on_ready is not None:
            on_ready(Running(pool, api, gateway, transcripts))
        await stop.wait()
        await _drain(pool, api, channels, settings.http.drain_grace_s, deadline)
    log.info("stopped")


async def _start_gateway(
    settings: Settings, ledger: Ledger, stack: AsyncExitStack, deadline: Deadline
) -> Gateway | None:
    """The model gateway, closed after the pool (the CLIs talk through it until they exit)."""
    if not settings.agent.gateway:
        log.warning("gateway_off", note="each CLI gets the real API key; no metering or budgets")
        return None
    gateway = Gateway(settings.agent, settings.gateway, ledger)
    await gateway.start()
    stack.push_async_callback(bounded("gateway", gateway.close, deadline))
    return gateway


def start_telemetry(settings: Settings, stack: AsyncExitStack, deadline: Deadline) -> Telemetry:
    """The turn-span exporter, closed (flushed) after the pool: the last turns' spans still go out."""
    telemetry = Telemetry.start(settings.telemetry)
    if telemetry.enabled:
        stack.push_async_callback(bounded("telemetry", lambda: asyncio.to_thread(telemetry.close), deadline))
    return telemetry


async def _drain(pool: Pool, api: Api, channels: list[Channel], grace_s: float, deadline: Deadline) -> None:
    """Refuse new messages, stop intake, let running turns finish within the grace (and the deadline)."""
    deadline.start()
    log.info("stopping", grace_s=grace_s, budget_s=deadline.budget_s)
    api.draining = True
    await _stop_intake(channels, deadline)
    drain_s = max(min(grace_s, deadline.left_s()), NO_GRACE_S)
    await bounded("drain", lambda: pool.close(grace_s=drain_s), deadline, _tree_killer(pool))()


def _tree_killer(pool: Pool) -> Callable[[], None]:
    def kill() -> None:
        # The pool's own close ran out of time before it killed them: do it here, before the process exits.
        kill_cli_trees(pool.live_pids())

    return kill


async def _stop_intake(channels: list[Channel], deadline: Deadline) -> None:
    # Channels are independent: they stop taking messages together, so the drain waits for the slowest only.
    async with asyncio.TaskGroup() as group:
        for channel in channels:
            group.create_task(bounded(f"{channel.name}:intake", channel.stop_intake, deadline)())


def build_channels(settings: Settings, conversations: Conversations, store: Store) -> list[Channel]:
    """Each configured channel, in start order; each imports its protocol library only when used."""
    channels: list[Channel] = []
    if settings.slack.enabled:
        from bot.slack import SlackChannel

        channels.append(SlackChannel(settings, settings.profile(settings.slack.profile), conversations, store))
    if settings.email.enabled:
        from bot.mail import EmailChannel

        channels.append(EmailChannel(settings, settings.profile(settings.email.profile), conversations, store))
    return channels


def mount_toolsets(launcher: ClaudeLauncher, channels: list[Channel]) -> None:
    """Before the pool starts: a process (a spare too) gets the in-process tools that exist when it starts."""
    for channel in channels:
        if isinstance(channel, ToolProvider):
            for name, tools in channel.toolsets().items():
                launcher.add_toolset(name, tools)


def build_scheduler(
    settings: Settings, conversations: Conversations, store: Store, channels: list[Channel]
) -> Scheduler | None:
    """The jobs, if any are scheduled, with every channel that can deliver their results."""
    if not settings.schedule:
        return None
    scheduler = Scheduler(settings, conversations, store)
    for channel in channels:
        if isinstance(channel, Courier):
            scheduler.add_courier(channel.name, channel)
    return scheduler


async def _open_transcripts(settings: Settings, stack: AsyncExitStack, deadline: Deadline) -> Transcripts | None:
    """With Redis, every transcript is mirrored there; say at once what would make that copy unsafe."""
    store = settings.store
    if store.redis_url is None:
        return None  # the embedded store: local disk is the only copy, and nothing else could resume it
    transcripts = Transcripts.from_url(
        store.redis_url.get_secret_value(), store.transcript_retention_days, store.transcript_flush
    )
    stack.push_async_callback(bounded("transcripts", transcripts.close, deadline))
    warning = unstable_data_dir(store.data_dir)
    if warning is not None:
        log.warning("data_dir_symlink", note=warning)
    try:
        for problem in (await transcripts.durability()).problems():
            log.warning("redis_not_durable", note=problem)
    except RedisError as exc:  # reported by /readyz through the store already
        log.warning("redis_durability_unknown", error=str(exc))
    return transcripts


def unstable_data_dir(data_dir: Path) -> str | None:
    """A warning if data_dir reaches its real path through a symlink.

    The SDK keys a mirrored transcript by the real path of the CLI's cwd (inside data_dir), so a
    symlink to a host-specific path (/data -> /mnt/disk-3f2a) makes another host look for the
    transcript under another key, and the conversation starts afresh there.
    """
    configured = Path(os.path.abspath(data_dir))
    real = data_dir.resolve()
    if configured == real:
        return None
    return (
        f"data_dir {configured} is a symlink to {real}: transcripts in Redis are keyed by the real path, "
        "so every host must resolve data_dir to that same path, or its conversations resume without history"
    )


def _warn_unpriced(settings: Settings, prices: Prices) -> None:
    """Every model a profile uses, once at start: a model with no price makes every cost figure a guess."""
    models = {settings.profile(name).model for name in settings.profile_names()}
    for model in sorted(m for m in models if m and not prices.known(m)):
        prices.warn_unknown(model)


async def _check_store(store: Store) -> None:
    try:
        await store.ping()
    except StoreError as exc:
        log.error("store_error", error=str(exc), note="starting anyway; /readyz reports it")


def run(settings: Settings) -> None:
    """Blocking entry point for ``agentd run``; returns after a clean shutdown, else the process exits 1."""
    dropped = scrub_environ(os.environ, settings.agent.env_passthrough)
    log.info("environment_scrubbed", dropped=len(dropped))
    if not settings.agent.sandbox_enabled:
        log.warning("sandbox_off", note="agent.sandbox = false: Bash runs without bubblewrap isolation")
    asyncio.run(_main(settings))


async def _main(settings: Settings) -> None:
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, force)
    # A plain task, not a TaskGroup: that would wrap serve()'s errors (a ConfigError exits 2) in an ExceptionGroup.
    guard = asyncio.create_task(_guard_exit(stop, force, shutdown_budget_s(settings.http)), name="exit-guard")
    try:
        await serve(settings, stop)
    finally:
        guard.cancel()


def _on_signal(stop: asyncio.Event, force: asyncio.Event) -> None:
    # Only events here; the guard task acts on them. The first signal stops, a second one forces.
    (force if stop.is_set() else stop).set()


async def _guard_exit(stop: asyncio.Event, force: asyncio.Event, budget_s: float) -> None:
    """After the first signal: force the exit at the deadline or at a second signal, whichever comes first."""
    await stop.wait()
    # A thread, not a task: a wedged event loop or a cleanup that ignores cancellation cannot delay it.
    # It is never cancelled, so it also bounds whatever runs after serve() returns.
    timer = threading.Timer(budget_s, force_exit, args=("shutdown_deadline",))
    timer.daemon = True
    timer.start()
    await force.wait()
    force_exit("second_signal")


def force_exit(reason: str) -> NoReturn:
    """Kill every process tree this daemon started (the CLI processes), then exit at once, skipping cleanup."""
    log.error("forced_exit", reason=reason, exit_code=FORCED_EXIT_CODE)
    try:
        children = psutil.Process().children()
    except psutil.Error:
        children = []
    kill_cli_trees(child.pid for child in children)
    os._exit(FORCED_EXIT_CODE)
