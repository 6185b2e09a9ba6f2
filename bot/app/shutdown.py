"""Stopping the daemon: signals only set events, one deadline bounds every step, a second signal forces the exit.

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
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any, NoReturn, Protocol

import psutil
import structlog

from bot import procs
from bot.config import HttpConfig
from bot.core import Channel

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

Close = Callable[[], Awaitable[None]]


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


def bounded(
    name: str, close: Close, deadline: Deadline, on_timeout: Callable[[], None] | None = None
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


class Cleanups:
    """Where each component registers its own cleanup as it starts; they run in reverse order.

    With a deadline (``agentd run``) each one is bounded by it; without (``agentd once``, which a
    signal cancels) each runs to its end.
    """

    def __init__(self, stack: AsyncExitStack, deadline: Deadline | None = None) -> None:
        self._stack, self._deadline = stack, deadline

    def push(self, name: str, close: Close, on_timeout: Callable[[], None] | None = None) -> None:
        if self._deadline is None:
            self._stack.push_async_callback(close)
        else:
            self._stack.push_async_callback(bounded(name, close, self._deadline, on_timeout))


class Drainable(Protocol):
    """What the drain needs of the engine: a bounded close, and the CLI processes to kill if that fails."""

    async def close(self, grace_s: float) -> None: ...

    def live_pids(self) -> list[int]: ...


class Door(Protocol):
    """Where new messages come in over HTTP: once draining, it refuses them."""

    draining: bool


def kill_cli_trees(pids: Iterable[int]) -> None:
    for pid in pids:
        procs.kill_tree(pid)


def tree_killer(pool: Drainable) -> Callable[[], None]:
    def kill() -> None:
        # The pool's own close ran out of time before it killed them: do it here, before the process exits.
        kill_cli_trees(pool.live_pids())

    return kill


async def drain(pool: Drainable, door: Door, channels: Sequence[Channel], grace_s: float, deadline: Deadline) -> None:
    """Refuse new messages, stop intake, let running turns finish within the grace (and the deadline)."""
    deadline.start()
    log.info("stopping", grace_s=grace_s, budget_s=deadline.budget_s)
    door.draining = True
    await _stop_intake(channels, deadline)
    drain_s = max(min(grace_s, deadline.left_s()), NO_GRACE_S)
    await bounded("drain", lambda: pool.close(grace_s=drain_s), deadline, tree_killer(pool))()


async def _stop_intake(channels: Sequence[Channel], deadline: Deadline) -> None:
    # Channels are independent: they stop taking messages together, so the drain waits for the slowest only.
    async with asyncio.TaskGroup() as group:
        for channel in channels:
            group.create_task(bounded(f"{channel.name}:intake", channel.stop_intake, deadline)())


async def until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]], budget_s: float) -> None:
    """Run ``serve(stop)``: the first SIGTERM/SIGINT sets ``stop``, and the exit is forced as the module says."""
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, force)
    # A plain task, not a TaskGroup: that would wrap serve()'s errors (a ConfigError exits 2) in an ExceptionGroup.
    guard = asyncio.create_task(_guard_exit(stop, force, budget_s), name="exit-guard")
    try:
        await serve(stop)
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
