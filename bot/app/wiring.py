"""What the daemon is built of, in one place: ``agentd run`` and ``agentd once`` build their services here.

Each component registers its own cleanup (``shutdown.Cleanups``) as soon as it is open, so an error
half-way closes what was opened, in reverse order. The config is built once by the caller and passed in.
``open_services`` is what both commands share: store, ledger, gateway, telemetry, transcript mirror and
launcher. ``build_daemon`` adds what only ``agentd run`` has: the pool, the channels, the jobs and the API.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import structlog
from redis.exceptions import RedisError

from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Transcripts
from bot.app.shutdown import Cleanups
from bot.config import Settings
from bot.core import Channel, Conversations, Courier, Duty, Intake, Route, RouteProvider, Store, ToolProvider
from bot.fleet.duty import LeasedDuty, SoleDuty
from bot.fleet.lease import Leases
from bot.fleet.name import ReplicaName
from bot.gateway.ledger import Ledger, Prices
from bot.gateway.proxy import Gateway
from bot.http import Api
from bot.jobs import Scheduler
from bot.pool import Pool
from bot.receipts import Receipts
from bot.store.intake import RedisIntake, SqliteIntake
from bot.store.redis import RedisStore
from bot.store.redis import connect as redis_connect
from bot.store.sqlite import SqliteStore
from bot.telemetry import Telemetry

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Services:
    """What runs a CLI process with the daemon's isolation, gateway and budgets; open until the stack closes."""

    store: Store
    prices: Prices
    ledger: Ledger
    gateway: Gateway | None
    telemetry: Telemetry
    transcripts: Transcripts | None
    launcher: ClaudeLauncher


@dataclass(frozen=True)
class Daemon:
    """What ``agentd run`` adds on top of the services: built, not started (``daemon.serve`` starts them)."""

    pool: Pool
    channels: list[Channel]  # in start order; the scheduler, if any, last
    api: Api
    receipts: Receipts  # keyed API messages: replayed once the pool is up, closed after it


async def open_services(
    settings: Settings, cleanups: Cleanups, *, mirror: bool = True, own_gateway_port: bool = False
) -> Services:
    """The shared services, closed in reverse order: the gateway and telemetry after the pool, the store last.

    ``mirror``: keep transcripts in Redis (when the store is Redis). ``own_gateway_port``: the gateway takes
    any free port, not ``gateway.listen`` (a daemon running beside ``agentd once`` may hold that one).
    """
    store = open_store(settings)
    cleanups.push("store", store.close)
    prices = Prices(settings.gateway.prices)
    ledger = Ledger(store, settings.budget, prices)
    gateway = await start_gateway(settings, ledger, cleanups, own_port=own_gateway_port)
    telemetry = start_telemetry(settings, cleanups)
    transcripts = await open_transcripts(settings, cleanups) if mirror else None
    launcher = ClaudeLauncher(
        settings.agent, settings.config_file, gateway=gateway, telemetry=settings.telemetry, transcripts=transcripts
    )
    return Services(store, prices, ledger, gateway, telemetry, transcripts, launcher)


def open_store(settings: Settings) -> Store:
    if settings.store.redis_url is not None:
        return RedisStore(settings.store.redis_url.get_secret_value(), settings.store.conversation_ttl_days)
    return SqliteStore(settings.store.data_dir / "agentd.db", settings.store.conversation_ttl_days)


async def start_gateway(settings: Settings, ledger: Ledger, cleanups: Cleanups, *, own_port: bool) -> Gateway | None:
    """The model gateway, closed after the pool (the CLIs talk through it until they exit); None if it is off."""
    if not settings.agent.gateway:
        return None
    config = settings.gateway
    if own_port:
        config = config.model_copy(update={"listen": f"{config.listen.rpartition(':')[0]}:0"})
    gateway = Gateway(settings.agent, config, ledger)
    await gateway.start()
    cleanups.push("gateway", gateway.close)
    return gateway


def start_telemetry(settings: Settings, cleanups: Cleanups) -> Telemetry:
    """The turn-span exporter, closed (flushed) after the pool: the last turns' spans still go out."""
    telemetry = Telemetry.start(settings.telemetry)
    if telemetry.enabled:
        cleanups.push("telemetry", lambda: asyncio.to_thread(telemetry.close))
    return telemetry


async def open_transcripts(settings: Settings, cleanups: Cleanups) -> Transcripts | None:
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


@dataclass(frozen=True)
class Fleet:
    """What this replica shares with the others on one Redis; alone, local stand-ins."""

    intake: Intake  # keyed API messages, durable across a crash
    mail_duty: Duty  # reading the IMAP inbox: one replica at a time


async def open_fleet(settings: Settings, store: Store, cleanups: Cleanups) -> Fleet:
    """The durable intake beside the store (a table in the embedded file, or this replica's Redis stream),
    and the IMAP duty (always held alone; with Redis, held through a lease). With Redis, this daemon first
    holds its replica name (``ReplicaNameTaken`` if another running daemon has it): the stream is the name's."""
    config = settings.store
    if config.redis_url is None:
        sqlite_intake = SqliteIntake(config.data_dir / "agentd.db")
        cleanups.push("intake", sqlite_intake.close)
        return Fleet(sqlite_intake, SoleDuty(store))
    client = redis_connect(config.redis_url.get_secret_value())
    cleanups.push("fleet", client.aclose)
    cluster = settings.cluster
    name = ReplicaName(client, cluster.replica, cluster.lease_ttl_s)
    await name.take()
    cleanups.push("replica name", name.release)
    leases = Leases(client, cluster.replica, cluster.lease_ttl_s)
    mail_duty = LeasedDuty(leases, f"imap:{settings.email.mailbox}", cluster.lease_ttl_s)
    return Fleet(RedisIntake(client, cluster.replica), mail_duty)


def build_daemon(settings: Settings, services: Services, fleet: Fleet) -> Daemon:
    """The pool, the channels, the jobs and the API, wired to the services; nothing is started yet."""
    pool = Pool(
        settings, services.launcher, services.store, telemetry=services.telemetry, transcripts=services.transcripts
    )
    receipts = Receipts(fleet.intake, pool)
    channels = build_channels(settings, pool, services.store, fleet.mail_duty)
    mount_toolsets(services.launcher, channels)
    scheduler = build_scheduler(settings, pool, services.store, fleet.intake, channels)
    if scheduler is not None:
        channels.append(scheduler)  # last: jobs fire once the channels they deliver to are up
    api = Api(
        settings.http,
        pool,
        services.store,
        channels=channels,
        routes=routes_of(channels),
        scheduler=scheduler,
        ledger=services.ledger,
        mirror=services.transcripts,
        receipts=receipts,
    )
    return Daemon(pool, channels, api, receipts)


def build_channels(settings: Settings, conversations: Conversations, store: Store, mail_duty: Duty) -> list[Channel]:
    """Each configured channel, in start order; each imports its protocol library only when used."""
    channels: list[Channel] = []
    if settings.slack.enabled:
        from bot.slack import SlackChannel

        channels.append(SlackChannel(settings, settings.profile(settings.slack.profile), conversations, store))
    if settings.email.enabled:
        from bot.mail import EmailChannel

        profile = settings.profile(settings.email.profile)
        channels.append(EmailChannel(settings, profile, conversations, store, mail_duty))
    return channels


def mount_toolsets(launcher: ClaudeLauncher, channels: list[Channel]) -> None:
    """Before the pool starts: a process (a spare too) gets the in-process tools that exist when it starts."""
    for channel in channels:
        if isinstance(channel, ToolProvider):
            for name, tools in channel.toolsets().items():
                launcher.add_toolset(name, tools)


def build_scheduler(
    settings: Settings, conversations: Conversations, store: Store, intake: Intake, channels: list[Channel]
) -> Scheduler | None:
    """The jobs, if any are scheduled, with every channel that can deliver their results."""
    if not settings.schedule:
        return None
    scheduler = Scheduler(settings, conversations, store, intake)
    for channel in channels:
        if isinstance(channel, Courier):
            scheduler.add_courier(channel.name, channel)
    return scheduler


def routes_of(components: list[Channel]) -> list[Route]:
    """The HTTP routes the components offer of their own (Slack HTTP Events), for the API server to mount."""
    return [route for c in components if isinstance(c, RouteProvider) for route in c.routes()]
