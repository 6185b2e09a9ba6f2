"""The daemon's lifecycle: every service registers its own bounded cleanup on one AsyncExitStack."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import structlog

from bot.agent import ClaudeLauncher
from bot.config import Settings
from bot.core import Channel
from bot.http import Api
from bot.pool import Pool
from bot.security import scrub_environ
from bot.store import SqliteStore, Store, StoreError
from bot.store_redis import RedisStore

log = structlog.get_logger(__name__)

CLEANUP_LIMIT_S = 20.0


def open_store(settings: Settings) -> Store:
    if settings.store.redis_url is not None:
        return RedisStore(settings.store.redis_url.get_secret_value(), settings.store.conversation_ttl_days)
    return SqliteStore(settings.store.data_dir / "agentd.db", settings.store.conversation_ttl_days)


def bounded(
    name: str, close: Callable[[], Awaitable[None]], limit_s: float = CLEANUP_LIMIT_S
) -> Callable[[], Awaitable[None]]:
    """A cleanup that gives up after ``limit_s`` so one stuck service cannot hang shutdown."""

    async def run() -> None:
        try:
            await asyncio.wait_for(close(), limit_s)
        except TimeoutError:
            log.error("cleanup_timeout", service=name, limit_s=limit_s)

    return run


async def serve(settings: Settings, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
    grace = settings.http.drain_grace_s
    async with AsyncExitStack() as stack:
        store = open_store(settings)
        stack.push_async_callback(bounded("store", store.close))
        await _check_store(store)
        pool = Pool(settings, ClaudeLauncher(settings.agent), store)
        await pool.start()
        stack.push_async_callback(bounded("pool", lambda: pool.close(grace_s=0), limit_s=grace + CLEANUP_LIMIT_S))
        api = Api(settings.http, pool, store)
        channels = build_channels(settings, pool, store, api)
        for channel in channels:
            await channel.start()
            stack.push_async_callback(bounded(channel.name, channel.close, limit_s=grace + CLEANUP_LIMIT_S))
        await api.start()
        stack.push_async_callback(bounded("http", api.stop))
        log.info("ready", sandbox=settings.agent.sandbox_enabled, store=type(store).__name__, channels=len(channels))
        if started is not None:
            started.set()
        await stop.wait()
        log.info("stopping", grace_s=grace)
        api.draining = True
        for channel in channels:
            await bounded(f"{channel.name}:intake", channel.stop_intake)()
        await bounded("drain", lambda: pool.close(grace_s=grace), limit_s=grace + CLEANUP_LIMIT_S)()
    log.info("stopped")


def build_channels(settings: Settings, pool: Pool, store: Store, api: Api) -> list[Channel]:
    """Each configured channel, in start order; each imports its protocol library only when used."""
    channels: list[Channel] = []
    if settings.slack.enabled:
        from bot.slack import SlackChannel

        channels.append(SlackChannel(settings, pool, store, api))
    if settings.email.enabled:
        from bot.mail import EmailChannel

        channels.append(EmailChannel(settings, pool, store, api))
    return channels


async def _check_store(store: Store) -> None:
    try:
        await store.ping()
    except StoreError as exc:
        log.error("store_error", error=str(exc), note="starting anyway; /readyz reports it")


def run(settings: Settings) -> None:
    """Blocking entry point for ``agentd run``."""
    dropped = scrub_environ(os.environ, settings.agent.env_passthrough)
    log.info("environment_scrubbed", dropped=len(dropped))
    if not settings.agent.sandbox_enabled:
        log.warning("sandbox_off", note="Bash runs without bubblewrap isolation; install bubblewrap and socat")
    asyncio.run(_main(settings))


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)
