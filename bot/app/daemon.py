"""The daemon's lifecycle: build (``wiring``), start in order, serve until stopped, drain (``shutdown``).

Services register bounded cleanups on one AsyncExitStack, all under one deadline; how the daemon stops
(signals, that deadline, the forced exit) is ``bot.app.shutdown``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import structlog

from bot.agent.transcripts import Transcripts
from bot.app import datadir, wiring
from bot.app.shutdown import NO_GRACE_S, Cleanups, Deadline, drain, shutdown_budget_s, tree_killer, until_signalled
from bot.config import Settings
from bot.core import StoreError
from bot.gateway.ledger import Prices
from bot.gateway.proxy import Gateway
from bot.http import Api
from bot.pool import Pool
from bot.security import scrub_environ

log = structlog.get_logger(__name__)


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
        stack.enter_context(datadir.hold(settings.store.data_dir))  # first: nothing is opened by a second daemon
        cleanups = Cleanups(stack, deadline)
        services = await wiring.open_services(settings, cleanups)
        await _report_at_start(settings, services)
        fleet = await wiring.open_fleet(settings, services.store, cleanups)
        daemon = wiring.build_daemon(settings, services, fleet)
        await _start(daemon, cleanups)
        log.info(
            "ready",
            sandbox=settings.agent.sandbox_enabled,
            store=type(services.store).__name__,
            channels=len(daemon.channels),
        )
        if started is not None:
            started.set()
        if on_ready is not None:
            on_ready(Running(daemon.pool, daemon.api, services.gateway, services.transcripts))
        await stop.wait()
        await drain(daemon.pool, daemon.api, daemon.channels, settings.http.drain_grace_s, deadline)
    log.info("stopped")


async def _start(daemon: wiring.Daemon, cleanups: Cleanups) -> None:
    """The pool first (channels submit to it), then the channels, then the API; each then registers its close.

    The receipts close after the pool (every outcome is known by then, so the last ones are recorded),
    and replay what an earlier run accepted and never finished before any new message is taken.
    """
    pool, receipts = daemon.pool, daemon.receipts
    cleanups.push("receipts", receipts.close)
    await pool.start()
    cleanups.push("pool", lambda: pool.close(NO_GRACE_S), tree_killer(pool))
    await receipts.replay()
    for channel in daemon.channels:
        await channel.start()
        cleanups.push(channel.name, channel.close)
    await daemon.api.start()
    cleanups.push("http", daemon.api.stop)


async def _report_at_start(settings: Settings, services: wiring.Services) -> None:
    """Once at start, what an operator should know before the first message: the daemon starts anyway."""
    if services.gateway is None:
        log.warning("gateway_off", note="each CLI gets the real API key; no metering or budgets")
    _warn_unpriced(settings, services.prices)
    try:
        await services.store.ping()
    except StoreError as exc:
        log.error("store_error", error=str(exc), note="starting anyway; /readyz reports it")


def _warn_unpriced(settings: Settings, prices: Prices) -> None:
    """Every model a profile uses: a model with no price makes every cost figure a guess."""
    models = {settings.profile(name).model for name in settings.profile_names()}
    for model in sorted(m for m in models if m and not prices.known(m)):
        prices.warn_unknown(model)


def run(settings: Settings) -> None:
    """Blocking entry point for ``agentd run``; returns after a clean shutdown, else the process exits 1."""
    dropped = scrub_environ(os.environ, settings.agent.env_passthrough)
    log.info("environment_scrubbed", dropped=len(dropped))
    if not settings.agent.sandbox_enabled:
        log.warning("sandbox_off", note="agent.sandbox = false: Bash runs without bubblewrap isolation")
    asyncio.run(until_signalled(lambda stop: serve(settings, stop), shutdown_budget_s(settings.http)))
