"""The daemon's lifecycle: services register bounded cleanups on one AsyncExitStack, all under one deadline.

How it stops (signals, the one deadline, the forced exit) is ``bot.app.shutdown``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import structlog
from redis.exceptions import RedisError

from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Transcripts
from bot.app.shutdown import NO_GRACE_S, Cleanups, Deadline, drain, shutdown_budget_s, tree_killer, until_signalled
from bot.config import Settings
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


def open_store(settings: Settings) -> Store:
    if settings.store.redis_url is not None:
        return RedisStore(settings.store.redis_url.get_secret_value(), settings.store.conversation_ttl_days)
    return SqliteStore(settings.store.data_dir / "agentd.db", settings.store.conversation_ttl_days)


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
        cleanups = Cleanups(stack, deadline)
        store = open_store(settings)
        cleanups.push("store", store.close)
        await _check_store(store)
        prices = Prices(settings.gateway.prices)
        _warn_unpriced(settings, prices)
        ledger = Ledger(store, settings.budget, prices)
        gateway = await _start_gateway(settings, ledger, cleanups)
        telemetry = start_telemetry(settings, cleanups)
        transcripts = await _open_transcripts(settings, cleanups)
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
        cleanups.push("pool", lambda: pool.close(NO_GRACE_S), tree_killer(pool))
        for channel in channels:
            await channel.start()
            cleanups.push(channel.name, channel.close)
        await api.start()
        cleanups.push("http", api.stop)
        log.info("ready", sandbox=settings.agent.sandbox_enabled, store=type(store).__name__, channels=len(channels))
        if started is not None:
            started.set()
        if on_ready is not None:
            on_ready(Running(pool, api, gateway, transcripts))
        await stop.wait()
        await drain(pool, api, channels, settings.http.drain_grace_s, deadline)
    log.info("stopped")


async def _start_gateway(settings: Settings, ledger: Ledger, cleanups: Cleanups) -> Gateway | None:
    """The model gateway, closed after the pool (the CLIs talk through it until they exit)."""
    if not settings.agent.gateway:
        log.warning("gateway_off", note="each CLI gets the real API key; no metering or budgets")
        return None
    gateway = Gateway(settings.agent, settings.gateway, ledger)
    await gateway.start()
    cleanups.push("gateway", gateway.close)
    return gateway


def start_telemetry(settings: Settings, cleanups: Cleanups) -> Telemetry:
    """The turn-span exporter, closed (flushed) after the pool: the last turns' spans still go out."""
    telemetry = Telemetry.start(settings.telemetry)
    if telemetry.enabled:
        cleanups.push("telemetry", lambda: asyncio.to_thread(telemetry.close))
    return telemetry


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


async def _open_transcripts(settings: Settings, cleanups: Cleanups) -> Transcripts | None:
    """With Redis, every transcript is mirrored there; say at once what would make that copy unsafe."""
    store = settings.store
    if store.redis_url is None:
        return None  # the embedded store: local disk is the only copy, and nothing else could resume it
    transcripts = Transcripts.from_url(
        store.redis_url.get_secret_value(), store.transcript_retention_days, store.transcript_flush
    )
    cleanups.push("transcripts", transcripts.close)
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
    asyncio.run(until_signalled(lambda stop: serve(settings, stop), shutdown_budget_s(settings.http)))
